"""`medmtl plan` writes a complete bundle: MONAI's bundle checks, one epoch of training, `medmtl infer`, and
configs/plans.json as the one source of the pipeline and network for training and inference.

Datasets: the MR-like phantom (4 cases of 24^3, case classes) and the anisotropic CT-like phantom (5 cases of
48 x 48 x 10, 0.8 x 0.8 x 5 mm, one 3 mm scan). Every run is one tiny epoch on the CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pytest
from monai.bundle import ConfigParser

from medmtl.cli import main
from medmtl.data.ct_phantom import generate_ct_dataset
from medmtl.data.datalist import load_datalist
from medmtl.data.synthetic import generate_dataset
from medmtl.errors import MedmtlError
from medmtl.inference.config import load_inference_config
from medmtl.planner import write_bundle

REPO_ROOT = Path(__file__).resolve().parents[1]
SCHEMA = REPO_ROOT / "bundles" / "schema" / "meta_schema.json"
LAYOUT = {"LICENSE", "docs/README.md", *(f"configs/{f}" for f in (
    "plans.json", "metadata.json", "train.yaml", "inference.yaml", "evaluate.yaml", "multi_gpu_train.yaml",
    "logging.conf"))}
TINY = ["--max_epochs", "1", "--val_interval", "1", "--num_folds", "2", "--num_workers", "0"]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("plan_data")
    generate_dataset(base / "phantom", cases=4, size=24)
    generate_ct_dataset(base / "ct", cases=5, slice_spacings=[5.0, 5.0, 5.0, 5.0, 3.0])
    return {"phantom": base / "phantom", "ct": base / "ct"}


@pytest.fixture(scope="module")
def bundles(datasets, tmp_path_factory) -> dict[str, Path]:
    """`medmtl plan DATASET --out OUT --device cpu` for both datasets (OUT absolute, outside the repository)."""
    base = tmp_path_factory.mktemp("plan_bundles")
    out = {}
    for name, folder in datasets.items():
        assert main(["plan", str(folder), "--out", str(base / f"{name}_mtl"), "--device", "cpu"]) == 0
        out[name] = base / f"{name}_mtl"
    return out


def _bundle_run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


def _parse(bundle: Path, config: str, **overrides: object) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / config))
    parser["bundle_root"] = str(bundle)
    parser.update(overrides)
    return parser


@pytest.mark.parametrize("name", ["phantom", "ct"])
def test_planned_bundle_layout_and_bundle_checks(bundles, datasets, name):
    jsonschema = pytest.importorskip("jsonschema")
    from monai.bundle import verify_metadata, verify_net_in_out

    bundle = bundles[name]
    assert {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()} == LAYOUT
    meta_file = bundle / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text())
    jsonschema.validate(meta, json.loads(SCHEMA.read_text()))
    verify_metadata(meta_file=str(meta_file), filepath=str(SCHEMA))  # offline: the schema file is there
    # the smallest input the metadata allows passes the network (seg logits of the right shape)
    verify_net_in_out("network_seg_def", meta_file=str(meta_file), config_file=str(bundle / "configs" / "train.yaml"),
                      device="cpu", n=1)
    assert meta["name"] == f"{name}_mtl"
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {
        "0": "background", "1": "organ", "2": "lesion"}
    assert meta["input_series"] == {"modality": "CT" if name == "ct" else "MR"}
    # the configs read pipeline and network_args from plans.json and train on the planned dataset by default
    plans = json.loads((bundle / "configs" / "plans.json").read_text())
    train = _parse(bundle, "train.yaml")
    assert train.get_parsed_content("pipeline") == plans["pipeline"]
    assert {**train.get_parsed_content("network_args"), "channels_last": None} == {
        **plans["network_args"], "channels_last": None}  # channels_last: set from the machine at run time
    assert train.get_parsed_content("dataset_dir") == str(datasets[name])
    assert train.get_parsed_content("batch_size") == plans["train"]["batch_size"]
    assert train.get_parsed_content("experiment_name") == f"{name}_mtl"
    readme = (bundle / "docs" / "README.md").read_text()
    assert json.dumps(plans["pipeline"]["patch_size"]) in readme and plans["why"]["spacing"] in readme


@pytest.mark.parametrize("name", ["phantom", "ct"])
def test_planned_bundle_trains_one_epoch_and_infers(bundles, datasets, name, tmp_path):
    bundle = bundles[name]
    # the documented command; from another folder (bundle_root is the bundle's absolute path)
    run = _bundle_run("run", "training", "--config_file", str(bundle / "configs" / "train.yaml"), *TINY, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (bundle / "models" / "model.pt").is_file()
    image = load_datalist(datasets[name])[0]["image"]
    out = tmp_path / "out"
    assert main(["infer", str(image), "--bundle", str(bundle), "--output", str(out), "--quiet"]) == 0
    seg = next(out.rglob("seg.nii.gz"))
    assert nib.load(seg).shape == nib.load(image).shape[:3]  # back on the input grid
    report = json.loads(next(out.rglob("report.json")).read_text())
    plans = json.loads((bundle / "configs" / "plans.json").read_text())
    assert _find(report, "patch_size") == plans["pipeline"]["patch_size"]  # the planned window


def _find(tree: object, key: str) -> object:
    """The first value of ``key`` anywhere in a JSON tree (None when absent)."""
    if isinstance(tree, dict):
        if key in tree:
            return tree[key]
        tree = list(tree.values())
    for value in tree if isinstance(tree, list) else []:
        found = _find(value, key)
        if found is not None:
            return found
    return None


def test_changing_plans_json_changes_training_and_inference(bundles, datasets, tmp_path):
    import shutil

    bundle = shutil.copytree(bundles["ct"], tmp_path / "ct_edit", ignore=shutil.ignore_patterns("models", "eval"))
    plans_file = bundle / "configs" / "plans.json"
    plans = json.loads(plans_file.read_text())
    plans["pipeline"]["patch_size"] = [32, 32, 8]
    plans["pipeline"]["spacing"] = [1.6, 1.6, 3.8]
    plans["network_args"]["filters"] = [8, 16, 32, 64]
    plans_file.write_text(json.dumps(plans))
    train, infer = _parse(bundle, "train.yaml"), load_inference_config(bundle)
    for parser in (train, infer):
        assert parser.get_parsed_content("pipeline#patch_size") == [32, 32, 8]
        assert parser.get_parsed_content("pipeline")["spacing"] == [1.6, 1.6, 3.8]
        assert parser.get_parsed_content("network_args")["filters"] == [8, 16, 32, 64]
    # what training uses: the crop of its preprocessing and the validation window
    item = load_datalist(datasets["ct"])[0]
    sample = train.get_parsed_content("train#preprocessing")(item)[0]
    assert tuple(sample["image"].shape) == (1, 32, 32, 8)
    whole = train.get_parsed_content("validate#preprocessing")(item)  # no augmentation: the planned spacing
    assert whole["image"].pixdim.tolist() == pytest.approx([1.6, 1.6, 3.8])
    assert train.get_parsed_content("validate#inferer#roi_size") == [32, 32, 8]
    # what inference uses: the predictor's pipeline and network
    infer["ckpt_file"] = str(tmp_path / "model.pt")
    import torch

    torch.save(infer.get_parsed_content("multitask_network_def").state_dict(), infer["ckpt_file"])
    predictor = infer.get_parsed_content("predictor")
    assert predictor.pipeline["patch_size"] == [32, 32, 8] and predictor.pipeline["spacing"] == [1.6, 1.6, 3.8]
    # a command-line override still wins over plans.json, in both
    for config in ("train.yaml", "inference.yaml"):
        parser = _parse(bundle, config, **{"pipeline#patch_size": [16, 16, 4], "network_args#top_filters": 4})
        assert parser.get_parsed_content("pipeline")["patch_size"] == [16, 16, 4]
        assert parser.get_parsed_content("network_args")["top_filters"] == 4


def test_training_reads_images_only_through_its_datasets(bundles, monkeypatch, tmp_path):
    """Before the first step, every image read happens inside a dataset's LoadImaged; nothing fingerprints."""
    import monai.transforms
    from ignite.engine import Events

    import medmtl.data.planning
    import medmtl.planner

    def no_planning(*args, **kwargs):
        raise AssertionError("the dataset was fingerprinted at train time")

    monkeypatch.setattr(medmtl.data.planning, "fingerprint", no_planning)
    monkeypatch.setattr(medmtl.planner, "fingerprint", no_planning)
    parser = _parse(bundles["phantom"], "train.yaml", output_dir=str(tmp_path), num_workers=0, num_folds=2)
    parser.get_parsed_content("initialize")  # the data check (check-data) runs first, as in `monai.bundle run`

    reads = {"in_dataset": 0, "outside": 0}  # LoadImaged calls; nibabel reads outside them
    depth = [0]
    load, load_d = nib.load, monai.transforms.LoadImaged.__call__

    def counted_load(*args, **kwargs):
        if not depth[0]:
            reads["outside"] += 1
        return load(*args, **kwargs)

    def dataset_load(self, *args, **kwargs):
        reads["in_dataset"] += 1
        depth[0] += 1
        try:
            return load_d(self, *args, **kwargs)
        finally:
            depth[0] -= 1

    monkeypatch.setattr(nib, "load", counted_load)
    monkeypatch.setattr(monai.transforms.LoadImaged, "__call__", dataset_load)
    trainer = parser.get_parsed_content("train#trainer")  # builds (and caches) both datasets
    seen = {}

    @trainer.on(Events.ITERATION_STARTED(once=1))
    def _first_step(engine):
        seen.update(reads)
        engine.terminate()

    trainer.run()
    assert seen["outside"] == 0
    assert seen["in_dataset"] == 4  # each of the 4 cases once, by the train or validation cache


