"""Shared fixtures. Data from ../shared is read in place (MEDMTL_SHARED overrides where it is)."""

from __future__ import annotations

import os
from pathlib import Path

import pydicom
import pytest
import torch

from medmtl.data.datalist import read_dataset_json, write_dataset_json
from medmtl.engine.checkpoint import atomic_torch_save
from medmtl.inference.batch import load_inference_config
from medmtl.networks import MultiTaskUNet

REPO_ROOT = Path(__file__).resolve().parents[1]
PATIENT_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber")


def random_checkpoint(bundle: Path, path: Path) -> Path:
    """The bundle's network (as inference.yaml builds it), untrained, saved as a model.pt at `path`."""
    args = load_inference_config(bundle).get_parsed_content("network_args")
    torch.manual_seed(0)
    return atomic_torch_save(MultiTaskUNet(**args).state_dict(), path)


def hippocampus_subset(hippocampus_dir: Path, root: Path, cases: int) -> Path:
    """An MSD folder at `root` holding symlinks to the first `cases` labelled Task04 cases and its own dataset.json."""
    meta = read_dataset_json(hippocampus_dir)
    training = meta["training"][:cases]
    for item in training:
        for key in ("image", "label"):
            link = root / item[key]
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to((hippocampus_dir / item[key]).resolve())
    write_dataset_json(root, {**meta, "training": training, "numTraining": cases, "test": [], "numTest": 0})
    return root


def patient_identifiers(root: Path) -> set[str]:
    """The patient identifier values (PATIENT_KEYWORDS) of every DICOM file under `root`."""
    found = set()
    for path in root.rglob("*"):
        if path.is_file() and pydicom.misc.is_dicom(path):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            found |= {str(ds.get(k, "")) for k in PATIENT_KEYWORDS if str(ds.get(k, ""))}
    return found


def _shared_dir() -> Path:
    return Path(os.environ.get("MEDMTL_SHARED", REPO_ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The team's read-only data folder; tests that need it skip when it is absent (CI always has it)."""
    path = _shared_dir()
    if not path.is_dir():
        pytest.skip(f"shared data folder not found at {path} (set MEDMTL_SHARED)")
    return path


@pytest.fixture(scope="session")
def hippocampus_dir(shared_dir: Path) -> Path:
    """MSD Task04 hippocampus, 200 labelled cases."""
    path = shared_dir / "datasets" / "Task04_Hippocampus"
    if not (path / "dataset.json").is_file():
        pytest.skip(f"{path} has no dataset.json")
    return path


@pytest.fixture(scope="session")
def study1_dir(shared_dir: Path) -> Path:
    """A real MR study export: four 512x512 series and the 1 mm HippoCrop series."""
    path = shared_dir / "dicom" / "Study1"
    if not path.is_dir():
        pytest.skip(f"{path} not found")
    return path
