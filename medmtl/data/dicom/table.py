"""The series table that `medmtl series` prints: one line per series, then the problems found in full."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from medmtl.data.dicom.headers import _slice_normal
from medmtl.data.dicom.info import SeriesInfo, _mm, short_uid


def orientation_label(orientation: Sequence[float] | None) -> str:
    """Name the plane of a slice orientation from its normal.

    Args:
        orientation: ImageOrientationPatient (6 values), or None.

    Returns:
        ``axial``, ``coronal`` or ``sagittal`` within 1 degree of the plane, ``oblique (ax 16°)`` style
        otherwise (closest plane and tilt), ``-`` when unknown.
    """
    if orientation is None:
        return "-"
    normal = np.abs(_slice_normal(orientation))
    axis = int(np.argmax(normal))
    name, short = (("sagittal", "sag"), ("coronal", "cor"), ("axial", "ax"))[axis]
    tilt = math.degrees(math.acos(min(1.0, float(normal[axis]))))
    return name if tilt <= 1.0 else f"oblique ({short} {tilt:.0f}°)"


def _flag_names(s: SeriesInfo) -> list[str]:
    # problems read "<kind>: <details>"; the table shows the kind, the details follow the table
    return (["localizer"] if s.is_localizer else []) + [p.split(":", 1)[0] for p in s.problems]


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "~"


def format_series_table(series: Sequence[SeriesInfo], selected: Sequence[SeriesInfo] = ()) -> str:
    """A table of series, one line each, followed by the full text of the problems found.

    Args:
        series: the series to show, e.g. from `discover_series`.
        selected: series to mark with ``*`` in the first column.

    Returns:
        The table text (no trailing newline); no patient identifiers. ``no DICOM series found`` when empty.
    """
    if not series:
        return "no DICOM series found"
    chosen = {s.series_uid for s in selected}
    header = f"  {'#':>5}  {'description':<24} {'mod':<4} {'slices':>6}  {'size':<13} {'spacing mm':<15} "
    header += f"{'orientation':<17} {'uid':<10}  flags"
    lines = [header]
    notes = []
    for s in series:
        spacing = "?"
        if s.pixel_spacing is not None:
            spacing = f"{_mm(s.pixel_spacing[1])}x{_mm(s.pixel_spacing[0])}"
            spacing += f"x{_mm(s.slice_spacing)}" if s.slice_spacing is not None else ""
        number = "-" if s.series_number is None else str(s.series_number)
        size = "x".join(str(n) for n in s.shape)
        mixed = any(p.startswith("mixed orientations") for p in s.problems)
        plane = "mixed" if mixed else orientation_label(s.orientation)
        flags = ", ".join(_flag_names(s))
        line = (
            f"{'*' if s.series_uid in chosen else ' '} {number:>5}  {_clip(s.description, 24):<24} "
            f"{_clip(s.modality, 4):<4} {s.num_slices:>6}  {size:<13} {spacing:<15} "
            f"{plane:<17} {short_uid(s.series_uid):<10}  {flags}"
        )
        lines.append(line.rstrip())
        notes.extend(f"  {number} {short_uid(s.series_uid)}: {p}" for p in s.problems)
    if notes:
        lines += ["problems:", *notes]
    return "\n".join(lines)
