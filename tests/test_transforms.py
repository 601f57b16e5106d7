"""Signed distance maps and class targets (medmtl.data.transforms)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medmtl.data.transforms import ClassTargetd, SignedDistanced, signed_distance_map
from medmtl.errors import MedmtlError


def _brute_force_sdm(label: np.ndarray, num_classes: int, spacing) -> np.ndarray:
    """The documented definition, computed naively: face-neighbour boundary, all-pairs distances."""
    spacing = np.asarray(spacing, dtype=float)
    grid = np.meshgrid(*[np.arange(n) for n in label.shape], indexing="ij")
    coords = np.stack(grid, -1).reshape(-1, label.ndim)
    out = []
    for c in range(1, num_classes):
        inside = label == c
        boundary = np.zeros_like(inside)
        for idx in itertools.product(*[range(n) for n in label.shape]):
            if not inside[idx]:
                continue
            for ax, step in itertools.product(range(label.ndim), (-1, 1)):
                nb = list(idx)
                nb[ax] += step
                if 0 <= nb[ax] < label.shape[ax] and not inside[tuple(nb)]:
                    boundary[idx] = True
        bpts = coords[boundary.reshape(-1)] * spacing
        diff = coords[:, None, :] * spacing - bpts[None, :, :]
        dist = np.sqrt((diff**2).sum(-1)).min(1).reshape(label.shape)
        sdm = np.where(inside, -dist / dist[inside].max(), dist / dist[~inside].max())
        out.append(sdm)
    return np.stack(out).astype(np.float32)


def _label_2d() -> np.ndarray:
    lab = np.zeros((13, 11), np.int64)
    lab[2:8, 3:9] = 1
    lab[5:7, 4:6] = 0  # a hole
    lab[9:12, 0:4] = 2  # touches the image edge
    return lab


def _label_3d() -> np.ndarray:
    z, y, x = np.mgrid[:9, :10, :8]
    lab = np.zeros((9, 10, 8), np.int64)
    lab[(z - 4) ** 2 + (y - 4) ** 2 + (x - 3) ** 2 <= 9] = 1
    lab[6:9, 6:10, 5:8] = 2
    return lab


@pytest.mark.parametrize(
    ("label", "spacing"),
    [
        (_label_2d(), (1.0, 1.0)),
        (_label_2d(), (0.7, 2.0)),
        (_label_3d(), (1.0, 1.0, 1.0)),
        (_label_3d(), (1.5, 0.8, 2.5)),
    ],
)
def test_signed_distance_matches_brute_force(label, spacing):
    got = signed_distance_map(label, 3, spacing)
    want = _brute_force_sdm(label, 3, spacing)
    assert got.shape == (2, *label.shape) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_signed_distance_signs_range_and_boundary():
    label = _label_3d()
    sdm = signed_distance_map(label, 3)
    assert sdm.min() == pytest.approx(-1.0) and sdm.max() == pytest.approx(1.0)
    for c in (1, 2):
        m, inside = sdm[c - 1], label == c
        assert (m[~inside] > 0).all()  # outside: strictly positive
        assert (m[inside] <= 0).all()  # inside: negative, 0 on the boundary
        # boundary = class voxels with a face neighbour of another class: exactly the zeros
        padded = np.pad(inside, 1, constant_values=True)
        neighbour_out = np.zeros_like(inside)
        for ax in range(3):
            for step in (-1, 1):
                neighbour_out |= ~np.roll(padded, step, axis=ax)[1:-1, 1:-1, 1:-1]
        np.testing.assert_array_equal(m == 0, inside & neighbour_out)
    # class 2 touches the image edge at the far corner; the edge itself is not a boundary
    assert sdm[1][8, 9, 7] < 0


def test_signed_distance_absent_and_full_classes():
    label = np.ones((6, 7), np.int64)
    sdm = signed_distance_map(label, 4)
    assert sdm.shape == (3, 6, 7)
    np.testing.assert_array_equal(sdm[0], -1.0)  # fills the image
    np.testing.assert_array_equal(sdm[1], 1.0)  # absent: far outside
    np.testing.assert_array_equal(sdm[2], 1.0)


def test_signed_distance_accepts_torch_and_float_labels():
    label = _label_2d()
    want = signed_distance_map(label, 3)
    np.testing.assert_allclose(signed_distance_map(torch.as_tensor(label).float(), 3), want)


def test_signed_distance_rejects_mismatched_spacing():
    with pytest.raises(ValueError, match="spacing"):
        signed_distance_map(_label_2d(), 3, (1.0, 1.0, 1.0))


def _meta_label(label: np.ndarray, spacing, filename="case_007_label.nii.gz") -> MetaTensor:
    affine = np.diag([*spacing, 1.0])
    return MetaTensor(torch.as_tensor(label[None]).float(), affine=torch.as_tensor(affine),
                      meta={"filename_or_obj": filename})


def test_signed_distanced_uses_pixdim_and_copies_meta():
    label = _label_3d()
    spacing = (1.5, 0.8, 2.5)
    lab = _meta_label(label, spacing)
    lab.applied_operations.append({"class": "Dummy"})
    out = SignedDistanced("label", num_classes=3)({"label": lab})
    b = out["boundary"]
    assert isinstance(b, MetaTensor) and b.shape == (2, *label.shape) and b.dtype == torch.float32
    np.testing.assert_allclose(b.numpy(), signed_distance_map(label, 3, spacing), atol=1e-6)
    torch.testing.assert_close(b.affine, lab.affine)
    assert b.meta["filename_or_obj"] == "case_007_label.nii.gz"
    # the history is a copy: a later crop on the boundary must not also land in the label's history
    b.applied_operations.append({"class": "Crop"})
    assert len(lab.applied_operations) == 1
    # use_spacing=False measures in voxels
    out_vox = SignedDistanced("label", num_classes=3, use_spacing=False)({"label": lab})
    np.testing.assert_allclose(out_vox["boundary"].numpy(), signed_distance_map(label, 3), atol=1e-6)


def test_signed_distanced_plain_arrays_and_slice_axis():
    label = _label_3d()
    out = SignedDistanced("label", num_classes=3, output_key="sdm")({"label": label[None]})
    assert isinstance(out["sdm"], np.ndarray)
    np.testing.assert_allclose(out["sdm"], signed_distance_map(label, 3))
    # slice by slice along axis 1, with in-plane spacing (axes 0 and 2)
    lab = _meta_label(label, (1.5, 0.8, 2.5))
    per_slice = SignedDistanced("label", num_classes=3, slice_axis=1)({"label": lab})["boundary"]
    assert per_slice.shape == (2, *label.shape)
    for j in range(label.shape[1]):
        np.testing.assert_allclose(
            per_slice[:, :, j].numpy(), signed_distance_map(label[:, j], 3, (1.5, 2.5)), atol=1e-6
        )


def test_signed_distanced_bad_label_names_the_file():
    label = _label_3d()
    label[0, 0, 0] = 5
    with pytest.raises(MedmtlError, match=r"case_007_label\.nii\.gz: label values 0\.\.5 are outside 0\.\.2"):
        SignedDistanced("label", num_classes=3)({"label": _meta_label(label, (1, 1, 1))})


@pytest.mark.parametrize(
    ("value", "want"), [(1, 1), (0, 0), (np.int64(2), 2), (torch.tensor(3), 3), (None, -1)]
)
def test_class_target_case(value, want):
    out = ClassTargetd("case")({"class": value, "case_id": "c1"})
    assert out["cls"].dtype == torch.long and out["cls"].ndim == 0 and int(out["cls"]) == want


def test_class_target_case_missing_and_bad():
    out = ClassTargetd("case")({"label": np.zeros((1, 2, 2))})
    assert out["cls"].dtype == torch.long and int(out["cls"]) == -1
    with pytest.raises(MedmtlError, match="phantom_003: field 'class' must be an integer"):
        ClassTargetd("case")({"class": "tumour", "case_id": "phantom_003"})
    with pytest.raises(MedmtlError, match="phantom_003"):
        ClassTargetd("case")({"class": 1.5, "case_id": "phantom_003"})


def test_class_target_presence():
    label = np.zeros((1, 5, 5, 5), np.float32)
    label[0, 1, 1, 1] = 2
    out = ClassTargetd("presence", num_classes=4)({"label": MetaTensor(torch.as_tensor(label))})
    assert out["cls"].dtype == torch.float32
    torch.testing.assert_close(out["cls"], torch.tensor([0.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="num_classes"):
        ClassTargetd("presence")
