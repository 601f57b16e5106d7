"""Plausibility rules shared by `medmtl check-data` (training data) and `medmtl infer` (inputs).

An image that passes them can be normalised, resampled and segmented without silent nonsense: real-valued
voxels (complex data would lose its imaginary part, RGB has no single intensity), finite intensities of a
size that float32 statistics survive, and a voxel spacing a scanner can produce. Each rule returns the
problem in words, or None, so both callers can name the file and word it the same way; `affine_differences`
and `read_error_text` word the comparison of two affines and a reader's complaint the same way for both.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medmtl.errors import error_summary

SPACING_RANGE_MM = (0.05, 20.0)  # outside this a header is almost surely wrong (m vs mm, unset pixdim)
# z-scoring squares intensities in float32 (max 3.4e38): beyond this the statistics overflow; no modality
# (CT in HU, MR in arbitrary units, PET in Bq/mL) comes near it
MAX_ABS_INTENSITY = 1e12
SPACING_RTOL = 1e-3  # relative, on voxel spacing
DIRECTION_ATOL = 1e-3  # on direction cosines
ORIGIN_ATOL_MM = 1e-2


def dtype_problem(dtype: np.dtype | str) -> str | None:
    """Why voxels of this type cannot be segmented: complex or RGB data, or None for real numbers.

    Args:
        dtype: the voxel type on disk (``nibabel`` header's ``get_data_dtype()``, or an array's dtype).

    Returns:
        the problem, or None.
    """
    dtype = np.dtype(dtype)
    if dtype.kind == "c":
        return f"complex-valued voxels ({dtype.name}); only real-valued images can be used (take the magnitude first)"
    if dtype.fields is not None or dtype.kind == "V":
        return "RGB (colour) voxels; only single-intensity (greyscale) images can be used"
    if dtype.kind not in "biuf":
        return f"voxels of type {dtype.name} are not numbers"
    return None


def spacing_problem(spacing: Sequence[float], spacing_range: tuple[float, float] = SPACING_RANGE_MM) -> str | None:
    """Why a voxel spacing (mm, per spatial axis) is implausible, or None.

    Args:
        spacing: voxel size along each spatial axis, in mm.
        spacing_range: the plausible (low, high) range in mm.

    Returns:
        the problem, or None.
    """
    values = np.asarray(spacing, dtype=float)
    lo, hi = spacing_range
    if np.isfinite(values).all() and ((values >= lo) & (values <= hi)).all():
        return None
    shown = "x".join(f"{s:.4g}" for s in values)
    return f"spacing {shown} mm outside {lo:g}..{hi:g} mm"


def intensity_problem(low: float, high: float, nonfinite: int = 0) -> str | None:
    """Why an image's intensities cannot be normalised: NaN/Inf voxels or values beyond `MAX_ABS_INTENSITY`.

    Args:
        low: the smallest finite voxel value.
        high: the largest finite voxel value.
        nonfinite: how many voxels are NaN or infinite.

    Returns:
        the problem, or None.
    """
    if nonfinite:
        return f"{nonfinite} voxel(s) are NaN or infinite"
    largest = max(abs(float(low)), abs(float(high)))
    if largest > MAX_ABS_INTENSITY:
        return (
            f"intensities up to {largest:.3g} in magnitude (limit {MAX_ABS_INTENSITY:.0e}); "
            "the data is not an image or is scaled wrongly"
        )
    return None


def layout_problem(
    spatial_dims: int, channels: int, expected_dims: int | None, expected_channels: int | None
) -> str | None:
    """Why an image's dimensionality or channel count does not match its dataset's (or model's), or None.

    Args:
        spatial_dims: the image's spatial dimensions (2 or 3).
        channels: its channels (1 for a plain volume).
        expected_dims: the dataset's or model's spatial dimensions (None: not known).
        expected_channels: the channels it expects (None: not known).

    Returns:
        the problem, or None.
    """
    if expected_dims is not None and spatial_dims != expected_dims:
        return f"a {spatial_dims}D image where {expected_dims}D images are expected"
    if expected_channels is not None and channels != expected_channels:
        return f"{channels} channel(s) where {expected_channels} are expected"
    return None


def affine_differences(
    reference: np.ndarray,
    other: np.ndarray,
    spacing_rtol: float = SPACING_RTOL,
    direction_atol: float = DIRECTION_ATOL,
    origin_atol: float = ORIGIN_ATOL_MM,
) -> list[str]:
    """Describe how two 4x4 voxel-to-world affines differ beyond tolerance.

    Args:
        reference: the first affine (e.g. the image's).
        other: the second affine (e.g. the label's).
        spacing_rtol: relative tolerance on voxel spacing (column norms).
        direction_atol: absolute tolerance on direction cosines.
        origin_atol: absolute tolerance on the origin, in mm.

    Returns:
        One message per differing part (`spacing`, `direction`, `origin`), reference value first;
        empty when they agree.
    """
    diffs = []
    ref_spacing = np.linalg.norm(reference[:3, :3], axis=0)
    oth_spacing = np.linalg.norm(other[:3, :3], axis=0)
    if not np.allclose(oth_spacing, ref_spacing, rtol=spacing_rtol, atol=0):
        fmt = "x".join(["{:.4g}"] * 3)
        diffs.append(f"spacing {fmt.format(*ref_spacing)} vs {fmt.format(*oth_spacing)} mm")
    else:
        ref_dir = reference[:3, :3] / np.where(ref_spacing > 0, ref_spacing, 1)
        oth_dir = other[:3, :3] / np.where(oth_spacing > 0, oth_spacing, 1)
        worst = float(np.abs(ref_dir - oth_dir).max())
        if worst > direction_atol:
            diffs.append(f"direction (largest cosine difference {worst:.3g})")
    ref_origin, oth_origin = reference[:3, 3], other[:3, 3]
    if np.abs(ref_origin - oth_origin).max() > origin_atol:
        fmt = "({:.2f}, {:.2f}, {:.2f})"
        diffs.append(f"origin {fmt.format(*ref_origin)} vs {fmt.format(*oth_origin)} mm")
    return diffs


def read_error_text(err: Exception, path: Path) -> str:
    """A short reason why nibabel could not read `path`, without the absolute path it puts in its messages.

    Args:
        err: what nibabel raised.
        path: the file.

    Returns:
        one line, e.g. "truncated gzip stream".
    """
    if isinstance(err, EOFError):
        return "truncated gzip stream"
    text = error_summary(err)
    text = text.replace(f'"{path}"', path.name).replace(f"'{path}'", path.name).replace(str(path), path.name)
    if text.startswith("Cannot work out file type"):
        return "not a NIfTI file, or its header is truncated"
    return text
