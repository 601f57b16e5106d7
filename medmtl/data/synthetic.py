"""The phantom dataset: the project's built-in default data, deterministic for a seed.

Each case is an MR-like volume (or 2D image) with an "organ" (label 1: a randomly sized, placed and
rotated ellipsoid whose surface is perturbed by low-frequency noise) and, in half the cases, a subtle
"lesion" (label 2) fully inside the organ. Background tissue texture, a smooth multiplicative bias
field, Rician noise and a random global intensity scale make intensity normalization matter. The set is
written in the Medical Segmentation Decathlon (MSD) layout; optionally extra cases are also exported as
a messy scanner-like DICOM study (decoy series, shuffled file names, oblique geometry) to exercise the
DICOM discovery and loading code.

The knobs below are module constants so that the difficulty can be tuned in one place. Intensity levels
are in "normalized units" (body tissue about 0.5) before the random global scale is applied.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pydicom.valuerep import format_number_as_ds
from scipy import ndimage
from scipy.spatial.transform import Rotation

from medmtl.errors import MedmtlError
from medmtl.io import atomic_write

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

# --- DICOM export ---
STORED_MAX = 4000  # stored pixel values span 0..STORED_MAX (12-bit-like, int16)
MAIN_SERIES_DESCRIPTION = "T1 MPRAGE phantom"
FLAIR_SERIES_DESCRIPTION = "T2 FLAIR phantom"
LOCALIZER_SERIES_DESCRIPTION = "localizer"
FLAIR_SUBSAMPLING = (2, 2, 3)  # coarser in-plane resolution, thicker and fewer slices
FLAIR_LEVELS = (0.6, 0.35, 0.95)  # body, organ, lesion: dark organ, bright lesion
LOCALIZER_SPACING_MM = 1.5
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])

LABELS = {"0": "background", "1": "organ", "2": "lesion"}
CLASSES = {"0": "no_lesion", "1": "lesion"}

# independent random streams per purpose, so that e.g. case i does not depend on how many cases exist
_STREAM_CASE, _STREAM_LESION_PAIR, _STREAM_EXPORT = 0, 1, 2


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
class _Anatomy:
    body: np.ndarray
    organ: np.ndarray
    lesion: np.ndarray


@dataclass(frozen=True)
class StudyInfo:
    """Patient- and study-level attributes shared by every series of one DICOM study.

    UIDs are derived from `uid_seed` (pydicom `generate_uid` entropy sources), so a rerun writes the
    same UIDs while different seeds give different ones.
    """

    uid_seed: str
    patient_name: str
    patient_id: str
    patient_birth_date: str
    accession_number: str
    study_description: str = "MR PHANTOM"
    study_date: str = "20240115"
    study_time: str = "093000"
    study_id: str = "1"

    def uid(self, *parts: object) -> str:
        """A deterministic UID for the named object of this study.

        Args:
            parts: names the object, e.g. ("series", 3) or ("series", 3, "instance", 0).

        Returns:
            A DICOM UID string.
        """
        return str(generate_uid(entropy_srcs=[self.uid_seed, *(str(p) for p in parts)]))

    @property
    def study_instance_uid(self) -> str:
        return self.uid("study")

    @property
    def frame_of_reference_uid(self) -> str:
        return self.uid("frame-of-reference")


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
    case, _ = _make_case_with_anatomy(rng, size, spatial_dims, has_lesion=has_lesion, oblique=oblique)
    return case


def _make_case_with_anatomy(
    rng: np.random.Generator, size: int, spatial_dims: int, *, has_lesion: bool | None, oblique: bool
) -> tuple[PhantomCase, _Anatomy]:
    _check_grid(size, spatial_dims)
    if oblique and spatial_dims != 3:
        raise MedmtlError("oblique phantom cases need spatial_dims=3")
    if has_lesion is None:
        has_lesion = bool(rng.random() < 0.5)
    shape = (size,) * spatial_dims
    anatomy = _draw_anatomy(rng, shape, has_lesion)
    organ_level = ORGAN_LEVEL + rng.uniform(-LEVEL_JITTER, LEVEL_JITTER)
    lesion_delta = LESION_POLARITY * LESION_CNR * float(np.hypot(TEXTURE_STD, NOISE_STD))
    image = _render(
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


def _check_grid(size: int, spatial_dims: int) -> None:
    if spatial_dims not in (2, 3):
        raise MedmtlError(f"spatial_dims must be 2 or 3 (got {spatial_dims})")
    if size < MIN_SIZE:
        raise MedmtlError(f"phantom size must be at least {MIN_SIZE} voxels (got {size})")


def _draw_anatomy(rng: np.random.Generator, shape: tuple[int, ...], has_lesion: bool) -> _Anatomy:
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
    return _Anatomy(body=body, organ=organ, lesion=lesion)


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


def _render(
    rng: np.random.Generator, anatomy: _Anatomy, *, body_level: float, organ_level: float, lesion_level: float
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


# ----------------------------------------------------------------------------------------------------------
# dataset


def generate_dataset(
    out_dir: Path | str,
    cases: int = 48,
    size: int = 64,
    seed: int = 0,
    dicom_cases: int = 0,
    spatial_dims: int = 3,
    masked: int | None = None,
) -> Path:
    """Write the phantom dataset in MSD layout (and optionally a DICOM export of extra cases).

    Args:
        out_dir: output folder; must be absent or empty (nothing a user has is overwritten).
        cases: number of training cases (imagesTr/labelsTr); half of them have a lesion.
        size: edge length in voxels.
        seed: random seed (>= 0); the same seed writes identical arrays and an identical dataset.json.
        dicom_cases: extra cases, not in `training`, written to imagesTs/labelsTs and as a DICOM study
            each under dicom/ (3D only).
        spatial_dims: 3 for volumes, 2 for images.
        masked: partially labelled data: only the first `masked` training cases keep their masks (equally
            many with and without a lesion, give or take one); the others are listed with their image and
            their lesion-present `class` only, and no label file is written for them. None: every case.

    Returns:
        The path of the written dataset.json.
    """
    out = Path(out_dir)
    _check_dataset_arguments(cases, size, seed, dicom_cases, spatial_dims)
    if masked is not None and not 0 <= masked <= cases:
        raise MedmtlError(f"masked must be between 0 and the number of cases ({cases}), got {masked}")
    _prepare_empty_dir(out)
    width = max(3, len(str(cases + dicom_cases - 1)))
    training = []
    for index in range(cases):
        case_id = f"phantom_{index:0{width}d}"
        case = make_case(_case_rng(seed, index), size, spatial_dims, has_lesion=_lesion_flag(seed, index))
        with_mask = masked is None or index < masked
        training.append(_write_nifti_pair(out, "imagesTr", "labelsTr" if with_mask else None, case_id, case))
    exports = []
    for number in range(dicom_cases):
        index = cases + number
        case_id = f"phantom_{index:0{width}d}"
        oblique = number % 2 == 1  # every second exported study is oblique
        case, anatomy = _make_case_with_anatomy(
            _case_rng(seed, index), size, 3, has_lesion=_lesion_flag(seed, index), oblique=oblique
        )
        entry = _write_nifti_pair(out, "imagesTs", "labelsTs", case_id, case)
        study_dir = _export_study(out / "dicom", case, anatomy, case_id, seed, index, number)
        exports.append(
            {
                "case": case_id,
                "study_dir": f"./dicom/{study_dir.name}",
                "image": entry["image"],
                "label": entry["label"],
                "class": entry["class"],
                "series_description": MAIN_SERIES_DESCRIPTION,
                "oblique": oblique,
            }
        )
    description = {
        "name": "medmtl-phantom",
        "description": "Deterministic MR-like phantom: organ (label 1) and, in half the cases, a subtle "
        "lesion inside it (label 2); bias field, Rician noise and a random intensity scale.",
        "reference": f"medmtl.data.synthetic (seed {seed}, size {size})",
        "licence": "Apache-2.0",
        "release": "1.0",
        "tensorImageSize": f"{spatial_dims}D",
        "modality": {"0": "MR"},
        "labels": LABELS,
        "classes": CLASSES,
        "numTraining": len(training),
        **({"numMasked": masked} if masked is not None else {}),
        "numTest": len(exports),
        "training": training,
        "test": [entry["image"] for entry in exports],
    }
    if dicom_cases:
        description["dicom_exports"] = exports
    # written last: a folder with dataset.json is complete
    return _write_text(out / "dataset.json", json.dumps(description, indent=2) + "\n")


def ensure_phantom_dataset(dataset_dir: Path | str, **kwargs: object) -> Path:
    """Generate the phantom dataset unless `dataset_dir` already holds a dataset.json.

    The set is built in a staging folder beside `dataset_dir` and moved into place with one rename, so
    processes that call this at the same time (e.g. DDP ranks) never see a half-written dataset.

    Args:
        dataset_dir: the dataset folder (absent, empty, or holding a dataset.json).
        kwargs: passed to `generate_dataset` (cases, size, seed, dicom_cases, spatial_dims).

    Returns:
        The path of dataset.json.
    """
    dataset_dir = Path(dataset_dir)
    target = dataset_dir / "dataset.json"
    if target.is_file():
        return target
    if dataset_dir.is_dir() and any(dataset_dir.iterdir()):
        raise MedmtlError(
            f"{dataset_dir}: folder has files but no dataset.json; refusing to generate the phantom there"
        )
    staging = dataset_dir.parent / f".{dataset_dir.name}.staging-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        generate_dataset(staging, **kwargs)  # type: ignore[arg-type]
        try:
            os.rename(staging, dataset_dir)  # replaces an absent or empty folder in one step
        except OSError as err:
            if not target.is_file():  # not a concurrent caller that finished first
                raise MedmtlError(f"{dataset_dir}: cannot move the generated phantom in ({err})") from err
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


def _check_dataset_arguments(cases: int, size: int, seed: int, dicom_cases: int, spatial_dims: int) -> None:
    _check_grid(size, spatial_dims)
    if cases < 1:
        raise MedmtlError(f"cases must be at least 1 (got {cases})")
    if dicom_cases < 0:
        raise MedmtlError(f"dicom_cases must not be negative (got {dicom_cases})")
    if seed < 0:
        raise MedmtlError(f"seed must not be negative (got {seed})")
    if dicom_cases and spatial_dims != 3:
        raise MedmtlError("DICOM export (dicom_cases > 0) is not supported for 2D phantoms (spatial_dims=2)")


def _prepare_empty_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise MedmtlError(f"{out}: output path exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        raise MedmtlError(f"{out}: output folder is not empty; refusing to overwrite (choose a new folder)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise MedmtlError(f"{out}: cannot create the output folder ({err.strerror or err})") from err


def _case_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _STREAM_CASE, index])


def _lesion_flag(seed: int, index: int) -> bool:
    # exactly one case of each consecutive pair has a lesion: balanced classes for any number of cases
    first = int(np.random.default_rng([seed, _STREAM_LESION_PAIR, index // 2]).integers(2))
    return index % 2 == first


def _write_nifti_pair(out: Path, images: str, labels: str | None, case_id: str, case: PhantomCase) -> dict:
    """Write a case's image (and label unless `labels` is None); its dataset.json entry."""
    name = f"{case_id}.nii.gz"
    _write_nifti(out / images / name, case.image, case.affine)
    entry = {"image": f"./{images}/{name}"}
    if labels is not None:
        _write_nifti(out / labels / name, case.label, case.affine)
        entry["label"] = f"./{labels}/{name}"
    return {**entry, "class": int(case.has_lesion)}


