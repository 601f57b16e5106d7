"""MLflowTracker on a tiny ignite trainer + MONAI evaluator pair with fake metrics (no real training)."""

from __future__ import annotations

import csv
import gc
import json
import logging
import math
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from mlflow.tracking import MlflowClient
from monai.engines import Evaluator
from monai.handlers import CheckpointLoader, CheckpointSaver, MLFlowHandler, StatsHandler, ValidationHandler
from monai.utils import path_to_sqlite_uri

from medmtl.errors import MedmtlError
from medmtl.tracking import (
    MLflowTracker,
    drop_duplicate_mlflow_handlers,
    flatten_params,
    launch_ui,
    render_overlay,
    resolve_tracking_uri,
    scrub_identifiers,
    ui_command,
)

LABELS = {1: "organ", 2: "lesion"}
CASE_DICE = {"case_0": 0.9, "case_1": 0.5, "case_2": 0.7, "case_3": 0.2, "case_4": 0.8}  # at epoch 1
WORST_THREE = ["case_3", "case_1", "case_2"]


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory) -> str:
    """One SQLite store for the module (creating a store costs seconds); tests use their own experiment."""
    return path_to_sqlite_uri(tmp_path_factory.mktemp("store") / "mlruns.db")


@pytest.fixture(autouse=True)
def _no_env_tracking_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _overlay(shift: int) -> dict:
    yy, xx = np.mgrid[:24, :24]
    disc = ((yy - 12) ** 2 + (xx - 12) ** 2 < 36).astype(np.uint8)
    return {"image": (yy + xx).astype(np.float32), "label": disc, "pred": np.roll(disc, shift, axis=0)}


def _case_results(epoch: int) -> list[dict]:
    cases = []
    for case_id, dice in CASE_DICE.items():
        dice = dice + 0.01 * epoch
        cases.append(
            {
                "case_id": case_id,
                "dice_organ": dice,
                "dice_lesion": None,
                "hd95_organ_mm": 10.0 * (1 - dice),
                "mean_dice": dice,
                "cls_prob": 0.25 if case_id != "case_4" else None,
                "cls_true": 1,
                "overlay": _overlay(shift=2),
            }
        )
    return cases


def _fill_train_metrics(trainer: Engine) -> None:
    epoch = trainer.state.epoch
    trainer.state.metrics.update(
        {"train/loss": 1.0 / epoch, "train/loss_cls": math.nan, "train/lr": 0.01, "not_train": 5.0}
    )


def _engines(fail_at_epoch: int | None = None, monai_evaluator: bool = True) -> tuple[Engine, Engine]:
    """A trainer (one iteration per epoch) validating every epoch; metrics filled like the lead's handlers."""

    def train_step(engine, batch):
        if engine.state.epoch == fail_at_epoch:
            raise RuntimeError("simulated crash")

    trainer = Engine(train_step)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, _fill_train_metrics)
    if monai_evaluator:
        evaluator = _monai_evaluator()
        ValidationHandler(interval=1, validator=evaluator).attach(trainer)
    else:
        evaluator = Engine(lambda e, b: b)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda t: evaluator.run([0]))

    @evaluator.on(Events.EPOCH_COMPLETED)
    def _fill_val_metrics(engine):
        epoch = trainer.state.epoch
        engine.state.metrics.update(
            {
                "val/mean_dice": 0.6 + 0.1 * epoch,
                "val/dice_organ": 0.7,
                "val/hd95_organ_mm": 3.5,
                "val/cls_auc": torch.tensor(0.75),
                "not_a_scalar": [1, 2],
            }
        )
        engine.state.case_results = _case_results(epoch)

    return trainer, evaluator


