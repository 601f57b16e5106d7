"""Hand every training target to MONAI's engines, not only the label."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.engines import PrepareBatch

TARGET_KEYS = ("label", "cls", "boundary")


class MultiTaskBatch(PrepareBatch):
    """`prepare_batch` for `SupervisedTrainer`/`SupervisedEvaluator`: returns `(image, targets)`.

    MONAI's default `prepare_batch` keeps only `batch["label"]`; the multi-task loss also needs the case or
    presence target ("cls") and the signed distance target ("boundary"). `targets` is a dict holding those of
    `target_keys` that the batch has, moved to `device`.

    Args:
        target_keys: batch keys handed to the loss as targets.
    """

    def __init__(self, target_keys: Sequence[str] = TARGET_KEYS) -> None:
        self.target_keys = tuple(target_keys)

    def __call__(
        self,
        batchdata: dict[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image = batchdata["image"].to(device=device, non_blocking=non_blocking, **kwargs)
        targets = {
            key: batchdata[key].to(device=device, non_blocking=non_blocking, **kwargs)
            for key in self.target_keys
            if isinstance(batchdata.get(key), torch.Tensor)
        }
        return image, targets
