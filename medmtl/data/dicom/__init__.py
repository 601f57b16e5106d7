"""DICOM series discovery, selection and loading.

A scanner export is a tree of files with arbitrary names. `discover_series` (`discover`, with the header
reading in `headers`) reads the headers, groups the files by SeriesInstanceUID, orders each series along the
normal of ImageOrientationPatient and records what would stop it from being one regular volume (gaps,
duplicate positions, mixed sizes, ...). `SeriesRule` and `select_series` (`select`) pick series by modality,
description, size or UID; `format_series_table` (`table`) shows them; `load_series` (`load`) reads one series
through MONAI's `LoadImage` as a float32 MetaTensor in RAS. `SeriesInfo` (`info`) holds what is known of a
series.

A slice is one frame: a classic file holds one, an enhanced (multi-frame) file such as Enhanced MR holds many,
each placed by its per-frame functional groups (PS3.3 C.7.6.16: Plane Position, Plane Orientation, Pixel
Measures and Pixel Value Transformation, per-frame items before shared ones). Frames of a multi-frame file are
slices like any other: sorted along the normal and checked for gaps the same way. Pixel data in any transfer
syntax that pydicom and the installed decoders read (JPEG, JPEG-LS, JPEG 2000, RLE, big endian) loads; what
cannot be decoded, colour images, multi-frame files without per-frame positions, invalid geometry or rescale
values are refused with a message naming the series and the file.

Only header facts without patient identifiers are kept (`SeriesInfo`); pydicom warnings are silenced while
reading because they can quote tag values, patient names included.
"""

from medmtl.data.dicom.discover import ORIENTATION_TOL, POSITION_TOL_MM, discover_series
from medmtl.data.dicom.headers import UNIT_TOL
from medmtl.data.dicom.info import NOT_DATA_ERRORS, SeriesInfo, printable, short_uid
from medmtl.data.dicom.load import DicomSeriesReader, load_series
from medmtl.data.dicom.select import SeriesRule, select_series
from medmtl.data.dicom.table import format_series_table, orientation_label

__all__ = [
    "NOT_DATA_ERRORS",
    "ORIENTATION_TOL",
    "POSITION_TOL_MM",
    "UNIT_TOL",
    "DicomSeriesReader",
    "SeriesInfo",
    "SeriesRule",
    "discover_series",
    "format_series_table",
    "load_series",
    "orientation_label",
    "printable",
    "select_series",
    "short_uid",
]