def _tracker(uri: str, tmp_path: Path, name: str, **kwargs) -> MLflowTracker:
    kwargs.setdefault("params", {"optim": {"lr": 1e-3, "name": "Adam"}, "net": {"channels": [16, 32]}})
    return MLflowTracker(
        tracking_uri=uri,
        experiment_name=name,
        artifact_dir=tmp_path / "eval" / "mlruns",
        label_names=LABELS,
        run_name=f"{name}-run",
        dataset="phantom",
        heads=["seg", "cls"],
        **kwargs,
    )


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _only_run(client: MlflowClient, experiment: str):
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1
    return runs[0]


def _read_artifact(client: MlflowClient, run_id: str, path: str, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run_id, path, str(dst)))


def _monai_evaluator() -> Evaluator:
    """A real MONAI Evaluator (what ValidationHandler runs) whose iteration does nothing."""
    return Evaluator(device="cpu", val_data_loader=[0], iteration_update=lambda e, b: b, decollate=False)


def test_one_run_with_params_metrics_tables_overlays_config_and_model(store_uri, tmp_path):
    best = tmp_path / "eval" / "net_key_metric=0.8000.pt"
    best.parent.mkdir(parents=True)
    best.write_bytes(b"best weights")
    config = {"train": {"max_epochs": 2}, "network": {"_target_": "MultiTaskUNet"}}
    tracker = _tracker(
        store_uri,
        tmp_path,
        "full",
        config=config,
        best_checkpoint=best.parent / "net_*.pt",
        description="Phantom smoke run.",
    )
    trainer, evaluator = _engines()
    tracker.attach(trainer)
    tracker.attach(evaluator)  # a MONAI Evaluator is recognised as the evaluator
    # A final checkpoint saved after the tracker ended the run must not reopen it.
    saver = CheckpointSaver(str(tmp_path / "ckpt"), {"tracker": tracker}, save_final=True)
    saver.attach(trainer)
    trainer.run([0], max_epochs=2)

    client = MlflowClient(store_uri)
    run = _only_run(client, "full")
    run_id = run.info.run_id
    assert run.info.run_name == "full-run" and run.info.status == "FINISHED"
    assert run.data.params == {"optim.lr": "0.001", "optim.name": "Adam", "net.channels": "[16, 32]"}

    assert _history(client, run_id, "train/loss") == [(1, 1.0), (2, 0.5)]
    assert _history(client, run_id, "train/lr") == [(1, 0.01), (2, 0.01)]
    assert _history(client, run_id, "val/mean_dice") == [(1, pytest.approx(0.7)), (2, pytest.approx(0.8))]
    assert _history(client, run_id, "val/cls_auc") == [(1, 0.75), (2, 0.75)]
    assert "val/hd95_organ_mm" in run.data.metrics
    for absent in ("train/loss_cls", "not_train", "not_a_scalar"):  # NaN, not train/, not a number
        assert absent not in run.data.metrics

    table = _read_artifact(client, run_id, "validation/cases_epoch_002.csv", tmp_path / "dl")
    rows = list(csv.DictReader(table.open()))
    assert [r["case_id"] for r in rows] == WORST_THREE + ["case_4", "case_0"]  # worst first
    assert "overlay" not in rows[0]
    assert float(rows[0]["mean_dice"]) == pytest.approx(0.22)
    assert rows[0]["dice_lesion"] == "" and rows[-2]["cls_prob"] == "" and rows[0]["cls_true"] == "1"
    assert {f.path for f in client.list_artifacts(run_id, "validation")} == {
        "validation/cases_epoch_001.csv",
        "validation/cases_epoch_002.csv",
    }

    pngs = sorted(f.path for f in client.list_artifacts(run_id, "overlays/epoch_002"))
    assert pngs == [f"overlays/epoch_002/{i:02d}_{c}.png" for i, c in enumerate(WORST_THREE, start=1)]
    image = matplotlib.image.imread(_read_artifact(client, run_id, pngs[0], tmp_path / "dl"))
    assert image.ndim == 3 and image.shape[0] > 100

    dl = tmp_path / "dl"
    assert json.loads(_read_artifact(client, run_id, "config/resolved_config.json", dl).read_text()) == config
    assert _read_artifact(client, run_id, "model/model.pt", dl).read_bytes() == b"best weights"

    note = run.data.tags["mlflow.note.content"]
    assert "Phantom smoke run." in note and "phantom" in note and "seg, cls" in note
    assert "best val/mean_dice: 0.8000 (epoch 2)" in note
    assert run.data.tags["medmtl.dataset"] == "phantom"
    assert tracker.state_dict() == {
        "run_id": run_id,
        "journal": None,
        "best_metric": pytest.approx(0.8),
        "best_epoch": 2,
    }
    assert tracker.journal is None and not (tmp_path / "eval" / "mlflow_pending").exists()


