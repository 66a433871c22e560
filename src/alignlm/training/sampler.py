"""Deterministic data order defined per *global* step, so resume and data parallelism are exact.

The order of an epoch is a permutation seeded by ``(seed, epoch)``. Global step ``s`` takes the next
``global_batch = per_device * world * accum`` indices; micro-batch ``a`` of rank ``r`` is a fixed slice
of them. One process with accumulation 2 and two processes with accumulation 1 therefore see the same
samples in every optimizer step, and a run resumed at step ``s`` continues with exactly step ``s``'s data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass
class StepSampler:
    """Yields this rank's micro-batches (lists of dataset indices), from ``start_step`` to ``total_steps``."""

    num_samples: int
    per_device: int
    world: int
    rank: int
    accum: int
    seed: int
    total_steps: int
    start_step: int = 0

    @property
    def global_batch(self) -> int:
        return self.per_device * self.world * self.accum

    @property
    def steps_per_epoch(self) -> int:
        steps = self.num_samples // self.global_batch
        if steps == 0:
            raise ValueError(
                f"dataset has {self.num_samples} samples, fewer than one global batch of {self.global_batch} "
                "(per_device_batch_size x processes x grad_accum)"
            )
        return steps

    def _perm(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=g)

    def __iter__(self) -> Iterator[list[int]]:
        spe = self.steps_per_epoch
        perm, perm_epoch = None, -1
        for step in range(self.start_step, self.total_steps):
            epoch = step // spe
            if epoch != perm_epoch:
                perm, perm_epoch = self._perm(epoch), epoch
            chunk = perm[(step % spe) * self.global_batch : (step % spe + 1) * self.global_batch]
            chunk = chunk.view(self.accum, self.world, self.per_device)[:, self.rank]
            yield from (c.tolist() for c in chunk)

    def __len__(self) -> int:
        return (self.total_steps - self.start_step) * self.accum
