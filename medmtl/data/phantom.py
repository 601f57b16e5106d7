"""Phantom cases: deterministic MR-like volumes (or 2D images) and their labels, for a random generator.

Each case has an "organ" (label 1: a randomly sized, placed and rotated ellipsoid whose surface is perturbed
by low-frequency noise) and, if asked, a subtle "lesion" (label 2) fully inside the organ. Background tissue
texture, a smooth multiplicative bias field, Rician noise and a random global intensity scale make intensity
normalization matter. `medmtl.data.synthetic` writes them as a dataset; `medmtl.data.phantom_dicom` exports
them as a scanner-like DICOM study.

The knobs below are module constants so that the difficulty can be tuned in one place. Intensity levels
are in "normalized units" (body tissue about 0.5) before the random global scale is applied.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from medmtl.errors import MedmtlError

# --- geometry (fractions are of the image edge length) ---
SPACING_MM = 1.0
MIN_SIZE = 16  # smaller grids cannot hold an organ with a lesion inside it
BODY_RADIUS_FRACTION = (0.42, 0.48)  # the "head": tissue inside, air outside
BODY_SURFACE_AMPLITUDE = 0.03
ORGAN_RADIUS_FRACTION = (0.20, 0.30)  # 13-19 voxels at 64^3
ORGAN_CENTER_JITTER_FRACTION = 0.05
ORGAN_SURFACE_AMPLITUDE = 0.10  # relative radius change per unit of surface noise (noise clipped at +-2)
ORGAN_SURFACE_CELLS = 5  # low-frequency noise: this many random bumps across the image
LESION_RADIUS_FRACTION = (0.08, 0.14)  # 5-9 voxels at 64^3
LESION_ANISOTROPY = (0.85, 1.15)
LESION_SURFACE_AMPLITUDE = 0.08
LESION_SURFACE_CELLS = 7
LESION_MARGIN_VOXELS = 1.5  # organ tissue kept between the lesion and the organ surface
SURFACE_NOISE_CLIP = 2.0
ORIGIN_JITTER_MM = 20.0  # the volume centre lies this far from the world origin at most (per axis)
OBLIQUE_DEGREES = (10.0, 25.0)

# --- MR-like contrast (normalized units) ---
BODY_LEVEL = 0.5
ORGAN_LEVEL = 0.8
LEVEL_JITTER = 0.04  # per-case uniform jitter of the tissue levels
TEXTURE_STD = 0.04  # background tissue texture, inside the body
TEXTURE_SIGMA_VOXELS = 1.5
NOISE_STD = 0.05  # Rician noise: std of each of the two Gaussian channels
# nominal |lesion - organ| level difference / organ std (texture and noise); partial volume and the bias
# field lower the contrast measured against the surrounding organ to about 0.85 of it (about 2.5)
LESION_CNR = 3.0
LESION_POLARITY = -1.0  # -1: hypointense lesion (T1-like), +1: hyperintense
PARTIAL_VOLUME_SIGMA = 0.6  # slight blur of tissue edges before noise
BIAS_FIELD_STD = 0.12  # log-amplitude of the smooth multiplicative bias field
BIAS_FIELD_CELLS = 3
INTENSITY_SCALE_RANGE = (200.0, 3000.0)  # log-uniform global scale

LABELS = {"0": "background", "1": "organ", "2": "lesion"}
CLASSES = {"0": "no_lesion", "1": "lesion"}

# independent random streams per purpose, so that e.g. case i does not depend on how many cases exist

@dataclass(frozen=True)
class PhantomCase:
    """One phantom case.

    Attributes:
        image: float32 array, shape (size,) * spatial_dims, MR-like intensities.
        label: uint8 array of the same shape: 0 background, 1 organ, 2 lesion.
        affine: 4x4 float64 voxel-to-RAS (mm) matrix, exactly representable in float32 (as NIfTI stores it).
        has_lesion: whether label 2 is present (the case class).
    """

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    has_lesion: bool


@dataclass(frozen=True)
class Anatomy:
    """The masks of one case (body, organ, lesion) on its grid, from which images of any contrast are rendered."""

    body: np.ndarray
    organ: np.ndarray
    lesion: np.ndarray


# ----------------------------------------------------------------------------------------------------------
# case content


def make_case(
    rng: np.random.Generator,
    size: int = 64,
    spatial_dims: int = 3,
    *,
    has_lesion: bool | None = None,
    oblique: bool = False,
) -> PhantomCase:
    """Draw one phantom case.

    Args:
        rng: the random generator; the same generator state gives byte-identical arrays.
        size: edge length in voxels (at least MIN_SIZE).
        spatial_dims: 3 for a volume, 2 for an image.
        has_lesion: force the case class; None draws it (probability 1/2).
        oblique: rotate the affine by OBLIQUE_DEGREES about a non-trivial axis (3D only).

    Returns:
        The PhantomCase.
    """
    case, _ = make_case_with_anatomy(rng, size, spatial_dims, has_lesion=has_lesion, oblique=oblique)
    return case


def make_case_with_anatomy(
    rng: np.random.Generator, size: int, spatial_dims: int, *, has_lesion: bool | None, oblique: bool
) -> tuple[PhantomCase, Anatomy]:
    """`make_case` that also returns the case's masks (for the DICOM export's second contrast); `oblique`
    rotates the grid against the scanner axes."""
    check_grid(size, spatial_dims)
    if oblique and spatial_dims != 3:
        raise MedmtlError("oblique phantom cases need spatial_dims=3")
    if has_lesion is None:
        has_lesion = bool(rng.random() < 0.5)
    shape = (size,) * spatial_dims
    anatomy = _draw_anatomy(rng, shape, has_lesion)
    organ_level = ORGAN_LEVEL + rng.uniform(-LEVEL_JITTER, LEVEL_JITTER)
    lesion_delta = LESION_POLARITY * LESION_CNR * float(np.hypot(TEXTURE_STD, NOISE_STD))
    image = render(
        rng,
        anatomy,
        body_level=BODY_LEVEL + rng.uniform(-LEVEL_JITTER, LEVEL_JITTER),
        organ_level=organ_level,
        lesion_level=organ_level + lesion_delta,
    )
    label = anatomy.organ.astype(np.uint8)
    label[anatomy.lesion] = 2
    affine = _oblique_affine(rng, shape) if oblique else _aligned_affine(rng, shape)
    return PhantomCase(image=image, label=label, affine=affine, has_lesion=has_lesion), anatomy


def check_grid(size: int, spatial_dims: int) -> None:
    """Refuse a grid that cannot hold a phantom (MedmtlError): 2 or 3 dimensions, edges of `MIN_SIZE` or more."""
    if spatial_dims not in (2, 3):
        raise MedmtlError(f"spatial_dims must be 2 or 3 (got {spatial_dims})")
    if size < MIN_SIZE:
        raise MedmtlError(f"phantom size must be at least {MIN_SIZE} voxels (got {size})")


def _draw_anatomy(rng: np.random.Generator, shape: tuple[int, ...], has_lesion: bool) -> Anatomy:
    size, ndim = shape[0], len(shape)
    middle = (np.asarray(shape, dtype=float) - 1) / 2
    body = _perturbed_ellipsoid(
        rng, shape, middle, size * rng.uniform(*BODY_RADIUS_FRACTION, ndim), np.eye(ndim),
        BODY_SURFACE_AMPLITUDE, ORGAN_SURFACE_CELLS,
    )  # fmt: skip
    jitter = ORGAN_CENTER_JITTER_FRACTION
    organ_center = middle + size * rng.uniform(-jitter, jitter, ndim)
    organ_radii = size * rng.uniform(*ORGAN_RADIUS_FRACTION, ndim)
    organ = _perturbed_ellipsoid(
        rng, shape, organ_center, organ_radii, _random_rotation(rng, ndim),
        ORGAN_SURFACE_AMPLITUDE, ORGAN_SURFACE_CELLS,
    )  # fmt: skip
    organ = _largest_component(organ)
    body |= organ  # the organ is always surrounded by tissue or, rarely, touches air; never outside the body
    lesion = _draw_lesion(rng, organ) if has_lesion else np.zeros(shape, dtype=bool)
    return Anatomy(body=body, organ=organ, lesion=lesion)


def _draw_lesion(rng: np.random.Generator, organ: np.ndarray) -> np.ndarray:
    """A small perturbed ellipsoid placed where the organ is deep enough to hold it entirely."""
    ndim, size = organ.ndim, organ.shape[0]
    depth = _depth(organ)
    reach = 1 + LESION_SURFACE_AMPLITUDE * SURFACE_NOISE_CLIP  # farthest surface point / nominal radius
    radii = size * rng.uniform(*LESION_RADIUS_FRACTION) * rng.uniform(*LESION_ANISOTROPY, ndim)
    # shrink the lesion when the organ is too thin for it (small grids)
    fit = (depth.max() - LESION_MARGIN_VOXELS) / (reach * radii.max())
    radii = radii * min(1.0, max(fit, 0.0))
    candidates = np.argwhere(depth >= reach * radii.max() + LESION_MARGIN_VOXELS)
    if len(candidates) == 0:  # only for degenerate organs: fall back to the deepest point
        candidates = np.argwhere(depth == depth.max())
    center = candidates[rng.integers(len(candidates))]
    lesion = _perturbed_ellipsoid(
        rng, organ.shape, center.astype(float), np.maximum(radii, 0.5), _random_rotation(rng, ndim),
        LESION_SURFACE_AMPLITUDE, LESION_SURFACE_CELLS,
    )  # fmt: skip
    lesion[tuple(center)] = True  # never empty, even when shrunk to under a voxel
    return lesion & organ


def _depth(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance of each mask voxel to the nearest voxel outside it (0 outside the mask)."""
    # computed on the bounding box padded by one background voxel: same result, a fraction of the work
    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    depth = np.zeros(mask.shape, dtype=np.float64)
    depth[box] = ndimage.distance_transform_edt(np.pad(mask[box], 1))[(slice(1, -1),) * mask.ndim]
    return depth


