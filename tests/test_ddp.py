"""Distributed training: the DDP helpers under a real 2-process gloo group, and the phantom bundle under torchrun.

Both multi-process tests launch `torchrun --standalone --nproc_per_node=2` (a free port is picked for the
rendezvous, so parallel test runs do not collide). The helper test runs this file itself as the worker
(`python tests/test_ddp.py OUT` under torchrun, see `_worker`): each rank writes what it saw to OUT/rank<R>.json.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine

from medmtl.engine import MultiTaskEvaluation
from medmtl.engine import distributed as ddp
from medmtl.errors import MedmtlError

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "bundles" / "phantom_mtl" / "configs"
TINY = ["--phantom#cases", "8", "--phantom#size", "32", "--pipeline#patch_size", "[32,32,32]",
        "--num_folds", "2", "--val_interval", "1", "--num_workers", "0"]
LABELS = {0: "background", 1: "organ", 2: "lesion"}


def _torchrun(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["OMP_NUM_THREADS"] = "1"  # torchrun's own default for several processes; said here to be explicit
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, env=env, timeout=timeout)


def _failed(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"


# ---------------------------------------------------------------------------------------------------------
# Toy validation cases shared by the worker (distributed) and the test (single process)


def _toy_cases(n: int = 5) -> list[dict]:
    """Deterministic 2D cases with imperfect predictions, so every metric differs from case to case."""
    gen = torch.Generator().manual_seed(7)
    cases = []
    for i in range(n):
        label = torch.zeros(1, 1, 12, 12, dtype=torch.long)
        label[..., 2 : 8 + i % 3, 3:9] = 1
        if i % 2 == 0:
            label[..., 4 : 6 + i % 2, 4:7] = 2
        logits = torch.nn.functional.one_hot(label[:, 0], 3).movedim(-1, 1).float() * 2
        logits = logits + torch.randn(logits.shape, generator=gen) * 1.5
        cases.append({
            "case_id": f"toy_{i}",
            "image": torch.randn(1, 1, 12, 12, generator=gen),
            "label": label,
            "seg": logits,
            "cls_logits": torch.randn(1, 2, generator=gen),
            "cls": torch.tensor([i % 2]),
        })
    return cases


def _evaluate(cases: list, sampler=None) -> Engine:
    """Run MultiTaskEvaluation over `cases` (one per iteration) on a plain ignite engine."""
    def step(engine: Engine, batch: dict) -> dict:
        engine.state.batch = {"case_id": [batch["case_id"]]}
        return {"image": batch["image"], "label": {"label": batch["label"], "cls": batch["cls"]},
                "pred": {"seg": batch["seg"], "cls": batch["cls_logits"]}}

    loader = torch.utils.data.DataLoader(cases, batch_size=None, sampler=sampler)
    engine = Engine(step)
    MultiTaskEvaluation(LABELS, cls_mode="case").attach(engine)
    engine.run(loader, max_epochs=1)
    return engine


# ---------------------------------------------------------------------------------------------------------
# The worker: run as `torchrun --nproc_per_node=2 tests/test_ddp.py OUT`


def _trained_log_var(average: bool) -> tuple[float, bool]:
    """A learned loss parameter after 3 SGD steps of a DDP-wrapped linear net on rank-specific data, and
    whether `check_in_sync` finds all ranks' weights equal."""
    from monai.engines import SupervisedTrainer

    class UncertaintyLoss(torch.nn.Module):  # the shape of MultiTaskLoss(weighting="uncertainty")
        def __init__(self) -> None:
            super().__init__()
            self.log_var = torch.nn.Parameter(torch.zeros(()))

        def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return torch.exp(-self.log_var) * ((pred - target) ** 2).mean() + 0.5 * self.log_var

    torch.manual_seed(0)
    net = ddp.wrap_ddp(torch.nn.Linear(3, 1), "cpu")
    loss = UncertaintyLoss()
    r = ddp.rank()
    data = [{"image": torch.full((2, 3), float(r + 1)), "label": torch.full((2, 1), 5.0 * (r + 1))}] * 3
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=data, network=net,
        optimizer=torch.optim.SGD([*net.parameters(), *loss.parameters()], lr=0.01), loss_function=loss,
    )
    if average:
        ddp.AverageGradients(loss.parameters()).attach(trainer)
    trainer.run()
    return float(loss.log_var), ddp.check_in_sync({"network": net.module, "loss": loss})


