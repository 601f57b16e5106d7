"""`medmtl check-data`: validate every image/label pair of an MSD dataset before training on it.

Each case is read with nibabel, one at a time (two volumes in memory at most), and checked for what
breaks training silently or late: unreadable or truncated files, image/label shape or affine mismatch,
label values that `dataset.json` does not declare, complex or RGB voxels, NaN/Inf or absurd intensities,
implausible voxel spacing (the rules of `medmtl.data.plausibility`, which `medmtl infer` applies too), and a
case whose dimensionality or channel count differs from the rest of the dataset.
Problems make the report fail; warnings (an all-background label, a constant image, files on disk that
`dataset.json` does not list) are printed but do not. Nothing in the dataset folder is written.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from medmtl.data.datalist import DATASET_JSON, label_names, load_datalist, read_dataset_json
from medmtl.data.plausibility import (
    DIRECTION_ATOL,
    ORIGIN_ATOL_MM,
    SPACING_RANGE_MM,
    SPACING_RTOL,
    affine_differences,
    dtype_problem,
    intensity_problem,
    layout_problem,
    read_error_text,
    spacing_problem,
)
from medmtl.errors import MedmtlError

logger = logging.getLogger(__name__)

MAX_LISTED = 5  # names shown in one message before "..."

# (path, opened file, its voxels) of one image or label the check has read
LoadedFile = tuple[str, nib.spatialimages.SpatialImage, np.ndarray]
# called for every case without problems: (datalist entry, its images, its label or None)
CaseHook = Callable[[dict, list[LoadedFile], LoadedFile | None], None]

# MSD folders whose files should all be listed somewhere in dataset.json
_LISTED_FOLDERS = ("imagesTr", "labelsTr", "imagesTs", "labelsTs")


@dataclass
class CaseReport:
    """What was found for one image/label pair.

    Attributes:
        case_id: the image file name without extension.
        image: the image path as listed, relative to the dataset folder.
        label: the label path, relative to the dataset folder (None when the entry lists none).
        shape: the image shape (spatial, then channels for a 4D image), None when unreadable.
        spacing: voxel spacing in mm along the spatial axes, from the image affine.
        problems: what makes the case unusable, one message each, naming the file.
        warnings: what looks suspicious but does not fail the check.
    """

    case_id: str
    image: str
    label: str | None
    shape: tuple[int, ...] | None = None
    spacing: tuple[float, ...] | None = None
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    spatial_dims: int | None = None  # of the first image, when readable
    channels: int | None = None
    has_mask: bool = False  # lists a label file (partially labelled data: not every case has one)
    has_class: bool = False  # lists a case-level "class"

    @property
    def ok(self) -> bool:
        """True when the case has no problems (warnings allowed)."""
        return not self.problems

    def format(self) -> str:
        """One line: `OK`/`FAIL`, the case id, shape and spacing, then problems and warnings."""
        status = "OK  " if self.ok else "FAIL"
        parts = [f"{status} {self.case_id}"]
        if self.shape is not None:
            parts.append("x".join(str(n) for n in self.shape))
        if self.spacing is not None:
            parts.append("x".join(f"{s:.3g}" for s in self.spacing) + " mm")
        line = "  ".join(parts)
        details = self.problems + [f"warning: {w}" for w in self.warnings]
        return f"{line}: {'; '.join(details)}" if details else line


@dataclass
class DatasetReport:
    """The result of `check_dataset`.

    Attributes:
        dataset_dir: the checked folder (absolute).
        section: the checked `dataset.json` section.
        cases: one report per listed entry, in the order of `dataset.json`.
        problems: dataset-level problems (JSON content, missing files, counts that do not match).
        warnings: dataset-level warnings (files on disk not listed in `dataset.json`).
    """

    dataset_dir: Path
    section: str = "training"
    cases: list[CaseReport] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when neither the dataset nor any case has a problem."""
        return not self.problems and all(case.ok for case in self.cases)

    def format(self) -> str:
        """The printable report: dataset-level lines, one line per case, then a summary line."""
        lines = [f"FAIL {p}" for p in self.problems] + [f"WARN {w}" for w in self.warnings]
        lines += [case.format() for case in self.cases]
        targets = self.target_counts()
        partial = len(targets) > 1 or any(not mask for mask, _ in targets)
        if self.section != "test" and partial:  # partially labelled training data: say how
            kinds = {(True, True): "with a mask and a class label", (True, False): "with a mask only",
                     (False, True): "with a class label only", (False, False): "with neither"}
            lines.append("targets: " + ", ".join(f"{targets[k]} {kinds[k]}" for k in kinds if k in targets))
        failed = sum(not case.ok for case in self.cases)
        warned = sum(bool(case.warnings) for case in self.cases)
        summary = f"{len(self.cases)} cases checked, {failed} with problems"
        if warned:
            summary += f", {warned} with warnings"
        if self.problems:
            summary += f"; {_count(len(self.problems), 'dataset problem')}"
        lines.append(summary)
        return "\n".join(lines)

    def target_counts(self) -> dict[tuple[bool, bool], int]:
        """How many cases have each kind of target: ``{(has_mask, has_class): count}``, kinds present only."""
        return dict(Counter((case.has_mask, case.has_class) for case in self.cases))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _names(values: Iterable, limit: int = MAX_LISTED) -> str:
    values = list(values)
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")