def _perturbed_ellipsoid(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    center: np.ndarray,
    radii: np.ndarray,
    rotation: np.ndarray,
    amplitude: float,
    cells: int,
) -> np.ndarray:
    """Voxels whose normalized ellipsoid radius is below 1 + amplitude * (smooth noise)."""
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    offsets = [g.astype(np.float32) - c for g, c in zip(grids, center, strict=True)]
    radius2 = np.zeros(shape, dtype=np.float32)
    for axis in range(len(shape)):
        # coordinate along the ellipsoid's axis `axis` (a column of the rotation)
        u = sum(float(rotation[b, axis]) * offsets[b] for b in range(len(shape)))
        radius2 += (u / np.float32(radii[axis])) ** 2
    noise = np.clip(_smooth_field(rng, shape, cells), -SURFACE_NOISE_CLIP, SURFACE_NOISE_CLIP)
    return radius2 < (1 + amplitude * noise) ** 2


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], cells: int) -> np.ndarray:
    """Low-frequency noise, zero mean and unit std: random weights on a grid of Gaussian bumps.

    The field is separable in the bump basis, so it costs a few small tensor products instead of a
    large Gaussian filter.
    """
    field = rng.standard_normal((cells,) * len(shape))
    for axis, n in enumerate(shape):
        centers = np.linspace(-0.5, n - 0.5, cells)
        width = n / (cells - 1)
        basis = np.exp(-0.5 * ((np.arange(n)[:, None] - centers[None, :]) / width) ** 2)
        field = np.moveaxis(np.tensordot(basis, field, axes=([1], [axis])), 0, axis)
    field = field - field.mean()
    return (field / field.std()).astype(np.float32)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def _random_rotation(rng: np.random.Generator, ndim: int) -> np.ndarray:
    """A uniformly random proper rotation matrix (det +1)."""
    if ndim == 2:
        angle = rng.uniform(0, 2 * np.pi)
        return np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return Rotation.from_quat(rng.standard_normal(4)).as_matrix()


