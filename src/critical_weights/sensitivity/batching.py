"""Micro-batches: sequences sorted by length, grouped by count and an optional token budget."""

from __future__ import annotations

from collections.abc import Sequence


def make_batches(lengths: Sequence[int], micro_batch_size: int, batch_tokens: int = 0) -> list[list[int]]:
    """Group sequence indices into micro-batches, longest first, so padding costs little.

    A batch holds at most `micro_batch_size` sequences and, when `batch_tokens` > 0, at most
    `batch_tokens` padded tokens (its size times its longest length); a single sequence longer
    than the budget still gets a batch of its own. Ties in length keep index order, so the
    batches are the same on every run.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        if batches:
            batch = batches[-1]
            longest = lengths[batch[0]]  # sorted: the first is the longest
            fits_budget = batch_tokens == 0 or (len(batch) + 1) * longest <= batch_tokens
            if len(batch) < micro_batch_size and fits_budget:
                batch.append(i)
                continue
        batches.append([i])
    return batches