def _worker(out: Path) -> None:
    from monai.data import DistributedSampler

    device = ddp.init_distributed()
    r = ddp.rank()
    report: dict = {"rank": r, "world_size": ddp.world_size(), "device": str(device),
                    "backend": torch.distributed.get_backend()}

    # gradients of parameters outside DDP: rank r holds r + 1; a missing gradient counts as zero
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(()))
    a.grad = torch.full((2,), float(r + 1))
    b.grad = torch.tensor(4.0) if r == 0 else None
    ddp.AverageGradients([a, b])()
    report["grads"] = [a.grad.tolist(), float(b.grad)]
    report["log_var"] = {"averaged": _trained_log_var(True), "not_averaged": _trained_log_var(False)}

    # validation: each rank scores its share, then all ranks aggregate all cases
    cases = _toy_cases()
    sampler = DistributedSampler(cases, even_divisible=False, shuffle=False)
    engine = _evaluate(cases, sampler)
    report["scored_here"] = len(list(sampler))
    report["metrics"] = dict(engine.state.metrics)
    report["case_ids"] = [c["case_id"] for c in engine.state.case_results]
    report["overlays"] = sum("overlay" in c for c in engine.state.case_results)

    # loss terms: rank 0 sees loss_total 1, 2 and loss_cls 10; rank 1 sees loss_total 3, 6 and no loss_cls
    class FakeLoss:
        last_terms: dict = {}

    fake = FakeLoss()
    averager = ddp.DistributedLossTermsAverager(fake)
    terms = [{"loss_total": 1.0, "loss_cls": 10.0}, {"loss_total": 2.0}] if r == 0 else [
        {"loss_total": 3.0}, {"loss_total": 6.0}]

    def train_step(engine: Engine, batch: int) -> None:
        fake.last_terms = terms[batch]

    trainer = Engine(train_step)
    averager.attach(trainer)
    trainer.run([0, 1], max_epochs=1)
    report["train_metrics"] = dict(trainer.state.metrics)

    # set-up on local rank 0 first: the others find its file already there
    marker = out / "marker.txt"

    def make_marker() -> bool:
        existed = marker.exists()
        if r == 0:
            time.sleep(0.5)  # rank 1 would overtake a rank 0 that was not waited for
            marker.write_text("made by rank 0")
        return existed

    report["marker_existed"] = ddp.local_rank0_first(make_marker)
    report["log_path"] = ddp.per_rank_path(out / "train.log")
    ddp.shutdown()
    report["after_shutdown"] = ddp.is_distributed()
    (out / f"rank{r}.json").write_text(json.dumps(report))


# ---------------------------------------------------------------------------------------------------------
# Single-process behaviour


def test_helpers_in_a_single_process(monkeypatch):
    assert (ddp.rank(), ddp.world_size(), ddp.is_distributed()) == (0, 1, False)
    assert ddp.per_rank_path("/x/train.log") == "/x/train.log"
    assert ddp.local_rank0_first(lambda v: v * 2, 21) == 42
    assert ddp.all_gather_objects({"a": 1}) == [{"a": 1}]
    assert ddp.interleave([[0, 2, 4], [1, 3]]) == [0, 1, 2, 3, 4]
    assert ddp.interleave([]) == []
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.ones(2)
    ddp.AverageGradients([p])()  # world of one: unchanged
    assert p.grad.tolist() == [1.0, 1.0]
    ddp.shutdown()  # no process group: nothing to do
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert ddp.local_rank() == 3
    assert ddp.local_device() == (torch.device("cuda:3") if torch.cuda.is_available() else torch.device("cpu"))


