"""Loading one discovered DICOM series as a volume: `load_series`, through MONAI's `LoadImage`, as a float32
MetaTensor in RAS.

A slice is one frame: a classic file holds one, an enhanced (multi-frame) file such as Enhanced MR holds many.
Pixel data in any transfer syntax that pydicom and the installed decoders read (JPEG, JPEG-LS, JPEG 2000, RLE,
big endian) loads; what cannot be decoded, colour images, invalid geometry or rescale values are refused with a
message naming the series and the file. pydicom warnings are silenced while reading because they can quote tag
values, patient names included.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pydicom
from monai.data import MetaTensor, PydicomReader
from monai.data.utils import orientation_ras_lps
from monai.transforms import LoadImage
from monai.utils import MetaKeys, ensure_tuple
from pydicom.pixels import apply_modality_lut
from pydicom.uid import (
    RLELossless,
)

from medmtl.data.dicom.headers import _plane, _read_dataset, _rescale, _slice_normal, _slice_thickness
from medmtl.data.dicom.info import NOT_DATA_ERRORS, SeriesInfo, _one_line
from medmtl.errors import MedmtlError
from medmtl.quiet import MONAI_READER_NOISE, silenced


class DicomSeriesReader(PydicomReader):
    """A MONAI reader that reads a list of DICOM slices as one series, in the order given.

    `PydicomReader` sorts a folder by InstanceNumber and stacks a list of files as channels; this reader
    stacks the given slices (already ordered along the slice normal by `discover_series`) along the last
    axis and lets MONAI build the RAS affine from the first and last slice positions. A slice is a classic
    file, or one frame of a multi-frame file (`frames`, as `SeriesInfo.frame_numbers`), placed by its
    functional groups. Stored values are mapped through RescaleSlope/Intercept (per frame: the Pixel Value
    Transformation macro) or a Modality LUT. With `swap_ij` the array is (columns, rows, slices).

    Args:
        series_label: how error messages name the series.
        frames: for each file given to `read`, its 0-based frame; empty when all files are classic images.
    """

    def __init__(self, series_label: str = "series", frames: Sequence[int] = ()) -> None:
        super().__init__(channel_dim="no_channel", affine_lps_to_ras=True, swap_ij=True, prune_metadata=True)
        self.series_label = series_label
        self.frames = list(frames)

    def read(self, data: Sequence[os.PathLike | str] | os.PathLike | str, **kwargs) -> list[pydicom.Dataset]:
        """Read every file of the series with its pixel data (a multi-frame file once).

        Args:
            data: the files of one series, one per slice, in slice order.
            kwargs: additional arguments for `pydicom.dcmread`.

        Returns:
            One dataset per slice (the frames of one file share its dataset).
        """
        files = [str(f) for f in ensure_tuple(data)]
        if self.frames and len(self.frames) != len(files):
            raise MedmtlError(f"{self.series_label}: {len(files)} files but {len(self.frames)} frame numbers")
        read: dict[str, pydicom.Dataset] = {}
        with silenced("pydicom"):
            for name in files:
                if name in read:
                    continue
                try:
                    read[name] = _read_dataset(name, **{**self.kwargs, **kwargs})
                except Exception as err:  # corrupt files raise many types; all mean "unreadable"
                    raise MedmtlError(
                        f"{self.series_label}: {name}: not a readable DICOM file ({type(err).__name__})"
                    ) from None
        self.has_series = True  # makes `get_data` combine the datasets as one series
        self.filenames = [files]
        return [read[name] for name in files]

    def _combine_dicom_series(self, data, filenames):  # noqa: ANN001 - MONAI's signature
        """Stack the slices in the order given (MONAI's version re-sorts by InstanceNumber)."""
        datasets = list(data)
        frames = self.frames or [None] * len(datasets)
        decoded: dict[int, np.ndarray] = {}  # one decode per file, however many of its frames are slices
        arrays = []
        for ds, name, frame in zip(datasets, filenames, frames, strict=True):
            if id(ds) not in decoded:
                decoded[id(ds)] = self._stored_frames(ds, name)
            stored = decoded[id(ds)]
            if (frame or 0) >= len(stored):
                raise MedmtlError(f"{self.series_label}: {name}: has no frame {(frame or 0) + 1}")
            arrays.append(self._modality_values(stored[frame or 0], ds, frame, name))
        if len({a.shape for a in arrays}) > 1:
            raise MedmtlError(f"{self.series_label}: slices have different sizes")
        first, last = _plane(datasets[0], frames[0]), _plane(datasets[-1], frames[-1])
        if first[0] is None or first[1] is None or first[2] is None or last[0] is None:
            raise MedmtlError(
                f"{self.series_label}: {filenames[0]}: no valid ImagePositionPatient, ImageOrientationPatient "
                "or PixelSpacing (changed since discovery?)"
            )
        metadata: dict[str, Any] = {
            "00200032": {"vr": "DS", "Value": list(first[0])},
            "00200037": {"vr": "DS", "Value": list(first[1])},
            "00280030": {"vr": "DS", "Value": list(first[2])},
            "spacing": np.asarray(list(first[2]) + [_slice_thickness(datasets[0], frames[0])]),
        }
        if len(datasets) > 1:
            metadata["lastImagePositionPatient"] = np.asarray(last[0], float)
        metadata[MetaKeys.SPATIAL_SHAPE] = arrays[0].shape + (len(arrays),)
        return np.stack(arrays, axis=-1), metadata

    def _stored_frames(self, ds: pydicom.Dataset, filename: str) -> np.ndarray:
        """Decoded stored values, (frames, rows, columns); a decoding failure names the file."""
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if syntax == RLELossless:
            # pydicom's own RLE decoder: it raises on corrupt data where pylibjpeg-rle (Rust) panics and
            # prints a Rust backtrace on stderr; ~10 ms a 512x512 slice, little beside the inference
            ds.pixel_array_options(decoding_plugin="pydicom")
        try:
            with silenced("pydicom"):
                stored = np.asarray(ds.pixel_array)
        except BaseException as err:  # pixel decoders raise many types (truncated data, missing codec, panics)
            if isinstance(err, NOT_DATA_ERRORS):
                raise
            raise MedmtlError(
                f"{self.series_label}: {filename}: cannot read pixel data ({_one_line(err)})"
            ) from None
        if stored.ndim == 2:
            stored = stored[None]
        if stored.ndim != 3:
            shape = tuple(stored.shape)
            raise MedmtlError(f"{self.series_label}: {filename}: pixel data of shape {shape} is not grey")
        return stored

    def _modality_values(
        self, stored: np.ndarray, ds: pydicom.Dataset, frame: int | None, name: str
    ) -> np.ndarray:
        """One slice in modality units (e.g. Hounsfield), float32."""
        if frame is None and "ModalityLUTSequence" in ds and "RescaleSlope" not in ds:
            try:
                return np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)
            except Exception as err:  # a malformed lookup table
                raise MedmtlError(
                    f"{self.series_label}: {name}: invalid ModalityLUTSequence ({_one_line(err)})"
                ) from None
        rescale = _rescale(ds, frame)
        if isinstance(rescale, str):
            raise MedmtlError(f"{self.series_label}: {name}: {rescale}")
        slope, intercept = rescale
        values = stored.astype(np.float32)
        if (slope, intercept) != (1.0, 0.0):
            values = values * np.float32(slope) + np.float32(intercept)
        return values

    def _get_affine(self, metadata: dict, lps_to_ras: bool = True) -> np.ndarray:
        """MONAI's affine; for a single slice the third column is the normal times the slice thickness."""
        affine = super()._get_affine(metadata, lps_to_ras=False)
        shape = metadata.get(MetaKeys.SPATIAL_SHAPE, ())
        if len(shape) == 3 and shape[-1] == 1 and "00200037" in metadata:
            affine[:3, 2] = _slice_normal(metadata["00200037"]["Value"]) * metadata["spacing"][2]
        return orientation_ras_lps(affine) if lps_to_ras else affine


