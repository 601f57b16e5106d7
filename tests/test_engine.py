"""Engine wiring: batch preparation, evaluation metrics, loss-term averaging, checkpoints, multi-head inferer."""

from __future__ import annotations

import math
import os
import pickle

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor

from medmtl.engine import LossTermsAverager, MultiTaskBatch, MultiTaskEvaluation, TrainingCheckpoints
from medmtl.engine.checkpoint import RngState, atomic_torch_save, load_checkpoint
from medmtl.engine.evaluation import metric_label
from medmtl.errors import MedmtlError
from medmtl.inference.sliding import MultiHeadInferer

LABELS = {0: "background", 1: "Organ", 2: "Lesion"}


def _logits_from_labels(labels: torch.Tensor, num_classes: int = 3) -> torch.Tensor:
    """Perfectly confident seg logits (N, C, *spatial) for an (N, 1, *spatial) label map."""
    return torch.nn.functional.one_hot(labels[:, 0].long(), num_classes).movedim(-1, 1).float() * 10


def test_prepare_batch_hands_all_targets():
    batch = {"image": torch.zeros(2, 1, 4, 4), "label": torch.ones(2, 1, 4, 4), "cls": torch.tensor([0, 1]),
             "boundary": torch.zeros(2, 2, 4, 4), "case_id": ["a", "b"]}
    image, targets = MultiTaskBatch()(batch, device="cpu")
    assert image.shape == (2, 1, 4, 4)
    assert set(targets) == {"label", "cls", "boundary"}
    _, only_label = MultiTaskBatch()({"image": batch["image"], "label": batch["label"]})
    assert set(only_label) == {"label"}


def test_metric_label_is_readable():
    assert metric_label("Anterior") == "anterior"
    assert metric_label("Left kidney (L)") == "left_kidney_l"


def test_dice_hd95_and_empty_conventions():
    ref = torch.zeros(2, 1, 16, 16, 16, dtype=torch.long)
    ref[:, :, 4:12, 4:12, 4:12] = 1
    ref[0, :, 6:9, 6:9, 6:9] = 2  # case 0 has a lesion, case 1 has none
    pred = ref.clone()
    pred[0, :, 4:12, 4:12, 11] = 0  # shave one slice of the organ off case 0
    pred[0][pred[0] == 2] = 0  # and miss its lesion entirely (predicted as background)
    affine = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0]))
    image = MetaTensor(torch.rand(2, 1, 16, 16, 16), affine=affine)
    ev = MultiTaskEvaluation(LABELS, cls_mode=None, keep_overlays=False)
    rows = ev.score_batch(image, {"seg": _logits_from_labels(pred)}, {"label": ref}, {"case_id": ["c0", "c1"]})

    organ_ref = ((ref[0] == 1).sum()).item()
    organ_pred = ((pred[0] == 1).sum()).item()
    overlap = ((pred[0] == 1) & (ref[0] == 1)).sum().item()
    assert rows[0]["dice_organ"] == pytest.approx(2 * overlap / (organ_ref + organ_pred), abs=1e-6)
    assert rows[0]["dice_lesion"] == 0.0  # present in the reference, missed
    assert rows[0]["hd95_lesion_mm"] == pytest.approx(math.sqrt(3) * 16 * 2.0)  # missed: image diagonal in mm
    assert rows[1]["dice_organ"] == 1.0 and rows[1]["hd95_organ_mm"] == 0.0
    assert math.isnan(rows[1]["dice_lesion"]) and math.isnan(rows[1]["hd95_lesion_mm"])  # absent in both
    assert rows[0]["case_id"] == "c0"

    ev.cases = rows
    summary = ev.summary()
    assert summary["val/dice_lesion"] == 0.0  # NaN of case 1 left out of the mean
    assert summary["val/dice_organ"] == pytest.approx((rows[0]["dice_organ"] + 1.0) / 2)
    assert summary["val/mean_dice"] == pytest.approx((summary["val/dice_organ"] + 0.0) / 2)
    # the organ lost one slice at the border: 95th percentile surface distance is one voxel = 2 mm
    assert 0 < rows[0]["hd95_organ_mm"] <= 2.0 + 1e-6