def test_init_distributed_outside_torchrun_says_how_to_launch(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # init_distributed installs the one-line hook
    with pytest.raises(MedmtlError, match=r"launched with torchrun .* RANK, WORLD_SIZE, LOCAL_RANK"):
        ddp.init_distributed()
    assert getattr(sys.excepthook, "medmtl", False)  # so the message prints as one line
    assert not ddp.is_distributed()


@pytest.mark.parametrize("bundle", ["phantom_mtl", "hippocampus_mtl"])
def test_multi_gpu_config_keeps_train_yaml_in_step(bundle):
    """multi_gpu_train.yaml restates train.yaml's `initialize`: every step must still be there, in order."""
    from monai.bundle import ConfigParser

    configs = REPO_ROOT / "bundles" / bundle / "configs"
    single, merged = ConfigParser(), ConfigParser()
    single.read_config(configs / "train.yaml")
    merged.read_config([configs / "train.yaml", configs / "multi_gpu_train.yaml"])

    def undistributed(step: str) -> str:  # the distributed form of a step back to train.yaml's
        step = re.sub(r"medmtl\.engine\.distributed\.per_rank_path\((.*)\)\)$", r"\1)", step)
        return re.sub(r"medmtl\.engine\.distributed\.local_rank0_first\(([\w.]+), ", r"\1(", step)

    steps = [undistributed(step) for step in merged["initialize"]]
    assert [step for step in steps if step in single["initialize"]] == single["initialize"]
    assert "$medmtl.engine.distributed.init_distributed()" in steps
    # the "+" keys extend train.yaml's lists instead of replacing them
    assert merged["imports"] == single["imports"] + ["$import medmtl.engine.distributed"]
    assert merged["train"]["handlers"] == single["train"]["handlers"] + ["@train#average_loss_gradients"]


# ---------------------------------------------------------------------------------------------------------
# Two gloo processes


@pytest.fixture(scope="module")
def worker_reports(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp_worker")
    proc = _torchrun(str(Path(__file__)), str(out), timeout=180)
    assert proc.returncode == 0, _failed(proc)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_worker_joined_a_gloo_group_on_cpu(worker_reports):
    assert [(w["rank"], w["world_size"], w["backend"]) for w in worker_reports] == [(0, 2, "gloo"), (1, 2, "gloo")]
    if not torch.cuda.is_available():
        assert {w["device"] for w in worker_reports} == {"cpu"}
    assert [w["after_shutdown"] for w in worker_reports] == [False, False]


def test_gradients_outside_ddp_are_averaged(worker_reports):
    for w in worker_reports:
        assert w["grads"] == [[1.5, 1.5], 2.0]  # (1 + 2) / 2; (4 + 0) / 2
    (value0, sync0), (value1, sync1) = (w["log_var"]["averaged"] for w in worker_reports)
    assert value0 == value1 != 0.0 and sync0 and sync1
    # the control: without the handler each rank's loss parameter follows its own data, and the check sees it
    (value0, sync0), (value1, sync1) = (w["log_var"]["not_averaged"] for w in worker_reports)
    assert value0 != value1 and not sync0 and not sync1


def test_distributed_validation_equals_a_single_process(worker_reports):
    single = _evaluate(_toy_cases())
    assert [w["scored_here"] for w in worker_reports] == [3, 2]  # each case on exactly one rank
    for w in worker_reports:
        # same rows in the same order, so the means are bit-identical (NaN compared as text)
        assert w["case_ids"] == [c["case_id"] for c in single.state.case_results]
        assert json.dumps(w["metrics"], sort_keys=True) == json.dumps(dict(single.state.metrics), sort_keys=True)
        assert w["overlays"] == 5
    assert 0.0 < single.state.metrics["val/mean_dice"] < 1.0


def test_loss_terms_are_averaged_over_all_ranks_iterations(worker_reports):
    for w in worker_reports:
        assert w["train_metrics"]["train/loss"] == pytest.approx((1 + 2 + 3 + 6) / 4)
        assert w["train_metrics"]["train/loss_cls"] == pytest.approx(10.0)  # only one iteration had it


def test_local_rank0_runs_first_and_logs_are_per_rank(worker_reports):
    assert [w["marker_existed"] for w in worker_reports] == [False, True]
    assert Path(worker_reports[0]["log_path"]).name == "train.log"
    assert Path(worker_reports[1]["log_path"]).name == "train.rank1.log"


# ---------------------------------------------------------------------------------------------------------
# The phantom bundle under torchrun

RANK_LINE = re.compile(r"rank (\d) of 2: validation metrics over (\d+) cases \((\d+) scored on this rank\): (\{.*\})")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("ddp_bundle")
    configs = str([str(CONFIGS / "train.yaml"), str(CONFIGS / "multi_gpu_train.yaml")])
    # learned task weights: loss parameters outside DDP, kept in step by AverageGradients
    proc = _torchrun("-m", "monai.bundle", "run", "training", "--config_file", configs, "--max_epochs", "2",
                     "--loss_args#weighting", "uncertainty", "--output_dir", str(out), "--dataset_dir",
                     str(out / "data"), *TINY)
    assert proc.returncode == 0, _failed(proc)
    return out, proc.stdout + proc.stderr


def _client(out: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{out / 'eval' / 'mlruns.db'}")


def _runs(out: Path) -> list:
    client = _client(out)
    exp = client.get_experiment_by_name("phantom_mtl")
    return [] if exp is None else client.search_runs([exp.experiment_id])


def test_ddp_bundle_writes_one_checkpoint_set_and_one_mlflow_run(ddp_run):
    out, log = ddp_run
    assert sorted(p.name for p in (out / "models").iterdir()) == ["last.pt", "model.pt"]  # no temp files
    from medmtl.engine.checkpoint import load_checkpoint
    from medmtl.networks import MultiTaskUNet

    weights = load_checkpoint(out / "models" / "model.pt")
    assert not any(k.startswith("module.") for k in weights)  # the plain network, not the DDP wrapper
    net = MultiTaskUNet(spatial_dims=3, in_channels=1, num_classes=3, filters=[8, 16, 32, 64, 128],
                        strides=[1, 2, 2, 2, 2], num_cls_outputs=2)
    net.load_state_dict(weights)  # strict
    last = load_checkpoint(out / "models" / "last.pt")
    assert last["trainer"]["iteration"] == 2 * last["trainer"]["epoch_length"] == 2  # 1 batch per rank per epoch
    assert not any(k.startswith("module.") for k in last["network"])
    assert len(re.findall(r"new best val/mean_dice", log)) <= 2  # written by rank 0 only (one per epoch at most)
    assert {"train.log", "train.rank1.log"} <= {p.name for p in (out / "eval").iterdir()}
    assert last["loss"]["log_vars.seg"] != 0.0  # the task weights did train
    # finalize: both ranks end with the same network and loss parameters
    assert sorted(re.findall(r"rank (\d): network, loss weights identical on all 2 ranks", log)) == ["0", "1"]

    (run,) = _runs(out)
    assert run.info.status == "FINISHED"
    assert {"val/mean_dice", "val/dice_organ", "val/hd95_lesion_mm", "train/loss_seg"} <= set(run.data.metrics)
    assert sorted(m.step for m in _client(out).get_metric_history(run.info.run_id, "val/mean_dice")) == [1, 2]


def test_ddp_validation_metrics_agree_across_ranks_mlflow_and_a_single_process(ddp_run, tmp_path):
    out, log = ddp_run
    (run,) = _runs(out)
    client = _client(out)

    # every rank logs the metrics it aggregated: both ranks agree with each other and with MLflow
    lines = [(int(r), int(n), int(k), json.loads(m)) for r, n, k, m in RANK_LINE.findall(log)]
    assert sorted((r, n) for r, n, _, _ in lines) == [(0, 4), (0, 4), (1, 4), (1, 4)]  # 2 epochs x 2 ranks
    # a rank logs epoch 2 only after both ranks gathered (and logged) epoch 1: the lines come in epoch pairs
    by_epoch = {epoch: sorted(lines[2 * (epoch - 1) : 2 * epoch], key=lambda line: line[0]) for epoch in (1, 2)}
    for epoch, (rank0, rank1) in by_epoch.items():
        assert (rank0[0], rank1[0]) == (0, 1)
        assert rank0[2] + rank1[2] == 4  # the 4 validation cases split between the ranks
        assert json.dumps(rank0[3], sort_keys=True) == json.dumps(rank1[3], sort_keys=True)
        for key, value in rank0[3].items():
            if value == value:  # compare the finite values (NaN != NaN)
                (logged,) = [m.value for m in client.get_metric_history(run.info.run_id, key) if m.step == epoch]
                assert logged == pytest.approx(value, rel=1e-9, abs=1e-12), key

    # the last validation's case table holds every validation case exactly once
    table = client.download_artifacts(run.info.run_id, "validation/cases_epoch_002.csv", str(tmp_path / "dl"))
    ids = [row["case_id"] for row in csv.DictReader(io.StringIO(Path(table).read_text()))]
    assert len(ids) == len(set(ids)) == 4

    # a single-process evaluation of the best checkpoint on the same fold gives the same metrics
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["OMP_NUM_THREADS"] = "1"  # the same kernels as the ranks, which torchrun ran with one thread each
    configs = str([str(CONFIGS / "train.yaml"), str(CONFIGS / "evaluate.yaml")])
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "evaluating", "--config_file", configs,
         "--ckpt_file", str(out / "models" / "model.pt"), "--output_dir", str(tmp_path / "single"),
         "--dataset_dir", str(out / "data"), *TINY],
        cwd=REPO_ROOT, capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, _failed(proc)
    report = json.loads((tmp_path / "single" / "eval" / "metrics.json").read_text())
    assert sorted(c["case_id"] for c in report["cases"]) == sorted(ids)
    from medmtl.engine.checkpoint import load_checkpoint

    best_epoch = int(load_checkpoint(out / "models" / "last.pt")["checkpoints"]["best_epoch"])
    ddp_metrics = by_epoch[best_epoch][0][3]
    assert report["metrics"].keys() == ddp_metrics.keys()
    for key, value in report["metrics"].items():
        if value is not None:  # metrics.json writes NaN as null
            assert ddp_metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
