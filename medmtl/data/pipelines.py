"""Train / validation / inference transform chains built from one small pipeline config.

Bundles call these builders instead of repeating transform lists, e.g. in ``train.yaml``::

    pipeline: {spatial_dims: 3, num_classes: 3, spacing: [1, 1, 1], patch_size: [48, 64, 48]}
    train_transforms: "$medmtl.data.pipelines.train_transforms(@pipeline)"

Config keys (``validate_config`` fills the defaults and rejects anything else):

==================== ========== =========================================================================
key                  default    meaning
==================== ========== =========================================================================
spatial_dims         3          dimension of the *network*: 2 or 3
num_classes          (required) segmentation classes including background (>= 2)
patch_size           (required) training patch, ``spatial_dims`` ints (one int is repeated)
spacing              null       target voxel size in mm for the *data* (3 values for volumes, 2 for true 2D
                                images; one number is repeated); null keeps the native spacing
normalization        "zscore"   "zscore" (per image and channel, MR), "ct" (clip to ``ct_window``, scale to
                                [0, 1]; with ``ct_stats``, z-score instead) or "none"
nonzero              false      zscore statistics over nonzero voxels only (and only those are normalized)
ct_window            null       ``[lo, hi]`` in HU, required with normalization "ct"
ct_stats             null       ``{mean: m, std: s}`` in HU, with normalization "ct": after clipping to
                                ``ct_window``, ``(x - m) / s`` with these *dataset* statistics (nnU-Net's
                                CTNormalization: foreground 0.5/99.5 percentiles as the window, foreground
                                mean and std; ``medmtl plan`` fills both) instead of scaling to [0, 1]
cls_mode             null       classification target: "case" (datalist field ``class``), "presence"
                                (foreground classes present in the patch) or null (no "cls" key)
boundary             true       add the signed-distance boundary target ``boundary``
samples_per_volume   2          patches drawn per loaded volume (``num_samples`` of the crop)
pos_fraction         0.5        share of patches centred on a foreground voxel (the rest on background)
augment              true       true (defaults below), false, or a dict overriding some of the defaults
slice_axis           null       with spatial_dims 2 on 3D volumes: the spatial axis (0, 1, 2 after RAS
                                reorientation; 2 = axial) along which 2D slices are taken; null for 2D data
==================== ========== =========================================================================

Augmentation keys (``augment`` dict; a probability of 0 switches that augmentation off), nnU-Net-like but
cheap on CPU: ``flip_prob`` 0.5 (per spatial axis), ``flip_axes`` null (every axis; ``[0]``: left-right only
after RAS reorientation, for anatomy whose labels differ front to back), ``affine_prob`` 0.2 (one rotation + scaling),
``rotate_deg`` 15, ``scale`` 0.15 (factor in 1 +- scale), ``intensity_prob`` 0.15, ``intensity_scale`` 0.1
(multiply by 1 +- it), ``intensity_shift`` 0.1 (add +- it), ``gamma_prob`` 0.15, ``gamma_range`` [0.7, 1.5],
``noise_prob`` 0.1, ``noise_std`` 0.1. Spatial augmentations move image, label and boundary together
(bilinear, nearest, bilinear); intensity augmentations touch the image only.

Order of the training chain: all deterministic transforms first (load, RAS, resample, normalize, pad to
the patch size, boundary target, case class, foreground/background indices), then the random ones (crop,
augmentation, presence class). A ``monai.data.CacheDataset`` caches the result of the deterministic prefix,
so the boundary target is computed once per volume. Padding comes *before* the boundary target: the padded
voxels are background, and the distance map then sees them as such instead of being padded with zeros
(which would mean "on the boundary").

Partially labelled data: a datalist item without a "label" (a case with only a case-level class) is loaded
with a label of ``medmtl.data.transforms.NO_MASK`` (-1) everywhere on the image's grid and a NaN boundary
target, so it collates with the masked cases and the loss and metrics leave its segmentation terms out; its
patches are centred uniformly at random (there is no foreground to aim at). An item without a "class" gets
``cls`` -1 ("case" mode). The share of masked cases per batch is chosen by ``medmtl.data.sampling``.

Outputs per training sample: "image" ``(C_in, *patch)`` float32, "label" ``(1, *patch)`` float32 holding
class indices (-1 for a case without a mask), "boundary" ``(num_classes - 1, *patch)`` float32 when
``boundary`` is on, "cls" when ``cls_mode`` is set, plus the datalist's other fields except "class" (dropped:
it may be absent in some items, which would break collation; "cls" replaces it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from monai.transforms import (
    Compose,
    DeleteItemsd,
    EnsureTyped,
    FgBgToIndicesd,
    Lambda,
    LoadImaged,
    NormalizeIntensityd,
    Orientationd,
    RandAdjustContrastd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
    SqueezeDimd,
)

from medmtl.data.transforms import ClassTargetd, FillMissingLabeld, SignedDistanced, has_mask
from medmtl.errors import MedmtlError
from medmtl.quiet import MONAI_READER_NOISE, silenced

__all__ = ["DEFAULTS", "AUGMENT_DEFAULTS", "validate_config", "train_transforms", "val_transforms",
           "inference_transforms"]

IMAGE, LABEL, BOUNDARY, CLS = "image", "label", "boundary", "cls"
_FG, _BG = "label_fg_indices", "label_bg_indices"

DEFAULTS: dict[str, Any] = {
    "spatial_dims": 3,
    "num_classes": None,
    "patch_size": None,
    "spacing": None,
    "normalization": "zscore",
    "nonzero": False,
    "ct_window": None,
    "ct_stats": None,
    "cls_mode": None,
    "boundary": True,
    "samples_per_volume": 2,
    "pos_fraction": 0.5,
    "augment": True,
    "slice_axis": None,
}
_REQUIRED = ("num_classes", "patch_size")

AUGMENT_DEFAULTS: dict[str, Any] = {
    "flip_prob": 0.5,
    "flip_axes": None,  # spatial axes to mirror (after RAS reorientation: 0 = left-right); None: every axis
    "affine_prob": 0.2,
    "rotate_deg": 15.0,
    "scale": 0.15,
    "intensity_prob": 0.15,
    "intensity_scale": 0.1,
    "intensity_shift": 0.1,
    "gamma_prob": 0.15,
    "gamma_range": [0.7, 1.5],
    "noise_prob": 0.1,
    "noise_std": 0.1,
}
_PROBS = ("flip_prob", "affine_prob", "intensity_prob", "gamma_prob", "noise_prob")


def _fail(key: str, problem: str) -> MedmtlError:
    return MedmtlError(f"pipeline config: '{key}' {problem}")


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    number = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
    return number and math.isfinite(v)


def _vector(key: str, value: Any, n: int, kind: str) -> list:
    """A scalar repeated ``n`` times or a length-``n`` list of positive ints/numbers."""
    items = [value] * n if not isinstance(value, (list, tuple)) else list(value)
    check = _is_int if kind == "int" else _is_num
    if len(items) != n or not all(check(v) and v > 0 for v in items):
        raise _fail(key, f"must be {n} positive {'integers' if kind == 'int' else 'numbers'}, got {value!r}")
    return [int(v) for v in items] if kind == "int" else [float(v) for v in items]


def _validate_augment(value: Any) -> dict[str, Any] | None:
    if value is False or value is None:
        return None
    if value is True:
        return dict(AUGMENT_DEFAULTS)
    if not isinstance(value, Mapping):
        raise _fail("augment", f"must be true, false or a dict, got {value!r}")
    unknown = sorted(set(value) - set(AUGMENT_DEFAULTS))
    if unknown:
        raise _fail("augment", f"has unknown key(s) {unknown} (known: {sorted(AUGMENT_DEFAULTS)})")
    aug = {**AUGMENT_DEFAULTS, **value}
    for k in AUGMENT_DEFAULTS:
        v = aug[k]
        if k == "flip_axes":
            if v is not None and not (isinstance(v, (list, tuple)) and v and all(_is_int(a) and a >= 0 for a in v)
                                      and len(set(v)) == len(v)):
                raise _fail("augment", f"flip_axes must be null or a list of distinct spatial axes, got {v!r}")
            aug[k] = None if v is None else [int(a) for a in v]
        elif k == "gamma_range":
            if not (isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_num(g) and g > 0 for g in v)
                    and v[0] <= v[1]):
                raise _fail("augment", f"gamma_range must be [lo, hi] with 0 < lo <= hi, got {v!r}")
            aug[k] = [float(g) for g in v]
        elif not _is_num(v) or v < 0 or (k in _PROBS and v > 1):
            limit = "a probability in [0, 1]" if k in _PROBS else "a number >= 0"
            raise _fail("augment", f"{k} must be {limit}, got {v!r}")
        else:
            aug[k] = float(v)
    return aug


def _validate_ct_stats(value: Any, normalization: str) -> dict[str, float]:
    """``{mean, std}`` with a finite mean and a positive std, only next to normalization 'ct'."""
    if normalization != "ct":
        raise _fail("ct_stats", "is only used with normalization 'ct'")
    if not (isinstance(value, Mapping) and set(value) == {"mean", "std"} and _is_num(value["mean"])
            and _is_num(value["std"]) and value["std"] > 0):
        raise _fail("ct_stats", f"must be {{mean: m, std: s}} with s > 0 (dataset foreground HU), got {value!r}")
    return {"mean": float(value["mean"]), "std": float(value["std"])}


def validate_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Check a pipeline config and fill in the defaults.

    Args:
        cfg: the pipeline dict (keys in the module docstring).

    Returns:
        a new dict with every key set: ``patch_size``/``spacing`` as lists, ``augment`` a full dict or None.

    Raises:
        MedmtlError: on an unknown key, a missing required key or a bad value.
    """
    if not isinstance(cfg, Mapping):
        raise MedmtlError(f"pipeline config: must be a dict, got {type(cfg).__name__}")
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise MedmtlError(f"pipeline config: unknown key(s) {unknown} (known: {sorted(DEFAULTS)})")
    for key in _REQUIRED:
        if cfg.get(key) is None:
            raise _fail(key, "is required")
    c = {**DEFAULTS, **cfg}

    if c["spatial_dims"] not in (2, 3) or isinstance(c["spatial_dims"], bool):
        raise _fail("spatial_dims", f"must be 2 or 3, got {c['spatial_dims']!r}")
    nd = int(c["spatial_dims"])
    c["spatial_dims"] = nd
    if not _is_int(c["num_classes"]) or c["num_classes"] < 2:
        raise _fail("num_classes", f"must be an integer >= 2 (background included), got {c['num_classes']!r}")
    if c["slice_axis"] is not None:
        if nd != 2:
            raise _fail("slice_axis", "is only used with spatial_dims 2 (a 2D network on 3D volumes)")
        if not _is_int(c["slice_axis"]) or c["slice_axis"] not in (0, 1, 2):
            raise _fail("slice_axis", f"must be 0, 1, 2 or null, got {c['slice_axis']!r}")
    data_dims = 3 if c["slice_axis"] is not None else nd
    c["patch_size"] = _vector("patch_size", c["patch_size"], nd, "int")
    if c["spacing"] is not None:
        c["spacing"] = _vector("spacing", c["spacing"], data_dims, "float")

    if c["normalization"] not in ("zscore", "ct", "none"):
        raise _fail("normalization", f"must be 'zscore', 'ct' or 'none', got {c['normalization']!r}")
    if not isinstance(c["nonzero"], bool):
        raise _fail("nonzero", f"must be true or false, got {c['nonzero']!r}")
    if c["normalization"] == "ct":
        w = c["ct_window"]
        if not (isinstance(w, (list, tuple)) and len(w) == 2 and all(_is_num(v) for v in w) and w[0] < w[1]):
            raise _fail("ct_window", f"must be [lo, hi] with lo < hi for normalization 'ct', got {w!r}")
        c["ct_window"] = [float(v) for v in w]
    elif c["ct_window"] is not None:
        raise _fail("ct_window", "is only used with normalization 'ct'")
    if c["ct_stats"] is not None:
        c["ct_stats"] = _validate_ct_stats(c["ct_stats"], c["normalization"])

    if c["cls_mode"] not in (None, "case", "presence"):
        raise _fail("cls_mode", f"must be 'case', 'presence' or null, got {c['cls_mode']!r}")
    if not isinstance(c["boundary"], bool):
        raise _fail("boundary", f"must be true or false, got {c['boundary']!r}")
    if not _is_int(c["samples_per_volume"]) or c["samples_per_volume"] < 1:
        raise _fail("samples_per_volume", f"must be an integer >= 1, got {c['samples_per_volume']!r}")
    if not _is_num(c["pos_fraction"]) or not 0 <= c["pos_fraction"] <= 1:
        raise _fail("pos_fraction", f"must be a number in [0, 1], got {c['pos_fraction']!r}")
    c["augment"] = _validate_augment(c["augment"])
    if c["augment"] and any(a >= nd for a in c["augment"]["flip_axes"] or []):
        raise _fail("augment", f"flip_axes {c['augment']['flip_axes']} name an axis beyond spatial_dims {nd}")
    return c


