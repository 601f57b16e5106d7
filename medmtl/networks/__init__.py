"""Networks: the multi-task U-Net and its heads."""

from __future__ import annotations

from medmtl.networks.multitask_unet import HEAD_NAMES, ClassificationHead, MultiTaskUNet, SegmentationUNet

__all__ = ["HEAD_NAMES", "ClassificationHead", "MultiTaskUNet", "SegmentationUNet"]
