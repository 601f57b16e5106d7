"""The Predictor: geometry back on the input grid, TTA, 2D-on-3D, classification output, input checks.

A stand-in network whose segmentation logits are a fixed function of the voxel intensity (thresholds) makes
the expected label known voxel by voxel on the source grid, whatever the orientation, spacing and windows.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import LoadImage
from scipy import ndimage

from medmtl.data.dicom import discover_series, load_series, select_series
from medmtl.data.synthetic import generate_dataset
from medmtl.errors import MedmtlError
from medmtl.inference.batch import run_batch, series_rule
from medmtl.inference.predictor import Predictor, mirror_axes_combinations, resolve_device
from medmtl.quiet import MONAI_READER_NOISE, silenced

THRESHOLDS = (0.5, 1.5)


class ThresholdNet(torch.nn.Module):
    """Voxel-wise logits: class 0 below t1, 1 between t1 and t2, 2 above t2 (any spatial size, 2D or 3D).

    Logits (0, k(x - t1), k(x - t1) + k(x - t2)) are piecewise linear, so probabilities resample smoothly.
    "boundary" is tanh(x - t) per foreground class, "cls" the mean intensity and its negative.
    """

    def __init__(self, thresholds: tuple[float, float] = THRESHOLDS, k: float = 4.0) -> None:
        super().__init__()
        self.t1, self.t2 = thresholds
        self.k = k

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        a = self.k * (x - self.t1)
        seg = torch.cat([torch.zeros_like(x), a, a + self.k * (x - self.t2)], dim=1)
        boundary = torch.tanh(torch.cat([x - self.t1, x - self.t2], dim=1))
        mean = x.flatten(1).mean(dim=1, keepdim=True)
        return {"seg": seg, "boundary": boundary, "cls": torch.cat([mean, -mean], dim=1)}


class RampNet(torch.nn.Module):
    """Not mirror-symmetric: the class-1 logit is a ramp across the window along every axis."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        ramp = torch.zeros_like(x)
        for axis in range(2, x.ndim):
            n = x.shape[axis]
            shape = [1] * x.ndim
            shape[axis] = n
            ramp = ramp + torch.linspace(-1.0, 1.0, n).reshape(shape)
        return {"seg": torch.cat([torch.zeros_like(x), 2 * ramp], dim=1)}


def expected_label(values: np.ndarray, thresholds: tuple[float, float] = THRESHOLDS) -> np.ndarray:
    return (values > thresholds[0]).astype(np.uint8) + (values > thresholds[1]).astype(np.uint8)


def pipeline(**kw) -> dict:
    base = {
        "num_classes": 3,
        "patch_size": [16, 16, 16],
        "spacing": None,
        "normalization": "none",
        "cls_mode": "case",
    }
    return {**base, **kw}


def predictor(net: torch.nn.Module | None = None, **kw) -> Predictor:
    args = {
        "network": net or ThresholdNet(),
        "pipeline": pipeline(),
        "device": "cpu",
        "cpu_bf16": False,
        "label_names": {"0": "background", "1": "organ", "2": "lesion"},
        "min_slices": 4,
    }
    args.update(kw)
    return Predictor(**args)


def edge_voxels(label: np.ndarray) -> np.ndarray:
    """Voxels with a different label within one voxel (3x3x3 neighbourhood)."""
    footprint = np.ones((3,) * label.ndim, bool)
    high = ndimage.maximum_filter(label, footprint=footprint)
    return high != ndimage.minimum_filter(label, footprint=footprint)


def boxes(shape: tuple[int, ...]) -> np.ndarray:
    """Off-centre nested boxes with values 0, 1, 2: any flip or transposition moves them."""
    values = np.zeros(shape, np.float32)
    values[3:15, 2:13, 2:9] = 1.0
    values[5:10, 3:7, 3:6] = 2.0
    return values


# ---------------------------------------------------------------------------------------------------------
# geometry


