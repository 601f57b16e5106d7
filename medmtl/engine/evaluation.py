"""Validation metrics for every head, per case and aggregated under readable names.

Attached to a MONAI `SupervisedEvaluator` (with `decollate=False`), it reads each iteration's predictions
(the dict from `MultiHeadInferer`) and targets (the dict from `MultiTaskBatch`) and records one row per case.
At the end of the epoch it writes into `engine.state.metrics`:

    val/mean_dice, val/dice_<label>, val/hd95_<label>_mm, val/cls_auc, val/cls_accuracy, val/boundary_mae

and leaves the per-case rows in `engine.state.case_results` for the tracker (table and overlay pictures).

Distributed validation (DDP under torchrun): when the evaluator's data loader uses a `DistributedSampler`,
each rank scores only its share of the cases; at the end of the epoch every rank gathers all ranks' rows
(`all_gather_object`) before aggregating, so every rank's metrics equal the single-process result over all
cases (the key metric then picks the same best checkpoint everywhere) and rank 0's case table holds every
case. With MONAI's `DistributedSampler(even_divisible=False, shuffle=False)` each case is scored exactly once
and the gathered rows are put back in dataset order, so even the floating-point sums match a single process.

Conventions (nnU-Net's): a class absent from both reference and prediction is not scored (NaN, left out of
means); absent from the reference but predicted scores Dice 0. HD95 is in mm on the evaluated grid; a class
present in the reference but not predicted gets the image diagonal as its HD95 (the worst possible value)
rather than being dropped, so missing a structure is never rewarded.

Partially labelled validation data: a case without a mask (label filled with a negative value, see
`medmtl.data.transforms.NO_MASK`) gets no Dice, HD95, boundary error or overlay (NaN, left out of the means;
`has_mask` false in its row of the case table); a case without a class label (-1, or NaN in presence mode)
is left out of the AUC and accuracy. So `val/dice_*` is over the cases with a mask and `val/cls_auc` over
those with a class label.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data.utils import affine_to_spacing
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_roc_auc
from monai.networks.utils import one_hot
from torch.utils.data import DistributedSampler

from medmtl.engine import distributed
from medmtl.io import atomic_write_text

logger = logging.getLogger(__name__)

KEY_METRIC = "val/mean_dice"


def metric_label(name: str) -> str:
    """A label name as it appears in metric names: lower case, runs of other characters as one underscore."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "class"


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _overlay_slice(image: torch.Tensor, label: torch.Tensor, pred: torch.Tensor) -> dict[str, np.ndarray]:
    """The slice (along the last axis) with the most reference foreground, as 2D arrays for a picture."""
    if label.ndim == 2:
        index = (...,)
    else:
        area = (label > 0).flatten(0, -2).sum(0)
        index = (..., int(area.argmax()) if area.max() > 0 else label.shape[-1] // 2)
    return {
        "image": image[index].float().cpu().numpy(),
        "label": label[index].cpu().numpy().astype(np.uint8),
        "pred": pred[index].cpu().numpy().astype(np.uint8),
    }


class MultiTaskEvaluation:
    """Per-case Dice, HD95 (mm), classification and boundary errors; aggregated validation metrics.

    Args:
        label_names: foreground label index -> name, e.g. {1: "organ", 2: "lesion"}.
        cls_mode: "case" (softmax over case classes, positive class 1) or "presence" (sigmoid per foreground
            class); None when there is no classification head.
        prefix: metric name prefix.
        keep_overlays: keep one 2D slice per case (image, reference, prediction) for overlay pictures.
        gather: collect every rank's cases before aggregating. None (default): when a process group is
            initialized and the engine's data loader has a `DistributedSampler` (each rank then sees only its
            share); without one, every rank already scores all cases and gathering would count them twice.
    """

    def __init__(
        self,
        label_names: Mapping[int, str],
        cls_mode: str | None = "case",
        prefix: str = "val/",
        keep_overlays: bool = True,
        gather: bool | None = None,
    ) -> None:
        self.label_names = {int(k): str(v) for k, v in label_names.items() if int(k) != 0}
        self.num_classes = max(self.label_names) + 1
        self.cls_mode = cls_mode
        self.prefix = prefix
        self.keep_overlays = keep_overlays
        self.gather = gather
        self.cases: list[dict[str, Any]] = []
        self._cls_probs: list[np.ndarray] = []
        self._cls_targets: list[np.ndarray] = []

    def attach(self, engine: Engine) -> None:
        """Register with an evaluator: reset at epoch start, update per iteration, aggregate at epoch end."""
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.update)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.aggregate)

    def reset(self, engine: Engine | None = None) -> None:
        """Forget the previous epoch's cases."""
        self.cases, self._cls_probs, self._cls_targets = [], [], []

    def update(self, engine: Engine) -> None:
        """Score the cases of the current batch."""
        output, batch = engine.state.output, engine.state.batch
        pred, targets, image = output["pred"], output["label"], output["image"]
        self.cases.extend(self.score_batch(image, pred, targets, batch))

    def score_batch(
        self,
        image: torch.Tensor,
        pred: Mapping[str, torch.Tensor],
        targets: Mapping[str, torch.Tensor],
        batch: Mapping[str, Any] | None = None,
    ) -> list[dict[str, Any]]:
        """One result row per case of a batch.

        Args:
            image: network input (N, C_in, *spatial); a MetaTensor gives the spacing for HD95.
            pred: "seg" logits (N, C, *spatial), optional "cls" logits and "boundary" maps.
            targets: "label" (N, 1, *spatial), optional "cls" and "boundary" targets.
            batch: the collated batch, for "case_id" (a list of str).

        Returns:
            rows with case_id, dice_<label>, hd95_<label>_mm, mean_dice, cls_prob, cls_true, boundary_mae and
            (when kept) "overlay"; a case without a mask has NaN Dice and HD95, no boundary_mae or overlay, and
            has_mask False.
        """
        seg = pred["seg"].detach().float()
        n, ndim = seg.shape[0], seg.ndim - 2
        labels = targets["label"].detach().long()
        masked = labels.flatten(1).amin(dim=1) >= 0  # a negative label: the case has no mask
        labels = labels.clamp(min=0)  # one_hot needs valid indices; unmasked rows are blanked below
        pred_labels = seg.argmax(dim=1, keepdim=True)
        pred_oh = one_hot(pred_labels, self.num_classes)
        ref_oh = one_hot(labels, self.num_classes)
        dice = compute_dice(pred_oh, ref_oh, include_background=False, ignore_empty=False)
        ref_present = ref_oh[:, 1:].flatten(2).any(-1)
        pred_present = pred_oh[:, 1:].flatten(2).any(-1)
        dice[~ref_present & ~pred_present] = float("nan")
        dice[~masked] = float("nan")
        spacings = self._spacings(image, n, ndim)

        case_ids = list(batch.get("case_id", [])) if batch is not None else []
        rows = []
        for b in range(n):
            row: dict[str, Any] = {"case_id": str(case_ids[b]) if b < len(case_ids) else f"case_{len(self.cases) + b}"}
            diag = float(np.linalg.norm(np.asarray(seg.shape[2:]) * spacings[b]))
            has_mask = bool(masked[b])
            if not has_mask:  # only then: a fully labelled set's table keeps its columns
                row["has_mask"] = False
            for c, name in self.label_names.items():
                row[f"dice_{metric_label(name)}"] = float(dice[b, c - 1])
                row[f"hd95_{metric_label(name)}_mm"] = self._hd95(
                    pred_oh[b : b + 1, c : c + 1], ref_oh[b : b + 1, c : c + 1],
                    bool(ref_present[b, c - 1]), bool(pred_present[b, c - 1]), spacings[b], diag,
                ) if has_mask else float("nan")
            row["mean_dice"] = _nanmean([row[f"dice_{metric_label(name)}"] for name in self.label_names.values()])
            row.update(self._classification(pred, targets, b))
            if has_mask and "boundary" in pred and "boundary" in targets:
                row["boundary_mae"] = float((pred["boundary"][b].float() - targets["boundary"][b].float()).abs().mean())
            if self.keep_overlays and has_mask:
                row["overlay"] = _overlay_slice(image[b, 0], labels[b, 0], pred_labels[b, 0])
            rows.append(row)
        return rows

    @staticmethod
    def _spacings(image: torch.Tensor, n: int, ndim: int) -> list[np.ndarray]:
        affine = getattr(image, "affine", None)
        if affine is None:
            return [np.ones(ndim)] * n
        affine = affine.reshape(-1, *affine.shape[-2:])
        return [np.asarray(affine_to_spacing(affine[min(b, len(affine) - 1)], r=ndim), dtype=float) for b in range(n)]

    @staticmethod
    def _hd95(pred: torch.Tensor, ref: torch.Tensor, ref_present: bool, pred_present: bool,
              spacing: np.ndarray, diag: float) -> float:
        if not ref_present:
            return float("nan")
        if not pred_present:
            return diag
        hd = compute_hausdorff_distance(pred.cpu(), ref.cpu(), include_background=True, percentile=95,
                                        spacing=spacing.tolist())
        return float(hd[0, 0])

    def _classification(self, pred: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor],
                        b: int) -> dict[str, Any]:
        if self.cls_mode is None or "cls" not in pred or "cls" not in targets:
            return {}
        logits, target = pred["cls"][b].detach().float().cpu(), targets["cls"][b].detach().cpu()
        if self.cls_mode == "case":
            probs = torch.softmax(logits, dim=0).numpy()
            true = int(target)
            if true >= 0:
                self._cls_probs.append(probs)
                self._cls_targets.append(np.asarray(true))
            return {"cls_prob": float(probs[-1]), "cls_true": true if true >= 0 else None}
        probs = torch.sigmoid(logits).numpy()
        true_vec = target.float().numpy()
        if not np.isnan(true_vec).any():
            self._cls_probs.append(probs)
            self._cls_targets.append(true_vec)
        return {"cls_prob": probs.round(4).tolist(), "cls_true": true_vec.tolist()}

    def summary(self) -> dict[str, float]:
        """Aggregate the cases scored so far into named validation metrics."""
        p = self.prefix
        metrics: dict[str, float] = {}
        for name in self.label_names.values():
            key = metric_label(name)
            metrics[f"{p}dice_{key}"] = _nanmean([r[f"dice_{key}"] for r in self.cases])
            metrics[f"{p}hd95_{key}_mm"] = _nanmean([r[f"hd95_{key}_mm"] for r in self.cases])
        metrics[KEY_METRIC.replace("val/", p, 1)] = _nanmean(
            [metrics[f"{p}dice_{metric_label(n)}"] for n in self.label_names.values()]
        )
        metrics[f"{p}mean_hd95_mm"] = _nanmean(
            [metrics[f"{p}hd95_{metric_label(n)}_mm"] for n in self.label_names.values()]
        )
        if self._cls_probs:
            metrics.update(self._classification_summary())
        maes = [r["boundary_mae"] for r in self.cases if "boundary_mae" in r]
        if maes:
            metrics[f"{p}boundary_mae"] = float(np.mean(maes))
        return metrics

    def _classification_summary(self) -> dict[str, float]:
        probs, targets = np.stack(self._cls_probs), np.stack(self._cls_targets)
        if self.cls_mode == "case":
            predicted = probs.argmax(axis=1)
            accuracy = float((predicted == targets).mean())
            if probs.shape[1] == 2:
                auc_input, auc_target = torch.as_tensor(probs[:, 1]), torch.as_tensor(targets)
            else:
                auc_input = torch.as_tensor(probs)
                auc_target = one_hot(torch.as_tensor(targets)[:, None], probs.shape[1], dim=1)
        else:
            accuracy = float(((probs > 0.5) == (targets > 0.5)).mean())
            auc_input, auc_target = torch.as_tensor(probs), torch.as_tensor(targets)
        auc = float("nan")
        if len(np.unique(targets)) > 1:  # AUC needs both outcomes among the cases
            auc = float(compute_roc_auc(auc_input, auc_target, average="macro"))
        return {f"{self.prefix}cls_auc": auc, f"{self.prefix}cls_accuracy": accuracy}

    def aggregate(self, engine: Engine) -> None:
        """Write the epoch's metrics into `engine.state.metrics` and the rows into `engine.state.case_results`.

        In distributed validation (see `gather`) all ranks' rows are gathered first, and each rank logs the
        metrics it computed with its rank, so a divergence between ranks shows in the logs.
        """
        if self._gathers(engine):
            scored_here = len(self.cases)
            self.gather_cases()
            metrics = self.summary()
            logger.info(
                f"rank {distributed.rank()} of {distributed.world_size()}: validation metrics over "
                f"{len(self.cases)} cases ({scored_here} scored on this rank): {json.dumps(metrics)}"
            )
        else:
            metrics = self.summary()
        engine.state.metrics.update(metrics)
        engine.state.case_results = list(self.cases)

    def _gathers(self, engine: Engine) -> bool:
        if self.gather is not None:
            return self.gather and distributed.world_size() > 1
        loader = getattr(engine.state, "dataloader", None) or getattr(engine, "data_loader", None)
        return distributed.world_size() > 1 and isinstance(getattr(loader, "sampler", None), DistributedSampler)

    def gather_cases(self) -> None:
        """Replace this rank's cases with those of all ranks, on every rank (a collective: all ranks call it).

        Rows are merged round-robin by rank, which restores the dataset order for an unshuffled
        `DistributedSampler` (case i is item i // world_size of rank i % world_size). Classification entries
        are concatenated by rank: AUC and accuracy do not depend on their order.
        """
        shares = distributed.all_gather_objects((self.cases, self._cls_probs, self._cls_targets))
        self.cases = distributed.interleave([cases for cases, _, _ in shares])
        self._cls_probs = [p for _, probs, _ in shares for p in probs]
        self._cls_targets = [t for _, _, targets in shares for t in targets]


def write_evaluation_report(engine: Engine, path: str, extra: Mapping[str, Any] | None = None) -> str:
    """Write an evaluator's metrics and per-case rows (without overlay arrays) to a JSON file, atomically.

    Args:
        engine: an evaluator that ran with `MultiTaskEvaluation` attached.
        path: the JSON file to write.
        extra: more top-level entries (e.g. the checkpoint evaluated).

    Returns:
        the path written.
    """
    def clean(value: Any) -> Any:
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, (np.floating, np.integer)):
            return clean(value.item())
        return value

    rows = getattr(engine.state, "case_results", [])
    cases = [{k: clean(v) for k, v in row.items() if k != "overlay"} for row in rows]
    seconds = (getattr(engine.state, "times", None) or {}).get("EPOCH_COMPLETED")  # ignite's epoch timer
    report = {
        "metrics": {k: clean(float(v)) for k, v in engine.state.metrics.items() if isinstance(v, (int, float))},
        "cases": cases,
        "seconds": clean(seconds),
        "seconds_per_case": clean(seconds / len(cases)) if seconds and cases else None,
        **dict(extra or {}),
    }
    return str(atomic_write_text(path, json.dumps(report, indent=2)))
