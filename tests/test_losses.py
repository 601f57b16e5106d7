"""MultiTaskLoss: each term against its hand-computed value, missing targets, weighting, deep supervision."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss

from medmtl.errors import MedmtlError
from medmtl.losses import MultiTaskLoss

SIZES = {2: (16, 16), 3: (8, 8, 8)}


def make_batch(spatial_dims: int, num_classes: int = 3, num_cls: int = 2, seed: int = 0):
    """Random predictions and targets shaped like MultiTaskUNet's output and the prepared batch."""
    g = torch.Generator().manual_seed(seed)
    size = SIZES[spatial_dims]
    preds = {
        "seg": torch.randn(2, num_classes, *size, generator=g, requires_grad=True),
        "cls": torch.randn(2, num_cls, generator=g, requires_grad=True),
        "boundary": torch.tanh(torch.randn(2, num_classes - 1, *size, generator=g)).requires_grad_(),
    }
    targets = {
        "label": torch.randint(0, num_classes, (2, 1, *size), generator=g),
        "cls": torch.tensor([1, 0]),
        "boundary": torch.rand(2, num_classes - 1, *size, generator=g) * 2 - 1,
    }
    return preds, targets


def dice_ce(seg, label):
    return DiceCELoss(to_onehot_y=True, softmax=True)(seg, label)


def down(label, like):
    """The label at a deep-supervision level's size, as DeepSupervisionLoss resamples it."""
    return F.interpolate(label, size=like.shape[2:], mode="nearest-exact")


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_fixed_weighting_is_weighted_sum_of_dicece_ce_l1(spatial_dims):
    preds, targets = make_batch(spatial_dims)
    loss_fn = MultiTaskLoss(num_classes=3, weights={"cls": 0.25})
    total = loss_fn(preds, targets)
    seg = dice_ce(preds["seg"], targets["label"])
    cls = F.cross_entropy(preds["cls"], targets["cls"])
    boundary = (preds["boundary"] - targets["boundary"]).abs().mean()
    torch.testing.assert_close(total, 1.0 * seg + 0.25 * cls + 0.5 * boundary)
    terms = loss_fn.last_terms
    assert terms["loss_seg"] == pytest.approx(seg.item(), rel=1e-5)
    assert terms["loss_cls"] == pytest.approx(cls.item(), rel=1e-5)
    assert terms["loss_boundary"] == pytest.approx(boundary.item(), rel=1e-5)
    assert (terms["weight_seg"], terms["weight_cls"], terms["weight_boundary"]) == (1.0, 0.25, 0.5)
    assert terms["loss_total"] == pytest.approx(total.item(), rel=1e-5)
    total.backward()
    assert preds["seg"].grad is not None and preds["cls"].grad is not None


def test_terms_are_the_unweighted_losses_forward_sums():
    preds, targets = make_batch(3)
    loss_fn = MultiTaskLoss(num_classes=3, heads=("seg", "boundary"), weights={"boundary": 0.2})
    terms = loss_fn.terms(preds, {"label": targets["label"]})  # no boundary target in this batch
    assert set(terms) == {"seg", "boundary"} and terms["boundary"] is None
    torch.testing.assert_close(terms["seg"], dice_ce(preds["seg"], targets["label"]))
    terms = loss_fn.terms(preds, targets)
    torch.testing.assert_close(terms["boundary"], (preds["boundary"] - targets["boundary"]).abs().mean())
    assert loss_fn.weight("boundary") == 0.2
    torch.testing.assert_close(loss_fn(preds, targets), terms["seg"] + 0.2 * terms["boundary"])


def test_missing_case_label_drops_that_sample():
    preds, targets = make_batch(3)
    loss_fn = MultiTaskLoss(num_classes=3)
    targets["cls"] = torch.tensor([-1, 1])
    total = loss_fn(preds, targets)
    cls_second = F.cross_entropy(preds["cls"][1:], targets["cls"][1:])
    assert loss_fn.last_terms["loss_cls"] == pytest.approx(cls_second.item(), rel=1e-5)
    seg = dice_ce(preds["seg"], targets["label"])
    boundary = F.l1_loss(preds["boundary"], targets["boundary"])
    torch.testing.assert_close(total, seg + 0.3 * cls_second + 0.5 * boundary)


