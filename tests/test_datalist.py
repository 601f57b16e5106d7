"""MSD dataset.json: read/write, datalists with absolute paths, label names, k-fold splits."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest

from medmtl.data.datalist import (
    case_id_from_path,
    kfold_split,
    label_names,
    load_datalist,
    read_dataset_json,
    write_dataset_json,
)
from medmtl.errors import MedmtlError


def _meta(n: int = 4) -> dict:
    return {
        "name": "tiny",
        "labels": {"0": "background", "2": "lesion", "1": "organ"},
        "numTraining": n,
        "numTest": 1,
        "training": [
            {
                "image": f"./imagesTr/case_{i:03d}.nii.gz",
                "label": f"./labelsTr/case_{i:03d}.nii.gz",
                "class": i % 2,
            }
            for i in range(n)
        ],
        "test": ["./imagesTs/case_900.nii.gz"],
    }


def test_write_read_round_trip(tmp_path):
    meta = _meta()
    meta["numTraining"] = np.int64(4)  # numpy scalars from generator code must serialise
    path = write_dataset_json(tmp_path / "ds", meta)
    assert path == (tmp_path / "ds" / "dataset.json").absolute()
    back = read_dataset_json(tmp_path / "ds")
    assert back == {**meta, "numTraining": 4}
    assert isinstance(back["numTraining"], int)
    assert os.listdir(tmp_path / "ds") == ["dataset.json"]  # the temporary file is gone


def test_write_replaces_and_failed_write_keeps_old_file(tmp_path):
    write_dataset_json(tmp_path, {"name": "old"})
    write_dataset_json(tmp_path, {"name": "new"})
    assert read_dataset_json(tmp_path) == {"name": "new"}
    with pytest.raises(MedmtlError, match="cannot write the metadata as JSON"):
        write_dataset_json(tmp_path, {"name": object()})
    assert read_dataset_json(tmp_path) == {"name": "new"}
    assert os.listdir(tmp_path) == ["dataset.json"]


def test_read_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(MedmtlError, match="dataset folder not found") as err:
        read_dataset_json(tmp_path / "nope")
    assert "nope" in str(err.value)
    with pytest.raises(MedmtlError, match=r"dataset\.json: not found"):
        read_dataset_json(tmp_path)
    (tmp_path / "dataset.json").write_text('{\n  "name": "x",\n}\n')
    with pytest.raises(MedmtlError, match=r"dataset\.json: malformed JSON at line 3, column 1"):
        read_dataset_json(tmp_path)
    (tmp_path / "dataset.json").write_text("[1, 2]")
    with pytest.raises(MedmtlError, match="top level must be a JSON object, found list"):
        read_dataset_json(tmp_path)
    (tmp_path / "dataset.json").write_bytes(b'{"name": "\xff"}')
    with pytest.raises(MedmtlError, match="not UTF-8"):
        read_dataset_json(tmp_path)


def test_load_datalist_absolute_paths_and_extra_keys(tmp_path):
    write_dataset_json(tmp_path, _meta())
    items = load_datalist(tmp_path)
    assert len(items) == 4
    first = items[0]
    assert first["image"] == str(tmp_path.absolute() / "imagesTr" / "case_000.nii.gz")
    assert first["label"] == str(tmp_path.absolute() / "labelsTr" / "case_000.nii.gz")
    assert [item["class"] for item in items] == [0, 1, 0, 1]
    assert [item["case_id"] for item in items] == ["case_000", "case_001", "case_002", "case_003"]
    assert all(os.path.isabs(item["image"]) and "./" not in item["image"] for item in items)


def test_load_datalist_relative_dir_gives_absolute_paths(tmp_path, monkeypatch):
    write_dataset_json(tmp_path / "ds", _meta())
    monkeypatch.chdir(tmp_path)
    items = load_datalist("ds")
    assert items[0]["image"] == str(tmp_path.absolute() / "ds" / "imagesTr" / "case_000.nii.gz")


def test_load_datalist_test_section(tmp_path):
    meta = _meta()
    write_dataset_json(tmp_path, meta)
    assert load_datalist(tmp_path, "test") == [
        {"image": str(tmp_path.absolute() / "imagesTs" / "case_900.nii.gz"), "case_id": "case_900"}
    ]
    meta["test"] = [{"image": "imagesTs/a.nii.gz", "case_id": "custom"}]
    write_dataset_json(tmp_path, meta)
    assert load_datalist(tmp_path, "test") == [
        {"image": str(tmp_path.absolute() / "imagesTs" / "a.nii.gz"), "case_id": "custom"}
    ]
    meta["test"] = []
    write_dataset_json(tmp_path, meta)
    assert load_datalist(tmp_path, "test") == []


def test_load_datalist_errors(tmp_path):
    meta = _meta()
    write_dataset_json(tmp_path, meta)
    with pytest.raises(MedmtlError, match=r"no 'validation' section \(lists present: training, test\)"):
        load_datalist(tmp_path, "validation")
    meta["training"][2] = {"label": "./labelsTr/case_002.nii.gz"}
    write_dataset_json(tmp_path, meta)
    with pytest.raises(MedmtlError, match=r"training\[2\] has no 'image'"):
        load_datalist(tmp_path)
    meta["training"][2] = "./imagesTr/case_002.nii.gz"
    write_dataset_json(tmp_path, meta)
    with pytest.raises(MedmtlError, match=r"training\[2\] must be an object"):
        load_datalist(tmp_path)
    meta["training"][2] = {"image": 3}
    write_dataset_json(tmp_path, meta)
    with pytest.raises(MedmtlError, match=r"training\[2\] 'image' must be a path"):
        load_datalist(tmp_path)


def test_case_id_from_path():
    assert case_id_from_path("/d/imagesTr/hippocampus_001.nii.gz") == "hippocampus_001"
    assert case_id_from_path("x/case.v2.nii") == "case.v2"
    assert case_id_from_path("scan.mha") == "scan"
    assert case_id_from_path("noext") == "noext"


def test_label_names():
    assert label_names(_meta()) == {0: "background", 1: "organ", 2: "lesion"}
    assert list(label_names(_meta())) == [0, 1, 2]
    with pytest.raises(MedmtlError, match="label key 'one' is not an integer"):
        label_names({"labels": {"0": "background", "one": "x"}})
    with pytest.raises(MedmtlError, match="'labels' must be a non-empty object"):
        label_names({})


def _items(n: int) -> list[dict]:
    return [{"image": f"/d/imagesTr/case_{i:03d}.nii.gz", "case_id": f"case_{i:03d}"} for i in range(n)]


def _ids(items: list[dict]) -> list[str]:
    return [item["case_id"] for item in items]


def test_kfold_partitions_the_cases():
    items = _items(23)
    all_ids = set(_ids(items))
    val_sets = []
    for fold in range(5):
        train, val = kfold_split(items, n_folds=5, fold=fold, seed=3)
        assert set(_ids(train)).isdisjoint(_ids(val))
        assert set(_ids(train)) | set(_ids(val)) == all_ids
        assert len(train) + len(val) == 23
        assert _ids(val) == sorted(_ids(val)) and _ids(train) == sorted(_ids(train))
        val_sets.append(set(_ids(val)))
    assert sorted(len(v) for v in val_sets) == [4, 4, 5, 5, 5]
    assert set().union(*val_sets) == all_ids
    assert sum(len(v) for v in val_sets) == len(all_ids)  # every case in exactly one val fold


def test_kfold_is_deterministic_and_order_independent():
    items = _items(20)
    shuffled = items[::-1]
    random.Random(1).shuffle(shuffled)
    for fold in range(4):
        a = kfold_split(items, n_folds=4, fold=fold, seed=7)
        b = kfold_split(shuffled, n_folds=4, fold=fold, seed=7)
        assert (_ids(a[0]), _ids(a[1])) == (_ids(b[0]), _ids(b[1]))
    # the split is shuffled (not a plain slicing of the sorted ids) and depends on the seed
    val0 = _ids(kfold_split(items, n_folds=4, fold=0, seed=7)[1])
    assert val0 != _ids(items)[:5] and val0 != _ids(items)[::4]
    assert val0 != _ids(kfold_split(items, n_folds=4, fold=0, seed=8)[1])


def test_kfold_derives_case_id_and_keeps_dicts():
    items = [{"image": f"/d/c{i}.nii.gz", "class": i % 2} for i in range(6)]
    train, val = kfold_split(items, n_folds=3, fold=1)
    assert len(val) == 2 and len(train) == 4
    assert all(any(item is orig for orig in items) for item in train + val)
    assert "case_id" not in items[0]  # inputs are not modified


def test_kfold_errors():
    items = _items(4)
    with pytest.raises(MedmtlError, match="n_folds must be at least 2"):
        kfold_split(items, n_folds=1)
    with pytest.raises(MedmtlError, match=r"fold must be in 0\.\.3 or 'all', got 4"):
        kfold_split(items, n_folds=4, fold=4)
    with pytest.raises(MedmtlError, match="cannot split 4 cases into 5 folds"):
        kfold_split(items, n_folds=5)
    with pytest.raises(MedmtlError, match="duplicate case ids in the datalist: case_001"):
        kfold_split(items + [items[1]], n_folds=2)


def test_hippocampus_datalist_and_folds(hippocampus_dir: Path):
    meta = read_dataset_json(hippocampus_dir)
    assert label_names(meta) == {0: "background", 1: "Anterior", 2: "Posterior"}
    items = load_datalist(hippocampus_dir)
    assert len(items) == meta["numTraining"] == 200
    assert all(os.path.isfile(item["image"]) and os.path.isfile(item["label"]) for item in items)
    assert items[0]["case_id"] == "hippocampus_001"
    test = load_datalist(hippocampus_dir, "test")
    expected = str(hippocampus_dir.absolute() / "imagesTs" / "hippocampus_118.nii.gz")
    assert test == [{"image": expected, "case_id": "hippocampus_118"}]
    vals = [_ids(kfold_split(items, n_folds=5, fold=f)[1]) for f in range(5)]
    assert [len(v) for v in vals] == [40] * 5
    assert sorted(sum(vals, [])) == sorted(_ids(items))


def test_json_written_is_plain_msd(tmp_path):
    write_dataset_json(tmp_path, _meta())
    text = (tmp_path / "dataset.json").read_text()
    assert json.loads(text)["training"][0]["image"] == "./imagesTr/case_000.nii.gz"
    assert text.endswith("}\n")


def test_fold_all_trains_on_every_case_and_validates_on_none():
    items = _items(4)
    train, val = kfold_split(list(reversed(items)), n_folds=5, fold="all")
    assert val == [] and [t["image"] for t in train] == sorted(t["image"] for t in items)
    with pytest.raises(MedmtlError, match="fold 'all': the datalist has no cases"):
        kfold_split([], fold="all")
