"""Auxiliary training targets as MONAI dictionary transforms: signed distance maps and class labels.

The boundary head regresses, per foreground class, a normalized signed distance map (SDM) in [-1, 1] with a
tanh output and an L1 loss (Xue et al., AAAI 2020; Ma et al., MIDL 2020). The classification head is trained
either on a case-level label from the datalist or on per-class presence in the sampled patch.

Definitions used throughout (the tests check them against a brute-force computation):

* **boundary** of class ``c``: the voxels labelled ``c`` that have at least one face neighbour (4-connectivity
  in 2D, 6-connectivity in 3D) labelled something else. The image edge is *not* a boundary: what lies beyond
  it is unknown, so a structure touching the edge is not closed there.
* **distance**: the Euclidean distance from a voxel centre to the nearest boundary voxel centre, in mm when
  a spacing is given, else in voxels.
* **signed distance map**: ``-d / max_inside`` inside class ``c`` and ``+d / max_outside`` outside, where the
  maxima are taken over the voxels inside and outside ``c`` in the same image. So the map is exactly 0 on the
  boundary, -1 at the deepest inside voxel and +1 at the farthest outside voxel. A class absent from the label
  gives +1 everywhere ("far outside"); a class filling the whole image gives -1 everywhere.
"""

from __future__ import annotations

import copy
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.utils import convert_to_numpy
from scipy import ndimage

from medmtl.errors import MedmtlError

__all__ = ["NO_MASK", "has_mask", "signed_distance_map", "FillMissingLabeld", "SignedDistanced", "ClassTargetd"]

# Partially labelled data: the label of a case without a mask is filled with this value, so that it
# collates with the masked cases and passes through the spatial transforms; the loss and the metrics leave
# out every sample whose label has a negative value (padding may add zeros around it, never a negative).
NO_MASK = -1


def has_mask(label: np.ndarray | torch.Tensor) -> bool:
    """Whether a (channel-first) label is a real mask, i.e. holds no :data:`NO_MASK` (negative) voxel."""
    lab = label if isinstance(label, torch.Tensor) else torch.as_tensor(np.asarray(label))
    return lab.numel() == 0 or bool(lab.min() >= 0)


