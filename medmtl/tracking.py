"""MLflow tracking for medmtl training: one readable MLflow run per training, resumable, PHI-safe.

`MLflowTracker` is an ignite handler for the MONAI trainer and its evaluator. It records

- the flattened hyperparameters (params) and the resolved bundle config (`config/resolved_config.json`),
- every `train/...` entry of `trainer.state.metrics` at each epoch, and every scalar of
  `evaluator.state.metrics` (`val/...`) at the trainer's epoch,
- per validation round, a per-case table `validation/cases_epoch_XXX.csv` (worst case first) and overlay
  pictures of the worst cases by mean Dice, `overlays/epoch_XXX/NN_<case_id>.png`,
- at the end the best checkpoint as `model/model.pt` and a run description (dataset, heads, best Dice).

Every MLflow call goes through `_Sink.call`: a tracking store that fails (server down, disk full) is warned
about once and never stops training. From then on the run is written to a journal,
`<eval_dir>/mlflow_pending/<key>.jsonl` (+ copies of its artifacts), without contacting the store again;
`sync_pending_runs` (`medmtl sync-mlflow EVAL_DIR`) uploads it later. Nothing here reads DICOM headers; params,
tags, config and table columns named like patient identifiers are dropped anyway (`scrub_identifiers`).
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import logging
import numbers
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import numpy as np
import torch
from ignite.engine import Engine, Events
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import (
    MAX_ENTITY_KEY_LENGTH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)
from monai.utils import path_to_sqlite_uri

from medmtl.errors import MedmtlError

__all__ = [
    "JOURNAL_TAG",
    "MLflowTracker",
    "PENDING_FOLDER",
    "SyncResult",
    "drop_duplicate_mlflow_handlers",
    "flatten_params",
    "launch_ui",
    "render_overlay",
    "resolve_tracking_uri",
    "scrub_identifiers",
    "sync_pending_runs",
    "ui_command",
    "write_case_table",
]

logger = logging.getLogger(__name__)

DB_NAME = "mlruns.db"  # the SQLite store inside an eval folder, as MONAI's `--tracking mlflow` names it
ARTIFACT_FOLDER = "mlruns"  # artifacts next to the database, as MONAI's MLFlowHandler keeps them
NOTE_TAG = "mlflow.note.content"  # the run description shown by the MLflow UI

# DICOM keywords and tag numbers of patient identifiers, lower case without separators.
_PHI_KEYS = frozenset(
    {
        "patientname",
        "patientid",
        "patientbirthdate",
        "accessionnumber",
        "00100010",
        "00100020",
        "00100030",
        "00080050",
    }
)
_REMOTE_SCHEMES = ("http", "https", "databricks")  # tracking servers: they own where artifacts go


# ----------------------------------------------------------------------------------------------------------
# Tracking URI and UI


def resolve_tracking_uri(eval_dir: Path | str, tracking_uri: str | None = None) -> str:
    """The MLflow tracking URI a training uses.

    Args:
        eval_dir: the training's output folder; the default store is `<eval_dir>/mlruns.db`.
        tracking_uri: an explicit URI from the config; wins over everything else when set.

    Returns:
        `tracking_uri` if set, else the `MLFLOW_TRACKING_URI` environment variable if set, else the SQLite URI
        of `<eval_dir>/mlruns.db` (absolute, `sqlite:////abs/path/mlruns.db` on POSIX).

    Raises:
        MedmtlError: the chosen value is a folder or `file:` URI, which MLflow 3.13+ no longer accepts as
            a tracking store (unless `MLFLOW_ALLOW_FILE_STORE=true`).
    """
    if tracking_uri:
        source, uri = "tracking_uri", str(tracking_uri)
    elif os.environ.get("MLFLOW_TRACKING_URI"):
        source, uri = "MLFLOW_TRACKING_URI", os.environ["MLFLOW_TRACKING_URI"]
    else:
        return path_to_sqlite_uri(Path(eval_dir) / DB_NAME)
    scheme = urlsplit(uri).scheme
    file_store_allowed = os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("1", "true", "yes")
    # A one-letter scheme is a Windows drive ("C:/runs"), i.e. a folder; plain "databricks" is a valid URI.
    is_folder = (len(scheme) <= 1 and not uri.startswith("databricks")) or scheme == "file"
    if is_folder and not file_store_allowed:
        raise MedmtlError(
            f"{source} {_redact(uri)!r}: MLflow 3.13+ no longer accepts a folder (file store) as tracking "
            f"store; use a database URI such as {path_to_sqlite_uri(Path(eval_dir) / DB_NAME)!r} or a "
            "server URI such as http://127.0.0.1:5000"
        )
    return uri


def ui_command(eval_dir_or_uri: str | Path, host: str = "127.0.0.1", port: int = 5000) -> list[str]:
    """The argv of `mlflow ui` for the runs of one eval folder or tracking store.

    Args:
        eval_dir_or_uri: an eval folder holding `mlruns.db`, the `.db` file itself, or a database URI
            (`sqlite:///...`, `postgresql://...`).
        host: interface to bind; keep 127.0.0.1 unless the UI must be reached from other machines.
        port: port to listen on.

    Returns:
        `[python, -m, mlflow, ui, --backend-store-uri, URI, --host, HOST, --port, PORT]`, plus
        `--default-artifact-root <folder of the db>/mlruns` for SQLite stores so that experiments created
        from the UI keep their artifacts next to the database instead of the current directory.

    Raises:
        MedmtlError: the folder has no `mlruns.db`, the path does not exist, or the URI is a tracking
            server (which already is a UI) or a file store.
    """
    store_uri, artifact_root = _ui_store(eval_dir_or_uri)
    argv = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        store_uri,
        "--host",
        str(host),
        "--port",
        str(int(port)),
    ]
    if artifact_root:
        argv += ["--default-artifact-root", artifact_root]
    return argv + ["--workers", "1"]  # one person's local UI: 1 worker starts in seconds, 4 take ~30 s here


def launch_ui(eval_dir_or_uri: str | Path, host: str = "127.0.0.1", port: int = 5000) -> subprocess.Popen:
    """Start the MLflow UI on the runs of an eval folder or tracking store.

    Args:
        eval_dir_or_uri: see `ui_command`.
        host: interface to bind.
        port: port to listen on.

    Returns:
        The running `mlflow ui` process; the caller waits on it or terminates it.

    Raises:
        MedmtlError: see `ui_command`.
    """
    # MLflow's background job runner starts several processes that the UI of training runs never uses
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return subprocess.Popen(ui_command(eval_dir_or_uri, host=host, port=port), env=env, start_new_session=True)


def _ui_store(eval_dir_or_uri: str | Path) -> tuple[str, str | None]:
    """(backend store URI, default artifact root or None) for `mlflow ui`."""
    text = str(eval_dir_or_uri)
    scheme = urlsplit(text).scheme if isinstance(eval_dir_or_uri, str) else ""
    if len(scheme) > 1:  # a URI; one letter would be a Windows drive
        if scheme in _REMOTE_SCHEMES:
            raise MedmtlError(f"{_redact(text)}: is a tracking server, open it in a browser instead")
        if scheme == "file":
            raise MedmtlError(
                f"{text}: a file store; MLflow 3.13+ needs a database (sqlite:///.../mlruns.db)"
            )
        db = _sqlite_path(text)
        return text, (db.parent / ARTIFACT_FOLDER).as_uri() if db is not None else None
    path = Path(text).expanduser()
    if path.is_dir():
        path = path / DB_NAME
        if not path.is_file():
            raise MedmtlError(f"{path.parent}: no {DB_NAME} here (no MLflow run has been recorded in it)")
    elif not path.is_file():
        raise MedmtlError(f"{path}: not found")
    path = path.absolute()
    return path_to_sqlite_uri(path), (path.parent / ARTIFACT_FOLDER).as_uri()


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI, None for other URIs or in-memory databases."""
    if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
        return None
    return Path(unquote(uri[len("sqlite:///") :].split("?")[0])).absolute()


