"""Partially labelled data: cases with a class label but no mask, masks without a class label.

Loss (per-sample dropping, averaging, zero gradient for a head without any target), the phantom's
`--masked K`, the data pipeline for cases without a mask, the masked-share sampler, validation metrics on the
cases that have each target, and the phantom bundle training one epoch on a mixed dataset.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient
from monai.data import CacheDataset, DataLoader
from monai.losses import DiceCELoss
from test_phantom_bundle import TINY, artifacts, run_bundle, runs_of

from medmtl.cli import main as cli_main
from medmtl.data.checks import check_dataset
from medmtl.data.datalist import load_datalist
from medmtl.data.pipelines import train_transforms, val_transforms
from medmtl.data.sampling import MaskedShareSampler
from medmtl.data.synthetic import generate_dataset
from medmtl.data.transforms import NO_MASK
from medmtl.engine import MultiTaskBatch, MultiTaskEvaluation
from medmtl.losses import MultiTaskLoss
from medmtl.networks import MultiTaskUNet

SIZE = 16


def tiny_net() -> MultiTaskUNet:
    torch.manual_seed(0)
    return MultiTaskUNet(spatial_dims=3, in_channels=1, num_classes=3, filters=(4, 8, 16), strides=(1, 2, 2),
                         cls_hidden=8, cls_dropout=0.0)


def batch_targets(masks: list[bool], classes: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    """Targets of a prepared batch: a sample without a mask has NO_MASK labels and a NaN boundary map."""
    g = torch.Generator().manual_seed(seed)
    n = len(masks)
    label = torch.randint(0, 3, (n, 1, SIZE, SIZE, SIZE), generator=g).float()
    boundary = torch.rand(n, 2, SIZE, SIZE, SIZE, generator=g) * 2 - 1
    for b, masked in enumerate(masks):
        if not masked:
            label[b] = NO_MASK
            boundary[b] = float("nan")
    return {"label": label, "cls": torch.tensor(classes), "boundary": boundary}


def head_grads(net: MultiTaskUNet) -> dict[str, float]:
    """Sum of |grad| over each head's parameters and over the shared encoder (None counts as missing)."""
    out = {}
    for name, module in {"seg": net.seg_head, "cls": net.cls_head, "boundary": net.boundary_head,
                         "encoder": net.encoder}.items():
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads), f"{name}: a parameter got no gradient at all"
        out[name] = float(sum(g.abs().sum() for g in grads))
    return out


