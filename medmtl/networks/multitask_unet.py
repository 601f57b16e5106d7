"""A DynUNet-style U-Net with a segmentation head and optional classification and boundary heads."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from monai.networks.blocks import Convolution
from monai.networks.blocks.dynunet_block import (
    UnetBasicBlock,
    UnetOutBlock,
    UnetResBlock,
    UnetUpBlock,
    get_conv_layer,
)
from monai.networks.nets import DynUNet

__all__ = ["ClassificationHead", "HEAD_NAMES", "MultiTaskUNet", "SegmentationUNet", "check_heads"]

#: every head the network knows; "seg" is the product and is always on.
HEAD_NAMES = ("seg", "cls", "boundary")
_OUTPUTS = ("dict", "seg")


class ClassificationHead(nn.Module):
    """Case-level logits from a feature map: global average and max pooling, concatenated, then a small MLP.

    Args:
        in_channels: channels of the feature map it reads.
        num_outputs: number of logits K.
        hidden: width of the hidden layer.
        dropout: dropout probability before the last layer.
    """

    def __init__(self, in_channels: int, num_outputs: int, hidden: int = 64, dropout: float = 0.2) -> None:
        super().__init__()
        # average pooling says how much of a pattern there is, max pooling whether it is there at all
        self.mlp = nn.Sequential(
            nn.Linear(2 * in_channels, hidden),
            nn.LeakyReLU(0.01, inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_outputs),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Args: features (N, C, *spatial). Returns: logits (N, K)."""
        flat = features.flatten(2)
        return self.mlp(torch.cat([flat.mean(dim=2), flat.amax(dim=2)], dim=1))


