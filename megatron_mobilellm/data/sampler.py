"""Batches from ``consumed_samples``, the same global stream for any data-parallel size.

The global sample stream is ``0, 1, 2, ...`` of the (already shuffled) dataset. Each micro-step takes the next
``micro_batch_size × dp_size`` samples and gives rank ``r`` the ``r``-th slice, so a global batch (all micro-steps
of one iteration on all ranks) is always the same set of samples; resuming at ``consumed_samples`` — with the
same or a different number of ranks — continues exactly where the stream stopped.
"""

from __future__ import annotations

from typing import Iterator


class GlobalBatchSampler:
    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_size})")
        self.total_samples, self.consumed_samples = total_samples, consumed_samples
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size

    def __len__(self) -> int:
        return (self.total_samples - self.consumed_samples) // (self.micro_batch_size * self.dp_size)

    def __iter__(self) -> Iterator[list[int]]:
        step = self.micro_batch_size * self.dp_size
        start = self.consumed_samples + self.dp_rank * self.micro_batch_size
        for first in range(start, self.total_samples - step + 1 + self.dp_rank * self.micro_batch_size, step):
            yield list(range(first, first + self.micro_batch_size))