def _write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    image = nib.Nifti1Image(array, affine)
    image.set_sform(affine, code=1)  # 1 = scanner anatomical coordinates
    image.set_qform(affine, code=1)
    image.header.set_xyzt_units("mm")
    image.header.set_data_dtype(array.dtype)
    return atomic_write(path, lambda tmp: nib.save(image, tmp))


def _write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# ----------------------------------------------------------------------------------------------------------
# DICOM export


def write_dicom_series(
    image: np.ndarray,
    affine: np.ndarray,
    series_dir: Path,
    *,
    study: StudyInfo,
    series_description: str,
    series_number: int,
    file_names: Sequence[str] | None = None,
    instance_numbers: Sequence[int] | None = None,
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "M", "ND"),
    extra_tags: Mapping[str, object] | None = None,
) -> list[Path]:
    """Write a 3D image as an MR series, one file per slice (classic MR Image Storage).

    Geometry contract: slice k holds `image[:, :, k]` with columns along i and rows along j
    (pixel_array[r, c] == image[c, r, k]); with F = diag(-1, -1, 1) (RAS to LPS),
    ImageOrientationPatient = [F a0 / |a0|, F a1 / |a1|], PixelSpacing = [|a1|, |a0|] and
    ImagePositionPatient_k = F (affine @ [0, 0, k, 1])[:3], where a0, a1 are the affine's first columns.
    Pixels are stored as int16 with RescaleSlope/RescaleIntercept; stored * slope + intercept reproduces
    the image to within slope / 2.

    Args:
        image: array (i, j, k) of real values.
        affine: 4x4 voxel-to-RAS matrix; its third column must point along a0 x a1 (no shear, det > 0).
        series_dir: folder to write to (created; files written atomically).
        study: patient and study attributes and the UID source.
        series_description: SeriesDescription.
        series_number: SeriesNumber; also names the series in its UIDs.
        file_names: one name per slice, in slice order (default IM0001.dcm, ...).
        instance_numbers: InstanceNumber per slice, in slice order (default 1..n along the slices).
        image_type: ImageType values.
        extra_tags: further attributes by keyword (e.g. {"RepetitionTime": "2300"}).

    Returns:
        The written file paths, in slice order.
    """
    image = np.asarray(image)
    affine = np.asarray(affine, dtype=np.float64)
    depth = image.shape[2] if image.ndim == 3 else 0
    names = list(file_names) if file_names is not None else [f"IM{k + 1:04d}.dcm" for k in range(depth)]
    numbers = list(instance_numbers) if instance_numbers is not None else list(range(1, depth + 1))
    if image.ndim != 3 or affine.shape != (4, 4):
        raise MedmtlError(f"{series_dir}: a DICOM series needs a 3D image and a 4x4 affine")
    if len(names) != depth or len(set(names)) != depth or len(numbers) != depth:
        raise MedmtlError(f"{series_dir}: need {depth} distinct file names and instance numbers")
    columns = affine[:3, :3]
    normal = np.cross(columns[:, 0], columns[:, 1])
    cosine = normal @ columns[:, 2] / (np.linalg.norm(normal) * np.linalg.norm(columns[:, 2]))
    if cosine < 1 - 1e-6:
        raise MedmtlError(f"{series_dir}: affine's slice axis is not along row x column (shear or det <= 0)")

    row_dir = LPS_FROM_RAS @ columns[:, 0] / np.linalg.norm(columns[:, 0])
    col_dir = LPS_FROM_RAS @ columns[:, 1] / np.linalg.norm(columns[:, 1])
    pixel_spacing = [float(np.linalg.norm(columns[:, 1])), float(np.linalg.norm(columns[:, 0]))]
    slice_spacing = float(np.linalg.norm(columns[:, 2]))
    slope, intercept = _rescale(image)
    stored = np.clip(np.round((image - intercept) / slope), 0, np.iinfo(np.int16).max).astype(np.int16)
    series_uid = study.uid("series", series_number)
    series_dir = Path(series_dir)
    paths = []
    for k in range(depth):
        position = LPS_FROM_RAS @ (affine @ np.array([0.0, 0.0, k, 1.0]))[:3]
        ds = _slice_dataset(
            study,
            series_uid=series_uid,
            series_number=series_number,
            series_description=series_description,
            instance_number=numbers[k],
            sop_instance_uid=study.uid("series", series_number, "instance", k),
            pixels=np.ascontiguousarray(stored[:, :, k].T),  # rows along j, columns along i
            orientation=np.concatenate([row_dir, col_dir]),
            position=position,
            pixel_spacing=pixel_spacing,
            slice_thickness=slice_spacing,
            spacing_between_slices=slice_spacing,
            slope=slope,
            intercept=intercept,
            window=(float(image.min()), float(image.max())),
            image_type=image_type,
            extra_tags=extra_tags,
        )
        paths.append(_write_dicom_file(series_dir / names[k], ds))
    return paths