def forward_backward(masks: list[bool], classes: list[int]):
    net, loss_fn = tiny_net(), MultiTaskLoss(num_classes=3)
    image = torch.randn(len(masks), 1, SIZE, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    preds = net(image)
    for p in preds.values():
        p.retain_grad()
    total = loss_fn(preds, batch_targets(masks, classes))
    total.backward()
    return net, loss_fn, preds, total


def test_batch_without_any_mask_trains_only_the_classifier():
    net, loss_fn, preds, total = forward_backward([False, False], [1, 0])
    assert torch.isfinite(total)
    assert set(loss_fn.last_terms) >= {"loss_cls"} and "loss_seg" not in loss_fn.last_terms
    assert "loss_boundary" not in loss_fn.last_terms
    grads = head_grads(net)
    assert grads["seg"] == 0.0 and grads["boundary"] == 0.0  # zero, not None and not NaN
    assert grads["cls"] > 0 and grads["encoder"] > 0
    expected = 0.3 * F.cross_entropy(preds["cls"].detach(), torch.tensor([1, 0]))
    torch.testing.assert_close(total.detach(), expected)


def test_batch_without_any_class_label_trains_seg_and_boundary_only():
    net, loss_fn, preds, total = forward_backward([True, True], [-1, -1])
    assert torch.isfinite(total) and "loss_cls" not in loss_fn.last_terms
    grads = head_grads(net)
    assert grads["cls"] == 0.0
    assert grads["seg"] > 0 and grads["boundary"] > 0 and grads["encoder"] > 0


def test_mixed_batch_averages_each_term_over_the_samples_that_have_its_target():
    # sample 0: mask, no class label; sample 1: class label, no mask; sample 2: both
    masks, classes = [True, False, True], [-1, 1, 0]
    net, loss_fn, preds, total = forward_backward(masks, classes)
    targets = batch_targets(masks, classes)
    assert torch.isfinite(total)
    with_mask = torch.tensor(masks)
    seg = DiceCELoss(to_onehot_y=True, softmax=True)(preds["seg"].detach()[with_mask], targets["label"][with_mask])
    cls = F.cross_entropy(preds["cls"].detach()[1:], targets["cls"][1:])
    boundary = (preds["boundary"].detach()[with_mask] - targets["boundary"][with_mask]).abs().mean()
    assert loss_fn.last_terms["loss_seg"] == pytest.approx(seg.item(), rel=1e-5)
    assert loss_fn.last_terms["loss_cls"] == pytest.approx(cls.item(), rel=1e-5)
    assert loss_fn.last_terms["loss_boundary"] == pytest.approx(boundary.item(), rel=1e-5)
    torch.testing.assert_close(total.detach(), seg + 0.3 * cls + 0.5 * boundary)
    # per sample: nothing flows back from a target the sample does not have
    assert preds["seg"].grad[1].abs().sum() == 0 and preds["seg"].grad[0].abs().sum() > 0
    assert preds["boundary"].grad[1].abs().sum() == 0 and preds["boundary"].grad[2].abs().sum() > 0
    assert preds["cls"].grad[0].abs().sum() == 0 and preds["cls"].grad[1].abs().sum() > 0
    assert all(v > 0 for v in head_grads(net).values())


def test_batch_with_no_target_at_all_gives_a_zero_finite_loss():
    net, loss_fn, _, total = forward_backward([False], [-1])
    assert float(total.detach()) == 0.0 and set(loss_fn.last_terms) == {"weight_seg", "weight_cls", "weight_boundary",
                                                             "loss_total"}
    assert all(v == 0.0 for v in head_grads(net).values())


def test_synth_masked_keeps_k_masks_and_every_class_label(tmp_path, capsys):
    assert cli_main(["synth", "--out", str(tmp_path / "d"), "--cases", "6", "--size", "16", "--masked", "2"]) == 0
    assert "2 with a mask" in capsys.readouterr().out
    meta = json.loads((tmp_path / "d" / "dataset.json").read_text())
    training = meta["training"]
    assert [("label" in e) for e in training] == [True, True, False, False, False, False]
    assert all(e["class"] in (0, 1) for e in training)
    assert sorted(e["class"] for e in training[:2]) == [0, 1]  # one masked case with a lesion, one without
    assert len(list((tmp_path / "d" / "labelsTr").iterdir())) == 2 and meta["numMasked"] == 2
    # the images are the same as in the fully labelled set
    generate_dataset(tmp_path / "full", cases=6, size=16)
    full = json.loads((tmp_path / "full" / "dataset.json").read_text())["training"]
    for a, b in zip(training, full, strict=True):
        assert a["class"] == b["class"]
        same = nib.load(tmp_path / "d" / a["image"]).get_fdata() == nib.load(tmp_path / "full" / b["image"]).get_fdata()
        assert same.all()
    with pytest.raises(Exception, match="masked"):
        generate_dataset(tmp_path / "bad", cases=3, size=16, masked=4)


@pytest.fixture(scope="module")
def mixed_items(tmp_path_factory) -> list[dict]:
    """Six phantom cases: two with mask and class, two with a class only, two with a mask only."""
    root = tmp_path_factory.mktemp("mixed")
    generate_dataset(root, cases=6, size=SIZE, masked=4)
    items = load_datalist(root)
    for item in items[2:4]:
        del item["class"]
    return items


PIPELINE = {"num_classes": 3, "patch_size": [SIZE] * 3, "cls_mode": "case", "samples_per_volume": 1,
            "augment": {"affine_prob": 1.0}}


def test_training_chain_fills_missing_masks_and_class_labels(mixed_items):
    chain = train_transforms(PIPELINE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "unable to generate class balanced samples" for unmasked cases
        samples = [chain(dict(item))[0] for item in mixed_items]
    for item, sample in zip(mixed_items, samples, strict=True):
        label, boundary = sample["label"], sample["boundary"]
        if "label" in item:
            assert label.min() >= 0 and torch.isfinite(boundary).all()
        else:
            assert (label == NO_MASK).any() and torch.isnan(boundary).all()
        assert int(sample["cls"]) == item.get("class", -1)
    # they collate and pass through the loss with finite values
    loader = DataLoader(CacheDataset(mixed_items, chain, progress=False), batch_size=6)
    image, targets = MultiTaskBatch()(next(iter(loader)))
    net, loss_fn = tiny_net(), MultiTaskLoss(num_classes=3)
    total = loss_fn(net(image), targets)
    assert torch.isfinite(total) and {"loss_seg", "loss_cls", "loss_boundary"} <= set(loss_fn.last_terms)


def test_presence_targets_are_unknown_without_a_mask(mixed_items):
    chain = train_transforms({**PIPELINE, "cls_mode": "presence", "augment": False})
    sample = chain(dict(mixed_items[4]))[0]  # no mask
    assert torch.isnan(sample["cls"]).all()
    assert torch.isfinite(chain(dict(mixed_items[0]))[0]["cls"]).all()


def test_validation_scores_dice_where_a_mask_exists_and_auc_where_a_class_label_exists(mixed_items):
    chain = val_transforms({**PIPELINE, "augment": False})
    data = [chain(dict(item)) for item in mixed_items]
    evaluation = MultiTaskEvaluation({1: "organ", 2: "lesion"}, cls_mode="case")
    rows = []
    for d in data:
        label = d["label"][None]
        ref = label.clamp(min=0).long()
        seg = F.one_hot(ref[:, 0], 3).permute(0, 4, 1, 2, 3).float() * 10  # a perfect segmentation
        true = int(d["cls"])
        logits = torch.tensor([[0.0, 2.0 if true == 1 else -2.0]])  # a perfect classifier
        rows += evaluation.score_batch(d["image"][None], {"seg": seg, "cls": logits},
                                       {"label": label, "cls": d["cls"][None], "boundary": d["boundary"][None]},
                                       {"case_id": [d["case_id"]]})
    evaluation.cases = rows
    with_mask = [r for r in rows if r.get("has_mask", True)]
    assert len(with_mask) == 4 and all(r["mean_dice"] == 1.0 for r in with_mask)
    assert all(math.isnan(r["mean_dice"]) and "overlay" not in r for r in rows if r.get("has_mask") is False)
    assert [r["cls_true"] for r in rows] == [item.get("class") for item in mixed_items]
    metrics = evaluation.summary()
    assert metrics["val/mean_dice"] == 1.0 and metrics["val/dice_lesion"] == 1.0
    assert metrics["val/cls_auc"] == 1.0 and metrics["val/cls_accuracy"] == 1.0
    assert len(evaluation._cls_probs) == 4  # the two cases without a class label are not in the AUC


@pytest.mark.parametrize("share, batch_size, expected", [(0.5, 2, 1), (0.25, 4, 1), (1.0, 3, 3), (0.0, 2, 0)])
def test_sampler_puts_the_set_number_of_masked_cases_in_every_batch(share, batch_size, expected):
    data = [{"image": f"i{i}", **({"label": f"l{i}"} if i < 3 else {})} for i in range(12)]
    sampler = MaskedShareSampler(data, batch_size, share, num_samples=40)
    torch.manual_seed(0)
    order = list(sampler)
    assert len(order) == len(sampler) == 40 // batch_size * batch_size + (batch_size if 40 % batch_size else 0)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    assert all(sum(i < 3 for i in batch) == expected for batch in batches)
    if 0 < expected < batch_size:  # every case of each kind is used, not the same few
        assert set(order) == set(range(12))
    torch.manual_seed(0)
    assert list(sampler) == order  # the order follows torch's RNG (restored on resume)


def test_sampler_refuses_a_share_the_data_cannot_give():
    only_masked = [{"image": "a", "label": "b"}] * 4
    with pytest.raises(Exception, match="without a mask"):
        MaskedShareSampler(only_masked, 2, 0.5)
    with pytest.raises(Exception, match="in \\[0, 1\\]"):
        MaskedShareSampler(only_masked, 2, 1.5)
    assert len(list(MaskedShareSampler(only_masked, 2, 1.0))) == 4



def _partial_dataset(root, cases: int, size: int, masked: int, drop_class: tuple[int, ...] = ()):
    """A phantom set with `masked` masks; the cases in `drop_class` lose their class label."""
    generate_dataset(root, cases=cases, size=size, masked=masked)
    meta = json.loads((root / "dataset.json").read_text())
    for index in drop_class:
        del meta["training"][index]["class"]
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_check_data_counts_each_kind_of_target(tmp_path, capsys):
    root = _partial_dataset(tmp_path / "ok", cases=6, size=16, masked=3, drop_class=(0,))
    report = check_dataset(root)
    assert report.ok
    assert report.target_counts() == {(True, False): 1, (True, True): 2, (False, True): 3}
    assert cli_main(["check-data", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "targets: 2 with a mask and a class label, 1 with a mask only, 3 with a class label only" in lines
    assert lines[-1] == "6 cases checked, 0 with problems"

    # a training case with neither target, and a class that is no class index, fail with one line each
    bad = _partial_dataset(tmp_path / "bad", cases=4, size=16, masked=2, drop_class=(3,))
    meta = json.loads((bad / "dataset.json").read_text())
    meta["training"][2]["class"] = "yes"
    (bad / "dataset.json").write_text(json.dumps(meta))
    assert cli_main(["check-data", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "FAIL phantom_002" in out and "'class' must be an integer >= 0 (or -1 for none), got 'yes'" in out
    assert "FAIL phantom_003" in out and "neither a 'label' file nor a 'class' listed in dataset.json" in out


def test_fully_labelled_report_is_unchanged(tmp_path):
    generate_dataset(tmp_path / "full", cases=2, size=16)
    assert not any(line.startswith("targets:") for line in check_dataset(tmp_path / "full").format().splitlines())


def test_bundle_trains_one_epoch_on_a_mixed_dataset(tmp_path):
    # 8 cases: 0-3 masked (case 1 without a class label), 4-7 with a class label only
    data = _partial_dataset(tmp_path / "data", cases=8, size=32, masked=4, drop_class=(1,))
    out = tmp_path / "run"
    proc = run_bundle("training", ["train.yaml"], "--max_epochs", "1", "--output_dir", str(out),
                      "--dataset_dir", str(data), "--masked_share", "0.5", *TINY)
    assert "Traceback" not in proc.stderr
    (run,) = runs_of(out)
    metrics = run.data.metrics
    for key in ("train/loss_seg", "train/loss_cls", "train/loss_boundary", "train/loss"):
        assert math.isfinite(metrics[key]), key
    assert run.data.params["masked_share"] == "0.5"
    # fold 0 of 2 validates 4 cases: Dice over those with a mask, the AUC over those with a class label
    client = MlflowClient(f"sqlite:///{out / 'eval' / 'mlruns.db'}")
    table = Path(client.download_artifacts(run.info.run_id, "validation/cases_epoch_001.csv", str(tmp_path)))
    rows = list(csv.DictReader(table.open()))
    without_mask = [r for r in rows if r.get("has_mask") == "0"]
    with_mask = [r for r in rows if r.get("has_mask") != "0"]
    assert len(rows) == 4 and without_mask and with_mask
    assert all(r["dice_organ"] == "nan" for r in without_mask)
    assert all(math.isfinite(float(r["dice_organ"])) for r in with_mask)
    assert metrics["val/dice_organ"] == pytest.approx(np.mean([float(r["dice_organ"]) for r in with_mask]))
    overlays = artifacts(out, run.info.run_id, "overlays")  # pictures of the worst cases that have a mask
    assert overlays and not any(r["case_id"] in name for name in overlays for r in without_mask)
