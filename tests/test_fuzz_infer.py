"""Property-based fuzzing of `medmtl infer` on damaged DICOM series (hypothesis).

A tiny phantom export holds two series: "T1 fuzz" (stored uncompressed, RLE, JPEG-LS, or as one Legacy
Converted Enhanced MR file, its frames placed by per-frame functional groups) and "T1 control".
Each example copies it, damages files of the fuzz series, either in header values (geometry, size, bit
depth, rescale, UIDs, transfer syntax; NaN, infinities, text in numeric tags, wrong lengths, deleted tags:
written raw, as a broken exporter would) or in raw bytes (truncation, overwritten bytes in the header or
in the pixel data), and runs `medmtl infer` in-process with an untrained, very small phantom model.

Properties, whatever the damage:
- `main` returns (0 or 1): no exception escapes, nothing on stderr looks like a traceback;
- every failure is one line that names the input and says what is wrong (a `MedmtlError`, never
  "unexpected error");
- under OUT there is exactly one folder per input reported done, each complete (seg.nii.gz, seg.dcm,
  report.json, all readable and consistent); nothing for a failed input, no staging leftovers;
- the control series is always segmented: one bad series never stops the others;
- no patient identifier is printed.

Bounded: 40 examples per test (MEDMTL_FUZZ_EXAMPLES=500 for a longer campaign), no deadline (the machine is
shared), no example database written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
import warnings
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.tag import Tag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)

from medmtl.cli import main
from medmtl.data.synthetic import StudyInfo, write_dicom_series
from medmtl.engine.checkpoint import atomic_torch_save
from medmtl.inference.batch import OUTPUT_MARKER, load_inference_config
from medmtl.networks import MultiTaskUNet

REPO_ROOT = Path(__file__).resolve().parents[1]
PHANTOM = REPO_ROOT / "bundles" / "phantom_mtl"
# a very small network and window: the fuzzer is about inputs, not accuracy
TINY = {
    "network_args#filters": [4, 4, 4],
    "network_args#strides": [1, 2, 2],
    "pipeline#patch_size": [16, 16, 16],
    "sw_batch_size": 1,
}
STUDY = StudyInfo(
    uid_seed="test_fuzz_infer",
    patient_name="FUZZ^PATIENT",
    patient_id="FUZZ0042",
    patient_birth_date="19650303",
    accession_number="FZACC7",
)
IDENTIFIERS = ("FUZZ^PATIENT", "FUZZ0042", "19650303", "FZACC7")
SLICES = 10
STORAGES = ["native", "rle", "jpegls", "enhanced"]
# DICOM SEG of a multi-frame source is not written yet (medmtl.inference.writers): enhanced runs skip it
FORMATS = {"enhanced": "nifti,report"}
FUZZ_SETTINGS = settings(
    max_examples=int(os.environ.get("MEDMTL_FUZZ_EXAMPLES", "40")),
    deadline=None,
    database=None,  # nothing written into the repository
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# header attributes a broken exporter gets wrong, and what they hold
KEYWORDS = [
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "SliceThickness",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "NumberOfFrames",
    "RescaleSlope",
    "RescaleIntercept",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
    "SOPInstanceUID",
    "InstanceNumber",
    "SeriesDescription",
    "Modality",
    "SpecificCharacterSet",
]
SYNTAXES = [
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    "1.2.3.4.5",
]

# -- value strategies: the bytes of one element, as written raw

_number_words = st.sampled_from(["", " ", "nan", "NaN", "inf", "-inf", "1e400", "-1e400", "abc", "1,5", "0", "-0"])
_number_text = st.one_of(
    _number_words,
    st.integers(-(10**12), 10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.floats(-1e3, 1e3).map(lambda v: f"{v:.6g}"),
)
_numbers = st.lists(_number_text, min_size=0, max_size=7).map("\\".join).map(lambda s: s.encode("latin-1"))
_binary_ints = st.one_of(
    st.lists(st.integers(0, 65535), min_size=0, max_size=3).map(lambda v: struct.pack(f"<{len(v)}H", *v)),
    st.binary(max_size=5),  # odd and wrong lengths
)
_texts = st.one_of(
    st.text(max_size=24).map(lambda s: s.encode("utf-8")),
    st.binary(max_size=24),
    st.sampled_from([b"", b"1.2.840.10008.999", b"MONOCHROME1", b"RGB", b"PALETTE COLOR", b"CT", b"ISO_IR 192"]),
)


def _raw_value(vr: str) -> st.SearchStrategy[bytes]:
    if vr in ("DS", "IS"):
        return _numbers
    if vr in ("US", "UL", "SS", "SL"):
        return _binary_ints
    return _texts


@st.composite
def header_damage(draw) -> tuple:
    """(file index, keyword, raw value or None to delete it)."""
    keyword = draw(st.sampled_from(KEYWORDS))
    value = draw(st.one_of(st.none(), _raw_value(dictionary_VR(keyword))))
    return ("header", draw(st.integers(0, SLICES - 1)), keyword, value)


@st.composite
def syntax_damage(draw) -> tuple:
    """(file index, TransferSyntaxUID that does not describe how the file is written)."""
    return ("syntax", draw(st.integers(0, SLICES - 1)), draw(st.sampled_from(SYNTAXES)))


@st.composite
def byte_damage(draw) -> tuple:
    """(file index, truncation point) or (file index, region, where, replacement bytes)."""
    index = draw(st.integers(0, SLICES - 1))
    if draw(st.booleans()):
        return ("truncate", index, draw(st.floats(0.0, 0.999)))
    region = draw(st.sampled_from(["header", "pixels"]))
    return ("overwrite", index, region, draw(st.floats(0.0, 0.999)), draw(st.binary(min_size=1, max_size=8)))


# -- applying damage


def _pixel_data_offset(data: bytes) -> int:
    """Where the PixelData element starts (its tag), or the end of the file."""
    at = data.rfind(b"\xe0\x7f\x10\x00")
    return at if at > 0 else len(data)


def _set_raw(path: Path, keyword: str, value: bytes | None) -> None:
    try:
        ds = pydicom.dcmread(path)
    except Exception:  # an earlier damage made it unreadable to pydicom too: it stays as damaged as it is
        return
    tag = Tag(tag_for_keyword(keyword))
    if value is None:
        if tag in ds:
            del ds[tag]
    else:
        ds[tag] = RawDataElement(tag, dictionary_VR(keyword), len(value), value, 0, False, True)
    try:
        ds.save_as(path)
    except Exception:  # pydicom will not write it (e.g. after a transfer syntax swap): keep the earlier damage
        return


def _set_transfer_syntax(path: Path, uid: str) -> None:
    """Rewrite the file meta with another TransferSyntaxUID; the data set bytes stay as they are."""
    data = path.read_bytes()
    try:
        meta = pydicom.filereader.read_file_meta_info(path)
        end = 132 + 12 + int(meta.FileMetaInformationGroupLength)  # preamble, DICM, group length element
    except Exception:  # damaged before: leave it
        return
    meta.TransferSyntaxUID = uid
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_file_meta_info(buffer, meta, enforce_standard=True)
    path.write_bytes(data[:128] + b"DICM" + buffer.getvalue() + data[end:])


def _damage(files: list[Path], damage: tuple) -> None:
    kind, index, *args = damage
    path = files[index % len(files)]  # an enhanced series is one file
    if kind == "header":
        _set_raw(path, *args)
    elif kind == "syntax":
        _set_transfer_syntax(path, *args)
    elif kind == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: int(args[0] * len(data))])
    else:
        region, where, replacement = args
        data = bytearray(path.read_bytes())
        pixels = _pixel_data_offset(bytes(data))
        low, high = (132, pixels) if region == "header" else (pixels, len(data))
        at = low + int(where * max(high - low - len(replacement), 0))
        data[at : at + len(replacement)] = replacement
        path.write_bytes(bytes(data))


# -- the export and the model


def _series(folder: Path, description: str, number: int, syntax: str | None) -> list[Path]:
    image = np.random.default_rng(number).uniform(100.0, 1000.0, (12, 11, SLICES))
    files = write_dicom_series(
        image, np.diag([0.9, 1.1, 1.5, 1.0]), folder, study=STUDY, series_description=description,
        series_number=number,
    )  # fmt: skip
    if syntax is not None:
        for path in files:
            ds = pydicom.dcmread(path)
            ds.compress(syntax)
            ds.save_as(path)
    return files


@pytest.fixture(scope="module")
def templates(tmp_path_factory) -> dict[str, Path]:
    """Exports by storage of the fuzz series: ``<export>/fuzz`` (damaged) and ``<export>/control``."""
    root = tmp_path_factory.mktemp("templates")
    exports = {}
    for name, syntax in (("native", None), ("rle", RLELossless), ("jpegls", JPEGLSLossless)):
        _series(root / name / "fuzz", "T1 fuzz", 1, syntax)
        _series(root / name / "control", "T1 control", 2, None)
        exports[name] = root / name
    classic = [pydicom.dcmread(f) for f in _series(root / "classic", "T1 fuzz", 1, None)]
    enhanced = hd.legacy.LegacyConvertedEnhancedMRImage(
        classic, series_instance_uid=hd.UID(), series_number=1, sop_instance_uid=hd.UID(), instance_number=1
    )
    (root / "enhanced" / "fuzz").mkdir(parents=True)
    enhanced.save_as(root / "enhanced" / "fuzz" / "enhanced.dcm")
    _series(root / "enhanced" / "control", "T1 control", 2, None)
    exports["enhanced"] = root / "enhanced"
    return exports


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared small machine, threads of a tiny network only wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    args = load_inference_config(PHANTOM, TINY).get_parsed_content("network_args")
    torch.manual_seed(0)
    return atomic_torch_save(MultiTaskUNet(**args).state_dict(), tmp_path_factory.mktemp("m") / "model.pt")


def _infer(export: Path, out: Path, model: Path, formats: str | None = None) -> int:
    args = [arg for key, value in TINY.items() for arg in ("--set", f"{key}={value}")]
    args += ["--formats", formats] if formats else []
    return main(["infer", str(export), "--bundle", str(PHANTOM), "--model", str(model), "--output", str(out), *args])


# -- the properties


def _check_run(code: int, out: Path, stdout: str, stderr: str, formats: str | None = None) -> list[str]:
    """Assert the properties of one run; returns the names of the inputs done."""
    outputs = ["report.json", "seg.dcm", "seg.nii.gz"] if formats is None else ["report.json", "seg.nii.gz"]
    assert code in (0, 1), stderr
    assert "Traceback" not in stdout + stderr
    for value in IDENTIFIERS:
        assert value not in stdout + stderr, "a patient identifier was printed"
    # the summary closes the output: a headline, then one line per input (a reason never spans lines)
    lines = stdout.splitlines()
    (start,) = [i for i, line in enumerate(lines) if re.match(r"\d+ input\(s\) done, \d+ failed; ", line)]
    done_count, failed_count = (int(n) for n in re.findall(r"\d+", lines[start])[:2])
    done = {}
    failed = []
    warned = {}  # a DICOM SEG that a damaged header prevents: the input is done without it
    for line in lines[start + 1 :]:
        if line.startswith("  done    "):
            name, files = line[len("  done    ") :].split("/ (", 1)
            done[name] = sorted(files.rstrip(")").split(", "))
        elif line.startswith("  warning "):
            name, warning = line[len("  warning ") :].split(": ", 1)
            assert name in done and warning.startswith("seg.dcm not written: "), line
            warned[name] = warning
        else:
            assert line.startswith("  failed  "), line
            failed.append(line[len("  failed  ") :])
    assert (len(done), len(failed)) == (done_count, failed_count)
    assert (code == 0) == (not failed and not warned)
    for reason in failed:
        assert "unexpected error" not in reason, reason
        assert reason.startswith(("series '", str(out.parent))), reason  # names the input
    assert any(name.startswith("2_T1_control_") for name in done), stdout
    # exactly the finished inputs, complete; nothing for a failed one, no staging folder left behind
    present = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert present == sorted(done), (present, stdout)
    for name, files in done.items():
        folder = out / name
        expected = [f for f in outputs if not (name in warned and f == "seg.dcm")]
        assert files == expected and sorted(p.name for p in folder.iterdir()) == [OUTPUT_MARKER, *expected]
        report = json.loads((folder / "report.json").read_text())
        assert report["outputs"] == expected
        label = np.asarray(nib.load(folder / "seg.nii.gz").dataobj)
        assert list(label.shape) == report["input"]["shape"] and label.max() <= 2
        if "seg.dcm" in expected:
            seg = pydicom.dcmread(folder / "seg.dcm")
            assert seg.Modality == "SEG"
            assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == report["input"]["series_uid"]
    return sorted(done)


def _run_damaged(templates: dict[str, Path], storage: str, damages: list[tuple], model: Path, capsys) -> list[str]:
    capsys.readouterr()
    with tempfile.TemporaryDirectory() as tmp:
        export = Path(tmp) / "export"
        shutil.copytree(templates[storage], export)
        files = sorted((export / "fuzz").iterdir())
        with warnings.catch_warnings():  # pydicom's complaints about the damage it is asked to write
            warnings.simplefilter("ignore")
            for damage in damages:
                _damage(files, damage)
        out = Path(tmp) / "out"
        code = _infer(export, out, model, FORMATS.get(storage))
        captured = capsys.readouterr()
        return _check_run(code, out, captured.out, captured.err, FORMATS.get(storage))


@pytest.mark.parametrize("storage", STORAGES)
def test_undamaged_export_segments_both_series(templates, tiny_model, capsys, storage):
    done = _run_damaged(templates, storage, [], tiny_model, capsys)
    assert len(done) == 2 and done[0].startswith("1_T1_fuzz_")


@FUZZ_SETTINGS
@given(
    storage=st.sampled_from(STORAGES),
    damages=st.lists(st.one_of(header_damage(), header_damage(), syntax_damage()), min_size=1, max_size=3),
)
def test_header_damage_never_escapes(templates, tiny_model, capsys, storage, damages):
    _run_damaged(templates, storage, damages, tiny_model, capsys)


@FUZZ_SETTINGS
@given(
    storage=st.sampled_from(STORAGES),
    damages=st.lists(byte_damage(), min_size=1, max_size=3),
)
def test_byte_damage_never_escapes(templates, tiny_model, capsys, storage, damages):
    _run_damaged(templates, storage, damages, tiny_model, capsys)
