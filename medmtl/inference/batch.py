"""The batch run behind `medmtl infer` and the bundles' inference.yaml: for each input, load, predict, write,
report.

The inputs come from `medmtl.inference.inputs` (NIfTI files, DICOM series chosen by a `SeriesRule`), and each
one's folder ``OUT/<name>/`` is put in place by `medmtl.inference.outputs` (staged, never replacing what medmtl
did not write). Every input is processed in turn; a bad one is recorded with a one-line reason that names it
(file path, or series description and short UID) and the run goes on with the others. An input's folder holds
``seg.nii.gz``, ``seg.dcm`` (DICOM SEG, DICOM inputs only), ``probabilities.nii.gz`` and ``boundary.nii.gz``
(with ``save_maps``; channels last), ``report.json`` and a hidden ``.medmtl-output`` marker. Each format is
written on its own: one that cannot be written (a DICOM SEG of a source with broken patient attributes) is a
warning in the report and the summary, and the others stay.

No patient identifier (PatientName, PatientID, PatientBirthDate, AccessionNumber) is read into names,
messages or reports: series are named by their description, number and UID. The config loading
(`load_inference_config`, `build_from_config`), the series rule helpers and `OUTPUT_MARKER` are re-exported
here, where the command line, the bundles and earlier scripts import them.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import medmtl
from medmtl.data.dicom import NOT_DATA_ERRORS, SeriesRule
from medmtl.errors import MedmtlError, error_summary, printable_console
from medmtl.inference.config import build_from_config, load_inference_config
from medmtl.inference.inputs import InputItem, find_inputs, load_input, merge_series_rule, series_rule
from medmtl.inference.outputs import (
    OUTPUT_MARKER,
    check_output_dir,
    prepare_output_dir,
    publish,
    refuse_existing,
)
from medmtl.inference.predictor import Prediction, Predictor
from medmtl.inference.writers import label_volumes_ml, write_dicom_seg, write_nifti, write_report
from medmtl.io import display_path

__all__ = [
    "FORMATS",
    "OUTPUT_MARKER",
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
# one input


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
        refuse_existing(item.label, target, overwrite)  # before the work, not after it
        t0 = time.perf_counter()
        # a 3D model needs a volume: refuse a series with too few slices before reading its pixels
        min_slices = predictor.min_slices if predictor.slice_axis is None and predictor.data_dims == 3 else 1
        image = load_input(item, min_slices)
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
        publish(item.label, staging, target, overwrite)
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
    check_output_dir(input_path, output_dir)
    progress = (not quiet and sys.stderr.isatty()) if progress is None else bool(progress)
    predictor.progress = progress
    predictor.keep_maps = bool(save_maps)

    summary = BatchSummary(input_path=input_path, output_dir=output_dir)
    items, problems = find_inputs(input_path, rule)
    summary.outcomes += [Outcome(str(input_path), reason=p) for p in problems]
    created = prepare_output_dir(output_dir) if items else False
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
