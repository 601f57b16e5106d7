"""What `medmtl infer` segments: the inputs under INPUT, the series rule that chooses DICOM series, loading one.

INPUT may be a NIfTI file, a folder of NIfTI files (top level), one DICOM series folder or a whole export tree
with many studies and series (found with `discover_series`, chosen with `select_series` and a `SeriesRule`, by
default the bundle's ``metadata.json`` ``"input_series"``). Each input gets a unique, safe output folder name:
the NIfTI file stem, or ``<SeriesNumber>_<description>_<UID tail>`` for a series. No patient identifier is
read into names or messages.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medmtl.data.dicom import SeriesInfo, SeriesRule, discover_series, load_series, select_series
from medmtl.data.plausibility import dtype_problem, read_error_text
from medmtl.errors import MedmtlError, innermost_cause
from medmtl.inference.writers import safe_name
from medmtl.io import display_path
from medmtl.quiet import MONAI_READER_NOISE, silenced

__all__ = ["NIFTI_SUFFIXES", "InputItem", "series_rule", "merge_series_rule", "find_inputs", "load_input"]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
_RULE_KEYS = ("modality", "description", "min_slices", "largest", "series_uid")


@dataclass
class InputItem:
    """One input of a batch run.

    Attributes:
        label: how messages name it: the file path, or the series description and short UID.
        name: its output folder name under OUT (safe, unique within the run).
        path: the NIfTI file, or the series folder.
        series: the DICOM series, None for a NIfTI file.
    """

    label: str
    name: str
    path: Path
    series: SeriesInfo | None = None


def series_rule(spec: Mapping[str, Any] | SeriesRule | None) -> SeriesRule:
    """A `SeriesRule` from a metadata.json ``"input_series"`` dict (or a rule, passed through).

    Args:
        spec: keys among modality, description (regular expression), min_slices, largest, series_uid;
            None or {} selects every series except localizers.

    Returns:
        the rule.

    Raises:
        MedmtlError: for an unknown key or an invalid regular expression.
    """
    if isinstance(spec, SeriesRule):
        return spec
    spec = dict(spec or {})
    unknown = sorted(set(spec) - set(_RULE_KEYS))
    if unknown:
        raise MedmtlError(f"input_series: unknown key(s) {unknown} (known: {list(_RULE_KEYS)})")
    spec["largest"] = bool(spec.get("largest", False))
    return SeriesRule(**spec)


def merge_series_rule(base: Mapping[str, Any] | None, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The bundle's series rule with command-line options laid over it.

    Each option that is set replaces the bundle's value for that key; ``series_uid`` names one series
    exactly and so replaces the whole rule.

    Args:
        base: the bundle's ``"input_series"`` (or None).
        overrides: option values; None (and False for ``largest``) means "not given".

    Returns:
        the merged rule as a dict for `series_rule`.
    """
    given = {k: v for k, v in overrides.items() if v is not None and v is not False}
    if given.get("series_uid"):
        return {"series_uid": given["series_uid"]}
    return {**dict(base or {}), **given}


# ---------------------------------------------------------------------------------------------------------
# finding


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES) and not path.name.startswith(".")


