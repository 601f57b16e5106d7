"""The shared atomic writer (`medmtl.io`) and the one-line summary of an exception (`medmtl.errors`)."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medmtl.errors import MedmtlError, error_summary
from medmtl.io import atomic_write, stale_temp_files, temp_name


def test_atomic_write_replaces_whole_files_and_leaves_nothing_on_failure(tmp_path: Path):
    path = atomic_write(tmp_path / "sub" / "a.txt", lambda tmp: tmp.write_text("one"))
    assert path.read_text() == "one"
    atomic_write(path, lambda tmp: tmp.write_text("two"), durable=True)
    assert path.read_text() == "two"

    def fails(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_write(path, fails)
    assert path.read_text() == "two" and os.listdir(path.parent) == ["a.txt"]

    with pytest.raises(MedmtlError, match=r"a\.txt: already exists; refusing to overwrite it"):
        atomic_write(path, lambda tmp: tmp.write_text("three"), overwrite=False)
    assert path.read_text() == "two"

    def disk_full(tmp: Path) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(MedmtlError, match=r"b\.txt: cannot write \(No space left on device\)"):
        atomic_write(tmp_path / "b.txt", disk_full)


def test_the_temporary_file_keeps_the_suffix_and_is_found_when_left_behind(tmp_path: Path):
    tmp = temp_name(tmp_path / "seg.nii.gz")
    assert tmp.parent == tmp_path and tmp.name.startswith(".seg.nii.gz.") and tmp.name.endswith(".tmp.nii.gz")
    image = nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), np.eye(4))
    path = atomic_write(tmp_path / "seg.nii.gz", lambda t: nib.save(image, t))
    assert path.read_bytes()[:2] == b"\x1f\x8b"  # gzip, chosen by nibabel from the temporary name
    tmp.write_bytes(b"partial")
    (tmp_path / ".last.pt.k1ll3d_x.tmp").write_bytes(b"partial")  # the name of an earlier version's writer
    (tmp_path / ".other.tmp").write_bytes(b"not ours")
    found = stale_temp_files(tmp_path, ("seg.nii.gz", "last.pt"))
    assert [p.name for p in found] == sorted([tmp.name, ".last.pt.k1ll3d_x.tmp"])


def test_error_summary_is_one_line():
    assert error_summary(ValueError("first\n\nsecond")) == "first"
    assert error_summary(ValueError("\x1b[31mred\x1b[0m text")) == "red text"
    assert error_summary(KeyError()) == "KeyError"
    assert error_summary(OSError("disk"), typed=True) == "OSError: disk"
    decoders = RuntimeError("Unable to decode the pixel data:\n  gdcm: missing\n  pylibjpeg: missing")
    assert error_summary(decoders, joined=True) == "Unable to decode the pixel data: gdcm: missing; pylibjpeg: missing"
    assert error_summary(ValueError("x" * 50), typed=True, limit=20) == "ValueError: xxxxx..."
