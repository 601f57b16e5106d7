"""Reliability: crash resume, atomic writes, bad training data, unsafe checkpoints, PHI, determinism.

Everything runs the real commands (`python -m monai.bundle run ...`, `medmtl infer`) on tiny phantom data.
Two module-scoped trainings of the phantom bundle (2 epochs, 32^3, one dataset generated with a DICOM export
and one empty label) are shared: an uninterrupted reference run, and a run that is SIGKILLed in the middle of
epoch 2 and then restarted with the same command.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, patient_identifiers, random_checkpoint
from mlflow.tracking import MlflowClient

from medmtl.cli import EXIT_ERROR, main
from medmtl.data.synthetic import StudyInfo, generate_dataset, write_dicom_series
from medmtl.engine.checkpoint import (
    RESUME_HINT,
    atomic_torch_save,
    load_checkpoint,
    require_checkpoint,
    resume_from,
    stale_temp_files,
)
from medmtl.engine.precision import cpu_bf16_supported
from medmtl.engine.runtime import setup_runtime
from medmtl.inference.batch import OUTPUT_MARKER
from medmtl.inference.writers import write_nifti

PHANTOM = REPO_ROOT / "bundles" / "phantom_mtl"
CONFIGS = PHANTOM / "configs"
TINY = ["--pipeline#patch_size", "[32,32,32]", "--num_folds", "2", "--val_interval", "1", "--num_workers", "0"]
EPOCHS = 2
EMPTY_CASE = "phantom_000"  # its label is emptied; a training case of fold 0 (seed 0)
WAIT_S = 420  # generous: the test machine is shared; nothing asserts on time


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the run's own SQLite store
    return {**env, **extra}


def bundle_cmd(run_id: str, configs: list[str | Path], *args: str) -> list[str]:
    """`python -m monai.bundle run <run_id> --config_file ...` as a user types it."""
    files = [str(c if Path(c).is_absolute() else CONFIGS / c) for c in configs]
    config_file = files[0] if len(files) == 1 else str(files)
    return [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", config_file, *args]


def run_bundle(run_id: str, configs: list[str | Path], *args: str) -> subprocess.CompletedProcess:
    cmd = bundle_cmd(run_id, configs, *args)
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, env=_env(), timeout=WAIT_S)


def train_args(dataset: Path, out: Path, *extra: str) -> list[str]:
    return ["--max_epochs", str(EPOCHS), "--dataset_dir", str(dataset), "--output_dir", str(out), *TINY, *extra]


def client(out: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{out / 'eval' / 'mlruns.db'}")


def training_runs(out: Path) -> list:
    experiment = client(out).get_experiment_by_name("phantom_mtl")
    return [] if experiment is None else client(out).search_runs([experiment.experiment_id])


TIMINGS = {"train/sec_per_iter", "train/data_wait_fraction"}  # measured clock times: never equal run to run


def histories(out: Path, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every computed metric of a run (timings left out) as its (step, value) history, in step order."""
    c = client(out)
    keys = set(c.get_run(run_id).data.metrics) - TIMINGS
    return {k: sorted((m.step, m.value) for m in c.get_metric_history(run_id, k)) for k in keys}


def epoch_of(last: dict) -> int:
    trainer = last["trainer"]
    return int(trainer.get("epoch") or trainer["iteration"] // trainer["epoch_length"])


class _Payload:
    """What a malicious checkpoint carries: unpickling it calls print (any callable would do)."""

    def __reduce__(self):
        return (print, ("PAYLOAD EXECUTED",))


def with_payload(source: Path, target: Path) -> Path:
    """A copy of a checkpoint with a pickled code payload added."""
    state = load_checkpoint(source)
    state["extra"] = _Payload()
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, target)
    return target


