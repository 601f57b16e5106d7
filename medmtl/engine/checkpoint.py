"""Checkpoints: atomic writes, safe loading, best-model and resume handlers.

Two files per run, in the bundle's `models/` folder:
- `model.pt`: the network's state dict at the best validation key metric (what inference and export load);
- `last.pt`: everything needed to resume after the last completed epoch (network, optimizer, scheduler,
  loss parameters, trainer epoch/iteration, best metric, MLflow run id, RNG state).

Both are written by `medmtl.io.atomic_write` (a temporary file in the same folder, fsynced and renamed over
the old one), so a crash never leaves a truncated file. A save killed halfway leaves only its hidden
temporary file, `.last.pt.<random>.tmp.pt`; the next training removes it.

`TrainingCheckpoints` is not ignite's `Checkpoint` + `DiskSaver(atomic=True)` (nor MONAI's `CheckpointSaver`,
built on them): with fixed file names (`model.pt`, `last.pt`) `Checkpoint` deletes the previous file before it
writes the new one, so a crash in between leaves no `model.pt` at all; `DiskSaver` fsyncs neither the file
nor the folder, and its `tmpXXXX` files cannot be told from other files when a killed save leaves one.
Loading always uses `torch.load(..., weights_only=True)`.

Resuming: bundles give `last.pt` to MONAI's `CheckpointLoader`, which restores everything at the trainer's
`Events.STARTED`. A failure there would surface as a long traceback from inside the engine, so `resume_from`
checks the file first, while the config is resolved (weights-only load, same network, epoch within
`max_epochs`), and stops the run with one short message when it cannot be resumed.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import pickle
import random
import re
import types
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events

from medmtl.errors import MedmtlError
from medmtl.io import atomic_write
from medmtl.io import stale_temp_files as io_stale_temp_files

logger = logging.getLogger(__name__)
NOT_A_CHECKPOINT = "not a PyTorch checkpoint (no saved weights could be read from it)"


def atomic_torch_save(obj: Any, path: Path | str) -> Path:
    """`torch.save` through `medmtl.io.atomic_write`, durable (file and folder fsynced).

    A reader (or a process killed at any moment) sees the old file or the new one, never a partial one.

    Args:
        obj: what to save (state dicts: tensors and plain containers, so that it loads weights-only).
        path: the file to write; its folder is created.

    Returns:
        the path written.
    """
    def save(tmp: Path) -> None:
        with tmp.open("wb") as f:  # a file object, as torch.save was always given here
            torch.save(obj, f)

    return atomic_write(path, save, durable=True)


def stale_temp_files(folder: Path | str, names: tuple[str, ...] = ("model.pt", "last.pt")) -> list[Path]:
    """Temporary files that `atomic_torch_save` leaves when it is killed mid-write (`.<name>.<random>.tmp...`).

    They are never read (loaders open only the final names), so they are harmless, only wasted space.

    Args:
        folder: the checkpoint folder.
        names: the checkpoint file names whose temporary files to look for.

    Returns:
        the matching files, sorted.
    """
    return io_stale_temp_files(folder, names)


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
        reason = _unpickling_reason(err)
        refused = "" if reason == NOT_A_CHECKPOINT else "refused to load: "
        raise MedmtlError(f"{path}: {refused}{reason}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise MedmtlError(f"{path}: not a readable checkpoint ({_first_line(err)})") from None
    except Exception:  # a file that is no checkpoint at all (text, an image) fails deep in pickle with anything
        raise MedmtlError(f"{path}: {NOT_A_CHECKPOINT}") from None


def _first_line(err: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()  # torch colours parts of its messages
    return text.splitlines()[0] if text else type(err).__name__


def _unpickling_reason(err: pickle.UnpicklingError) -> str:
    """Why weights-only loading refused a file, in one line, without torch's advice to load it unsafely."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
    if found:
        return (
            f"it would import `{found.group(1)}`, and a checkpoint may hold only tensors and plain values "
            "(weights-only loading: a checkpoint must never run code)"
        )
    detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(err))
    if detail is None or detail.group(1).startswith("Unsupported operand"):
        # not pickled data at all (a text, image or random file): torch's advice to load it unsafely is wrong
        return NOT_A_CHECKPOINT
    return f"not a weights-only checkpoint ({detail.group(1).strip()})"


