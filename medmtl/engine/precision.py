"""Mixed precision on CPU: bfloat16 autocast where the processor computes bf16 natively.

MONAI's engines offer `amp=True` for CUDA only (`torch.autocast("cuda")`). On a CPU with AMX or AVX512-BF16
(e.g. Intel Sapphire Rapids and later) bf16 convolutions run about 2.5-3x faster than float32; elsewhere bf16 is
emulated and slower, so it stays off. Outputs are cast back to float32, so losses, metrics and the blending of
sliding windows run in full precision; backward passes follow the autocast graph as usual.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from monai.inferers import Inferer


def cpu_bf16_supported() -> bool:
    """True when this CPU has native bfloat16 arithmetic (AMX tiles or AVX512-BF16)."""
    cpu = torch.cpu
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def _to_float(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, dict):
        return {k: _to_float(v) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return type(out)(_to_float(v) for v in out)
    return out


def autocast_forward(network: Callable[..., Any], enabled: bool) -> Callable[..., Any]:
    """`network` run under CPU bf16 autocast when `enabled`, with float32 outputs."""
    if not enabled:
        return network

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = network(x, *args, **kwargs)
        return _to_float(out)

    return forward


class CpuAutocastInferer(Inferer):
    """The training-time inferer: a plain forward pass, under CPU bf16 autocast when `enabled`.

    Args:
        enabled: use bf16 autocast; pass `cpu_bf16_supported()` (and False when training on CUDA, where
            the engines' own `amp` applies).
    """

    def __init__(self, enabled: bool = False) -> None:
        super().__init__()
        self.enabled = bool(enabled)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return autocast_forward(network, self.enabled)(inputs, *args, **kwargs)