def assert_one_clean_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """The run failed with a short `error: ...` message holding the fragments, not a traceback."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


# ---------------------------------------------------------------------------------------------------------
# the shared dataset and trainings


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """8 phantom cases of 32^3, a DICOM export of a 9th (with fake patient identifiers), one empty label."""
    root = tmp_path_factory.mktemp("phantom") / "data"
    generate_dataset(root, cases=8, size=32, dicom_cases=1)
    label = root / "labelsTr" / f"{EMPTY_CASE}.nii.gz"
    img = nib.load(label)
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine, img.header), label)
    return root


@dataclass
class Run:
    out: Path
    logs: str  # stdout + stderr of every process of the run


@pytest.fixture(scope="module")
def reference(dataset: Path, tmp_path_factory) -> Run:
    """An uninterrupted training of EPOCHS epochs."""
    out = tmp_path_factory.mktemp("reference")
    proc = run_bundle("training", ["train.yaml"], *train_args(dataset, out))
    assert proc.returncode == 0, proc.stderr[-5000:]
    return Run(out, proc.stdout + proc.stderr)


KILL_HOOK = '''
"""Test helper: a trainer handler that hangs after a given iteration, so that the test can SIGKILL it there."""
import time
from pathlib import Path

from ignite.engine import Events


class HangAt:
    def __init__(self, iteration, marker):
        self.iteration, self.marker = iteration, marker

    def attach(self, engine):
        engine.add_event_handler(Events.ITERATION_COMPLETED(once=self.iteration), self)

    def __call__(self, engine):
        Path(self.marker).write_text(f"{engine.state.epoch} {engine.state.iteration}")
        time.sleep(3600)
'''


@dataclass
class CrashedRun(Run):
    marker: str  # "epoch iteration" where the first process was killed
    after_kill: dict  # what the killed process left: runs, last.pt epoch, histories


@pytest.fixture(scope="module")
def crashed(dataset: Path, tmp_path_factory) -> CrashedRun:
    """A training SIGKILLed after the first iteration of epoch 2, then restarted with the plain command."""
    out = tmp_path_factory.mktemp("crashed")
    hook = tmp_path_factory.mktemp("hook")
    (hook / "killhook.py").write_text(KILL_HOOK)
    marker = hook / "marker"
    # the test's only addition: one more trainer handler, that stops it mid-epoch 2 (epoch length 2: iteration 3)
    handler = f"{{_target_: killhook.HangAt, iteration: 3, marker: '{marker}'}}"
    (hook / "hook.yaml").write_text(f"+train#handlers: [{handler}]\n")
    log = out / "killed.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(
            bundle_cmd("training", ["train.yaml", hook / "hook.yaml"], *train_args(dataset, out)),
            cwd=REPO_ROOT, stdout=sink, stderr=subprocess.STDOUT, env=_env(PYTHONPATH=str(hook)),
        )  # fmt: skip
        try:
            deadline = time.monotonic() + WAIT_S
            while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert marker.exists(), f"the training never reached epoch 2:\n{log.read_text()[-3000:]}"
            proc.send_signal(signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL

    (run,) = training_runs(out)
    after_kill = {
        "run_id": run.info.run_id,
        "status": run.info.status,
        "epoch": epoch_of(load_checkpoint(out / "models" / "last.pt")),
        "histories": histories(out, run.info.run_id),
    }
    # what a kill in the middle of a checkpoint save leaves behind (atomic_torch_save's temporary file)
    (out / "models" / ".last.pt.k1ll3d_x.tmp").write_bytes(b"\x80\x02partial")

    restart = run_bundle("training", ["train.yaml"], *train_args(dataset, out))
    assert restart.returncode == 0, restart.stderr[-5000:]
    return CrashedRun(out, log.read_text() + restart.stdout + restart.stderr, marker.read_text(), after_kill)


# ---------------------------------------------------------------------------------------------------------
# crash resume


def test_killed_training_left_a_running_run_and_the_last_complete_epoch(crashed: CrashedRun):
    assert crashed.marker == "2 3"  # killed after the first of epoch 2's two iterations
    assert crashed.after_kill["status"] == "RUNNING"  # SIGKILL: nothing could end the run
    assert crashed.after_kill["epoch"] == 1
    assert [step for step, _ in crashed.after_kill["histories"]["train/loss"]] == [1]


def test_restart_resumes_the_same_mlflow_run_without_repeating_an_epoch(crashed: CrashedRun):
    assert "resuming from" in crashed.logs and "Restored all variables" in crashed.logs
    (run,) = training_runs(crashed.out)  # continued, not duplicated
    assert run.info.run_id == crashed.after_kill["run_id"]
    assert run.info.status == "FINISHED"
    steps = {key: [s for s, _ in h] for key, h in histories(crashed.out, run.info.run_id).items()}
    assert steps["train/loss"] == steps["val/mean_dice"] == list(range(1, EPOCHS + 1))
    assert all(s == list(range(1, EPOCHS + 1)) for s in steps.values()), steps  # each step exactly once
    assert epoch_of(load_checkpoint(crashed.out / "models" / "last.pt")) == EPOCHS
    # the interrupted save's temporary file was removed at the restart
    assert stale_temp_files(crashed.out / "models") == []
    assert sorted(p.name for p in (crashed.out / "models").iterdir()) == ["last.pt", "model.pt"]


def test_resumed_training_matches_the_uninterrupted_one_exactly(crashed: CrashedRun, reference: Run):
    # Epoch 2 ran in the restarted process from last.pt alone: equal metrics mean that the network, optimizer,
    # loss weights, epoch, learning rate and every random generator (patch sampling included) were restored.
    (crashed_run,) = training_runs(crashed.out)
    (reference_run,) = training_runs(reference.out)
    resumed = histories(crashed.out, crashed_run.info.run_id)
    uninterrupted = histories(reference.out, reference_run.info.run_id)
    assert set(resumed) == set(uninterrupted)
    for key, values in uninterrupted.items():
        assert resumed[key] == values, key


def test_two_runs_with_the_same_seed_give_identical_metrics(crashed: CrashedRun, reference: Run):
    # Epoch 1 of the two trainings ran in two fresh processes with the same seed (bf16 autocast on CPUs that
    # have it, as the bundle's default); every logged value is bit-identical.
    (reference_run,) = training_runs(reference.out)
    expected = "bf16 autocast (cpu)" if cpu_bf16_supported() else "fp32"
    assert reference_run.data.params["precision"] == expected
    first = crashed.after_kill["histories"]
    second = histories(reference.out, reference_run.info.run_id)
    assert {"train/loss", "train/loss_seg", "val/mean_dice", "val/dice_organ", "val/boundary_mae"} <= set(first)
    for key, values in first.items():
        assert values == second[key][:1], key


def test_deterministic_mode_switches_on_deterministic_kernels(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")  # restored (unset) after the test
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    try:
        setup_runtime(0, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(False)
    setup_runtime(0)
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.benchmark == torch.cuda.is_available()  # autotuning only where it matters


def test_resume_from_checks_the_last_checkpoint_before_training(tmp_path: Path):
    network = torch.nn.Linear(3, 2)
    last = tmp_path / "last.pt"
    assert resume_from(last, True, network, 5) is None  # nothing to resume: a new training
    trainer = {"epoch_length": 2, "iteration": 6, "max_epochs": 3}
    atomic_torch_save({"network": network.state_dict(), "trainer": trainer}, last)
    assert resume_from(last, True, network, 5) == str(last)
    assert resume_from(last, False, network, 5) is None  # --resume false starts over
    refusals = [
        ((last, True, network, 2), "last.pt is at epoch 3, past --max_epochs 2"),
        ((last, True, torch.nn.Linear(4, 2), 5), "another network (other heads, filters or classes?): 1 of another "
                                                 "shape (e.g. weight 2x3 in the file, 2x4 here)"),
    ]  # fmt: skip
    bare = atomic_torch_save(network.state_dict(), tmp_path / "model.pt")
    refusals.append(((bare, True, network, 5), "not a resume checkpoint (no 'network', 'trainer' entry"))
    for args, message in refusals:
        with pytest.raises(SystemExit) as refused:
            resume_from(*args)
        text = str(refused.value.code)
        assert text.startswith("error: cannot resume: ") and message in text, text
        assert text.endswith(RESUME_HINT)


def test_require_checkpoint_checks_a_checkpoint_for_evaluation(tmp_path: Path):
    network = torch.nn.Linear(3, 2)
    model = atomic_torch_save(network.state_dict(), tmp_path / "model.pt")
    assert require_checkpoint(model, network) == str(model)
    with pytest.raises(SystemExit, match=r"^error: .*model\.pt: holds the weights of another network"):
        require_checkpoint(model, torch.nn.Linear(3, 3))
    torch.save({"weight": torch.ones(2, 3), "x": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(SystemExit, match=r"^error: .*evil\.pt: refused to load: it would import `print`"):
        require_checkpoint(tmp_path / "evil.pt", network)
    with pytest.raises(SystemExit, match="checkpoint not found"):
        require_checkpoint(tmp_path / "absent.pt")


# ---------------------------------------------------------------------------------------------------------
# atomic writes

def _saver(folder: str, mode: str, conn) -> None:
    """Child process: save model.pt and seg.nii.gz over and over, each version filled with its number n.

    With mode "half" it stops halfway through writing version 2 of model.pt, and says so.
    """
    def save(n: int) -> None:
        weights = torch.from_numpy(np.full(4_000_000, n, np.float32))  # numpy: no OpenMP after fork
        atomic_torch_save({"n": n, "w": weights}, f"{folder}/model.pt")
        write_nifti(np.full((96, 96, 96), n, np.float32), np.eye(4), f"{folder}/seg.nii.gz", overwrite=True)

    save(1)
    if mode == "half":
        real_save = torch.save

        def half_then_hang(obj, f):
            buffer = io.BytesIO()
            real_save(obj, buffer)
            f.write(buffer.getvalue()[: buffer.tell() // 2])
            f.flush()
            conn.send("half")
            time.sleep(3600)

        torch.save = half_then_hang  # only in this process
    conn.send("ready")
    n = 2
    while True:
        save(n)
        n += 1


def _start_saver(folder: Path, mode: str) -> tuple[multiprocessing.Process, Any]:
    # forked, not spawned: the child starts at once instead of importing torch and medmtl again
    context = multiprocessing.get_context("fork")
    parent, child = context.Pipe()
    process = context.Process(target=_saver, args=(str(folder), mode, child), daemon=True)
    process.start()
    return process, parent


def _receive(conn, process: multiprocessing.Process) -> str:
    assert conn.poll(WAIT_S), f"the saver sent nothing (exit code {process.exitcode})"
    return conn.recv()


def _sigkill(process: multiprocessing.Process) -> None:
    if process.pid is not None and process.exitcode is None:
        os.kill(process.pid, signal.SIGKILL)
    process.join(timeout=60)


def _check_saved_files(folder: Path) -> int:
    """The two files load fully and hold one version each; returns the checkpoint's version."""
    checkpoint = load_checkpoint(folder / "model.pt")
    n = int(checkpoint["n"])
    assert torch.equal(checkpoint["w"], torch.full((4_000_000,), float(n)))
    data = np.asarray(nib.load(folder / "seg.nii.gz").dataobj)  # reads (and gunzips) every byte
    assert data.shape == (96, 96, 96) and np.unique(data).size == 1 and data.flat[0] >= 1
    return n