def _redact(uri: str) -> str:
    """`uri` without a password, fit for logs (database URIs often carry one)."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


# ----------------------------------------------------------------------------------------------------------
# Params, names and PHI scrubbing


def _is_phi_key(key: Any) -> bool:
    """Whether any dotted/slashed part of `key` names a patient identifier, in any spelling or case."""
    parts = re.split(r"[./#]", str(key))
    return any(re.sub(r"[^a-z0-9]", "", part.lower()) in _PHI_KEYS for part in parts)


def scrub_identifiers(data: Any) -> Any:
    """Drop every mapping key named like a patient identifier, recursively.

    Args:
        data: a mapping, list or scalar (params, tags, config, case rows).

    Returns:
        A copy without keys such as PatientName, patient_id, PATIENTBIRTHDATE, AccessionNumber, (0010,0020),
        at any depth (dicts inside lists included); other values unchanged.
    """
    if isinstance(data, Mapping):
        return {k: scrub_identifiers(v) for k, v in data.items() if not _is_phi_key(k)}
    if isinstance(data, (list, tuple)):
        return [scrub_identifiers(v) for v in data]
    return data


def _mlflow_key(name: Any) -> str:
    """`name` made a valid MLflow metric/param/tag key (bundle ids like `train#trainer` are not)."""
    key = re.sub(r"[^\w.\- /]", "_", str(name))
    key = "/".join(
        part for part in key.split("/") if part not in ("", ".", "..")
    )  # must not look like a path
    return key[:MAX_ENTITY_KEY_LENGTH] or "_"


def flatten_params(params: Mapping[str, Any] | None, prefix: str = "") -> dict[str, str]:
    """Nested hyperparameters as MLflow params.

    Args:
        params: nested mapping; lists and other values become their string form.
        prefix: key prefix (used by the recursion).

    Returns:
        `{"a.b.c": "value"}` with keys made valid for MLflow, values truncated to MLflow's limit and keys
        named like patient identifiers dropped.
    """
    flat: dict[str, str] = {}
    for key, value in (params or {}).items():
        name = f"{prefix}{key}"
        if _is_phi_key(key):
            continue
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, prefix=f"{name}."))
            continue
        text = (
            json.dumps(scrub_identifiers(value), default=str)
            if isinstance(value, (list, tuple))
            else str(value)
        )
        flat[_mlflow_key(name)] = text[:MAX_PARAM_VAL_LENGTH]
    return flat


def _as_scalar(value: Any) -> float | None:
    """`value` as a float if it is one number (Python, NumPy or a one-element tensor), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (np.ndarray, np.generic, torch.Tensor)) and int(np.prod(value.shape)) == 1:
        item = value.item()
        return float(item) if isinstance(item, numbers.Real) and not isinstance(item, bool) else None
    return None


# ----------------------------------------------------------------------------------------------------------
# Validation table and overlays


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
        label_values = sorted(
            {int(v) for v in np.unique(np.concatenate([label.ravel(), pred.ravel()]))} - {0}
        )
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


# ----------------------------------------------------------------------------------------------------------
# MLflow calls that never stop training, and the offline journal they fall back to

PENDING_FOLDER = "mlflow_pending"  # journals of runs that could not reach the store, inside the eval folder
JOURNAL_TAG = "medmtl.journal"  # run tag naming the journal a run was uploaded from (finds it on a re-sync)
_JOURNAL = ".jsonl"  # waiting for a sync
_CLAIMED = ".jsonl.syncing"  # taken by a sync that has not finished (interrupted, or failed)
_SYNCED = ".jsonl.synced"  # uploaded; kept for the record, never read again

