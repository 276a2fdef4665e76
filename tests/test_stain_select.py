"""The fast Macenko path: exact order statistics, and the normaliser against a plain re-statement
of its maths (one image at a time, full sorts, torch.cov, lstsq)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from histolens.stain import select
from histolens.stain.normalize import StainNormalizer
from histolens.stain.select import tail_order_statistics

# ------------------------------------------------------------------------------ selection


def _by_sort(values: torch.Tensor, rank: torch.Tensor, largest: bool) -> torch.Tensor:
    """The element at ``rank`` of each row's non-NaN values, by a full sort (0.0 if none)."""
    out = []
    for row, r in zip(values, rank.tolist(), strict=True):
        kept = row[~row.isnan()].sort(descending=largest).values
        out.append(kept[r] if r < len(kept) else torch.tensor(0.0))
    return torch.stack(out)


def _rows(n: int) -> torch.Tensor:
    """Rows of every kind: random, sorted both ways, heavy ties, one value, and a row whose
    every 16th value (the sample) is the largest or the smallest, so the sampled thresholds
    let too few values pass and the row must be selected in full."""
    g = torch.Generator().manual_seed(0)
    rand = torch.rand(n, generator=g)
    ramp = torch.linspace(-3, 3, n)
    ties = torch.randint(0, 5, (n,), generator=g).float()
    spiky = torch.rand(n, generator=g)
    every = slice(None, None, select.SAMPLE_STRIDE)
    spiky[every] += 10 + torch.rand(len(spiky[every]), generator=g)
    dippy = -spiky
    return torch.stack((rand, ramp, ramp.flip(0), ties, torch.full((n,), 0.25), spiky, dippy))