def _data_dims(c: Mapping[str, Any]) -> int:
    return 3 if c["slice_axis"] is not None else c["spatial_dims"]


def _load_and_resample(c: Mapping[str, Any], keys: Sequence[str], modes: Sequence[str], load: bool = True,
                       partial: bool = False) -> list:
    """Load channel-first (unless the items hold MetaTensors already), reorient to RAS, resample; invertible
    except for the loading. ``partial``: an item may lack its label (filled with NO_MASK after loading)."""
    dims = _data_dims(c)
    ts: list = []
    if load:
        with silenced(MONAI_READER_NOISE):  # building LoadImaged builds every reader; one warns on any CPU
            ts.append(LoadImaged(keys, ensure_channel_first=True, image_only=True, allow_missing_keys=partial))
    if partial:
        ts.append(FillMissingLabeld(LABEL, IMAGE))
    # labels=None: take the axis labels from the MetaTensor's space (RAS or LPS), MONAI's coming default
    ts.append(Orientationd(keys, axcodes="RAS"[:dims], labels=None))
    if c["spacing"] is not None:
        ts.append(Spacingd(keys, pixdim=c["spacing"], mode=list(modes)))
    return ts


def _normalize(c: Mapping[str, Any], key: str = IMAGE) -> list:
    if c["normalization"] == "zscore":
        return [NormalizeIntensityd(key, nonzero=c["nonzero"], channel_wise=True)]
    if c["normalization"] == "ct":
        lo, hi = c["ct_window"]
        b_min, b_max = 0.0, 1.0
        if c["ct_stats"] is not None:
            # clip-then-z-score is one affine map of the window: [lo, hi] -> [(lo - m) / s, (hi - m) / s],
            # clipped to it; ScaleIntensityRanged does both in one pass
            m, s = c["ct_stats"]["mean"], c["ct_stats"]["std"]
            b_min, b_max = (lo - m) / s, (hi - m) / s
        return [ScaleIntensityRanged(key, a_min=lo, a_max=hi, b_min=b_min, b_max=b_max, clip=True)]
    return []