def _unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The network inside a DistributedDataParallel wrapper, so `model.pt` keys carry no "module." prefix."""
    return getattr(network, "module", network)


def network_state(checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
    """The network weights in a checkpoint: a bare state dict (`model.pt`) or the "network" entry (`last.pt`)."""
    return checkpoint["network"] if "network" in checkpoint else checkpoint


def _numpy_state(state: tuple) -> dict[str, Any]:
    """A NumPy generator state (`get_state()`) as tensors and numbers (what `weights_only` loading accepts)."""
    _, keys, pos, has_gauss, gauss = state
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
            "gauss": float(gauss)}


def _numpy_tuple(state: Mapping[str, Any]) -> tuple:
    return ("MT19937", state["keys"].numpy().astype(np.uint32), state["pos"], state["has_gauss"], state["gauss"])


# objects whose attributes hold no transform state: tensors, and code (a module would lead everywhere)
_NOT_WALKED = (torch.Tensor, type, types.ModuleType, types.FunctionType, types.MethodType, functools.partial)


def _random_states(obj: Any, seen: set[int] | None = None) -> Iterator[np.random.RandomState]:
    """Every NumPy RandomState reachable from `obj`, in a fixed order.

    Walks lists, tuples and object attributes the way MONAI's `set_rnd` seeds a dataset's transforms (a
    DataLoader calls it), but into Randomizable transforms too: a dictionary transform draws from the
    RandomState of the array transform it wraps (RandCropByPosNegLabeld's cropper), not from its own.
    """
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, np.random.RandomState):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _random_states(item, seen)
    elif hasattr(obj, "__dict__") and not isinstance(obj, _NOT_WALKED):
        for key, value in vars(obj).items():
            if not key.startswith("__"):
                yield from _random_states(value, seen)


class RngState:
    """Python, NumPy and torch global RNG state, in a form that loads with `weights_only=True`.

    With `transforms` (a dataset or transform chain) it also holds the RandomState of every random MONAI
    transform in it: those draw the patches and augmentations, independently of the global generators. The
    trainer's data loader's dataset is used when `TrainingCheckpoints` is attached and none was given, so a
    resumed single-process run draws the same batches as an uninterrupted one.

    Args:
        transforms: a dataset, a `Compose` or any object holding random transforms; None for the global
            generators only.
    """

    def __init__(self, transforms: Any = None) -> None:
        self.transforms = transforms

    def state_dict(self) -> dict[str, Any]:
        """The current RNG states."""
        state = {
            "torch": torch.get_rng_state(),
            "numpy": _numpy_state(np.random.get_state()),
            "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        }
        if self.transforms is not None:
            state["transforms"] = [_numpy_state(r.get_state()) for r in _random_states(self.transforms)]
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the RNG states saved by `state_dict`."""
        torch.set_rng_state(state["torch"])
        np.random.set_state(_numpy_tuple(state["numpy"]))
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        saved = state.get("transforms")
        if self.transforms is None or saved is None:
            return
        targets = list(_random_states(self.transforms))
        if len(targets) != len(saved):  # another transform chain (changed config): keep its fresh seeds
            logger.warning(
                "the checkpoint holds %d transform random states, the transforms have %d: not restored "
                "(the resumed run samples other patches than an uninterrupted one would)",
                len(saved), len(targets),
            )
            return
        for target, value in zip(targets, saved, strict=True):
            target.set_state(_numpy_tuple(value))


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
            rng = self.save_dict.get("rng")
            if isinstance(rng, RngState) and rng.transforms is None:
                rng.transforms = getattr(getattr(engine, "data_loader", None), "dataset", None)
            self.remove_stale_temp_files()
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.save_last)
            engine.add_event_handler(Events.COMPLETED, self.save_final_if_no_best)
        if evaluator is not None:
            evaluator.add_event_handler(Events.EPOCH_COMPLETED, self.save_if_best)

    def remove_stale_temp_files(self) -> list[Path]:
        """Delete the temporary files of saves that were killed halfway (rank 0, before training starts).

        Returns:
            the files removed.
        """
        if idist.get_rank() != 0:
            return []
        stale = stale_temp_files(self.ckpt_dir, (self.model_path.name, self.last_path.name))
        for path in stale:
            path.unlink(missing_ok=True)
        if stale:
            logger.info(
                f"removed {len(stale)} temporary file(s) of an interrupted checkpoint save in {self.ckpt_dir}"
            )
        return stale

    def save_if_best(self, evaluator: Engine) -> None:
        """Write `model.pt` when the key metric beats the best so far (every rank tracks it, rank 0 writes)."""
        value = evaluator.state.metrics.get(self.key_metric, float("nan"))
        if isinstance(value, float) and not math.isnan(value) and value > self.best_metric:
            self.best_metric, self.best_epoch = float(value), int(evaluator.state.epoch)
            if idist.get_rank() != 0:
                return
            atomic_torch_save(_unwrap(self.network).state_dict(), self.model_path)
            logger.info(f"epoch {self.best_epoch}: new best {self.key_metric} {value:.4f}, saved {self.model_path}")

    def save_last(self, trainer: Engine) -> None:
        """Write `last.pt` with every object needed to resume (rank 0 only in a distributed run)."""
        if idist.get_rank() == 0:
            atomic_torch_save({k: v.state_dict() for k, v in self.save_dict.items()}, self.last_path)

    def save_final_if_no_best(self, trainer: Engine) -> None:
        """Without any validation result (e.g. validation never ran), keep the final weights as `model.pt`."""
        if idist.get_rank() == 0 and not self.model_path.exists():
            atomic_torch_save(_unwrap(self.network).state_dict(), self.model_path)
            logger.info(f"no validation result to pick a best model; saved the final weights to {self.model_path}")

    def state_dict(self) -> dict[str, Any]:
        """Best metric and epoch, so a resumed run keeps comparing against them."""
        return {"best_metric": self.best_metric, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the best metric and epoch."""
        self.best_metric = float(state["best_metric"])
        self.best_epoch = int(state["best_epoch"])


# ----------------------------------------------------------------------------------------------------------
# Checks before a bundle loads a checkpoint (run while the config is resolved, outside the engines)

RESUME_HINT = "--resume false starts over (and replaces it), or train into another --output_dir"


def _shape(value: Any) -> str:
    return "x".join(map(str, value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def _network_mismatch(state: Mapping[str, Any], network: torch.nn.Module) -> str | None:
    """How the weights in `state` fail to fit `network`; None when every key and shape matches."""
    expected = _unwrap(network).state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [
        f"{k} {_shape(state[k])} in the file, {_shape(v)} here"
        for k, v in expected.items()
        if k in state and _shape(state[k]) != _shape(v)
    ]
    parts = [
        f"{len(found)} {what} (e.g. {found[0]})"
        for found, what in ((missing, "missing"), (unexpected, "unexpected"), (reshaped, "of another shape"))
        if found
    ]
    return "; ".join(parts) or None


def _checked(path: Path, network: torch.nn.Module | None, need: tuple[str, ...] = ()) -> Mapping[str, Any]:
    """Load `path` weights-only and check its entries and network weights; MedmtlError when unusable."""
    state = load_checkpoint(path)
    if not isinstance(state, Mapping):
        raise MedmtlError(f"{path}: not a checkpoint (it holds a {type(state).__name__}, not a state dict)")
    absent = [k for k in need if k not in state]
    if absent:
        raise MedmtlError(
            f"{path}: not a resume checkpoint (no {', '.join(repr(k) for k in absent)} entry; "
            "a model.pt holds the network weights only)"
        )
    if network is not None:
        _require_fit(path, network_state(state), network)
    return state


def _require_fit(path: Path | str, state: Mapping[str, Any], network: torch.nn.Module) -> None:
    mismatch = _network_mismatch(state, network)
    if mismatch:
        raise MedmtlError(
            f"{path}: holds the weights of another network (other heads, filters or classes?): {mismatch}"
        )


def load_network_weights(path: Path | str, network: torch.nn.Module) -> None:
    """Load the network weights of the checkpoint at `path` (`model.pt` or `last.pt`) into `network`.

    The one check every loader shares (inference, packaging, resuming): every key and shape must match.

    Raises:
        MedmtlError: the file is missing or unreadable, or its weights do not fit `network` (the message
            names the file and the first missing, unexpected or reshaped weight).
    """
    state = network_state(load_checkpoint(path))
    _require_fit(path, state, network)
    _unwrap(network).load_state_dict(state)


def require_checkpoint(
    path: Path | str | Sequence[Path | str], network: torch.nn.Module | None = None
) -> str | list[str]:
    """Check a checkpoint a bundle is about to load; stop the run with one short message if it cannot be used.

    For a config's `CheckpointLoader` (`load_path: "$medmtl.engine.checkpoint.require_checkpoint(@ckpt_file,
    @network)"`): the check runs while the config is resolved, so a bad file ends the run with one line
    instead of a traceback from inside the engine.

    Args:
        path: the checkpoint: a bare network state dict (`model.pt`) or a full one with a "network" entry;
            or a list of them (an ensemble), each checked.
        network: when given, every weight of the checkpoint must fit it (same keys and shapes).

    Returns:
        the path as a string (a list of strings for a list).

    Raises:
        SystemExit: the file is missing, truncated, refused by weights-only loading (it would run code),
            or does not fit the network.
    """
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    try:
        for one in paths:
            _checked(Path(one), network)
    except MedmtlError as err:
        raise SystemExit(f"error: {err}") from None
    return str(path) if isinstance(path, (str, os.PathLike)) else [str(p) for p in paths]


def resume_from(
    path: Path | str, resume: bool, network: torch.nn.Module | None, max_epochs: int | None = None
) -> str | None:
    """The checkpoint a training resumes from, checked before the trainer loads it.

    A bundle passes the result to MONAI's `CheckpointLoader` (`load_path`, disabled when None). Resuming is
    automatic: `last.pt` is used whenever it exists and `resume` is on.

    Args:
        path: the run's `last.pt`.
        resume: the bundle's `resume` flag; off starts over (the old `last.pt` is replaced at the first epoch).
        network: the network being trained (DDP-wrapped or not): the file's weights must fit it.
        max_epochs: the run's epoch limit: a checkpoint beyond it cannot be resumed.

    Returns:
        the path as a string, or None to start a new training.

    Raises:
        SystemExit: `last.pt` exists and `resume` is on, but it is unreadable, refused by weights-only
            loading, written for another network, or past `max_epochs`.
    """
    path = Path(path)
    if not path.is_file():
        return None
    if not resume:
        logger.info(f"{path} exists but resume is off: training starts over and replaces it")
        return None
    try:
        state = _checked(path, network, need=("network", "trainer"))
        trainer = state["trainer"]
        epoch = int(trainer.get("epoch") or trainer["iteration"] // max(int(trainer["epoch_length"]), 1))
    except MedmtlError as err:
        raise SystemExit(f"error: cannot resume: {err}\n{RESUME_HINT}") from None
    except (AttributeError, KeyError, TypeError, ValueError):
        raise SystemExit(f"error: cannot resume: {path}: its 'trainer' entry has no epoch\n{RESUME_HINT}") from None
    if max_epochs is not None and epoch > int(max_epochs):
        raise SystemExit(
            f"error: cannot resume: {path} is at epoch {epoch}, past --max_epochs {max_epochs}; "
            f"pass a larger --max_epochs to train on\n{RESUME_HINT}"
        )
    logger.info(f"resuming from {path} after epoch {epoch}" + (f" of {max_epochs}" if max_epochs else ""))
    return str(path)
