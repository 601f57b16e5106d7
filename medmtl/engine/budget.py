"""Wall-clock training budgets and step-time statistics.

`TimeBudget` ends training at the first epoch boundary from which one more epoch would overrun a budget, so
variants compared "at the same budget" get the same machine time, and the last checkpoint holds a whole
epoch. The budget counts wall-clock time by default; `clock="cpu"` counts the process's CPU time divided by
its compute threads instead, which on a quiet machine equals wall time and on a shared one counts only the
time the process actually got (benchmarks on a contended machine use it). `StepTimer` measures seconds per
iteration and the share of it spent waiting for data (ignite timers on its GET_BATCH events), reported per epoch as
`train/sec_per_iter` and `train/data_wait_fraction`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Timer


def _cpu_seconds() -> float:
    """Process CPU time per compute thread: wall time on a quiet machine, the time actually received on a busy one."""
    return time.process_time() / max(1, torch.get_num_threads())


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": _cpu_seconds}


class TimeBudget:
    """Stop a trainer before it runs past `minutes` of training time (counted from its start; kept on resume).

    Args:
        minutes: the budget; None or 0 disables it.
        clock: "wall" (elapsed time) or "cpu" (process CPU time / torch's thread count: busy-waiting compute
            threads count too, so it slightly overstates the work; still far less disturbed by other processes).
    """

    def __init__(self, minutes: float | None, clock: str = "wall") -> None:
        if clock not in CLOCKS:
            raise ValueError(f"clock must be one of {sorted(CLOCKS)}, got {clock!r}")
        self.clock = clock
        self._now: Callable[[], float] = CLOCKS[clock]
        self.budget_s = float(minutes) * 60.0 if minutes else None
        self.spent_s = 0.0  # training time of earlier sessions (restored from a checkpoint)
        self._started: float | None = None
        self._epoch_started: float | None = None
        self._epoch_seconds: list[float] = []

    def attach(self, engine: Engine) -> None:
        """Time the trainer's epochs and terminate it when the next epoch would not fit."""
        if self.budget_s is None:
            return
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_start)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_end)

    def elapsed_s(self) -> float:
        """Training seconds spent so far, earlier sessions included."""
        running = self._now() - self._started if self._started is not None else 0.0
        return self.spent_s + running

    def fraction(self) -> float:
        """Share of the budget spent (0 without a budget)."""
        return min(1.0, self.elapsed_s() / self.budget_s) if self.budget_s else 0.0

    def _start(self, engine: Engine) -> None:
        self._started = self._now()

    def _epoch_start(self, engine: Engine) -> None:
        self._epoch_started = self._now()

    def _epoch_end(self, engine: Engine) -> None:
        if self._epoch_started is not None:
            self._epoch_seconds.append(self._now() - self._epoch_started)
        # the slowest recent epoch (validation epochs are slower) must still fit
        next_epoch = max(self._epoch_seconds[-5:], default=0.0)
        if self.elapsed_s() + next_epoch > self.budget_s:
            engine.logger.info(
                f"time budget: {self.elapsed_s() / 60:.1f} of {self.budget_s / 60:.1f} min spent after epoch "
                f"{engine.state.epoch}; the next epoch would not fit, stopping"
            )
            engine.terminate()

    def state_dict(self) -> dict[str, float]:
        """Training time spent, so a resumed run keeps counting against the same budget."""
        return {"spent_s": self.elapsed_s()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the time spent by earlier sessions."""
        self.spent_s = float(state["spent_s"])


class StepTimer:
    """Seconds per training iteration and the fraction of it spent waiting for the next batch.

    Two ignite `Timer`s, reset at each epoch: one runs from GET_BATCH_STARTED to ITERATION_COMPLETED (data
    wait + step, one step per iteration), the other from GET_BATCH_STARTED to GET_BATCH_COMPLETED (data
    wait). Per epoch it stores `train/sec_per_iter` and `train/data_wait_fraction` in `engine.state.metrics`
    (the tracker logs every `train/` metric); `summary()` covers the whole run.
    """

    def __init__(self) -> None:
        self.iterations = 0
        self.step_s = 0.0
        self.data_s = 0.0
        self._iteration = Timer(average=True)
        self._data = Timer()

    def attach(self, engine: Engine) -> None:
        """Time every iteration of `engine`."""
        self._iteration.attach(
            engine,
            start=Events.EPOCH_STARTED,
            resume=Events.GET_BATCH_STARTED,
            pause=Events.ITERATION_COMPLETED,
            step=Events.ITERATION_COMPLETED,
        )
        self._data.attach(
            engine, start=Events.EPOCH_STARTED, resume=Events.GET_BATCH_STARTED, pause=Events.GET_BATCH_COMPLETED
        )
        # a Timer starts running when it is reset: wait for the first batch instead
        engine.add_event_handler(Events.EPOCH_STARTED, self._iteration.pause)
        engine.add_event_handler(Events.EPOCH_STARTED, self._data.pause)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_end)

    def _epoch_end(self, engine: Engine) -> None:
        n, total, data = int(self._iteration.step_count), self._iteration.total, self._data.total
        self.iterations += n
        self.step_s += total
        self.data_s += data
        if n:
            engine.state.metrics["train/sec_per_iter"] = self._iteration.value()
            engine.state.metrics["train/data_wait_fraction"] = data / total if total else 0.0

    def summary(self) -> dict[str, float]:
        """Iterations, mean seconds per iteration and data-wait fraction over the epochs completed so far."""
        return {
            "iterations": self.iterations,
            "sec_per_iter": self.step_s / self.iterations if self.iterations else float("nan"),
            "data_wait_fraction": self.data_s / self.step_s if self.step_s else float("nan"),
        }
