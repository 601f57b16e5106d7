"""Batches with a set share of masked cases, for training on partially labelled data.

When masks are scarce and case-level labels plentiful (say 8 masked cases among 48), plain shuffling gives
most batches no mask at all: the segmentation head then learns from a sixth of the steps. The sampler below
orders the training cases so that every batch of ``batch_size`` holds ``round(masked_share * batch_size)``
cases with a mask and the rest without; each group is cycled through in a fresh random order, so the scarce
masked cases repeat within an epoch while the others are each seen about once.

In a bundle (``train.yaml``)::

    masked_share: 0.5
    train#dataloader#sampler: "$medmtl.data.sampling.MaskedShareSampler(@data#split[0], @batch_size, @masked_share)"
    train#dataloader#shuffle: false

The order is drawn from torch's global random generator once per epoch, as ``RandomSampler`` does, so a run
that restores the RNG states (resume from ``last.pt``) draws the same batches again.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch.utils.data import Sampler

from medmtl.errors import MedmtlError

__all__ = ["MaskedShareSampler", "has_mask_entry"]


def has_mask_entry(item: Mapping) -> bool:
    """Whether a datalist entry lists a mask (a non-empty ``label``)."""
    return bool(item.get("label"))


class MaskedShareSampler(Sampler[int]):
    """Dataset indices in an order where each batch holds a fixed number of masked cases.

    Args:
        data: the training datalist (entries with or without ``label``), in the dataset's order.
        batch_size: the DataLoader's batch size (the sampler lays out whole batches).
        masked_share: share of each batch taken from cases with a mask, in [0, 1]; rounded to whole cases
            per batch.
        num_samples: samples per epoch; default ``len(data)``. Rounded up to whole batches.

    Raises:
        MedmtlError: a share outside [0, 1], or a share that needs a kind of case the datalist lacks.
    """

    def __init__(
        self, data: Sequence[Mapping], batch_size: int, masked_share: float, num_samples: int | None = None
    ) -> None:
        if batch_size < 1:
            raise MedmtlError(f"batch_size must be at least 1, got {batch_size}")
        if not 0.0 <= float(masked_share) <= 1.0:
            raise MedmtlError(f"masked_share must be in [0, 1], got {masked_share!r}")
        self.masked = [i for i, item in enumerate(data) if has_mask_entry(item)]
        self.unmasked = [i for i, item in enumerate(data) if not has_mask_entry(item)]
        self.batch_size = int(batch_size)
        self.masked_per_batch = int(round(float(masked_share) * self.batch_size))
        if self.masked_per_batch and not self.masked:
            raise MedmtlError(f"masked_share {masked_share} needs cases with a mask; the datalist has none")
        if self.masked_per_batch < self.batch_size and not self.unmasked:
            raise MedmtlError(
                f"masked_share {masked_share} needs cases without a mask; all {len(self.masked)} cases have one"
            )
        samples = len(data) if num_samples is None else int(num_samples)
        self.num_batches = max(1, math.ceil(samples / self.batch_size))

    def __len__(self) -> int:
        return self.num_batches * self.batch_size

    def __iter__(self) -> Iterator[int]:
        seed = int(torch.empty((), dtype=torch.int64).random_().item())
        generator = torch.Generator().manual_seed(seed)
        masked = _Cycle(self.masked, generator)
        unmasked = _Cycle(self.unmasked, generator)
        for _ in range(self.num_batches):
            batch = [masked.next() for _ in range(self.masked_per_batch)]
            batch += [unmasked.next() for _ in range(self.batch_size - self.masked_per_batch)]
            order = torch.randperm(len(batch), generator=generator).tolist()
            yield from (batch[i] for i in order)


class _Cycle:
    """Endless passes over a list of indices, each pass in a new random order."""

    def __init__(self, indices: Sequence[int], generator: torch.Generator) -> None:
        self.indices, self.generator = list(indices), generator
        self.order: list[int] = []

    def next(self) -> int:
        if not self.order:
            self.order = [self.indices[i] for i in torch.randperm(len(self.indices), generator=self.generator)]
        return self.order.pop()
