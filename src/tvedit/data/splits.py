"""Deterministic train / held-out splits and the seeded, resumable order of training examples."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

HELDOUT_FRACTION = 0.1
HELDOUT_MAX = 5000
SPLIT_SEED = 0


def split_indices(n: int, fraction: float = HELDOUT_FRACTION, seed: int = SPLIT_SEED, max_heldout: int = HELDOUT_MAX) -> tuple[list[int], list[int]]:
    """(train, held_out): a seeded permutation; the first min(ceil(fraction*n), max_heldout) examples
    are held out (at least 1 and at most n-1 when n >= 2). Both lists are sorted."""
    if n < 2 or fraction <= 0:
        return list(range(n)), []
    n_held = min(max(1, math.ceil(fraction * n)), max_heldout, n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[n_held:]), sorted(perm[:n_held])


def stream_batches(n: int, batch_size: int, seed: int, start: int = 0, rank: int = 0, world: int = 1) -> Iterator[list[tuple[int, int]]]:
    """Global batch b holds stream positions [b*B, (b+1)*B); rank r takes every world-th of them.
    Starting at batch ``start`` makes a resumed run see exactly the same examples."""
    perms: dict[int, list[int]] = {}
    b = start
    while True:
        items = []
        for pos in range(b * batch_size + rank, (b + 1) * batch_size, world):
            epoch, offset = divmod(pos, n)
            if epoch not in perms:
                perms = {epoch: torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()}
            items.append((epoch, perms[epoch][offset]))
        yield items
        b += 1
