"""`medmtl sync-mlflow`: upload the runs that were journaled while their MLflow store was unreachable."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_PARAMS_TAGS_PER_BATCH, MAX_TAG_VAL_LENGTH

from medmtl.errors import MedmtlError
from medmtl.tracking.journal import _CLAIMED, _JOURNAL, _SYNCED, JOURNAL_TAG, PENDING_FOLDER, _short_http_waits
from medmtl.tracking.store import (
    _REMOTE_SCHEMES,
    ARTIFACT_FOLDER,
    _experiment_id,
    _redact,
    _sqlite_path,
    resolve_tracking_uri,
)

logger = logging.getLogger(__name__)


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
