"""Multi-task loss: Dice+CE on seg, CE or BCE on cls, L1 on boundary; fixed or uncertainty task weights."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses import DeepSupervisionLoss, DiceCELoss

from medmtl.errors import MedmtlError
from medmtl.networks.multitask_unet import HEAD_NAMES, check_heads

__all__ = ["DEFAULT_WEIGHTS", "MultiTaskLoss"]

DEFAULT_WEIGHTS = {"seg": 1.0, "cls": 0.3, "boundary": 0.5}
# Kendall et al. (CVPR 2018) scale a likelihood by 1/sigma^2 for classification (softmax/Bernoulli)
# and by 1/(2 sigma^2) for regression (Gaussian); the boundary L1 is the regression term here.
_UNCERTAINTY_FACTORS = {"seg": 1.0, "cls": 1.0, "boundary": 0.5}


class MultiTaskLoss(nn.Module):
    """Weighted sum of the per-head losses of :class:`medmtl.networks.MultiTaskUNet`.

    Terms (each a mean over the samples and voxels that have a target):

    - ``seg``: MONAI ``DiceCELoss(to_onehot_y=True, softmax=True, **dice_kwargs)`` of ``preds["seg"]``
      against ``targets["label"]`` ``(N, 1, *spatial)``. With ``preds["seg_ds"]`` (deep supervision) MONAI's
      ``DeepSupervisionLoss`` adds the lower-resolution logits against a nearest-neighbour downsampled label,
      and the sum is divided by the sum of its level weights, so ``loss_seg`` keeps the scale it has
      without deep supervision (as in nnU-Net).
    - ``cls``: ``cls_mode="case"``: cross-entropy of ``(N, K)`` logits against ``targets["cls"]`` ``(N,)``
      class indices, ``-1`` meaning "no target for this sample". ``cls_mode="presence"``: BCE-with-logits of
      ``(N, C-1)`` logits against float ``(N, C-1)`` targets, NaN meaning "no target for this entry".
    - ``boundary``: L1 between ``preds["boundary"]`` (tanh) and ``targets["boundary"]`` of the same shape;
      NaN target voxels (e.g. a whole sample of NaN) are left out.

    Partially labelled data: every term is computed per sample over the samples that have its target and
    averaged over those only. A sample has a mask when its label has no negative value (the data pipeline
    fills the label of a case without a mask with ``medmtl.data.transforms.NO_MASK`` = -1, and its boundary
    target with NaN); it has a class label when its ``cls`` entry is not -1 (case) or NaN (presence).
    A term without any target in the batch (no ``"cls"``/``"boundary"`` key in ``targets``, every entry
    missing, no sample with a mask) is left out of the total and its ``loss_*`` key is **omitted** from
    :attr:`last_terms` (not NaN, so loggers that average per epoch need no NaN handling). Its head's output
    still enters the total multiplied by zero, so that head gets a zero gradient rather than none: every
    parameter takes part in every backward pass, as DDP requires without ``find_unused_parameters``.

    Weighting:

    - ``"fixed"``: ``total = sum_t w_t * L_t`` with ``weights`` over :data:`DEFAULT_WEIGHTS`.
    - ``"uncertainty"`` (Kendall et al., CVPR 2018, homoscedastic uncertainty): one learned log-variance
      ``s_t = log(sigma_t^2)`` per head, initialised to 0, and
      ``total = sum_t c_t * exp(-s_t) * L_t + s_t / 2`` with ``c_t = 1`` for the classification-like terms
      (seg, cls) and ``c_t = 1/2`` for the regression term (boundary), i.e. Kendall's ``1/sigma^2`` and
      ``1/(2 sigma^2)`` factors and ``log sigma`` regulariser. The ``s_t`` are ``nn.Parameter`` of this
      module: **the optimizer must include** ``loss.parameters()``
      (e.g. ``[*net.parameters(), *loss.parameters()]``) and the module must be moved to the network's
      device. Under DDP they are outside the DDP-wrapped network: the bundles' ``multi_gpu_train.yaml``
      averages their gradients with ``medmtl.engine.distributed.AverageGradients``. ``weights`` is not
      used. The total can be negative.

    Args:
        num_classes: segmentation classes C, background included.
        heads: terms to compute, a subset of ``("seg", "cls", "boundary")`` containing "seg"; a head listed
            here whose prediction is missing raises MedmtlError, a prediction not listed is ignored.
        cls_mode: ``"case"`` or ``"presence"``.
        weighting: ``"fixed"`` or ``"uncertainty"``.
        weights: fixed weights per head, merged over :data:`DEFAULT_WEIGHTS`.
        deep_supervision_weights: weight mode of ``DeepSupervisionLoss`` (``"exp"``: 1, 0.5, 0.25, ...;
            ``"same"``; ``"two"``) or explicit weights, full resolution first (at least one per level).
        dice_kwargs: extra arguments for ``DiceCELoss`` (e.g. ``{"include_background": False,
            "batch": True}``).

    Attributes:
        last_terms: after each forward, floats ``loss_seg``, ``loss_cls``, ``loss_boundary`` (present terms),
            ``weight_<head>`` (effective weight of every head: ``w_t``, or ``c_t * exp(-s_t)``) and
            ``loss_total``.
    """

    def __init__(
        self,
        num_classes: int,
        heads: Sequence[str] = HEAD_NAMES,
        cls_mode: str = "case",
        weighting: str = "fixed",
        weights: Mapping[str, float] | None = None,
        deep_supervision_weights: str | Sequence[float] = "exp",
        dice_kwargs: Mapping | None = None,
    ) -> None:
        super().__init__()
        self.heads = check_heads(heads)
        if cls_mode not in ("case", "presence"):
            raise MedmtlError(f"cls_mode must be 'case' or 'presence', got {cls_mode!r}")
        if weighting not in ("fixed", "uncertainty"):
            raise MedmtlError(f"weighting must be 'fixed' or 'uncertainty', got {weighting!r}")
        unknown = sorted(set(weights or {}) - set(HEAD_NAMES))
        if unknown:
            raise MedmtlError(f"weights has unknown head(s) {unknown}; choose from {HEAD_NAMES}")
        self.num_classes = num_classes
        self.cls_mode = cls_mode
        self.weighting = weighting
        self.weights = {**DEFAULT_WEIGHTS, **(weights or {})}
        if isinstance(deep_supervision_weights, str):
            ds_args: dict = {"weight_mode": deep_supervision_weights}
        else:
            ds_args = {"weights": [float(w) for w in deep_supervision_weights]}
        dice_args = {"to_onehot_y": True, "softmax": True, **(dice_kwargs or {})}
        self.seg_loss = DeepSupervisionLoss(DiceCELoss(**dice_args), **ds_args)
        if weighting == "uncertainty":
            self.log_vars = nn.ParameterDict({h: nn.Parameter(torch.zeros(())) for h in self.heads})
        self.last_terms: dict[str, float] = {}

    def forward(
        self,
        preds: Mapping[str, torch.Tensor | list[torch.Tensor]] | torch.Tensor,
        targets: Mapping[str, torch.Tensor] | torch.Tensor,
    ) -> torch.Tensor:
        """Compute the weighted total and record every term in :attr:`last_terms`.

        Args:
            preds: the network's dict output (a bare tensor is read as ``{"seg": tensor}``).
            targets: ``"label"`` and, where available, ``"cls"`` and ``"boundary"`` (a bare tensor is read as
                ``{"label": tensor}``).

        Returns:
            the scalar total loss.
        """
        preds = {"seg": preds} if isinstance(preds, torch.Tensor) else preds
        targets = {"label": targets} if isinstance(targets, torch.Tensor) else targets
        missing = [h for h in self.heads if h not in preds]
        if missing:
            raise MedmtlError(
                f"MultiTaskLoss: head(s) {missing} are enabled but the network output has only "
                f"{sorted(preds)}; switch them off in both the network and the loss"
            )
        losses = self.terms(preds, targets)
        total = preds["seg"].new_zeros(())
        terms: dict[str, float] = {}
        for head in self.heads:
            weight = self.weight(head)
            terms[f"weight_{head}"] = float(weight.detach()) if torch.is_tensor(weight) else weight
            loss = losses[head]
            if loss is None:
                total = total + self._zero_anchor(preds, head)
                continue
            terms[f"loss_{head}"] = float(loss.detach())
            total = total + weight * loss
            if self.weighting == "uncertainty":
                total = total + 0.5 * self.log_vars[head]
        terms["loss_total"] = float(total.detach())
        self.last_terms = terms
        return total

    def terms(self, preds: Mapping, targets: Mapping) -> dict[str, torch.Tensor | None]:
        """The unweighted loss of every enabled head (None where the batch has no target for it).

        ``forward`` weights and sums these; ``benchmarks/hippocampus_gradients.py`` differentiates them one by one.
        """
        losses = {"seg": self._seg_loss(preds, targets)}
        if "cls" in self.heads:
            losses["cls"] = self._cls_loss(preds["cls"], targets.get("cls"))
        if "boundary" in self.heads:
            losses["boundary"] = self._boundary_loss(preds["boundary"], targets.get("boundary"))
        return losses

    @staticmethod
    def _zero_anchor(preds: Mapping, head: str) -> torch.Tensor:
        """0 x the head's outputs: adds nothing to the total, gives the head a zero gradient (not None)."""
        outputs = [preds[head], *preds.get("seg_ds", [])] if head == "seg" else [preds[head]]
        return sum(0.0 * out.sum() for out in outputs)

    def weight(self, head: str) -> torch.Tensor | float:
        """Effective weight of a head: fixed ``w_t`` or ``c_t * exp(-s_t)``."""
        if self.weighting == "uncertainty":
            return _UNCERTAINTY_FACTORS[head] * torch.exp(-self.log_vars[head])
        return float(self.weights[head])

    def _seg_loss(self, preds: Mapping, targets: Mapping) -> torch.Tensor | None:
        if "label" not in targets:
            raise MedmtlError(f"MultiTaskLoss: targets have no 'label' (keys: {sorted(targets)})")
        label = targets["label"]
        levels = [preds["seg"], *preds.get("seg_ds", [])]
        # a sample without a mask has a label filled with a negative value: Dice+CE over the others only
        has_mask = label.reshape(label.shape[0], -1).amin(dim=1) >= 0
        if not bool(has_mask.all()):
            if not bool(has_mask.any()):
                return None
            label, levels = label[has_mask], [level[has_mask] for level in levels]
        if len(levels) == 1:
            return self.seg_loss(levels[0], label)
        weights = self.seg_loss.weights
        if weights is not None and len(weights) < len(levels):
            raise MedmtlError(
                f"deep_supervision_weights has {len(weights)} weights for {len(levels)} seg outputs "
                "(full resolution and each seg_ds level)"
            )
        # nearest-neighbour downsampling in DeepSupervisionLoss needs a floating-point label
        label = label if label.is_floating_point() else label.float()
        return self.seg_loss(levels, label) / sum(self.seg_loss.get_weights(len(levels)))

    def _cls_loss(self, logits: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor | None:
        if target is None:
            return None
        target = torch.as_tensor(target, device=logits.device)
        if self.cls_mode == "presence":
            return self._presence_loss(logits, target)
        if logits.ndim != 2:
            raise MedmtlError(f"MultiTaskLoss: cls logits must be (N, K), got shape {tuple(logits.shape)}")
        if target.numel() != logits.shape[0]:
            raise MedmtlError(
                f"MultiTaskLoss: cls target needs one class index per sample ({logits.shape[0]}), "
                f"got shape {tuple(target.shape)}"
            )
        target = target.reshape(-1).long()
        known = target >= 0  # -1: this sample has no case label
        if not bool(known.any()):
            return None
        if bool((target >= logits.shape[1]).any()):
            raise MedmtlError(
                f"MultiTaskLoss: cls target {target.tolist()} has a class index >= {logits.shape[1]} "
                "(the number of cls logits)"
            )
        return F.cross_entropy(logits[known], target[known])

    def _presence_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
        expected = (logits.shape[0], self.num_classes - 1)
        if tuple(logits.shape) != expected or tuple(target.shape) != expected:
            raise MedmtlError(
                f"MultiTaskLoss: presence mode needs cls logits and targets of shape {expected} "
                f"(N, num_classes - 1), got {tuple(logits.shape)} and {tuple(target.shape)}"
            )
        target = target.to(logits.dtype)
        known = ~torch.isnan(target)  # NaN: presence of this structure unknown for this sample
        if not bool(known.any()):
            return None
        return F.binary_cross_entropy_with_logits(logits[known], target[known])

    def _boundary_loss(self, pred: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor | None:
        if target is None:
            return None
        if tuple(target.shape) != tuple(pred.shape):
            raise MedmtlError(
                f"MultiTaskLoss: boundary target shape {tuple(target.shape)} does not match the "
                f"prediction {tuple(pred.shape)} (N, num_classes - 1, *spatial)"
            )
        target = target.to(pred.dtype)
        known = ~torch.isnan(target)  # NaN: no distance map for this sample (or voxel)
        if bool(known.all()):  # the usual case: boolean indexing of whole maps would cost a copy of each
            return F.l1_loss(pred, target)
        if not bool(known.any()):
            return None
        return F.l1_loss(pred[known], target[known])