def _rescale(image: np.ndarray) -> tuple[float, float]:
    """Slope and intercept (4 significant digits, exact as DS text) mapping 0..STORED_MAX over the image."""
    low, high = float(image.min()), float(image.max())
    # an intercept a little below the minimum keeps it non-trivial even for images that start at 0
    intercept = float(f"{low - 0.01 * (high - low) - 1.0:.4g}")
    slope = float(f"{max(high - intercept, 1e-3) / STORED_MAX * 1.0001:.4g}")
    while intercept + slope * STORED_MAX < high:  # 4-digit rounding of the slope may fall short
        slope = float(f"{slope * 1.001:.4g}")
    return slope, intercept


def _ds(value: float) -> str:
    return format_number_as_ds(float(value))


def _slice_dataset(
    study: StudyInfo,
    *,
    series_uid: str,
    series_number: int,
    series_description: str,
    instance_number: int,
    sop_instance_uid: str,
    pixels: np.ndarray,
    orientation: np.ndarray,
    position: np.ndarray,
    pixel_spacing: Sequence[float],
    slice_thickness: float,
    spacing_between_slices: float | None,
    slope: float,
    intercept: float,
    window: tuple[float, float],
    image_type: Sequence[str],
    extra_tags: Mapping[str, object] | None,
) -> Dataset:
    """One MR Image Storage instance with the patient, study, series, geometry and pixel attributes."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta.ImplementationVersionName = "MEDMTL_PHANTOM"
    series_time = f"{study.study_time[:2]}{(int(study.study_time[2:4]) + 4 * series_number) % 60:02d}00"

    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = list(image_type)
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = sop_instance_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = study.study_date
    ds.StudyTime = study.study_time
    ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = series_time
    ds.AccessionNumber = study.accession_number
    ds.Modality = "MR"
    ds.Manufacturer = "medmtl"
    ds.ManufacturerModelName = "phantom generator"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = study.study_description
    ds.SeriesDescription = series_description
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = study.patient_birth_date
    ds.PatientSex = "O"
    ds.BodyPartExamined = "HEAD"
    ds.MagneticFieldStrength = "3"
    ds.SliceThickness = _ds(slice_thickness)
    if spacing_between_slices is not None:
        ds.SpacingBetweenSlices = _ds(spacing_between_slices)
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study.study_instance_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = study.study_id
    ds.SeriesNumber = series_number
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.ImageOrientationPatient = [_ds(v) for v in orientation]
    ds.FrameOfReferenceUID = study.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = _ds(np.cross(orientation[:3], orientation[3:]) @ position)
    ds.PixelSpacing = [_ds(v) for v in pixel_spacing]
    for keyword, value in (extra_tags or {}).items():
        setattr(ds, keyword, value)
    ds.set_pixel_data(pixels, "MONOCHROME2", bits_stored=16, generate_instance_uid=False)
    ds.WindowCenter = _ds((window[0] + window[1]) / 2)
    ds.WindowWidth = _ds(max(window[1] - window[0], 1.0))
    ds.RescaleIntercept = _ds(intercept)
    ds.RescaleSlope = _ds(slope)
    ds.RescaleType = "US"  # unspecified units, as MR scanners write
    return ds


def _write_dicom_file(path: Path, ds: Dataset) -> Path:
    return atomic_write(path, lambda tmp: ds.save_as(tmp, enforce_file_format=True))


def _phantom_study(seed: int, index: int, rng: np.random.Generator) -> StudyInfo:
    # obviously fake identifiers, distinct per case, that never appear in file or folder names
    number = f"{int(rng.integers(100, 1000))}{index:03d}"
    birth = f"{int(rng.integers(1940, 1990))}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"
    return StudyInfo(
        uid_seed=f"medmtl-phantom/seed={seed}/case={index}",
        patient_name=f"PHANTOM^{number}",
        patient_id=f"PHANTOM{number}",
        patient_birth_date=birth,
        accession_number=f"PHACC{number}",
    )


def _export_study(
    dicom_root: Path, case: PhantomCase, anatomy: _Anatomy, case_id: str, seed: int, index: int, number: int
) -> Path:
    """Write one case as a scanner-like study: localizer, FLAIR decoy, main T1 series, non-DICOM files."""
    rng = np.random.default_rng([seed, _STREAM_EXPORT, index])
    study = _phantom_study(seed, index, rng)
    study_dir = dicom_root / f"Study_{case_id}"

    def series_folder(series_number: int, description: str) -> Path:
        # like a TCIA export: "<SeriesNumber>-<description>-<last 5 digits of the series UID>"
        uid_tail = study.uid("series", series_number)[-5:]
        return study_dir / f"{series_number}-{description.replace(' ', '_')}-{uid_tail}"

    localizer = _write_localizer(case, series_folder(1, LOCALIZER_SERIES_DESCRIPTION), study, rng)

    flair, flair_affine = _render_flair(rng, anatomy, case.affine)
    flair_count = flair.shape[2]
    flair_files = write_dicom_series(
        flair, flair_affine, series_folder(2, FLAIR_SERIES_DESCRIPTION),
        study=study, series_description=FLAIR_SERIES_DESCRIPTION, series_number=2,
        file_names=_numbered_names(rng, flair_count),
        instance_numbers=list(range(flair_count, 0, -1)),  # reversed against the slice positions
        extra_tags={
            "ScanningSequence": ["SE", "IR"], "SequenceVariant": ["SK", "SP"], "MRAcquisitionType": "2D",
            "RepetitionTime": "9000", "EchoTime": "120", "InversionTime": "2500", "FlipAngle": "150",
        },
    )  # fmt: skip

    depth = case.image.shape[2]
    main_folder = series_folder(3, MAIN_SERIES_DESCRIPTION)
    main_files = write_dicom_series(
        case.image, case.affine, main_folder,
        study=study, series_description=MAIN_SERIES_DESCRIPTION, series_number=3,
        file_names=_random_names(rng, depth),
        # every second study numbers its instances against the slice order
        instance_numbers=list(range(depth, 0, -1)) if number % 2 else list(range(1, depth + 1)),
        extra_tags={
            "ScanningSequence": ["GR", "IR"], "SequenceVariant": ["SK", "SP", "MP"],
            "MRAcquisitionType": "3D",
            "RepetitionTime": "2300", "EchoTime": "2.98", "InversionTime": "900", "FlipAngle": "9",
        },
    )  # fmt: skip
    _write_text(main_folder / "README.txt", "Exported by the medmtl phantom generator. Not a DICOM file.\n")
    images = len(localizer) + len(flair_files) + len(main_files)
    log = f"medmtl phantom export\nseries: 3\nimages: {images}\nstatus: complete\n"
    _write_text(study_dir / "export.log", log)
    return study_dir


def _render_flair(
    rng: np.random.Generator, anatomy: _Anatomy, affine: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A second contrast of the same anatomy at a coarser grid (fewer, thicker slices), same orientation."""
    body, organ, lesion = FLAIR_LEVELS
    full = _render(rng, anatomy, body_level=body, organ_level=organ, lesion_level=lesion)
    step = np.asarray(FLAIR_SUBSAMPLING)
    smoothed = ndimage.gaussian_filter(full, sigma=step / 2.0)  # anti-alias before taking every step-th voxel
    coarse = smoothed[:: step[0], :: step[1], :: step[2]]
    # voxel 0 is shared and the steps scale the columns: the coarse grid covers the same region
    return np.ascontiguousarray(coarse), affine @ np.diag([*step.astype(float), 1.0])