def _augment(c: Mapping[str, Any], keys: Sequence[str]) -> list:
    aug = c["augment"]
    if aug is None:
        return []
    nd = c["spatial_dims"]
    has_boundary = BOUNDARY in keys
    ts: list = []
    if aug["flip_prob"] > 0:
        axes = range(nd) if aug["flip_axes"] is None else aug["flip_axes"]
        ts += [RandFlipd(keys, prob=aug["flip_prob"], spatial_axis=ax) for ax in axes]
    if aug["affine_prob"] > 0:
        angle = math.radians(aug["rotate_deg"])
        ts.append(
            RandAffined(
                keys,
                prob=aug["affine_prob"],
                rotate_range=[angle] * (3 if nd == 3 else 1),
                scale_range=[aug["scale"]] * nd,
                mode=["bilinear", "nearest"] + (["bilinear"] if has_boundary else []),
                # a boundary map padded with zeros would claim a boundary at the patch edge: replicate instead
                padding_mode=["zeros", "zeros"] + (["border"] if has_boundary else []),
                spatial_size=c["patch_size"],
                cache_grid=True,
            )
        )
    if aug["intensity_prob"] > 0:
        ts += [
            RandScaleIntensityd(IMAGE, factors=aug["intensity_scale"], prob=aug["intensity_prob"]),
            RandShiftIntensityd(IMAGE, offsets=aug["intensity_shift"], prob=aug["intensity_prob"]),
        ]
    if aug["gamma_prob"] > 0:
        ts.append(RandAdjustContrastd(IMAGE, gamma=tuple(aug["gamma_range"]), prob=aug["gamma_prob"]))
    if aug["noise_prob"] > 0:
        ts.append(RandGaussianNoised(IMAGE, prob=aug["noise_prob"], std=aug["noise_std"]))
    return ts


