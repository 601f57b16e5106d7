"""What medmtl knows of a DICOM series (`SeriesInfo`: header facts, never a patient identifier) and how
messages name series and errors."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from medmtl.errors import error_summary

NOT_DATA_ERRORS = (KeyboardInterrupt, SystemExit, GeneratorExit)


@dataclass
class SeriesInfo:
    """Header facts about one DICOM series; no patient identifiers are stored here.

    `files` holds one entry per slice, ordered along the slice normal (ascending projection of
    ImagePositionPatient on cross(row, column) of ImageOrientationPatient); a multi-frame file appears once
    per frame, and `frame_numbers[k]` is then the 0-based frame of ``files[k]`` that slice k is. `problems`
    lists, in words, everything that stops the series from loading as one regular volume; `load_series`
    refuses a series with problems.
    """

    series_uid: str
    study_uid: str
    description: str
    modality: str
    series_number: int | None
    files: list[Path]
    rows: int
    columns: int
    pixel_spacing: tuple[float, float] | None  # DICOM order: (between rows, between columns) in mm
    slice_spacing: float | None  # distance between neighbouring slice planes in mm
    orientation: tuple[float, ...] | None  # ImageOrientationPatient: row cosines, column cosines (LPS)
    is_localizer: bool = False
    problems: list[str] = field(default_factory=list)
    frame_numbers: list[int] = field(default_factory=list)  # empty when every file is a classic single frame

    @property
    def num_slices(self) -> int:
        """Number of slices (image files, or frames of multi-frame files) in the series."""
        return len(self.files)

    @property
    def is_multiframe(self) -> bool:
        """Whether the slices are frames of multi-frame (e.g. Enhanced MR) files."""
        return bool(self.frame_numbers)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Volume shape as loaded: (columns, rows, slices)."""
        return (self.columns, self.rows, self.num_slices)

    @property
    def num_voxels(self) -> int:
        """Number of voxels of the volume."""
        return self.columns * self.rows * self.num_slices

    @property
    def label(self) -> str:
        """How messages name the series: description and short UID (never a patient identifier)."""
        return f"series '{self.description or '(no description)'}' ({printable(short_uid(self.series_uid))})"

    @property
    def folder(self) -> Path | None:
        """The deepest folder holding all files of the series."""
        if not self.files:
            return None
        return Path(os.path.commonpath([str(f.parent) for f in self.files]))


def short_uid(uid: str, keep: int = 8) -> str:
    """The last `keep` characters of a UID (UIDs of one site share long prefixes).

    Args:
        uid: a DICOM UID.
        keep: how many trailing characters to keep.

    Returns:
        ``..`` followed by the tail of the UID, or the UID itself when it is short.
    """
    return uid if len(uid) <= keep + 2 else ".." + uid[-keep:]


def printable(text: str) -> str:
    """`text` with every character that is not printable (control characters, line breaks) as ``?``.

    Args:
        text: a header value, e.g. a description or UID as a broken exporter wrote it.

    Returns:
        the text, safe to show on one line.
    """
    return "".join(c if c.isprintable() else "?" for c in text)


def _one_line(err: BaseException) -> str:
    """An exception as one line: its type and every line of its message (decoder errors span several)."""
    return printable(error_summary(err, typed=True, joined=True, limit=300))


def _mm(value: float) -> str:
    return f"{value:.3g}"