def test_false_positive_lesion_scores_zero():
    ref = torch.zeros(1, 1, 8, 8)
    pred = ref.clone().long()
    pred[0, 0, 2:4, 2:4] = 2
    ev = MultiTaskEvaluation(LABELS, cls_mode=None, keep_overlays=False)
    (row,) = ev.score_batch(torch.zeros(1, 1, 8, 8), {"seg": _logits_from_labels(pred)}, {"label": ref})
    assert row["dice_lesion"] == 0.0
    assert math.isnan(row["hd95_lesion_mm"])  # undefined without a reference structure


def test_classification_auc_accuracy_and_missing_targets():
    ev = MultiTaskEvaluation(LABELS, cls_mode="case", keep_overlays=False)
    ref = torch.zeros(4, 1, 8, 8, dtype=torch.long)
    seg = _logits_from_labels(ref)
    # probabilities of class 1 rise with the case index; true classes 0, 0, 1, 1 -> AUC 1, accuracy 3/4
    cls_logits = torch.tensor([[2.0, -2.0], [1.0, 0.0], [0.0, 0.5], [-2.0, 2.0]])
    rows = ev.score_batch(torch.zeros(4, 1, 8, 8), {"seg": seg, "cls": cls_logits},
                          {"label": ref, "cls": torch.tensor([0, 1, 1, -1])})
    ev.cases = rows
    assert rows[3]["cls_true"] is None  # -1: no case label, left out of AUC and accuracy
    s = ev.summary()
    assert s["val/cls_accuracy"] == pytest.approx(2 / 3)
    assert s["val/cls_auc"] == pytest.approx(1.0)


def test_boundary_mae_and_overlay():
    ev = MultiTaskEvaluation(LABELS, cls_mode=None)
    ref = torch.zeros(1, 1, 8, 8, 6, dtype=torch.long)
    ref[0, 0, 2:5, 2:5, 4] = 1
    pred = {"seg": _logits_from_labels(ref), "boundary": torch.full((1, 2, 8, 8, 6), 0.5)}
    (row,) = ev.score_batch(torch.rand(1, 1, 8, 8, 6), pred, {"label": ref, "boundary": torch.zeros(1, 2, 8, 8, 6)})
    assert row["boundary_mae"] == pytest.approx(0.5)
    assert row["overlay"]["label"].shape == (8, 8) and row["overlay"]["label"].sum() == 9  # slice 4 picked


def test_evaluation_attached_to_engine_fills_state():
    ev = MultiTaskEvaluation(LABELS, cls_mode=None, keep_overlays=False)
    ref = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    ref[..., 2:6, 2:6] = 1

    def step(engine, batch):
        engine.state.batch = batch
        return {"image": torch.zeros(1, 1, 8, 8), "label": {"label": ref}, "pred": {"seg": _logits_from_labels(ref)}}

    engine = Engine(step)
    ev.attach(engine)
    engine.run([{"case_id": ["a"]}, {"case_id": ["b"]}], max_epochs=1)
    assert engine.state.metrics["val/dice_organ"] == 1.0
    assert [r["case_id"] for r in engine.state.case_results] == ["a", "b"]


def test_loss_terms_averaged_per_epoch():
    class FakeLoss:
        last_terms: dict = {}

    loss = FakeLoss()
    values = iter([{"loss_total": 1.0, "loss_seg": 0.5, "loss_cls": float("nan")},
                   {"loss_total": 3.0, "loss_seg": 1.5, "loss_cls": 0.2}])

    def step(engine, batch):
        loss.last_terms = next(values)

    engine = Engine(step)
    engine.optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    LossTermsAverager(loss).attach(engine)
    engine.run([0, 1], max_epochs=1)
    m = engine.state.metrics
    assert m["train/loss"] == 2.0 and m["train/loss_seg"] == 1.0
    assert m["train/loss_cls"] == pytest.approx(0.2)  # the NaN iteration (no target) does not count
    assert m["train/lr"] == pytest.approx(0.1)


def test_atomic_save_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "model.pt"
    atomic_torch_save({"w": torch.ones(2)}, path)

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_torch_save({"w": Unsaveable()}, path)
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(2))
    assert os.listdir(tmp_path) == ["model.pt"]  # no temporary file left behind


class _Payload:
    def __reduce__(self):
        return (print, ("pwned",))