def test_resume_from_checkpoint_continues_the_same_run(store_uri, tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    tracker = _tracker(store_uri, tmp_path, "resume", params={"max_epochs": 3, "lr": 0.1})
    trainer, evaluator = _engines(fail_at_epoch=3)
    tracker.attach(trainer, evaluator)
    saver = CheckpointSaver(
        str(ckpt_dir), {"trainer": trainer, "tracker": tracker}, save_interval=1, n_saved=1
    )
    saver.attach(trainer)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.run([0], max_epochs=3)
    client = MlflowClient(store_uri)
    assert _only_run(client, "resume").info.status == "FAILED"

    # A new process: fresh engines and tracker, state restored by MONAI's CheckpointLoader at STARTED.
    tracker2 = _tracker(store_uri, tmp_path, "resume", params={"max_epochs": 4, "lr": 0.1, "seed": 7})
    trainer2, evaluator2 = _engines()
    checkpoint = next(ckpt_dir.glob("*.pt"))
    CheckpointLoader(str(checkpoint), {"trainer": trainer2, "tracker": tracker2}).attach(trainer2)
    tracker2.attach(trainer2, evaluator2)
    trainer2.run([0], max_epochs=4)

    run = _only_run(client, "resume")
    assert run.info.run_id == tracker.run_id == tracker2.run_id and run.info.status == "FINISHED"
    assert [s for s, _ in _history(client, run.info.run_id, "train/loss")] == [1, 2, 3, 4]
    assert [s for s, _ in _history(client, run.info.run_id, "val/mean_dice")] == [1, 2, 3, 4]
    # MLflow keeps the first value of a param; new params are added, the change is recorded.
    assert run.data.params == {"max_epochs": "3", "lr": "0.1", "seed": "7"}
    assert run.data.tags["medmtl.params_changed_on_resume"] == "max_epochs"
    assert "best val/mean_dice: 1.0000 (epoch 4)" in run.data.tags["mlflow.note.content"]


def test_default_store_and_artifacts_stay_out_of_the_working_directory(tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    eval_dir = tmp_path / "eval"
    uri = resolve_tracking_uri(eval_dir)
    tracker = _tracker(uri, tmp_path, "where", config={"a": 1})
    trainer, evaluator = _engines()
    tracker.attach(trainer, evaluator)
    trainer.run([0], max_epochs=1)

    assert list(cwd.iterdir()) == []
    assert (eval_dir / "mlruns.db").is_file()
    experiment = MlflowClient(uri).get_experiment_by_name("where")
    assert experiment.artifact_location == (eval_dir / "mlruns").as_uri()
    run_dir = eval_dir / "mlruns" / tracker.run_id / "artifacts"
    assert (run_dir / "config" / "resolved_config.json").is_file()
    assert len(list((run_dir / "overlays" / "epoch_001").glob("*.png"))) == 3


def test_resolve_tracking_uri_precedence(tmp_path, monkeypatch):
    default = resolve_tracking_uri(tmp_path / "eval")
    assert default == f"sqlite:///{(tmp_path / 'eval' / 'mlruns.db').absolute().as_posix()}"
    assert default.startswith("sqlite:////")  # four slashes: an absolute POSIX path
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri("rel") == path_to_sqlite_uri(tmp_path / "rel" / "mlruns.db")

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert resolve_tracking_uri(tmp_path) == "http://tracking.example:5000"
    assert resolve_tracking_uri(tmp_path, "sqlite:////data/runs.db") == "sqlite:////data/runs.db"

    with pytest.raises(MedmtlError, match=r"tracking_uri 'eval/mlruns': .*folder"):
        resolve_tracking_uri(tmp_path, "eval/mlruns")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:///runs")
    with pytest.raises(MedmtlError, match="MLFLOW_TRACKING_URI 'file:///runs'"):
        resolve_tracking_uri(tmp_path)


def test_duplicate_monai_mlflow_handlers_are_dropped(store_uri, caplog):
    stats = StatsHandler(name="medmtl-test")
    train_handlers = [stats, MLFlowHandler(tracking_uri=store_uri, experiment_name="monai_experiment")]
    val_handlers = [MLFlowHandler(tracking_uri=store_uri, iteration_log=False)]
    with caplog.at_level(logging.INFO, logger="medmtl.tracking"):
        assert drop_duplicate_mlflow_handlers(train_handlers) == [stats]
        assert drop_duplicate_mlflow_handlers(val_handlers) == []
    assert sum("MLFlowHandler" in r.getMessage() for r in caplog.records) == 2
    assert drop_duplicate_mlflow_handlers(None) == []


def test_patient_identifiers_never_reach_mlflow(store_uri, tmp_path):
    phi = {
        "PatientName": "DOE^JANE",
        "patient_id": "PID-4711",
        "PATIENTBIRTHDATE": "19700101",
        "AccessionNumber": "ACC-99",
        "(0010,0020)": "PID-4711",
    }
    params = {"lr": 0.1, "dicom": {"series": "T1", **phi}, "cases": [{"PatientID": "PID-4711", "id": "c1"}]}
    tracker = _tracker(
        store_uri,
        tmp_path,
        "phi",
        params=params,
        config={"data": dict(phi)},
        tags={"PatientName": "DOE^JANE", "site": "A"},
    )
    trainer, evaluator = _engines(monai_evaluator=False)

    @evaluator.on(Events.EPOCH_COMPLETED)
    def _add_identifier_column(engine):
        for case in engine.state.case_results:
            case["PatientID"] = "PID-4711"

    tracker.attach(trainer, evaluator)
    trainer.run([0], max_epochs=2)

    client = MlflowClient(store_uri)
    run = _only_run(client, "phi")
    assert run.data.params == {"lr": "0.1", "dicom.series": "T1", "cases": '[{"id": "c1"}]'}
    assert run.data.tags["site"] == "A"
    logged = json.dumps([run.data.params, run.data.tags])
    for artifact in ("config/resolved_config.json", "validation/cases_epoch_002.csv"):
        logged += _read_artifact(client, run.info.run_id, artifact, tmp_path / "dl").read_text()
    for value in ("DOE^JANE", "PID-4711", "19700101", "ACC-99"):
        assert value not in logged
    # A plain ignite evaluator restarts at epoch 1; validation is still logged at the trainer's epoch.
    assert [s for s, _ in _history(client, run.info.run_id, "val/mean_dice")] == [1, 2]


def test_scrub_and_flatten_helpers():
    assert scrub_identifiers({"a": [{"Patient Name": 1, "b": 2}], "accession_number": 3}) == {"a": [{"b": 2}]}
    flat = flatten_params({"train#trainer": {"max_epochs": 5}, "long": "x" * 7000, "empty": {}})
    assert flat["train_trainer.max_epochs"] == "5"  # '#' is not allowed in MLflow keys
    assert len(flat["long"]) == 6000 and flat["empty"] == "{}"


def test_unreachable_tracking_server_warns_once_and_training_goes_on(tmp_path, monkeypatch, caplog):
    # the tracker's own short HTTP waits apply (MLflow's defaults would retry for minutes per call)
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    tracker = _tracker("http://127.0.0.1:9", tmp_path, "offline", best_checkpoint=tmp_path / "none.pt")
    trainer, evaluator = _engines()
    tracker.attach(trainer, evaluator)
    with caplog.at_level(logging.WARNING):
        trainer.run([0], max_epochs=2)
    assert trainer.state.epoch == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "http://127.0.0.1:9" in warnings[0]
    assert f"kept in {tracker.journal}" in warnings[0] and "medmtl sync-mlflow" in warnings[0]
    assert tracker.state_dict()["run_id"] is None and tracker.journal.is_file()  # details: test_tracking_outage.py


def test_evaluation_only_run_is_finished_by_the_evaluator(store_uri, tmp_path):
    tracker = _tracker(store_uri, tmp_path, "evaluate")
    evaluator = _monai_evaluator()
    evaluator.add_event_handler(
        Events.EPOCH_COMPLETED, lambda e: e.state.metrics.update({"val/mean_dice": 0.5})
    )
    tracker.attach(evaluator)
    evaluator.run()
    client = MlflowClient(store_uri)
    run = _only_run(client, "evaluate")
    assert run.info.status == "FINISHED"
    assert _history(client, run.info.run_id, "val/mean_dice") == [(1, 0.5)]


def test_render_overlay_draws_reference_green_and_prediction_red(tmp_path):
    path = render_overlay(_overlay(shift=4), "case_9  mean Dice 0.500", tmp_path / "o.png", label_values=[1])
    rgb = matplotlib.image.imread(path)[..., :3]
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    assert np.sum((g > 0.6) & (r < 0.3) & (b < 0.3)) > 20  # green reference contour
    assert np.sum((r > 0.8) & (g < 0.3) & (b < 0.3)) > 20  # red predicted contour


def test_ui_command_and_launch(tmp_path, monkeypatch):
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    with pytest.raises(MedmtlError, match="no mlruns.db"):
        ui_command(eval_dir)
    (eval_dir / "mlruns.db").touch()
    argv = ui_command(eval_dir, port=5001)
    assert argv == [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        path_to_sqlite_uri(eval_dir / "mlruns.db"),
        "--host",
        "127.0.0.1",
        "--port",
        "5001",
        "--default-artifact-root",
        (eval_dir / "mlruns").as_uri(),
        "--workers",
        "1",
    ]
    assert ui_command(path_to_sqlite_uri(eval_dir / "mlruns.db"), port=5001) == argv
    assert "--default-artifact-root" not in ui_command("postgresql://u:p@db/mlflow")
    with pytest.raises(MedmtlError, match="tracking server"):
        ui_command("http://127.0.0.1:5000")

    import click
    from mlflow.cli import cli  # the installed MLflow parses these options ("ui" is an alias of "server")

    ui = cli.get_command(click.Context(cli), "ui")
    params = ui.make_context("ui", argv[4:]).params
    assert params["port"] == 5001 and params["backend_store_uri"] == argv[5] and params["workers"] == "1"

    started = []
    monkeypatch.setattr("subprocess.Popen", lambda args, **kw: started.append((args, kw)) or "process")
    assert launch_ui(eval_dir, port=5001) == "process" and started[0][0] == argv
    assert started[0][1]["env"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"


def test_run_left_open_by_another_exception_handler_is_failed_when_collected(store_uri, tmp_path):
    trainer, evaluator = _engines(fail_at_epoch=2)

    @trainer.on(Events.EXCEPTION_RAISED)
    def _reraise_first(engine, err):  # as MONAI's StatsHandler/CheckpointSaver do when attached first
        raise err

    tracker = _tracker(store_uri, tmp_path, "collected")
    tracker.attach(trainer, evaluator)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.run([0], max_epochs=2)
    client = MlflowClient(store_uri)
    assert _only_run(client, "collected").info.status == "RUNNING"
    del trainer, evaluator, tracker
    gc.collect()
    assert _only_run(client, "collected").info.status == "FAILED"
