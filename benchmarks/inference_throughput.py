"""Benchmark the Predictor against plain MONAI sliding-window inference and print JSON.

    python benchmarks/inference_throughput.py [--shape 128 128 96] [--repeats 5] [--device auto|cpu|cuda]

Both sides use the phantom bundle's network (configs/inference.yaml, random weights), its patch size, overlap,
sw_batch_size, Gaussian blending and CPU bf16 setting, on the same phantom-like volume (1 mm, RAS):

- "predictor": `Predictor.predict` end to end without TTA: input checks, preprocessing (reorientation,
  z-score), the multi-head sliding window (segmentation, boundary and the pooled classification map),
  softmax, the inverse transforms back to the input grid and the argmax;
- "monai": `monai.inferers.sliding_window_inference` on the already normalized tensor with the same network,
  blending its spatial heads (segmentation and boundary; the (N, K) classification logits cannot pass).

Each is run `--warmup` times untimed (the first calls of a shape select and compile kernels and are many times
slower), then both are timed in turns `--repeats` times; the median wall time is reported with voxels per
second and the throughput ratio predictor / monai (target >= 0.9).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference

from medmtl.data.synthetic import make_case
from medmtl.engine.precision import autocast_forward
from medmtl.inference.batch import build_from_config, load_inference_config

TARGET_RATIO = 0.9
REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE = REPO_ROOT / "bundles" / "phantom_mtl"


def _phantom_volume(shape: tuple[int, int, int], seed: int = 0) -> MetaTensor:
    """A phantom case cropped to `shape` (1 mm, RAS), float32, without channel."""
    case = make_case(np.random.default_rng(seed), size=max(shape))
    image = np.ascontiguousarray(case.image[: shape[0], : shape[1], : shape[2]])
    return MetaTensor(torch.from_numpy(image), affine=torch.eye(4, dtype=torch.float64))


def _time_interleaved(fns: dict, repeats: int, warmup: int, sync) -> dict[str, list[float]]:
    """Wall times of each function, run in turns so that load from other processes hits all of them alike."""
    for _ in range(warmup):  # oneDNN/cuDNN pick and compile kernels on the first calls of each shape
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def _figures(times: list[float], voxels: int) -> dict:
    median = statistics.median(times)
    return {
        "median_s": round(median, 4),
        "voxels_per_s": round(voxels / median),
        "times_s": [round(t, 4) for t in times],
    }


def main() -> None:
    """Time both, print JSON."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shape", type=int, nargs=3, default=[128, 128, 96], help="volume size (default 128 128 96)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per method (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs of each first (default 2)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args()

    config = load_inference_config(BUNDLE, {"ckpt_file": None, "device": args.device, "tta": False})
    predictor, _ = build_from_config(config)
    network, device = predictor.network, predictor.device
    image = _phantom_volume(tuple(args.shape))
    voxels = int(np.prod(args.shape))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # the plain MONAI side gets the same normalized input, already on the device
    normalized = predictor.transforms({"image": image.unsqueeze(0)})["image"].as_tensor()[None].to(device)
    forward = autocast_forward(network, predictor.cpu_bf16)

    def spatial_heads(x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = forward(x)
        return {k: out[k] for k in ("seg", "boundary") if k in out}

    def plain() -> None:
        with torch.no_grad():
            sliding_window_inference(
                normalized, roi_size=predictor.pipeline["patch_size"], sw_batch_size=predictor.sw_batch_size,
                predictor=spatial_heads, overlap=predictor.overlap, mode="gaussian",
            )  # fmt: skip

    fns = {"predictor": lambda: predictor.predict(image, name="benchmark"), "monai": plain}
    times = _time_interleaved(fns, args.repeats, args.warmup, sync)
    ours, theirs = _figures(times["predictor"], voxels), _figures(times["monai"], voxels)
    ratio = ours["voxels_per_s"] / theirs["voxels_per_s"]
    figures = {
        "benchmark": "inference_throughput",
        "bundle": BUNDLE.name,
        "shape": list(args.shape),
        "patch_size": predictor.pipeline["patch_size"],
        "overlap": predictor.overlap,
        "sw_batch_size": predictor.sw_batch_size,
        "mode": "gaussian",
        "device": str(device),
        "cpu_bf16": predictor.cpu_bf16,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "predictor": ours,
        "monai_sliding_window": theirs,
        "throughput_ratio": round(ratio, 3),
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio >= TARGET_RATIO,
    }
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
