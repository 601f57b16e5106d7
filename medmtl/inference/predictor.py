"""The Predictor: one image in, segmentation (and the auxiliary heads) out, on the image's own grid.

Steps, as in nnU-Net's predictor:

1. check the input (dimensionality, channels, finite values, enough slices for a 3D model);
2. preprocess with the bundle's own invertible chain (`medmtl.data.pipelines.inference_transforms`: RAS
   reorientation, resampling to the training spacing, normalization);
3. run `MultiHeadInferer` (Gaussian-blended sliding window, pooled classification, optional CPU bf16,
   slice by slice for 2D networks);
4. optionally mirror test-time augmentation (TTA): the input is flipped along every combination of the
   mirrored spatial axes (all 2^n, the identity included; n = 3 for a 3D network, the two in-plane axes
   for a 2D network run slice by slice; only the pipeline's ``augment.flip_axes`` when it names some), each
   output is flipped back, and the softmax probabilities, boundary maps and class probabilities (not the
   logits) are averaged over the passes;
5. bring the probabilities and boundary maps back to the input grid by inverting the preprocessing with
   MONAI's `Invertd` (the MetaTensor carries the operations applied), then take the argmax there:
   probabilities are resampled, never labels (nnU-Net does the same). When the preprocessing kept the grid
   (same shape and affine, e.g. an RAS input without resampling) the inverse is the identity and is skipped.

Output voxel (i, j, k) of every map is input voxel (i, j, k); the affine is the input's.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Invertd

from medmtl.data.pipelines import inference_transforms, validate_config
from medmtl.data.plausibility import intensity_problem, spacing_problem
from medmtl.engine.checkpoint import load_network_weights
from medmtl.engine.precision import cpu_bf16_supported
from medmtl.errors import MedmtlError
from medmtl.inference.sliding import MultiHeadInferer

__all__ = ["Prediction", "Predictor", "resolve_device", "mirror_axes_combinations"]

_MAPS = "pred"  # key of the stacked output maps while they are inverted
MAX_RESAMPLED_VOXELS = 512**3  # larger after resampling means a wrong voxel size, not a real scan


@dataclass
class Prediction:
    """What the predictor returns for one image, on the input image's grid.

    Attributes:
        label: uint8 array (*spatial) of class indices; voxel (i, j, k) is input voxel (i, j, k).
        affine: 4x4 float64 voxel-to-world matrix of the input (RAS for MONAI-loaded images).
        probabilities: float32 (C, *spatial) softmax probabilities, or None when not kept.
        boundary: float32 (C - 1, *spatial) signed-distance boundary maps, or None (no such head, not kept).
        class_probabilities: {name: probability}: softmax over the classes ("case" mode) or one sigmoid per
            structure ("presence" mode); empty without a classification head.
        label_names: {index: name} of the foreground labels.
        timings: seconds per stage ("preprocess", "inference", "postprocess").
        warnings: things a reader of the result should know, in words.
    """

    label: np.ndarray
    affine: np.ndarray
    probabilities: np.ndarray | None = None
    boundary: np.ndarray | None = None
    class_probabilities: dict[str, float] = field(default_factory=dict)
    label_names: dict[int, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """The torch device for "auto" (CUDA when available, else CPU), "cpu" or "cuda[:n]".

    Args:
        device: "auto", "cpu", "cuda", "cuda:1", a torch.device, or None (same as "auto").

    Returns:
        the device.

    Raises:
        MedmtlError: CUDA is asked for but not available, or the name is not a device.
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise MedmtlError(f"device {device!r}: not a device (use auto, cpu or cuda)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise MedmtlError(f"device {device!r}: CUDA is not available on this machine (use --device cpu)")
    if resolved.type not in ("cpu", "cuda"):
        raise MedmtlError(f"device {device!r}: only cpu and cuda are supported")
    return resolved


def mirror_axes_combinations(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of `axes`, the empty one (no flip) first: the mirroring passes of TTA.

    Args:
        axes: spatial axes that may be flipped (0-based, without batch and channel).

    Returns:
        2 ** len(axes) tuples of axes.
    """
    return [combo for r in range(len(axes) + 1) for combo in itertools.combinations(axes, r)]


def _argmax_channels(maps: torch.Tensor) -> torch.Tensor:
    """uint8 argmax over the first axis (ties go to the lower index, as `torch.argmax`).

    A running comparison, channel by channel: `torch.argmax` over dim 0 of a (C, *spatial) map is strided
    and about 25x slower on CPU (0.29 s against 0.01 s for 3 x 128 x 128 x 96).
    """
    best = maps[0].clone()
    label = torch.zeros(maps.shape[1:], dtype=torch.uint8, device=maps.device)
    for c in range(1, maps.shape[0]):
        better = maps[c] > best
        label.masked_fill_(better, c)
        torch.maximum(best, maps[c], out=best)
    return label


class Predictor:
    """Sliding-window prediction of a multi-task network on whole images, returned on the input grid.

    Args:
        network: the network (e.g. ``MultiTaskUNet(**network_args)`` as in training); its forward returns a
            dict with "seg" (and optionally "cls", "boundary") or the seg logits tensor.
        pipeline: the bundle's pipeline config (as in train.yaml); sets the preprocessing, the window
            (``patch_size``), ``slice_axis`` for 2D networks and ``cls_mode`` for the class probabilities.
        ckpt_file: weights to load (a ``model.pt`` state dict or a ``last.pt`` with a "network" entry),
            loaded weights-only; None keeps the network's current weights. A list of checkpoints (e.g. the
            five cross-validation folds) makes an ensemble, nnU-Net's way: the softmax probabilities, boundary
            maps and class probabilities of every model (and every TTA pass) are averaged before the argmax.
        label_names: names of the labels, {index: name} (string keys accepted, background may be included).
        class_names: names of the case classes for ``cls_mode`` "case" (default ``class_0``, ...).
        in_channels: image channels the network expects.
        overlap: window overlap (nnU-Net: 0.5).
        sw_batch_size: windows per forward pass.
        mode: window blending, "gaussian" or "constant".
        tta: mirroring test-time augmentation (module docstring).
        device: "auto", "cpu" or "cuda".
        cpu_bf16: bf16 autocast on CPU: True, False, or "auto" (on when the CPU computes bf16 natively).
        min_slices: fewest voxels along every axis of the input for a 3D network (fewer is refused: a window
            would be mostly padding).
        keep_maps: return the probability and boundary maps (False: only the label and the class
            probabilities, which saves memory).
        progress: show a progress bar over the windows.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        pipeline: Mapping[str, Any],
        ckpt_file: str | Path | Sequence[str | Path] | None = None,
        label_names: Mapping[Any, str] | None = None,
        class_names: Sequence[str] | None = None,
        in_channels: int = 1,
        overlap: float = 0.5,
        sw_batch_size: int = 2,
        mode: str = "gaussian",
        tta: bool = False,
        device: str | torch.device | None = "auto",
        cpu_bf16: bool | str = "auto",
        min_slices: int = 8,
        keep_maps: bool = True,
        progress: bool = False,
    ) -> None:
        self.pipeline = validate_config(pipeline)
        self.spatial_dims = self.pipeline["spatial_dims"]
        self.slice_axis = self.pipeline["slice_axis"]
        self.data_dims = 3 if self.slice_axis is not None else self.spatial_dims
        self.num_classes = self.pipeline["num_classes"]
        self.cls_mode = self.pipeline["cls_mode"]
        if not 0 <= float(overlap) < 1:
            raise MedmtlError(f"overlap must be in [0, 1), got {overlap!r}")
        if int(sw_batch_size) < 1:
            raise MedmtlError(f"sw_batch_size must be at least 1, got {sw_batch_size!r}")
        self.overlap = float(overlap)
        self.sw_batch_size = int(sw_batch_size)
        self.tta = bool(tta)
        self.in_channels = int(in_channels)
        self.min_slices = int(min_slices)
        self.keep_maps = bool(keep_maps)
        self.device = resolve_device(device)
        if cpu_bf16 == "auto":
            cpu_bf16 = self.device.type == "cpu" and cpu_bf16_supported()
        self.cpu_bf16 = bool(cpu_bf16) and self.device.type == "cpu"
        self.label_names = self._label_names(label_names)
        self.class_names = list(class_names) if class_names is not None else None
        files = [] if ckpt_file is None else [ckpt_file] if isinstance(ckpt_file, (str, Path)) else list(ckpt_file)
        if ckpt_file is not None and not files:
            raise MedmtlError("ckpt_file: an empty list of checkpoints")
        self.ckpt_file = (str(files[0]) if len(files) == 1 else [str(f) for f in files]) if files else None

        self.network = network
        # one network per checkpoint: copies of the configured one, so every member has the same architecture
        self.networks = [network] + [copy.deepcopy(network) for _ in files[1:]]
        for member, path in zip(self.networks, files, strict=False):
            load_network_weights(Path(path), member)
        for member in self.networks:
            member.to(self.device).eval()

        self.transforms = inference_transforms(self.pipeline, keys=("image",), load=False)
        # bilinear for the probabilities as well: they are resampled, and the argmax is taken afterwards
        self._invert = Invertd(keys=_MAPS, transform=self.transforms, orig_keys="image", nearest_interp=False)
        self.inferer = MultiHeadInferer(
            roi_size=self.pipeline["patch_size"],
            sw_batch_size=self.sw_batch_size,
            overlap=self.overlap,
            mode=mode,
            slice_axis=self.slice_axis,
            cpu_bf16=self.cpu_bf16,
        )
        self.progress = bool(progress)

    # ------------------------------------------------------------------------------------------ set-up

    def _label_names(self, names: Mapping[Any, str] | None) -> dict[int, str]:
        given = {int(k): str(v) for k, v in (names or {}).items()}
        return {c: given.get(c, f"label_{c}") for c in range(1, self.num_classes)}

    @property
    def progress(self) -> bool:
        """Whether a progress bar over the windows is shown."""
        return self._progress

    @progress.setter
    def progress(self, value: bool) -> None:
        self._progress = bool(value)
        self.inferer.progress = self._progress

    def mirror_axes(self) -> tuple[int, ...]:
        """Spatial axes of the preprocessed volume that TTA mirrors: all, or the in-plane ones (2D-on-3D).

        A pipeline trained with ``augment: {flip_axes: [...]}`` mirrors only those network axes: a model never
        shown a flip along an axis (anterior-posterior, say) should not be asked to read one at test time.
        """
        network_axes = [a for a in range(self.data_dims) if a != self.slice_axis]
        trained = (self.pipeline["augment"] or {}).get("flip_axes")
        return tuple(network_axes if trained is None else sorted(network_axes[a] for a in trained))

    def settings(self) -> dict[str, Any]:
        """The settings a report should record.

        Returns:
            a JSON-serializable dict.
        """
        passes = 2 ** len(self.mirror_axes()) if self.tta else 1
        return {
            "checkpoint": self.ckpt_file,
            "device": str(self.device),
            "cpu_bf16": self.cpu_bf16,
            "patch_size": list(self.pipeline["patch_size"]),
            "spacing": self.pipeline["spacing"],
            "overlap": self.overlap,
            "sw_batch_size": self.sw_batch_size,
            "tta": self.tta,
            "tta_passes": passes,
        }

    # ------------------------------------------------------------------------------------------ checks

    def _as_channel_first(self, image: Any, name: str) -> MetaTensor:
        if not isinstance(image, MetaTensor):
            raise MedmtlError(
                f"{name}: expected a MONAI MetaTensor with an affine, got {type(image).__name__}"
            )
        dims = self.data_dims
        if image.ndim == dims:
            image = image.unsqueeze(0)  # one channel; MetaTensor keeps the affine
        elif image.ndim != dims + 1:
            raise MedmtlError(
                f"{name}: a {dims}D image is expected (optionally channel-first), "
                f"got shape {tuple(image.shape)}"
            )
        if image.shape[0] != self.in_channels:
            raise MedmtlError(
                f"{name}: the model expects {self.in_channels} channel(s), the image has {image.shape[0]} "
                f"(shape {tuple(image.shape)})"
            )
        return image

    def _check(self, image: MetaTensor, name: str) -> list[str]:
        """Refuse what cannot be segmented; return warnings for what can but deserves a note."""
        spatial = tuple(int(n) for n in image.shape[1:])
        affine = np.asarray(image.affine, dtype=np.float64)
        if (
            not np.isfinite(affine).all()
            or abs(np.linalg.det(affine[: len(spatial), : len(spatial)])) < 1e-12
        ):
            raise MedmtlError(f"{name}: the image's affine is degenerate (no voxel size or direction)")
        # the rules check-data applies to training data (medmtl.data.plausibility)
        implausible = spacing_problem(np.linalg.norm(affine[: len(spatial), : len(spatial)], axis=0))
        if implausible:
            raise MedmtlError(f"{name}: {implausible}; refusing to segment")
        # one pass over the voxels: NaN and infinities show in the minimum or maximum
        low, high = (float(v) for v in torch.aminmax(image.as_tensor()))
        bad = 0 if np.isfinite(low) and np.isfinite(high) else int((~torch.isfinite(image.as_tensor())).sum())
        implausible = intensity_problem(low, high, bad)
        if implausible:
            raise MedmtlError(f"{name}: {implausible}; refusing to segment")
        if self.slice_axis is None:
            thin = [(axis, n) for axis, n in enumerate(spatial) if n < self.min_slices]
            if thin:
                axis, n = thin[0]
                raise MedmtlError(
                    f"{name}: {n} slice(s) along axis {axis} (shape {spatial}); "
                    f"the {self.spatial_dims}D model needs at least {self.min_slices}"
                )
        target = self.pipeline.get("spacing")
        if target:
            # a bogus voxel size in a header would make resampling allocate a gigantic volume
            spacing = np.linalg.norm(affine[: len(spatial), : len(spatial)], axis=0)
            voxels = float(np.prod(np.asarray(spatial) * spacing / np.asarray(target, dtype=float)))
            if voxels > MAX_RESAMPLED_VOXELS:
                raise MedmtlError(
                    f"{name}: resampling from {np.round(spacing, 3).tolist()} mm to {target} mm would make "
                    f"{voxels:.3g} voxels (limit {MAX_RESAMPLED_VOXELS:.3g}); check the voxel size in its header"
                )
        warnings = []
        if low == high:
            warnings.append("the image is constant: every voxel has the same value")
        return warnings

    # ------------------------------------------------------------------------------------------ predict

    def _forward_passes(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Probabilities, boundary maps and class probabilities averaged over the models and TTA passes."""
        combos = mirror_axes_combinations(self.mirror_axes()) if self.tta else [()]
        passes = [(network, axes) for network in self.networks for axes in combos]
        probs = boundary = cls = None
        for network, axes in passes:
            dims = [a + 2 for a in axes]  # batch and channel first
            inp = torch.flip(x, dims) if dims else x
            out = self.inferer(inp, network)
            seg = torch.softmax(out["seg"].float(), dim=1)
            seg = torch.flip(seg, dims) if dims else seg
            probs = seg if probs is None else probs.add_(seg)
            if "boundary" in out:
                b = out["boundary"].float()
                b = torch.flip(b, dims) if dims else b
                boundary = b if boundary is None else boundary.add_(b)
            if "cls" in out:
                logits = out["cls"].float()
                p = torch.sigmoid(logits) if self.cls_mode == "presence" else torch.softmax(logits, dim=1)
                cls = p if cls is None else cls.add_(p)
        if len(passes) > 1:  # in place: the maps are as large as the volume
            n = float(len(passes))
            probs.div_(n)
            boundary = boundary.div_(n) if boundary is not None else None
            cls = cls.div_(n) if cls is not None else None
        return probs, boundary, cls

    def _class_probabilities(self, cls: torch.Tensor | None) -> dict[str, float]:
        if cls is None:
            return {}
        values = [float(v) for v in cls[0].cpu()]
        if self.cls_mode == "presence":
            names = [self.label_names.get(k + 1, f"label_{k + 1}") for k in range(len(values))]
        else:
            given = self.class_names or []
            names = [given[k] if k < len(given) else f"class_{k}" for k in range(len(values))]
        return dict(zip(names, values, strict=True))

    def predict(self, image: MetaTensor, name: str | None = None) -> Prediction:
        """Segment one image.

        Args:
            image: a MetaTensor (*spatial) or (C, *spatial) with its affine, e.g. from `LoadImage` or
                `medmtl.data.dicom.load_series`.
            name: how error messages and warnings name the input (default: its ``filename_or_obj``).

        Returns:
            the Prediction on the input's grid (see `Prediction`).

        Raises:
            MedmtlError: naming the input, when it has the wrong dimensionality or channel count, NaN/Inf
                values, a degenerate affine or too few slices for a 3D model.
        """
        name = name or str(getattr(image, "meta", {}).get("filename_or_obj", "") or "input")
        image = self._as_channel_first(image, name)
        notes = self._check(image, name)
        input_spatial = tuple(int(n) for n in image.shape[1:])
        input_affine = np.asarray(image.affine, dtype=np.float64).copy()
        timings: dict[str, float] = {}

        t0 = time.perf_counter()
        # no_grad rather than inference_mode: the maps go on through MONAI's inverse transforms afterwards,
        # which may modify tensors in place (not allowed on inference tensors outside inference mode)
        with torch.no_grad():
            data = self.transforms({"image": image.float()})
            pre = data["image"]
            timings["preprocess"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            x = pre.as_tensor()[None].to(self.device)
            probs, boundary, cls = (t.cpu() if t is not None else None for t in self._forward_passes(x))
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            timings["inference"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            probs, boundary = self._to_input_grid(
                pre, probs[0], boundary[0] if boundary is not None else None, input_spatial, input_affine
            )
            label = _argmax_channels(probs).numpy()
            timings["postprocess"] = time.perf_counter() - t0

        if label.shape != input_spatial:  # a broken inverse must never produce a misaligned result
            raise MedmtlError(
                f"{name}: internal error: output shape {label.shape} != input shape {input_spatial}"
            )
        if not label.any():
            notes.append("no foreground voxel was predicted")
        return Prediction(
            label=label,
            affine=input_affine,
            probabilities=probs.numpy() if self.keep_maps else None,
            boundary=boundary.numpy() if (self.keep_maps and boundary is not None) else None,
            class_probabilities=self._class_probabilities(cls),
            label_names=dict(self.label_names),
            timings=timings,
            warnings=notes,
        )

    def _to_input_grid(
        self,
        pre: MetaTensor,
        probs: torch.Tensor,
        boundary: torch.Tensor | None,
        input_spatial: tuple[int, ...],
        input_affine: np.ndarray,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Invert the preprocessing on the stacked maps (one resampling for all of them)."""
        same_grid = tuple(pre.shape[1:]) == input_spatial and np.allclose(
            np.asarray(pre.affine, dtype=np.float64), input_affine, rtol=0, atol=1e-6
        )
        if same_grid:
            # the preprocessing kept the grid (e.g. an RAS input without resampling): voxel (i, j, k) is
            # already input voxel (i, j, k), and the inverse would only copy the maps
            return probs, boundary
        maps = probs if boundary is None else torch.cat([probs, boundary], dim=0)
        stacked = MetaTensor(maps, meta=pre.meta, applied_operations=pre.applied_operations)
        inverted = self._invert({"image": pre, _MAPS: stacked})[_MAPS]
        inverted = torch.as_tensor(inverted.as_tensor() if isinstance(inverted, MetaTensor) else inverted)
        inverted = inverted.float()
        c = probs.shape[0]
        return inverted[:c].contiguous(), (inverted[c:].contiguous() if boundary is not None else None)