def _check(values: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> None:
    count = (~values.isnan()).sum(dim=1)
    got_low, got_high = tail_order_statistics(values, count, low_rank=low, high_rank=high)
    assert torch.equal(got_low, _by_sort(values, low, largest=False))
    assert torch.equal(got_high, _by_sort(values, high, largest=True))
    _, only_high = tail_order_statistics(values, count, high_rank=high)
    only_low, _ = tail_order_statistics(values, count, low_rank=low)
    assert torch.equal(only_high, got_high) and torch.equal(only_low, got_low)
    # The accelerator path (topk on the rows' device), run here on the CPU, agrees exactly.
    by_topk = select._by_topk(values, count, low, high)
    assert torch.equal(by_topk[0], got_low) and torch.equal(by_topk[1], got_high)


@pytest.mark.parametrize("n", [1000, 50_176])  # under and over select.DIRECT_BELOW
def test_tail_order_statistics_are_the_elements_a_full_sort_gives(n):
    values = _rows(n)
    rows = values.shape[0]
    for share in (0.0, 0.01, 0.05, 0.3):
        rank = torch.full((rows,), int(share * (n - 1)))
        _check(values, rank, rank.flip(0))


def test_nan_values_are_left_out_of_the_ranks():
    n = 50_176
    values = _rows(n)
    g = torch.Generator().manual_seed(1)
    keep_share = torch.tensor([0.9, 0.5, 0.05, 0.7, 1.0, 0.3, 0.6]).unsqueeze(1)
    drop = torch.rand(values.shape, generator=g) >= keep_share
    drop[2, : n // 2] = True  # valid values on one half only: the sample sees half as many
    values[drop] = math.nan
    count = (~values.isnan()).sum(dim=1)
    _check(values, torch.round(0.01 * (count - 1).double()).long(), (count - 1) // 100)
    # An empty row (no tissue) gives 0.0, not an error or a NaN.
    values[0] = math.nan
    count[0] = 0
    low, high = tail_order_statistics(values, count, count * 0, count * 0)
    assert low[0] == 0.0 and high[0] == 0.0


# ------------------------------------------------------------------------------ normaliser


def _reference_normalise(image: torch.Tensor, ref: StainNormalizer) -> torch.Tensor | None:
    """Macenko as torchstain writes it, one (3, H, W) float32 image in [0, 1] at a time: the
    maths of the batched code before it was made faster. None where it cannot be fitted."""
    io, alpha, beta = ref.io, ref.alpha, ref.beta
    od = -torch.log((image.reshape(3, -1) * 255 + 1) / io)
    tissue = od[:, (od >= beta).all(dim=0)]
    if tissue.shape[1] < max(50, math.ceil(0.01 * od.shape[1])):
        return None
    _, vecs = torch.linalg.eigh(torch.cov(tissue))
    plane = vecs[:, 1:3]
    proj = plane.T @ tissue
    phi = torch.atan2(proj[1], proj[0]).sort().values
    last = phi.numel() - 1
    lo, hi = phi[round(alpha / 100 * last)], phi[round((100 - alpha) / 100 * last)]
    v_min = plane @ torch.stack((lo.cos(), lo.sin()))
    v_max = plane @ torch.stack((hi.cos(), hi.sin()))
    he = torch.stack((v_min, v_max) if v_min[0] > v_max[0] else (v_max, v_min), dim=1)
    conc = torch.linalg.lstsq(he, od).solution  # (2, N)
    ranked = conc.sort(dim=1).values
    max_conc = ranked[:, round(0.99 * (ranked.shape[1] - 1))]
    conc = conc * (ref.max_concentrations / max_conc).unsqueeze(1)
    out = io * torch.exp(-(ref.stain_matrix @ conc)) / 255
    return out.clamp(0, 1).view_as(image)


def _he_like(seed: int, size: int, background: float) -> torch.Tensor:
    """An H&E-like image with white background over a share of it (float32, [0, 1])."""
    g = torch.Generator().manual_seed(seed)
    stains = torch.tensor([[0.65, 0.07], [0.70, 0.99], [0.29, 0.11]])
    stains = stains / stains.norm(dim=0)
    coarse = torch.rand(1, 3, size // 16, size // 16, generator=g)
    fields = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[0]
    conc = (0.3 + 1.2 * fields[:2]) * (fields[2:] > background)
    image = 0.94 * torch.exp(-torch.einsum("cs,shw->chw", stains, conc))
    image = image + 0.01 * torch.randn(3, size, size, generator=g)
    return (image.clamp(0, 1) * 255).round() / 255


def test_batched_macenko_equals_the_plain_per_image_maths():
    ref_image = _he_like(0, 128, 0.3)
    norm = StainNormalizer("macenko").fit(ref_image)
    batch = torch.stack([_he_like(s, 128, b) for s, b in ((1, 0.2), (2, 0.5), (3, 0.05))])
    out, fell_back = norm(batch)
    assert not fell_back.any()
    for image, got in zip(batch, out, strict=True):
        expected = _reference_normalise(image, norm)
        # Both float32, summing N = 16,384 pixels in other orders (covariance, least squares):
        # about sqrt(N) x eps = 128 x 6e-8 = 8e-6 relative on the stain vectors and maxima,
        # which I = 0.94 exp(-OD) with OD <= 3 on tissue turns into <= 3 x 8e-6 x 0.94 = 2e-5
        # per step; 1e-4 leaves room for a few such steps (measured here: 5e-7).
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["macenko", "macenko-h", "reinhard"])
def test_inplace_writes_the_same_result_over_the_batch_and_keeps_fallbacks(method):
    norm = StainNormalizer(method).fit(_he_like(0, 128, 0.3))
    white = torch.ones(3, 128, 128)  # no tissue: falls back, returned as read
    batch = torch.stack([_he_like(1, 128, 0.2), white, _he_like(2, 128, 0.5)])
    before = batch.clone()
    expected, fell_back = norm(batch)
    assert torch.equal(batch, before)  # not in place: the caller's batch is left alone
    assert fell_back.tolist() == [False, True, False]
    got, fell_back_inplace = norm(batch, inplace=True)
    assert got.data_ptr() == batch.data_ptr()
    assert torch.equal(got, expected) and torch.equal(fell_back_inplace, fell_back)
    assert torch.equal(got[1], white)
    from_uint8, _ = norm((before * 255).round().to(torch.uint8))
    assert from_uint8.dtype == torch.float32 and torch.equal(from_uint8, expected)


@pytest.mark.parametrize("method", ["macenko", "macenko-h", "reinhard"])
@pytest.mark.parametrize("layout", ["transposed", "channels_last", "strided"])
def test_any_memory_layout_gives_the_result_of_the_same_pixels_laid_out_plainly(method, layout):
    # A non-contiguous batch once made the normaliser write into a throw-away copy and return
    # uninitialised memory (off by 0.3 to 1e21), with no fallback flagged.
    norm = StainNormalizer(method).fit(_he_like(0, 128, 0.3))
    base = torch.stack([_he_like(1, 128, 0.2), _he_like(2, 128, 0.5)])
    if layout == "transposed":
        batch = base.transpose(2, 3)
    elif layout == "channels_last":
        batch = base.contiguous(memory_format=torch.channels_last)
    else:
        batch = torch.cat([base, base], dim=3)[..., ::2]
    assert not batch.is_contiguous()
    for dtype_batch in (batch, (batch * 255).round().to(torch.uint8)):
        got, fell_back = norm(dtype_batch)
        expected, expected_fell_back = norm(dtype_batch.contiguous())
        assert torch.equal(fell_back, expected_fell_back)
        # The same pixels in the same logical order; the bound is the float32 one derived in
        # test_batched_macenko_equals_the_plain_per_image_maths (sums in another order).
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
