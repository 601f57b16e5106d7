"""The plain MONAI tutorial UNet on MSD Task04: the peer the hippocampus bundle must beat (issue 13).

    python benchmarks/monai_unet_peer.py --dataset-dir ../shared/datasets/Task04_Hippocampus \
        --output-dir runs/peer [--fold 0] [--seed 0] [--budget-min 30 | --epochs N] [--budget-clock wall|cpu]

What it trains, exactly as the issue describes the tutorial baseline: MONAI's
`UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(16, 32, 64, 128), strides=(2, 2, 2),
num_res_units=2)`, MONAI's `DiceCELoss(to_onehot_y=True, softmax=True)`, AdamW at a constant 3e-3, batch 4, one
random 40x56x40 crop per case (half centred on foreground), light augmentation (affine: p 0.2, rotation 15
degrees, scaling 10%; a left-right flip, p 0.5), z-score per image, MONAI's `SupervisedTrainer`. The split,
the patch size (planned by the bundle's rule), the budget handler and the step timer are the bundle's, so the
comparison differs only in what the issue compares: network, loss, optimiser schedule, batch, augmentation.

It writes `OUTPUT/models/last.pt` (`{"network": state_dict, "trainer": {...}}`) and `OUTPUT/train_summary.json`;
`benchmarks/hippocampus.py` scores `last.pt` with the bundle's own `evaluate.yaml` (Gaussian sliding window,
same validation cases), so the scoring code is shared, not re-implemented.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from monai.data import CacheDataset, DataLoader
from monai.engines import SupervisedTrainer
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from monai.transforms import (
    Compose,
    EnsureTyped,
    FgBgToIndicesd,
    LoadImaged,
    NormalizeIntensityd,
    Orientationd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    SpatialPadd,
)

from medmtl.data.datalist import kfold_split, load_datalist
from medmtl.data.planning import fingerprint, plan_patch_size
from medmtl.engine import setup_runtime
from medmtl.engine.budget import StepTimer, TimeBudget

PEER_NAME = "monai_unet"
#: the network as a bundle config expression: the evaluation builds it from this, training from `peer_network`
PEER_NETWORK_EXPR = (
    "$monai.networks.nets.UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(16, 32, 64, 128), "
    "strides=(2, 2, 2), num_res_units=2)"
)
PEER_SETTINGS = {
    "network": "monai.networks.nets.UNet(3, 1, 3, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2)",
    "loss": "DiceCELoss(to_onehot_y=True, softmax=True)",
    "optimizer": "AdamW lr 3e-3 constant, weight decay 1e-5",
    "batch_size": 4,
    "augmentation": "RandAffined p 0.2 (15 deg, 10% scale), RandFlipd p 0.5 left-right",
}
DIVISOR = 8  # the UNet downsamples 3 times


def peer_network() -> UNet:
    """The plain MONAI tutorial UNet of issue 13."""
    return UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(16, 32, 64, 128), strides=(2, 2, 2),
                num_res_units=2)


def peer_patch_size(datalist: list[dict]) -> list[int]:
    """The training patch: the bundle's rule (median shape rounded up to multiples of 8): 40x56x40 on Task04."""
    return plan_patch_size(fingerprint(datalist), target_spacing=[1.0, 1.0, 1.0], divisor=DIVISOR)


def peer_transforms(patch_size: list[int]) -> Compose:
    """Tutorial-style training transforms: deterministic part first (cached), then crop and light augmentation."""
    keys = ["image", "label"]
    return Compose([
        LoadImaged(keys, ensure_channel_first=True, image_only=True),
        Orientationd(keys, axcodes="RAS", labels=None),
        NormalizeIntensityd("image"),  # z-score per image, as the bundle does
        SpatialPadd(keys, spatial_size=patch_size),
        FgBgToIndicesd("label"),
        EnsureTyped(keys, dtype=torch.float32, track_meta=False),
        RandCropByPosNegLabeld(keys, label_key="label", spatial_size=patch_size, pos=1, neg=1, num_samples=1,
                               fg_indices_key="label_fg_indices", bg_indices_key="label_bg_indices"),
        RandAffined(keys, prob=0.2, rotate_range=[0.26] * 3, scale_range=[0.1] * 3, mode=["bilinear", "nearest"],
                    padding_mode="zeros"),
        RandFlipd(keys, prob=0.5, spatial_axis=0),  # left-right after RAS: anterior/posterior stay in place
    ])


