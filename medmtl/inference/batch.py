"""The batch run behind `medmtl infer` and the bundles' inference.yaml: find inputs, predict, write, report.

INPUT may be a NIfTI file, a folder of NIfTI files (top level), one DICOM series folder or a whole export tree
with many studies and series (found with `discover_series`, chosen with `select_series` and a `SeriesRule`,
by default the bundle's ``metadata.json`` ``"input_series"``). Every selected input is processed in turn; a
bad one is recorded with a one-line reason that names it (file path, or series description and short UID)
and the run goes on with the others.

Each input gets one folder ``OUT/<name>/`` (name: the NIfTI file stem, or ``<SeriesNumber>_<description>_<UID
tail>`` for a series, made safe by `safe_name`) holding ``seg.nii.gz``, ``seg.dcm`` (DICOM SEG, DICOM inputs
only), ``probabilities.nii.gz`` and ``boundary.nii.gz`` (with ``save_maps``; channels last) and
``report.json``, and a hidden ``.medmtl-output`` marker. The files are written into a hidden staging folder
beside it and the folder is renamed into place at the end, so an input that fails leaves nothing behind.
Nothing is written inside the input tree, and nothing the run did not write is ever replaced: an existing
``OUT/<name>`` makes that input fail with one line, and ``overwrite`` replaces only an earlier medmtl output
(a folder holding the marker, or an earlier version's ``report.json``, and nothing but output files). Each
format is written on its own: one that cannot be written (a DICOM SEG of a source with broken patient
attributes) is a warning in the report and the summary, and the others stay.

No patient identifier (PatientName, PatientID, PatientBirthDate, AccessionNumber) is read into names,
messages or reports: series are named by their description, number and UID.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

import medmtl
from medmtl.data.checks import read_error_text
from medmtl.data.dicom import (
    NOT_DATA_ERRORS,
    SeriesInfo,
    SeriesRule,
    discover_series,
    load_series,
    select_series,
)
from medmtl.data.plausibility import dtype_problem
from medmtl.errors import MedmtlError, error_summary, medmtl_cause, printable_console
from medmtl.inference.predictor import Prediction, Predictor
from medmtl.inference.writers import label_volumes_ml, safe_name, write_dicom_seg, write_nifti, write_report
from medmtl.quiet import MONAI_READER_NOISE, silenced

__all__ = [
    "FORMATS",
    "InputItem",
    "Outcome",
    "BatchSummary",
    "series_rule",
    "merge_series_rule",
    "parse_formats",
    "find_inputs",
    "process_input",
    "run_batch",
    "exit_on_failure",
    "load_inference_config",
    "build_from_config",
]

FORMATS = ("nifti", "dicom-seg", "report")
EXIT_FAILED = 1  # as medmtl.cli: the run went through but some inputs failed
OUTPUT_MARKER = ".medmtl-output"  # in every output folder: what `overwrite` may replace
# every file medmtl writes into an output folder; a folder holding anything else is the user's
OUTPUT_FILES = frozenset({"seg.nii.gz", "seg.dcm", "probabilities.nii.gz", "boundary.nii.gz", "report.json"})
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


@dataclass
class Outcome:
    """The result of one input: its output folder and files, or why it failed."""

    label: str
    name: str | None = None
    folder: Path | None = None
    files: list[str] = field(default_factory=list)
    reason: str | None = None
    seconds: float = 0.0
    volumes_ml: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # requested outputs that could not be written

    @property
    def ok(self) -> bool:
        """Whether the input was processed and (at least some of) its outputs written."""
        return self.reason is None


@dataclass
class BatchSummary:
    """What a batch run did: one `Outcome` per input (and per problem that stopped inputs being found)."""

    input_path: Path
    output_dir: Path
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def done(self) -> list[Outcome]:
        """Inputs processed, outputs written."""
        return [o for o in self.outcomes if o.ok]

    @property
    def failed(self) -> list[Outcome]:
        """Inputs (or the search for inputs) that failed."""
        return [o for o in self.outcomes if not o.ok]

    @property
    def ok(self) -> bool:
        """True when at least one input was processed, none failed and every requested output was written."""
        return bool(self.done) and not self.failed and not any(o.warnings for o in self.done)

    def format(self) -> str:
        """The summary in words: a headline, one line per output folder, one line per failure.

        Returns:
            text without a trailing newline.
        """
        lines = [f"{len(self.done)} input(s) done, {len(self.failed)} failed; outputs in {self.output_dir}"]
        for o in self.done:
            lines.append(f"  done    {o.name}/ ({', '.join(o.files)})")
            lines += [f"  warning {o.name}: {w}" for w in o.warnings]
        lines += [f"  failed  {o.reason}" for o in self.failed]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# options


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


def parse_formats(formats: str | Sequence[str] | None) -> list[str]:
    """Output formats from ``"nifti,dicom-seg,report"`` or a list.

    Args:
        formats: names among `FORMATS`; None means all.

    Returns:
        the formats, in `FORMATS` order.

    Raises:
        MedmtlError: an unknown or no format.
    """
    if formats is None:
        return list(FORMATS)
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    names = [str(f).strip().lower() for f in items if str(f).strip()]
    unknown = sorted(set(names) - set(FORMATS))
    if unknown or not names:
        raise MedmtlError(f"formats: {unknown or 'none given'}; choose from {', '.join(FORMATS)}")
    return [f for f in FORMATS if f in names]


# ---------------------------------------------------------------------------------------------------------
# inputs


def display_path(path: Path | str) -> str:
    """A path as text that can always be printed and written to JSON.

    File names are bytes on Linux; a name in another encoding (Latin-1 ``caf\\xe9.nii.gz``) reaches Python as
    lone surrogates, which no UTF-8 stream or file accepts. They are shown as ``\\xe9`` escapes.

    Args:
        path: the path.

    Returns:
        valid Unicode text, the same as ``str(path)`` for every UTF-8 name.
    """
    return os.fsencode(path).decode("utf-8", "backslashreplace")


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


def _check_output_dir(input_path: Path, output_dir: Path) -> None:
    """Refuse an output folder inside the input folder (or the input file itself)."""
    inp, out = input_path.resolve(), output_dir.resolve()
    if out == inp or (inp.is_dir() and inp in out.parents):
        raise MedmtlError(
            f"{output_dir}: the output folder is inside the input {input_path}; choose a folder outside it "
            "(inputs are never written to)"
        )
    if out.exists() and not out.is_dir():
        raise MedmtlError(f"{output_dir}: exists and is not a folder")


# ---------------------------------------------------------------------------------------------------------
# one input


@functools.cache
def _nifti_loader() -> Any:
    """One NIfTI loader for the process (building a LoadImage instantiates all of MONAI's readers)."""
    from monai.data import NibabelReader
    from monai.transforms import LoadImage

    with silenced(MONAI_READER_NOISE):
        return LoadImage(reader=NibabelReader(), image_only=True, ensure_channel_first=True, dtype=np.float32)


def _load(item: InputItem, predictor: Predictor) -> Any:
    if item.series is not None:
        # a 3D model needs a volume: refuse a series with too few slices before reading its pixels
        min_slices = predictor.min_slices if predictor.slice_axis is None and predictor.data_dims == 3 else 1
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
        cause = _innermost(err)
        raise MedmtlError(f"{item.label}: not a readable NIfTI file ({read_error_text(cause, item.path)})") from None


def _spacing(affine: np.ndarray, ndim: int) -> list[float]:
    return [round(float(v), 6) for v in np.linalg.norm(np.asarray(affine)[:ndim, :ndim], axis=0)]


def _input_report(item: InputItem, prediction: Prediction) -> dict[str, Any]:
    shape = list(prediction.label.shape)
    spacing = _spacing(prediction.affine, len(shape))
    if item.series is None:
        return {"type": "nifti", "path": display_path(item.path), "shape": shape, "spacing_mm": spacing}
    s = item.series
    return {
        "type": "dicom",
        "series_uid": s.series_uid,
        "series_number": s.series_number,
        "description": s.description,
        "modality": s.modality,
        "num_slices": s.num_slices,
        "shape": shape,
        "spacing_mm": spacing,
    }


def _write_outputs(
    item: InputItem,
    prediction: Prediction,
    folder: Path,
    formats: Sequence[str],
    save_maps: bool,
    bundle: Mapping[str, Any],
) -> tuple[list[str], list[str]]:
    """Write the requested files of one input into `folder`, each on its own.

    Returns:
        (names of the files written, one warning per requested file that could not be written).
    """
    jobs: list[tuple[str, Callable[[], Path]]] = []
    if "nifti" in formats:
        jobs.append(("seg.nii.gz", lambda: write_nifti(prediction.label, prediction.affine, folder / "seg.nii.gz",
                                                      dtype=np.uint8)))  # fmt: skip
    if save_maps and prediction.probabilities is not None:
        probs = np.moveaxis(prediction.probabilities, 0, -1)  # NIfTI: channels after the spatial axes
        jobs.append(("probabilities.nii.gz",
                     lambda: write_nifti(probs, prediction.affine, folder / "probabilities.nii.gz")))  # fmt: skip
    if save_maps and prediction.boundary is not None:
        boundary = np.moveaxis(prediction.boundary, 0, -1)
        jobs.append(("boundary.nii.gz",
                     lambda: write_nifti(boundary, prediction.affine, folder / "boundary.nii.gz")))  # fmt: skip
    if "dicom-seg" in formats and item.series is not None:
        name, version = str(bundle.get("name", "medmtl")), str(bundle.get("version", ""))
        jobs.append(("seg.dcm", lambda: write_dicom_seg(
            prediction.label, item.series, prediction.label_names, folder / "seg.dcm",
            algorithm_name=name, algorithm_version=version,
        )))  # fmt: skip
    written, warnings = [], []
    for name, write in jobs:
        try:
            written.append(write().name)
        except Exception as err:  # one format failing (a SEG of an odd source) must not lose the others
            if isinstance(err, NOT_DATA_ERRORS):
                raise
            reason = str(err) if isinstance(err, MedmtlError) else error_summary(err, typed=True)
            warnings.append(f"{name} not written: {reason}")
    return written, warnings


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


def _refuse_existing(item: InputItem, target: Path, overwrite: bool) -> None:
    """Fail this input when its output folder exists and may not be replaced."""
    if not (target.exists() or target.is_symlink()):
        return
    shown = display_path(target)
    if not is_medmtl_output(target):
        raise MedmtlError(
            f"{item.label}: {shown} exists and is not a medmtl output; it is left as it is "
            "(choose another --output, or move it)"
        )
    if not overwrite:
        raise MedmtlError(f"{item.label}: {shown} holds an earlier result; pass --overwrite to replace it")


def _publish(item: InputItem, staging: Path, target: Path, overwrite: bool) -> None:
    """Move a finished staging folder to `target`, replacing only an earlier medmtl result (with `overwrite`)."""
    _refuse_existing(item, target, overwrite)  # again: something may have appeared there while we computed
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
    try:
        os.rename(staging, target)  # fails on a folder that is not empty: nothing there is ever replaced
    except OSError as err:
        if old is not None:
            os.rename(old, target)
        raise MedmtlError(f"{item.label}: cannot move the outputs to {display_path(target)} ({err.strerror})") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def process_input(
    item: InputItem,
    predictor: Predictor,
    output_dir: Path,
    formats: Sequence[str] = FORMATS,
    save_maps: bool = False,
    bundle: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Outcome:
    """Load, predict and write one input; a failure is returned as an `Outcome` with a reason, never raised.

    Args:
        item: the input.
        predictor: the configured predictor.
        output_dir: OUT; the input's files go to ``OUT/<item.name>/``.
        formats: output formats (`FORMATS`).
        save_maps: also write the probability and boundary maps.
        bundle: ``{"name", "version"}`` of the bundle, for the report and the DICOM SEG.
        overwrite: replace an earlier medmtl output at ``OUT/<item.name>/`` (never anything else).

    Returns:
        the outcome: output folder and file names (and warnings for files that could not be written), or the
        one-line reason naming the input.
    """
    bundle = dict(bundle or {})
    start = time.perf_counter()
    target = output_dir / item.name
    staging = output_dir / f".{item.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        if target.resolve() == item.path.resolve() or target.resolve() in item.path.resolve().parents:
            raise MedmtlError(
                f"{item.label}: its output folder {target} would replace the input; choose another"
            )
        _refuse_existing(item, target, overwrite)  # before the work, not after it
        t0 = time.perf_counter()
        image = _load(item, predictor)
        timings = {"load": time.perf_counter() - t0}
        prediction = predictor.predict(image, name=item.label)
        del image
        timings.update(prediction.timings)

        t0 = time.perf_counter()
        staging.mkdir(parents=True)
        files, warnings = _write_outputs(item, prediction, staging, formats, save_maps, bundle)
        volumes = label_volumes_ml(prediction.label, prediction.affine, prediction.label_names)
        timings["write"] = time.perf_counter() - t0
        if "report" in formats:
            report = {
                "input": _input_report(item, prediction),
                "bundle": {"name": bundle.get("name"), "version": bundle.get("version")},
                "medmtl_version": medmtl.__version__,
                "settings": predictor.settings(),
                "outputs": sorted(files + ["report.json"]),
                "voxel_volume_ml": abs(float(np.linalg.det(prediction.affine[:3, :3]))) / 1000.0,
                "volumes_ml": volumes,
                "class_probabilities": prediction.class_probabilities,
                "timings_s": {k: round(v, 4) for k, v in timings.items()},
                "warnings": prediction.warnings + warnings,
            }
            try:
                files.append(write_report(report, staging / "report.json").name)
            except MedmtlError as err:
                warnings.append(f"report.json not written: {err}")
        if not files:
            raise MedmtlError("; ".join(warnings) or "no output format applies to this input")
        (staging / OUTPUT_MARKER).write_text(f"medmtl {medmtl.__version__}\n", encoding="utf-8")
        _publish(item, staging, target, overwrite)
        return Outcome(
            item.label, item.name, target, files, seconds=time.perf_counter() - start, volumes_ml=volumes,
            warnings=warnings,
        )  # fmt: skip
    except MedmtlError as err:
        reason = str(err)
    except BaseException as err:  # one bad input must never stop the others (torch errors, out of memory, ...)
        if isinstance(err, NOT_DATA_ERRORS):  # Ctrl-C and exits stop the run; decoder panics do not
            raise
        reason = f"unexpected error ({error_summary(err, typed=True)})"
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    if not reason.startswith(item.label):
        reason = f"{item.label}: {reason}"
    return Outcome(item.label, item.name, reason=reason, seconds=time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------------------
# the run


def _say(text: str, bar: Any, stream: Any = None) -> None:
    stream = stream or sys.stdout
    if bar is not None:
        bar.write(text, file=stream)
    else:
        print(text, file=stream, flush=True)


def run_batch(
    predictor: Predictor,
    input_path: Path | str | None,
    output_dir: Path | str | None,
    *,
    rule: SeriesRule | Mapping[str, Any] | None = None,
    formats: str | Sequence[str] | None = None,
    save_maps: bool = False,
    bundle: Mapping[str, Any] | None = None,
    quiet: bool = False,
    progress: bool | None = None,
    overwrite: bool = False,
) -> BatchSummary:
    """Segment every input under INPUT and write one output folder per input under OUT.

    Args:
        predictor: the configured predictor (the bundle's ``predictor`` component).
        input_path: INPUT (see the module docstring).
        output_dir: OUT; created when absent; must not lie inside INPUT.
        rule: DICOM series selection (a `SeriesRule` or an ``"input_series"`` dict).
        formats: output formats, e.g. ``"nifti,dicom-seg,report"`` (default all); DICOM SEG is written for
            DICOM inputs only.
        save_maps: also write ``probabilities.nii.gz`` and ``boundary.nii.gz``.
        bundle: the bundle's metadata (at least "name" and "version").
        quiet: print nothing but failures (on stderr).
        progress: progress bars over inputs and windows; default: when stderr is a terminal and not quiet.
            Sets ``predictor.progress``, and ``predictor.keep_maps`` to `save_maps` (maps cost memory).
        overwrite: replace earlier medmtl outputs of the same inputs; anything else under OUT is never
            replaced (that input fails instead).

    Returns:
        the summary; it has been printed (failures on stderr).

    Raises:
        MedmtlError: when the run cannot start: no INPUT or OUT given, INPUT missing or holding no NIfTI
            image and no DICOM image series, OUT inside INPUT or not writable, unknown formats or a bad
            series rule.
    """
    printable_console()
    if input_path is None or str(input_path) == "":
        raise MedmtlError("no input given: pass INPUT to `medmtl infer` or --input_dir to the bundle")
    if output_dir is None or str(output_dir) == "":
        raise MedmtlError(
            "no output folder given: pass --output to `medmtl infer` or --output_dir to the bundle"
        )
    input_path, output_dir = Path(input_path), Path(output_dir)
    fmt = parse_formats(formats)
    rule = series_rule(rule)
    if not input_path.exists():
        raise MedmtlError(f"{input_path}: input not found")
    _check_output_dir(input_path, output_dir)
    progress = (not quiet and sys.stderr.isatty()) if progress is None else bool(progress)
    predictor.progress = progress
    predictor.keep_maps = bool(save_maps)

    summary = BatchSummary(input_path=input_path, output_dir=output_dir)
    items, problems = find_inputs(input_path, rule)
    summary.outcomes += [Outcome(str(input_path), reason=p) for p in problems]
    created = _prepare_output_dir(output_dir) if items else False
    bar = None
    if progress and items:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), unit="input", file=sys.stderr, desc="inputs")
    if not quiet and items:
        _say(f"{len(items)} input(s) to segment; outputs go to {output_dir}", bar)
    try:
        for i, item in enumerate(items, start=1):
            outcome = process_input(item, predictor, output_dir, fmt, save_maps, bundle, overwrite)
            summary.outcomes.append(outcome)
            if not quiet:
                if outcome.ok:
                    vols = ", ".join(f"{k} {v:.2f} mL" for k, v in outcome.volumes_ml.items())
                    _say(f"[{i}/{len(items)}] {item.name}: {vols} ({outcome.seconds:.1f} s)", bar)
                    for warning in outcome.warnings:
                        _say(f"[{i}/{len(items)}] warning: {item.name}: {warning}", bar, sys.stderr)
                else:
                    _say(f"[{i}/{len(items)}] failed: {outcome.reason}", bar, sys.stderr)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        if created and not any(output_dir.iterdir()):
            output_dir.rmdir()  # every input failed: leave no empty folder behind
    if not quiet:
        print(summary.format(), flush=True)
    else:
        lines = [f"warning: {o.name}: {w}" for o in summary.done for w in o.warnings]
        lines += [f"failed: {o.reason}" for o in summary.failed]
        if lines:
            print("\n".join(lines), file=sys.stderr, flush=True)
    return summary


def _prepare_output_dir(output_dir: Path) -> bool:
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


def exit_on_failure(summary: BatchSummary) -> BatchSummary:
    """For ``python -m monai.bundle run``: exit with status 1 when an input failed or none was selected.

    Args:
        summary: the result of `run_batch`.

    Returns:
        the summary, when nothing failed.
    """
    if not summary.ok:
        sys.exit(EXIT_FAILED)
    return summary


# ---------------------------------------------------------------------------------------------------------
# the bundle's inference.yaml (for `medmtl infer`; `monai.bundle run` reads it itself)


def _innermost(err: BaseException) -> BaseException:
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def load_inference_config(bundle_dir: Path | str, overrides: Mapping[str, Any] | None = None) -> Any:
    """Read a bundle's ``configs/inference.yaml`` and ``metadata.json`` with MONAI's ConfigParser.

    Args:
        bundle_dir: the bundle folder (holding ``configs/``); becomes ``bundle_root``.
        overrides: config ids to values (``"pipeline#patch_size": [32, 32, 32]``), applied as
            ``monai.bundle run --key value`` would.

    Returns:
        the `monai.bundle.ConfigParser`, not yet parsed.

    Raises:
        MedmtlError: the bundle, its inference.yaml or metadata.json is missing or unreadable, or an
            override names a key that the config does not have.
    """
    from monai.bundle import ConfigParser

    bundle_dir = Path(bundle_dir)
    config, meta = bundle_dir / "configs" / "inference.yaml", bundle_dir / "configs" / "metadata.json"
    if not bundle_dir.is_dir():
        raise MedmtlError(f"{bundle_dir}: bundle folder not found")
    for path in (config, meta):
        if not path.is_file():
            raise MedmtlError(f"{path}: not found; is {bundle_dir} a bundle with an inference config?")
    parser = ConfigParser()
    try:
        parser.read_config(str(config))
        parser.read_meta(str(meta))
    except Exception as err:  # YAML/JSON syntax errors of several types
        raise MedmtlError(
            f"{bundle_dir}: cannot read the bundle's configs ({type(err).__name__}: {err})"
        ) from None
    parser["bundle_root"] = str(bundle_dir)
    for key, value in (overrides or {}).items():
        top = key.split("#")[0]
        if top not in parser:
            raise MedmtlError(f"{config}: has no key '{top}' (cannot set '{key}')")
        parser[key] = value
    return parser


def build_from_config(parser: Any) -> tuple[Predictor, dict[str, Any]]:
    """Instantiate the config's ``predictor`` and resolve its ``batch`` arguments for `run_batch`.

    Args:
        parser: from `load_inference_config` (overrides applied).

    Returns:
        (predictor, keyword arguments of `run_batch`).

    Raises:
        MedmtlError: from building the predictor (checkpoint missing or not fitting, bad settings), or a
            config entry that cannot be evaluated (named).
    """
    out = []
    for key in ("predictor", "batch"):
        try:
            out.append(parser.get_parsed_content(key))
        except Exception as err:  # MONAI wraps whatever the config raised in RuntimeErrors
            cause = medmtl_cause(err)
            if cause is not None:
                raise cause from None
            raise MedmtlError(
                f"inference config: cannot build '{key}' ({error_summary(_innermost(err), typed=True)})"
            ) from None
    return out[0], dict(out[1])
