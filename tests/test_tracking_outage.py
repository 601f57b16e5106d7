"""Training through a tracking outage: the run is journaled locally, `medmtl sync-mlflow` uploads it later.

Unit tests use the tiny fake trainer/evaluator of test_tracking.py; one test trains the real phantom bundle
in a subprocess against a closed loopback port and syncs it with the real command.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ignite.engine import Events
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from monai.handlers import CheckpointLoader, CheckpointSaver
from monai.utils import path_to_sqlite_uri
from test_phantom_bundle import CONFIGS, REPO_ROOT, TINY
from test_tracking import WORST_THREE, _engines, _history, _only_run, _tracker

from medmtl.cli import main as medmtl_main
from medmtl.tracking import JOURNAL_TAG, _short_http_waits, sync_pending_runs


@pytest.fixture(autouse=True)
def _no_env_tracking_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)  # the tracker's own short waits must do it


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory) -> str:
    """The store syncs upload to, shared by the module (creating one costs seconds); experiments differ."""
    return path_to_sqlite_uri(tmp_path_factory.mktemp("synced") / "synced.db")


def _closed_port_uri() -> str:
    """An http URI on a loopback port where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _records(journal: Path) -> list[dict]:
    return [json.loads(line) for line in journal.read_text().splitlines()]


def _artifact_paths(client: MlflowClient, run_id: str, path: str = "") -> list[str]:
    found = []
    for item in client.list_artifacts(run_id, path):
        found += _artifact_paths(client, run_id, item.path) if item.is_dir else [item.path]
    return sorted(found)


def _offline_training(tmp_path: Path, name: str, **kwargs):
    """Train the fake engines 2 epochs against a dead server; returns the tracker and the warnings logged."""
    best = tmp_path / "models" / "model.pt"
    best.parent.mkdir(parents=True, exist_ok=True)
    best.write_bytes(b"best weights")
    kwargs.setdefault("config", {"train": {"max_epochs": 2}})
    tracker = _tracker(_closed_port_uri(), tmp_path, name, best_checkpoint=best, **kwargs)
    trainer, evaluator = _engines()
    tracker.attach(trainer, evaluator)
    return tracker, trainer


def test_offline_run_is_journaled_then_synced_once(tmp_path, store_uri, caplog):
    tracker, trainer = _offline_training(tmp_path, "offline")
    with caplog.at_level(logging.WARNING):
        trainer.run([0], max_epochs=2)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and str(tracker.journal) in warnings[0]

    journal = tracker.journal
    assert journal == tmp_path / "eval" / "mlflow_pending" / f"{tracker.state_dict()['journal']}.jsonl"
    assert tracker.state_dict()["run_id"] is None
    records = _records(journal)
    assert [r["op"] for r in records][:2] == ["run", "log_dict"]
    assert records[0]["run_id"] is None and records[0]["run_name"] == "offline-run"
    assert records[0]["params"] == {"optim.lr": "0.001", "optim.name": "Adam", "net.channels": "[16, 32]"}
    assert records[-1]["op"] == "set_terminated" and records[-1]["status"] == "FINISHED"
    logged = [(m["key"], m["step"], m["timestamp"]) for r in records for m in r.get("metrics", [])]
    assert {(k, s) for k, s, _ in logged} >= {("train/loss", 1), ("train/loss", 2), ("val/mean_dice", 2)}
    copies = [r for r in records if r["op"] == "log_artifact"]
    assert (journal.parent / copies[0]["local_path"]).read_bytes() == b"best weights"  # a copy, not a link

    results = sync_pending_runs(tmp_path / "eval", store_uri)
    assert [(r.ok, r.records) for r in results] == [(True, len(records))]
    client = MlflowClient(store_uri)
    run = _only_run(client, "offline")
    assert results[0].run_id == run.info.run_id and run.info.run_name == "offline-run"
    assert run.info.status == "FINISHED" and run.info.start_time == records[0]["start_time"]
    assert run.data.params == records[0]["params"]
    assert run.data.tags["medmtl.dataset"] == "phantom" and run.data.tags[JOURNAL_TAG] == journal.stem
    assert "best val/mean_dice: 0.8000 (epoch 2)" in run.data.tags["mlflow.note.content"]
    assert _history(client, run.info.run_id, "train/loss") == [(1, 1.0), (2, 0.5)]
    synced = [(m.key, m.step, m.timestamp) for k in ("train/loss", "val/mean_dice")
              for m in client.get_metric_history(run.info.run_id, k)]  # fmt: skip
    assert sorted(synced) == sorted(x for x in logged if x[0] in ("train/loss", "val/mean_dice"))
    artifacts = _artifact_paths(client, run.info.run_id)
    assert {"config/resolved_config.json", "validation/cases_epoch_001.csv", "validation/cases_epoch_002.csv",
            "model/model.pt"} <= set(artifacts)  # fmt: skip
    assert [a for a in artifacts if a.startswith("overlays/epoch_002/")] == [
        f"overlays/epoch_002/{i:02d}_{c}.png" for i, c in enumerate(WORST_THREE, start=1)
    ]
    dl = Path(client.download_artifacts(run.info.run_id, "config/resolved_config.json", str(tmp_path / "dl")))
    assert json.loads(dl.read_text()) == {"train": {"max_epochs": 2}}

    assert not journal.exists() and journal.with_name(journal.name + ".synced").is_file()
    assert sync_pending_runs(tmp_path / "eval", store_uri) == []  # a second sync does nothing
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_failed_or_interrupted_sync_resumes_into_the_same_run(tmp_path, store_uri):
    tracker, trainer = _offline_training(tmp_path, "interrupted")
    trainer.run([0], max_epochs=2)
    journal = tracker.journal
    line = 1 + next(i for i, r in enumerate(_records(journal)) if r.get("local_dir", "").endswith("/0002"))
    with journal.open("a") as f:
        f.write('{"op": "log_ba')  # the last line cut short by a crash: ignored
    copies = journal.parent / journal.stem
    shutil.move(copies / "0002", tmp_path / "aside")  # the second validation's artifacts go missing

    failed = sync_pending_runs(tmp_path / "eval", store_uri)
    assert len(failed) == 1 and not failed[0].ok
    assert "0002" in failed[0].error and f" line {line} (log_artifacts)" in failed[0].error
    claimed = journal.with_name(journal.name + ".syncing")
    assert claimed.is_file() and not journal.exists()  # left for the next sync

    # An unreachable target fails fast, names the journal and keeps it.
    dead = sync_pending_runs(tmp_path / "eval", _closed_port_uri())
    assert not dead[0].ok and claimed.name in dead[0].error and claimed.is_file()

    shutil.move(tmp_path / "aside", copies / "0002")
    done = sync_pending_runs(tmp_path / "eval", store_uri)
    assert [r.ok for r in done] == [True] and done[0].run_id == failed[0].run_id
    client = MlflowClient(store_uri)
    run = _only_run(client, "interrupted")  # the first attempt's run was continued, not duplicated
    assert run.info.status == "FINISHED"
    assert _history(client, run.info.run_id, "train/loss") == [(1, 1.0), (2, 0.5)]  # replayed twice, stored once
    assert "overlays/epoch_002/01_case_3.png" in _artifact_paths(client, run.info.run_id)