def test_kill_during_a_save_leaves_the_previous_files_whole(tmp_path: Path):
    process, conn = _start_saver(tmp_path, "half")
    try:
        assert _receive(conn, process) == "ready"
        assert _receive(conn, process) == "half"  # version 2 of model.pt is half written
    finally:
        _sigkill(process)
    assert process.exitcode == -signal.SIGKILL
    assert _check_saved_files(tmp_path) == 1
    (partial,) = stale_temp_files(tmp_path)  # the half-written file: a hidden temporary that nothing reads
    assert partial.name.startswith(".model.pt.") and partial.stat().st_size > 0


def test_kill_at_random_moments_never_leaves_a_truncated_file(tmp_path: Path):
    rng = random.Random(0)
    for attempt in range(5):
        folder = tmp_path / f"attempt{attempt}"
        folder.mkdir()
        process, conn = _start_saver(folder, "loop")
        try:
            assert _receive(conn, process) == "ready"
            time.sleep(rng.uniform(0.0, 1.0))
        finally:
            _sigkill(process)
        assert process.exitcode == -signal.SIGKILL
        _check_saved_files(folder)


# ---------------------------------------------------------------------------------------------------------
# bad training data


def test_broken_training_data_is_refused_before_training(tmp_path: Path):
    data, out = tmp_path / "data", tmp_path / "run"
    generate_dataset(data, cases=8, size=32)
    image = data / "imagesTr" / "phantom_001.nii.gz"
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])  # truncated gzip stream

    def rewrite(path: str, change) -> None:
        img = nib.load(data / path)
        nib.save(nib.Nifti1Image(change(np.asarray(img.dataobj).copy()), img.affine, img.header), data / path)

    def first_voxels(n: int, value: float):
        return lambda data: np.where(np.arange(data.size).reshape(data.shape) < n, value, data).astype(data.dtype)

    rewrite("labelsTr/phantom_002.nii.gz", lambda label: label[:, :, :30])  # wrong shape
    rewrite("labelsTr/phantom_003.nii.gz", first_voxels(1, 7))  # a label value dataset.json does not declare
    rewrite("imagesTr/phantom_004.nii.gz", first_voxels(2, np.nan))
    rewrite("labelsTr/phantom_005.nii.gz", np.zeros_like)  # empty

    proc = run_bundle("training", ["train.yaml"], *train_args(data, out))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    report = proc.stderr[proc.stderr.index("error: ") :]
    assert "the dataset has problems, nothing was trained" in report
    expected = {
        "phantom_001": r"imagesTr/phantom_001\.nii\.gz: unreadable \(truncated gzip stream\)",
        "phantom_002": r"labelsTr/phantom_002\.nii\.gz: shape 32x32x30 does not match image",
        "phantom_003": r"labelsTr/phantom_003\.nii\.gz: label values \{7\} not in declared labels \{0, 1, 2\}",
        "phantom_004": r"imagesTr/phantom_004\.nii\.gz: 2 NaN voxels in the image",
    }
    lines = report.splitlines()
    for case, problem in expected.items():
        (line,) = [x for x in lines if x.startswith(f"FAIL {case}")]
        assert re.search(problem, line), line
    # an empty label is a valid case without foreground: a warning, never a refusal
    assert not any(x.startswith("FAIL phantom_005") for x in lines)
    assert not (out / "models").exists() and not (out / "eval" / "mlruns.db").exists()


