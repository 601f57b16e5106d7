"""`check_dataset` / `medmtl check-data` on tiny NIfTI datasets built in tmp_path, and on Task04."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medmtl.cli import main
from medmtl.data.checks import affine_differences, check_dataset, require_valid_dataset
from medmtl.data.datalist import write_dataset_json
from medmtl.errors import MedmtlError

SHAPE = (8, 9, 10)


def _image(rng: np.random.Generator, shape=SHAPE) -> np.ndarray:
    return rng.normal(100, 10, shape).astype(np.float32)


def _label(shape=SHAPE) -> np.ndarray:
    label = np.zeros(shape, np.uint8)
    label[2:5, 2:5, 2:5] = 1
    label[5:7, 5:7, 5:7] = 2
    return label


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), path)


def _dataset(root: Path, cases: dict[str, dict], **meta_overrides) -> Path:
    """Write an MSD folder: `cases[id]` may give image/label arrays and affines, defaults are a good case."""
    rng = np.random.default_rng(0)
    training = []
    for case_id, spec in cases.items():
        affine = spec.get("affine", np.diag([1.0, 1.0, 2.0, 1.0]))
        _save(spec.get("image", _image(rng)), affine, root / "imagesTr" / f"{case_id}.nii.gz")
        label_affine = spec.get("label_affine", affine)
        _save(spec.get("label", _label()), label_affine, root / "labelsTr" / f"{case_id}.nii.gz")
        training.append({"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"})
    meta = {
        "name": "tiny",
        "tensorImageSize": "3D",
        "labels": {"0": "background", "1": "organ", "2": "lesion"},
        "numTraining": len(training),
        "numTest": 0,
        "training": training,
        "test": [],
    }
    write_dataset_json(root, {**meta, **meta_overrides})
    return root


def _snapshot(root: Path) -> dict:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def _case(report, case_id):
    return next(case for case in report.cases if case.case_id == case_id)


def test_good_dataset_passes(tmp_path):
    root = _dataset(tmp_path, {"a": {}, "b": {}, "c": {}})
    report = check_dataset(root)
    assert report.ok
    assert [c.case_id for c in report.cases] == ["a", "b", "c"]
    assert report.cases[0].shape == SHAPE and report.cases[0].spacing == (1.0, 1.0, 2.0)
    assert report.cases[0].image == "imagesTr/a.nii.gz" and report.cases[0].label == "labelsTr/a.nii.gz"
    lines = report.format().splitlines()
    assert lines == [
        "OK   a  8x9x10  1x1x2 mm",
        "OK   b  8x9x10  1x1x2 mm",
        "OK   c  8x9x10  1x1x2 mm",
        "3 cases checked, 0 with problems",
    ]


def test_broken_dataset_names_each_case_and_problem(tmp_path, capsys):
    rng = np.random.default_rng(1)
    nan_image = _image(rng)
    nan_image[0, 0, :3] = np.nan
    nan_image[1, 1, 1] = np.inf
    bad_values = _label()
    bad_values[0, 0, 0] = 7
    shifted = np.diag([1.0, 1.0, 2.0, 1.0])
    shifted[0, 3] = 0.5
    root = _dataset(
        tmp_path / "ds",
        {
            "good": {},
            "truncated": {},
            "wrong_shape": {"label": _label((8, 9, 11))},
            "value7": {"label": bad_values},
            "nan": {"image": nan_image},
            "moved": {"label_affine": shifted},
        },
    )
    gz = root / "imagesTr" / "truncated.nii.gz"
    gz.write_bytes(gz.read_bytes()[: gz.stat().st_size // 2])
    before = _snapshot(root)

    report = check_dataset(root)

    assert not report.ok
    assert _case(report, "good").ok
    problems = {case.case_id: "; ".join(case.problems) for case in report.cases if not case.ok}
    assert set(problems) == {"truncated", "wrong_shape", "value7", "nan", "moved"}
    assert problems["truncated"] == "imagesTr/truncated.nii.gz: unreadable (truncated gzip stream)"
    assert problems["wrong_shape"] == (
        "labelsTr/wrong_shape.nii.gz: shape 8x9x11 does not match image imagesTr/wrong_shape.nii.gz 8x9x10"
    )
    assert problems["value7"] == "labelsTr/value7.nii.gz: label values {7} not in declared labels {0, 1, 2}"
    assert problems["nan"] == "imagesTr/nan.nii.gz: 3 NaN and 1 Inf voxels in the image"
    assert problems["moved"] == (
        "labelsTr/moved.nii.gz: affine differs from the image: "
        "origin (0.00, 0.00, 0.00) vs (0.50, 0.00, 0.00) mm"
    )
    text = report.format()
    for case_id in problems:
        assert any(line.startswith(f"FAIL {case_id}  ") for line in text.splitlines())
    assert text.splitlines()[-1] == "6 cases checked, 5 with problems"
    assert _snapshot(root) == before  # nothing written in the dataset folder

    assert main(["check-data", str(root)]) == 1
    out = capsys.readouterr().out
    assert "FAIL truncated" in out and "label values {7}" in out and out.rstrip().endswith("5 with problems")


def test_missing_folder_exits_2_with_one_line(tmp_path, capsys):
    missing = tmp_path / "no_such_dataset"
    assert main(["check-data", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"medmtl check-data: error: {missing}: dataset folder not found"
    with pytest.raises(MedmtlError, match="dataset folder not found"):
        check_dataset(missing)
    assert main(["check-data", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "dataset.json: not found" in err


def test_malformed_json_is_a_reported_problem(tmp_path, capsys):
    (tmp_path / "dataset.json").write_text('{\n  "training": [\n    {"image": "a"}\n  \n')
    report = check_dataset(tmp_path)
    assert not report.ok and report.cases == []
    assert report.problems == ["dataset.json: malformed JSON at line 5, column 1 (Expecting ',' delimiter)"]
    assert main(["check-data", str(tmp_path)]) == 1
    assert "FAIL dataset.json: malformed JSON at line 5" in capsys.readouterr().out


def test_listing_problems_and_warnings(tmp_path):
    root = _dataset(tmp_path, {"a": {}, "b": {}, "c": {}}, numTraining=4)
    (root / "labelsTr" / "c.nii.gz").unlink()
    _save(_image(np.random.default_rng(2)), np.eye(4), root / "imagesTr" / "extra.nii.gz")
    (root / "imagesTr" / "._a.nii.gz").write_bytes(b"macOS resource fork")  # ignored, as in MSD tarballs
    report = check_dataset(root)
    assert not report.ok
    assert report.problems == [
        "dataset.json: numTraining is 4 but 'training' lists 3 cases",
        "1 file listed in dataset.json is missing: labelsTr/c.nii.gz",
    ]
    assert report.warnings == ["imagesTr: 1 file not listed in dataset.json: extra.nii.gz"]
    assert _case(report, "c").problems == ["labelsTr/c.nii.gz: missing"]
    assert _case(report, "a").ok and _case(report, "b").ok


def test_unlisted_file_and_empty_label_are_only_warnings(tmp_path):
    root = _dataset(tmp_path, {"a": {}, "empty": {"label": np.zeros(SHAPE, np.uint8)}})
    _save(_label(), np.eye(4), root / "labelsTr" / "orphan.nii.gz")
    report = check_dataset(root)
    assert report.ok
    assert report.warnings == ["labelsTr: 1 file not listed in dataset.json: orphan.nii.gz"]
    assert _case(report, "empty").warnings == ["labelsTr/empty.nii.gz: label is empty (all background)"]
    lines = report.format().splitlines()
    expected = "OK   empty  8x9x10  1x1x2 mm: warning: labelsTr/empty.nii.gz: label is empty (all background)"
    assert expected in lines
    assert lines[-1] == "2 cases checked, 0 with problems, 1 with warnings"


def test_multichannel_image_and_2d_data(tmp_path):
    rng = np.random.default_rng(3)
    four_d = np.stack([_image(rng), _image(rng)], axis=-1)  # MSD 4D: channels last
    root = _dataset(tmp_path / "4d", {"mc": {"image": four_d}})
    report = check_dataset(root)
    assert report.ok and report.cases[0].shape == (*SHAPE, 2)

    label_2d = np.zeros((12, 10), np.uint8)
    label_2d[3:6, 3:6] = 1
    root = _dataset(tmp_path / "2d", {"flat": {"image": _image(rng, (12, 10)), "label": label_2d}})
    report = check_dataset(root)
    assert report.ok and report.cases[0].shape == (12, 10) and report.cases[0].spacing == (1.0, 1.0)
    bad = _dataset(tmp_path / "2d_bad", {"flat": {"image": _image(rng, (12, 10)), "label": label_2d[:, :9]}})
    assert "shape 12x9 does not match image" in check_dataset(bad).cases[0].problems[0]


def test_spacing_direction_and_label_value_checks(tmp_path):
    tiny = np.diag([0.01, 1.0, 1.0, 1.0])
    rotated = np.eye(4)
    rotated[:2, :2] = [[np.cos(0.1), -np.sin(0.1)], [np.sin(0.1), np.cos(0.1)]]
    fractional = _label().astype(np.float32)
    fractional[0, 0, 0] = 0.5
    root = _dataset(
        tmp_path,
        {
            "tiny_spacing": {"affine": tiny},
            "rotated": {"affine": np.eye(4), "label_affine": rotated},
            "fractional": {"label": fractional},
            "float_ok": {"label": _label().astype(np.float64)},
        },
    )
    report = check_dataset(root)
    assert _case(report, "tiny_spacing").problems == [
        "imagesTr/tiny_spacing.nii.gz: spacing 0.01x1x1 mm outside 0.05..20 mm"
    ]
    (rotated_problem,) = _case(report, "rotated").problems
    assert rotated_problem.startswith("labelsTr/rotated.nii.gz: affine differs from the image: direction")
    assert _case(report, "fractional").problems == [
        "labelsTr/fractional.nii.gz: label values are not integers (e.g. {0.5})"
    ]
    assert _case(report, "float_ok").ok


def test_affine_differences_names_what_differs():
    base = np.diag([1.0, 1.0, 2.0, 1.0])
    assert affine_differences(base, base.copy()) == []
    near = base.copy()
    near[0, 3] = 0.005  # under the 0.01 mm origin tolerance
    near[2, 2] = 2.001  # under the 1e-3 relative spacing tolerance
    assert affine_differences(base, near) == []
    scaled = base.copy()
    scaled[1, 1] = 1.2
    assert affine_differences(base, scaled) == ["spacing 1x1x2 vs 1x1.2x2 mm"]
    flipped = base.copy()
    flipped[0, 0] = -1.0
    assert affine_differences(base, flipped) == ["direction (largest cosine difference 2)"]


def test_missing_labels_and_duplicates_are_dataset_problems(tmp_path):
    root = _dataset(tmp_path, {"a": {}, "b": {}})
    meta_path = root / "dataset.json"
    text = meta_path.read_text().replace('"./imagesTr/b.nii.gz"', '"./imagesTr/a.nii.gz"')
    meta_path.write_text(text.replace('"labels"', '"labelz"'))
    report = check_dataset(root)
    assert not report.ok
    assert any("'labels' must be a non-empty object" in p for p in report.problems)
    assert "dataset.json: cases listed more than once: a" in report.problems


def test_hippocampus_passes(hippocampus_dir: Path):
    before = os.listdir(hippocampus_dir / "imagesTr")
    report = check_dataset(hippocampus_dir)
    assert report.ok, report.format()
    assert len(report.cases) == 200
    assert report.problems == [] and report.warnings == []
    assert report.format().splitlines()[-1] == "200 cases checked, 0 with problems"
    assert os.listdir(hippocampus_dir / "imagesTr") == before


def test_garbage_file_and_test_section(tmp_path):
    root = _dataset(tmp_path, {"a": {}, "garbage": {}}, numTest=1, test=["./imagesTs/t.nii.gz"])
    (root / "imagesTr" / "garbage.nii.gz").write_bytes(b"not an image")
    _save(_image(np.random.default_rng(4)), np.eye(4), root / "imagesTs" / "t.nii.gz")
    report = check_dataset(root)
    assert _case(report, "garbage").problems == [
        "imagesTr/garbage.nii.gz: unreadable (File garbage.nii.gz is not a gzip file)"
    ]
    assert _case(report, "a").ok
    test_report = check_dataset(root, "test")  # test entries have no label, and need none
    assert test_report.ok and [c.case_id for c in test_report.cases] == ["t"]
    assert test_report.cases[0].label is None


def test_require_valid_dataset_stops_a_run_before_training(tmp_path):
    good = _dataset(tmp_path / "good", {"a": {}, "b": {}})
    assert require_valid_dataset(good) == good / "dataset.json"
    with pytest.raises(SystemExit) as missing:
        require_valid_dataset(tmp_path / "absent", hint="get it from X and pass --dataset_dir")
    assert "absent: dataset folder not found" in str(missing.value.code)
    assert str(missing.value.code).endswith("get it from X and pass --dataset_dir")
    label = _label()
    label[0, 0, 0] = 7
    broken = _dataset(tmp_path / "broken", {"a": {}, "b": {"label": label}})
    with pytest.raises(SystemExit) as bad:
        require_valid_dataset(broken)
    message = str(bad.value.code)
    assert "nothing was trained" in message and "label values {7}" in message
    assert "FAIL b" in message and "FAIL a" not in message  # only the broken case is listed
