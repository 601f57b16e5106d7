"""How the auxiliary heads' gradients meet the segmentation gradient on the shared trunk (hippocampus bundle).

    python benchmarks/hippocampus_gradients.py --dataset-dir ../shared/datasets/Task04_Hippocampus \
        [--epochs 1 4 8] [--batches 20]

Trains the all-heads default of `bundles/hippocampus_mtl` (fold 0, seed 0, the bundle's trainer without tracking
or checkpoints) for max(--epochs) epochs and, at initialisation and after each listed epoch, takes `--batches`
training batches and computes the gradient of each weighted loss term (seg, cls, boundary, weighted as
`loss_args` weights them) with respect to the parameters the heads share (encoder and decoder). Prints, per
point, the median gradient norm of each term, the median cosine similarity between the seg gradient and each
auxiliary one, and the share of batches where that cosine is negative, as JSON. An auxiliary gradient as large
as the seg one and orthogonal to it takes a share of every update away from segmentation; a negative cosine
means the tasks pull the trunk in opposite directions. The measuring batches come from the training loader, so
the run's later batches differ from those of a run that does not measure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser

CONFIG = Path(__file__).resolve().parents[1] / "bundles" / "hippocampus_mtl" / "configs" / "train.yaml"
AUX_HEADS = ("cls", "boundary")


def trunk_gradients(network: torch.nn.Module, loss: torch.nn.Module, loader, prepare, batches: int) -> dict:
    """Median norms and seg/aux cosines of the per-term gradients on the encoder and decoder parameters."""
    trunk = [p for name, p in network.named_parameters() if name.startswith(("encoder.", "decoder."))]
    device = trunk[0].device
    network.train()
    rows = []
    for index, batch in enumerate(loader):
        if index == batches:
            break
        image, targets = prepare(batch, device)
        grads = {}
        for head, term in loss.terms(network(image), targets).items():
            if term is None:
                continue
            parts = torch.autograd.grad(loss.weight(head) * term, trunk, retain_graph=True, allow_unused=True)
            grads[head] = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                                     for g, p in zip(parts, trunk, strict=True)])
        row = {f"norm_{head}": float(g.norm()) for head, g in grads.items()}
        for head in AUX_HEADS:
            if head in grads:
                row[f"cos_seg_{head}"] = float(torch.nn.functional.cosine_similarity(grads["seg"], grads[head], dim=0))
        rows.append(row)
    summary = {key: round(statistics.median(r[key] for r in rows), 4) for key in rows[0]}
    for head in AUX_HEADS:
        if f"cos_seg_{head}" in rows[0]:
            summary[f"negative_cos_seg_{head}"] = round(sum(r[f"cos_seg_{head}"] < 0 for r in rows) / len(rows), 2)
    return summary


def main() -> None:
    """Print one JSON object: the gradient figures at initialisation and after each listed epoch."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset-dir", type=Path, required=True, help="the MSD Task04_Hippocampus folder")
    ap.add_argument("--epochs", type=int, nargs="+", default=[1, 4, 8], help="measure after these epochs")
    ap.add_argument("--batches", type=int, default=20, help="training batches per measurement")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        parser = ConfigParser()
        parser.read_config(str(CONFIG))
        parser.update({"dataset_dir": str(args.dataset_dir), "output_dir": scratch, "resume": False,
                       "heads": ["seg", "cls", "boundary"], "max_epochs": max(args.epochs),
                       "train#handlers": ["@lr_schedule"]})  # the rate schedule only: no validation, tracking
        parser.get_parsed_content("initialize")  # the bundle's checks, seeding and log file
        trainer: Engine = parser.get_parsed_content("train#trainer")
        network, loss = parser.get_parsed_content("network"), parser.get_parsed_content("loss")
        loader, prepare = parser.get_parsed_content("train#dataloader"), parser.get_parsed_content("prepare_batch")

        def measure() -> dict:
            return trunk_gradients(network, loss, loader, prepare, args.batches)

        report = {"weights": loss.weights, "batches": args.batches, "initialisation": measure()}

        @trainer.on(Events.EPOCH_COMPLETED)
        def _after_epoch(engine: Engine) -> None:
            if engine.state.epoch in args.epochs:
                report[f"epoch_{engine.state.epoch}"] = measure()

        trainer.run()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