def _is_class_index(value: object) -> bool:
    """A case-level class as `ClassTargetd` reads it: an integer (a float holding one) >= -1 (-1: none)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return number and float(value).is_integer() and value >= -1


def _value_set(values: Sequence) -> str:
    """`{7, 9}`: label values as a set literal, integers without a trailing `.0`."""
    shown = [int(v) if float(v).is_integer() else float(v) for v in values[:10]]
    return "{" + ", ".join(str(v) for v in shown) + (", ..." if len(values) > 10 else "") + "}"


def _rel(path: str | Path, folder: Path) -> str:
    """The path relative to the dataset folder when inside it (short messages), else as given."""
    try:
        return Path(path).relative_to(folder).as_posix()
    except ValueError:
        return str(path)


def _spatial_ndim(shape: Sequence[int]) -> int:
    """Spatial dimensions of a label: its shape without trailing singleton axes (at least 2)."""
    ndim = len(shape)
    while ndim > 2 and shape[ndim - 1] == 1:
        ndim -= 1
    return ndim


class _CaseChecker:
    """Checks one image/label pair; holds the dataset-wide settings."""

    def __init__(
        self,
        folder: Path,
        declared: set[int] | None,
        require_label: bool,
        spacing_range: tuple[float, float],
        tolerances: dict[str, float],
        on_case: CaseHook | None = None,
    ) -> None:
        self.folder = folder
        self.on_case = on_case
        self.declared = declared
        self.require_label = require_label
        self.spacing_range = spacing_range
        self.tolerances = tolerances

    def rel(self, path: str | Path) -> str:
        """The path relative to the dataset folder when inside it, for short messages."""
        return _rel(path, self.folder)

    def load(self, path: str, case: CaseReport) -> nib.spatialimages.SpatialImage | None:
        """Open a file's header; record a problem and return None when it is missing or unreadable."""
        if not os.path.isfile(path):
            case.problems.append(f"{self.rel(path)}: missing")
            return None
        try:
            return nib.load(path)
        except Exception as err:  # any failure, not just known ones: one bad file must not stop the report
            case.problems.append(f"{self.rel(path)}: unreadable ({read_error_text(err, Path(path))})")
            return None

    def read(self, img: nib.spatialimages.SpatialImage, path: str, case: CaseReport) -> np.ndarray | None:
        """Read a file's voxels; record a problem and return None when the data cannot be read."""
        try:
            return np.asanyarray(img.dataobj)
        except Exception as err:  # truncated gzip gives EOFError, zlib.error or OSError, among others
            case.problems.append(f"{self.rel(path)}: unreadable ({read_error_text(err, Path(path))})")
            return None

    def check(self, entry: dict) -> CaseReport:
        """Run every check on one datalist entry (`image`, optional `label`, `case_id`)."""
        images = entry["image"] if isinstance(entry["image"], list) else [entry["image"]]
        label_path = entry.get("label")
        if isinstance(label_path, list):  # one label file is the MSD convention
            label_path = label_path[0] if len(label_path) == 1 else None
        case = CaseReport(
            case_id=str(entry["case_id"]),
            image=", ".join(self.rel(p) for p in images),
            label=self.rel(label_path) if label_path else None,
        )
        case.has_mask = label_path is not None
        value = entry.get("class")
        if value is not None and not _is_class_index(value):
            case.problems.append(f"{case.image}: 'class' must be an integer >= 0 (or -1 for none), got {value!r}")
        case.has_class = value is not None and _is_class_index(value) and value >= 0
        if label_path is None and "label" in entry:
            case.problems.append(f"{case.image}: no single 'label' file listed in {DATASET_JSON}")
        elif label_path is None and self.require_label and not case.has_class:
            # partially labelled data: a training case needs a mask, a case label or both
            case.problems.append(f"{case.image}: neither a 'label' file nor a 'class' listed in {DATASET_JSON}")

        label_img = self.load(label_path, case) if label_path else None
        spatial = _spatial_ndim(label_img.shape) if label_img is not None else None
        kept: list[LoadedFile] = []  # for on_case: what was read, so its caller need not read it again
        for i, path in enumerate(images):
            img = self.load(path, case)
            if img is None:
                continue
            if i == 0:
                case.shape = tuple(int(n) for n in img.shape)
            unusable = dtype_problem(img.get_data_dtype())
            if unusable:
                case.problems.append(f"{self.rel(path)}: {unusable}")
                continue
            if i == 0:
                case.spatial_dims, case.channels = _layout(img.shape, spatial)
            self._check_geometry(img, path, label_img, label_path, spatial, case, first=i == 0)
            data = self.read(img, path, case)
            if data is not None:
                self._check_intensities(data, path, case)
                if self.on_case is not None:
                    kept.append((path, img, data))
            del data  # without on_case, keep one volume in memory at a time
        label = None
        if label_img is not None:
            data = self.read(label_img, label_path, case)
            if data is not None:
                self._check_label_values(data, label_path, case)
                label = (label_path, label_img, data)
        if self.on_case is not None and case.ok:
            self.on_case(entry, kept, label)
        return case

    def _check_geometry(
        self,
        img: nib.spatialimages.SpatialImage,
        path: str,
        label_img: nib.spatialimages.SpatialImage | None,
        label_path: str | None,
        spatial: int | None,
        case: CaseReport,
        first: bool,
    ) -> None:
        ndim = min(spatial if spatial is not None else len(img.shape), 3)
        affine = np.asarray(img.affine, dtype=float)
        if not np.isfinite(affine).all():
            case.problems.append(f"{self.rel(path)}: affine has NaN/Inf entries")
            return
        spacing = np.linalg.norm(affine[:3, :ndim], axis=0)
        if first:
            case.spacing = tuple(round(float(s), 6) for s in spacing)
        implausible = spacing_problem(spacing, self.spacing_range)
        if implausible:
            case.problems.append(f"{self.rel(path)}: {implausible}")
        if label_img is None:
            return
        # the label's trailing singleton axes are not spatial; the image may add channels after them
        if tuple(img.shape[:spatial]) != tuple(label_img.shape[:spatial]):
            case.problems.append(
                f"{self.rel(label_path)}: shape {'x'.join(map(str, label_img.shape))} does not match "
                f"image {self.rel(path)} {'x'.join(map(str, img.shape))}"
            )
        diffs = affine_differences(affine, np.asarray(label_img.affine, dtype=float), **self.tolerances)
        if diffs:
            case.problems.append(f"{self.rel(label_path)}: affine differs from the image: {'; '.join(diffs)}")

    def _check_intensities(self, data: np.ndarray, path: str, case: CaseReport) -> None:
        if data.dtype.kind in "fc" and not np.isfinite(data).all():
            n_nan, n_inf = int(np.isnan(data).sum()), int(np.isinf(data).sum())
            found = [f"{n} {what}" for n, what in ((n_nan, "NaN"), (n_inf, "Inf")) if n]
            case.problems.append(f"{self.rel(path)}: {' and '.join(found)} voxels in the image")
        elif data.size:
            low, high = float(data.min()), float(data.max())
            absurd = intensity_problem(low, high)
            if absurd:
                case.problems.append(f"{self.rel(path)}: {absurd}")
            elif low == high:
                case.warnings.append(f"{self.rel(path)}: image is constant ({data.flat[0]:g})")

    def _check_label_values(self, data: np.ndarray, path: str, case: CaseReport) -> None:
        rel = self.rel(path)
        if self.declared is not None:
            # comparing against each declared value keeps memory at one bool mask, and np.unique only
            # ever sorts the (normally empty) rest; float labels equal to 1.0 count as 1
            known = np.zeros(data.shape, dtype=bool)
            for value in self.declared:
                known |= data == value
            others = np.unique(data[~known])
        else:
            others = np.unique(data)
        if data.dtype.kind in "fc":
            finite = others[np.isfinite(others)]
            if finite.size < others.size:
                case.problems.append(f"{rel}: label has NaN/Inf voxels")
            fractional = finite[finite != np.round(finite)]
            if fractional.size:
                case.problems.append(f"{rel}: label values are not integers (e.g. {_value_set(fractional)})")
            others = finite[finite == np.round(finite)]
        if self.declared is not None and others.size:
            found, declared = _value_set(others), _value_set(sorted(self.declared))
            case.problems.append(f"{rel}: label values {found} not in declared labels {declared}")
        elif self.declared is None and others.size and others.min() < 0:
            case.problems.append(f"{rel}: negative label values {_value_set(others[others < 0])}")
        if not data.any():
            case.warnings.append(f"{rel}: label is empty (all background)")


