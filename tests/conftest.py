"""Shared fixtures. Data from ../shared is read in place (MEDMTL_SHARED overrides where it is)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


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