@pytest.mark.parametrize("cls_target", [torch.tensor([-1, -1]), None])
def test_no_case_label_in_batch_leaves_the_term_out(cls_target):
    preds, targets = make_batch(2)
    if cls_target is None:
        del targets["cls"]
    else:
        targets["cls"] = cls_target
    loss_fn = MultiTaskLoss(num_classes=3)
    total = loss_fn(preds, targets)
    assert torch.isfinite(total)
    expected = dice_ce(preds["seg"], targets["label"]) + 0.5 * F.l1_loss(
        preds["boundary"], targets["boundary"]
    )
    torch.testing.assert_close(total, expected)
    assert "loss_cls" not in loss_fn.last_terms  # omitted, not NaN
    assert loss_fn.last_terms["weight_cls"] == 0.3


def test_presence_mode_masks_nan_targets():
    preds, targets = make_batch(2)
    targets["cls"] = torch.tensor([[1.0, math.nan], [math.nan, 0.0]])
    loss_fn = MultiTaskLoss(num_classes=3, cls_mode="presence", heads=("seg", "cls"))
    loss_fn(preds, targets)
    known_logits = torch.stack([preds["cls"][0, 0], preds["cls"][1, 1]])
    expected = F.binary_cross_entropy_with_logits(known_logits, torch.tensor([1.0, 0.0]))
    assert loss_fn.last_terms["loss_cls"] == pytest.approx(expected.item(), rel=1e-5)
    targets["cls"] = torch.full((2, 2), math.nan)
    loss_fn(preds, targets)
    assert "loss_cls" not in loss_fn.last_terms


def test_presence_mode_needs_one_logit_per_foreground_class():
    preds, targets = make_batch(2, num_cls=3)
    targets["cls"] = torch.zeros(2, 2)
    with pytest.raises(MedmtlError, match=r"presence mode needs .* \(2, 2\)"):
        MultiTaskLoss(num_classes=3, cls_mode="presence")(preds, targets)


def test_boundary_nan_sample_and_absent_target_are_dropped():
    preds, targets = make_batch(3)
    loss_fn = MultiTaskLoss(num_classes=3, heads=("seg", "boundary"))
    targets["boundary"][0] = math.nan
    loss_fn(preds, targets)
    expected = F.l1_loss(preds["boundary"][1], targets["boundary"][1])
    assert loss_fn.last_terms["loss_boundary"] == pytest.approx(expected.item(), rel=1e-5)
    del targets["boundary"]
    total = loss_fn(preds, targets)
    assert "loss_boundary" not in loss_fn.last_terms
    torch.testing.assert_close(total, dice_ce(preds["seg"], targets["label"]))


def test_uncertainty_weighting_learns_log_variances():
    preds, targets = make_batch(3)
    loss_fn = MultiTaskLoss(num_classes=3, weighting="uncertainty")
    params = dict(loss_fn.named_parameters())
    assert set(params) == {"log_vars.seg", "log_vars.cls", "log_vars.boundary"}
    with torch.no_grad():
        loss_fn.log_vars["seg"].fill_(0.5)
        loss_fn.log_vars["boundary"].fill_(-0.2)
    total = loss_fn(preds, targets)
    seg = dice_ce(preds["seg"], targets["label"])
    cls = F.cross_entropy(preds["cls"], targets["cls"])
    boundary = F.l1_loss(preds["boundary"], targets["boundary"])
    # Kendall: exp(-s) L + s/2 for classification-like terms, exp(-s)/2 L + s/2 for the regression term
    expected = (
        (math.exp(-0.5) * seg + 0.5 / 2)  # s_seg = 0.5
        + (cls + 0.0)  # s_cls = 0
        + (0.5 * math.exp(0.2) * boundary - 0.2 / 2)  # s_boundary = -0.2
    )
    torch.testing.assert_close(total, expected)
    terms = loss_fn.last_terms
    assert terms["weight_seg"] == pytest.approx(math.exp(-0.5))
    assert terms["weight_cls"] == pytest.approx(1.0)
    assert terms["weight_boundary"] == pytest.approx(0.5 * math.exp(0.2))
    total.backward()
    for name, param in params.items():
        assert param.grad is not None and param.grad.abs() > 0, name