def _layout(shape: Sequence[int], label_dims: int | None) -> tuple[int, int]:
    """(spatial dimensions, channels) of an image: the label's spatial axes, the rest channels; without a
    label a 4D image is 3D with channels and trailing singleton axes are not spatial."""
    if label_dims is None:
        label_dims = 3 if len(shape) == 4 else _spatial_ndim(shape)
    channels = int(np.prod(shape[label_dims:])) if len(shape) > label_dims else 1
    return label_dims, channels


def _check_layouts(meta: dict, cases: Sequence[CaseReport]) -> None:
    """Flag cases whose dimensionality or channel count differs from the dataset's.

    The channels expected are the modalities `dataset.json` declares; the dimensionality is the one most
    cases have (a 2D slice among 3D volumes crashes training at its first validation, naming no file).
    """
    modality = meta.get("modality")
    declared = len(modality) if isinstance(modality, dict) and modality else None
    dims = Counter(c.spatial_dims for c in cases if c.spatial_dims is not None)
    expected_dims = dims.most_common(1)[0][0] if dims else None
    for case in cases:
        if case.spatial_dims is None:
            continue
        mismatch = layout_problem(case.spatial_dims, case.channels or 1, expected_dims, declared)
        if mismatch:
            case.problems.append(f"{case.image.split(', ')[0]}: {mismatch}")


