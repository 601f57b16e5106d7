"""Run-wide settings: determinism on CPU, speed on CUDA, and the learning-rate schedule.

Determinism (what `setup_runtime` gives):

- CPU: two runs with the same seed, build and thread count are bit-identical, bf16 autocast included
  (`tests/test_reliability.py::test_two_runs_with_the_same_seed_give_identical_metrics`). MONAI's
  `set_determinism` seeds Python, NumPy and torch; the random transforms have generators of their own, which
  MONAI's DataLoader seeds from torch's when it is built.
- CUDA, by default: fast, not bit-exact. `cudnn.benchmark` picks the fastest convolution algorithms per shape,
  and some of them accumulate with atomic adds, in a run-dependent order: the weight gradients of the
  network's Conv3d and of the ConvTranspose3d that upsamples in the decoder (no interpolation is
  differentiated: the network has no trilinear upsampling, and deep supervision only resizes the target, with
  nearest). The cross-entropy term (NLLLoss) also reduces with atomics on CUDA. Same-seed runs agree to within
  float rounding, which grows over epochs.
- CUDA with `deterministic=True`: deterministic cuDNN algorithms without autotuning, cuBLAS in its
  deterministic workspace mode, and `torch.use_deterministic_algorithms(True, warn_only=True)`, which warns
  (instead of failing) at the ops that have no deterministic CUDA kernel (NLLLoss). Slower.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.utils import set_determinism

from medmtl.errors import show_user_errors_as_one_line

logger = logging.getLogger(__name__)


def setup_runtime(seed: int, deterministic: bool = False) -> None:
    """Seed every RNG; deterministic kernels on CPU, cudnn autotuning (faster, not bit-exact) on CUDA.

    Args:
        seed: the seed of Python, NumPy and torch (and so of the transforms' own generators, which MONAI's
            DataLoader seeds from torch).
        deterministic: on CUDA, trade speed for run-to-run reproducibility (see the module docstring). CPU
            runs are deterministic either way.
    """
    show_user_errors_as_one_line()  # a bad setting found while the bundle config is evaluated: one line
    set_determinism(seed=seed)
    if deterministic:
        # cuBLAS reads this when it starts: set before the first CUDA matrix product
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    elif torch.cuda.is_available():
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True
        logger.info("CUDA: cudnn autotuning on; runs are fast but not bit-exact (deterministic=True for that)")


class PolyLR:
    """nnU-Net's polynomial learning rate, `lr * (1 - progress) ** power`, set at the start of each epoch.

    Progress is `(epoch - 1) / max_epochs`, or, when training under a time budget, the share of the budget
    spent (`medmtl.engine.budget.TimeBudget`), so the rate decays over the time actually available.
    Stateless on purpose: the rate follows from the trainer's epoch and `max_epochs` (or the budget) alone, so a
    run resumed from a checkpoint (whose optimizer state carries the old rate) with the same or a larger
    `max_epochs` gets the right rate. A torch scheduler would restore its old horizon with its state.

    Args:
        optimizer: the optimizer whose parameter groups get the rate.
        learning_rate: the initial rate (epoch 1).
        power: decay exponent (0.9 as in nnU-Net).
        budget: a time budget that drives the decay when it is set.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, learning_rate: float, power: float = 0.9, budget: Any = None
    ) -> None:
        self.optimizer = optimizer
        self.learning_rate = float(learning_rate)
        self.power = power
        self.budget = budget if budget is not None and getattr(budget, "budget_s", None) else None

    def attach(self, engine: Engine) -> None:
        """Set the rate at the start of every epoch of `engine`."""
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def rate(self, epoch: int, max_epochs: int) -> float:
        """The rate for 1-based `epoch` of `max_epochs`."""
        return self.learning_rate * max(0.0, 1.0 - (epoch - 1) / max_epochs) ** self.power

    def __call__(self, engine: Engine) -> None:
        if self.budget is not None:
            lr = self.learning_rate * (1.0 - self.budget.fraction()) ** self.power
        else:
            lr = self.rate(engine.state.epoch, engine.state.max_epochs)
        for group in self.optimizer.param_groups:
            group["lr"] = lr


def log_to_file(path: str) -> str:
    """Also write the root logger's records to `path` (the run's log under its output folder).

    Returns:
        the path, so bundle configs can reference it.
    """
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    if not any(getattr(h, "baseFilename", None) == str(file.resolve()) for h in root.handlers):
        handler = logging.FileHandler(file)
        handler.setFormatter(logging.Formatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s"))
        root.addHandler(handler)
    return str(file)