def test_uncertainty_term_without_target_gets_no_gradient():
    preds, targets = make_batch(2)
    targets["cls"] = torch.tensor([-1, -1])
    loss_fn = MultiTaskLoss(num_classes=3, weighting="uncertainty")
    loss_fn(preds, targets).backward()
    assert loss_fn.log_vars["cls"].grad is None
    assert loss_fn.log_vars["seg"].grad is not None


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_deep_supervision_list_is_weighted_and_normalised(spatial_dims):
    preds, targets = make_batch(spatial_dims)
    size = torch.tensor(SIZES[spatial_dims])
    half = torch.randn(2, 3, *(size // 2).tolist())
    quarter = torch.randn(2, 3, *(size // 4).tolist())
    preds["seg_ds"] = [half, quarter]
    loss_fn = MultiTaskLoss(num_classes=3, heads=("seg",))
    label = targets["label"].float()
    expected = (
        dice_ce(preds["seg"], label)
        + 0.5 * dice_ce(half, down(label, half))
        + 0.25 * dice_ce(quarter, down(label, quarter))
    ) / 1.75
    torch.testing.assert_close(loss_fn(preds, targets), expected)

    explicit = MultiTaskLoss(num_classes=3, heads=("seg",), deep_supervision_weights=[1.0, 0.0, 1.0])
    expected = dice_ce(preds["seg"], label) + dice_ce(quarter, down(label, quarter))
    torch.testing.assert_close(explicit(preds, targets), expected / 2.0)
    with pytest.raises(MedmtlError, match="2 weights for 3 seg outputs"):
        MultiTaskLoss(num_classes=3, deep_supervision_weights=[1.0, 0.5])(preds, targets)


def test_enabled_head_without_prediction_is_an_error():
    preds, targets = make_batch(2)
    del preds["boundary"]
    with pytest.raises(MedmtlError, match=r"\['boundary'\] are enabled"):
        MultiTaskLoss(num_classes=3)(preds, targets)


def test_switched_off_heads_are_ignored_and_tensors_accepted():
    preds, targets = make_batch(2)
    loss_fn = MultiTaskLoss(num_classes=3, heads=("seg",))
    expected = dice_ce(preds["seg"], targets["label"])
    torch.testing.assert_close(loss_fn(preds, targets), expected)
    assert set(loss_fn.last_terms) == {"loss_seg", "weight_seg", "loss_total"}
    torch.testing.assert_close(loss_fn(preds["seg"], targets["label"]), expected)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"heads": ("cls",)}, "must include 'seg'"),
        ({"cls_mode": "ordinal"}, "cls_mode"),
        ({"weighting": "gradnorm"}, "weighting"),
        ({"weights": {"edges": 1.0}}, "unknown head"),
    ],
)
def test_bad_configuration_is_rejected(kwargs, message):
    # (ValueError: the heads are checked by medmtl.networks' check_heads)
    with pytest.raises((MedmtlError, ValueError), match=message):
        MultiTaskLoss(num_classes=3, **kwargs)


def test_bad_targets_are_named():
    preds, targets = make_batch(2)
    loss_fn = MultiTaskLoss(num_classes=3)
    with pytest.raises(MedmtlError, match="class index >= 2"):
        loss_fn(preds, {**targets, "cls": torch.tensor([0, 5])})
    with pytest.raises(MedmtlError, match="boundary target shape"):
        loss_fn(preds, {**targets, "boundary": targets["boundary"][:, :1]})
    with pytest.raises(MedmtlError, match="no 'label'"):
        loss_fn(preds, {"cls": targets["cls"]})
