"""`medmtl plan` and medmtl.planner: nnU-Net v2's planning rules on three datasets, checked by hand.

Datasets: the MR-like phantom (isotropic, case classes), five Task04 hippocampus cases (symlinked into a small
MSD folder, so the test stays fast), and the anisotropic CT-like phantom (0.8 x 0.8 mm, 5 mm slices, one
3 mm scan). Expected values are worked out in the comments from the rules in medmtl/planner.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medmtl.cli import main
from medmtl.data.checks import check_dataset
from medmtl.data.ct_phantom import generate_ct_dataset
from medmtl.data.datalist import load_datalist
from medmtl.data.pipelines import train_transforms, validate_config
from medmtl.data.synthetic import generate_dataset
from medmtl.errors import MedmtlError
from medmtl.networks import MultiTaskUNet
from medmtl.planner import get_pool_and_conv_props, make_plan, plan_dataset, target_spacing, write_plans

HIPPO_CASES = ("001", "003", "007", "008", "011")  # shapes 35x51x35, 34x52x35, 34x47x40, 36x48x40, 36x50x31


@pytest.fixture(scope="module")
def ct_dir(tmp_path_factory) -> Path:
    """Five 48x48x10 CT cases, four with 5 mm slices and one with 3 mm."""
    out = tmp_path_factory.mktemp("ct") / "ct"
    generate_ct_dataset(out, cases=5, slice_spacings=[5.0, 5.0, 5.0, 5.0, 3.0])
    return out


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantom") / "phantom"
    generate_dataset(out, cases=4, size=24)
    return out


@pytest.fixture(scope="module")
def hippo_subset(hippocampus_dir, tmp_path_factory) -> Path:
    """An MSD folder of symlinks to five Task04 cases (dataset.json as Task04's, training cut to them)."""
    out = tmp_path_factory.mktemp("hippo") / "Task04_subset"
    meta = json.loads((hippocampus_dir / "dataset.json").read_text())
    training = []
    for folder in ("imagesTr", "labelsTr"):
        (out / folder).mkdir(parents=True)
    for case in HIPPO_CASES:
        name = f"hippocampus_{case}.nii.gz"
        for folder in ("imagesTr", "labelsTr"):
            (out / folder / name).symlink_to(hippocampus_dir / folder / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    meta.update(training=training, test=[], numTraining=len(training), numTest=0)
    (out / "dataset.json").write_text(json.dumps(meta))
    return out


def _foreground_voxels(folder: Path) -> np.ndarray:
    """Every foreground voxel of every case (fewer than the fingerprint's 10,000 samples per case: all taken)."""
    values = []
    for label in sorted((folder / "labelsTr").glob("*.nii.gz")):
        lab = np.asarray(nib.load(label).dataobj)
        assert 0 < np.count_nonzero(lab) < 10_000
        values.append(np.asarray(nib.load(folder / "imagesTr" / label.name).dataobj)[lab > 0])
    return np.concatenate(values).astype(np.float64)


def _foreground_percentiles(folder: Path) -> list[float]:
    return [float(v) for v in np.percentile(_foreground_voxels(folder), [0.5, 99.5])]


def _check_buildable(plan: dict) -> None:
    """The pipeline block passes the pipeline's validation; network_args build a network that runs a patch."""
    validate_config(plan["pipeline"])
    net = MultiTaskUNet(**plan["network_args"]).eval()
    patch = plan["pipeline"]["patch_size"]
    with torch.no_grad():
        out = net(torch.zeros(1, plan["network_args"]["in_channels"], *patch))
    assert out["seg"].shape == (1, plan["pipeline"]["num_classes"], *patch)
    assert out["cls"].shape == (1, plan["network_args"]["num_cls_outputs"])


def test_ct_phantom_plan(ct_dir):
    plan = plan_dataset(ct_dir)
    # spacing: median (0.8, 0.8, 5.0) is anisotropic (5 > 3 x 0.8, and 10 slices x 3 < 48 voxels), so z takes the
    # 10th percentile of (5, 5, 5, 5, 3) = 3 + 0.4 x 2 = 3.8 mm
    assert plan["pipeline"]["spacing"] == pytest.approx([0.8, 0.8, 3.8])
    # at 3.8 mm the 5 mm scans have round(10 x 5 / 3.8) = 13 slices, the 3 mm one 8: median 48 x 48 x 13
    assert plan["fingerprint"]["median_shape_at_target"] == [48, 48, 13]
    # pooling: x, y first (z 3.8 mm is over 2x their 0.8, then 1.6); at 3.2 mm z is within 2x and pools once
    # (13 -> 7; then no axis is >= 8 long): strides (1,1,1) (2,2,1) (2,2,1) (2,2,2), divisor (8, 8, 2): 13 -> 14
    net = plan["network_args"]
    assert net["strides"] == [[1, 1, 1], [2, 2, 1], [2, 2, 1], [2, 2, 2]]
    assert net["kernel_size"] == [[3, 3, 1], [3, 3, 1], [3, 3, 3], [3, 3, 3]]  # z kernels wait for the spacing too
    assert plan["pipeline"]["patch_size"] == [48, 48, 14]
    assert net["filters"] == [32, 64, 128, 256] and net["channels_last"] is False
    assert plan["pipeline"]["spatial_dims"] == 3 and "slice_axis" not in plan["pipeline"]
    # batch: the memory allows 121, but 5 cases x 48*48*13 voxels x 5% is 0.23 patches: the minimum, 2
    assert plan["train"]["batch_size"] == 2
    assert plan["train"]["feature_map_voxels"] == 9_287_712  # hand sum in feature_map_voxels' terms
    # CT (nnU-Net's CTNormalization): clip to the dataset's foreground 0.5 / 99.5 percentiles, then z-score with
    # the dataset's foreground mean and std (population std, as numpy's default and nnU-Net's)
    assert plan["pipeline"]["normalization"] == "ct"
    assert plan["pipeline"]["ct_window"] == pytest.approx(_foreground_percentiles(ct_dir))
    fg = _foreground_voxels(ct_dir)
    assert plan["pipeline"]["ct_stats"] == pytest.approx({"mean": fg.mean(), "std": fg.std()})
    ch = plan["train"]["channel_normalization"][0]
    assert ch["scheme"] == "ct" and ch["modality"] == "CT" and 100 < ch["mean"] < 150
    # no case labels: presence heads
    assert plan["pipeline"]["cls_mode"] == "presence" and net["num_cls_outputs"] == 2
    assert net["heads"] == ["seg", "cls", "boundary"] and plan["pipeline"]["boundary"] is True
    assert set(plan["fingerprint"]["label_frequencies"]) == {"background", "organ", "lesion"}
    assert set(plan["why"]) >= {"spacing", "normalization", "patch_size", "strides", "batch_size", "heads"}
    _check_buildable(make_plan(_fp_of(ct_dir), device="cpu"))
    # the pipeline block runs as planned on the data: resampled to 3.8 mm slices, padded, cropped to the patch,
    # HU clipped to the window and z-scored: within the window's z-scores, foreground around 0
    item = load_datalist(ct_dir)[0]
    sample = train_transforms({**plan["pipeline"], "augment": False})(item)[0]
    assert tuple(sample["image"].shape) == (1, 48, 48, 14) and tuple(sample["boundary"].shape) == (2, 48, 48, 14)
    lo, hi = ((v - fg.mean()) / fg.std() for v in plan["pipeline"]["ct_window"])
    assert sample["image"].min() >= lo - 1e-4 and sample["image"].max() <= hi + 1e-4
    assert abs(float(sample["image"][sample["label"] > 0].mean())) < 0.5
    assert sample["image"].pixdim.tolist() == pytest.approx([0.8, 0.8, 3.8])


def _fp_of(folder: Path) -> dict:
    from medmtl.planner import dataset_fingerprint

    return dataset_fingerprint(folder, check=False)


def test_ct_phantom_cpu_and_2d(ct_dir):
    fp = _fp_of(ct_dir)
    cpu = make_plan(fp, device="cpu")
    # the strided first stage: nnU-Net's strides shifted up one level, a stride-1 bottleneck; half the widths
    assert cpu["network_args"]["strides"] == [[2, 2, 1], [2, 2, 1], [2, 2, 2], [1, 1, 1]]
    assert cpu["network_args"]["filters"] == [16, 32, 64, 128] and cpu["network_args"]["top_filters"] == 8
    assert cpu["network_args"]["channels_last"] is True and cpu["pipeline"]["patch_size"] == [48, 48, 14]
    flat = make_plan(fp, spatial_dims=2)
    # 2D slices across the coarse axis (z): in-plane 48 x 48 pools 3 times (48 -> 6)
    assert flat["pipeline"]["slice_axis"] == 2 and flat["pipeline"]["patch_size"] == [48, 48]
    assert flat["network_args"]["strides"] == [[1, 1], [2, 2], [2, 2], [2, 2]]
    assert flat["pipeline"]["spacing"] == pytest.approx([0.8, 0.8, 3.8])  # the data is still resampled in 3D
    _check_buildable(flat)


def _hand_fp(spacings, shapes, channel_names=("CT",)) -> dict:
    return {
        "spatial_dims": len(shapes[0]), "num_cases": len(shapes), "num_channels": len(channel_names),
        "spacings": spacings, "shapes": shapes, "label_names": {"0": "background", "1": "organ"},
        "foreground_intensity": [{"mean": 50.0, "std": 10.0, "p00_5": 10.0, "p50": 50.0, "p99_5": 90.0}],
        "channel_names": list(channel_names), "case_classes": [], "label_voxels": {"0": 90, "1": 10},
    }


def test_very_anisotropic_volumes_plan_2d():
    # 6 slices of 5 mm: anisotropic, and a 3D network could not pool z once (6 < 2 x 4 voxels): 2D by default
    fp = _hand_fp([[0.8, 0.8, 5.0]] * 3, [[48, 48, 6]] * 3)
    plan = make_plan(fp)
    assert plan["pipeline"]["spatial_dims"] == 2 and plan["pipeline"]["slice_axis"] == 2
    assert plan["pipeline"]["patch_size"] == [48, 48] and "very anisotropic" in plan["why"]["spatial_dims"]
    assert make_plan(fp, spatial_dims=3)["pipeline"]["spatial_dims"] == 3  # the option wins
    assert plan["pipeline"]["ct_window"] == [10.0, 90.0]
    assert plan["pipeline"]["ct_stats"] == {"mean": 50.0, "std": 10.0}


def test_ct_normalization_plan_rules():
    # two CT channels: the union of the windows, the pooled mean and std (equal sample counts per channel):
    # means 50 and 150 -> 100; E[x^2] = (10^2 + 50^2 + 30^2 + 150^2) / 2 = 13,000 -> std sqrt(13,000 - 100^2)
    fp = _hand_fp([[1.0, 1.0, 1.0]] * 2, [[32, 32, 32]] * 2, channel_names=("CT", "ct"))
    fp["foreground_intensity"] = [{"mean": 50.0, "std": 10.0, "p00_5": 10.0, "p50": 50.0, "p99_5": 90.0},
                                  {"mean": 150.0, "std": 30.0, "p00_5": 60.0, "p50": 150.0, "p99_5": 240.0}]
    pipe = make_plan(fp)["pipeline"]
    assert pipe["ct_window"] == [10.0, 240.0]
    assert pipe["ct_stats"] == pytest.approx({"mean": 100.0, "std": np.sqrt(3000.0)})
    # a constant foreground has no window: per-image z-score, no CT keys
    fp = _hand_fp([[1.0, 1.0, 1.0]] * 2, [[32, 32, 32]] * 2)
    fp["foreground_intensity"] = [{"mean": 40.0, "std": 0.0, "p00_5": 40.0, "p50": 40.0, "p99_5": 40.0}]
    plan = make_plan(fp)
    assert plan["pipeline"]["normalization"] == "zscore" and "ct_stats" not in plan["pipeline"]
    assert "constant foreground" in plan["why"]["normalization"]
    # MR: per-image z-score, no CT keys
    mr = make_plan(_hand_fp([[1.0, 1.0, 1.0]] * 2, [[32, 32, 32]] * 2, channel_names=("MRI",)))["pipeline"]
    assert mr["normalization"] == "zscore" and "ct_window" not in mr and "ct_stats" not in mr


def test_target_spacing_rules():
    # isotropic: the median
    assert target_spacing([[1, 1, 1], [1, 1, 1.2], [1, 1, 1.4]], [[40, 40, 40]] * 3)[0] == [1, 1, 1.2]
    # thick slices but many of them (not few voxels): nnU-Net keeps the median
    assert target_spacing([[0.8, 0.8, 5.0]] * 3, [[48, 48, 40]] * 3)[0] == [0.8, 0.8, 5.0]
    # the 10th percentile is finer than the other axes: clamped to their coarsest + 1e-5
    spacing, why = target_spacing([[0.8, 0.8, 5.0]] * 3 + [[0.8, 0.8, 0.6]] * 2, [[48, 48, 10]] * 5)
    assert spacing == pytest.approx([0.8, 0.8, 0.80001]) and "10th percentile" in why


def test_pool_and_conv_props_match_nnunet_plans():
    # nnU-Net v2's published 3d_fullres plans: Task04 hippocampus (1 mm, patch 40x56x40) ...
    n, pools, kernels, patch, div = get_pool_and_conv_props([1.0, 1.0, 1.0], [35, 50, 36])
    assert pools == [[1, 1, 1]] + [[2, 2, 2]] * 3 and patch == [40, 56, 40] and div == [8, 8, 8]
    # ... and Task05 prostate (3.6 x 0.625 x 0.625 mm, z first as nnU-Net orders it, patch 20x320x256)
    n, pools, kernels, patch, div = get_pool_and_conv_props([3.6, 0.625, 0.625], [20, 320, 256])
    assert pools == [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2], [1, 2, 2]]
    assert kernels == [[1, 3, 3], [1, 3, 3]] + [[3, 3, 3]] * 5 and patch == [20, 320, 256]


def test_phantom_plan(phantom_dir):
    plan = plan_dataset(phantom_dir)
    # 1 mm isotropic 24^3: pools 24 -> 12 -> 6 (6 < 8 stops), divisor 4: patch 24^3, three stages
    assert plan["pipeline"]["spacing"] == [1.0, 1.0, 1.0] and plan["pipeline"]["patch_size"] == [24, 24, 24]
    assert plan["network_args"]["strides"] == [[1, 1, 1], [2, 2, 2], [2, 2, 2]]
    assert plan["train"]["batch_size"] == 2  # 4 cases x 5% of 24^3 is under one patch: the minimum
    assert plan["pipeline"]["normalization"] == "zscore"  # MR
    # the phantom lists a lesion class per case: the cls head predicts it
    assert plan["pipeline"]["cls_mode"] == "case" and plan["network_args"]["num_cls_outputs"] == 2
    assert plan["fingerprint"]["case_classes"] == [0, 1]
    _check_buildable(plan)


def test_2d_images_plan(tmp_path):
    generate_dataset(tmp_path / "flat", cases=3, size=24, spatial_dims=2)
    plan = plan_dataset(tmp_path / "flat")
    # 2D images: a 2D network without slice_axis; 24 -> 12 -> 6 pools twice, patch 24 x 24
    assert plan["pipeline"]["spatial_dims"] == 2 and "slice_axis" not in plan["pipeline"]
    assert plan["pipeline"]["spacing"] == [1.0, 1.0] and plan["pipeline"]["patch_size"] == [24, 24]
    assert plan["network_args"]["strides"] == [[1, 1], [2, 2], [2, 2]]
    assert plan["network_args"]["filters"] == [32, 64, 128]
    _check_buildable(plan)
    with pytest.raises(MedmtlError, match="spatial_dims 3 is not possible for 2D images"):
        make_plan(_fp_of(tmp_path / "flat"), spatial_dims=3)


def test_hippocampus_subset_plan(hippo_subset):
    plan = plan_dataset(hippo_subset)
    # 1 mm; median shape of the five cases 35 x 50 x 35; pools 35 -> 18 -> 9 -> 5 per axis: divisor 8,
    # patch 40 x 56 x 40 (nnU-Net's own Task04 plan; the full 200 cases give the same patch and batch 7)
    assert plan["pipeline"]["spacing"] == [1.0, 1.0, 1.0]
    assert plan["fingerprint"]["median_shape_at_target"] == [35, 50, 35]
    assert plan["pipeline"]["patch_size"] == [40, 56, 40]
    assert plan["network_args"]["strides"] == [[1, 1, 1]] + [[2, 2, 2]] * 3
    assert plan["network_args"]["filters"] == [32, 64, 128, 256]
    assert plan["train"]["batch_size"] == 2  # 5 cases x 61,250 voxels x 5% = 0.17 patches: the minimum
    assert plan["pipeline"]["normalization"] == "zscore"
    assert plan["train"]["channel_normalization"][0]["modality"] == "MRI"
    assert plan["pipeline"]["cls_mode"] == "presence" and plan["network_args"]["num_cls_outputs"] == 2
    cpu = make_plan(_fp_of(hippo_subset), device="cpu")
    # the hand-tuned CPU bundle's network: strides [2, 2, 2, 1], filters 16..128, top stage 8
    assert cpu["network_args"]["strides"] == [[2, 2, 2]] * 3 + [[1, 1, 1]]
    assert cpu["network_args"]["filters"] == [16, 32, 64, 128] and cpu["network_args"]["top_filters"] == 8


def test_cli_writes_plans_json(ct_dir, tmp_path, capsys):
    out = tmp_path / "bundle"
    assert main(["plan", str(ct_dir), "--out", str(out), "--device", "cpu", "--memory-gb", "2"]) == 0
    text = (out / "configs" / "plans.json").read_text()
    assert text.startswith('{\n    "notes"')  # indent 4
    plan = json.loads(text)
    assert set(plan) == {"notes", "fingerprint", "pipeline", "network_args", "train", "why"}
    assert plan["train"]["device"] == "cpu" and plan["train"]["memory_gb"] == 2.0
    assert "plans.json" in capsys.readouterr().out
    # never overwrites: a second run into the same folder is refused, the file is unchanged
    assert main(["plan", str(ct_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not an empty folder" in err
    assert (out / "configs" / "plans.json").read_text() == text


def _copy_ct(ct_dir: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(ct_dir, dst)
    return dst


def _refused(dataset: Path, out: Path, capsys) -> str:
    assert main(["plan", str(dataset), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert not out.exists()  # nothing written
    return err


def test_refusals(ct_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "dataset.json: not found" in _refused(empty, tmp_path / "o1", capsys)

    # a label whose shape differs from its image: check-data's own message, in one line
    bad = _copy_ct(ct_dir, tmp_path / "mismatch")
    name = "ctphantom_001.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((48, 40, 10), np.uint8), np.diag([0.8, 0.8, 5.0, 1])), bad / "labelsTr" / name)
    err = _refused(bad, tmp_path / "o2", capsys)
    first = next(c for c in check_dataset(bad).cases if not c.ok)
    assert first.problems[0] in err and "check-data" in err

    # a label value dataset.json does not declare
    bad = _copy_ct(ct_dir, tmp_path / "undeclared")
    lab = nib.load(bad / "labelsTr" / name)
    data = np.asarray(lab.dataobj).copy()
    data[0, 0, 0] = 5
    nib.save(nib.Nifti1Image(data, lab.affine), bad / "labelsTr" / name)
    err = _refused(bad, tmp_path / "o3", capsys)
    assert "5" in err and name in err

    # an out folder with something in it
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(MedmtlError, match="not an empty folder"):
        write_plans(ct_dir, full)
    assert sorted(p.name for p in full.iterdir()) == ["keep.txt"]


def test_plan_reads_every_file_once(tmp_path, monkeypatch, capsys):
    """`medmtl plan` checks and fingerprints in one pass: one nibabel load and one voxel read per image and label."""
    from collections import Counter

    from nibabel.arrayproxy import ArrayProxy

    data = tmp_path / "ct"
    generate_ct_dataset(data, cases=3, shape=(16, 16, 6))
    files = sorted(str(p) for p in data.rglob("*.nii.gz"))
    assert len(files) == 6
    loads, reads = Counter(), Counter()
    load, read = nib.load, ArrayProxy.__array__

    def counted_load(path, *args, **kwargs):
        loads[str(path)] += 1
        return load(path, *args, **kwargs)

    def counted_read(self, *args, **kwargs):
        reads[str(self.file_like)] += 1
        return read(self, *args, **kwargs)

    monkeypatch.setattr(nib, "load", counted_load)
    monkeypatch.setattr(ArrayProxy, "__array__", counted_read)
    assert main(["plan", str(data), "--out", str(tmp_path / "bundle"), "--device", "cpu"]) == 0
    capsys.readouterr()
    assert sorted(loads) == files and set(loads.values()) == {1}
    assert sorted(reads) == files and set(reads.values()) == {1}
    # the same fingerprint as reading the files apart from the check
    monkeypatch.undo()
    from medmtl.planner import dataset_fingerprint

    assert dataset_fingerprint(data) == dataset_fingerprint(data, check=False)


def test_plan_keeps_check_messages_when_the_fingerprint_would_fail_first(ct_dir, tmp_path, capsys):
    # a 2D case among 3D ones: the fingerprint sees it while the check is still running, but the refusal is
    # check-data's own layout message
    bad = _copy_ct(ct_dir, tmp_path / "flat")
    name = "ctphantom_002.nii.gz"
    for folder in ("imagesTr", "labelsTr"):
        img = nib.load(bad / folder / name)
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:, :, 0], img.affine), bad / folder / name)
    err = _refused(bad, tmp_path / "o", capsys)
    first = next(c for c in check_dataset(bad).cases if not c.ok)
    assert first.problems[0] in err and "check-data" in err
