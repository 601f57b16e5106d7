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

__all__ = ["fingerprint", "plan_patch_size"]

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
    rng = np.random.default_rng(0)
    shapes, spacings, label_voxels = [], [], {}
    fg_samples: list[np.ndarray] = []  # (n, channels) per case
    ndim = channels = None
    for item in items:
        if "image" not in item:
            raise MedmtlError(f"fingerprint: datalist item {item.get('case_id', item)} has no 'image'")
        path = str(item["image"])
        img = _load(path)
        case_dims = min(len(img.shape), 3)
        case_channels = int(np.prod(img.shape[3:])) if len(img.shape) > 3 else 1
        if ndim is None:
            ndim, channels = case_dims, case_channels
        elif (case_dims, case_channels) != (ndim, channels):
            raise MedmtlError(
                f"{path}: {case_dims}D with {case_channels} channel(s), but earlier cases are {ndim}D with "
                f"{channels} channel(s)"
            )
        order = _ras_order(img, ndim)
        shapes.append(np.asarray(img.shape[:ndim])[order])
        spacings.append(np.asarray(img.header.get_zooms()[:ndim], dtype=float)[order])
        if item.get("label"):
            lpath = str(item["label"])
            lbl_img = _load(lpath)
            if tuple(lbl_img.shape[:ndim]) != tuple(img.shape[:ndim]):
                raise MedmtlError(f"{lpath}: shape {lbl_img.shape} does not match its image {img.shape}")
            lbl = _read(lbl_img, lpath).reshape(img.shape[:ndim])
            values, counts = np.unique(lbl, return_counts=True)
            for value, count in zip(values.tolist(), counts.tolist(), strict=True):
                label_voxels[value] = label_voxels.get(value, 0) + int(count)
            fg = np.flatnonzero(lbl)
            if fg.size:
                pick = rng.choice(fg, size=min(fg.size, _SAMPLES_PER_CASE), replace=False)
                data = _read(img, path).reshape(*img.shape[:ndim], channels)
                fg_samples.append(data.reshape(-1, channels)[pick].astype(np.float64))

    intensity = []
    if fg_samples:
        allv = np.concatenate(fg_samples)
        for ch in range(allv.shape[1]):
            v = allv[:, ch]
            p = np.percentile(v, _PERCENTILES)
            intensity.append(
                {"mean": float(v.mean()), "std": float(v.std()), "p00_5": float(p[0]), "p50": float(p[1]),
                 "p99_5": float(p[2])}
            )
    shapes_a, spacings_a = np.stack(shapes), np.stack(spacings)
    return {
        "num_cases": len(items),
        "spatial_dims": ndim,
        "num_channels": channels,
        "median_shape": [float(v) for v in np.median(shapes_a, axis=0)],
        "min_shape": [int(v) for v in shapes_a.min(axis=0)],
        "max_shape": [int(v) for v in shapes_a.max(axis=0)],
        "median_spacing": [float(v) for v in np.median(spacings_a, axis=0)],
        "label_values": sorted(_number(v) for v in label_voxels),
        "foreground_intensity": intensity,
        "shapes": [[int(v) for v in s] for s in shapes],
        "spacings": [[float(v) for v in s] for s in spacings],
        "label_voxels": {str(_number(v)): n for v, n in sorted(label_voxels.items())},
    }


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