def _listed_paths(meta: dict, folder: Path, sections: Iterable[str]) -> set[str]:
    """Every path the given sections list, absolute and normalized."""
    paths = set()
    for section in sections:
        for item in meta.get(section) or []:
            if isinstance(item, str):
                values = [item]
            elif isinstance(item, dict):
                values = [item.get("image"), item.get("label")]
            else:
                continue
            for value in values:
                for p in value if isinstance(value, list) else [value]:
                    if isinstance(p, str):
                        paths.add(os.path.normpath(os.path.join(folder, p)))
    return paths


def _check_listing(meta: dict, folder: Path, report: DatasetReport) -> None:
    """Dataset-level checks of `dataset.json` against the files on disk."""
    for key, section in (("numTraining", "training"), ("numTest", "test")):
        listed = meta.get(section)
        if key in meta and isinstance(listed, list) and meta[key] != len(listed):
            report.problems.append(
                f"{DATASET_JSON}: {key} is {meta[key]!r} but '{section}' lists {_count(len(listed), 'case')}"
            )
    checked = [report.section] + (["test"] if report.section != "test" else [])
    missing = sorted(p for p in _listed_paths(meta, folder, checked) if not os.path.exists(p))
    if missing:
        files, verb = _count(len(missing), "file"), "is" if len(missing) == 1 else "are"
        shown = _names(_rel(p, folder) for p in missing)
        report.problems.append(f"{files} listed in {DATASET_JSON} {verb} missing: {shown}")

    listed = _listed_paths(meta, folder, [s for s in meta if isinstance(meta.get(s), list)])
    for sub in _LISTED_FOLDERS:
        if not (folder / sub).is_dir():
            continue
        # dot files are macOS resource forks (`._case.nii.gz`, shipped in the MSD tarballs) and editor litter
        on_disk = sorted(p.name for p in (folder / sub).iterdir() if not p.name.startswith("."))
        unlisted = [n for n in on_disk if os.path.normpath(folder / sub / n) not in listed]
        if unlisted:
            files, shown = _count(len(unlisted), "file"), _names(unlisted)
            report.warnings.append(f"{sub}: {files} not listed in {DATASET_JSON}: {shown}")


