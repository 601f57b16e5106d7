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

import numpy as np
import pydicom
from highdicom.spatial import create_affine_matrix_from_attributes
from monai.data import ImageReader, MetaTensor
from monai.data.utils import affine_to_spacing, orientation_ras_lps
from monai.transforms import LoadImage
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple
from pydicom.pixels import apply_modality_lut
from pydicom.uid import (
    RLELossless,
)

from medmtl.data.dicom.headers import _plane, _read_dataset, _rescale, _slice_thickness
from medmtl.data.dicom.info import NOT_DATA_ERRORS, SeriesInfo, _one_line
from medmtl.errors import MedmtlError
from medmtl.quiet import MONAI_READER_NOISE, silenced


class DicomSeriesReader(ImageReader):
    """A MONAI reader that reads a list of DICOM slices as one series, in the order given.

    Built on MONAI's public `ImageReader` interface: `PydicomReader` sorts a folder by InstanceNumber and
    stacks a list of files as channels, and changing that would mean overriding its private methods. This
    reader stacks the given slices (already ordered along the slice normal by `discover_series`) along the
    last axis as (columns, rows, slices). The in-plane affine and a single slice's extent come from
    highdicom's `create_affine_matrix_from_attributes`; the slice step is the first-to-last position over
    the slice count, as MONAI's reader takes it; MONAI's `orientation_ras_lps` turns it to RAS. A slice is a
    classic file, or one frame of a multi-frame file (`frames`, as `SeriesInfo.frame_numbers`), placed by its
    functional groups. Stored values are mapped through RescaleSlope/Intercept (per frame: the Pixel Value
    Transformation macro) or a Modality LUT.

    Args:
        series_label: how error messages name the series.
        frames: for each file given to `read`, its 0-based frame; empty when all files are classic images.
    """

    def __init__(self, series_label: str = "series", frames: Sequence[int] = ()) -> None:
        super().__init__()
        self.series_label = series_label
        self.frames = list(frames)
        self.filenames: list[str] = []

    def verify_suffix(self, filename: Sequence[os.PathLike | str] | os.PathLike | str) -> bool:
        """Any file: this reader is only ever given, explicitly, the files of one discovered series."""
        return True

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
                    read[name] = _read_dataset(name, **kwargs)
                except Exception as err:  # corrupt files raise many types; all mean "unreadable"
                    raise MedmtlError(
                        f"{self.series_label}: {name}: not a readable DICOM file ({type(err).__name__})"
                    ) from None
        self.filenames = files
        return [read[name] for name in files]

    def get_data(self, img: Sequence[pydicom.Dataset]) -> tuple[np.ndarray, dict]:
        """Stack the slices in the order given, in modality values, with their RAS affine.

        Args:
            img: the datasets from `read`, one per slice.

        Returns:
            (float32 array of shape (columns, rows, slices), metadata with ``affine``, ``original_affine``,
            ``spatial_shape``, ``spacing``, ``space`` and ``original_channel_dim``).
        """
        datasets, filenames = list(img), self.filenames
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
        # (rows, columns, slices) -> (columns, rows, slices): i along a row, as the affine's first column
        volume = np.ascontiguousarray(np.swapaxes(np.stack(arrays, axis=-1), 0, 1))
        affine = create_affine_matrix_from_attributes(
            first[0], first[1], first[2], spacing_between_slices=_slice_thickness(datasets[0], frames[0]),
            index_convention=("R", "D"), slices_first=False,
        )  # fmt: skip
        if len(arrays) > 1:  # the step between slice positions, as MONAI's readers take it
            affine[:3, 2] = (np.asarray(last[0], float) - np.asarray(first[0], float)) / (len(arrays) - 1)
        affine = orientation_ras_lps(affine)
        meta = {
            MetaKeys.AFFINE: affine,
            MetaKeys.ORIGINAL_AFFINE: affine.copy(),
            MetaKeys.SPATIAL_SHAPE: volume.shape,
            MetaKeys.SPACE: SpaceKeys.RAS,
            MetaKeys.ORIGINAL_CHANNEL_DIM: "no_channel",
            "spacing": affine_to_spacing(affine, r=3),
            # the first slice's geometry tags, as MONAI's PydicomReader leaves them in the metadata
            "00200032": {"vr": "DS", "Value": list(first[0])},
            "00200037": {"vr": "DS", "Value": list(first[1])},
            "00280030": {"vr": "DS", "Value": list(first[2])},
        }
        if len(arrays) > 1:
            meta["lastImagePositionPatient"] = np.asarray(last[0], float)
        return volume, meta

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
    except Exception as err:  # the affine's checks (highdicom) and header values discovery could not foresee
        raise MedmtlError(f"{series.label}: cannot load as one volume ({_one_line(err)})") from None
    image.meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = "no_channel"
    image.meta["filename_or_obj"] = str(series.folder)
    return image
