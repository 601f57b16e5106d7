"""What a reviewer opens in the MLflow UI after each validation round: the per-case table and worst-case overlays.

Kept as files (CSV, PNG) rather than `MlflowClient.log_table` / `log_figure`: the offline journal copies files,
the CSV is what `validation/cases_epoch_XXX.csv` readers (and the clinician view) expect, and `log_table`
writes its own JSON format. The overlay draws reference and prediction as two contours on one slice;
`monai.visualize.blend_images` fills one label map, which would hide one of the two under the other.
"""

from __future__ import annotations

import csv
import numbers
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medmtl.tracking.scrub import _as_scalar, scrub_identifiers

if TYPE_CHECKING:
    from medmtl.tracking.journal import _Sink


def _case_value(value: Any) -> Any:
    """A case-table cell: numbers as compact text, None as empty, strings unchanged, others dropped (None)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (numbers.Integral, np.integer)):
        return int(value)
    scalar = _as_scalar(value)
    return None if scalar is None else format(scalar, ".6g")


def _mean_dice(case: Mapping[str, Any]) -> float:
    """A case's mean Dice for sorting; NaN when absent."""
    value = _as_scalar(case.get("mean_dice"))
    return float("nan") if value is None else value


def _worst_first(cases: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Cases by mean Dice, lowest first; cases without a Dice (empty reference) last."""
    return sorted(cases, key=lambda c: (np.isnan(_mean_dice(c)), _mean_dice(c)))


def write_case_table(case_results: Sequence[Mapping[str, Any]], path: Path | str) -> list[str]:
    """Write the per-case validation results as CSV, worst mean Dice first.

    Args:
        case_results: one dict per case (`case_id`, `dice_<label>`, `hd95_<label>_mm`, `mean_dice`,
            `cls_prob`, `cls_true`, ...). `overlay`, any other non-scalar value and identifier-like keys
            are left out.
        path: CSV file to write (parent folders are created).

    Returns:
        The column names written, `case_id` first.
    """
    rows: list[dict[str, Any]] = []
    columns: dict[str, None] = {"case_id": None}  # insertion-ordered set
    for case in _worst_first(case_results):
        row = {}
        for key, value in scrub_identifiers(dict(case)).items():
            cell = None if key == "overlay" else _case_value(value)
            if cell is not None:
                row[key] = cell
                columns.setdefault(key, None)
        rows.append(row)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), restval="")
        writer.writeheader()
        writer.writerows(rows)
    return list(columns)


def render_overlay(
    overlay: Mapping[str, Any], title: str, path: Path | str, label_values: Sequence[int] | None = None
) -> Path:
    """Draw one 2D slice in grey with the reference contour in green and the predicted contour in red.

    The slice is drawn transposed with the origin at the bottom: for an `[x, y]` slice of a RAS volume the
    first axis runs across and the second up.

    Args:
        overlay: 2D arrays `image`, `label` (reference labels) and `pred` (predicted labels).
        title: figure title (case id and Dice).
        path: PNG file to write (parent folders are created).
        label_values: label values to outline, each on its own; default: every non-zero value present.

    Returns:
        `path`.
    """
    # Figure + Agg canvas, not pyplot: no global backend or figure state, safe in a training process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    image, label, pred = (np.squeeze(np.asarray(overlay[k], dtype=float)) for k in ("image", "label", "pred"))
    if label_values is None:
        label_values = sorted({int(v) for v in np.unique(np.concatenate([label.ravel(), pred.ravel()]))} - {0})
    fig = Figure(figsize=(4, 4.3), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    finite = image[np.isfinite(image)]
    vmin, vmax = np.percentile(finite, (1, 99)) if finite.size else (0.0, 1.0)  # robust MR windowing
    ax.imshow(image.T, cmap="gray", origin="lower", vmin=vmin, vmax=vmax, interpolation="nearest")
    for mask_source, color in ((label, "#00c000"), (pred, "red")):
        for value in label_values:
            mask = mask_source == value
            if mask.any() and not mask.all():  # contour() needs both sides of the level
                ax.contour(mask.T.astype(float), levels=[0.5], colors=color, linewidths=1.2, origin="lower")
    ax.legend(
        handles=[
            Line2D([], [], color="#00c000", label="reference"),
            Line2D([], [], color="red", label="prediction"),
        ],
        loc="lower right",
        fontsize=7,
        framealpha=0.6,
    )
    ax.set_title(title, fontsize=8)
    ax.set_axis_off()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    return path


def _overlay_title(case: Mapping[str, Any], label_names: Mapping[int, str]) -> str:
    """`case_017  mean Dice 0.812` and the Dice of each structure on a second line."""
    mean = _mean_dice(case)
    title = f"{case.get('case_id', '?')}  mean Dice {mean:.3f}"
    per_label = []
    for name in label_names.values():
        value = _as_scalar(case.get(f"dice_{name}"))
        if value is not None:
            per_label.append(f"{name} {value:.3f}")
    return title + ("\n" + ", ".join(per_label) if per_label else "")


def _safe_filename(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "case"


def log_cases(
    sink: _Sink,
    run_id: str,
    cases: Sequence[Mapping[str, Any]],
    step: int,
    label_names: Mapping[int, str],
    n_worst: int,
) -> None:
    """Log one validation round's case table and the overlays of its `n_worst` cases through `sink`.

    Args:
        sink: the tracker's MLflow sink (journals the files when the store is unreachable).
        run_id: the open run.
        cases: the evaluator's `case_results`.
        step: the trainer's epoch; names `validation/cases_epoch_XXX.csv` and `overlays/epoch_XXX/`.
        label_names: `{label value: structure name}`; every value is outlined.
        n_worst: how many of the worst cases (by mean Dice) to draw.
    """
    epoch = f"epoch_{int(step):03d}"
    with tempfile.TemporaryDirectory() as tmp:
        write_case_table(cases, Path(tmp, "validation", f"cases_{epoch}.csv"))
        drawable = [c for c in _worst_first(cases) if isinstance(c.get("overlay"), Mapping)]
        for rank, case in enumerate(drawable[:n_worst], start=1):
            name = f"{rank:02d}_{_safe_filename(str(case.get('case_id', 'case')))}.png"
            render_overlay(
                case["overlay"],
                _overlay_title(case, label_names),
                Path(tmp, "overlays", epoch, name),
                label_values=sorted(label_names),
            )
        sink.call(f"logging validation artifacts of {epoch}", "log_artifacts", run_id, tmp)
