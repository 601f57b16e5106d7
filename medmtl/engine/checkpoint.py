"""Checkpoints: atomic writes, safe loading, best-model and resume handlers.

Two files per run, in the bundle's `models/` folder:
- `model.pt`: the network's state dict at the best validation key metric (what inference and export load);
- `last.pt`: everything needed to resume after the last completed epoch (network, optimizer, scheduler,
  loss parameters, trainer epoch/iteration, best metric, MLflow run id, RNG state).

Both are written to a temporary file in the same folder and renamed over the old one, so a crash never
leaves a truncated file. (MONAI's `CheckpointSaver` writes in place and removes the old file first.)
Loading always uses `torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import random
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from medmtl.errors import MedmtlError

logger = logging.getLogger(__name__)


def atomic_torch_save(obj: Any, path: Path | str) -> Path:
    """`torch.save` to a temporary file beside `path`, fsync, then rename it over `path`.

    Returns:
        the path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: Path | str, map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True`; a file carrying arbitrary pickled code is refused.

    Raises:
        MedmtlError: the file is missing, truncated, not a checkpoint, or holds objects other than tensors and
            plain containers.
    """
    path = Path(path)
    if not path.is_file():
        raise MedmtlError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise MedmtlError(
            f"{path}: refused to load: it holds objects other than tensors and plain values "
            f"(weights-only loading; a checkpoint must never run code). Detail: {str(err).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise MedmtlError(f"{path}: not a readable checkpoint ({str(err).splitlines()[0]})") from None


def is_rank0() -> bool:
    """True outside distributed training and on its rank 0: the one process that writes files."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The network inside a DistributedDataParallel wrapper, so `model.pt` keys carry no "module." prefix."""
    return getattr(network, "module", network)


def network_state(checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
    """The network weights in a checkpoint: a bare state dict (`model.pt`) or the "network" entry (`last.pt`)."""
    return checkpoint["network"] if "network" in checkpoint else checkpoint


class RngState:
    """Python, NumPy and torch global RNG state, in a form that loads with `weights_only=True`."""

    def state_dict(self) -> dict[str, Any]:
        """The current global RNG states."""
        _, keys, pos, has_gauss, gauss = np.random.get_state()
        return {
            "torch": torch.get_rng_state(),
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the global RNG states saved by `state_dict`."""
        torch.set_rng_state(state["torch"])
        npst = state["numpy"]
        np.random.set_state(("MT19937", npst["keys"].numpy().astype(np.uint32), npst["pos"],
                             npst["has_gauss"], npst["gauss"]))
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))


class TrainingCheckpoints:
    """Save `model.pt` when the validation key metric improves and `last.pt` after every epoch.

    Args:
        ckpt_dir: folder for the two files.
        network: the network whose weights go into `model.pt`.
        save_dict: objects with `state_dict()` saved in `last.pt` for resuming (network, optimizer,
            lr_scheduler, loss, tracker, ...). This handler adds itself as "checkpoints" (best metric), the RNG
            state as "rng" and, when attached, the trainer as "trainer". Give the same dict (`.save_dict`) to
            MONAI's `CheckpointLoader` to resume.
        key_metric: the evaluator metric to maximize.
    """

    def __init__(
        self,
        ckpt_dir: Path | str,
        network: torch.nn.Module,
        save_dict: dict[str, Any],
        key_metric: str = "val/mean_dice",
        model_file: str = "model.pt",
        last_file: str = "last.pt",
    ) -> None:
        self.ckpt_dir = Path(ckpt_dir)
        self.network = network
        self.key_metric = key_metric
        self.model_path = self.ckpt_dir / model_file
        self.last_path = self.ckpt_dir / last_file
        self.best_metric = -math.inf
        self.best_epoch = 0
        self.save_dict = save_dict
        save_dict.setdefault("checkpoints", self)
        save_dict.setdefault("rng", RngState())

    def attach(self, engine: Engine, evaluator: Engine | None = None) -> None:
        """Attach to the trainer (save `last.pt` each epoch) and/or the evaluator (watch the key metric).

        A MONAI `Evaluator` is recognised, so one instance can sit in a bundle's `train#handlers` and
        `validate#handlers` (after the handler that computes the key metric).
        """
        from monai.engines import Evaluator

        if isinstance(engine, Evaluator):
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.save_if_best)
        else:
            # the trainer's epoch and iteration go into last.pt; added here because the bundle config
            # cannot name the trainer inside a handler that the trainer itself is built with
            self.save_dict.setdefault("trainer", engine)
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.save_last)
            engine.add_event_handler(Events.COMPLETED, self.save_final_if_no_best)
        if evaluator is not None:
            evaluator.add_event_handler(Events.EPOCH_COMPLETED, self.save_if_best)

    def save_if_best(self, evaluator: Engine) -> None:
        """Write `model.pt` when the key metric beats the best so far (every rank tracks it, rank 0 writes)."""
        value = evaluator.state.metrics.get(self.key_metric, float("nan"))
        if isinstance(value, float) and not math.isnan(value) and value > self.best_metric:
            self.best_metric, self.best_epoch = float(value), int(evaluator.state.epoch)
            if not is_rank0():
                return
            atomic_torch_save(_unwrap(self.network).state_dict(), self.model_path)
            logger.info(f"epoch {self.best_epoch}: new best {self.key_metric} {value:.4f}, saved {self.model_path}")

    def save_last(self, trainer: Engine) -> None:
        """Write `last.pt` with every object needed to resume (rank 0 only in a distributed run)."""
        if is_rank0():
            atomic_torch_save({k: v.state_dict() for k, v in self.save_dict.items()}, self.last_path)

    def save_final_if_no_best(self, trainer: Engine) -> None:
        """Without any validation result (e.g. validation never ran), keep the final weights as `model.pt`."""
        if is_rank0() and not self.model_path.exists():
            atomic_torch_save(_unwrap(self.network).state_dict(), self.model_path)
            logger.info(f"no validation result to pick a best model; saved the final weights to {self.model_path}")

    def state_dict(self) -> dict[str, Any]:
        """Best metric and epoch, so a resumed run keeps comparing against them."""
        return {"best_metric": self.best_metric, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the best metric and epoch."""
        self.best_metric = float(state["best_metric"])
        self.best_epoch = int(state["best_epoch"])
