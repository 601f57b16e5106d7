"""Sliding-window inference for the multi-task network: one inferer for validation and for prediction.

MONAI's `sliding_window_inference` blends dict outputs, but every output must be `N x C x spatial`, so the
classification logits `(N, K)` of a window cannot pass through it as they are. The rule used here:

    Each window's K logits are broadcast to a constant map over the window, and these maps are blended
    with the same Gaussian importance weights as the segmentation. The volume's logits are the mean of
    the blended map over all voxels, i.e. a Gaussian- and coverage-weighted mean of the window logits.
    With a single window (patch >= volume) they are exactly that window's logits.

For a 2D network applied to 3D volumes (`slice_axis` set), MONAI's `SliceInferer` runs the same window
logic slice by slice, and the classification map is averaged over the whole volume the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.inferers import Inferer, SliceInferer, SlidingWindowInferer

from medmtl.engine.precision import autocast_forward

_SPATIAL_HEADS = ("seg", "boundary")


def _cls_as_map(network: Callable[..., Any]) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    """Wrap `network` so its (N, K) classification logits come out as a constant (N, K, *spatial) map."""

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        out = network(x, *args, **kwargs)
        if isinstance(out, torch.Tensor):  # a segmentation-only network
            return {"seg": out}
        maps = {k: out[k] for k in _SPATIAL_HEADS if k in out}
        if "cls" in out:
            spatial = x.shape[2:]
            logits = out["cls"].reshape(out["cls"].shape + (1,) * len(spatial))
            maps["cls"] = logits.expand(*out["cls"].shape, *spatial).contiguous()  # blended in place by MONAI
        return maps

    return forward


class MultiHeadInferer(Inferer):
    """Gaussian-blended sliding-window inference for the seg and boundary heads, pooled classification.

    Args:
        roi_size: window size (the training patch size; for `slice_axis`, the 2D slice window).
        sw_batch_size: windows per forward pass.
        overlap: fraction of overlap between windows (nnU-Net uses 0.5).
        mode: blending, "gaussian" (default) or "constant".
        slice_axis: for a 2D network on 3D volumes, the spatial axis (0, 1 or 2) to slice along.
        sw_device: device for the windows (default: the input's).
        device: device where the blended outputs are kept (default: the input's); "cpu" saves GPU memory.
        cpu_bf16: run each window under CPU bfloat16 autocast (see `medmtl.engine.precision`); blending
            stays float32.
        progress: show a progress bar over the windows (settable later through the `progress` attribute).

    Returns (from `__call__`): a dict with "seg" (N, C, *spatial) logits, "boundary" (N, C-1, *spatial)
    when the network has that head, and "cls" (N, K) pooled logits when it has a classification head.
    """

    def __init__(
        self,
        roi_size: Sequence[int] | int,
        sw_batch_size: int = 1,
        overlap: float = 0.5,
        mode: str = "gaussian",
        slice_axis: int | None = None,
        sw_device: torch.device | str | None = None,
        device: torch.device | str | None = None,
        cpu_bf16: bool = False,
        progress: bool = False,
    ) -> None:
        super().__init__()
        kwargs = dict(
            roi_size=roi_size, sw_batch_size=sw_batch_size, overlap=overlap, mode=mode,
            sw_device=sw_device, device=device, progress=progress,
        )
        self.slice_axis = slice_axis
        self.cpu_bf16 = bool(cpu_bf16)
        self._inferer = (
            SlidingWindowInferer(**kwargs) if slice_axis is None else SliceInferer(spatial_dim=slice_axis, **kwargs)
        )

    @property
    def progress(self) -> bool:
        """Whether a progress bar over the windows is shown."""
        return bool(self._inferer.progress)

    @progress.setter
    def progress(self, value: bool) -> None:
        self._inferer.progress = bool(value)

    def __call__(
        self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> dict[str, torch.Tensor]:
        """Run `network` over `inputs` (N, C_in, *spatial) window by window and blend the heads."""
        maps = self._inferer(inputs, _cls_as_map(autocast_forward(network, self.cpu_bf16)), *args, **kwargs)
        out = dict(maps)
        if "cls" in out:
            spatial_dims = tuple(range(2, out["cls"].ndim))
            out["cls"] = out["cls"].mean(dim=spatial_dims)
        return out