def check_dataset(
    dataset_dir: Path | str,
    section: str = "training",
    *,
    spacing_range: tuple[float, float] = SPACING_RANGE_MM,
    spacing_rtol: float = SPACING_RTOL,
    direction_atol: float = DIRECTION_ATOL,
    origin_atol: float = ORIGIN_ATOL_MM,
    on_case: CaseHook | None = None,
) -> DatasetReport:
    """Check every image/label pair of an MSD dataset folder and the `dataset.json` listing.

    Args:
        dataset_dir: the folder holding `dataset.json`.
        section: the `dataset.json` list whose pairs are checked.
        spacing_range: plausible voxel spacing in mm, inclusive.
        spacing_rtol: relative tolerance on spacing when comparing image and label affines.
        direction_atol: absolute tolerance on direction cosines.
        origin_atol: absolute tolerance on the origin, in mm.
        on_case: called, in listing order, for every case the checks found no problem with (so far: a later
            layout check may still fail it), with its entry, ``[(path, image, voxels), ...]`` and
            ``(path, label, voxels)`` (None without a label): the files as the check read them, so a caller
            (``medmtl plan``'s fingerprint) does not read them again. That case's volumes stay in memory
            until it returns.

    Returns:
        The report; `report.ok` is False when the dataset or any case has a problem. Malformed or
        incomplete JSON content is a dataset problem in the report, not an exception.

    Raises:
        MedmtlError: the folder does not exist or holds no `dataset.json` (there is nothing to check).
    """
    folder = Path(dataset_dir).expanduser().absolute()
    # without the folder or its dataset.json there is nothing to report on: that is a usage error
    if not folder.is_dir():
        raise MedmtlError(f"{folder}: dataset folder not found")
    if not (folder / DATASET_JSON).is_file():
        raise MedmtlError(f"{folder / DATASET_JSON}: not found (an MSD dataset folder needs one)")
    report = DatasetReport(dataset_dir=folder, section=section)
    try:
        meta = read_dataset_json(folder)
        entries = load_datalist(folder, section)
    except MedmtlError as err:  # malformed JSON or entries: the dataset fails, the report still prints
        report.problems.append(str(err).replace(f"{folder}{os.sep}", ""))
        return report

    declared = None
    try:
        declared = set(label_names(meta))
    except MedmtlError as err:
        report.problems.append(f"{err}; label values are not checked against it")
    _check_listing(meta, folder, report)

    if section == "training" and not entries:
        report.problems.append(f"{DATASET_JSON}: 'training' lists no cases; there is nothing to train on")
    ids = Counter(str(e["case_id"]) for e in entries)
    repeated = sorted(i for i, n in ids.items() if n > 1)
    if repeated:
        report.problems.append(f"{DATASET_JSON}: cases listed more than once: {_names(repeated)}")

    tolerances = {"spacing_rtol": spacing_rtol, "direction_atol": direction_atol, "origin_atol": origin_atol}
    checker = _CaseChecker(folder, declared, section != "test", spacing_range, tolerances, on_case)
    for entry in entries:
        case = checker.check(entry)
        logger.debug("%s", case.format())
        report.cases.append(case)
    _check_layouts(meta, report.cases)
    return report


def require_valid_dataset(dataset_dir: Path | str, hint: str = "") -> Path:
    """Stop a training run before it starts when its dataset is missing or has broken cases.

    Bundles call this first in `initialize`. It raises `SystemExit` with a short report rather than an
    exception, because MONAI wraps an exception raised in a config expression in a long traceback.

    Args:
        dataset_dir: the MSD dataset folder.
        hint: a line added when the dataset itself is missing (where to get it, which option to pass).

    Returns:
        the path of the dataset's `dataset.json`.

    Raises:
        SystemExit: the folder or its dataset.json is missing or unreadable, or any case fails the checks of
            `check_dataset` (the failing lines are printed). Warnings (an empty label: a valid case without
            foreground, which trains as such; a constant image; unlisted files) are logged and do not stop
            a run.
    """
    try:
        report = check_dataset(dataset_dir)
    except MedmtlError as err:
        raise SystemExit(f"error: {err}" + (f"\n{hint}" if hint else "")) from None
    if not report.ok:
        failing = [f"FAIL {p}" for p in report.problems] + [c.format() for c in report.cases if not c.ok]
        raise SystemExit(
            f"error: {dataset_dir}: the dataset has problems, nothing was trained:\n"
            + "\n".join(failing[:MAX_LISTED * 2])
            + f"\n({report.format().splitlines()[-1]}; `medmtl check-data {dataset_dir}` prints the full report)"
        )
    # warnings do not stop a run, but the user is told: an empty label trains as a case without foreground
    warned = [f"WARN {w}" for w in report.warnings] + [c.format() for c in report.cases if c.warnings]
    for line in warned[:MAX_LISTED]:
        logger.warning("%s", line)
    if len(warned) > MAX_LISTED:
        more = len(warned) - MAX_LISTED
        logger.warning("... %d more; `medmtl check-data %s` prints the full report", more, dataset_dir)
    return Path(dataset_dir) / "dataset.json"
