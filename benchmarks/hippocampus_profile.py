"""Where a CPU training step of the hippocampus network spends its time, and what the alternatives cost.

    python benchmarks/hippocampus_profile.py [--rounds 3] [--iterations 4] [--configs a,b,...] [--no-breakdown]

Two measurements, printed as one JSON document:

1. **Step cost per configuration** (`step_cost`): one training step (forward, loss, backward, AdamW step) on a
   fixed synthetic batch of the Task04 patch (40x56x40; labels are two adjacent boxes, boundary and presence
   targets of matching shape), every configuration in one process, interleaved: `rounds` rounds of
   `iterations` steps each after a warm-up round, median round. Seconds per *sample* (the step divided by the
   batch), so batch sizes compare, and the ratio to the plain MONAI UNet peer (`monai_unet`). The data pipeline
   is timed the same way (`data_*`: the random part of the training transforms of each pipeline, per sample, on
   cached real cases when `--dataset-dir` is given).
2. **Breakdown of the old and new defaults** (`breakdown`): `torch.profiler` over a few steps; self CPU time
   summed by operator family (convolution, transposed convolution, instance norm, activation, concatenation and
   copies, loss, optimizer) and by the resolution the operator ran at (full, 1/2, 1/4, 1/8 of the patch per
   axis, read from the operator's first 5D input).

Timings on a shared machine are disturbed by whatever else runs; interleaving the configurations spreads the
disturbance over all of them, so the *ratios* are what to read.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from monai.losses import DiceCELoss
from monai.networks.nets import UNet

from medmtl.losses import MultiTaskLoss
from medmtl.networks import MultiTaskUNet

PATCH = (40, 56, 40)
OLD_DEFAULT = {"filters": [8, 16, 32, 64], "strides": [1, 2, 2, 2]}
NEW_DEFAULT = {"filters": [16, 32, 64, 128], "strides": [2, 2, 2, 1], "top_filters": 8}
#: name -> (network arguments or "peer", batch size, patch)
CONFIGS: dict[str, tuple[dict | str, int, tuple[int, ...]]] = {
    "monai_unet": ("peer", 4, PATCH),
    "old_default_b2": (OLD_DEFAULT, 2, PATCH),
    "old_default_b4": (OLD_DEFAULT, 4, PATCH),
    "old_contiguous_b2": ({**OLD_DEFAULT, "channels_last": False}, 2, PATCH),
    "old_basic_blocks_b2": ({**OLD_DEFAULT, "res_block": False}, 2, PATCH),
    "old_batch_norm_b2": ({**OLD_DEFAULT, "norm_name": "batch"}, 2, PATCH),
    "old_patch_32x48x32_b2": (OLD_DEFAULT, 2, (32, 48, 32)),
    "old_filters16_b2": ({**OLD_DEFAULT, "filters": [16, 32, 64, 128]}, 2, PATCH),
    "strided_f8_b4": ({"filters": [8, 16, 32, 64], "strides": [2, 2, 2, 1], "top_filters": 4}, 4, PATCH),
    "strided_f16_top4_b4": ({**NEW_DEFAULT, "top_filters": 4}, 4, PATCH),
    "strided_f16_top8_b2": (NEW_DEFAULT, 2, PATCH),
    "strided_f16_top8_b4": (NEW_DEFAULT, 4, PATCH),
    "strided_f16_3levels_b4": ({"filters": [16, 32, 64], "strides": [2, 2, 2], "top_filters": 8}, 4, PATCH),
    "strided_f16_top8_contiguous_b4": ({**NEW_DEFAULT, "channels_last": False}, 4, PATCH),
    "strided_f16_top8_basic_blocks_b4": ({**NEW_DEFAULT, "res_block": False}, 4, PATCH),
    "strided_f16_top8_ds_b4": ({**NEW_DEFAULT, "deep_supervision": True, "deep_supr_num": 2}, 4, PATCH),
}


def synthetic_batch(batch: int, patch: tuple[int, ...]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A fixed batch: noise image, two adjacent boxes as anterior/posterior, matching auxiliary targets."""
    g = torch.Generator().manual_seed(0)
    image = torch.randn(batch, 1, *patch, generator=g)
    label = torch.zeros(batch, 1, *patch)
    x, y, z = (s // 4 for s in patch)
    label[:, :, x:3 * x, y:2 * y, z:3 * z] = 1
    label[:, :, x:3 * x, 2 * y:3 * y, z:3 * z] = 2
    boundary = torch.rand(batch, 2, *patch, generator=g) * 2 - 1
    return image, {"label": label, "boundary": boundary, "cls": torch.ones(batch, 2)}


def build_step(spec: dict | str, batch: int, patch: tuple[int, ...]) -> Callable[[], None]:
    """One training step of a configuration as a closure (network, loss and AdamW built once)."""
    torch.manual_seed(0)
    image, targets = synthetic_batch(batch, patch)
    if spec == "peer":
        net: torch.nn.Module = UNet(3, 1, 3, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2)
        loss_fn: Callable = DiceCELoss(to_onehot_y=True, softmax=True)
        target: object = targets["label"]
    else:
        net = MultiTaskUNet(3, 1, 3, num_cls_outputs=2, **{"channels_last": True, **spec})
        loss_fn = MultiTaskLoss(3, cls_mode="presence")
        target = targets
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(net(image), target)
        loss.backward()
        optimizer.step()

    return step


def data_steps(dataset_dir: Path) -> dict[str, Callable[[], None]]:
    """Per-sample random transforms of the bundle's and the peer's training pipelines on 8 cached cases."""
    from monai.transforms import Compose, Randomizable
    from monai_unet_peer import peer_transforms  # same folder

    from medmtl.data.datalist import load_datalist
    from medmtl.data.pipelines import train_transforms

    items = load_datalist(dataset_dir)[:8]
    pipeline = {"spatial_dims": 3, "num_classes": 3, "patch_size": list(PATCH), "spacing": [1.0, 1.0, 1.0],
                "cls_mode": "presence", "boundary": True, "samples_per_volume": 1, "augment": {"flip_prob": 0.0}}
    chains = {"data_bundle": train_transforms(pipeline), "data_peer": peer_transforms(list(PATCH))}
    steps = {}
    for name, chain in chains.items():
        first_random = chain.get_index_of_first(lambda t: isinstance(t, Randomizable))
        cached = [Compose(chain.transforms[:first_random])(dict(item)) for item in items]
        rand = Compose(chain.transforms[first_random:])
        rand.set_random_state(seed=0)
        counter = iter(range(10**9))

        def step(rand: Compose = rand, cached: list = cached, counter=counter) -> None:
            rand(dict(cached[next(counter) % len(cached)]))

        steps[name] = step
    return steps


def measure(steps: dict[str, Callable[[], None]], rounds: int, iterations: int) -> dict[str, float]:
    """Median seconds per call of each step, the steps interleaved round by round after a warm-up round."""
    seconds: dict[str, list[float]] = defaultdict(list)
    for round_ in range(rounds + 1):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(iterations):
                step()
            if round_:
                seconds[name].append((time.perf_counter() - start) / iterations)
    return {name: statistics.median(v) for name, v in seconds.items()}


_FAMILIES = [
    ("transposed_convolution", ("convolution_backward_transposed", "conv_transpose", "slow_conv_transpose")),
    ("convolution", ("conv", "mkldnn_convolution")),
    ("instance_norm", ("instance_norm", "batch_norm", "native_batch_norm", "_batch_norm")),
    ("activation", ("leaky_relu", "prelu", "relu", "tanh", "sigmoid")),
    ("concat_copy_layout", ("cat", "copy_", "contiguous", "clone", "to", "empty_like", "as_strided", "fill_",
                            "zero_", "_to_copy")),
    ("optimizer", ("_foreach", "adamw", "addcdiv", "lerp", "sqrt")),
]


def _family(op: str) -> str:
    name = op.removeprefix("aten::").lower()
    for family, keys in _FAMILIES:
        if any(k in name for k in keys):
            return family
    return "other (loss, softmax, elementwise)"


def breakdown(spec: dict | str, batch: int, steps: int = 3) -> dict:
    """Self CPU time of one configuration's training step by operator family and by resolution."""
    step = build_step(spec, batch, PATCH)
    step()  # warm-up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            step()
    full = PATCH[0] * PATCH[1] * PATCH[2]
    by_family: dict[str, float] = defaultdict(float)
    by_resolution: dict[str, float] = defaultdict(float)
    for event in prof.key_averages(group_by_input_shape=True):
        self_s = event.self_cpu_time_total / 1e6 / steps
        if self_s <= 0:
            continue
        by_family[_family(event.key)] += self_s
        shapes = [s for s in event.input_shapes if isinstance(s, list) and len(s) == 5]
        if shapes:
            voxels = shapes[0][2] * shapes[0][3] * shapes[0][4]
            level = {1: "full", 8: "1/2", 64: "1/4", 512: "1/8"}.get(round(full / max(voxels, 1)), "other")
        else:
            level = "no 5D input (optimizer, scalars)"
        by_resolution[level] += self_s
    total = sum(by_family.values())
    share = lambda d: {k: round(v / total, 3) for k, v in sorted(d.items(), key=lambda kv: -kv[1])}  # noqa: E731
    return {"profiled_seconds_per_step": round(total, 3), "by_family": share(by_family),
            "by_resolution": share(by_resolution)}


def main() -> None:
    """Measure and print one JSON document."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated of {list(CONFIGS)}")
    parser.add_argument("--dataset-dir", type=Path, help="Task04 folder: also time the data pipelines")
    parser.add_argument("--no-breakdown", action="store_true")
    args = parser.parse_args()
    names = [n for n in args.configs.split(",") if n]
    steps = {n: build_step(*CONFIGS[n]) for n in names}
    if args.dataset_dir:
        steps |= data_steps(args.dataset_dir.resolve())
    median = measure(steps, args.rounds, args.iterations)
    per_sample = {n: median[n] / CONFIGS[n][1] if n in CONFIGS else median[n] for n in median}
    peer = per_sample.get("monai_unet")
    doc: dict = {
        "benchmark": "hippocampus network step cost (synthetic batch, one process, interleaved)",
        "method": f"{args.rounds} rounds of {args.iterations} steps per configuration after a warm-up round, median",
        "torch_threads": torch.get_num_threads(),
        "configs": {n: {"network": CONFIGS[n][0], "batch": CONFIGS[n][1], "patch": CONFIGS[n][2]} for n in names},
        "sec_per_step": {n: round(v, 4) for n, v in median.items()},
        "sec_per_sample": {n: round(v, 4) for n, v in per_sample.items()},
        "ratio_to_monai_unet_per_sample": {n: round(v / peer, 2) for n, v in per_sample.items()} if peer else None,
    }
    print(json.dumps(doc), flush=True)
    if not args.no_breakdown:
        doc["breakdown"] = {"old_default_b2": breakdown(OLD_DEFAULT, 2),
                            "strided_f16_top8_b4": breakdown(NEW_DEFAULT, 4),
                            "monai_unet_b4": breakdown("peer", 4)}
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