class MultiTaskUNet(nn.Module):
    """U-Net encoder/decoder built from MONAI's DynUNet blocks, with up to three heads.

    Heads (``forward`` returns a dict holding only the enabled ones):

    - ``"seg"``: ``(N, num_classes, *spatial)`` logits at input resolution; always on. With
      ``deep_supervision`` and in training mode, ``"seg_ds"`` also holds a list of ``deep_supr_num``
      lower-resolution logits, highest resolution first, each at its own decoder level's size (MONAI's
      ``DeepSupervisionLoss`` downsamples the target to match).
    - ``"cls"``: ``(N, num_cls_outputs)`` logits from the bottleneck (see :class:`ClassificationHead`).
    - ``"boundary"``: ``(N, num_classes - 1, *spatial)`` in ``[-1, 1]`` (tanh), one channel per foreground
      class, from the last decoder features: meant for normalised signed distance maps.

    A head left out of ``heads`` is not built, so it has no parameters. ``output="seg"`` builds a
    :class:`SegmentationUNet`, which returns only the seg logits as a tensor (for ``verify_net_in_out``,
    sliding-window segmentation and TorchScript export); it builds the same modules, so checkpoints move
    between the two with identical keys. Both script with ``torch.jit.script``.

    Layout follows DynUNet: level 0 is the input block, the last level is the bottleneck, and each decoder
    level upsamples with a transposed convolution of kernel and stride ``strides[i]``. Each spatial size of
    the input must be divisible by the product of the strides along that axis (:attr:`size_divisor`), and the
    bottleneck must be larger than one voxel (so at least one axis must be at least twice its divisor).

    **Strided first stage** (``strides[0] > 1``, as in MONAI's ``UNet``): the input block already
    downsamples, so no wide block ever runs at full resolution, where most of the time of a CPU step goes
    (``benchmarks/hippocampus_profile.py``). The decoder ends at level 0's resolution; a *top stage* then
    returns to the input resolution: a transposed convolution (kernel = stride = ``strides[0]``) to
    ``top_filters`` channels, concatenated with the input image (so fine intensity edges reach the heads),
    and one ``kernel_size`` convolution + norm + activation. The seg and boundary heads read the top stage,
    so every head keeps its shape and meaning. With ``strides[0] == 1`` (DynUNet's layout) there is no top
    stage and level 0 runs at full resolution.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input image channels.
        num_classes: segmentation classes including background (at least 2 when "boundary" is on).
        filters: channels per level; only the first ``len(strides)`` are used.
        strides: per level, an int or one int per spatial axis; ``len(strides)`` is the depth.
        kernel_size: an int or a per-axis sequence for all levels, or one such entry per level.
        heads: enabled heads, a subset of ``("seg", "cls", "boundary")`` that contains "seg".
        num_cls_outputs: logits of the classification head (K classes, or C-1 presence logits).
        cls_hidden: hidden width of the classification MLP.
        cls_dropout: dropout in the classification MLP.
        deep_supervision: emit lower-resolution seg logits under "seg_ds" in training mode (decoder levels
            below the output resolution, highest first: with a strided first stage the first is level 0).
        deep_supr_num: how many; at least 1 and less than ``len(strides) - 1``.
        top_filters: channels of the top stage when ``strides[0] > 1`` (default: ``filters[0] // 2``, at
            least 4); not used otherwise.
        norm_name: MONAI norm name or (name, kwargs); defaults to instance norm with affine parameters as
            in DynUNet and nnU-Net.
        act_name: MONAI activation name or (name, kwargs).
        res_block: residual (UnetResBlock) instead of plain (UnetBasicBlock) encoder blocks.
        dropout: dropout probability inside the convolution blocks (None: none).
        channels_last: keep weights and activations channels-last (``channels_last_3d`` / ``channels_last``):
            about 20% faster training on CPU (oneDNN); outputs are returned in the usual contiguous layout and
            state dicts are identical either way.
        output: ``"dict"`` (all enabled heads) or ``"seg"`` (seg logits tensor only: a SegmentationUNet).
    """

    def __new__(cls, *args: Any, output: str = "dict", **kwargs: Any) -> MultiTaskUNet:
        # one class per return type, as TorchScript needs: output="seg" makes the segmentation-only subclass
        if output == "seg" and cls is MultiTaskUNet:
            cls = SegmentationUNet
        return super().__new__(cls)

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        num_classes: int,
        filters: Sequence[int] = (16, 32, 64, 128, 256),
        strides: Sequence[int | Sequence[int]] = (1, 2, 2, 2, 2),
        kernel_size: int | Sequence[int | Sequence[int]] = 3,
        heads: Sequence[str] = HEAD_NAMES,
        num_cls_outputs: int = 2,
        cls_hidden: int = 64,
        cls_dropout: float = 0.2,
        deep_supervision: bool = False,
        deep_supr_num: int = 2,
        norm_name: str | tuple = ("instance", {"affine": True}),
        act_name: str | tuple = ("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
        res_block: bool = True,
        dropout: float | None = None,
        channels_last: bool = False,
        output: str = "dict",
        top_filters: int | None = None,
    ) -> None:
        super().__init__()
        self.heads = check_heads(heads)
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if output not in _OUTPUTS:
            raise ValueError(f"output must be one of {_OUTPUTS}, got {output!r}")
        if num_classes < 2:
            raise ValueError(f"num_classes counts the background and must be at least 2, got {num_classes}")
        depth = len(strides)
        if depth < 2:
            raise ValueError(
                f"strides needs at least 2 levels (input block, bottleneck), got {list(strides)}"
            )
        if len(filters) < depth:
            raise ValueError(f"filters has {len(filters)} entries but strides has {depth} levels")
        strides_axes = [_per_axis(s, spatial_dims, "strides") for s in strides]
        if any(s < 1 for axes in strides_axes for s in axes):
            raise ValueError(f"strides must be positive, got {list(strides)}")
        #: the input block downsamples; a top stage returns to input resolution (see the class docstring)
        self.strided_stem = any(s != 1 for s in strides_axes[0])
        if top_filters is not None and top_filters < 1:
            raise ValueError(f"top_filters must be positive, got {top_filters}")
        kernels = _per_level(kernel_size, depth, spatial_dims)
        if deep_supervision and not 1 <= deep_supr_num < depth - 1:
            raise ValueError(
                f"deep_supr_num must be at least 1 and less than {depth - 1} (decoder levels below the top) "
                f"for {depth} strides, got {deep_supr_num}"
            )

        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.output = "seg" if isinstance(self, SegmentationUNet) else output
        self.deep_supervision = deep_supervision
        self.deep_supr_num = deep_supr_num
        #: each input spatial size must be a multiple of this (e.g. for ``DivisiblePadd(k=...)``)
        self.size_divisor = tuple(int(d) for d in np.prod(strides_axes, axis=0))
        self._divisor = list(self.size_divisor)  # the same as a list: what TorchScript indexes
        filters = [int(f) for f in filters[:depth]]

        conv_block = UnetResBlock if res_block else UnetBasicBlock
        block_args = {
            "spatial_dims": spatial_dims,
            "norm_name": norm_name,
            "act_name": act_name,
            "dropout": dropout,
        }
        # encoder[0] is DynUNet's input block, encoder[-1] its bottleneck
        self.encoder = nn.ModuleList(
            conv_block(
                in_channels=in_channels if i == 0 else filters[i - 1],
                out_channels=filters[i],
                kernel_size=kernels[i],
                stride=strides_axes[i],
                **block_args,
            )
            for i in range(depth)
        )
        # decoder[0] upsamples the bottleneck; decoder[-1] returns to input resolution
        self.decoder = nn.ModuleList(
            UnetUpBlock(
                in_channels=filters[i],
                out_channels=filters[i - 1],
                kernel_size=kernels[i],
                stride=strides_axes[i],
                upsample_kernel_size=strides_axes[i],
                **block_args,
            )
            for i in range(depth - 1, 0, -1)
        )
        head_channels = filters[0]
        if self.strided_stem:
            head_channels = int(top_filters) if top_filters is not None else max(4, filters[0] // 2)
            self.top_up = get_conv_layer(
                spatial_dims, filters[0], head_channels, kernel_size=strides_axes[0], stride=strides_axes[0],
                dropout=dropout, conv_only=True, is_transposed=True,
            )
            self.top_block = Convolution(
                spatial_dims, head_channels + in_channels, head_channels, kernel_size=kernels[0],
                padding=tuple(k // 2 for k in kernels[0]), norm=norm_name, act=act_name, dropout=dropout,
            )
        self.seg_head = UnetOutBlock(spatial_dims, head_channels, num_classes)
        # the decoder outputs below the output resolution: all of them with a top stage, else all but the last
        self._ds_offset = 1 if self.strided_stem else 2
        if deep_supervision:
            # ds_heads[j] reads decoded[-offset - j], which has filters[j + offset - 1] channels
            self.ds_heads = nn.ModuleList(
                UnetOutBlock(spatial_dims, filters[j + self._ds_offset - 1], num_classes)
                for j in range(deep_supr_num)
            )
        if "cls" in self.heads:
            self.cls_head = ClassificationHead(filters[-1], num_cls_outputs, cls_hidden, cls_dropout)
        if "boundary" in self.heads:
            self.boundary_head = UnetOutBlock(spatial_dims, head_channels, num_classes - 1)
        self.apply(DynUNet.initialize_weights)
        # a plain bool, not a torch.memory_format attribute: TorchScript cannot hold the latter
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.to(memory_format=torch.channels_last_3d if spatial_dims == 3 else torch.channels_last)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ValueError naming what is wrong when ``x`` cannot pass through the network.

        Written in the subset of Python that TorchScript compiles, so a scripted network (``model.ts``) refuses
        a bad input with the same message.

        Args:
            x: input batch ``(N, in_channels, *spatial)``.
        """
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(
                f"MultiTaskUNet({self.spatial_dims}D) expects (N, C, {self.spatial_dims} spatial axes), "
                f"got shape {_as_tuple_text([int(s) for s in x.shape])}"
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(f"MultiTaskUNet expects {self.in_channels} input channel(s), got {x.shape[1]}")
        size = [int(s) for s in x.shape[2:]]
        divisor = _as_tuple_text(self._divisor)
        if any([size[i] % self._divisor[i] != 0 for i in range(len(size))]):
            raise ValueError(
                f"input spatial size {_as_tuple_text(size)} is not divisible by {divisor} "
                f"(the product of the strides); pad or crop it, e.g. DivisiblePadd(k={divisor})"
            )
        if all([size[i] == self._divisor[i] for i in range(len(size))]):
            raise ValueError(
                f"input spatial size {_as_tuple_text(size)} leaves a one-voxel bottleneck, which normalisation "
                f"cannot handle; make at least one axis at least twice its divisor {divisor}"
            )

    def _trunk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Encoder and decoder (and the top stage): (features at input resolution, bottleneck, decoder outputs).

        Loops over the ModuleLists by index-free iteration and keeps lists, not slices, so TorchScript
        compiles it.
        """
        if not torch.jit.is_tracing():  # shapes are constants in a trace; the check ran in eager mode
            self.check_input(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d if self.spatial_dims == 3 else torch.channels_last)
        skips: list[torch.Tensor] = []
        out = x
        for block in self.encoder:
            out = block(out)
            skips.append(out)
        bottleneck = skips.pop()  # the last level is the bottleneck, not a skip
        out = bottleneck
        decoded: list[torch.Tensor] = []
        for j, up in enumerate(self.decoder):  # deepest skip first
            out = up(out, skips[-1 - j])
            decoded.append(out)
        if hasattr(self, "top_block"):  # strided first stage: back to input resolution, the image as the skip
            out = self.top_block(torch.cat([self.top_up(out), x], dim=1))
        return out, bottleneck, decoded

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Run the network.

        Args:
            x: ``(N, in_channels, *spatial)``; spatial sizes divisible by :attr:`size_divisor`.

        Returns:
            a dict with "seg", the enabled heads and, in training mode with deep supervision, "seg_ds"
            (a :class:`SegmentationUNet`, i.e. ``output="seg"``, returns the seg logits tensor instead).
        """
        out, bottleneck, decoded = self._trunk(x)
        # outputs leave in the default layout, whatever the internal one: callers may .view() them
        result: dict[str, torch.Tensor | list[torch.Tensor]] = {"seg": self.seg_head(out).contiguous()}
        if hasattr(self, "ds_heads") and self.training:
            # highest resolution first: decoded[-2], decoded[-3], ... (decoded[-1], ... with a top stage)
            result["seg_ds"] = [
                head(decoded[-self._ds_offset - j]).contiguous() for j, head in enumerate(self.ds_heads)
            ]
        if hasattr(self, "cls_head"):
            result["cls"] = self.cls_head(bottleneck)
        if hasattr(self, "boundary_head"):
            result["boundary"] = torch.tanh(self.boundary_head(out)).contiguous()
        return result


class SegmentationUNet(MultiTaskUNet):
    """A :class:`MultiTaskUNet` whose ``forward`` returns only the segmentation logits ``(N, C, *spatial)``.

    What MONAI's bundle tools and the model zoo expect of a bundle's ``network_def`` (``verify_net_in_out``,
    ``ckpt_export``, sliding-window segmentation): one tensor out. It builds the same modules as the
    multi-head network (the auxiliary heads stay, unused), so the same ``model.pt`` loads into either with
    identical state-dict keys. ``MultiTaskUNet(..., output="seg")`` builds one.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Args: x ``(N, in_channels, *spatial)``. Returns: seg logits ``(N, num_classes, *spatial)``."""
        out, _, _ = self._trunk(x)
        return self.seg_head(out).contiguous()


def check_heads(heads: Sequence[str] | str) -> tuple[str, ...]:
    """Validate a head selection.

    Args:
        heads: head names, or one name.

    Returns:
        the heads as a tuple.

    Raises:
        ValueError: an unknown head, or "seg" missing.
    """
    if isinstance(heads, str):  # a lone "seg" from a config would otherwise split into letters
        heads = (heads,)
    heads = tuple(heads)
    unknown = [h for h in heads if h not in HEAD_NAMES]
    if unknown:
        raise ValueError(f"unknown head(s) {unknown}; choose from {HEAD_NAMES}")
    if "seg" not in heads:
        raise ValueError(f"heads must include 'seg' (the product), got {list(heads)}")
    return heads


def _per_axis(value: int | Sequence[int], spatial_dims: int, name: str) -> tuple[int, ...]:
    """One level's kernel or stride as one int per spatial axis."""
    if isinstance(value, int):
        return (value,) * spatial_dims
    value = tuple(int(v) for v in value)
    if len(value) != spatial_dims:
        raise ValueError(f"{name} entry {list(value)} needs {spatial_dims} values, one per spatial axis")
    return value


def _per_level(kernel_size: int | Sequence, depth: int, spatial_dims: int) -> list[tuple[int, ...]]:
    """Kernel sizes for every level.

    As in DynUNet, a sequence with one entry per level is read per level; otherwise an int, or a flat
    sequence with one int per axis, applies to all levels.
    """
    if isinstance(kernel_size, int):
        return [_per_axis(kernel_size, spatial_dims, "kernel_size")] * depth
    if len(kernel_size) == depth:
        return [_per_axis(k, spatial_dims, "kernel_size") for k in kernel_size]
    if all(isinstance(k, int) for k in kernel_size) and len(kernel_size) == spatial_dims:
        return [_per_axis(kernel_size, spatial_dims, "kernel_size")] * depth
    raise ValueError(
        f"kernel_size {list(kernel_size)} is neither one entry per level ({depth}) nor one int per axis"
    )


def _as_tuple_text(values: list[int]) -> str:
    """``[16, 12, 16]`` as ``"(16, 12, 16)"``: Python's tuple text, in code TorchScript compiles."""
    return "(" + ", ".join([str(v) for v in values]) + ")"