def test_nifti_non_ras_anisotropic_with_resampling_comes_back_on_the_input_grid(tmp_path: Path):
    values = boxes((20, 16, 11))
    # voxel axes permuted and flipped against RAS (i -> superior, j -> left, k -> posterior), anisotropic
    affine = np.array([[0.0, -0.8, 0.0, 12.0], [0.0, 0.0, -1.2, 30.0], [2.0, 0.0, 0.0, -9.0], [0, 0, 0, 1]])
    path = tmp_path / "in" / "case_lps.nii.gz"
    path.parent.mkdir()
    nib.save(nib.Nifti1Image(values, affine), path)

    p = predictor(pipeline=pipeline(spacing=[1.0, 1.0, 1.0]))
    with silenced(MONAI_READER_NOISE):
        loader = LoadImage(image_only=True, ensure_channel_first=True)
    image = loader(str(path))
    pred = p.predict(image, name=str(path))
    truth = expected_label(values)
    assert pred.label.shape == values.shape and pred.label.dtype == np.uint8
    np.testing.assert_allclose(pred.affine, affine, atol=1e-5)
    wrong = pred.label != truth
    assert wrong.sum() <= 0.02 * truth.size  # a handful, from resampling twice
    assert not (wrong & ~edge_voxels(truth)).any(), "mismatches away from label edges: misaligned output"
    assert pred.probabilities.shape == (3, *values.shape)
    np.testing.assert_allclose(pred.probabilities.sum(axis=0), 1.0, atol=1e-5)
    assert pred.boundary.shape == (2, *values.shape)
    assert set(pred.timings) == {"preprocess", "inference", "postprocess"}

    # written by the batch runner: same grid and affine as the input file, labels as predicted
    summary = run_batch(p, path.parent, tmp_path / "out", formats="nifti", quiet=True)
    assert summary.ok
    written = nib.load(tmp_path / "out" / "case_lps" / "seg.nii.gz")
    np.testing.assert_allclose(written.affine, affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(written.dataobj), pred.label)


@pytest.fixture(scope="module")
def phantom_export(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantom_export")
    generate_dataset(out, cases=1, size=24, dicom_cases=2)
    return out


def test_oblique_dicom_series_labels_match_voxel_by_voxel(phantom_export: Path):
    study = phantom_export / "dicom" / "Study_phantom_002"  # the second export is the oblique one
    (series,) = select_series(discover_series(study), series_rule({"modality": "MR", "description": "T1"}))
    image = load_series(series)
    values = image.numpy()
    t = tuple(float(v) for v in np.percentile(values, [40, 80]))
    p = predictor(ThresholdNet(t, k=4.0 / (t[1] - t[0])))
    pred = p.predict(image, name=series.label)
    assert pred.label.shape == values.shape == series.shape
    np.testing.assert_allclose(pred.affine, np.asarray(image.affine), atol=1e-9)
    directions = np.abs(pred.affine[:3, :3] / np.linalg.norm(pred.affine[:3, :3], axis=0))
    assert directions.max(axis=0).min() < 0.99  # really oblique: some voxel axis is off every world axis
    np.testing.assert_array_equal(pred.label, expected_label(values, t))  # no resampling: exact


def test_oblique_grid_with_resampling(phantom_export: Path):
    """An oblique affine plus a resampling step: labels come back where they were."""
    label_img = nib.load(phantom_export / "labelsTs" / "phantom_002.nii.gz")
    values = np.asarray(label_img.dataobj).astype(np.float32)
    image = MetaTensor(torch.from_numpy(values), affine=torch.as_tensor(label_img.affine))
    p = predictor(pipeline=pipeline(spacing=[1.4, 1.4, 1.4]))
    pred = p.predict(image, name="oblique")
    truth = values.astype(np.uint8)
    wrong = pred.label != truth
    assert wrong.sum() <= 0.03 * truth.size
    assert not (wrong & ~edge_voxels(truth)).any()
    np.testing.assert_allclose(pred.affine, label_img.affine, atol=1e-9)


def test_2d_network_runs_slice_by_slice_on_volumes():
    values = boxes((20, 16, 11))
    image = MetaTensor(torch.from_numpy(values), affine=torch.diag(torch.tensor([1.0, 1.0, 3.0, 1.0])))
    p = predictor(pipeline=pipeline(spatial_dims=2, slice_axis=2, patch_size=[16, 16]), tta=True)
    assert p.mirror_axes() == (0, 1)
    # a network trained with flips along its second axis only: TTA mirrors the matching data axis only
    flipped_y = pipeline(spatial_dims=2, slice_axis=0, patch_size=[16, 16], augment={"flip_axes": [1]})
    assert predictor(pipeline=flipped_y, tta=True).mirror_axes() == (2,)
    assert predictor(pipeline=pipeline(augment={"flip_axes": [0]}), tta=True).mirror_axes() == (0,)
    pred = p.predict(image)
    np.testing.assert_array_equal(pred.label, expected_label(values))


# ---------------------------------------------------------------------------------------------------------
# TTA and heads


def test_mirror_combinations_cover_every_subset():
    combos = mirror_axes_combinations((0, 1, 2))
    assert len(combos) == 8 and len(set(combos)) == 8 and combos[0] == ()


def test_tta_flips_back_and_averages_probabilities():
    image = MetaTensor(torch.rand(16, 16, 16), affine=torch.eye(4))  # one window: the ramp spans it
    plain = predictor(RampNet(), pipeline=pipeline(boundary=False, cls_mode=None)).predict(image)
    mirrored = predictor(RampNet(), pipeline=pipeline(boundary=False, cls_mode=None), tta=True).predict(image)
    assert plain.probabilities[1].std() > 0.1
    # ramp(i) and the flipped-back ramp(n-1-i) average to 0 along every axis: p = sigmoid(0) everywhere
    np.testing.assert_allclose(mirrored.probabilities[1], 0.5, atol=1e-5)
    assert mirrored.class_probabilities == {} and mirrored.boundary is None


def test_tta_keeps_a_mirror_symmetric_result():
    values = boxes((20, 16, 11))
    image = MetaTensor(torch.from_numpy(values), affine=torch.eye(4))
    a = predictor().predict(image)
    b = predictor(tta=True).predict(image)
    np.testing.assert_array_equal(a.label, b.label)
    np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-5)
    assert b.class_probabilities == pytest.approx(a.class_probabilities, abs=1e-5)


