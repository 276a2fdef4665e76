"""Exact order statistics of many rows at once: the k-th largest or smallest value of each row.

Macenko needs three per image: the 1st and 99th percentiles of the tissue pixels' stain angles
and the 99th percentile of each stain's concentrations, a rank of about 1% of a row of 50,000
to 130,000 values. ``torch.topk`` with k of that size builds a (value, index) pair per element
and keeps a heap, about 10 ns an element, which made these selections the largest cost of a
normalisation. :func:`order_statistic` returns the same element (an order statistic is a value
of the row, so nothing is rounded) in a few vectorised passes:

1. a threshold from a strided sample of the row, chosen so that about twice the needed number
   of values pass it;
2. one comparison pass over the row keeps the values beyond the threshold (a few percent);
3. ``kthvalue`` on those few. Where fewer values than needed passed (an unlucky sample), that
   row is selected from all its values instead, so the result is exact whatever the data.
"""

from __future__ import annotations

import math

import torch

__all__ = ["order_statistic"]

# Every SAMPLE_STRIDE-th value forms the sample; rows shorter than DIRECT_BELOW values, or
# ranks deeper than a DIRECT_SHARE of the row, skip the sample (it would not prune much).
SAMPLE_STRIDE = 16
DIRECT_BELOW = 4096
DIRECT_SHARE = 0.125
# The threshold aims at 2x the needed count plus this many sample values (16 x 16 = 256 values),
# a margin of many standard deviations of the sample's count.
_SAMPLE_MARGIN = 16


def order_statistic(
    values: torch.Tensor,
    rank: torch.Tensor,
    *,
    largest: bool,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per row of ``values`` (R, N), the value of 0-based ``rank`` (R,) among ``values[mask]``,
    counted from the top (``largest``) or the bottom.

    Exactly the element ``values[mask].sort()`` would put at that rank, so ties and the order
    of the row do not matter. A row whose rank is not below its count of masked values (an
    empty row) gives 0.0. NaN must not occur in the masked values (the callers' values are
    finite by construction); it is neither chosen nor counted.
    """
    rows = values.shape[0]
    rank = rank.to(torch.long)
    keep = _candidates(values, rank + 1, largest, mask)
    picked_counts = keep.sum(dim=-1)
    out = torch.zeros(rows, dtype=values.dtype, device=values.device)
    segments = values[keep].split(picked_counts.tolist())
    for row, (segment, m, r) in enumerate(
        zip(segments, picked_counts.tolist(), rank.tolist(), strict=True)
    ):
        if r >= m:
            continue  # an empty row: no value of that rank
        k = m - r if largest else r + 1  # kthvalue counts from 1, from the smallest
        out[row] = segment.kthvalue(k).values
    return out


def _candidates(
    values: torch.Tensor,
    need: torch.Tensor,
    largest: bool,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """(R, N) bool: values that hold each row's wanted element and at least ``need`` values
    beyond it (every masked value where the sample's threshold would not leave enough)."""
    n = values.shape[-1]
    if n < DIRECT_BELOW or int(need.max()) > DIRECT_SHARE * n:
        return mask if mask is not None else torch.ones_like(values, dtype=torch.bool)
    sample = values[:, ::SAMPLE_STRIDE]
    fill = -math.inf if largest else math.inf
    if mask is not None:
        sample = torch.where(mask[:, ::SAMPLE_STRIDE], sample, fill)
    depth = (2 * need + SAMPLE_STRIDE - 1) // SAMPLE_STRIDE + _SAMPLE_MARGIN
    depth = depth.clamp(max=sample.shape[-1])
    ranked = sample.topk(int(depth.max()), dim=-1, largest=largest, sorted=True).values
    threshold = ranked.gather(-1, (depth - 1).unsqueeze(-1))  # (R, 1)
    keep = values >= threshold if largest else values <= threshold
    if mask is not None:
        keep &= mask
    count = mask.sum(dim=-1) if mask is not None else n
    short = keep.sum(dim=-1) < need.clamp(max=count)
    if bool(short.any()):  # too few passed the sample's threshold: take the whole row
        keep[short] = mask[short] if mask is not None else True
    return keep
