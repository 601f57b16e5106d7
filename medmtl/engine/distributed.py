"""Distributed data-parallel training under torchrun: process group, device, DDP, rank-aware helpers.

`bundles/*/configs/multi_gpu_train.yaml` wires these into a bundle's `train.yaml`:

- `init_distributed` joins the process group torchrun describes (NCCL when CUDA is there, gloo on CPU) and
  `local_device` gives each process its device (`cuda:LOCAL_RANK`, or the CPU);
- `wrap_ddp` wraps the network in `DistributedDataParallel` (`device_ids` only on CUDA);
- `DistributedLossTermsAverager` logs each epoch's loss terms averaged over all ranks' iterations;
- `AverageGradients` averages the gradients of parameters that live outside the DDP-wrapped network (the
  learned task weights of `MultiTaskLoss(weighting="uncertainty")`), as DDP does for the network's own;
- `local_rank0_first` runs a step (phantom generation) on one process per node before the others;
- `all_gather_objects` / `interleave` let `MultiTaskEvaluation` collect every rank's validation cases;
- `per_rank_path` gives each rank its own log file; `check_in_sync` confirms at the end that every rank
  holds the same weights; `shutdown` leaves the process group.

Every helper also works in a plain single process (no process group): rank 0 of a world of 1. Rank, world
size and gathering are `ignite.distributed`'s (it finds the process group torchrun's workers joined).
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import ignite.distributed as idist
import torch
import torch.distributed as dist
from ignite.engine import Engine
from monai.engines.utils import IterationEvents
from torch.nn.parallel import DistributedDataParallel

from medmtl.engine.loss_terms import LossTermsAverager
from medmtl.errors import MedmtlError, show_user_errors_as_one_line

logger = logging.getLogger(__name__)

T = TypeVar("T")

# torchrun sets these for every worker; without them there is no process group to join
_LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def is_distributed() -> bool:
    """True inside an initialized process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank; 0 outside distributed training."""
    return idist.get_rank()


def world_size() -> int:
    """The number of processes; 1 outside distributed training."""
    return idist.get_world_size()


def local_rank() -> int:
    """This process's rank on its node (torchrun's `LOCAL_RANK`); 0 outside torchrun."""
    # Not idist.get_local_rank(): that is 0 until the process group exists, and the device (which
    # init_distributed binds before joining the group) is chosen from it.
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_device() -> torch.device:
    """The device of this process: `cuda:LOCAL_RANK` when CUDA is available, else the CPU."""
    return torch.device(f"cuda:{local_rank()}") if torch.cuda.is_available() else torch.device("cpu")


def init_distributed(backend: str | None = None, timeout_minutes: float = 30.0) -> torch.device:
    """Join the process group that torchrun set up; NCCL on CUDA, gloo on CPU unless `backend` says otherwise.

    On CUDA the process is bound to `cuda:LOCAL_RANK` first, as NCCL collectives (and
    `all_gather_object`) use the current device. Calling it again in an initialized process changes nothing.

    Args:
        backend: "nccl", "gloo" or None (automatic).
        timeout_minutes: how long a collective waits for the other ranks before failing.

    Returns:
        this process's device (`local_device()`).

    Raises:
        MedmtlError: not launched by torchrun (its environment variables are missing), or LOCAL_RANK names
            a GPU that this node does not have. Printed as one line: this is the bundle's first
            `initialize` step, so it installs the one-line error hook that `setup_runtime` would.
    """
    device = local_device()
    if is_distributed():
        return device
    show_user_errors_as_one_line()
    missing = [name for name in _LAUNCHER_VARIABLES if name not in os.environ]
    if missing:
        raise MedmtlError(
            f"multi_gpu_train.yaml must be launched with torchrun (e.g. `torchrun --nproc_per_node=2 -m "
            f"monai.bundle run training ...`); {', '.join(missing)} not set"
        )
    if device.type == "cuda":
        if device.index >= torch.cuda.device_count():
            raise MedmtlError(
                f"LOCAL_RANK {device.index} but this node has {torch.cuda.device_count()} CUDA device(s); "
                "use --nproc_per_node <= the number of GPUs"
            )
        torch.cuda.set_device(device)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    logger.info(f"rank {rank()} of {world_size()} (local rank {local_rank()}): backend {backend}, device {device}")
    return device


def wrap_ddp(module: torch.nn.Module, device: torch.device | str,
             find_unused_parameters: bool = False) -> DistributedDataParallel:
    """Wrap a network (already on `device`) in `DistributedDataParallel`.

    Construction broadcasts rank 0's weights to every rank, so all ranks start from the same network.

    Args:
        module: the network.
        device: its device; `device_ids` is passed for a CUDA device only (DDP requires None on CPU).
        find_unused_parameters: needed only when some iterations leave part of the network out of the loss
            (e.g. a head whose targets can be missing from a whole batch); costs a graph walk per iteration.

    Returns:
        the wrapped network; `.module` is the network itself (what checkpoints and evaluation use).
    """
    device = torch.device(device)
    device_ids = [device] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


class AverageGradients:
    """Average the gradients of parameters outside the DDP-wrapped network across ranks, after each backward.

    DDP averages the gradients of the parameters it wraps. `MultiTaskLoss(weighting="uncertainty")` learns
    one log-variance per task in the loss module, which DDP does not see: without this handler each rank
    would step them with its own gradient and the ranks' task weights would drift apart. Attached to a MONAI
    trainer, it all-reduces those gradients at `IterationEvents.BACKWARD_COMPLETED`, before the optimizer step
    (a parameter without a gradient on one rank counts as zero there, so every rank joins the same
    collective). A no-op with no such parameters or outside distributed training.

    Args:
        parameters: the parameters to keep in step, e.g. `loss.parameters()`.
    """

    def __init__(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        self.parameters = [p for p in parameters if p.requires_grad]

    def attach(self, engine: Engine) -> None:
        """Run after every backward pass of `engine` (a MONAI `SupervisedTrainer`)."""
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine | None = None) -> None:
        """All-reduce (mean) the gradients, in one collective for all parameters."""
        if not self.parameters or world_size() == 1:
            return
        for p in self.parameters:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in self.parameters])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world_size()
        offset = 0
        for p in self.parameters:
            n = p.grad.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n


class DistributedLossTermsAverager(LossTermsAverager):
    """`LossTermsAverager` whose epoch means run over the iterations of all ranks, identical on every rank.

    Each rank trains on its own batches, so its own averages describe only its share; the sums and counts of
    every rank are gathered at the end of the epoch (a collective: every rank's trainer runs it), so
    `train/loss...` in MLflow (logged by rank 0) is the mean over all batches of the epoch, as in a single
    process. A term that some ranks never saw is averaged over the iterations that had it.

    Args:
        loss_function: the loss module, exposing `last_terms: dict[str, float]`.
        prefix: metric name prefix.
    """

    def aggregate(self, engine: Engine) -> None:
        """Add up all ranks' sums and counts, then store the means as `LossTermsAverager` does."""
        totals: dict[str, float] = {}
        counts: dict[str, int] = {}
        for sums, ns in all_gather_objects((dict(self._sums), dict(self._counts))):
            for name, value in sums.items():
                totals[name] = totals.get(name, 0.0) + value
                counts[name] = counts.get(name, 0) + ns[name]
        self._sums.clear()
        self._counts.clear()
        self._sums.update(totals)
        self._counts.update(counts)
        super().aggregate(engine)


def local_rank0_first(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call `function` on local rank 0 of every node, wait for it on all ranks, then call it on the others.

    For idempotent set-up steps such as `ensure_phantom_dataset`: one process per node does the work and the
    others find it done. One per node rather than one in all, since nodes may not share a filesystem; where
    they do, the step itself must be safe against concurrent callers (the phantom is built in a staging
    folder and renamed into place). Outside distributed training it just calls `function`.

    Returns:
        what `function` returned on this rank.
    """
    if not is_distributed():
        return function(*args, **kwargs)
    result = function(*args, **kwargs) if local_rank() == 0 else None
    _barrier()
    if local_rank() != 0:
        result = function(*args, **kwargs)
    return result  # type: ignore[return-value]


def all_gather_objects(obj: T) -> list[T]:
    """Every rank's `obj` (picklable), in rank order, on every rank; `[obj]` outside distributed training."""
    # wrapped in a list: idist.all_gather would concatenate tensors and sum up numbers, not list them
    return [item[0] for item in idist.all_gather([obj])]


def interleave(per_rank: Sequence[Sequence[T]]) -> list[T]:
    """Merge per-rank lists round-robin: item 0 of each rank, then item 1 of each rank, ...

    A `DistributedSampler` without shuffling hands dataset item i to rank `i % world_size` (at position
    `i // world_size`), so this restores the dataset's order from the ranks' results.
    """
    longest = max((len(items) for items in per_rank), default=0)
    return [items[k] for k in range(longest) for items in per_rank if k < len(items)]


def per_rank_path(path: str | Path) -> str:
    """`path` on rank 0; `<stem>.rank<R><suffix>` on rank R > 0, so ranks never write into the same file."""
    path = Path(path)
    r = rank()
    return str(path if r == 0 else path.with_name(f"{path.stem}.rank{r}{path.suffix}"))


def check_in_sync(modules: Mapping[str, torch.nn.Module]) -> bool:
    """Compare the weights of every rank with rank 0's and log the outcome (a collective: all ranks call it).

    A cheap end-of-training check that nothing trained outside DDP's gradient averaging (e.g. a loss
    parameter without `AverageGradients`): each rank sends two float64 checksums per state-dict entry.

    Args:
        modules: name -> module, e.g. {"network": net, "loss": loss}.

    Returns:
        True when every rank's checksums equal rank 0's (always True outside distributed training); on a
        mismatch a warning names the first entries that differ.
    """
    def checksums(module: torch.nn.Module) -> dict[str, tuple[float, float]]:
        return {k: (float(v.double().sum()), float(v.double().abs().sum()))
                for k, v in module.state_dict().items() if torch.is_tensor(v)}

    mine = {name: checksums(module) for name, module in modules.items()}
    all_ranks = all_gather_objects(mine)
    differing = sorted({
        f"{name}.{key}" for other in all_ranks[1:] for name, entries in all_ranks[0].items()
        for key, value in entries.items() if other.get(name, {}).get(key) != value
    })
    if differing:
        logger.warning(f"rank {rank()}: weights differ between ranks in {len(differing)} entries, e.g. "
                       f"{', '.join(differing[:5])}")
    elif is_distributed():
        logger.info(f"rank {rank()}: {', '.join(modules)} weights identical on all {world_size()} ranks")
    return not differing


def shutdown() -> None:
    """Wait for every rank to finish, then leave the process group (a no-op outside distributed training)."""
    if is_distributed():
        _barrier()
        dist.destroy_process_group()


def _barrier() -> None:
    # NCCL's barrier needs this rank's device, which idist.barrier() does not pass (PyTorch would guess it
    # from the global rank and warn of a possible hang); gloo's takes none
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        idist.barrier()
