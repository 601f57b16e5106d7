"""A small nnU-Net-style dataset fingerprint and the patch size planned from it.

Shapes and spacings are reported in RAS axis order (the order the pipelines work in after ``Orientationd``),
obtained by permuting each file's voxel axes with its affine; only the headers are needed for them.
Foreground intensities need the arrays: up to ``_SAMPLES_PER_CASE`` foreground voxels are drawn per case
(fixed seed), as nnU-Net does, and the percentiles are taken over all drawn voxels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import nibabel as nib
import numpy as np

from medmtl.errors import MedmtlError

__all__ = ["FingerprintAccumulator", "fingerprint", "plan_patch_size"]

_SAMPLES_PER_CASE = 10_000
_PERCENTILES = (0.5, 50.0, 99.5)


def _load(path: str) -> nib.spatialimages.SpatialImage:
    try:
        return nib.load(str(path))
    except Exception as err:  # nibabel raises several types for unreadable files
        raise MedmtlError(f"{path}: not a readable image ({type(err).__name__}: {err})") from None


def _read(img: nib.spatialimages.SpatialImage, path: str) -> np.ndarray:
    try:
        return np.asanyarray(img.dataobj)
    except Exception as err:  # truncated gzip, short file, ...
        raise MedmtlError(f"{path}: image data cannot be read ({type(err).__name__}: {err})") from None


def _ras_order(img: nib.spatialimages.SpatialImage, ndim: int) -> np.ndarray:
    """Voxel axes sorted by the world axis (R, A, S) each one points along."""
    world_axis = nib.orientations.io_orientation(img.affine)[:ndim, 0]
    if np.isnan(world_axis).any():  # degenerate affine: keep the voxel order
        return np.arange(ndim)
    return np.argsort(world_axis)


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


class FingerprintAccumulator:
    """The fingerprint built one case at a time, from files someone else has already opened.

    ``fingerprint`` feeds it the files it loads; ``medmtl plan`` feeds it the images and labels that
    ``medmtl.data.checks.check_dataset`` loaded and read (its ``on_case`` hook), so planning reads every file once.
    Cases are added in datalist order; the result is the same either way (one seeded sampler).
    """

    def __init__(self) -> None:
        self._rng = np.random.default_rng(0)
        self._shapes: list[np.ndarray] = []
        self._spacings: list[np.ndarray] = []
        self._label_voxels: dict[Any, int] = {}
        self._fg_samples: list[np.ndarray] = []  # (n, channels) per case
        self._ndim: int | None = None
        self._channels: int | None = None

    def add(self, path: str, img: nib.spatialimages.SpatialImage, label_path: str | None = None,
            label_img: nib.spatialimages.SpatialImage | None = None, image_data: np.ndarray | None = None,
            label_data: np.ndarray | None = None) -> None:
        """Add one case: its opened image (and label), with their voxels when already read (else read here).

        Raises:
            MedmtlError: the case's dimensionality or channel count differs from the earlier cases', its label's
                shape from its image's, or its data cannot be read.
        """
        case_dims = min(len(img.shape), 3)
        case_channels = int(np.prod(img.shape[3:])) if len(img.shape) > 3 else 1
        if self._ndim is None:
            self._ndim, self._channels = case_dims, case_channels
        elif (case_dims, case_channels) != (self._ndim, self._channels):
            raise MedmtlError(
                f"{path}: {case_dims}D with {case_channels} channel(s), but earlier cases are {self._ndim}D with "
                f"{self._channels} channel(s)"
            )
        ndim, channels = self._ndim, self._channels
        order = _ras_order(img, ndim)
        self._shapes.append(np.asarray(img.shape[:ndim])[order])
        self._spacings.append(np.asarray(img.header.get_zooms()[:ndim], dtype=float)[order])
        if label_img is None or label_path is None:
            return
        if tuple(label_img.shape[:ndim]) != tuple(img.shape[:ndim]):
            raise MedmtlError(f"{label_path}: shape {label_img.shape} does not match its image {img.shape}")
        lbl = (label_data if label_data is not None else _read(label_img, label_path)).reshape(img.shape[:ndim])
        values, counts = np.unique(lbl, return_counts=True)
        for value, count in zip(values.tolist(), counts.tolist(), strict=True):
            self._label_voxels[value] = self._label_voxels.get(value, 0) + int(count)
        fg = np.flatnonzero(lbl)
        if fg.size:
            pick = self._rng.choice(fg, size=min(fg.size, _SAMPLES_PER_CASE), replace=False)
            data = (image_data if image_data is not None else _read(img, path)).reshape(*img.shape[:ndim], channels)
            self._fg_samples.append(data.reshape(-1, channels)[pick].astype(np.float64))

    def result(self) -> dict[str, Any]:
        """The fingerprint of the cases added so far (``fingerprint``'s return value).

        Raises:
            MedmtlError: no case was added.
        """
        if not self._shapes:
            raise MedmtlError("fingerprint: the datalist is empty")
        intensity = []
        if self._fg_samples:
            allv = np.concatenate(self._fg_samples)
            for ch in range(allv.shape[1]):
                v = allv[:, ch]
                p = np.percentile(v, _PERCENTILES)
                intensity.append(
                    {"mean": float(v.mean()), "std": float(v.std()), "p00_5": float(p[0]), "p50": float(p[1]),
                     "p99_5": float(p[2])}
                )
        shapes_a, spacings_a = np.stack(self._shapes), np.stack(self._spacings)
        return {
            "num_cases": len(self._shapes),
            "spatial_dims": self._ndim,
            "num_channels": self._channels,
            "median_shape": [float(v) for v in np.median(shapes_a, axis=0)],
            "min_shape": [int(v) for v in shapes_a.min(axis=0)],
            "max_shape": [int(v) for v in shapes_a.max(axis=0)],
            "median_spacing": [float(v) for v in np.median(spacings_a, axis=0)],
            "label_values": sorted(_number(v) for v in self._label_voxels),
            "foreground_intensity": intensity,
            "shapes": [[int(v) for v in s] for s in self._shapes],
            "spacings": [[float(v) for v in s] for s in self._spacings],
            "label_voxels": {str(_number(v)): n for v, n in sorted(self._label_voxels.items())},
        }


def fingerprint(datalist: Sequence[dict], max_cases: int | None = None) -> dict[str, Any]:
    """Summarize a labelled dataset: shapes, spacings, label values and foreground intensities.

    Args:
        datalist: items with an absolute "image" path and optionally a "label" path (NIfTI). 4D images are
            treated as (x, y, z, channel), as in the MSD.
        max_cases: only the first ``max_cases`` items (None: all).

    Returns:
        dict with ``num_cases``, ``spatial_dims``, ``num_channels``, ``median_shape``, ``min_shape``,
        ``max_shape``, ``median_spacing`` (all per axis in RAS order), ``label_values`` (sorted values seen in
        the labels) and ``foreground_intensity``: one dict per channel with ``mean``, ``std``, ``p00_5``,
        ``p50``, ``p99_5`` over voxels with a nonzero label (empty when no labels were given). Also, for
        planners that need the distributions (``medmtl.planner``): ``shapes`` and ``spacings`` (one list per
        case, RAS order) and ``label_voxels`` (``{value: voxel count}`` over all labels, keys as strings).

    Raises:
        MedmtlError: on an empty datalist, an unreadable file, or a label whose shape differs from its image.
    """
    items = list(datalist)[: max_cases if max_cases is not None else None]
    if not items:
        raise MedmtlError("fingerprint: the datalist is empty")
    acc = FingerprintAccumulator()
    for item in items:
        if "image" not in item:
            raise MedmtlError(f"fingerprint: datalist item {item.get('case_id', item)} has no 'image'")
        path, label_path = str(item["image"]), item.get("label")
        label_path = str(label_path) if label_path else None
        acc.add(path, _load(path), label_path, _load(label_path) if label_path else None)
    return acc.result()


def plan_patch_size(
    fp: dict[str, Any],
    target_spacing: Sequence[float] | float | None = None,
    divisor: int = 16,
    max_voxels: int = 128**3,
    slice_axis: int | None = None,
) -> list[int]:
    """Patch size covering the median case, compatible with the network's downsampling.

    Rule: (1) the median shape is resampled to ``target_spacing`` (``median_shape * median_spacing /
    target_spacing``; None keeps the native voxels); (2) with ``slice_axis`` set (2D network on 3D volumes)
    that axis is dropped; (3) each axis is rounded UP to a multiple of ``divisor``; (4) while the patch holds
    more than ``max_voxels`` voxels, the currently longest axis (first one on ties) shrinks by ``divisor``.

    Args:
        fp: a ``fingerprint`` result (``median_shape``, ``median_spacing``).
        target_spacing: mm per axis in RAS order, one number for all axes, or None.
        divisor: the network's total downsampling factor (2 ** number of stride-2 stages).
        max_voxels: voxel budget of one patch (memory).
        slice_axis: RAS axis to drop for a 2D network trained on slices; None keeps all axes.

    Returns:
        patch size per axis (RAS order), each a positive multiple of ``divisor``.

    Raises:
        MedmtlError: on bad arguments, or when even ``divisor`` per axis exceeds ``max_voxels``.
    """
    shape = np.asarray(fp["median_shape"], dtype=float)
    spacing = np.asarray(fp["median_spacing"], dtype=float)
    if divisor < 1 or max_voxels < 1:
        raise MedmtlError(f"plan_patch_size: divisor ({divisor}) and max_voxels ({max_voxels}) must be >= 1")
    if target_spacing is not None:
        target = np.broadcast_to(np.asarray(target_spacing, dtype=float), shape.shape)
        if (target <= 0).any():
            raise MedmtlError(f"plan_patch_size: target_spacing must be positive, got {target_spacing}")
        shape = shape * spacing / target
    if slice_axis is not None:
        if slice_axis not in range(len(shape)):
            raise MedmtlError(f"plan_patch_size: slice_axis {slice_axis} is not an axis of {len(shape)}D")
        shape = np.delete(shape, slice_axis)
    # round() first: resampling 35 voxels of 1 mm to 1 mm must not give 35.0000001 -> one more block
    patch = [max(divisor, math.ceil(round(s, 6) / divisor) * divisor) for s in shape]
    if divisor ** len(patch) > max_voxels:
        raise MedmtlError(f"plan_patch_size: max_voxels {max_voxels} < one {divisor}^{len(patch)} block")
    while math.prod(patch) > max_voxels:
        longest = int(np.argmax(patch))
        patch[longest] -= divisor
    return patch