def build_peer_trainer(train_items: list[dict], patch_size: list[int], max_epochs: int, budget_min: float | None,
                       budget_clock: str = "wall", batch_size: int = 4, learning_rate: float = 3e-3,
                       epoch_length: int | None = None) -> tuple[SupervisedTrainer, StepTimer, TimeBudget]:
    """MONAI's SupervisedTrainer for the peer, with the bundle's step timer and time budget attached.

    Args:
        train_items: datalist items (absolute "image"/"label" paths) to train on.
        patch_size: training crop.
        max_epochs: epochs to run (the budget may stop earlier).
        budget_min: training budget in minutes (None: no budget).
        budget_clock: "wall" or "cpu" (see `medmtl.engine.budget.TimeBudget`).
        batch_size: samples per step (4 in the issue's description).
        learning_rate: AdamW's constant rate (3e-3 in the issue's description).
        epoch_length: iterations per epoch (None: one pass over the data).

    Returns:
        the trainer, its step timer and its time budget.
    """
    dataset = CacheDataset(train_items, transform=peer_transforms(patch_size), cache_rate=1.0, num_workers=2,
                           progress=False)
    # num_workers 0 as in the bundle: on 2 cores a worker competes with the compute threads
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=0)
    network = peer_network()
    optimizer = torch.optim.AdamW(network.parameters(), lr=learning_rate, weight_decay=1e-5)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=max_epochs, train_data_loader=loader, network=network,
        optimizer=optimizer, loss_function=DiceCELoss(to_onehot_y=True, softmax=True), epoch_length=epoch_length,
    )
    timer = StepTimer()
    timer.attach(trainer)
    budget = TimeBudget(budget_min, clock=budget_clock)
    budget.attach(trainer)
    return trainer, timer, budget


def train_peer(dataset_dir: Path, output_dir: Path, fold: int = 0, seed: int = 0, budget_min: float | None = None,
               epochs: int | None = None, budget_clock: str = "wall") -> dict:
    """Train the peer on the bundle's fold and save its final weights; returns the training summary.

    Args:
        dataset_dir: the MSD Task04 folder.
        output_dir: where `models/last.pt` and `train_summary.json` go.
        fold: validation fold of 5 (split seed 0, as the bundle benchmark).
        seed: training seed.
        budget_min: training budget (minutes); used when `epochs` is None.
        epochs: train exactly this many epochs instead.
        budget_clock: "wall" or "cpu".
    """
    setup_runtime(seed)
    items = load_datalist(dataset_dir)
    train_items, val_items = kfold_split(items, n_folds=5, fold=fold, seed=0)
    patch = peer_patch_size(items)
    trainer, timer, budget = build_peer_trainer(train_items, patch, epochs or 100000,
                                                None if epochs else budget_min, budget_clock)
    start = time.perf_counter()
    cpu_start = time.process_time()
    trainer.run()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    state = trainer.state
    models = output_dir / "models"
    models.mkdir(parents=True, exist_ok=True)
    trainer_state = {"iteration": state.iteration, "epoch": state.epoch, "epoch_length": state.epoch_length}
    torch.save({"network": trainer.network.state_dict(), "trainer": trainer_state}, models / "last.pt")
    summary = {
        "variant": PEER_NAME,
        "settings": PEER_SETTINGS,
        "patch_size": patch,
        "train_cases": len(train_items),
        "validation_cases": len(val_items),
        "epochs": state.iteration // state.epoch_length,
        "iterations": state.iteration,
        "batch_size": trainer.data_loader.batch_size,
        "train_wall_seconds": round(wall, 1),
        "train_cpu_seconds": round(cpu, 1),
        **{k: v for k, v in timer.summary().items() if k != "iterations"},
    }
    (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main() -> None:
    """Train the peer and print its training summary as JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset-dir", type=Path, required=True)
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget-min", type=float, default=30.0)
    parser.add_argument("--budget-clock", choices=["wall", "cpu"], default="wall")
    parser.add_argument("--epochs", type=int)
    args = parser.parse_args()
    summary = train_peer(args.dataset_dir.resolve(), args.output_dir, args.fold, args.seed, args.budget_min,
                         args.epochs, args.budget_clock)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