def render(
    rng: np.random.Generator, anatomy: Anatomy, *, body_level: float, organ_level: float, lesion_level: float
) -> np.ndarray:
    """MR-like float32 image of the anatomy: levels, texture, partial volume, bias, Rician noise, scale."""
    shape = anatomy.body.shape
    tissue = np.zeros(shape, dtype=np.float32)
    tissue[anatomy.body] = body_level
    tissue[anatomy.organ] = organ_level
    tissue[anatomy.lesion] = lesion_level
    texture = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), TEXTURE_SIGMA_VOXELS)
    tissue += (TEXTURE_STD / texture.std()) * texture * anatomy.body
    tissue = ndimage.gaussian_filter(tissue, PARTIAL_VOLUME_SIGMA)
    tissue *= np.exp(BIAS_FIELD_STD * _smooth_field(rng, shape, BIAS_FIELD_CELLS))
    # magnitude of a complex signal with Gaussian noise in both channels (Rician, dark air stays positive)
    real = tissue + NOISE_STD * rng.standard_normal(shape, dtype=np.float32)
    imaginary = NOISE_STD * rng.standard_normal(shape, dtype=np.float32)
    scale = np.exp(rng.uniform(*np.log(INTENSITY_SCALE_RANGE)))
    return (np.hypot(real, imaginary) * np.float32(scale)).astype(np.float32)


def _aligned_affine(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """RAS-aligned SPACING_MM grid whose centre lies near (not at) the world origin."""
    affine = np.diag([SPACING_MM, SPACING_MM, SPACING_MM, 1.0])
    half_extent = SPACING_MM * (np.asarray(shape, dtype=float) - 1) / 2
    offset = np.round(rng.uniform(-ORIGIN_JITTER_MM, ORIGIN_JITTER_MM, len(shape)), 1) - half_extent
    affine[: len(shape), 3] = offset
    return _float32_exact(affine)


def _oblique_affine(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """A grid rotated by OBLIQUE_DEGREES about an axis with no near-zero component (a proper rotation)."""
    axis = rng.choice([-1.0, 1.0], 3) * rng.uniform(0.4, 1.0, 3)
    angle = np.deg2rad(rng.uniform(*OBLIQUE_DEGREES))
    rotation = Rotation.from_rotvec(axis / np.linalg.norm(axis) * angle).as_matrix()
    center = rng.uniform(-ORIGIN_JITTER_MM, ORIGIN_JITTER_MM, 3)
    affine = np.eye(4)
    affine[:3, :3] = rotation * SPACING_MM
    affine[:3, 3] = center - affine[:3, :3] @ ((np.asarray(shape, dtype=float) - 1) / 2)
    return _float32_exact(affine)


def _float32_exact(affine: np.ndarray) -> np.ndarray:
    # NIfTI keeps the sform in float32: rounding here makes the written and the in-memory affine identical
    return affine.astype(np.float32).astype(np.float64)