def test_class_probabilities_case_softmax_and_presence_sigmoid():
    image = MetaTensor(torch.full((16, 16, 16), 0.25) + 0.01 * torch.rand(16, 16, 16), affine=torch.eye(4))
    case = predictor(class_names=["no_lesion", "lesion"]).predict(image)
    assert set(case.class_probabilities) == {"no_lesion", "lesion"}
    assert sum(case.class_probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert case.class_probabilities["no_lesion"] > case.class_probabilities["lesion"]  # logits (m, -m), m > 0
    presence = predictor(pipeline=pipeline(cls_mode="presence")).predict(image)
    mean = float(image.mean())
    assert presence.class_probabilities == pytest.approx(
        {"organ": 1 / (1 + np.exp(-mean)), "lesion": 1 / (1 + np.exp(mean))}, abs=1e-3
    )
    assert "no foreground voxel was predicted" in presence.warnings


def test_keep_maps_false_returns_only_the_label():
    image = MetaTensor(torch.from_numpy(boxes((20, 16, 11))), affine=torch.eye(4))
    pred = predictor(keep_maps=False).predict(image)
    assert pred.probabilities is None and pred.boundary is None and pred.label.any()


# ---------------------------------------------------------------------------------------------------------
# refusals


def test_nan_input_is_refused_naming_the_input():
    values = torch.rand(16, 16, 16)
    values[3, 4, 5] = float("nan")
    values[0, 0, 0] = float("inf")
    with pytest.raises(MedmtlError, match=r"^scan_7: 2 voxel\(s\) are NaN or infinite"):
        predictor().predict(MetaTensor(values, affine=torch.eye(4)), name="scan_7")


def test_too_few_slices_for_a_3d_model():
    image = MetaTensor(torch.rand(32, 32, 2), affine=torch.eye(4))
    with pytest.raises(MedmtlError, match=r"thin: 2 slice\(s\) along axis 2 .* needs at least 4"):
        predictor().predict(image, name="thin")


@pytest.mark.parametrize("shape", [(16, 16), (2, 16, 16, 16), (1, 1, 16, 16, 16)])
def test_wrong_dimensionality_or_channels(shape):
    with pytest.raises(MedmtlError, match=r"^img: .*(expected|channel)"):
        predictor().predict(MetaTensor(torch.rand(*shape), affine=torch.eye(4)), name="img")


def test_plain_tensor_is_refused():
    with pytest.raises(MedmtlError, match="MetaTensor"):
        predictor().predict(torch.rand(16, 16, 16), name="raw")


def test_checkpoint_missing_or_not_fitting(tmp_path: Path):
    with pytest.raises(MedmtlError, match="checkpoint not found"):
        predictor(ckpt_file=tmp_path / "model.pt")
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(MedmtlError, match=r"other\.pt: holds the weights of another network"):
        predictor(ckpt_file=tmp_path / "other.pt")


def test_settings_are_validated():
    with pytest.raises(MedmtlError, match="overlap"):
        predictor(overlap=1.0)
    with pytest.raises(MedmtlError, match="device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(MedmtlError, match="CUDA is not available"):
            resolve_device("cuda")
    assert resolve_device("auto").type in ("cpu", "cuda")


def test_argmax_matches_torch_including_ties():
    from medmtl.inference.predictor import _argmax_channels

    maps = torch.rand(4, 7, 6, 5)
    maps[:, 0, 0, 0] = 0.25  # a four-way tie goes to class 0
    maps[2:, 1, 0, 0] = 0.9  # a tie between 2 and 3 goes to 2
    np.testing.assert_array_equal(_argmax_channels(maps).numpy(), torch.argmax(maps, dim=0).numpy())


def test_absurd_voxel_size_is_refused_before_resampling():
    p = predictor(pipeline=pipeline(spacing=[1.0, 1.0, 1.0]))
    image = MetaTensor(torch.rand(1, 16, 16, 16), affine=torch.diag(torch.tensor([500.0, 500.0, 500.0, 1.0])))
    with pytest.raises(MedmtlError, match=r"^bogus.nii.gz: spacing 500x500x500 mm outside 0.05..20 mm"):
        p.predict(image, name="bogus.nii.gz")
    # a plausible spacing can still ask for a gigantic resampled volume: refused as well
    p = predictor(pipeline=pipeline(spacing=[0.01, 0.01, 0.01]))
    image = MetaTensor(torch.rand(1, 16, 16, 16), affine=torch.diag(torch.tensor([20.0, 20.0, 20.0, 1.0])))
    with pytest.raises(MedmtlError, match="would make .* voxels .* check the voxel size"):
        p.predict(image, name="bogus.nii.gz")


class ScaledThresholdNet(ThresholdNet):
    """ThresholdNet whose logit slope is a weight, so checkpoints of it differ."""

    def __init__(self, k: float = 4.0) -> None:
        super().__init__()
        self.k = torch.nn.Parameter(torch.tensor(k))


def test_an_ensemble_averages_the_members_probabilities(tmp_path: Path):
    paths = []
    for k in (1.0, 8.0):
        paths.append(tmp_path / f"k{k:g}.pt")
        torch.save(ScaledThresholdNet(k).state_dict(), paths[-1])
    image = MetaTensor(torch.rand(20, 20, 20) * 2, affine=torch.eye(4))
    members = [predictor(ScaledThresholdNet(), ckpt_file=p).predict(image.clone()) for p in paths]
    ensemble = predictor(ScaledThresholdNet(), ckpt_file=paths)
    both = ensemble.predict(image.clone())
    mean = (members[0].probabilities + members[1].probabilities) / 2
    np.testing.assert_allclose(both.probabilities, mean, atol=1e-5)
    np.testing.assert_array_equal(both.label, np.argmax(mean, axis=0))
    for name, p in both.class_probabilities.items():
        assert p == pytest.approx((members[0].class_probabilities[name] + members[1].class_probabilities[name]) / 2)
    assert ensemble.settings()["checkpoint"] == [str(p) for p in paths]
    assert not np.allclose(members[0].probabilities, members[1].probabilities)  # the members really differ