def test_store_lost_mid_run_journals_the_rest_of_the_same_run(tmp_path, store_uri, caplog):
    tracker = _tracker(store_uri, tmp_path, "midway", config={"a": 1})
    trainer, evaluator = _engines()
    tracker.attach(trainer, evaluator)

    class DeadClient:  # every call fails as a database that went away does
        def __getattr__(self, name):
            def fail(*args, **kwargs):
                raise MlflowException("database is locked", error_code="TEMPORARILY_UNAVAILABLE")

            return fail

    @trainer.on(Events.EPOCH_STARTED(once=2))
    def _store_goes_down(engine):
        tracker._sink._client = DeadClient()

    with caplog.at_level(logging.WARNING, logger="medmtl.tracking"):
        trainer.run([0], max_epochs=3)
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1
    run_id = tracker.run_id
    assert _records(tracker.journal)[0]["run_id"] == run_id
    state = tracker.state_dict()
    assert state["run_id"] == run_id and state["journal"] == tracker.journal.stem

    client = MlflowClient(store_uri)
    assert _only_run(client, "midway").info.status == "RUNNING"
    assert [s for s, _ in _history(client, run_id, "train/loss")] == [1]
    assert sync_pending_runs(tmp_path / "eval", store_uri)[0].run_id == run_id
    run = _only_run(client, "midway")
    assert run.info.status == "FINISHED"
    assert [s for s, _ in _history(client, run_id, "train/loss")] == [1, 2, 3]
    assert [s for s, _ in _history(client, run_id, "val/mean_dice")] == [1, 2, 3]


