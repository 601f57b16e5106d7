"""Transform chains built from the pipeline config, and dataset planning (medmtl.data.pipelines/planning)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import CacheDataset, DataLoader, MetaTensor, load_decathlon_datalist
from monai.transforms import Invertd
from monai.transforms.transform import RandomizableTrait

from medmtl.data.pipelines import inference_transforms, train_transforms, val_transforms, validate_config
from medmtl.data.planning import fingerprint, plan_patch_size
from medmtl.data.transforms import SignedDistanced, signed_distance_map
from medmtl.errors import MedmtlError

NO_AUG = False
FLIP_ONLY = {"flip_prob": 1.0, "affine_prob": 0, "intensity_prob": 0, "gamma_prob": 0, "noise_prob": 0}


def _phantom_label(shape=(24, 24, 24), shift: int = 0) -> np.ndarray:
    """Labels 0/1/2 with no mirror symmetry, so a flip is visible."""
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    lab = np.zeros(shape, np.uint8)
    lab[4 + shift : 12 + shift, 6:15, 5:10] = 1
    lab[(z - 15) ** 2 + (y - 14) ** 2 + (x - 16) ** 2 <= 16] = 2
    return lab


def _write_case(folder: Path, name: str, label: np.ndarray, affine: np.ndarray, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    image = (100 + 20 * rng.standard_normal(label.shape) + 50 * label).astype(np.float32)
    nib.save(nib.Nifti1Image(image, affine), folder / f"{name}_img.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), folder / f"{name}_lbl.nii.gz")
    return {"image": str(folder / f"{name}_img.nii.gz"), "label": str(folder / f"{name}_lbl.nii.gz"),
            "case_id": name}


@pytest.fixture(scope="module")
def cases_3d(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("nifti3d")
    affine = np.diag([1.0, 1.0, 1.5, 1.0])
    items = [_write_case(folder, f"phantom_{i:03d}", _phantom_label(shift=i), affine, i) for i in range(3)]
    items[0]["class"] = 1
    items[1]["class"] = 0  # items[2] has no case label
    return items


@pytest.fixture(scope="module")
def cases_2d(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("nifti2d")
    affine = np.diag([0.8, 0.8, 1.0, 1.0])
    return [_write_case(folder, f"slice_{i}", _phantom_label(shift=i)[:, :, 14], affine, i) for i in range(2)]


def _cfg(**kw) -> dict:
    return {"num_classes": 3, "patch_size": 16, **kw}


def _check_boundary_signs(sample: dict, num_classes: int = 3) -> None:
    """Crops and flips keep this: the boundary map is > 0 exactly outside each class."""
    label, boundary = sample["label"][0], sample["boundary"]
    for c in range(1, num_classes):
        torch.testing.assert_close(boundary[c - 1] > 0, label != c, check_dtype=False)


def test_train_3d_outputs(cases_3d):
    tf = train_transforms(_cfg(cls_mode="presence", samples_per_volume=3, augment=True))
    out = tf(cases_3d[0])
    assert isinstance(out, list) and len(out) == 3
    for s in out:
        assert s["image"].shape == (1, 16, 16, 16) and s["image"].dtype == torch.float32
        assert s["label"].shape == (1, 16, 16, 16)
        assert s["boundary"].shape == (2, 16, 16, 16) and s["boundary"].dtype == torch.float32
        assert float(s["boundary"].min()) >= -1 and float(s["boundary"].max()) <= 1
        assert s["cls"].shape == (2,) and s["cls"].dtype == torch.float32
        present = [float((s["label"] == c).any()) for c in (1, 2)]
        assert s["cls"].tolist() == present  # presence describes the patch, not the volume
        assert "class" not in s and s["case_id"] == "phantom_000"


def test_train_3d_without_boundary_or_cls(cases_3d):
    out = train_transforms(_cfg(boundary=False, augment=NO_AUG, samples_per_volume=1))(cases_3d[1])
    assert set(out[0]) == {"image", "label", "case_id"}


def test_boundary_consistent_after_flip(cases_3d):
    # patch == volume, so the crop keeps everything and only the flips change the sample
    cfg = _cfg(patch_size=24, augment=FLIP_ONLY, samples_per_volume=1, pos_fraction=1.0)
    flipped = train_transforms(cfg)(cases_3d[0])[0]
    plain = val_transforms(cfg)(cases_3d[0])
    torch.testing.assert_close(flipped["label"], torch.flip(plain["label"], dims=(1, 2, 3)), check_dtype=False)
    assert not torch.equal(flipped["label"].as_tensor(), plain["label"].as_tensor())
    recomputed = signed_distance_map(flipped["label"][0], 3, spacing=(1.0, 1.0, 1.5))
    np.testing.assert_allclose(flipped["boundary"].numpy(), recomputed, atol=1e-5)


def test_flip_axes_mirror_only_the_named_axis(cases_3d):
    # flip_axes [0]: left-right only (after RAS), so anterior and posterior labels keep their places
    cfg = _cfg(patch_size=24, augment={**FLIP_ONLY, "flip_axes": [0]}, samples_per_volume=1, pos_fraction=1.0)
    flipped = train_transforms(cfg)(cases_3d[0])[0]
    plain = val_transforms(cfg)(cases_3d[0])
    torch.testing.assert_close(flipped["label"], torch.flip(plain["label"], dims=(1,)), check_dtype=False)
    torch.testing.assert_close(flipped["image"], torch.flip(plain["image"], dims=(1,)), check_dtype=False)
    assert not torch.equal(flipped["label"].as_tensor(), plain["label"].as_tensor())


def test_boundary_signs_survive_crop_and_augmentation(cases_3d):
    tf = train_transforms(_cfg(augment={"affine_prob": 0.0, "flip_prob": 0.5}, samples_per_volume=4))
    for sample in tf(cases_3d[1]):
        _check_boundary_signs(sample)


def test_boundary_is_in_the_cached_prefix(cases_3d):
    tf = train_transforms(_cfg())
    first_random = tf.get_index_of_first(lambda t: isinstance(t, RandomizableTrait))
    sdt = tf.get_index_of_first(lambda t: isinstance(t, SignedDistanced))
    assert sdt is not None and first_random is not None and sdt < first_random


def test_train_2d_from_3d(cases_3d):
    # no rotation: it interpolates label (nearest) and boundary (bilinear) differently at the edge
    cfg = _cfg(spatial_dims=2, slice_axis=2, patch_size=[16, 12], cls_mode="case", samples_per_volume=2,
               spacing=[1.0, 1.0, 1.0], augment={"affine_prob": 0.0})
    out = train_transforms(cfg)(cases_3d[0])
    assert len(out) == 2
    for s in out:
        assert s["image"].shape == (1, 16, 12) and s["image"].dtype == torch.float32
        assert s["label"].shape == (1, 16, 12)
        assert s["boundary"].shape == (2, 16, 12)
        assert s["cls"].dtype == torch.long and int(s["cls"]) == 1
        _check_boundary_signs(s)
    # other slice axes give in-plane patches too
    out = train_transforms(_cfg(spatial_dims=2, slice_axis=0, patch_size=[16, 16], augment=NO_AUG))(cases_3d[1])
    assert out[0]["image"].shape == (1, 16, 16) and out[0]["boundary"].shape == (2, 16, 16)


def test_train_2d_from_3d_boundary_is_computed_on_the_slice(cases_3d):
    # patch == full slice and no augmentation: the boundary must be the 2D map of the label slice itself
    cfg = _cfg(spatial_dims=2, slice_axis=2, patch_size=[24, 24], augment=NO_AUG, samples_per_volume=3)
    for s in train_transforms(cfg)(cases_3d[0]):
        np.testing.assert_allclose(s["boundary"].numpy(), signed_distance_map(s["label"][0], 3), atol=1e-5)


def test_train_true_2d(cases_2d):
    cfg = _cfg(spatial_dims=2, patch_size=[16, 16], cls_mode="presence", augment={"affine_prob": 0})
    out = train_transforms(cfg)(cases_2d[0])
    for s in out:
        assert s["image"].shape == (1, 16, 16) and s["label"].shape == (1, 16, 16)
        assert s["boundary"].shape == (2, 16, 16) and s["cls"].shape == (2,)
        _check_boundary_signs(s)
    val = val_transforms(_cfg(spatial_dims=2, patch_size=[16, 16]))(cases_2d[1])
    assert val["image"].shape == (1, 24, 24) and val["boundary"].shape == (2, 24, 24)


def test_val_keeps_whole_volumes(cases_3d):
    val = val_transforms(_cfg(cls_mode="case"))(cases_3d[2])
    assert val["image"].shape == (1, 24, 24, 24) and val["label"].shape == (1, 24, 24, 24)
    assert val["boundary"].shape == (2, 24, 24, 24) and int(val["cls"]) == -1  # no "class" in the item
    img = val["image"][0]
    assert abs(float(img.mean())) < 1e-4 and abs(float(img.std()) - 1) < 1e-2  # z-score
    # 2D network on volumes: still 3D, resampled, boundary computed slice by slice along the slice axis
    cfg = _cfg(spatial_dims=2, slice_axis=2, patch_size=[16, 16], spacing=[1.0, 1.0, 1.0])
    val = val_transforms(cfg)(cases_3d[0])
    assert val["image"].shape == (1, 24, 24, 36) and val["boundary"].shape == (2, 24, 24, 36)
    k = 20
    np.testing.assert_allclose(
        val["boundary"][:, :, :, k].numpy(), signed_distance_map(val["label"][0, :, :, k], 3), atol=1e-5
    )


def test_ct_normalization(cases_3d):
    val = val_transforms(_cfg(normalization="ct", ct_window=[90, 160], boundary=False))(cases_3d[0])
    assert float(val["image"].min()) == 0.0 and float(val["image"].max()) == 1.0


def test_cache_dataset_and_collate(cases_3d):
    tf = train_transforms(_cfg(cls_mode="case", samples_per_volume=2))
    ds = CacheDataset(cases_3d, tf, progress=False, num_workers=0)
    batch = next(iter(DataLoader(ds, batch_size=3, num_workers=0)))
    assert batch["image"].shape == (6, 1, 16, 16, 16) and batch["boundary"].shape == (6, 2, 16, 16, 16)
    assert sorted(batch["cls"].tolist()) == [-1, -1, 0, 0, 1, 1]  # one case has no "class": -1


def _oblique_case(folder: Path) -> tuple[dict, np.ndarray, np.ndarray]:
    """A non-RAS volume (axes permuted and flipped, anisotropic) so both Orientationd and Spacingd act."""
    label = _phantom_label((20, 22, 18))
    affine = np.array([[0.0, 0.0, -1.3, 40.0], [-0.9, 0.0, 0.0, 12.0], [0.0, 2.0, 0.0, -7.0], [0, 0, 0, 1]])
    return _write_case(folder, "oblique", label, affine, 7), label, affine


def test_inference_transforms_invert_to_source_geometry(tmp_path):
    item, label, affine = _oblique_case(tmp_path)
    cfg = _cfg(spacing=[1.0, 1.0, 1.0])
    tf = inference_transforms(cfg)
    data = tf({"image": item["image"]})
    assert data["image"].shape[1:] != label.shape  # reoriented and resampled
    data["pred"] = data["image"].clone()  # stands in for a network output on the preprocessed grid
    inverted = Invertd("pred", transform=tf, orig_keys="image", nearest_interp=False)(data)
    assert inverted["pred"].shape == (1, *label.shape)
    np.testing.assert_allclose(inverted["pred"].affine.numpy(), affine, atol=1e-4)


def test_inference_label_round_trip_is_exact_without_resampling(tmp_path):
    item, label, affine = _oblique_case(tmp_path)
    tf = inference_transforms(_cfg(), keys=("image", "label"))
    data = tf({"image": item["image"], "label": item["label"]})
    assert data["label"].shape == (1, 18, 20, 22)  # RAS order of the permuted axes
    assert set(np.unique(data["label"].numpy())) == {0.0, 1.0, 2.0}  # labels are not normalized
    back = tf.inverse({"image": data["image"], "label": data["label"]})
    np.testing.assert_array_equal(back["label"][0].numpy(), label)
    np.testing.assert_allclose(back["label"].affine.numpy(), affine, atol=1e-5)


def test_inference_transforms_without_loading(tmp_path):
    item, label, affine = _oblique_case(tmp_path)
    image = nib.load(item["image"])
    mt = MetaTensor(torch.as_tensor(image.get_fdata(dtype=np.float32))[None], affine=torch.as_tensor(affine))
    data = inference_transforms(_cfg(), load=False)({"image": mt})
    assert data["image"].shape == (1, 18, 20, 22)


def test_bad_label_value_is_reported_with_the_file(cases_3d, tmp_path):
    bad = _write_case(tmp_path, "bad", _phantom_label() * 2, np.eye(4), 0)  # values up to 4, num_classes 3
    with pytest.raises(RuntimeError) as info:  # MONAI's Compose wraps errors raised inside a transform
        val_transforms(_cfg())(bad)
    cause = info.value.__cause__
    assert isinstance(cause, MedmtlError) and "bad_lbl.nii.gz: label values 0..4 are outside 0..2" in str(cause)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"num_classes": 3, "patch_size": 16, "pach_size": 8}, r"unknown key\(s\) \['pach_size'\]"),
        ({"patch_size": 16}, "'num_classes' is required"),
        ({"num_classes": 1, "patch_size": 16}, "'num_classes' must be an integer >= 2"),
        ({"num_classes": 3, "patch_size": [16, 16]}, "'patch_size' must be 3 positive integers"),
        ({"num_classes": 3, "patch_size": 16, "spatial_dims": 4}, "'spatial_dims' must be 2 or 3"),
        ({"num_classes": 3, "patch_size": 16, "slice_axis": 2}, "'slice_axis' is only used with spatial_dims 2"),
        ({"num_classes": 3, "patch_size": 16, "spacing": [1, 1]}, "'spacing' must be 3 positive numbers"),
        ({"num_classes": 3, "patch_size": [8, 8], "spatial_dims": 2, "slice_axis": 2, "spacing": [1, 1]},
         "'spacing' must be 3"),
        ({"num_classes": 3, "patch_size": 16, "normalization": "ct"}, "'ct_window' must be \\[lo, hi\\]"),
        ({"num_classes": 3, "patch_size": 16, "ct_window": [0, 1]}, "only used with normalization 'ct'"),
        ({"num_classes": 3, "patch_size": 16, "normalization": "minmax"}, "'normalization' must be"),
        ({"num_classes": 3, "patch_size": 16, "cls_mode": "label"}, "'cls_mode' must be"),
        ({"num_classes": 3, "patch_size": 16, "pos_fraction": 1.5}, "'pos_fraction' must be a number in"),
        ({"num_classes": 3, "patch_size": 16, "samples_per_volume": 0}, "'samples_per_volume' must be"),
        ({"num_classes": 3, "patch_size": 16, "boundary": "yes"}, "'boundary' must be true or false"),
        ({"num_classes": 3, "patch_size": 16, "augment": {"mirror": 1}}, r"unknown key\(s\) \['mirror'\]"),
        ({"num_classes": 3, "patch_size": 16, "augment": {"flip_prob": 2}}, "flip_prob must be a probability"),
        ({"num_classes": 3, "patch_size": 16, "augment": "strong"}, "'augment' must be true, false or a dict"),
        ({"num_classes": 3, "patch_size": 16, "augment": {"flip_axes": [0, 0]}}, "flip_axes must be null or a list"),
        ({"num_classes": 3, "patch_size": 16, "augment": {"flip_axes": [3]}}, r"flip_axes \[3\] name an axis beyond"),
    ],
)
def test_config_validation_errors(cfg, message):
    with pytest.raises(MedmtlError, match=message):
        train_transforms(cfg)


def test_config_defaults_filled():
    c = validate_config({"num_classes": 3, "patch_size": 32, "augment": {"flip_prob": 0.2}})
    assert c["patch_size"] == [32, 32, 32] and c["spatial_dims"] == 3 and c["spacing"] is None
    assert c["augment"]["flip_prob"] == 0.2 and c["augment"]["affine_prob"] == 0.2  # the rest are defaults
    assert validate_config({"num_classes": 2, "patch_size": 8, "augment": False})["augment"] is None


# ---------------------------------------------------------------- planning


def test_fingerprint_reports_ras_order(tmp_path):
    item, label, affine = _oblique_case(tmp_path)
    fp = fingerprint([item, item])
    # voxel axes (20, 22, 18) with spacings (0.9, 2.0, 1.3) point along (A, S, R)
    assert fp["median_shape"] == [18, 20, 22] and fp["median_spacing"] == pytest.approx([1.3, 0.9, 2.0])
    assert fp["spatial_dims"] == 3 and fp["num_channels"] == 1 and fp["label_values"] == [0, 1, 2]
    fg = fp["foreground_intensity"][0]
    assert 140 < fg["p50"] < 210 and fg["p00_5"] < fg["p50"] < fg["p99_5"]  # image is 100 + 50*label + noise


def test_fingerprint_errors(tmp_path):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti")
    with pytest.raises(MedmtlError, match="broken.nii.gz: not a readable image"):
        fingerprint([{"image": str(broken)}])
    with pytest.raises(MedmtlError, match="datalist is empty"):
        fingerprint([])


def test_plan_patch_size_rule():
    fp = {"median_shape": [35, 50, 36], "median_spacing": [1.0, 1.0, 1.0]}
    assert plan_patch_size(fp, 1.0) == [48, 64, 48]
    assert plan_patch_size(fp, 1.0, divisor=8) == [40, 56, 40]
    assert plan_patch_size(fp, [0.5, 0.5, 2.0], divisor=8) == [72, 104, 24]
    assert plan_patch_size(fp, slice_axis=2) == [48, 64]
    # over budget: the longest axis shrinks first, one divisor at a time
    assert plan_patch_size(fp, divisor=16, max_voxels=48 * 48 * 48) == [48, 48, 48]
    assert plan_patch_size(fp, divisor=16, max_voxels=32 * 32 * 32) == [32, 32, 32]
    with pytest.raises(MedmtlError, match="max_voxels"):
        plan_patch_size(fp, divisor=16, max_voxels=100)


def test_fingerprint_and_plan_hippocampus(hippocampus_dir):
    datalist = load_decathlon_datalist(str(hippocampus_dir / "dataset.json"), True, "training")
    fp = fingerprint(datalist)
    assert fp["num_cases"] == 200 and fp["spatial_dims"] == 3 and fp["label_values"] == [0, 1, 2]
    assert fp["median_spacing"] == pytest.approx([1.0, 1.0, 1.0])
    assert 30 <= fp["median_shape"][0] <= 40 and 45 <= fp["median_shape"][1] <= 55
    assert all(lo <= m <= hi for lo, m, hi in zip(fp["min_shape"], fp["median_shape"], fp["max_shape"], strict=True))
    assert plan_patch_size(fp, 1.0) == [48, 64, 48]
    assert plan_patch_size(fp, 1.0, divisor=8) == [40, 56, 40]


# ---------------------------------------------------------------- nnU-Net CT normalisation (ct_stats)


def test_ct_stats_clip_then_zscore_with_dataset_statistics(tmp_path):
    """ct_window [-100, 300] then (x - 100) / 50 in every chain; worked out by hand on a 2x2x2 volume."""
    hu = np.array([-1000, -100, 0, 100, 200, 300, 400, 3000], np.int16).reshape(2, 2, 2)
    label = np.zeros((2, 2, 2), np.uint8)
    label[1, 1, 1] = 1
    nib.save(nib.Nifti1Image(hu, np.eye(4)), tmp_path / "ct.nii.gz")
    nib.save(nib.Nifti1Image(label, np.eye(4)), tmp_path / "lbl.nii.gz")
    item = {"image": str(tmp_path / "ct.nii.gz"), "label": str(tmp_path / "lbl.nii.gz")}
    # clipped: -100 -100 0 100 200 300 300 300; minus 100, over 50:
    expected = np.array([-4, -4, -2, 0, 2, 4, 4, 4], np.float32).reshape(2, 2, 2)
    cfg = _cfg(patch_size=2, normalization="ct", ct_window=[-100, 300], ct_stats={"mean": 100, "std": 50},
               boundary=False, augment=False, samples_per_volume=1)
    train = train_transforms(cfg)(item)[0]["image"][0]
    val = val_transforms(cfg)(item)["image"][0]
    chain = inference_transforms(cfg)
    infer = chain({"image": item["image"]})
    for out in (train, val, infer["image"][0]):
        np.testing.assert_allclose(out.numpy(), expected, atol=1e-5)
    # the inference chain still inverts (intensity transforms are skipped by the inverse; geometry comes back)
    infer["pred"] = infer["image"].clone()
    back = Invertd("pred", transform=chain, orig_keys="image")(infer)
    assert back["pred"].shape == (1, 2, 2, 2)
    # without ct_stats the same window scales to [0, 1], as before
    plain = val_transforms({**cfg, "ct_stats": None})(item)["image"][0]
    np.testing.assert_allclose(plain.numpy(), (np.clip(hu, -100, 300) + 100) / 400, atol=1e-6)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"ct_stats": {"mean": 0, "std": 0}}, r"^pipeline config: 'ct_stats' must be \{mean: m, std: s\} with s > 0"),
        ({"ct_stats": {"mean": 0}}, "'ct_stats' must be"),
        ({"ct_stats": {"mean": float("nan"), "std": 1}}, "'ct_stats' must be"),
        ({"ct_stats": [0, 1]}, "'ct_stats' must be"),
    ],
)
def test_ct_stats_validation(extra, message):
    with pytest.raises(MedmtlError, match=message) as info:
        validate_config(_cfg(normalization="ct", ct_window=[-100, 300], **extra))
    assert "\n" not in str(info.value)
    with pytest.raises(MedmtlError, match="'ct_stats' is only used with normalization 'ct'"):
        validate_config(_cfg(ct_stats={"mean": 0, "std": 1}))