# MLflow's HTTP defaults (7 retries with exponential backoff, about 4 minutes; 120 s timeout) block a training
# for minutes per call when the server is down. The tracker's calls use these unless the user set the variables:
# the journal keeps what a failed call would have logged, so retrying buys nothing. The timeout only matters for
# a host that never answers (a refused connection fails at once); it leaves a slow but live server time to reply.
_SHORT_HTTP_WAITS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
# Error codes of a store that answered and refused the request: journaling it would only fail again at sync.
_REJECTED = frozenset(
    {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE", "BAD_REQUEST"}
)


@contextlib.contextmanager
def _short_http_waits() -> Iterator[None]:
    """Short MLflow HTTP timeouts and no retries for the calls inside (MLflow reads them at each request)."""
    added = {k: v for k, v in _SHORT_HTTP_WAITS.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _store_unreachable(err: BaseException) -> bool:
    """Whether `err` means the store could not take the call (down, unreachable, full), not that it refused it."""
    if isinstance(err, MedmtlError):  # e.g. a deleted experiment: the user must act, a sync would fail too
        return False
    return not (isinstance(err, MlflowException) and err.error_code in _REJECTED)


def _now_ms() -> int:
    return int(time.time() * 1000)


class _Journal:
    """What one run would have logged to MLflow, kept on disk while the store is unreachable.

    `<folder>/<key>.jsonl` holds one JSON object per line, in order. Each is named (`op`) after the
    `MlflowClient` method that replays it: `run` (create or continue the run: experiment, name, tags, params;
    written first, and again after each restart), `log_batch` (metrics with their step and timestamp, params,
    tags), `log_dict`, `log_artifact`/`log_artifacts` (files copied to `<folder>/<key>/NNNN/`) and
    `set_terminated` (final status). Every line is flushed and fsynced: a crash loses nothing written before it.
    """

    def __init__(self, folder: Path, key: str, header: Mapping[str, Any]) -> None:
        self.folder = folder
        self.key = key
        self.header = dict(header)
        self.path = folder / f"{key}{_JOURNAL}"
        self._header_written = False
        self._next = 0  # next artifact copy number; 0: not yet looked up

    def append(self, record: Mapping[str, Any]) -> None:
        """Append one record (after the run header if this process has not written it, or a sync took the file)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        records = [record]
        if not self._header_written or not self.path.exists():
            records.insert(0, self.header)
        with self.path.open("a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())
        self._header_written = True

    def stash(self, source: Path | str) -> str:
        """Copy an artifact file or folder (links followed) into the journal; returns its path inside `folder`."""
        root = self.folder / self.key
        if not self._next:  # after a restart, carry on after the copies already there
            self._next = 1 + max((int(p.name) for p in root.glob("[0-9]*") if p.name.isdigit()), default=0)
        target = root / f"{self._next:04d}"
        self._next += 1
        source = Path(source)
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            target.mkdir(parents=True)
            shutil.copy2(source, target / source.name)
        for path in [target, *target.rglob("*")]:
            if path.is_file():
                with path.open("rb") as f:
                    os.fsync(f.fileno())
        copied = target if source.is_dir() else target / source.name
        return copied.relative_to(self.folder).as_posix()


def _journal_record(journal: _Journal, method: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict:
    """The journal record of `MlflowClient.<method>(run_id, *args, **kwargs)` (run id left out)."""
    if method == "log_batch":
        record: dict[str, Any] = {"op": method}
        if kwargs.get("metrics"):
            record["metrics"] = [
                {"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step} for m in kwargs["metrics"]
            ]
        for field in ("params", "tags"):
            if kwargs.get(field):
                record[field] = {item.key: item.value for item in kwargs[field]}
        return record
    if method == "log_dict":
        return {"op": method, "dictionary": args[0], "artifact_file": args[1]}
    if method in ("log_artifact", "log_artifacts"):
        artifact_path = args[1] if len(args) > 1 else kwargs.get("artifact_path")
        source = "local_path" if method == "log_artifact" else "local_dir"
        return {"op": method, source: journal.stash(args[0]), "artifact_path": artifact_path}
    if method == "set_terminated":
        status = args[0] if args else kwargs.get("status", RunStatus.to_string(RunStatus.FINISHED))
        return {"op": method, "status": status, "end_time": _now_ms()}
    raise ValueError(f"MlflowClient.{method} cannot be journaled")


class _Sink:
    """Every MLflow call of a tracker goes through `call`.

    While the store answers, calls go to it. The first call that cannot reach it (server down, database
    unavailable) is warned about once and switches the tracker to its journal for the rest of the run:
    that call and every later one is appended to `<journal_dir>/<key>.jsonl` instead, without touching the
    store again, so training speed is unaffected. `medmtl sync-mlflow` uploads the journal later. Other
    failures (a refused request, a broken overlay) are warned about once and dropped: tracking must never
    stop training.
    """

    def __init__(self, tracking_uri: str, journal_dir: Path) -> None:
        self.tracking_uri = tracking_uri
        self.journal_dir = journal_dir
        self.journal_key: str | None = None  # set once a run is journaled, and by a checkpoint that says so
        self.journal: _Journal | None = None
        self.run_info: dict[str, Any] = {}  # what a journal needs to create the run later (set by the tracker)
        self._client: MlflowClient | None = None
        self.warned = False
        self._journal_warned = False

    @property
    def client(self) -> MlflowClient:
        """The MLflow client of this tracker, created on first use (creating it opens the store)."""
        if self._client is None:
            db = _sqlite_path(self.tracking_uri)
            if db is not None:
                db.parent.mkdir(parents=True, exist_ok=True)
            # Explicit URI, never the fluent global state: two trackers in one process must not collide.
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def call(self, what: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """`client.<method>(run_id, *args, **kwargs)`, journaled when the store is unreachable; None on failure."""
        if self.journal is None:
            try:
                with _short_http_waits():
                    return getattr(self.client, method)(*args, **kwargs)
            except Exception as err:  # MlflowException, connection errors, disk errors
                if not self.outage(what, err, run_id=args[0] if args else None):
                    return None
        try:
            self.journal.append(_journal_record(self.journal, method, args[1:], kwargs))
        except Exception as err:  # a full disk: nothing more can be done than saying so
            if not self._journal_warned:
                self._journal_warned = True
                logger.warning("MLflow offline journal %s: could not record %s: %s", self.journal.path, what, err)
        return None

    def outage(self, what: str, err: BaseException, run_id: str | None) -> bool:
        """Report a failed call; switch to the journal if the store is unreachable.

        Returns:
            Whether the run is now journaled (the call should be recorded there).
        """
        if not _store_unreachable(err) or not self.run_info:
            self.failed(what, err)
            return False
        journal = self.open_journal(run_id)
        self.warned = False  # the switch is always worth its one warning, whatever was reported before
        folder = self.journal_dir
        eval_dir = folder.parent if folder.name == PENDING_FOLDER else folder
        self.failed(
            what,
            err,
            f"Training goes on; this run is kept in {journal.path} until `medmtl sync-mlflow {eval_dir}` "
            "uploads it",
        )
        return True

    def open_journal(self, run_id: str | None) -> _Journal:
        """Journal the run from now on (the checkpoint's journal key if any, else a new one)."""
        if self.journal_key is None:
            self.journal_key = f"{_safe_filename(str(self.run_info.get('run_name', 'run')))}-{uuid.uuid4().hex[:8]}"
        header = {"op": "run", "run_id": run_id, "start_time": _now_ms(), **self.run_info}
        self.journal = _Journal(self.journal_dir, self.journal_key, header)
        return self.journal

    def failed(self, what: str, err: BaseException, consequence: str | None = None) -> None:
        """Report a tracking failure: a warning the first time, debug level afterwards."""
        reason = (str(err).strip().splitlines() or [""])[0][:300]
        where = _redact(self.tracking_uri)
        message = f"MLflow tracking failed while {what} ({where}): {type(err).__name__}: {reason}"
        if self.warned:
            logger.debug(message)
            return
        self.warned = True
        consequence = consequence or "Training goes on; further tracking failures are logged at debug level"
        logger.warning("%s. %s.", message, consequence)


def _experiment_id(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    """The id of experiment `name`, created (with `artifact_location`) if missing."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException as err:  # another process created it meanwhile
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)
    if experiment.lifecycle_stage != "active":
        raise MedmtlError(f"MLflow experiment {name!r} is deleted; restore it or use another name")
    return experiment.experiment_id


def _journal_folder(journal_dir: Path | str | None, artifact_dir: Path | str) -> Path:
    """`journal_dir` as an absolute path; by default `mlflow_pending` beside a local `artifact_dir`."""
    if journal_dir is not None:
        return Path(journal_dir).expanduser().absolute()
    text = str(artifact_dir)
    parts = urlsplit(text)
    if parts.scheme == "file":
        return Path(unquote(parts.path)).parent / PENDING_FOLDER
    if len(parts.scheme) > 1:  # s3://, gs://: no local folder to put it beside
        return Path.cwd() / PENDING_FOLDER
    return Path(text).expanduser().absolute().parent / PENDING_FOLDER


class _OpenRun:
    """The run a tracker has open; shared with its finalizer, so it must not refer to the tracker."""

    def __init__(self) -> None:
        self.sink: _Sink | None = None
        self.run_id: str | None = None

    def end(self, status: str) -> None:
        if self.sink is not None and self.run_id is not None:
            run_id, self.run_id = self.run_id, None
            self.sink.call(f"ending the run {status}", "set_terminated", run_id, status)


def _end_if_open(open_run: _OpenRun) -> None:
    # A run still open when the tracker is collected or the interpreter exits did not complete: this covers
    # the case where another EXCEPTION_RAISED handler (MONAI's StatsHandler, CheckpointSaver) re-raised first.
    open_run.end(RunStatus.to_string(RunStatus.FAILED))


def _is_rank0() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


def _never_raises(what: str) -> Callable:
    """Decorate an event handler so that a tracking error is reported through the sink, never raised."""

    def wrap(method: Callable) -> Callable:
        @functools.wraps(method)
        def handler(self: MLflowTracker, *args: Any) -> None:
            try:
                method(self, *args)
            except Exception as err:  # rendering, files, MLflow: training must go on
                self._sink.failed(what, err)

        return handler

    return wrap


# ----------------------------------------------------------------------------------------------------------
# The handler


class MLflowTracker:
    """An ignite handler that records one training (trainer + evaluator) as one MLflow run.

    Attach it to both engines: `attach(trainer)` and `attach(evaluator)` (a MONAI `Evaluator` is recognised,
    so the same instance can sit in a bundle's `train#handlers` and `validate#handlers`), or
    `attach(trainer, evaluator)`. Put it in a checkpoint's `save_dict`/`load_dict` so a resumed training
    continues the same run: the run starts lazily at the first thing to log, after MONAI's CheckpointLoader
    (Events.STARTED) restored the run id.

    Events: trainer EPOCH_COMPLETED logs `train/*` metrics at step=epoch; evaluator EPOCH_COMPLETED logs all
    scalar metrics at the trainer's epoch, the case table and the worst-case overlays; trainer COMPLETED
    logs the best checkpoint and the run description and ends the run FINISHED; EXCEPTION_RAISED ends it
    FAILED (KILLED for Ctrl-C) and re-raises. Without a trainer (evaluation only), the evaluator's
    COMPLETED/EXCEPTION_RAISED end the run. Only rank 0 of a distributed run logs.

    NaN metric values are not logged: in medmtl NaN means "term or metric absent" (a head switched off).
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment_name: str,
        artifact_dir: Path | str,
        label_names: Mapping[int, str],
        params: Mapping[str, Any] | None = None,
        config: Mapping[str, Any] | None = None,
        run_name: str | None = None,
        description: str | None = None,
        best_checkpoint: Path | str | None = None,
        dataset: str | None = None,
        heads: Sequence[str] | None = None,
        tags: Mapping[str, Any] | None = None,
        key_metric: str = "val/mean_dice",
        n_worst: int = 3,
        journal_dir: Path | str | None = None,
    ) -> None:
        """
        Args:
            tracking_uri: the MLflow store (see `resolve_tracking_uri`).
            experiment_name: experiment of the run; created if missing.
            artifact_dir: where a new experiment keeps its artifacts (absolute; `<eval_dir>/mlruns` next to
                the SQLite db is the convention). Used when the experiment is created, for database
                stores; a tracking server (http) keeps its own artifact store unless this is a URI.
            label_names: `{label value: structure name}`, e.g. `{1: "organ", 2: "lesion"}`.
            params: hyperparameters, nested; logged flattened once per run.
            config: the resolved bundle config, logged as `config/resolved_config.json`.
            run_name: readable run name; default `<experiment>-<YYYYmmdd-HHMMSS>`.
            description: text put at the top of the run description.
            best_checkpoint: file (or glob, newest match) logged as `model/model.pt` when training completes.
            dataset: dataset name for the description and the `medmtl.dataset` tag.
            heads: active heads (e.g. `["seg", "cls", "boundary"]`) for the description and a tag.
            tags: more run tags.
            key_metric: evaluator metric whose maximum is reported as the best (higher is better).
            n_worst: number of worst validation cases drawn as overlays.
            journal_dir: where the run is journaled while the store is unreachable (for `medmtl sync-mlflow`);
                default `mlflow_pending` next to `artifact_dir` (`<eval_dir>/mlflow_pending` for the
                convention above; in the working directory when `artifact_dir` is a remote URI).
        """
        self.experiment_name = experiment_name
        self.artifact_dir = artifact_dir
        self.label_names = {int(k): str(v) for k, v in label_names.items()}
        self.params = flatten_params(params)
        self.config = config
        # readable in the UI's run list, which cuts long names: what was trained, with which heads, when
        self.run_name = run_name or " ".join(
            [dataset or experiment_name, "+".join(heads or []) or "run", time.strftime("%m-%d %H:%M:%S")]
        )
        self.description = description
        self.best_checkpoint = best_checkpoint
        self.dataset = dataset
        self.heads = list(heads or [])
        self.tags = {
            _mlflow_key(k): str(v)[:MAX_TAG_VAL_LENGTH]
            for k, v in scrub_identifiers(dict(tags or {})).items()
        }
        self.key_metric = key_metric
        self.n_worst = n_worst
        self.best_metric: float | None = None
        self.best_epoch: int | None = None
        self._sink = _Sink(tracking_uri, _journal_folder(journal_dir, artifact_dir))
        self._run_id: str | None = None  # set by a new run or by load_state_dict
        self._open = _OpenRun()
        self._open.sink = self._sink
        self._trainer: Engine | None = None
        weakref.finalize(self, _end_if_open, self._open)

    @property
    def tracking_uri(self) -> str:
        """The MLflow store this tracker writes to."""
        return self._sink.tracking_uri

    @property
    def run_id(self) -> str | None:
        """The MLflow run id, None before the run started or while a run that started offline is journaled."""
        return self._run_id

    @property
    def journal(self) -> Path | None:
        """The journal file this run is kept in while the store is unreachable, None while it is online."""
        return self._sink.journal.path if self._sink.journal is not None else None

    # -- checkpointing --------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """State for a checkpoint: `{"run_id", "journal", "best_metric", "best_epoch"}`.

        `journal` is the local key of a run kept in the offline journal (None while online); a run that was
        journaled stays journaled after a restart. Starts the run if it has not started yet, so that a
        checkpoint always names the run; an ended run is not reopened (a final checkpoint saved after the
        tracker finished the run at COMPLETED).
        """
        if self._run_id is None and self._sink.journal_key is None:
            self._ensure_run()
        return {
            "run_id": self._run_id,
            "journal": self._sink.journal_key,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the run named by a checkpoint (MONAI's CheckpointLoader calls this at Events.STARTED).

        Args:
            state: a `state_dict()` result.
        """
        run_id, journal_key = state.get("run_id"), state.get("journal")
        if self._open.run_id is not None and (run_id, journal_key) != (self._run_id, self._sink.journal_key):
            logger.warning(
                "MLflow run %s is already open; not switching to %s from the checkpoint",
                self._open.run_id,
                run_id or journal_key,
            )
            return
        self._run_id = run_id
        self._sink.journal_key = journal_key
        self.best_metric = state.get("best_metric")
        self.best_epoch = state.get("best_epoch")

    # -- attaching ------------------------------------------------------------------------------------------

    def attach(self, engine: Engine, evaluator: Engine | None = None) -> None:
        """Attach to an engine: a MONAI `Evaluator` as the evaluator, any other engine as the trainer.

        Args:
            engine: the trainer, or a MONAI evaluator.
            evaluator: the evaluator, when attaching both at once.
        """
        from monai.engines import Evaluator

        if isinstance(engine, Evaluator):
            self.attach_evaluator(engine)
        else:
            self.attach_trainer(engine)
        if evaluator is not None:
            self.attach_evaluator(evaluator)

    def attach_trainer(self, trainer: Engine) -> None:
        """Log training metrics each epoch, end the run when training completes or fails.

        Args:
            trainer: the training engine; its epoch is also the step of validation metrics.
        """
        self._trainer = trainer
        for event, handler in (
            (Events.EPOCH_COMPLETED, self._on_train_epoch),
            (Events.COMPLETED, self._on_train_completed),
            (Events.EXCEPTION_RAISED, self._on_train_exception),
        ):
            if not trainer.has_event_handler(handler, event):
                trainer.add_event_handler(event, handler)

    def attach_evaluator(self, evaluator: Engine) -> None:
        """Log validation metrics, the case table and overlays after each validation round.

        Attach it after the handler that fills `evaluator.state.metrics` and `case_results`.

        Args:
            evaluator: the validation engine (run by the trainer, e.g. via MONAI's ValidationHandler).
        """
        for event, handler in (
            (Events.EPOCH_COMPLETED, self._on_validation),
            (Events.COMPLETED, self._on_eval_completed),
            (Events.EXCEPTION_RAISED, self._on_eval_exception),
        ):
            if not evaluator.has_event_handler(handler, event):
                evaluator.add_event_handler(event, handler)

    # -- event handlers -------------------------------------------------------------------------------------

    @_never_raises("logging training metrics")
    def _on_train_epoch(self, trainer: Engine) -> None:
        metrics = {k: v for k, v in trainer.state.metrics.items() if str(k).startswith("train/")}
        self._log_metrics(metrics, step=trainer.state.epoch)

    @_never_raises("logging validation results")
    def _on_validation(self, evaluator: Engine) -> None:
        # ValidationHandler runs evaluator.run(trainer epoch), so evaluator.state.epoch equals it; the
        # trainer's own counter is still the reference when there is one (a plain ignite evaluator restarts).
        step = self._trainer.state.epoch if self._trainer is not None else evaluator.state.epoch
        metrics = dict(evaluator.state.metrics)
        self._log_metrics(metrics, step=step)
        key_value = _as_scalar(metrics.get(self.key_metric))
        if (
            key_value is not None
            and not np.isnan(key_value)
            and (self.best_metric is None or key_value > self.best_metric)
        ):
            self.best_metric, self.best_epoch = key_value, int(step)
        cases = getattr(evaluator.state, "case_results", None)
        if cases:
            self._log_cases(cases, step)

    @_never_raises("finishing the run")
    def _on_train_completed(self, trainer: Engine) -> None:
        self._finish()

    @_never_raises("finishing the run")
    def _on_eval_completed(self, evaluator: Engine) -> None:
        if self._trainer is None:  # evaluation only; under a trainer the trainer ends the run
            self._finish()

    def _on_train_exception(self, trainer: Engine, err: BaseException) -> None:
        self._end_failed(err)
        # Re-raise as MONAI's handlers do: ignite gives an exception to the first EXCEPTION_RAISED handler.
        raise err

    def _on_eval_exception(self, evaluator: Engine, err: BaseException) -> None:
        if self._trainer is None:
            self._end_failed(err)
        raise err

    # -- run lifecycle --------------------------------------------------------------------------------------

    def _ensure_run(self) -> str | None:
        """The open run's id, starting or resuming the run first; None if tracking is off or failing."""
        if self._open.run_id is not None:
            return self._open.run_id
        if not _is_rank0():
            return None
        self._sink.run_info = self._journal_info()
        resumed_config = f"config/resolved_config_resumed_{time.strftime('%Y%m%d-%H%M%S')}.json"
        if self._sink.journal_key is not None:  # journaled once, journaled for good: one place to sync from
            if self._sink.journal is None:
                logger.warning(
                    "MLflow: the checkpoint's run is kept offline in %s; upload it with `medmtl sync-mlflow`",
                    self._sink.open_journal(self._run_id).path,
                )
            else:  # reopened after it ended: a new header sets it running again when replayed
                self._sink.open_journal(self._run_id)
            return self._open_offline(resumed_config)
        resuming = self._run_id is not None
        try:
            with _short_http_waits():
                run_id = self._resume_run(self._run_id) if self._run_id else None
                if run_id is None and self._run_id is None:
                    run_id = self._create_run()
        except Exception as err:  # a store that cannot be opened must not stop training either
            if not self._sink.outage("starting the run", err, run_id=self._run_id):
                return None
            return self._open_offline(resumed_config if resuming else "config/resolved_config.json")
        if self._sink.journal is not None:  # the store failed halfway through setting the run up
            return self._open_offline(None)
        self._open.run_id = run_id
        return run_id

    def _open_offline(self, config_file: str | None) -> str:
        """Mark the journaled run open and journal its config; returns the id the handlers pass around."""
        key = self._sink.journal_key
        self._open.run_id = self._run_id or f"journal:{key}"  # the MLflow id when the run was created before
        if config_file:
            self._log_config(self._open.run_id, config_file)
        return self._open.run_id

    def _journal_info(self) -> dict[str, Any]:
        """What the journal records about the run so that a sync can create it (header of each session)."""
        return {
            "experiment": self.experiment_name,
            "artifact_dir": str(self.artifact_dir),
            "run_name": self.run_name,
            "tags": self._start_tags(),
            "params": self.params,
        }

    def _resume_run(self, run_id: str) -> str | None:
        """Set the checkpoint's run RUNNING again; a run missing from this store is replaced by a new one."""
        try:
            run = self._sink.client.get_run(run_id)
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            run = None
        if run is None or run.info.lifecycle_stage != "active":
            logger.warning(
                "MLflow run %s from the checkpoint is not in %s (or deleted); starting a new run",
                run_id,
                _redact(self.tracking_uri),
            )
            self._run_id = None
            return None
        self._sink.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        self._run_id = run_id
        logged = run.data.params
        # MLflow refuses to change a logged param: log only new ones, record which ones changed.
        changed = sorted(k for k, v in self.params.items() if k in logged and logged[k] != v)
        self._log_params({k: v for k, v in self.params.items() if k not in logged}, run_id)
        tags = dict(self._start_tags())
        if changed:
            logger.warning(
                "resumed MLflow run %s with changed params (MLflow keeps the first values): %s",
                run_id,
                ", ".join(changed),
            )
            tags["medmtl.params_changed_on_resume"] = ", ".join(changed)[:MAX_TAG_VAL_LENGTH]
        self._set_tags(tags, run_id)
        self._log_config(run_id, f"config/resolved_config_resumed_{time.strftime('%Y%m%d-%H%M%S')}.json")
        logger.info(
            "MLflow: resumed run %r (%s) in %s", run.info.run_name, run_id, _redact(self.tracking_uri)
        )
        return run_id

    def _create_run(self) -> str:
        """Create the run (and the experiment) and log params, tags and config."""
        client = self._sink.client
        experiment_id = _experiment_id(client, self.experiment_name, self._artifact_location())
        run = client.create_run(experiment_id, run_name=self.run_name, tags=self._start_tags())
        run_id = run.info.run_id
        self._run_id = run_id
        self._log_params(self.params, run_id)
        self._log_config(run_id, "config/resolved_config.json")
        logger.info(
            "MLflow: run %r (%s) in experiment %r at %s",
            self.run_name,
            run_id,
            self.experiment_name,
            _redact(self.tracking_uri),
        )
        return run_id

    def _artifact_location(self) -> str | None:
        """Artifact root of a new experiment: `artifact_dir` as an absolute URI; a server's own store."""
        text = str(self.artifact_dir)
        if len(urlsplit(text).scheme) > 1:  # already a URI (s3://, file://)
            return text
        if urlsplit(self.tracking_uri).scheme in _REMOTE_SCHEMES:
            return None  # a client-side folder would be invisible to the server's UI
        return Path(text).expanduser().absolute().as_uri()

    def _finish(self) -> None:
        run_id = self._ensure_run()
        if run_id is None:
            return
        checkpoint = self._best_checkpoint_file()
        if checkpoint is not None:
            with tempfile.TemporaryDirectory() as tmp:
                target = Path(tmp) / "model.pt"  # a stable artifact name whatever the saver called the file
                try:
                    target.symlink_to(checkpoint.absolute())
                except OSError:
                    shutil.copy2(checkpoint, target)
                self._sink.call("logging the best checkpoint", "log_artifact", run_id, str(target), "model")
        self._set_tags(self._end_tags(), run_id)
        self._open.end(RunStatus.to_string(RunStatus.FINISHED))

    def _end_failed(self, err: BaseException) -> None:
        if self._open.run_id is None:
            return
        status = RunStatus.KILLED if isinstance(err, KeyboardInterrupt) else RunStatus.FAILED
        self._set_tags({"medmtl.error": f"{type(err).__name__}: {str(err)[:500]}"}, self._open.run_id)
        self._open.end(RunStatus.to_string(status))

    def _best_checkpoint_file(self) -> Path | None:
        if not self.best_checkpoint:
            return None
        path = Path(self.best_checkpoint)
        if path.is_file():
            return path
        if any(c in path.name for c in "*?["):
            matches = [p for p in path.parent.glob(path.name) if p.is_file()]
            return max(matches, key=lambda p: p.stat().st_mtime) if matches else None
        return None

    # -- what is logged -------------------------------------------------------------------------------------

    def _start_tags(self) -> dict[str, str]:
        tags = dict(self.tags)
        if self.dataset:
            tags["medmtl.dataset"] = str(self.dataset)
        if self.heads:
            tags["medmtl.heads"] = ", ".join(map(str, self.heads))
        tags[NOTE_TAG] = self._note()
        return tags

    def _end_tags(self) -> dict[str, str]:
        tags = {NOTE_TAG: self._note()}
        if self.best_metric is not None:
            tags["medmtl.best"] = f"{self.key_metric}={self.best_metric:.4f} (epoch {self.best_epoch})"
        return tags

    def _note(self) -> str:
        """The run description shown in the MLflow UI (markdown)."""
        lines = [self.description.strip(), ""] if self.description else []
        lines.append(f"- dataset: {self.dataset or 'not given'}")
        lines.append(f"- heads: {', '.join(map(str, self.heads)) or 'not given'}")
        lines.append(f"- structures: {', '.join(f'{k} {v}' for k, v in sorted(self.label_names.items()))}")
        if self.best_metric is not None:
            lines.append(f"- best {self.key_metric}: {self.best_metric:.4f} (epoch {self.best_epoch})")
        return "\n".join(lines)[:MAX_TAG_VAL_LENGTH]

    def _log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        timestamp = int(time.time() * 1000)
        entries = []
        for name, value in metrics.items():
            scalar = _as_scalar(value)
            if scalar is not None and not np.isnan(scalar):  # NaN: the term/metric is absent
                entries.append(Metric(_mlflow_key(name), scalar, timestamp, int(step)))
        if not entries:
            return
        run_id = self._ensure_run()
        if run_id is None:
            return
        for start in range(0, len(entries), MAX_METRICS_PER_BATCH):
            self._sink.call(
                f"logging metrics at step {step}",
                "log_batch",
                run_id,
                metrics=entries[start : start + MAX_METRICS_PER_BATCH],
            )

    def _log_params(self, params: Mapping[str, str], run_id: str) -> None:
        items = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self._sink.call(
                "logging params", "log_batch", run_id, params=items[start : start + MAX_PARAMS_TAGS_PER_BATCH]
            )

    def _set_tags(self, tags: Mapping[str, str], run_id: str) -> None:
        items = [RunTag(k, str(v)[:MAX_TAG_VAL_LENGTH]) for k, v in scrub_identifiers(dict(tags)).items()]
        for start in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self._sink.call(
                "setting tags", "log_batch", run_id, tags=items[start : start + MAX_PARAMS_TAGS_PER_BATCH]
            )

    def _log_config(self, run_id: str, artifact_file: str) -> None:
        if self.config is None:
            return
        # A JSON round trip turns objects of a resolved config (networks, transforms) into their text.
        config = json.loads(json.dumps(scrub_identifiers(self.config), default=str))
        self._sink.call("logging the config", "log_dict", run_id, config, artifact_file)

    def _log_cases(self, cases: Sequence[Mapping[str, Any]], step: int) -> None:
        run_id = self._ensure_run()
        if run_id is None:
            return
        epoch = f"epoch_{int(step):03d}"
        with tempfile.TemporaryDirectory() as tmp:
            write_case_table(cases, Path(tmp, "validation", f"cases_{epoch}.csv"))
            drawable = [c for c in _worst_first(cases) if isinstance(c.get("overlay"), Mapping)]
            for rank, case in enumerate(drawable[: self.n_worst], start=1):
                name = f"{rank:02d}_{_safe_filename(str(case.get('case_id', 'case')))}.png"
                render_overlay(
                    case["overlay"],
                    _overlay_title(case, self.label_names),
                    Path(tmp, "overlays", epoch, name),
                    label_values=sorted(self.label_names),
                )
            self._sink.call(f"logging validation artifacts of {epoch}", "log_artifacts", run_id, tmp)


# ----------------------------------------------------------------------------------------------------------
# Uploading journaled runs later (`medmtl sync-mlflow`)


@dataclass
class SyncResult:
    """What became of one journal file.

    Attributes:
        journal: the journal file as it was found.
        store: the tracking URI it was uploaded to, without a password.
        run_id: the MLflow run it was uploaded to (None if it failed before the run was known).
        records: journal records replayed.
        error: why it could not be uploaded, one line naming the file and line; None when uploaded.
    """

    journal: Path
    store: str = ""
    run_id: str | None = None
    records: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the whole journal was uploaded."""
        return self.error is None


def sync_pending_runs(eval_dir: Path | str, tracking_uri: str | None = None) -> list[SyncResult]:
    """Upload the journals of runs that could not reach their MLflow store (`<eval_dir>/mlflow_pending`).

    Each journal is renamed `<key>.jsonl.syncing` first (a training still writing to it starts a new
    `<key>.jsonl`), replayed in order, then renamed `<key>.jsonl.synced`: a second sync finds nothing to do.
    A run is created with its original name, start time, tags and params, or continued when the journal names
    a run id the store has; metrics keep their steps and timestamps. A sync that is interrupted or fails leaves
    the `.syncing` file, and the next sync replays it from the start into the same run (found by its run id or
    its `medmtl.journal` tag): replaying is idempotent (equal params are accepted, an identical metric is
    stored once, artifacts and tags are overwritten, the status is set again).

    Args:
        eval_dir: the training's eval folder (or its `mlflow_pending` folder).
        tracking_uri: the store to upload to; default `resolve_tracking_uri(eval_dir)`, i.e.
            `MLFLOW_TRACKING_URI` or `<eval_dir>/mlruns.db`.

    Returns:
        One result per journal file, in upload order; empty when nothing is pending. Journals of one run stop at
        its first failure (later ones stay pending).

    Raises:
        MedmtlError: `eval_dir` is not a folder, or the tracking URI is not a usable store.
    """
    eval_dir = Path(eval_dir).expanduser()
    if not eval_dir.is_dir():
        raise MedmtlError(f"{eval_dir}: not a folder (expected a training's eval folder)")
    if eval_dir.name == PENDING_FOLDER:
        eval_dir = eval_dir.parent
    folder = eval_dir / PENDING_FOLDER
    uri = resolve_tracking_uri(eval_dir, tracking_uri)
    keys = sorted({p.name.split(".jsonl")[0] for p in folder.glob("*.jsonl*") if not p.name.endswith(_SYNCED)})
    if not keys:
        return []
    client = _open_store(uri)
    results = []
    with _short_http_waits():
        for key in keys:
            for journal in (folder / f"{key}{_CLAIMED}", folder / f"{key}{_JOURNAL}"):
                if not journal.exists():
                    continue
                result = _sync_journal(client, uri, journal, key)
                results.append(result)
                if not result.ok:
                    break
    return results


def _open_store(uri: str) -> MlflowClient:
    """An MLflow client on `uri`; a URI MLflow cannot use is a user error."""
    db = _sqlite_path(uri)
    try:
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        client = MlflowClient(tracking_uri=uri)  # checks the scheme; a server is first contacted later
    except Exception as err:
        reason = (str(err).strip().splitlines() or [""])[0][:300]
        raise MedmtlError(f"tracking URI {_redact(uri)!r}: cannot open the MLflow store ({reason})") from None
    return client


def _sync_journal(client: MlflowClient, uri: str, journal: Path, key: str) -> SyncResult:
    """Claim one journal file, replay it, mark it synced."""
    result = SyncResult(journal=journal, store=_redact(uri))
    claimed = journal.with_name(f"{key}{_CLAIMED}")
    try:
        if journal != claimed:
            journal.rename(claimed)
        lines = claimed.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        result.error = f"{journal}: cannot read it ({err})"
        return result
    run_id: str | None = None
    op = None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            op = record.get("op")
            if op == "run":
                run_id = _replay_run(client, uri, record, key, run_id)
            elif run_id is None:
                raise ValueError("the journal does not start with a run record")
            else:
                _replay(client, claimed.parent, run_id, record)
        except json.JSONDecodeError:
            if number == len(lines):  # the last line cut short by a crash while it was being written
                logger.warning("%s line %d: cut short, ignored", claimed, number)
                continue
            result.error = f"{claimed} line {number}: not a JSON record"
            return result
        except Exception as err:  # an unreachable store, a refused call, a missing artifact copy
            reason = (str(err).strip().splitlines() or [""])[0][:300]
            result.error = f"{claimed} line {number} ({op}): {type(err).__name__}: {reason}"
            result.run_id = run_id
            return result
        result.records += 1
    result.run_id = run_id
    synced = claimed.with_name(f"{key}{_SYNCED}")
    number = 1
    while synced.exists():  # journals of one run synced before (it went on offline after a sync)
        number += 1
        synced = claimed.with_name(f"{key}{_SYNCED}.{number}")
    claimed.rename(synced)
    return result


def _replay_run(client: MlflowClient, uri: str, record: Mapping[str, Any], key: str, run_id: str | None) -> str:
    """Create the run of a journal, or set it running again; log its new params and its tags."""
    run_id = run_id or _find_run(client, record, key)
    if run_id is None:
        artifact_location = _sync_artifact_location(uri, record.get("artifact_dir"))
        experiment_id = _experiment_id(client, record["experiment"], artifact_location)
        # tagged at creation: an interrupted sync finds this run again instead of creating a second one
        run = client.create_run(
            experiment_id, start_time=record.get("start_time"), tags={JOURNAL_TAG: key}, run_name=record.get("run_name")
        )
        run_id, logged = run.info.run_id, {}
    else:
        logged = client.get_run(run_id).data.params
        client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
    params = dict(record.get("params") or {})
    tags = {**(record.get("tags") or {}), JOURNAL_TAG: key}
    # MLflow refuses to change a logged param: as on an online resume, log new ones and record the change
    changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v)
    if changed:
        tags["medmtl.params_changed_on_resume"] = ", ".join(changed)[:MAX_TAG_VAL_LENGTH]
    new = [Param(k, v) for k, v in params.items() if k not in logged]
    for start in range(0, len(new), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=new[start : start + MAX_PARAMS_TAGS_PER_BATCH])
    items = [RunTag(k, v) for k, v in tags.items()]
    for start in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, tags=items[start : start + MAX_PARAMS_TAGS_PER_BATCH])
    return run_id


def _find_run(client: MlflowClient, record: Mapping[str, Any], key: str) -> str | None:
    """The run a journal continues: the run id it names if the store has it, else the run tagged with `key`."""
    if record.get("run_id"):
        try:
            run = client.get_run(record["run_id"])
            if run.info.lifecycle_stage == "active":
                return run.info.run_id
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
    experiment = client.get_experiment_by_name(record["experiment"])
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`{JOURNAL_TAG}` = '{key}'", max_results=1
    )
    return runs[0].info.run_id if runs else None


def _sync_artifact_location(uri: str, artifact_dir: str | None) -> str | None:
    """Artifact root of an experiment created by a sync: a URI given to the tracker, else next to the store."""
    if artifact_dir and len(urlsplit(artifact_dir).scheme) > 1:
        return artifact_dir
    if urlsplit(uri).scheme in _REMOTE_SCHEMES:
        return None  # the server's own artifact store
    db = _sqlite_path(uri)
    if db is not None:
        return (db.parent / ARTIFACT_FOLDER).as_uri()
    return Path(artifact_dir).absolute().as_uri() if artifact_dir else None


def _replay(client: MlflowClient, folder: Path, run_id: str, record: Mapping[str, Any]) -> None:
    """Replay one journal record (other than `run`) into `run_id`."""
    op = record.get("op")
    if op == "log_batch":
        client.log_batch(
            run_id,
            metrics=[Metric(m["key"], m["value"], m["timestamp"], m["step"]) for m in record.get("metrics", [])],
            params=[Param(k, v) for k, v in record.get("params", {}).items()],
            tags=[RunTag(k, v) for k, v in record.get("tags", {}).items()],
        )
    elif op == "log_dict":
        client.log_dict(run_id, record["dictionary"], record["artifact_file"])
    elif op in ("log_artifact", "log_artifacts"):
        local = folder / record["local_path" if op == "log_artifact" else "local_dir"]
        if not local.exists():
            raise FileNotFoundError(f"{local}: the journal's copy of the artifact is missing")
        getattr(client, op)(run_id, str(local), record.get("artifact_path"))
    elif op == "set_terminated":
        client.set_terminated(run_id, record["status"], end_time=record.get("end_time"))
    else:
        raise ValueError(f"unknown journal operation {op!r}")


# ----------------------------------------------------------------------------------------------------------
# MONAI's own MLflow handler


def drop_duplicate_mlflow_handlers(handlers: Sequence[Any] | None) -> list[Any]:
    """Remove the `monai.handlers.MLFlowHandler` that `monai.bundle run ... --tracking mlflow` appends.

    medmtl bundles record runs with `MLflowTracker`; MONAI's handler would open a second run with other
    metric names. Bundle configs pass `train#handlers` and `validate#handlers` through this function.

    Args:
        handlers: a handler list (None is an empty list).

    Returns:
        The list without MLFlowHandler instances, order kept.
    """
    from monai.handlers import MLFlowHandler

    handlers = list(handlers or [])
    kept = [h for h in handlers if not isinstance(h, MLFlowHandler)]
    if len(kept) != len(handlers):
        logger.info(
            "dropped %d MONAI MLFlowHandler (from --tracking mlflow): medmtl's MLflowTracker "
            "already records this run",
            len(handlers) - len(kept),
        )
    return kept