def _write_localizer(
    case: PhantomCase, folder: Path, study: StudyInfo, rng: np.random.Generator
) -> list[Path]:
    """Three orthogonal scanner-aligned slices through the volume centre, sampled from the image."""
    n = case.image.shape[0]
    spacing = LOCALIZER_SPACING_MM
    center_lps = LPS_FROM_RAS @ (case.affine @ np.append((np.asarray(case.image.shape) - 1) / 2, 1.0))[:3]
    planes = {  # LPS row direction, column direction: axial, coronal, sagittal
        "axial": (np.array([1.0, 0, 0]), np.array([0, 1.0, 0])),
        "coronal": (np.array([1.0, 0, 0]), np.array([0, 0, -1.0])),
        "sagittal": (np.array([0, 1.0, 0]), np.array([0, 0, -1.0])),
    }
    voxel_from_lps = np.linalg.inv(case.affine) @ np.diag([-1.0, -1.0, 1.0, 1.0])
    samples, geometry = [], []
    for row_dir, col_dir in planes.values():
        corner = center_lps - spacing * (n - 1) / 2 * (row_dir + col_dir)
        r, c = np.mgrid[0:n, 0:n].astype(float)
        points = corner[:, None, None] + spacing * (c * row_dir[:, None, None] + r * col_dir[:, None, None])
        homogeneous = np.concatenate([points, np.ones((1, n, n))])
        voxels = np.tensordot(voxel_from_lps, homogeneous, axes=1)[:3]
        samples.append(ndimage.map_coordinates(case.image, voxels, order=1, cval=0.0))
        geometry.append((np.concatenate([row_dir, col_dir]), corner))
    stacked = np.stack(samples)
    slope, intercept = _rescale(stacked)
    series_uid = study.uid("series", 1)
    names = _numbered_names(rng, len(samples))
    paths = []
    for k, (sample, (orientation, corner)) in enumerate(zip(samples, geometry, strict=True)):
        stored = np.clip(np.round((sample - intercept) / slope), 0, np.iinfo(np.int16).max).astype(np.int16)
        ds = _slice_dataset(
            study,
            series_uid=series_uid,
            series_number=1,
            series_description=LOCALIZER_SERIES_DESCRIPTION,
            instance_number=k + 1,
            sop_instance_uid=study.uid("series", 1, "instance", k),
            pixels=stored,
            orientation=orientation,
            position=corner,
            pixel_spacing=[spacing, spacing],
            slice_thickness=5.0,
            spacing_between_slices=None,
            slope=slope,
            intercept=intercept,
            window=(float(stacked.min()), float(stacked.max())),
            image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
            extra_tags={"ScanningSequence": "GR", "SequenceVariant": "SP", "MRAcquisitionType": "2D",
                        "RepetitionTime": "8.6", "EchoTime": "4", "FlipAngle": "20"},
        )  # fmt: skip
        paths.append(_write_dicom_file(folder / names[k], ds))
    return paths


def _random_names(rng: np.random.Generator, count: int) -> list[str]:
    """Scanner-style names like IM_83A1, some without extension, in no relation to the slice order."""
    names: list[str] = []
    taken: set[str] = set()
    while len(names) < count:
        stem = f"IM_{int(rng.integers(0, 16**4)):04X}"
        if stem in taken:
            continue
        taken.add(stem)
        names.append(stem + (".dcm" if rng.random() < 0.5 else ""))
    return _unsorted(names)


def _numbered_names(rng: np.random.Generator, count: int) -> list[str]:
    """Names 000000.dcm.. assigned to the slices in shuffled order (as some archive exports do)."""
    return _unsorted([f"{i:06d}.dcm" for i in rng.permutation(count)])


def _unsorted(names: list[str]) -> list[str]:
    # a random order can be sorted by chance for few slices; rotate so sorting by name never gives slice order
    if len(names) > 1 and names == sorted(names):
        names = names[1:] + names[:1]
    return names
