"""Issue 13 part 4: the low-data harness's training subset and the auxiliary designs it measures (fast, no data)."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from conftest import REPO_ROOT
from monai.bundle import ConfigParser

TRAIN = REPO_ROOT / "bundles/hippocampus_mtl/configs/train.yaml"


@pytest.fixture(scope="module")
def lowdata():
    """benchmarks/hippocampus_lowdata.py as a module (a script that imports its sibling hippocampus.py)."""
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    path = REPO_ROOT / "benchmarks/hippocampus_lowdata.py"
    spec = importlib.util.spec_from_file_location("hippocampus_lowdata", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _literal(value: str):
    """A command-line value as the bundle CLI reads it (benchmarks/hippocampus.py's rule)."""
    from hippocampus import _literal as literal

    return literal(value)


def _parser(lowdata, arm: str, **overrides) -> ConfigParser:
    """The bundle's train.yaml with an arm's command-line overrides applied as the bundle CLI applies them."""
    parser = ConfigParser()
    parser.read_config(str(TRAIN))
    variant, extra = lowdata.ARMS[arm]
    args = lowdata.VARIANTS[variant] + extra
    for key, value in zip(args[::2], args[1::2], strict=True):
        parser[key.removeprefix("--")] = _literal(value)
    for key, value in overrides.items():
        parser[key] = value
    return parser


def test_subset_expression_takes_a_fixed_nested_subset_and_leaves_validation_alone(lowdata):
    train = [{"case_id": f"c{i:03d}"} for i in range(160)]
    val = [{"case_id": f"v{i:03d}"} for i in range(40)]
    picked = {}
    for size in (20, 40):
        parser = _parser(lowdata, "all")
        parser["data#split"] = (train, val)
        parser["train#dataset#data"] = lowdata.subset_expression(size)
        picked[size] = [c["case_id"] for c in parser.get_parsed_content("train#dataset#data")]
        assert parser.get_parsed_content("validate#dataset#data") == val
    assert len(picked[20]) == 20 and len(set(picked[40])) == 40
    assert picked[40][:20] == picked[20]  # the 20-case arm trains on the head of the 40-case subset
    assert picked[20] != [c["case_id"] for c in train[:20]]  # shuffled, not the first cases by id
    order = torch.randperm(160, generator=torch.Generator().manual_seed(lowdata.SUBSET_SEED))[:20]
    assert picked[20] == [train[int(i)]["case_id"] for i in order]  # what subset_case_ids reports


def test_equal_steps_epochs(lowdata):
    assert lowdata.epochs_for(20, 100) * 20 == lowdata.epochs_for(40, 100) * 40 == 100 * lowdata.BATCH_SIZE


def test_summary_pairs_arms_with_single_task_by_seed(lowdata):
    def run(arm, seed, dice, hd):
        return {"arm": arm, "train_cases": 20, "seed": seed, "val/mean_dice": dice, "val/mean_hd95_mm": hd,
                "iterations": 100, "epochs": 20, "sec_per_iter": 1.0}

    results = [run("seg", 0, 0.80, 3.0), run("all", 0, 0.82, 2.0), run("seg", 1, 0.70, 4.0), run("all", 1, 0.70, 5.0)]
    summary = lowdata.summarize(results)
    assert summary["arms"]["n20_seg"]["mean_dice"]["mean"] == 0.75
    diff = summary["differences_paired_by_seed"]["n20_all_minus_seg"]
    assert diff["mean_dice_diff_per_seed"] == [0.02, 0.0]
    assert diff["mean_hd95_mm_diff_per_seed"] == [-1.0, 1.0]
    assert diff["mean_dice_diff"]["mean"] == 0.01 and diff["mean_dice_diff"]["sd"] == pytest.approx(0.0141, abs=1e-4)


def test_boundary_weight_design_reaches_the_loss(lowdata):
    parser = _parser(lowdata, "seg_boundary_w1")
    loss = parser.get_parsed_content("loss")
    assert list(loss.heads) == ["seg", "boundary"] and loss.weight("boundary") == 1.0 and loss.weight("seg") == 1.0


def test_deep_supervision_design_trains_with_auxiliary_seg_losses(lowdata):
    parser = _parser(lowdata, "seg_deepsup", **{"network_args#channels_last": False})
    network = parser.get_parsed_content("network_def")
    loss = parser.get_parsed_content("loss")
    network.train()
    out = network(torch.randn(1, 1, 16, 24, 16))
    assert len(out["seg_ds"]) >= 1
    label = torch.randint(0, 3, (1, 1, 16, 24, 16))
    total = loss(out, {"label": label})
    total.backward()
    assert torch.isfinite(total)
    network.eval()
    with torch.no_grad():
        assert "seg_ds" not in network(torch.randn(1, 1, 16, 24, 16))  # inference sees the plain seg output