def test_offline_run_resumed_from_a_checkpoint_keeps_its_journal(tmp_path, store_uri):
    ckpt_dir = tmp_path / "ckpt"
    tracker = _tracker(_closed_port_uri(), tmp_path, "resumed", params={"max_epochs": 3, "lr": 0.1})
    trainer, evaluator = _engines(fail_at_epoch=3)
    tracker.attach(trainer, evaluator)
    CheckpointSaver(str(ckpt_dir), {"trainer": trainer, "tracker": tracker}, save_interval=1, n_saved=1).attach(
        trainer
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.run([0], max_epochs=3)
    journal = tracker.journal
    assert _records(journal)[-1]["status"] == "FAILED"

    # A new process, and the store is reachable again: the run stays in its journal (one place to sync from).
    tracker2 = _tracker(store_uri, tmp_path, "resumed", params={"max_epochs": 4, "lr": 0.1})
    trainer2, evaluator2 = _engines()
    CheckpointLoader(str(next(ckpt_dir.glob("*.pt"))), {"trainer": trainer2, "tracker": tracker2}).attach(trainer2)
    tracker2.attach(trainer2, evaluator2)
    trainer2.run([0], max_epochs=4)
    assert tracker2.journal == journal and tracker2.run_id is None
    client = MlflowClient(store_uri)
    assert client.get_experiment_by_name("resumed") is None  # nothing went to the store
    ops = [r["op"] for r in _records(journal)]
    assert ops.count("run") == 2 and ops[-1] == "set_terminated"

    assert [r.ok for r in sync_pending_runs(tmp_path / "eval", store_uri)] == [True]
    run = _only_run(client, "resumed")
    assert run.info.status == "FINISHED"
    assert [s for s, _ in _history(client, run.info.run_id, "train/loss")] == [1, 2, 3, 4]
    assert run.data.params == {"max_epochs": "3", "lr": "0.1"}  # MLflow keeps the first value
    assert run.data.tags["medmtl.params_changed_on_resume"] == "max_epochs"
    names = _artifact_paths(client, run.info.run_id, "validation")
    assert names == [f"validation/cases_epoch_{e:03d}.csv" for e in (1, 2, 3, 4)]


def test_short_http_waits_unless_the_user_set_them(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    with _short_http_waits():
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "60"  # the user's value wins
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "60"


def test_sync_command_arguments(tmp_path, capsys):
    assert medmtl_main(["sync-mlflow", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert "missing: not a folder" in err and len(err.splitlines()) == 1
    (tmp_path / "eval").mkdir()
    assert medmtl_main(["sync-mlflow", str(tmp_path / "eval"), "--tracking-uri", "file:///runs"]) == 2
    assert "file:///runs" in capsys.readouterr().err
    assert medmtl_main(["sync-mlflow", str(tmp_path / "eval")]) == 0
    assert "nothing to sync" in capsys.readouterr().out
    assert not (tmp_path / "eval" / "mlruns.db").exists()  # nothing pending: no store created


def test_bundle_training_survives_a_dead_server_and_syncs_later(tmp_path, monkeypatch, capsys):
    out, dead = tmp_path / "run", _closed_port_uri()
    env = {**os.environ, "MLFLOW_TRACKING_URI": dead}
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(CONFIGS / "train.yaml"),
           "--max_epochs", "2", "--output_dir", str(out), "--dataset_dir", str(out / "data"), *TINY]  # fmt: skip
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    elapsed = time.monotonic() - start
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    # ~15 s alone, under a minute on a busy machine; MLflow's default retries would add 4 minutes per request
    assert elapsed < 180, f"{elapsed:.0f} s: the tracker waited for the dead server"
    assert log.count("MLflow tracking failed") == 1, log[-5000:]
    (journal,) = (out / "eval" / "mlflow_pending").glob("*.jsonl")
    records = _records(journal)
    assert records[0]["op"] == "run" and records[-1]["status"] == "FINISHED"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    assert medmtl_main(["sync-mlflow", str(out / "eval")]) == 1  # the default store is still down
    assert journal.name in capsys.readouterr().err
    store = path_to_sqlite_uri(tmp_path / "synced.db")
    sync = [sys.executable, "-m", "medmtl.cli", "sync-mlflow", str(out / "eval"), "--tracking-uri", store]
    first = subprocess.run(sync, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "1 of 1 journals uploaded" in first.stdout

    client = MlflowClient(store)
    run = _only_run(client, "phantom_mtl")
    assert run.info.status == "FINISHED" and run.data.params == records[0]["params"]
    assert run.data.params["max_epochs"] == "2"
    for key in ("train/loss_seg", "train/lr", "val/mean_dice", "val/dice_organ", "val/hd95_lesion_mm"):
        assert [s for s, _ in _history(client, run.info.run_id, key)] == [1, 2], key
    artifacts = _artifact_paths(client, run.info.run_id)
    assert {"validation/cases_epoch_001.csv", "validation/cases_epoch_002.csv", "model/model.pt",
            "config/resolved_config.json"} <= set(artifacts)  # fmt: skip
    assert len([a for a in artifacts if a.startswith("overlays/epoch_002/")]) == 3
    model = Path(client.download_artifacts(run.info.run_id, "model/model.pt", str(tmp_path / "dl")))
    assert model.read_bytes() == (out / "models" / "model.pt").read_bytes()

    assert medmtl_main(["sync-mlflow", str(out / "eval"), "--tracking-uri", store]) == 0
    assert "nothing to sync" in capsys.readouterr().out
    assert len(client.search_runs([run.info.experiment_id])) == 1
