"""Exact order statistics of many rows at once: per row, the value of a given rank from the
bottom and/or from the top.

Macenko needs three per image: the 1st and 99th percentiles of the tissue pixels' stain angles
and the 99th percentile of each stain's concentrations, ranks of about 1% of rows of 50,000 to
130,000 values. ``torch.topk`` with k of that size builds a (value, index) pair per element and
keeps a heap, about 10 ns an element on a CPU, which made these selections the largest cost of
a normalisation. :func:`tail_order_statistics` returns the same elements (an order statistic is
one of the row's values, so nothing is rounded) in a few vectorised passes:

1. thresholds from a sorted strided sample of each row, chosen so that about twice the needed
   number of values lie beyond them;
2. one comparison pass keeps the values beyond the thresholds (a few percent of the row);
3. ``numpy.partition`` on each row's few. Where fewer values than needed passed a threshold
   (an unlucky sample), that row is selected from all its values instead, so the result is
   exact whatever the data.

NumPy, not torch, does this on a CPU: the work is a handful of small steps per row, and each
torch call costs 10 to 100 times NumPy's overhead (a torch sort of the 6 x 3,136 sample takes
0.8 ms, NumPy's 0.04 ms). On other devices the rows stay where they are and ``topk`` selects.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["tail_order_statistics"]

# Every SAMPLE_STRIDE-th value forms the sample; rows shorter than DIRECT_BELOW values, or
# ranks deeper than a DIRECT_SHARE of the row, skip the sample (it would not prune much).
SAMPLE_STRIDE = 16
DIRECT_BELOW = 4096
DIRECT_SHARE = 0.125
# Each threshold aims at 2x the needed count plus this many sample values (16 x 16 = 256
# values), a margin of many standard deviations of the count a random sample gives.
_SAMPLE_MARGIN = 16


def tail_order_statistics(
    values: torch.Tensor,
    count: torch.Tensor,
    low_rank: torch.Tensor | None = None,
    high_rank: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Per row of ``values`` (R, N), the values of 0-based rank ``low_rank`` (R,) from the
    bottom and ``high_rank`` (R,) from the top among the row's non-NaN values.

    NaN marks a value to leave out (a background pixel); ``count`` (R,) is how many values of
    each row are not NaN. The results are exactly the elements a sort of those values puts at
    those ranks, whatever the ties and the order of the row. A rank not below its row's count
    (an empty row) gives 0.0.
    """
    if values.device.type != "cpu":
        return _by_topk(values, count, low_rank, high_rank)
    rows = np.ascontiguousarray(values.detach().numpy())
    counts = count.tolist()
    ranks = [r.tolist() if r is not None else None for r in (low_rank, high_rank)]
    limits = _thresholds(rows, ranks)
    if limits is None:
        keep = ~np.isnan(rows)
        limits = [[math.inf] * len(rows), [-math.inf] * len(rows)]
    else:
        beyond = [
            rows <= limit[:, None] if side == 0 else rows >= limit[:, None]
            for side, limit in enumerate(limits)
            if ranks[side] is not None
        ]
        keep = beyond[0] if len(beyond) == 1 else np.logical_or(*beyond, out=beyond[0])
        limits = [limits[0].tolist(), limits[1].tolist()]
    flat = np.flatnonzero(keep)  # row-major: each row's values in turn
    picked = rows.reshape(-1)[flat]
    ends = np.searchsorted(flat, np.arange(1, len(rows) + 1) * rows.shape[1]).tolist()
    out = [[0.0] * len(rows), [0.0] * len(rows)]
    for i, end in enumerate(ends):
        segment = picked[ends[i - 1] if i else 0 : end]
        wanted = [(s, r[i]) for s, r in enumerate(ranks) if r is not None and r[i] < counts[i]]
        if not wanted:
            continue
        found = _select(segment, wanted, limits, i)
        if found is None:  # the sample's threshold left too few: select from the whole row
            found = _select(rows[i][~np.isnan(rows[i])], wanted, None, i)
        for side, value in found:
            out[side][i] = value
    low, high = (
        torch.tensor(o, dtype=values.dtype) if r is not None else None
        for o, r in zip(out, ranks, strict=True)
    )
    return low, high


def _thresholds(rows: np.ndarray, ranks: list[list[int] | None]) -> list[np.ndarray] | None:
    """Per row a low and a high threshold, each with (most likely) at least twice its rank's
    count of values beyond it; None where sampling would not prune (short rows, deep ranks)."""
    n_rows, n = rows.shape
    depth = max(max(r, default=0) for r in ranks if r is not None) + 1
    if n < DIRECT_BELOW or depth > DIRECT_SHARE * n:
        return None
    sample = np.sort(rows[:, ::SAMPLE_STRIDE], axis=1)  # NaN sorts last
    valid = np.count_nonzero(~np.isnan(sample), axis=1)
    limits = [np.full(n_rows, -math.inf, rows.dtype), np.full(n_rows, math.inf, rows.dtype)]
    for side, rank in enumerate(ranks):
        if rank is None:
            continue
        need = (2 * (np.asarray(rank) + 1) + SAMPLE_STRIDE - 1) // SAMPLE_STRIDE + _SAMPLE_MARGIN
        enough = need <= valid
        at = np.where(side == 0, need - 1, valid - need)[enough]
        limits[side] = np.full(n_rows, math.inf if side == 0 else -math.inf, rows.dtype)
        limits[side][enough] = sample[enough, at]
    return limits


def _select(
    segment: np.ndarray,
    wanted: list[tuple[int, int]],
    limits: list[list[float]] | None,
    row: int,
) -> list[tuple[int, float]] | None:
    """The (side, value) of each wanted (side, rank) among ``segment``, a row's values beyond
    its thresholds (or all of them, ``limits`` None); None where the segment cannot hold them:
    the value found lies inside a threshold, so values beyond it were not all kept."""
    size = segment.size
    kths = [rank if side == 0 else size - 1 - rank for side, rank in wanted]
    if min(kths) < 0 or max(kths) >= size:
        return None
    parted = np.partition(segment, kths)
    found = []
    for (side, _), k in zip(wanted, kths, strict=True):
        value = float(parted[k])
        if limits is not None and (value > limits[0][row] if side == 0 else value < limits[1][row]):
            return None
        found.append((side, value))
    return found


def _by_topk(
    values: torch.Tensor,
    count: torch.Tensor,
    low_rank: torch.Tensor | None,
    high_rank: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The same selection with ``topk`` on the rows' own device (an accelerator, where its
    cost per element is low and copying the rows to the host would dominate)."""
    valid = ~torch.isnan(values)
    results = []
    for side, rank in enumerate((low_rank, high_rank)):
        if rank is None:
            results.append(None)
            continue
        rank = rank.to(device=values.device, dtype=torch.long)
        fill = math.inf if side == 0 else -math.inf
        k = min(int(rank.max()) + 1, values.shape[-1])
        ranked = torch.where(valid, values, fill).topk(k, dim=-1, largest=side == 1).values
        value = ranked.gather(-1, rank.clamp(max=k - 1).unsqueeze(-1)).squeeze(-1)
        results.append(torch.where(rank < count.to(values.device), value, 0.0))
    return results[0], results[1]