def _first(items: list) -> Any:
    """Unwrap the one-element list a ``num_samples=1`` crop returns (a module function, so it pickles)."""
    return items[0]


def _centres_anywhere_without_mask(d: dict) -> dict:
    """A case without a mask has no foreground to aim at: draw its patch centres from every voxel.

    Without this, ``RandCropByPosNegLabeld`` would warn on every such sample that it cannot balance the
    classes. (A module function, so the chain pickles.)
    """
    label = d[LABEL]
    if not has_mask(label):
        d = dict(d)
        # (MONAI counts NO_MASK voxels as foreground and any padding as background: take them all)
        d[_FG] = d[_BG] = np.arange(int(np.prod(label.shape[1:])))
    return d


def _crop(c: Mapping[str, Any], keys: Sequence[str], size: Sequence[int], num_samples: int,
          cached_indices: bool) -> RandCropByPosNegLabeld:
    pos = float(c["pos_fraction"])
    return RandCropByPosNegLabeld(
        keys,
        label_key=LABEL,
        spatial_size=list(size),
        pos=pos,
        neg=1.0 - pos,
        num_samples=num_samples,
        fg_indices_key=_FG if cached_indices else None,
        bg_indices_key=_BG if cached_indices else None,
    )


def train_transforms(cfg: Mapping[str, Any]) -> Compose:
    """Training chain: deterministic preprocessing, boundary target, patch sampling, augmentation.

    Args:
        cfg: pipeline config (module docstring); validated here.

    Returns:
        a Compose mapping a datalist item to a list of ``samples_per_volume`` patch dicts.

    Raises:
        MedmtlError: on a bad config.
    """
    c = validate_config(cfg)
    nc, patch = c["num_classes"], c["patch_size"]
    keys = [IMAGE, LABEL]
    patch_keys = keys + ([BOUNDARY] if c["boundary"] else [])
    ts = _load_and_resample(c, keys, ["bilinear", "nearest"], partial=True) + _normalize(c)
    if c["cls_mode"] == "case":
        ts.append(ClassTargetd("case"))

    if c["slice_axis"] is None:
        # ---- deterministic, cached per volume
        ts.append(SpatialPadd(keys, spatial_size=patch))
        if c["boundary"]:
            ts.append(SignedDistanced(LABEL, num_classes=nc, output_key=BOUNDARY))
        ts += [FgBgToIndicesd(LABEL), Lambda(_centres_anywhere_without_mask)]
        # ---- random from here on
        ts += [
            _crop(c, patch_keys, patch, c["samples_per_volume"], cached_indices=True),
            DeleteItemsd([_FG, _BG]),
        ]
    else:
        # 2D network on 3D volumes: pad in-plane (cached), pick foreground-biased whole slices, then compute
        # the 2D boundary target on each full slice and crop the in-plane patch
        ax = c["slice_axis"]
        in_plane = list(patch)
        in_plane.insert(ax, -1)  # -1: keep the volume's size along the slice axis
        slab = [-1, -1]
        slab.insert(ax, 1)  # one slice thick, full in-plane extent
        ts += [
            SpatialPadd(keys, spatial_size=in_plane),
            FgBgToIndicesd(LABEL),
            Lambda(_centres_anywhere_without_mask),
            _crop(c, keys, slab, c["samples_per_volume"], cached_indices=True),
            DeleteItemsd([_FG, _BG]),
            SqueezeDimd(keys, dim=ax + 1),
        ]
        if c["boundary"]:
            ts.append(SignedDistanced(LABEL, num_classes=nc, output_key=BOUNDARY))
        ts += [
            FgBgToIndicesd(LABEL),
            Lambda(_centres_anywhere_without_mask),
            _crop(c, patch_keys, patch, 1, cached_indices=True),
            Lambda(_first),
            DeleteItemsd([_FG, _BG]),
        ]

    ts += _augment(c, patch_keys)
    if c["cls_mode"] == "presence":
        ts.append(ClassTargetd("presence", num_classes=nc))
    ts += [DeleteItemsd("class"), EnsureTyped(patch_keys, dtype=np.float32)]
    return Compose(ts)


