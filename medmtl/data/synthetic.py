"""The phantom dataset: the project's built-in default data, deterministic for a seed.

Cases come from `medmtl.data.phantom` (an organ, label 1, and in half the cases a subtle lesion inside it,
label 2). The set is written in the Medical Segmentation Decathlon (MSD) layout; optionally extra cases are also
exported as a messy scanner-like DICOM study by `medmtl.data.phantom_dicom` (decoy series, shuffled file names,
oblique geometry) to exercise the DICOM discovery and loading code. The public names of both modules are
re-exported here, where the command line, the bundles and the tests import them.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np

from medmtl.data.phantom import CLASSES, LABELS, PhantomCase, check_grid, make_case, make_case_with_anatomy
from medmtl.data.phantom_dicom import (
    FLAIR_SERIES_DESCRIPTION,
    LOCALIZER_SERIES_DESCRIPTION,
    MAIN_SERIES_DESCRIPTION,
    StudyInfo,
    export_study,
    write_dicom_series,
)
from medmtl.errors import MedmtlError
from medmtl.io import atomic_write, atomic_write_text

__all__ = [
    "CLASSES",
    "FLAIR_SERIES_DESCRIPTION",
    "LABELS",
    "LOCALIZER_SERIES_DESCRIPTION",
    "MAIN_SERIES_DESCRIPTION",
    "PhantomCase",
    "StudyInfo",
    "ensure_phantom_dataset",
    "generate_dataset",
    "make_case",
    "write_dicom_series",
]

_STREAM_CASE, _STREAM_LESION_PAIR, _STREAM_EXPORT = 0, 1, 2  # independent random streams per case


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
        case, anatomy = make_case_with_anatomy(
            _case_rng(seed, index), size, 3, has_lesion=_lesion_flag(seed, index), oblique=oblique
        )
        entry = _write_nifti_pair(out, "imagesTs", "labelsTs", case_id, case)
        rng = np.random.default_rng([seed, _STREAM_EXPORT, index])
        study_dir = export_study(out / "dicom", case, anatomy, case_id, rng, seed, index, number)
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
    return atomic_write_text(out / "dataset.json", json.dumps(description, indent=2) + "\n")


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
    check_grid(size, spatial_dims)
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
