"""The team setup for real: `mlflow server` on PostgreSQL, artifacts proxied to a folder, a training on it.

The fixtures start a throw-away PostgreSQL cluster (Debian's `postgresql`) and the team's server
(`scripts/mlflow_server.sh`, i.e. `mlflow server`) on 127.0.0.1, train the phantom bundle for one epoch with
`MLFLOW_TRACKING_URI=http://127.0.0.1:<port>`, and the tests read the run back through the server with the
MLflow client (and once straight from PostgreSQL). About 30 s on 2 cores.
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from servers import (
    PostgresCluster,
    ServerProcess,
    postgres_skip_reason,
    start_mlflow_server,
    start_postgres,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_YAML = REPO_ROOT / "bundles" / "phantom_mtl" / "configs" / "train.yaml"
TINY = ["--phantom#cases", "8", "--phantom#size", "32", "--pipeline#patch_size", "[32,32,32]",
        "--num_folds", "2", "--val_interval", "1", "--num_workers", "0"]  # fmt: skip
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def postgres() -> PostgresCluster:
    reason = postgres_skip_reason()
    if reason:
        pytest.skip(reason)
    cluster = start_postgres(databases=["mlflow"])
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def server_dir(tmp_path_factory) -> Path:
    """The server's folder: `artifacts/` (its --artifacts-destination) and its log."""
    return tmp_path_factory.mktemp("mlflow_server")


@pytest.fixture(scope="module")
def server(postgres, server_dir) -> ServerProcess:
    """scripts/mlflow_server.sh given the bare postgresql:// URI a team would write."""
    uri = postgres.uri("mlflow", driver=None)
    mlflow = start_mlflow_server(uri, server_dir / "artifacts", server_dir / "server.log")
    yield mlflow
    mlflow.stop()


@pytest.fixture(scope="module")
def trained(server, tmp_path_factory) -> Path:
    """One epoch of the phantom bundle, tracked on the server; returns the training's output folder."""
    out = tmp_path_factory.mktemp("server_run")
    env = dict(os.environ, MLFLOW_TRACKING_URI=server.url)
    # Fail in seconds, not minutes, if the server is unreachable (MLflow's defaults retry for ~4 minutes).
    env.update(MLFLOW_HTTP_REQUEST_TIMEOUT="10", MLFLOW_HTTP_REQUEST_MAX_RETRIES="1")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(TRAIN_YAML),
           "--max_epochs", "1", "--output_dir", str(out), "--dataset_dir", str(out / "data"),
           *TINY]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"training failed:\n{log[-5000:]}\nserver log:\n{server.log_tail()}"
    # A tracking failure never stops training, it is only warned about: here such a warning fails the test.
    assert "MLflow tracking failed" not in log, log[-5000:]
    return out


@pytest.fixture(scope="module")
def client(server) -> MlflowClient:
    return MlflowClient(tracking_uri=server.url)


@pytest.fixture(scope="module")
def run(trained, client):
    experiment = client.get_experiment_by_name("phantom_mtl")
    assert experiment is not None
    (only,) = client.search_runs([experiment.experiment_id])
    return only


def test_training_logs_one_finished_run_with_params_and_metrics(run, client):
    assert run.info.status == "FINISHED"
    assert run.data.params["max_epochs"] == "1"
    assert run.data.params["pipeline.patch_size"] == "[32, 32, 32]"
    metrics = run.data.metrics
    expected = {"train/loss", "train/loss_seg", "train/lr", "val/mean_dice", "val/dice_organ",
                "val/dice_lesion", "val/hd95_organ_mm", "val/cls_accuracy", "val/boundary_mae"}  # fmt: skip
    assert expected <= set(metrics), expected - set(metrics)
    assert 0.0 <= metrics["val/dice_organ"] <= 1.0
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/dice_organ")] == [1]
    assert run.data.tags["medmtl.heads"] == "seg, cls, boundary"


def test_artifacts_are_proxied_to_the_servers_store(run, client, server_dir, trained, tmp_path):
    # The tracker leaves the artifact root to the server: its proxied store, not a path on the client.
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.artifact_location.startswith("mlflow-artifacts:"), experiment.artifact_location
    assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri

    table = Path(client.download_artifacts(run.info.run_id, "validation/cases_epoch_001.csv", str(tmp_path)))
    rows = list(csv.DictReader(io.StringIO(table.read_text())))
    assert len(rows) == 4 and all(r["case_id"].startswith("phantom_") for r in rows)
    assert {"dice_organ", "hd95_organ_mm", "cls_prob", "cls_true"} <= set(rows[0])

    overlays = [a.path for a in client.list_artifacts(run.info.run_id, "overlays/epoch_001")]
    assert len(overlays) == 3 and all(p.endswith(".png") for p in overlays)
    picture = Path(client.download_artifacts(run.info.run_id, overlays[0], str(tmp_path)))
    assert picture.read_bytes()[:8] == PNG_MAGIC
    assert "model/model.pt" in [a.path for a in client.list_artifacts(run.info.run_id, "model")]

    # The files sit in the server's --artifacts-destination; nothing was written next to the training.
    stored = server_dir / "artifacts" / run.info.experiment_id / run.info.run_id / "artifacts"
    assert (stored / "validation" / "cases_epoch_001.csv").read_bytes() == table.read_bytes()
    assert not (trained / "eval" / "mlruns").exists()
    assert not (trained / "eval" / "mlruns.db").exists()
    assert (trained / "models" / "model.pt").is_file()


def test_the_run_is_stored_in_postgresql(run, postgres):
    import psycopg2

    with psycopg2.connect(host="127.0.0.1", port=postgres.port, user="postgres", dbname="mlflow") as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT status FROM runs WHERE run_uuid = %s", (run.info.run_id,))
            assert cur.fetchall() == [("FINISHED",)]
            cur.execute(
                "SELECT value FROM params WHERE run_uuid = %s AND key = 'max_epochs'", (run.info.run_id,)
            )
            assert cur.fetchall() == [("1",)]
            cur.execute(
                "SELECT step FROM metrics WHERE run_uuid = %s AND key = 'val/dice_organ'", (run.info.run_id,)
            )
            assert cur.fetchall() == [(1,)]
    conn.close()


def test_stopping_the_server_ends_all_its_processes(server, run):
    # Last in this module: the helper that other tests reuse must not leave uvicorn workers behind.
    assert server.alive()
    server.stop()
    assert server.proc.poll() is not None
    assert not server.alive()


def test_postgres_cluster_stop_removes_everything():
    reason = postgres_skip_reason()
    if reason:
        pytest.skip(reason)
    import psycopg2

    cluster = start_postgres(databases=["one", "two"])
    root = cluster.root
    with psycopg2.connect(host="127.0.0.1", port=cluster.port, user="postgres", dbname="two") as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT current_database()")
            assert cur.fetchone() == ("two",)
    conn.close()
    assert "postgresql+psycopg2://postgres@127.0.0.1:" in cluster.uri("one")
    cluster.stop()
    assert not root.exists()
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(
            host="127.0.0.1", port=cluster.port, user="postgres", dbname="one", connect_timeout=3
        )
    cluster.stop()  # twice is fine
