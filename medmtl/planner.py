"""`medmtl plan`: fingerprint an MSD dataset once and decide how to train on it, after nnU-Net v2.

The plan is one JSON-able dict::

    {"fingerprint": {...}, "pipeline": {...}, "network_args": {...}, "train": {...}, "why": {...}}

``pipeline`` and ``network_args`` use the keys of the bundles' ``train.yaml`` blocks of the same names
(``medmtl.data.pipelines.validate_config`` accepts ``pipeline`` as is; ``network_args`` are the keyword
arguments of ``medmtl.networks.MultiTaskUNet``), so a bundle can read both from ``configs/plans.json``.
``train`` holds the other training values (batch size, heads, ...), ``why`` one sentence per decision.

The rules follow nnU-Net v2's ``ExperimentPlanner`` (``default_experiment_planner.py``) and
``get_pool_and_conv_props`` (``network_topology.py``); each function names the rule it implements.
Differences, all deliberate: shapes are the images' (nnU-Net crops to the nonzero region first); the
network is medmtl's ``MultiTaskUNet`` (on CPU with the strided first stage of the hand-tuned bundles);
``monai.data.DatasetSummary`` is not used because it loads every image through a DataLoader, reports
spacing in file voxel order rather than RAS, and its target-spacing rule lacks nnU-Net's voxel-count
condition and clamp; ``medmtl.data.planning.fingerprint`` reads each case once with nibabel instead.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medmtl.data.checks import CaseHook, check_dataset
from medmtl.data.datalist import label_names, load_datalist, read_dataset_json
from medmtl.data.planning import FingerprintAccumulator, fingerprint
from medmtl.errors import MedmtlError
from medmtl.io import atomic_write_text

__all__ = [
    "ANISO_THRESHOLD",
    "dataset_fingerprint",
    "feature_map_voxels",
    "get_pool_and_conv_props",
    "load_plans",
    "make_plan",
    "plan_block",
    "plan_dataset",
    "plan_topology",
    "target_spacing",
    "write_bundle",
    "write_plans",
]

PLANS_JSON = "configs/plans.json"
# nnU-Net v2 ExperimentPlanner constants
ANISO_THRESHOLD = 3.0
_REF_VAL = {3: 560_000_000, 2: 85_000_000}  # feature-map voxels of a network that fills the reference GPU
_REF_GB = 8.0  # ... of this many GB
_REF_BATCH = {3: 2, 2: 12}  # ... at this batch size
_MIN_EDGE = 4  # UNet_featuremap_min_edge_length: no pooling below 2x this
_MIN_BATCH = 2
_MAX_DATASET_COVERED = 0.05  # one batch covers at most 5% of the dataset's voxels
_INITIAL_EDGE = {3: 256, 2: 2048}  # initial patch: 256^3 (2048^2) voxels shaped by the spacing
# per device: (features of the first stage, feature cap 3D, cap 2D, default memory budget GB).
# GPU is nnU-Net's (32, 320, 512, 8 GB); CPU halves the widths, as the hand-tuned bundles do.
_DEVICE = {"gpu": (32, 320, 512, 8.0), "cpu": (16, 160, 256, 4.0)}


def load_plans(path: Path | str) -> dict[str, Any]:
    """Read a bundle's ``configs/plans.json``: what its configs' ``pipeline`` and ``network_args`` start from.

    The bundles read it once per run (``plans: "$medmtl.planner.load_plans(@bundle_root + '/configs/plans.json')"``),
    so training, evaluation, multi-GPU training and inference share one copy of the planned values.

    Raises:
        MedmtlError: one line naming the file: missing, not JSON, or without a ``pipeline`` and a
            ``network_args`` object.
    """
    file = Path(path)
    try:
        plans = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MedmtlError(f"{file}: not found; `medmtl plan DATASET --out BUNDLE` writes it") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MedmtlError(f"{file}: not a readable JSON file ({type(err).__name__}: {err})") from None
    if not isinstance(plans, dict):
        raise MedmtlError(f"{file}: must hold a JSON object, got {type(plans).__name__}")
    for block in ("pipeline", "network_args"):
        if not isinstance(plans.get(block), dict):
            raise MedmtlError(f"{file}: needs a '{block}' object (the bundle's {block} block)")
    return plans


def plan_block(plans: dict[str, Any], block: str, **keys: Any) -> dict[str, Any]:
    """``plans[block]`` with ``keys`` added or replaced: a bundle config's ``pipeline`` or ``network_args``.

    A config builds the block as a component whose other keys are passed here, so a key written in the yaml
    (``boundary: "$'boundary' in @heads"``) or given on the command line (``--pipeline#patch_size "[32,48,32]"``)
    wins over the planned value, and every other planned key is taken as is.

    Raises:
        MedmtlError: ``plans`` has no ``block`` object.
    """
    if not isinstance(plans.get(block), dict):
        raise MedmtlError(f"plans: no '{block}' block (keys: {sorted(plans)})")
    return {**plans[block], **keys}


def target_spacing(spacings: Sequence[Sequence[float]], shapes: Sequence[Sequence[int]]) -> tuple[list[float], str]:
    """Target voxel spacing: nnU-Net v2 ``determine_fullres_target_spacing``.

    The median spacing per axis; when the data is anisotropic -- the coarsest axis' median spacing is more than
    ``ANISO_THRESHOLD`` (3) times the finest other axis' AND its median size times 3 is below the smallest other
    axis' median size (few thick slices) -- that axis takes the 10th percentile of its spacings instead, but no
    finer than the other axes' coarsest spacing (then that + 1e-5), so resampling does not invent slices.

    Args:
        spacings: per case, mm per axis (RAS order).
        shapes: per case, voxels per axis.

    Returns:
        the target spacing per axis and a sentence saying which branch applied.
    """
    sp, sh = np.asarray(spacings, dtype=float), np.asarray(shapes, dtype=float)
    target = np.percentile(sp, 50, axis=0)
    size = np.percentile(sh, 50, axis=0)
    worst = int(np.argmax(target))
    others = [i for i in range(len(target)) if i != worst]
    if not others:
        return [float(v) for v in target], "median spacing"
    aniso_spacing = target[worst] > ANISO_THRESHOLD * max(target[others])
    aniso_voxels = size[worst] * ANISO_THRESHOLD < min(size[others])
    if aniso_spacing and aniso_voxels:
        low = float(np.percentile(sp[:, worst], 10))
        if low < max(target[others]):
            low = max(max(target[others]), low) + 1e-5
        target[worst] = low
        why = (f"median spacing, except axis {worst}: anisotropic (spacing ratio > {ANISO_THRESHOLD:g} and few "
               f"slices), so the 10th percentile of its spacings ({low:.4g} mm) as nnU-Net does")
    else:
        why = "median spacing per axis (nnU-Net's rule; not anisotropic by its spacing-and-voxels test)"
    return [float(v) for v in target], why


def get_pool_and_conv_props(
    spacing: Sequence[float], patch_size: Sequence[int], min_feature_map_size: int = _MIN_EDGE,
    max_numpool: int = 999_999,
) -> tuple[list[int], list[list[int]], list[list[int]], list[int], list[int]]:
    """Pooling and kernel sizes per stage: nnU-Net v2 ``get_pool_and_conv_props``.

    Each stage pools (stride 2) the axes still at least ``2 * min_feature_map_size`` voxels long whose current
    spacing is within 2x of the finest valid one (a lone valid axis only if at least 3x that long), so coarse
    axes wait until pooling the fine ones has caught up: anisotropic data gets in-plane-only first strides.
    A kernel is 3 along an axis once its spacing is within 2x of the finest, 1 before; the bottleneck is 3s.

    Returns:
        ``(num_pool_per_axis, pool_op_kernel_sizes, conv_kernel_sizes, patch_size, must_be_divisible_by)``:
        strides per stage (the first all 1s), kernels per stage, the patch padded up to multiples of
        ``2 ** num_pool_per_axis``.
    """
    dim = len(spacing)
    current_spacing, current_size = [float(s) for s in spacing], [float(s) for s in patch_size]
    pool_ops, conv_kernels = [[1] * dim], []
    num_pool, kernel = [0] * dim, [1] * dim
    while True:
        valid = [i for i in range(dim) if current_size[i] >= 2 * min_feature_map_size]
        if not valid:
            break
        finest = min(current_spacing[i] for i in valid)
        valid = [i for i in valid if current_spacing[i] / finest < 2 and num_pool[i] < max_numpool]
        if len(valid) == 1 and current_size[valid[0]] < 3 * min_feature_map_size:
            break
        if not valid:
            break
        for d in range(dim):
            if kernel[d] != 3 and current_spacing[d] / min(current_spacing) < 2:
                kernel[d] = 3
        pool = [1] * dim
        for v in valid:
            pool[v] = 2
            num_pool[v] += 1
            current_spacing[v] *= 2
            current_size[v] = math.ceil(current_size[v] / 2)
        pool_ops.append(pool)
        conv_kernels.append(list(kernel))
    divisible = [2**n for n in num_pool]
    padded = [int(math.ceil(s / d) * d) for s, d in zip(patch_size, divisible, strict=True)]
    conv_kernels.append([3] * dim)
    return num_pool, pool_ops, conv_kernels, padded, divisible


def feature_map_voxels(patch_size: Sequence[int], strides: Sequence[Sequence[int]], features: Sequence[int],
                       num_classes: int) -> int:
    """nnU-Net's memory proxy (``compute_conv_feature_map_size`` of its PlainConvUNet, deep supervision on).

    Sums the output elements of every convolution for one sample: two per encoder stage, and per decoder stage
    the transposed convolution, two convolutions and a segmentation output.
    """
    sizes, size = [], np.asarray(patch_size, dtype=np.int64)
    for stride in strides:
        size = size // np.asarray(stride)
        sizes.append(int(np.prod(size)))
    total = sum(2 * f * n for f, n in zip(features, sizes, strict=True))
    total += sum((3 * f + num_classes) * n for f, n in zip(features[:-1], sizes[:-1], strict=True))
    return int(total)


def plan_topology(spacing: Sequence[float], median_shape: Sequence[float], num_classes: int, num_cases: int,
                  memory_gb: float, base_features: int, max_features: int) -> dict[str, Any]:
    """Patch size, strides, kernels, widths and batch size: nnU-Net v2 ``get_plans_for_configuration``.

    (1) An initial patch of 256^3 (2D: 2048^2) voxels shaped like the inverse spacing (equal mm per axis),
    clipped to the median shape; (2) ``get_pool_and_conv_props`` on it; (3) while ``feature_map_voxels`` is over
    the budget (560e6 per 8 GB in 3D, 85e6 in 2D, scaled by ``memory_gb``), the axis with the largest
    patch/median ratio shrinks by its divisor and the topology is recomputed; (4) batch size = reference batch
    (2 in 3D, 12 in 2D) x budget / estimate, at most what covers 5% of the dataset's voxels, at least 2.
    """
    dim = len(spacing)
    tmp = 1.0 / np.asarray(spacing, dtype=float)
    initial = [round(v) for v in tmp * (_INITIAL_EDGE[dim] ** dim / np.prod(tmp)) ** (1 / dim)]
    patch = [int(min(i, m)) for i, m in zip(initial, median_shape, strict=True)]

    def topology(p: Sequence[int]) -> tuple:
        _, pools, kernels, padded, divisible = get_pool_and_conv_props(spacing, p)
        features = [min(base_features * 2**i, max_features) for i in range(len(pools))]
        return pools, kernels, padded, divisible, features

    pools, kernels, patch, divisible, features = topology(patch)
    budget = _REF_VAL[dim] * memory_gb / _REF_GB
    estimate = feature_map_voxels(patch, pools, features, num_classes)
    while estimate > budget:
        axis = int(np.argsort([p / m for p, m in zip(patch, median_shape, strict=True)])[-1])
        trial = list(patch)
        trial[axis] -= divisible[axis]
        divisible = get_pool_and_conv_props(spacing, trial)[4]
        patch[axis] -= divisible[axis]
        if patch[axis] < 1:
            raise MedmtlError(f"plan: a {memory_gb:g} GB budget is too small for even the smallest patch")
        pools, kernels, patch, divisible, features = topology(patch)
        estimate = feature_map_voxels(patch, pools, features, num_classes)
    batch = round(budget / estimate * _REF_BATCH[dim])
    coverage = round(float(np.prod(median_shape, dtype=np.float64)) * num_cases * _MAX_DATASET_COVERED
                     / float(np.prod(patch, dtype=np.float64)))
    return {
        "patch_size": [int(v) for v in patch], "pool_op_kernel_sizes": pools, "conv_kernel_sizes": kernels,
        "features": features, "batch_size": int(max(min(batch, coverage), _MIN_BATCH)),
        "batch_from_memory": int(batch), "batch_from_coverage": int(coverage),
        "feature_map_voxels": estimate, "budget_voxels": int(budget),
    }


def _channel_names(meta: dict, channels: int, where: Path) -> list[str]:
    names = meta.get("modality", meta.get("channel_names"))
    if names is None:
        return ["unknown"] * channels
    if not isinstance(names, dict) or sorted(names) != [str(i) for i in range(channels)]:
        raise MedmtlError(f"{where}: 'modality' must name each of the images' {channels} channel(s) "
                          f"as {{\"0\": ...}}, got {names!r}")
    return [str(names[str(i)]) for i in range(channels)]


def _refuse_bad_dataset(folder: Path, on_case: CaseHook | None = None) -> None:
    """The checks of ``medmtl check-data`` (``on_case``: see ``check_dataset``); the first problem as one line."""
    report = check_dataset(folder, on_case=on_case)  # its own one-line MedmtlError without folder or dataset.json
    if report.ok:
        return
    # check-data's own message for the first problem (it names the file), then how many more there are
    problems = report.problems + [p for case in report.cases for p in case.problems]
    more = f"; {len(problems) - 1} more" if len(problems) > 1 else ""
    raise MedmtlError(f"{folder}: {problems[0]} (`medmtl check-data {folder}` prints the full report{more}); "
                      "nothing was planned")


def _checked_fingerprint(folder: Path) -> dict[str, Any]:
    """Check the dataset and fingerprint it in the same pass: every image and label is read once, by the check,
    which hands each good case's files to the fingerprint. A bad dataset is refused with check-data's message
    even when the fingerprint stumbled on it first."""
    acc, failed = FingerprintAccumulator(), []

    def add(entry: dict, images: list, label: tuple | None) -> None:
        if failed:
            return
        try:
            if len(images) != 1:  # check-data allows a list of files per case; the fingerprint wants one
                raise MedmtlError(f"{entry['image']}: one image file per case is needed to plan (got {len(images)})")
            (path, img, data), (lpath, limg, ldata) = images[0], label or (None, None, None)
            acc.add(path, img, lpath, limg, image_data=data, label_data=ldata)
        except MedmtlError as err:
            failed.append(err)

    _refuse_bad_dataset(folder, add)
    if failed:
        raise failed[0]
    return acc.result()


def dataset_fingerprint(dataset_dir: Path | str, check: bool = True) -> dict[str, Any]:
    """Check an MSD dataset as ``medmtl check-data`` does and fingerprint its training cases, reading each file once.

    Args:
        dataset_dir: the folder holding ``dataset.json``.
        check: run ``medmtl.data.checks.check_dataset`` (which hands the files it read to the fingerprint);
            False: the caller already did, the fingerprint reads the files itself.

    Returns:
        ``medmtl.data.planning.fingerprint`` of the ``training`` section plus ``channel_names`` (from
        ``modality`` or ``channel_names``), ``label_names``, ``case_classes`` (sorted case-level ``class``
        values, empty without) and ``num_with_class``.

    Raises:
        MedmtlError: one line: no folder or ``dataset.json``, or the first problem ``check-data`` reports.
    """
    folder = Path(dataset_dir).expanduser().absolute()
    fp = _checked_fingerprint(folder) if check else None
    meta = read_dataset_json(folder)
    entries = load_datalist(folder, "training")
    if fp is None:
        fp = fingerprint(entries)
    fp["channel_names"] = _channel_names(meta, fp["num_channels"], folder / "dataset.json")
    fp["label_names"] = {str(k): v for k, v in label_names(meta).items()}
    classes = [e["class"] for e in entries if e.get("class") is not None]
    if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in classes):
        raise MedmtlError(f"{folder / 'dataset.json'}: case 'class' values must be integers >= 0, got "
                          f"{sorted({repr(c) for c in classes})[:5]}")
    fp["case_classes"] = sorted(set(classes))
    fp["num_with_class"] = len(classes)
    return fp


def _normalization(fp: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]], str]:
    """nnU-Net v2 per-channel normalisation: ``CTNormalization`` for channels named CT (clip to the foreground
    0.5/99.5 percentiles, z-score with the foreground mean and std), ``ZScoreNormalization`` (per image)
    otherwise. Returns the pipeline keys, the per-channel schemes and why."""
    stats = fp["foreground_intensity"]
    channels = []
    for ch, name in enumerate(fp["channel_names"]):
        ct = name.casefold() == "ct" and ch < len(stats)
        entry: dict[str, Any] = {"channel": ch, "modality": name, "scheme": "ct" if ct else "zscore"}
        if ct:
            s = stats[ch]
            entry.update(clip=[s["p00_5"], s["p99_5"]], mean=s["mean"], std=s["std"])
        channels.append(entry)
    if all(c["scheme"] == "ct" for c in channels):
        window = [min(c["clip"][0] for c in channels), max(c["clip"][1] for c in channels)]
        # every channel contributes the same number of foreground samples, so the pooled mean and std follow
        # from the per-channel ones (one channel: exactly its own)
        mean = float(np.mean([c["mean"] for c in channels]))
        std = float(np.sqrt(max(np.mean([c["std"] ** 2 + c["mean"] ** 2 for c in channels]) - mean**2, 0.0)))
        if window[0] < window[1] and std > 0:
            why = (f"CT: nnU-Net's CTNormalization with the dataset's foreground statistics: clip to the 0.5/99.5 "
                   f"percentiles {[round(v, 1) for v in window]} HU, then z-score with mean {mean:.4g} and std "
                   f"{std:.4g} HU (pipeline ct_window and ct_stats)")
            if len(channels) > 1:
                why += "; several CT channels share the union of their windows and their pooled mean and std"
            return ({"normalization": "ct", "ct_window": window, "ct_stats": {"mean": mean, "std": std},
                     "nonzero": False}, channels, why)
        why = "CT with a constant foreground (no window to clip to): per-image z-score"
        return {"normalization": "zscore", "nonzero": False}, channels, why
    if any(c["scheme"] == "ct" for c in channels):
        why = ("mixed CT and other channels: the pipeline has one scheme for all channels, so per-image z-score "
               "(CT channels' clip windows in train.channel_normalization)")
    elif any(name.casefold() == "ct" for name in fp["channel_names"]):
        why = "CT without labelled foreground to take percentiles from: per-image z-score"
    else:
        why = "not CT: per-image, per-channel z-score (nnU-Net's ZScoreNormalization)"
    return {"normalization": "zscore", "nonzero": False}, channels, why


def make_plan(fp: dict[str, Any], device: str = "gpu", memory_gb: float | None = None,
              spatial_dims: int | None = None) -> dict[str, Any]:
    """Decide spacing, normalisation, network and training values from a ``dataset_fingerprint``.

    Args:
        fp: ``dataset_fingerprint`` result (needs ``spacings``, ``shapes``, ``label_names``,
            ``foreground_intensity``, ``channel_names``, ``case_classes``).
        device: "gpu" (nnU-Net's widths and layout, stride-1 first stage) or "cpu" (half the widths and a
            strided first stage: the hand-tuned bundles' CPU layout, no convolution at full resolution).
        memory_gb: memory budget for the activations (default 8 on gpu as nnU-Net, 4 on cpu).
        spatial_dims: network dimension; None: 3 for volumes unless very anisotropic (see ``why``), else 2.

    Returns:
        the plan dict (module docstring).

    Raises:
        MedmtlError: a bad argument (device, memory, spatial_dims for the data).
    """
    if device not in _DEVICE:
        raise MedmtlError(f"plan: device must be 'cpu' or 'gpu', got {device!r}")
    base, max3, max2, default_gb = _DEVICE[device]
    gb = default_gb if memory_gb is None else float(memory_gb)
    if not gb > 0:
        raise MedmtlError(f"plan: memory must be positive, got {memory_gb} GB")
    data_dims = int(fp["spatial_dims"])
    if spatial_dims not in (None, 2, 3) or (spatial_dims == 3 and data_dims == 2):
        raise MedmtlError(f"plan: spatial_dims {spatial_dims} is not possible for {data_dims}D images")
    num_classes = max(int(k) for k in fp["label_names"]) + 1
    num_cases = int(fp["num_cases"])
    spacing, why_spacing = target_spacing(fp["spacings"], fp["shapes"])
    shape_at_target = np.median([np.round(np.asarray(s) * np.asarray(sp) / np.asarray(spacing))
                                 for s, sp in zip(fp["shapes"], fp["spacings"], strict=True)], axis=0)
    worst = int(np.argmax(spacing))
    why: dict[str, str] = {"spacing": why_spacing}

    topo3 = None
    if data_dims == 3:
        topo3 = plan_topology(spacing, shape_at_target, num_classes, num_cases, gb, base, max3)
    ratio = max(spacing) / min(spacing)
    aniso = ratio > ANISO_THRESHOLD and shape_at_target[worst] * ANISO_THRESHOLD < min(
        np.delete(shape_at_target, worst), default=math.inf)
    never_pooled = topo3 is not None and all(p[worst] == 1 for p in topo3["pool_op_kernel_sizes"])
    if spatial_dims is None:
        dims = 2 if data_dims == 2 or (aniso and never_pooled) else 3
        why["spatial_dims"] = (
            "2D images" if data_dims == 2 else
            f"very anisotropic (ratio {ratio:.3g}, {shape_at_target[worst]:g} slices at target spacing): a 3D "
            f"network could not pool axis {worst} once, so 2D slices along it" if dims == 2 else
            "3D: the 3D network pools every axis at least once" + (f" (spacing ratio {ratio:.3g})" if aniso else ""))
    else:
        dims = int(spatial_dims)
        why["spatial_dims"] = f"--spatial-dims {dims}"
    slice_axis = worst if dims == 2 and data_dims == 3 else None
    if dims == 3:
        topo = topo3
    else:
        keep = [i for i in range(data_dims) if i != slice_axis]
        topo = plan_topology([spacing[i] for i in keep], [shape_at_target[i] for i in keep], num_classes,
                             num_cases, gb, base, max2)
    assert topo is not None

    pools, kernels = topo["pool_op_kernel_sizes"], topo["conv_kernel_sizes"]
    if device == "cpu":  # strided first stage: nnU-Net's stages 1.. then a stride-1 bottleneck
        strides, kernel_size = pools[1:] + [[1] * dims], kernels[1:] + [[3] * dims]
        filters = topo["features"][: len(strides)]
        why["network"] = ("cpu: half nnU-Net's widths and a strided first stage (as the hand-tuned bundles: no wide "
                          "block at full resolution), nnU-Net's strides shifted up one level, stride-1 bottleneck")
    else:
        strides, kernel_size, filters = pools, kernels, topo["features"]
        why["network"] = "gpu: nnU-Net's PlainConvUNet widths (32 doubling to 320/512) and strides"
    why["strides"] = ("nnU-Net's get_pool_and_conv_props: an axis pools while at least 8 voxels long and within "
                      "2x of the finest spacing, so coarse axes start pooling later (anisotropic first strides)")
    median = [float(v) for v in shape_at_target]
    why["patch_size"] = (
        f"nnU-Net: {_INITIAL_EDGE[dims]}^{dims} voxels shaped by the spacing, clipped to the median shape at "
        f"target spacing {median}, padded to the strides; {topo['feature_map_voxels']:.3g} feature-map voxels "
        f"within the {gb:g} GB budget ({topo['budget_voxels']:.3g})")
    why["batch_size"] = (f"nnU-Net: {topo['batch_from_memory']} from the memory budget, "
                         f"{topo['batch_from_coverage']} covers 5% of the dataset's voxels; the smaller, at least "
                         f"{_MIN_BATCH}")

    norm, channels, why["normalization"] = _normalization(fp)
    classes = fp.get("case_classes") or []
    if classes:
        cls_mode, num_cls = "case", max(max(classes) + 1, 2)
        why["heads"] = (f"case labels in dataset.json ({fp['num_with_class']} cases, classes {classes}): cls head in "
                        "'case' mode; boundary for every foreground class")
    else:
        cls_mode, num_cls = "presence", num_classes - 1
        why["heads"] = ("no case labels: cls head in 'presence' mode (one logit per foreground class); boundary "
                        "for every foreground class")
    heads = ["seg", "cls", "boundary"]
    covers = all(p >= m for p, m in zip(topo["patch_size"], [shape_at_target[i] for i in range(data_dims)
                                                              if i != slice_axis], strict=True))
    pipeline: dict[str, Any] = {
        "spatial_dims": dims, "num_classes": num_classes, "patch_size": topo["patch_size"],
        "spacing": [round(v, 6) for v in spacing],
        **norm, "cls_mode": cls_mode, "boundary": True,
        "samples_per_volume": 1 if covers else 2, "pos_fraction": 0.5,
    }
    if slice_axis is not None:
        pipeline["slice_axis"] = slice_axis
    network_args: dict[str, Any] = {
        "spatial_dims": dims, "in_channels": int(fp["num_channels"]), "num_classes": num_classes,
        "filters": filters, "strides": strides, "kernel_size": kernel_size,
        **({"top_filters": max(4, filters[0] // 2)} if device == "cpu" else {}),
        "heads": heads, "num_cls_outputs": int(num_cls), "deep_supervision": False,
        "channels_last": device == "cpu",
    }
    summary = {k: v for k, v in fp.items() if k not in ("shapes", "spacings")}
    total = sum(fp["label_voxels"].values()) or 1
    summary["label_frequencies"] = {fp["label_names"].get(k, k): n / total for k, n in fp["label_voxels"].items()}
    summary["median_shape_at_target"] = [float(v) for v in shape_at_target]
    summary["spacing_p10"] = [float(v) for v in np.percentile(np.asarray(fp["spacings"]), 10, axis=0)]
    return {
        "fingerprint": summary,
        "pipeline": pipeline,
        "network_args": network_args,
        "train": {"batch_size": topo["batch_size"], "heads": heads, "num_classes": num_classes, "device": device,
                  "memory_gb": gb, "channel_normalization": channels,
                  "feature_map_voxels": topo["feature_map_voxels"]},
        "why": why,
    }


def plan_dataset(dataset_dir: Path | str, device: str = "gpu", memory_gb: float | None = None,
                 spatial_dims: int | None = None) -> dict[str, Any]:
    """``make_plan(dataset_fingerprint(dataset_dir), ...)``: check, fingerprint once, decide."""
    return make_plan(dataset_fingerprint(dataset_dir), device, memory_gb, spatial_dims)


def write_plans(dataset_dir: Path | str, out_dir: Path | str, device: str = "gpu", memory_gb: float | None = None,
                spatial_dims: int | None = None) -> Path:
    """Plan ``dataset_dir`` and write ``out_dir/configs/plans.json`` (indent 4).

    Raises:
        MedmtlError: ``out_dir`` exists and is not an empty folder (nothing is overwritten), or the dataset is
            refused (``dataset_fingerprint``); nothing is written then.
    """
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MedmtlError(f"{out}: exists and is not an empty folder; plan into a new or empty one")
    plan = plan_dataset(dataset_dir, device, memory_gb, spatial_dims)  # before any write: refusals leave nothing
    return atomic_write_text(out / PLANS_JSON, json.dumps(plan, indent=4, allow_nan=False) + "\n", overwrite=False)


# ---------------------------------------------------------------------------------------------------------
# the planned bundle: the hand-tuned hippocampus bundle's configs with the dataset-specific keys changed

# the template: a bundle for a user-supplied MSD dataset (--dataset_dir, check-data refusals), as a source checkout
# has it next to the package
TEMPLATE_BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "hippocampus_mtl"
_TEMPLATE_FILES = ("train.yaml", "inference.yaml", "evaluate.yaml", "multi_gpu_train.yaml", "logging.conf")
# DICOM Modality of the series `medmtl infer` picks from an export, by dataset.json modality name
_DICOM_MODALITY = {"ct": "CT", "mr": "MR", "mri": "MR", "t1": "MR", "t1w": "MR", "t2": "MR", "t2w": "MR",
                   "flair": "MR", "adc": "MR", "dwi": "MR", "pet": "PT", "us": "US"}


def _replace_block(text: str, key: str, new: str, where: str) -> str:
    """Replace the top-level yaml item ``key`` (its line and the indented lines under it) by ``new``."""
    pattern = re.compile(rf"^{re.escape(key)}:.*\n(?:[ \t]+.*\n)*", re.MULTILINE)
    if len(pattern.findall(text)) != 1:
        raise MedmtlError(f"{where}: the template has no single top-level '{key}'; medmtl plan cannot adapt it")
    return pattern.sub(lambda _: new.rstrip("\n") + "\n", text)


def _replace_line(text: str, old: str, new: str, where: str) -> str:
    """Replace the one line containing ``old`` (a template line the generated bundle must not keep)."""
    lines = [i for i, line in enumerate(text.splitlines(keepends=True)) if old in line]
    if len(lines) != 1:
        raise MedmtlError(f"{where}: the template has {len(lines)} lines with {old!r}; medmtl plan cannot adapt it")
    out = text.splitlines(keepends=True)
    out[lines[0]] = new + "\n" if new else ""
    return "".join(out)


def _body(text: str) -> str:
    """The template config without its header comment (everything before the first item)."""
    match = re.search(r"^[^#\s]", text, re.MULTILINE)
    return text[match.start():] if match else text


def _yaml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid YAML double-quoted scalar


def _bundle_configs(plan: dict[str, Any], name: str, root: str, dataset_dir: Path, dataset: str,
                    class_names: list[str] | None, template: Path) -> dict[str, str]:
    """The generated bundle's yaml files, by name: the template's with the dataset-specific items changed."""
    src = {f: (template / "configs" / f).read_text(encoding="utf-8") for f in _TEMPLATE_FILES}
    where = str(template / "configs")
    run = f"python -m monai.bundle run training --config_file {root}/configs/train.yaml"
    train = _body(src["train.yaml"])
    # as the hand-written bundles: the bundle's path when it exists from where the run starts, else "."
    root_expr = f"${root!r} if os.path.isdir({root!r}) else '.'"
    train = _replace_block(train, "bundle_root", f"bundle_root: {_yaml_str(root_expr)}", where)
    train = _replace_block(train, "dataset_dir", f"dataset_dir: {_yaml_str(str(dataset_dir))}  # the planned one",
                           where)
    train = _replace_block(train, "num_classes", "num_classes: \"$@plans['pipeline']['num_classes']\"", where)
    train = _replace_block(train, "experiment_name", f"experiment_name: {_yaml_str(name)}", where)
    train = _replace_block(train, "data_help", "data_help: " + _yaml_str(
        f"this bundle was planned on {dataset_dir} (medmtl plan): pass an MSD folder with the same labels and "
        "channels with --dataset_dir /path/to/dataset"), where)
    train = re.sub(r"^  dataset: .*$", f"  dataset: {_yaml_str(dataset)}", train, count=1, flags=re.MULTILINE)
    train = _replace_line(train, "  # fold 0 of 5 with seed 0", "", where)
    train = _replace_line(train, "  patch_size: \"$@plans['pipeline']['patch_size']\"",
                          "  patch_size: \"$@plans['pipeline']['patch_size']\"", where)
    train = _replace_line(train, "  cls_mode: \"$@plans['pipeline']['cls_mode']\"",
                          "  cls_mode: \"$@plans['pipeline']['cls_mode']\"", where)
    train = (f"# Multi-task training on {dataset}, planned by `medmtl plan` (configs/plans.json; docs/README.md says\n"
             f"# what was planned and why). From the folder above the bundle:\n#\n#   {run}\n"
             "#   ... --max_epochs 2 --output_dir X --fold 1 --dataset_dir D       (overrides)\n#\n"
             "# Everything the run writes goes under output_dir (default: this bundle's models/ and eval/); a run\n"
             "# resumes from models/last.pt when it exists (--resume false starts over).\n\n" + train)

    infer = _body(src["inference.yaml"])
    infer = _replace_block(infer, "num_classes", "num_classes: \"$@plans['pipeline']['num_classes']\"", where)
    infer = _replace_block(infer, "class_names", "class_names: " + (
        json.dumps(class_names) + "  # dataset.json \"classes\"" if class_names else "null"), where)
    infer = (f"# Inference with the bundle planned on {dataset}: a NIfTI file, a folder of NIfTI files, one DICOM\n"
             "# series or a whole scanner export (series chosen by metadata.json \"input_series\").\n#\n"
             f"#   medmtl infer <input> --bundle {root} --output out/\n#\n"
             "# Self-contained: no dataset is read; patch size, spacing, normalisation and network come from\n"
             "# configs/plans.json, which train.yaml reads too.\n\n" + infer)

    configs = {"train.yaml": train, "inference.yaml": infer, "logging.conf": src["logging.conf"]}
    for f in ("evaluate.yaml", "multi_gpu_train.yaml"):
        text = src[f].replace(str(template.relative_to(template.parents[1])), root)
        configs[f] = re.sub(r"^#\s+--dataset_dir \S*Task04\S*\n", "", text, flags=re.MULTILINE)
    configs["multi_gpu_train.yaml"] = configs["multi_gpu_train.yaml"].replace("\" \\\n", "\"\n")
    # nothing of the template's dataset may remain; the new dataset's own names (Task04 planned again) may
    own = [str(dataset_dir), root, name, dataset, *(class_names or [])]
    for f, text in configs.items():
        for word in sorted(filter(None, own), key=len, reverse=True):
            text = re.sub(re.escape(word), "", text, flags=re.IGNORECASE)
        left = re.search(r".*(task04|hippocamp|anterior).*", text, re.IGNORECASE)
        if left:
            raise MedmtlError(f"{where}/{f}: template line not adapted to the new dataset: {left.group(0).strip()!r}")
    return configs


def _metadata(plan: dict[str, Any], name: str, dataset: str, meta: dict, template: Path) -> str:
    """metadata.json: the template's, with the dataset's name, channels, labels and shapes."""
    md = json.loads((template / "configs" / "metadata.json").read_text(encoding="utf-8"))
    pipe, net, fp = plan["pipeline"], plan["network_args"], plan["fingerprint"]
    labels = {str(k): v for k, v in sorted(fp["label_names"].items(), key=lambda kv: int(kv[0]))}
    channels = fp["channel_names"]
    modalities = sorted({_DICOM_MODALITY.get(c.casefold(), "") for c in channels} - {""})
    strides = [[s] * net["spatial_dims"] if isinstance(s, int) else s for s in net["strides"]]
    divisor = [math.prod(s[i] for s in strides) for i in range(net["spatial_dims"])]
    shape = [f"{d}*n+{d}" for d in divisor]
    label_text = ", ".join(f"{k} {v}" for k, v in labels.items())
    md.update(
        version="0.1.0",
        changelog={"0.1.0": f"planned by medmtl plan on {dataset}"},
        name=name,
        task=f"Multi-task segmentation of {dataset}: {', '.join(list(labels.values())[1:])}",
        description=(f"A {pipe['spatial_dims']}D U-Net with segmentation, classification ({pipe['cls_mode']}) and "
                     f"boundary heads, planned by `medmtl plan` on {dataset} ({fp['num_cases']} training cases): "
                     "configs/plans.json holds the plan, docs/README.md the reasons."),
        data_source=str(meta.get("reference") or meta.get("description") or dataset),
        image_classes=f"{len(channels)} channel(s): {', '.join(channels)}; normalisation {pipe['normalization']}",
        label_classes=f"single channel: {label_text}",
        pred_classes=f"{len(labels)} channels of segmentation logits: {', '.join(labels.values())}",
        intended_use="Research; trained on a user-supplied dataset; not for clinical use",
        input_series={"modality": modalities[0]} if len(modalities) == 1 else {},
    )
    md.pop("eval_metrics", None)
    fmt = md["network_data_format"]
    fmt["inputs"]["image"].update(
        format="hounsfield" if modalities == ["CT"] else "magnitude", modality=modalities[0] if modalities else "n/a",
        num_channels=len(channels), spatial_shape=shape, channel_def={str(i): c for i, c in enumerate(channels)})
    fmt["outputs"]["pred"].update(num_channels=len(labels), spatial_shape=shape, channel_def=labels)
    return json.dumps(md, indent=4) + "\n"


def _readme(plan: dict[str, Any], name: str, dataset: str, dataset_dir: Path, root: str) -> str:
    """docs/README.md: what was planned and why, and how to train, evaluate and run it."""
    pipe, net, fp, why = plan["pipeline"], plan["network_args"], plan["fingerprint"], plan["why"]
    ct = (f", window {[round(v, 1) for v in pipe['ct_window']]}" if pipe.get("ct_window") else "") + (
        f", mean {pipe['ct_stats']['mean']:.4g}, std {pipe['ct_stats']['std']:.4g}" if pipe.get("ct_stats") else "")
    rows = [("spacing (mm)", pipe["spacing"]), ("normalisation", pipe["normalization"] + ct),
        ("spatial dims", pipe["spatial_dims"]), ("patch size", pipe["patch_size"]),
        ("strides", net["strides"]), ("filters", net["filters"]), ("batch size", plan["train"]["batch_size"]),
        ("heads", f"{', '.join(net['heads'])} (cls mode {pipe['cls_mode']})")]
    table = "\n".join(f"| {k} | `{json.dumps(v) if not isinstance(v, str) else v}` |" for k, v in rows)
    reasons = "\n".join(f"- **{k}**: {v}" for k, v in why.items())
    return f"""# {name}

Planned by `medmtl plan` on **{dataset}** (`{dataset_dir}`, {fp['num_cases']} training cases, channels
{', '.join(fp['channel_names'])}), after nnU-Net v2's rules, for a {plan['train']['device'].upper()}
({plan['train']['memory_gb']:g} GB activation budget).

## The plan

`configs/plans.json` holds it: `pipeline` and `network_args` are what `train.yaml`, `evaluate.yaml`,
`multi_gpu_train.yaml` and `inference.yaml` build their blocks from (a key written in a config, or given on the
command line as `--pipeline#patch_size "[...]"`, wins), `train` the other training values, `fingerprint` the
dataset summary it was planned from, `why` the reasons below. Edit `plans.json` to change the plan for training
and inference alike; say why under a `"hand_edits"` key.

| decision | value |
|---|---|
{table}

{reasons}

## Train, evaluate, run

    python -m monai.bundle run training --config_file {root}/configs/train.yaml
    python -m monai.bundle run evaluating --config_file "['{root}/configs/train.yaml','{root}/configs/evaluate.yaml']"
    medmtl infer <input> --bundle {root} --output out/

The training reads `{dataset_dir}` (`--dataset_dir` points it elsewhere) and writes `models/model.pt`.

## License

The configs are Apache-2.0 (`LICENSE`); the dataset and any weights trained on it are under the dataset's own terms.
"""


def write_bundle(dataset_dir: Path | str, out_dir: Path | str, device: str = "gpu", memory_gb: float | None = None,
                 spatial_dims: int | None = None, template: Path | str | None = None) -> Path:
    """Plan ``dataset_dir`` and write a complete bundle into ``out_dir`` (new or empty).

    The bundle has the layout of the hand-written ones: ``configs/`` (``plans.json``, ``metadata.json``,
    ``train.yaml``, ``inference.yaml``, ``evaluate.yaml``, ``multi_gpu_train.yaml``, ``logging.conf``),
    ``docs/README.md`` (the plan and why) and ``LICENSE``. The yaml files are the template bundle's (default
    ``bundles/hippocampus_mtl``) with its dataset-specific items changed; they read ``pipeline`` and
    ``network_args`` from ``plans.json``.

    Args:
        dataset_dir: the MSD folder (holding ``dataset.json``).
        out_dir: the new bundle folder; its name becomes the bundle's name.
        device, memory_gb, spatial_dims: see ``make_plan``.
        template: the bundle to copy the configs from.

    Returns:
        the bundle folder.

    Raises:
        MedmtlError: ``out_dir`` exists and is not an empty folder, the dataset is refused (the checks of
            ``medmtl check-data``), or the template is missing; nothing is written then.
    """
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MedmtlError(f"{out}: exists and is not an empty folder; plan into a new or empty one")
    tpl = Path(template) if template is not None else TEMPLATE_BUNDLE
    if not all((tpl / "configs" / f).is_file() for f in (*_TEMPLATE_FILES, "metadata.json")):
        raise MedmtlError(f"{tpl}: template bundle not found (medmtl plan copies its configs; it needs a source "
                          "checkout of medmtl)")
    folder = Path(dataset_dir).expanduser().absolute()
    plan = plan_dataset(folder, device, memory_gb, spatial_dims)  # refusals before any write
    meta = read_dataset_json(folder)
    dataset = str(meta.get("name") or folder.name)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", out.absolute().name)
    root = out.as_posix()
    classes = meta.get("classes")
    class_names = ([str(classes[k]) for k in sorted(classes, key=int)] if isinstance(classes, dict)
                   and plan["pipeline"]["cls_mode"] == "case" else None)
    plans = {"notes": f"planned by `medmtl plan {folder}` (device {device}); edit to change the plan for training "
                      "and inference alike, and say why under \"hand_edits\"", **plan}
    files = {f"configs/{f}": text for f, text in
             _bundle_configs(plan, name, root, folder, dataset, class_names, tpl).items()}
    files["configs/plans.json"] = json.dumps(plans, indent=4, allow_nan=False) + "\n"
    files["configs/metadata.json"] = _metadata(plan, name, dataset, meta, tpl)
    files["docs/README.md"] = _readme(plan, name, dataset, folder, root)
    files["LICENSE"] = (tpl / "LICENSE").read_text(encoding="utf-8")
    for rel, text in files.items():
        atomic_write_text(out / rel, text, overwrite=False)
    return out
