"""Run-wide settings: determinism on CPU, speed on CUDA, and the learning-rate schedule."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from monai.utils import set_determinism


def setup_runtime(seed: int) -> None:
    """Seed every RNG; deterministic kernels on CPU, cudnn autotuning (faster, not bit-exact) on CUDA."""
    set_determinism(seed=seed)
    if torch.cuda.is_available():
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True


class PolyLR:
    """nnU-Net's polynomial learning rate, `lr * (1 - (epoch - 1) / max_epochs) ** power`, set each epoch.

    Stateless on purpose: the rate follows from the trainer's epoch and `max_epochs` alone, so a run resumed
    from a checkpoint (whose optimizer state carries the old rate) with the same or a larger `max_epochs`
    gets the right rate. A torch scheduler would restore its old horizon with its state.

    Args:
        optimizer: the optimizer whose parameter groups get the rate.
        learning_rate: the initial rate (epoch 1).
        power: decay exponent (0.9 as in nnU-Net).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, learning_rate: float, power: float = 0.9) -> None:
        self.optimizer = optimizer
        self.learning_rate = float(learning_rate)
        self.power = power

    def attach(self, engine: Engine) -> None:
        """Set the rate at the start of every epoch of `engine`."""
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def rate(self, epoch: int, max_epochs: int) -> float:
        """The rate for 1-based `epoch` of `max_epochs`."""
        return self.learning_rate * max(0.0, 1.0 - (epoch - 1) / max_epochs) ** self.power

    def __call__(self, engine: Engine) -> None:
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