def _nifti_stem(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _series_name(series: SeriesInfo) -> str:
    parts = [str(series.series_number)] if series.series_number is not None else []
    parts += [series.description or "series", series.series_uid[-8:]]
    return safe_name("_".join(parts), fallback="series")


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 1
    while candidate.lower() in taken:  # case-insensitive: two names must not collide on macOS/Windows
        n += 1
        candidate = f"{name}_{n}"
    taken.add(candidate.lower())
    return candidate


def _no_match_reason(root: Path, series: Sequence[SeriesInfo], rule: SeriesRule) -> str:
    shown = ", ".join(
        f"{s.series_number if s.series_number is not None else '-'} '{s.description}'"
        + (" (localizer)" if s.is_localizer else "")
        for s in series[:6]
    )
    more = f" and {len(series) - 6} more" if len(series) > 6 else ""
    return (
        f"{root}: {len(series)} DICOM series found, none matches the series rule ({rule.describe()}): "
        f"{shown}{more}; see `medmtl series {root}` and the --modality/--description options"
    )


def find_inputs(input_path: Path | str, rule: SeriesRule | None = None) -> tuple[list[InputItem], list[str]]:
    """The inputs under INPUT: NIfTI files and the DICOM series that the rule selects.

    Args:
        input_path: a NIfTI file, a DICOM file, a folder of NIfTI files, a series folder or an export tree.
        rule: which DICOM series to take (default: every series except localizers).

    Returns:
        (inputs in a stable order, problems in words): a problem says why not everything could be found,
        e.g. DICOM series were found but none matches the rule.

    Raises:
        MedmtlError: INPUT does not exist, or holds no usable input at all (no NIfTI image and no DICOM
            image series): the run cannot start, as `medmtl series` on such a folder.
    """
    root = Path(input_path)
    rule = rule or SeriesRule()
    if not root.exists():
        raise MedmtlError(f"{root}: input not found")
    taken: set[str] = set()
    items: list[InputItem] = []
    if root.is_file() and _is_nifti(root):
        return [InputItem(label=display_path(root), name=_unique(safe_name(_nifti_stem(root)), taken), path=root)], []
    niftis = sorted(p for p in root.iterdir() if p.is_file() and _is_nifti(p)) if root.is_dir() else []
    for path in niftis:
        items.append(InputItem(display_path(path), _unique(safe_name(_nifti_stem(path)), taken), path))
    series = discover_series(root)
    chosen = select_series(series, rule)
    for s in chosen:
        items.append(
            InputItem(label=s.label, name=_unique(_series_name(s), taken), path=s.folder or root, series=s)
        )
    if not items and not series:  # nothing usable: a script must tell this from inputs that failed
        what = "file" if root.is_file() else "folder"
        raise MedmtlError(
            f"{root}: no inputs found: the {what} holds no NIfTI image (.nii, .nii.gz) "
            "and no DICOM image series"
        )
    problems = [_no_match_reason(root, series, rule)] if series and not chosen else []
    return items, problems


# ---------------------------------------------------------------------------------------------------------
# loading


@functools.cache
def _nifti_loader() -> Any:
    """One NIfTI loader for the process (building a LoadImage instantiates all of MONAI's readers)."""
    from monai.data import NibabelReader
    from monai.transforms import LoadImage

    with silenced(MONAI_READER_NOISE):
        return LoadImage(reader=NibabelReader(), image_only=True, ensure_channel_first=True, dtype=np.float32)


def load_input(item: InputItem, min_slices: int = 1) -> Any:
    """Read one input as a channel-first float32 MetaTensor (a DICOM series: no channel, see `load_series`).

    Args:
        item: the input.
        min_slices: fewest slices a DICOM series must have (a 3D model needs a volume).

    Returns:
        the image, with its affine in ``meta["affine"]``.

    Raises:
        MedmtlError: naming the input: not a readable NIfTI file, an unusable data type, or a series that
            cannot be one volume.
    """
    if item.series is not None:
        return load_series(item.series, min_slices=min_slices)
    # the header first, with nibabel alone: LoadImage would try every other reader on a broken file and
    # report the last one's complaint (a DICOM error for a .nii.gz), and would cast complex data to real
    try:
        dtype = nib.load(item.path).get_data_dtype()
    except Exception as err:  # nibabel raises many types for a foreign or truncated header
        raise MedmtlError(f"{item.label}: not a readable NIfTI file ({read_error_text(err, item.path)})") from None
    unusable = dtype_problem(dtype)
    if unusable:
        raise MedmtlError(f"{item.label}: {unusable}")
    try:
        with silenced(MONAI_READER_NOISE):
            return _nifti_loader()(str(item.path))
    except Exception as err:  # truncated voxel data: EOFError, zlib.error, OSError, ...
        cause = innermost_cause(err)
        raise MedmtlError(f"{item.label}: not a readable NIfTI file ({read_error_text(cause, item.path)})") from None
