"""Block partitions of a flattened parameter vector (one block per parameter tensor).

Layer-wise PROMA projects each parameter tensor separately. In the reference the gradient of all parameters
is one flat vector of length P (called n here), and a *block* is the slice of it that belongs to one tensor.
"""
from __future__ import annotations

import numbers

import numpy as np


def normalize_blocks(blocks, n: int) -> list[slice]:
    """Turn ``blocks`` into a list of slices that partition ``range(n)``.

    Parameters
    ----------
    blocks : None, sequence of slice, or sequence of int
        ``None``: one block covering everything (the global projection). Slices: any order, each with
        explicit ``start``/``stop`` (or ``None`` meaning 0/n) and step ``None`` or 1. Sizes: consecutive
        blocks of those lengths (as ``torch`` parameter ``numel()`` in ``model.parameters()`` order).
        Empty blocks (size 0) are allowed and ignored.
    n : int
        Length of the flat vector.

    Returns
    -------
    list of slice
        Non-empty slices with integer start/stop, sorted by start, partitioning ``range(n)``.

    Raises
    ------
    ValueError
        ``blocks`` mixes slices and sizes, has negative sizes or steps other than 1, or does not partition
        ``range(n)`` (gap, overlap, out of range, wrong total).
    """
    if blocks is None:
        return [slice(0, n)] if n > 0 else []
    if isinstance(blocks, (str, bytes, slice)) or not hasattr(blocks, "__iter__"):
        raise ValueError(f"blocks must be None, a sequence of slices or a sequence of sizes; got {blocks!r}")
    items = list(blocks)
    if all(isinstance(b, slice) for b in items):
        return _from_slices(items, n)
    if all(_is_int(b) for b in items):
        return _from_sizes([int(b) for b in items], n)
    raise ValueError("blocks must be all slices or all integer sizes; got a mixture or other types")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _from_slices(items: list, n: int) -> list[slice]:
    """Slices (any order, ``None`` bounds meaning 0/n, step 1) checked to partition ``range(n)``, sorted."""
    spans = []
    for k, s in enumerate(items):
        if s.step not in (None, 1):
            raise ValueError(f"blocks[{k}] must have step 1; got {s!r}")
        start = 0 if s.start is None else s.start
        stop = n if s.stop is None else s.stop
        if not (_is_int(start) and _is_int(stop)):
            raise ValueError(f"blocks[{k}] must have integer bounds; got {s!r}")
        start, stop = int(start), int(stop)
        if not 0 <= start <= stop <= n:
            raise ValueError(f"blocks[{k}] = {s!r} is not a range inside [0, {n}]")
        spans.append((start, stop))
    spans.sort()
    position = 0
    for start, stop in spans:
        if start != position:
            kind = "overlap" if start < position else "gap"
            raise ValueError(f"blocks do not partition range({n}): {kind} at index {min(start, position)}")
        position = stop
    if position != n:
        raise ValueError(f"blocks do not partition range({n}): they cover only [0, {position})")
    return [slice(a, b) for a, b in spans if b > a]


def _from_sizes(sizes: list, n: int) -> list[slice]:
    """Consecutive blocks of the given sizes, checked to sum to n."""
    if any(s < 0 for s in sizes):
        raise ValueError(f"blocks sizes must be >= 0; got {sizes}")
    if sum(sizes) != n:
        raise ValueError(f"blocks do not partition range({n}): sizes sum to {sum(sizes)}")
    edges = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
    return [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]
