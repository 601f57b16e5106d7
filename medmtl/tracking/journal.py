"""MLflow calls that never stop training, and the offline journal they fall back to.

Every MLflow call of a tracker goes through `_Sink.call`: a tracking store that fails (server down, disk full)
is warned about once and never stops training. From then on the run is written to a journal,
`<eval_dir>/mlflow_pending/<key>.jsonl` (+ copies of its artifacts), without contacting the store again;
`medmtl.tracking.sync.sync_pending_runs` (`medmtl sync-mlflow EVAL_DIR`) uploads it later. MLflow has no
offline mode of its own (its async logging still needs the store), hence this journal.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH

from medmtl.errors import MedmtlError
from medmtl.tracking.review import _safe_filename
from medmtl.tracking.store import _redact, _sqlite_path

logger = logging.getLogger(__name__)

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

    def log_batch(self, what: str, run_id: str, key: str, items: Sequence[Any]) -> None:
        """`log_batch(run_id, <key>=items)` in chunks MLflow accepts (`key`: metrics, params or tags)."""
        size = MAX_METRICS_PER_BATCH if key == "metrics" else MAX_PARAMS_TAGS_PER_BATCH
        for start in range(0, len(items), size):
            self.call(what, "log_batch", run_id, **{key: list(items[start : start + size])})

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
            f"Training goes on; this run is kept in {journal.path} until `medmtl sync-mlflow {eval_dir}` uploads it",
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


def _never_raises(what: str) -> Callable:
    """Decorate a tracker's event handler so that a tracking error is reported through its sink, never raised."""

    def wrap(method: Callable) -> Callable:
        @functools.wraps(method)
        def handler(self: Any, *args: Any) -> None:
            try:
                method(self, *args)
            except Exception as err:  # rendering, files, MLflow: training must go on
                self._sink.failed(what, err)

        return handler

    return wrap