def test_an_empty_label_is_reported_and_trained_as_a_case_without_foreground(reference: Run):
    (warning,) = [x for x in reference.logs.splitlines() if f"OK   {EMPTY_CASE}" in x]
    assert "WARNING" in warning and "label is empty (all background)" in warning
    assert (reference.out / "models" / "model.pt").is_file()
    (run,) = training_runs(reference.out)
    assert run.info.status == "FINISHED"


# ---------------------------------------------------------------------------------------------------------
# unsafe checkpoints


def test_torch_load_is_weights_only_everywhere():
    calls = []
    sources = [p for folder in ("medmtl", "benchmarks", "scripts", "tests") for p in (REPO_ROOT / folder).rglob("*.py")]
    for path in sources:
        text = path.read_text()
        for match in re.finditer(r"torch\.load\(", text):
            depth, end = 0, match.end() - 1
            for end in range(match.end() - 1, len(text)):  # the call's text, up to its closing parenthesis
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                if depth == 0:
                    break
            calls.append((path.name, text[match.start() : end + 1]))
    assert calls  # the search finds the loader itself
    unsafe = [(name, call) for name, call in calls if "weights_only=True" not in call]
    assert not unsafe, unsafe


def test_infer_refuses_a_checkpoint_with_a_pickle_payload(reference: Run, dataset: Path, tmp_path: Path, capsys):
    evil = with_payload(reference.out / "models" / "model.pt", tmp_path / "evil.pt")
    code = main(["infer", str(dataset / "imagesTs"), "--bundle", str(PHANTOM), "--model", str(evil),
                 "--output", str(tmp_path / "out"), "--set", "pipeline#patch_size=[32,32,32]"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == EXIT_ERROR
    assert "PAYLOAD EXECUTED" not in captured.out + captured.err
    (line,) = captured.err.strip().splitlines()
    assert "evil.pt: refused to load: it would import `print`" in line
    assert not (tmp_path / "out").exists()


def test_resume_refuses_a_last_checkpoint_with_a_pickle_payload(reference: Run, dataset: Path, tmp_path: Path):
    with_payload(reference.out / "models" / "last.pt", tmp_path / "models" / "last.pt")
    proc = run_bundle("training", ["train.yaml"], *train_args(dataset, tmp_path))
    assert_one_clean_error(proc, "cannot resume", "last.pt: refused to load: it would import `print`")
    assert "PAYLOAD EXECUTED" not in proc.stdout + proc.stderr
    assert not (tmp_path / "eval" / "mlruns.db").exists()  # no MLflow run was started


def test_evaluate_refuses_a_checkpoint_with_a_pickle_payload(reference: Run, dataset: Path, tmp_path: Path):
    evil = with_payload(reference.out / "models" / "model.pt", tmp_path / "evil.pt")
    proc = run_bundle("evaluating", ["train.yaml", "evaluate.yaml"], *train_args(dataset, tmp_path),
                      "--ckpt_file", str(evil))  # fmt: skip
    assert_one_clean_error(proc, "evil.pt: refused to load: it would import `print`")
    assert "PAYLOAD EXECUTED" not in proc.stdout + proc.stderr
    assert not (tmp_path / "eval" / "metrics.json").exists()


# ---------------------------------------------------------------------------------------------------------
# names from DICOM tags, patient identifiers


def _study() -> StudyInfo:
    return StudyInfo(uid_seed="medmtl-test/hostile", patient_name="PHANTOM^HOSTILE", patient_id="PHANTOM990",
                     patient_birth_date="19600101", accession_number="PHACC990")  # fmt: skip


def test_hostile_series_descriptions_cannot_leave_the_output_folder(tmp_path: Path, capsys):
    export, out = tmp_path / "export", tmp_path / "work" / "out"
    hostile = ["T1 ../../..\\..\\escaped", "/tmp/T1 absolute", "T1 ..", "T1 \x1b[31mred\x1b[0m\r\nforged line\x07"]
    image = np.random.default_rng(0).uniform(100, 1000, (32, 32, 32)).astype(np.float32)
    for number, description in enumerate(hostile, start=1):
        write_dicom_series(image, np.eye(4), export / f"s{number}", study=_study(), series_description=description,
                           series_number=number)  # fmt: skip
    model = random_checkpoint(PHANTOM, tmp_path / "m.pt")
    before = {p for p in tmp_path.rglob("*")}
    code = main(["infer", str(export), "--bundle", str(PHANTOM), "--model", str(model),
                 "--output", str(out), "--description", "T1", "--set", "pipeline#patch_size=[32,32,32]"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    written = {p for p in tmp_path.rglob("*")} - before - {tmp_path / "m.pt", out.parent}
    assert written and all(p.resolve().is_relative_to(out.resolve()) for p in written)
    folders = sorted(p.name for p in out.iterdir())
    assert len(folders) == len(hostile)
    for name in folders:
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) and name not in (".", ".."), name
        assert sorted(p.name for p in (out / name).iterdir()) == [OUTPUT_MARKER, "report.json", "seg.dcm", "seg.nii.gz"]
    # nothing of the descriptions' control characters reaches the terminal
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", captured.out + captured.err)


def test_no_patient_identifier_reaches_mlflow_or_the_logs(reference: Run, dataset: Path, tmp_path: Path, capsys,
                                                          caplog):  # fmt: skip
    values = patient_identifiers(dataset / "dicom")  # the export's name, id, birth date and accession number
    assert len(values) == 4 and any(v.startswith("PHANTOM^") for v in values)

    run = tmp_path / "run"  # a copy, so that the other tests see the reference run alone
    shutil.copytree(reference.out, run)
    evaluation = run_bundle("evaluating", ["train.yaml", "evaluate.yaml"], *train_args(dataset, run))
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    code = main(["infer", str(dataset / "dicom"), "--bundle", str(PHANTOM), "--model",
                 str(run / "models" / "model.pt"), "--output", str(tmp_path / "out"),
                 "--set", "pipeline#patch_size=[32,32,32]"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert len(training_runs(run)) == 2  # the training run and the evaluation run

    texts = {
        "training output": reference.logs,
        "evaluation output": evaluation.stdout + evaluation.stderr,
        "infer output": captured.out + captured.err + caplog.text,
        "infer file names": "\n".join(str(p) for p in (tmp_path / "out").rglob("*")),
    }
    texts |= {f"infer {p.name}": p.read_text() for p in (tmp_path / "out").rglob("report.json")}
    stored = [p for p in (run / "eval").rglob("*") if p.is_file()]  # db, artifacts, train.log, metrics.json
    assert {"mlruns.db", "train.log", "metrics.json"} <= {p.name for p in stored}
    assert any(p.suffix == ".png" for p in stored) and any(p.name == "model.pt" for p in stored)
    blobs = {str(p.relative_to(run)): p.read_bytes() for p in stored}
    for value in values:
        leaks = [where for where, text in texts.items() if value in text]
        leaks += [where for where, blob in blobs.items() if value.encode() in blob]
        assert not leaks, f"a patient identifier appears in {leaks}"
