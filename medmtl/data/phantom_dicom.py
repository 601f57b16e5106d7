"""A scanner-like DICOM export of phantom cases, to exercise DICOM discovery and loading.

`write_dicom_series` writes a 3D image as a classic MR series, one file per slice, with an exact geometry
contract; `export_study` writes one phantom case as a messy study: a localizer, a decoy FLAIR series at a
coarser grid, the main T1 series under shuffled file names (optionally oblique) and non-DICOM files. Patient
attributes are obviously fake and never appear in file or folder names. Files are written atomically.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pydicom.valuerep import format_number_as_ds
from scipy import ndimage

from medmtl.data.phantom import Anatomy, PhantomCase, render
from medmtl.errors import MedmtlError
from medmtl.io import atomic_write, atomic_write_text

# --- DICOM export ---
STORED_MAX = 4000  # stored pixel values span 0..STORED_MAX (12-bit-like, int16)
MAIN_SERIES_DESCRIPTION = "T1 MPRAGE phantom"
FLAIR_SERIES_DESCRIPTION = "T2 FLAIR phantom"
LOCALIZER_SERIES_DESCRIPTION = "localizer"
FLAIR_SUBSAMPLING = (2, 2, 3)  # coarser in-plane resolution, thicker and fewer slices
FLAIR_LEVELS = (0.6, 0.35, 0.95)  # body, organ, lesion: dark organ, bright lesion
LOCALIZER_SPACING_MM = 1.5
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])


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


def export_study(
    dicom_root: Path, case: PhantomCase, anatomy: Anatomy, case_id: str, rng: np.random.Generator, seed: int,
    index: int, number: int,
) -> Path:
    """Write one case as a scanner-like study: localizer, FLAIR decoy, main T1 series, non-DICOM files.

    Args:
        dicom_root: the export folder; the study goes to ``Study_<case_id>/`` in it.
        case: the case; its image becomes the main series.
        anatomy: the case's anatomy, rendered again as the FLAIR decoy.
        case_id: names the study folder.
        rng: the export's own random stream (names, identifiers, the FLAIR noise).
        seed: the dataset seed, and `index` the case's index: the study's UIDs derive from them.
        index: see `seed`.
        number: the case's number among the exported ones: every second one numbers its instances backwards.

    Returns:
        the study folder.
    """
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
    atomic_write_text(main_folder / "README.txt", "Exported by the medmtl phantom generator. Not a DICOM file.\n")
    images = len(localizer) + len(flair_files) + len(main_files)
    log = f"medmtl phantom export\nseries: 3\nimages: {images}\nstatus: complete\n"
    atomic_write_text(study_dir / "export.log", log)
    return study_dir


def _render_flair(
    rng: np.random.Generator, anatomy: Anatomy, affine: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A second contrast of the same anatomy at a coarser grid (fewer, thicker slices), same orientation."""
    body, organ, lesion = FLAIR_LEVELS
    full = render(rng, anatomy, body_level=body, organ_level=organ, lesion_level=lesion)
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