def val_transforms(cfg: Mapping[str, Any]) -> Compose:
    """Validation chain on whole volumes (the evaluator runs sliding-window or slice inference).

    With ``slice_axis`` set the volumes stay 3D and the boundary target is computed slice by slice, as in
    training. A "presence" class target describes the whole volume.

    Args:
        cfg: pipeline config (module docstring); validated here.

    Returns:
        a Compose mapping a datalist item to one dict: "image", "label" (and "boundary", "cls" as configured).
    """
    c = validate_config(cfg)
    nc = c["num_classes"]
    keys = [IMAGE, LABEL]
    ts = _load_and_resample(c, keys, ["bilinear", "nearest"], partial=True) + _normalize(c)
    out_keys = list(keys)
    if c["boundary"]:
        ts.append(SignedDistanced(LABEL, num_classes=nc, output_key=BOUNDARY, slice_axis=c["slice_axis"]))
        out_keys.append(BOUNDARY)
    if c["cls_mode"] is not None:
        ts.append(ClassTargetd(c["cls_mode"], num_classes=nc))
    ts += [DeleteItemsd("class"), EnsureTyped(out_keys, dtype=np.float32)]
    return Compose(ts)


def inference_transforms(
    cfg: Mapping[str, Any], keys: Sequence[str] = ("image",), load: bool = True
) -> Compose:
    """Invertible preprocessing for inference: RAS reorientation, resampling, normalization.

    Pass the returned Compose to ``monai.transforms.Invertd(keys="pred", transform=..., orig_keys="image")``
    (or call its ``.inverse``) to bring predictions back to the source grid and affine.

    Args:
        cfg: pipeline config (module docstring); validated here.
        keys: ``keys[0]`` is the image (bilinear, normalized); further keys are label maps (nearest, not
            normalized), e.g. ``("image", "label")`` to evaluate against references.
        load: False when the items already hold channel-first MetaTensors (e.g. read from DICOM elsewhere)
            instead of file paths.

    Returns:
        a Compose mapping ``{"image": path_or_metatensor, ...}`` to a dict of MetaTensors that track their
        transforms.
    """
    c = validate_config(cfg)
    keys = list(keys)
    if not keys:
        raise MedmtlError("inference_transforms: keys must name at least the image key")
    modes = ["bilinear"] + ["nearest"] * (len(keys) - 1)
    ts = _load_and_resample(c, keys, modes, load=load)
    ts += _normalize(c, keys[0]) + [EnsureTyped(keys, dtype=np.float32, track_meta=True)]
    return Compose(ts)