def test_load_checkpoint_refuses_pickle_payload_and_garbage(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(1), "x": _Payload()}, evil)
    with pytest.raises(MedmtlError, match="evil.pt: refused to load"):
        load_checkpoint(evil)
    trunc = tmp_path / "trunc.pt"
    atomic_torch_save({"w": torch.ones(100)}, trunc)
    trunc.write_bytes(trunc.read_bytes()[:50])
    with pytest.raises(MedmtlError, match="trunc.pt: not a readable checkpoint"):
        load_checkpoint(trunc)
    with pytest.raises(MedmtlError, match="not found"):
        load_checkpoint(tmp_path / "none.pt")
    assert pickle  # the payload class above is what a malicious file would carry


def test_rng_state_round_trip_survives_weights_only(tmp_path):
    rng = RngState()
    atomic_torch_save({"rng": rng.state_dict()}, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3))
    rng.load_state_dict(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])


def test_training_checkpoints_best_and_last(tmp_path):
    net = torch.nn.Linear(1, 1, bias=False)
    scores = iter([0.5, 0.4, 0.7])
    evaluator = Engine(lambda e, b: None)
    evaluator.add_event_handler(
        Events.EPOCH_COMPLETED, lambda e: e.state.metrics.update({"val/mean_dice": next(scores)})
    )

    def train_step(engine, batch):  # the weight records the epoch it was trained in
        net.weight.data.fill_(engine.state.epoch)

    trainer = Engine(train_step)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: evaluator.run([0], max_epochs=1))
    ckpt = TrainingCheckpoints(tmp_path, net, {"network": net, "trainer": trainer})
    ckpt.attach(trainer, evaluator)  # attached after the score and validation handlers, as in the bundles
    best_weights = []
    evaluator.add_event_handler(
        Events.EPOCH_COMPLETED, lambda e: best_weights.append(float(load_checkpoint(ckpt.model_path)["weight"]))
    )
    trainer.run([0], max_epochs=3)

    assert best_weights == [1.0, 1.0, 3.0]  # saved at 0.5 (epoch 1) and 0.7 (epoch 3), not at 0.4
    assert ckpt.best_metric == 0.7
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["trainer"]["iteration"] == 3 and last["trainer"]["max_epochs"] == 3
    assert last["checkpoints"]["best_metric"] == 0.7
    assert set(last) == {"network", "trainer", "checkpoints", "rng"}


class _WindowNet(torch.nn.Module):
    """Seg = input, cls = per-window mean of the input (so pooling can be checked by hand)."""

    def forward(self, x):
        mean = x.mean((1, 2, 3, 4))
        return {"seg": x.repeat(1, 2, 1, 1, 1), "cls": torch.stack([mean, -mean], 1)}


def test_inferer_single_window_returns_window_logits():
    x = torch.rand(1, 1, 8, 8, 8)
    out = MultiHeadInferer(roi_size=8)(x, _WindowNet())
    assert out["seg"].shape == (1, 2, 8, 8, 8)
    assert torch.allclose(out["cls"], torch.tensor([[x.mean(), -x.mean()]]), atol=1e-6)


def test_inferer_pools_cls_over_windows():
    x = torch.zeros(1, 1, 16, 8, 8)
    x[:, :, 8:] = 1.0  # two non-overlapping windows see means 0 and 1
    out = MultiHeadInferer(roi_size=(8, 8, 8), overlap=0.0, mode="constant")(x, _WindowNet())
    assert torch.allclose(out["seg"][:, :1], x)
    assert torch.allclose(out["cls"], torch.tensor([[0.5, -0.5]]), atol=1e-6)


def test_inferer_slice_by_slice_for_2d_networks():
    class Net2D(torch.nn.Module):
        def forward(self, x):
            assert x.ndim == 4
            return {"seg": x.repeat(1, 3, 1, 1), "boundary": x.repeat(1, 2, 1, 1), "cls": x.mean((2, 3)).repeat(1, 2)}

    x = torch.rand(1, 1, 8, 8, 5)
    out = MultiHeadInferer(roi_size=(8, 8), slice_axis=2)(x, Net2D())
    assert out["seg"].shape == (1, 3, 8, 8, 5) and out["boundary"].shape == (1, 2, 8, 8, 5)
    assert torch.allclose(out["cls"], x.mean().repeat(1, 2), atol=1e-5)