def test_refused_dataset_writes_no_bundle(datasets, tmp_path, capsys):
    import shutil

    broken = shutil.copytree(datasets["ct"], tmp_path / "broken")
    meta = json.loads((broken / "dataset.json").read_text())
    meta["training"][0]["label"] = "./labelsTr/missing.nii.gz"  # a pair without its label
    (broken / "dataset.json").write_text(json.dumps(meta))
    out = tmp_path / "bundle"
    assert main(["plan", str(broken), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "check-data" in err
    assert not out.exists()
    # and never into a folder that holds anything
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(MedmtlError, match="not an empty folder"):
        write_bundle(datasets["ct"], tmp_path / "full")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]


def test_a_dataset_named_like_the_template_is_planned(datasets, tmp_path):
    # the template is the hippocampus bundle: planning Task04 itself (its name, path and label names are the
    # template's words) must write the bundle, not mistake them for template lines left unadapted
    import shutil

    hippo = shutil.copytree(datasets["phantom"], tmp_path / "Task04_Hippocampus")
    meta = json.loads((hippo / "dataset.json").read_text())
    meta["name"] = "Hippocampus"
    (hippo / "dataset.json").write_text(json.dumps(meta))
    out = write_bundle(hippo, tmp_path / "hippocampus_mtl", device="cpu")
    train = (out / "configs" / "train.yaml").read_text()
    assert "planned by `medmtl plan`" in train and str(hippo) in train