def signed_distance_map(
    label: np.ndarray | torch.Tensor, num_classes: int, spacing: Sequence[float] | None = None
) -> np.ndarray:
    """Normalized signed distance map of each foreground class (definitions in the module docstring).

    Args:
        label: spatial integer label array without a channel axis, 2D or 3D (numpy or torch). Values outside
            ``1..num_classes-1`` count as background.
        num_classes: number of segmentation classes including background (>= 2).
        spacing: voxel size per spatial axis (mm), so that distances are physical; None means isotropic 1.

    Returns:
        float32 array ``(num_classes - 1, *label.shape)`` in [-1, 1]: negative inside, 0 on the boundary,
        positive outside.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    lab = convert_to_numpy(label)
    if lab.dtype.kind == "f":
        # labels resampled with nearest interpolation arrive as floats holding integers
        lab = np.rint(lab).astype(np.int64)
    sampling = None
    if spacing is not None:
        sampling = tuple(float(s) for s in spacing)
        if len(sampling) != lab.ndim:
            raise ValueError(f"spacing {sampling} does not match a {lab.ndim}D label")
    structure = ndimage.generate_binary_structure(lab.ndim, 1)
    out = np.empty((num_classes - 1, *lab.shape), dtype=np.float32)
    for c in range(1, num_classes):
        inside = lab == c
        if not inside.any():
            out[c - 1] = 1.0
            continue
        if inside.all():
            out[c - 1] = -1.0
            continue
        # border_value=1: voxels on the image edge are not boundary just because the image ends there
        boundary = inside & ~ndimage.binary_erosion(inside, structure, border_value=1)
        dist = ndimage.distance_transform_edt(~boundary, sampling=sampling).astype(np.float32)
        # one EDT serves both sides: outside, the nearest boundary voxel is also the nearest foreground voxel
        max_in = dist[inside].max()
        max_out = dist[~inside].max()  # > 0: an outside voxel is never a boundary voxel
        sdm = dist / max_out
        if max_in > 0:  # max_in == 0 when every voxel of the class is on its boundary (thin structure)
            sdm[inside] = -dist[inside] / max_in
        else:
            sdm[inside] = 0.0
        out[c - 1] = sdm
    return out


def _source_name(data: Mapping[Hashable, Any], key: Hashable) -> str:
    """A name for error messages: the file the item was loaded from, else the case id, else the key."""
    value = data.get(key)
    if isinstance(value, MetaTensor):
        name = value.meta.get("filename_or_obj")
        if name:
            return str(name)
    return str(data.get("case_id", key))


class FillMissingLabeld(MapTransform):
    """Give a case without a mask a label that says so: :data:`NO_MASK` everywhere, on the image's grid.

    Place it right after loading (``LoadImaged(..., allow_missing_keys=True)``, channel-first) and before
    any spatial transform, so that the filled label is reoriented, resampled, padded and cropped with the
    image like a real one. A case with a label is returned unchanged.
    """

    def __init__(self, label_key: str = "label", image_key: str = "image") -> None:
        """
        Args:
            label_key: the label key, absent or None for a case without a mask.
            image_key: the channel-first image whose grid (and meta data) the filled label takes.
        """
        super().__init__(image_key)
        self.label_key = label_key
        self.image_key = image_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """
        Args:
            data: a sample dict holding the image.

        Returns:
            the dict with ``label_key`` set: the given label, or float32 ``(1, *spatial)`` of :data:`NO_MASK`
            (a MetaTensor with a copy of the image's meta data when the image is one).
        """
        d = dict(data)
        if d.get(self.label_key) is not None:
            return d
        image = d[self.image_key]
        fill = torch.full((1, *image.shape[1:]), float(NO_MASK), dtype=torch.float32)
        if isinstance(image, MetaTensor):
            d[self.label_key] = MetaTensor(
                fill, meta=copy.deepcopy(image.meta), applied_operations=copy.deepcopy(image.applied_operations)
            )
        elif isinstance(image, torch.Tensor):
            d[self.label_key] = fill.to(image.device)
        else:
            d[self.label_key] = fill.numpy()
        return d


class SignedDistanced(MapTransform):
    """Add the normalized signed distance map of a channel-first label as a new key (the boundary target).

    Place it among the deterministic transforms (after resampling and padding, before any random transform)
    so that a ``CacheDataset`` computes it once per volume. The output is a MetaTensor carrying a copy of the
    label's meta data, affine and transform history, so later spatial transforms (crops, flips) that list
    both keys move the map with the label.
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        num_classes: int = 2,
        output_key: str = "boundary",
        use_spacing: bool = True,
        slice_axis: int | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        """
        Args:
            keys: the one label key, channel-first ``(1, *spatial)``.
            num_classes: segmentation classes including background; the output has ``num_classes - 1``
                channels.
            output_key: where the map is stored.
            use_spacing: measure distances in mm using the MetaTensor's ``pixdim`` (ignored for plain arrays).
            slice_axis: spatial axis (0-based, no channel) along which to compute 2D maps slice by slice,
                matching a 2D network trained on slices of 3D volumes; None: one map over all dimensions.
            allow_missing_keys: skip silently when the label key is absent.
        """
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"SignedDistanced takes exactly one label key, got {self.keys}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.num_classes = num_classes
        self.output_key = output_key
        self.use_spacing = use_spacing
        self.slice_axis = slice_axis

    def _map(self, lab: np.ndarray, spacing: Sequence[float] | None) -> np.ndarray:
        if self.slice_axis is None:
            return signed_distance_map(lab, self.num_classes, spacing)
        ax = self.slice_axis
        in_plane = None if spacing is None else [s for i, s in enumerate(spacing) if i != ax]
        maps = [signed_distance_map(s, self.num_classes, in_plane) for s in np.moveaxis(lab, ax, 0)]
        return np.stack(maps, axis=ax + 1)  # +1: the class channel comes first

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """
        Args:
            data: a dict holding the label under ``keys``.

        Returns:
            the dict with ``output_key`` added: float32 ``(num_classes - 1, *spatial)``, a MetaTensor when the
            label is one, else the label's array type.
        """
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            if label.shape[0] != 1:
                name = _source_name(d, key)
                raise MedmtlError(f"{name}: expected a one-channel label, got shape {tuple(label.shape)}")
            lab = convert_to_numpy(label[0])
            if not has_mask(lab):  # no mask, no distance map: NaN, which the loss leaves out
                sdm = np.full((self.num_classes - 1, *lab.shape), np.nan, dtype=np.float32)
                d[self.output_key] = self._like(label, sdm)
                continue
            if lab.size and lab.max() >= self.num_classes:
                raise MedmtlError(
                    f"{_source_name(d, key)}: label values {lab.min():g}..{lab.max():g} are outside "
                    f"0..{self.num_classes - 1} (num_classes={self.num_classes})"
                )
            spacing = None
            if self.use_spacing and isinstance(label, MetaTensor):
                spacing = [float(s) for s in label.pixdim][: lab.ndim]
            d[self.output_key] = self._like(label, self._map(lab, spacing))
        return d

    @staticmethod
    def _like(label: Any, sdm: np.ndarray) -> Any:
        """The map as the label's type: a MetaTensor with copies of its meta data, a tensor, or an array."""
        if isinstance(label, MetaTensor):
            # copies, not shared objects: later transforms append to each tensor's history separately
            return MetaTensor(
                torch.from_numpy(sdm),
                meta=copy.deepcopy(label.meta),
                applied_operations=copy.deepcopy(label.applied_operations),
            )
        if isinstance(label, torch.Tensor):
            return torch.from_numpy(sdm).to(label.device)
        return sdm


class ClassTargetd(MapTransform):
    """Add the classification target under ``output_key`` ("cls").

    Modes:
        * ``"case"``: the case-level class from the datalist (``data["class"]``) as a 0-d ``torch.long``
          tensor; a missing or None class gives -1, meaning "no target" (the loss ignores it).
          Position in the pipeline does not matter.
        * ``"presence"``: float tensor ``(num_classes - 1,)``, 1.0 where foreground class ``c`` occurs in the
          sample's label (NaN for a sample without a mask). Place it after the patch crop so it describes
          the patch the network sees.
    """

    def __init__(
        self,
        mode: str = "case",
        num_classes: int | None = None,
        label_key: str = "label",
        class_key: str = "class",
        output_key: str = "cls",
    ) -> None:
        """
        Args:
            mode: "case" or "presence".
            num_classes: segmentation classes including background; required for "presence".
            label_key: channel-first label read in "presence" mode.
            class_key: datalist field read in "case" mode.
            output_key: where the target is stored.
        """
        if mode not in ("case", "presence"):
            raise ValueError(f"ClassTargetd mode must be 'case' or 'presence', got {mode!r}")
        if mode == "presence" and (num_classes is None or num_classes < 2):
            raise ValueError("ClassTargetd(mode='presence') needs num_classes >= 2")
        # the class field is optional in the datalist, so a missing key is not an error in "case" mode
        super().__init__(class_key if mode == "case" else label_key, allow_missing_keys=mode == "case")
        self.mode = mode
        self.num_classes = num_classes
        self.label_key = label_key
        self.class_key = class_key
        self.output_key = output_key

    def _case_target(self, d: Mapping[Hashable, Any]) -> torch.Tensor:
        value = d.get(self.class_key)
        if value is None:
            return torch.tensor(-1, dtype=torch.long)
        try:
            as_float = float(value.item() if hasattr(value, "item") else value)
        except (TypeError, ValueError):
            as_float = float("nan")
        if isinstance(value, bool) or not as_float.is_integer() or as_float < -1:
            raise MedmtlError(
                f"{d.get('case_id', 'case')}: field '{self.class_key}' must be an integer class >= 0 "
                f"(or -1/absent for none), got {value!r}"
            )
        return torch.tensor(int(as_float), dtype=torch.long)

    def _presence_target(self, d: Mapping[Hashable, Any]) -> torch.Tensor:
        label = torch.as_tensor(d[self.label_key])
        assert self.num_classes is not None
        if not has_mask(label):  # no mask: presence unknown (NaN, left out by the loss and the AUC)
            return torch.full((self.num_classes - 1,), float("nan"))
        present = [bool((label == c).any()) for c in range(1, self.num_classes)]
        return torch.tensor(present, dtype=torch.float32)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """
        Args:
            data: a sample dict.

        Returns:
            the dict with ``output_key`` added (a plain torch tensor, no meta data).
        """
        d = dict(data)
        d[self.output_key] = self._case_target(d) if self.mode == "case" else self._presence_target(d)
        return d