@functools.cache
def _loader() -> LoadImage:
    """One LoadImage for the process; building it instantiates MONAI's default readers."""
    # NvImgCodecPydicomReader warns and logs on every construction when nvImageCodec is absent (CPU setups)
    with silenced("pydicom", MONAI_READER_NOISE):
        return LoadImage(reader=DicomSeriesReader, image_only=True, dtype=np.float32)


def load_series(series: SeriesInfo, min_slices: int = 1) -> MetaTensor:
    """Load one series as a volume through MONAI's `LoadImage`.

    Args:
        series: a series from `discover_series` (its slices ordered along the slice normal).
        min_slices: fewest slices accepted (2 or more where a volume is required).

    Returns:
        A float32 MetaTensor of shape (columns, rows, slices): i along the rows of a slice, j down its
        columns, k along the slice normal, with the RAS affine in ``meta["affine"]``, ``original_channel_dim``
        ``"no_channel"`` and ``filename_or_obj`` the series folder. Values are stored values mapped through
        the rescale (or Modality LUT) of each slice.

    Raises:
        MedmtlError: naming the series (and the file at fault) when it cannot be one volume: problems found by
            discovery (gaps, duplicate positions, mixed sizes or orientations, unreadable files, colour,
            multi-frame files without frame positions, invalid geometry), too few slices, pixel data that
            cannot be decoded or invalid rescale values.
    """
    if series.problems:
        raise MedmtlError(f"{series.label}: cannot load as one volume: {'; '.join(series.problems)}")
    if series.num_slices < max(1, min_slices):
        raise MedmtlError(
            f"{series.label}: {series.num_slices} slice(s), at least {max(1, min_slices)} needed for a volume"
        )
    reader = DicomSeriesReader(series_label=series.label, frames=series.frame_numbers)
    try:
        # the reader given to the call is the only one tried: a MedmtlError reaches the caller unchanged
        # instead of LoadImage falling back to its other readers and raising its own RuntimeError
        with silenced("pydicom"):
            image = _loader()([str(f) for f in series.files], reader=reader)
    except MedmtlError:
        raise
    except Exception as err:  # MONAI's affine checks and header values discovery could not foresee
        raise MedmtlError(f"{series.label}: cannot load as one volume ({_one_line(err)})") from None
    image.meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = "no_channel"
    image.meta["filename_or_obj"] = str(series.folder)
    return image
