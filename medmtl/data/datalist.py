"""MSD `dataset.json` files: read, write, turn into MONAI datalists, split into cross-validation folds.

The Medical Segmentation Decathlon layout is one folder holding `dataset.json`, `imagesTr/`, `labelsTr/`
and `imagesTs/`. `dataset.json` lists file paths relative to that folder: `training` (and optionally
`validation`) as `{"image": ..., "label": ..., <extra keys>}` objects, `test` as a list of image paths.
MONAI's `load_decathlon_datalist` does the path joining; this module adds user-facing errors, `case_id`s
and order-independent k-fold splits.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import load_decathlon_datalist, partition_dataset

from medmtl.errors import MedmtlError
from medmtl.io import atomic_write_text

DATASET_JSON = "dataset.json"


def _dataset_folder(dataset_dir: Path | str) -> Path:
    folder = Path(dataset_dir).expanduser().absolute()
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "not found"
        raise MedmtlError(f"{folder}: dataset folder {what}")
    return folder


def read_dataset_json(dataset_dir: Path | str) -> dict:
    """Read the `dataset.json` of an MSD dataset folder.

    Args:
        dataset_dir: the folder holding `dataset.json`.

    Returns:
        The parsed JSON object (a dict), unchanged.

    Raises:
        MedmtlError: the folder or the file is missing, the file is not valid UTF-8 JSON (the message names
            the line and column), or its top level is not a JSON object.
    """
    path = _dataset_folder(dataset_dir) / DATASET_JSON
    if not path.is_file():
        raise MedmtlError(f"{path}: not found (an MSD dataset folder needs one)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise MedmtlError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise MedmtlError(f"{path}: cannot be read ({err.strerror})") from None
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as err:
        where = f"line {err.lineno}, column {err.colno}"
        raise MedmtlError(f"{path}: malformed JSON at {where} ({err.msg})") from None
    if not isinstance(meta, dict):
        raise MedmtlError(f"{path}: top level must be a JSON object, found {type(meta).__name__}")
    return meta


def _json_default(value: Any) -> Any:
    # numpy scalars and paths turn up in metadata built in code; JSON knows neither
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def write_dataset_json(dataset_dir: Path | str, meta: dict) -> Path:
    """Write `meta` as `dataset_dir/dataset.json`, atomically.

    The JSON goes to a temporary file in the same folder that then replaces `dataset.json` in one
    `os.replace`, so a reader never sees a half-written file and an interrupted write leaves the old one.

    Args:
        dataset_dir: the dataset folder; created if absent.
        meta: the dataset description (MSD keys: `name`, `labels`, `training`, ...).

    Returns:
        The path of the written `dataset.json`.

    Raises:
        MedmtlError: `meta` holds a value that cannot be written as JSON, or the folder is not writable.
    """
    folder = Path(dataset_dir).expanduser().absolute()
    try:
        text = json.dumps(meta, indent=2, default=_json_default, allow_nan=False) + "\n"
    except (TypeError, ValueError) as err:
        raise MedmtlError(f"{folder / DATASET_JSON}: cannot write the metadata as JSON ({err})") from None
    return atomic_write_text(folder / DATASET_JSON, text, durable=True)


def case_id_from_path(path: str | os.PathLike) -> str:
    """The case identifier of an image file: its name without `.nii.gz` (or its last extension).

    Args:
        path: an image file path, e.g. `/data/imagesTr/hippocampus_001.nii.gz`.

    Returns:
        The case id, e.g. `hippocampus_001`.
    """
    name = Path(path).name
    if name.endswith(".gz"):
        name = name[: -len(".gz")]
    return Path(name).stem if "." in name else name


def _is_path_or_paths(value: Any) -> bool:
    if isinstance(value, list):
        return bool(value) and all(isinstance(v, str) for v in value)
    return isinstance(value, str)


def _check_section(meta: dict, section: str, where: Path) -> list:
    if section not in meta:
        present = ", ".join(k for k, v in meta.items() if isinstance(v, list)) or "none"
        raise MedmtlError(f"{where}: no '{section}' section (lists present: {present})")
    items = meta[section]
    if not isinstance(items, list):
        raise MedmtlError(f"{where}: '{section}' must be a list, found {type(items).__name__}")
    for i, item in enumerate(items):
        # MSD writes the test section as bare image paths; everywhere else entries are objects
        if section == "test" and isinstance(item, str):
            continue
        if not isinstance(item, dict):
            raise MedmtlError(f"{where}: {section}[{i}] must be an object with an 'image', found {item!r}")
        if "image" not in item:
            raise MedmtlError(f"{where}: {section}[{i}] has no 'image'")
        for key in ("image", "label"):
            if key in item and not _is_path_or_paths(item[key]):
                raise MedmtlError(f"{where}: {section}[{i}] '{key}' must be a path or a list of paths")
    if section == "test" and len({isinstance(item, str) for item in items}) > 1:
        raise MedmtlError(f"{where}: 'test' mixes bare paths and objects")
    return items


def load_datalist(dataset_dir: Path | str, section: str = "training") -> list[dict]:
    """The entries of one section of `dataset.json`, with absolute paths, ready for a MONAI Dataset.

    Args:
        dataset_dir: the MSD dataset folder.
        section: `training`, `validation`, `test` or any other list in `dataset.json`.

    Returns:
        One dict per entry: `image` (and `label` where listed) as absolute, normalized path strings (a list
        of paths stays a list), every other key kept as written (e.g. `class`), plus `case_id` (the image
        file name without `.nii.gz`; a `case_id` in the JSON wins). MSD `test` entries, which are bare
        paths, become `{"image": path}`. The files are not checked for existence (see `medmtl.data.checks`).

    Raises:
        MedmtlError: no such folder, file or section, malformed JSON, or an entry without an `image` path.
    """
    folder = _dataset_folder(dataset_dir)
    meta = read_dataset_json(folder)
    _check_section(meta, section, folder / DATASET_JSON)
    if not meta[section]:
        return []  # MONAI's loader indexes the first test entry, so an empty section is handled here
    items = load_decathlon_datalist(
        folder / DATASET_JSON, is_segmentation=True, data_list_key=section, base_dir=folder
    )
    for i, item in enumerate(items):
        for key in ("image", "label"):
            for path in item.get(key) if isinstance(item.get(key), list) else [item.get(key)]:
                # a listed path must not leave the dataset: "../other/x.nii.gz" would train on files that
                # belong to another dataset (or to nobody) without a word
                if path is not None and not Path(os.path.normpath(path)).is_relative_to(os.path.normpath(folder)):
                    written = meta[section][i][key] if isinstance(meta[section][i], dict) else meta[section][i]
                    raise MedmtlError(
                        f"{folder / DATASET_JSON}: {section}[{i}] '{key}' {written!r} points outside the dataset "
                        "folder; list files inside it (relative paths such as ./imagesTr/case.nii.gz)"
                    )
        image = item["image"]
        item.setdefault("case_id", case_id_from_path(image[0] if isinstance(image, list) else image))
    return items


def label_names(meta: dict) -> dict[int, str]:
    """The label values declared in `dataset.json` and their names.

    Args:
        meta: the parsed `dataset.json` (see `read_dataset_json`).

    Returns:
        `{value: name}` sorted by value, e.g. `{0: "background", 1: "Anterior", 2: "Posterior"}`.

    Raises:
        MedmtlError: `labels` is missing, not an object, or has a key that is not an integer.
    """
    labels = meta.get("labels")
    if not isinstance(labels, dict) or not labels:
        example = '{"0": "background", "1": ...}'
        raise MedmtlError(f"{DATASET_JSON}: 'labels' must be a non-empty object like {example}")
    names = {}
    for key, name in labels.items():
        try:
            value = int(key)
        except (TypeError, ValueError):
            raise MedmtlError(f"{DATASET_JSON}: label key {key!r} is not an integer") from None
        names[value] = str(name)
    return dict(sorted(names.items()))


def _case_id(item: dict) -> str:
    if "case_id" in item:
        return str(item["case_id"])
    image = item["image"]
    return case_id_from_path(image[0] if isinstance(image, list) else image)


def kfold_split(
    items: Sequence[dict], n_folds: int = 5, fold: int | str = 0, seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """Split a datalist into the training and validation cases of one cross-validation fold.

    The cases are sorted by `case_id` and then shuffled with `seed` (MONAI `partition_dataset`), so a fold
    depends only on the set of cases, `n_folds` and `seed`, not on the order of the JSON. The validation
    parts of folds `0..n_folds-1` partition the set: every case is validated in exactly one fold.

    Args:
        items: datalist entries (from `load_datalist`); `case_id` is derived from `image` where absent.
        n_folds: number of folds (at least 2).
        fold: which fold to return, `0 <= fold < n_folds`; ``"all"`` trains on every case and validates on
            none (nnU-Net's final model, trained once the folds have chosen the settings).
        seed: shuffle seed.

    Returns:
        `(train, val)`: the same dict objects (not copies), each list sorted by `case_id`.

    Raises:
        MedmtlError: bad `n_folds`/`fold`, fewer cases than folds, or duplicate case ids.
    """
    if str(fold) == "all":
        if not items:
            raise MedmtlError("fold 'all': the datalist has no cases")
        return sorted(items, key=_case_id), []
    if n_folds < 2:
        raise MedmtlError(f"n_folds must be at least 2, got {n_folds}")
    if not isinstance(fold, int) or not 0 <= fold < n_folds:
        raise MedmtlError(f"fold must be in 0..{n_folds - 1} or 'all', got {fold!r}")
    if len(items) < n_folds:
        remedy = f"pass --num_folds N with 2 <= N <= {len(items)}" if len(items) >= 2 else "at least 2 are needed"
        raise MedmtlError(f"cannot split {len(items)} cases into {n_folds} folds; add cases or {remedy}")

    ordered = sorted(items, key=_case_id)
    ids = [_case_id(item) for item in ordered]
    duplicates = sorted({i for i, j in zip(ids, ids[1:], strict=False) if i == j})
    if duplicates:
        # a case listed twice could land in both train and val
        raise MedmtlError(f"duplicate case ids in the datalist: {', '.join(duplicates[:5])}")
    parts = partition_dataset(ordered, num_partitions=n_folds, shuffle=True, seed=seed, even_divisible=False)
    val = sorted(parts[fold], key=_case_id)
    train = sorted((item for i, part in enumerate(parts) if i != fold for item in part), key=_case_id)
    return train, val
