"""Per-epoch averages of every loss term and task weight, under readable names for the tracker."""

from __future__ import annotations

import math
from collections import defaultdict

from ignite.engine import Engine, Events


class LossTermsAverager:
    """Average `loss_function.last_terms` over each training epoch into `trainer.state.metrics`.

    MONAI's `SupervisedTrainer` keeps only the total loss; `MultiTaskLoss` records its terms (loss_seg,
    loss_cls, loss_boundary, weight_*) after every forward pass. This handler reads them after each
    iteration and, at the end of the epoch, stores `train/<term>` means (a term absent all epoch is left out)
    and the learning rate `train/lr`.

    Not one `ignite.metrics.Average` per term: a term is absent (NaN) in the iterations whose batch lacks its
    target (partially labelled data) and must be averaged over the others only, whereas `Average` counts every
    update; and the terms are known only once the loss has run, while `Average`'s cross-rank reduction needs
    the same metrics on every rank from the start (`DistributedLossTermsAverager` gathers sums and counts).

    Args:
        loss_function: the loss module, exposing `last_terms: dict[str, float]`.
        prefix: metric name prefix.
    """

    def __init__(self, loss_function: object, prefix: str = "train/") -> None:
        self.loss_function = loss_function
        self.prefix = prefix
        self._sums: dict[str, float] = defaultdict(float)
        self._counts: dict[str, int] = defaultdict(int)

    def attach(self, engine: Engine) -> None:
        """Register with a trainer."""
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.update)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.aggregate)

    def reset(self, engine: Engine | None = None) -> None:
        """Start a new epoch's averages."""
        self._sums.clear()
        self._counts.clear()

    def update(self, engine: Engine) -> None:
        """Add the last iteration's terms."""
        for name, value in getattr(self.loss_function, "last_terms", {}).items():
            if value is not None and not math.isnan(float(value)):
                self._sums[name] += float(value)
                self._counts[name] += 1

    def aggregate(self, engine: Engine) -> None:
        """Store the epoch means (and the current learning rate) in `engine.state.metrics`."""
        for name, total in self._sums.items():
            key = "loss" if name == "loss_total" else name
            engine.state.metrics[f"{self.prefix}{key}"] = total / self._counts[name]
        optimizer = getattr(engine, "optimizer", None)
        if optimizer is not None:
            engine.state.metrics[f"{self.prefix}lr"] = float(optimizer.param_groups[0]["lr"])
