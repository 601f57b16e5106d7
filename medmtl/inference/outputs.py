"""The output folders of `medmtl infer`: where they may go, and how one is put in place without replacing
anything that medmtl did not write.

Each input's files are written into a hidden staging folder beside ``OUT/<name>/`` that is renamed into place
at the end, so an input that fails leaves nothing behind. Nothing is written inside the input tree, and nothing
the run did not write is ever replaced: an existing ``OUT/<name>`` makes that input fail with one line, and
``overwrite`` replaces only an earlier medmtl output (a folder holding the `OUTPUT_MARKER`, or an earlier
version's ``report.json``, and nothing but output files).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from medmtl.errors import MedmtlError
from medmtl.io import display_path

__all__ = ["OUTPUT_MARKER", "OUTPUT_FILES", "is_medmtl_output", "check_output_dir", "prepare_output_dir",
           "refuse_existing", "publish"]  # fmt: skip

OUTPUT_MARKER = ".medmtl-output"  # in every output folder: what `overwrite` may replace

# every file medmtl writes into an output folder; a folder holding anything else is the user's
OUTPUT_FILES = frozenset({"seg.nii.gz", "seg.dcm", "probabilities.nii.gz", "boundary.nii.gz", "report.json"})


def check_output_dir(input_path: Path, output_dir: Path) -> None:
    """Refuse an output folder inside the input folder (or the input file itself)."""
    inp, out = input_path.resolve(), output_dir.resolve()
    if out == inp or (inp.is_dir() and inp in out.parents):
        raise MedmtlError(
            f"{output_dir}: the output folder is inside the input {input_path}; choose a folder outside it "
            "(inputs are never written to)"
        )
    if out.exists() and not out.is_dir():
        raise MedmtlError(f"{output_dir}: exists and is not a folder")


def prepare_output_dir(output_dir: Path) -> bool:
    """Create OUT if needed and prove it writable before any input is computed; returns whether it was created."""
    created = not output_dir.exists()
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as err:
        if created and output_dir.is_dir():
            output_dir.rmdir()  # empty: it was made just now
        raise MedmtlError(
            f"{display_path(output_dir)}: cannot write in the output folder ({err.strerror or err}); "
            "nothing was computed"
        ) from None
    return created


def is_medmtl_output(folder: Path) -> bool:
    """Whether `folder` is an earlier medmtl output that `overwrite` may replace.

    It must be a real folder (not a link) holding the `OUTPUT_MARKER` (or, from versions before the marker,
    a ``report.json`` that names a ``medmtl_version``) and nothing but files medmtl writes: a folder to which
    anyone added a file of their own is never replaced.

    Args:
        folder: the existing ``OUT/<name>``.

    Returns:
        True when replacing it loses nothing but medmtl's own outputs.
    """
    if folder.is_symlink() or not folder.is_dir():
        return False
    entries = list(folder.iterdir())
    if any(p.name not in OUTPUT_FILES | {OUTPUT_MARKER} or p.is_symlink() or not p.is_file() for p in entries):
        return False
    if (folder / OUTPUT_MARKER).is_file():
        return True
    try:
        return "medmtl_version" in json.loads((folder / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return False


def refuse_existing(label: str, target: Path, overwrite: bool) -> None:
    """Fail this input when its output folder exists and may not be replaced."""
    if not (target.exists() or target.is_symlink()):
        return
    shown = display_path(target)
    if not is_medmtl_output(target):
        raise MedmtlError(
            f"{label}: {shown} exists and is not a medmtl output; it is left as it is "
            "(choose another --output, or move it)"
        )
    if not overwrite:
        raise MedmtlError(f"{label}: {shown} holds an earlier result; pass --overwrite to replace it")


def publish(label: str, staging: Path, target: Path, overwrite: bool) -> None:
    """Move a finished staging folder to `target`, replacing only an earlier medmtl result (with `overwrite`)."""
    refuse_existing(label, target, overwrite)  # again: something may have appeared there while we computed
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
    try:
        os.rename(staging, target)  # fails on a folder that is not empty: nothing there is ever replaced
    except OSError as err:
        if old is not None:
            os.rename(old, target)
        raise MedmtlError(f"{label}: cannot move the outputs to {display_path(target)} ({err.strerror})") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
