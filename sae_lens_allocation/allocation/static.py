"""The static-shape path, used on every device but the CPU (package docstring, "Devices"):
candidates in a buffer of fixed capacity, exactly one host synchronisation per call, and a dense
fallback with none. Nothing else blocks the host: Mutual Choice's sampled positions are drawn
once per (T, device) and kept there, and Feature Choice's capacities go to the device by a
non-blocking copy (from pinned memory on CUDA)."""

from __future__ import annotations

import functools
import math

import torch

from sae_lens_allocation.allocation.cpu import (
    _BLOCK,
    _FAST_MIN_NUMEL,
    _FC_MIN_GROUPS,
    _MAX_BLOCK_DIVISOR,
    _MC_MARGIN,
    _MC_SAMPLE,
    _SEED,
    _block_maxima,
    _column_value_order,
    _exact_float,
)
from sae_lens_allocation.allocation.transfer import to_device_async

# Candidate capacity C = (expected count) * (1 + slack) + extra, see `_mutual_choice_static` and
# `_feature_choice_static`.
_FC_CAPACITY_SLACK = 1.0
_FC_CAPACITY_EXTRA = 1024


def _static_shapes(device: torch.device) -> bool:
    """Whether the static-shape path runs: on every device but the CPU, where data-dependent
    sizes cost nothing and the candidate path above is measured fastest."""
    return device.type != "cpu"


@functools.lru_cache(maxsize=8)
def _sample_positions(numel: int, device: torch.device) -> torch.Tensor:
    """The `_MC_SAMPLE` positions of Mutual Choice's sampled bound for T = numel: drawn on the
    host from the fixed seed (so they equal the CPU path's) and copied to the device once, without
    blocking."""
    generator = torch.Generator()
    generator.manual_seed(_SEED)
    return to_device_async(torch.randint(0, numel, (_MC_SAMPLE,), generator=generator), device)


def _host_bool(flag: torch.Tensor) -> bool:
    """The one host synchronisation of a static-shape call: read a 0-dim bool flag."""
    return bool(flag)


def _codes_static(
    flat: torch.Tensor, index: torch.Tensor | None, keep: torch.Tensor
) -> torch.Tensor:
    """Dense codes from the static path. With `index` (candidate buffer, padded with T): relu of
    the kept candidates scattered into T + 1 zeros, the padding landing in the extra slot, which
    is cut off. Without: `keep` is a dense mask and the codes are relu(flat) * keep."""
    if index is None:
        return flat.relu() * keep
    numel = flat.numel()
    values = flat.gather(0, index.clamp(max=max(numel - 1, 0))).relu() * keep
    return flat.new_zeros(numel + 1).scatter_(0, index, values)[:numel]


_SAME_WIDTH_INT = {torch.float64: torch.int64, torch.float32: torch.int32,
                   torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _just_below(bound: torch.Tensor) -> torch.Tensor:
    """t with (z > t) == (z >= b and z > 0) for every z of b's dtype (0-dim b): the largest value
    below b when b > 0 (one less in the bit pattern, exact for positive IEEE floats), 0 when
    b <= 0, b itself when b is NaN (nothing passes, as z >= NaN)."""
    previous = (bound.view(_SAME_WIDTH_INT[bound.dtype]) - 1).view(bound.dtype)
    return torch.where(bound > 0, previous, torch.where(bound <= 0, torch.zeros_like(bound), bound))


def _first_count(tied: torch.Tensor, need: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """tied & (running count of tied entries along `dim`, in index order, <= need): the first
    `need` tied entries (need 0-dim, or one per column), with no data-dependent size."""
    count_dtype = torch.int32 if tied.shape[dim] < 2**31 else torch.long
    return tied & (tied.cumsum(dim, dtype=count_dtype) <= need)


def _mutual_choice_static(
    z: torch.Tensor, m: int
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Mutual Choice with static shapes (z: N x F contiguous, 0 <= m <= N*F); returns (index or
    None, keep, cutoff) for `_codes_static`. One host synchronisation when the candidate path
    runs (N*F >= 65536), none otherwise.

    Candidates: entries with z >= b and z > 0, b the sampled bound of `_mutual_choice_sampled`
    (the r-th largest of s sampled entries). Capacity C = T (r + c sqrt(r) + c^2) / s, c =
    _MC_MARGIN: the count of entries >= b exceeds it only if Binomial(s, C/T) < r, a tail of about
    Phi(-c). The result is exact when the count is <= C and either >= m or b <= 0 (then every
    positive entry is a candidate); otherwise `_mutual_choice_dense` runs. C is at least
    T / _MAX_BLOCK_DIVISOR, the CPU path's limit, so ties at the bound rarely overflow it."""
    numel = z.numel()
    if m == 0:
        return None, torch.zeros(numel, dtype=torch.bool, device=z.device), z.new_tensor(float("inf"))
    p = m / numel
    mean = _MC_SAMPLE * p
    rank = math.ceil(mean + _MC_MARGIN * math.sqrt(mean * (1 - p)) + _MC_MARGIN)
    if numel < _FAST_MIN_NUMEL or rank > _MC_SAMPLE:
        return _mutual_choice_dense(z, m)
    capacity = min(
        numel,
        max(
            math.ceil(numel * (rank + _MC_MARGIN * math.sqrt(rank) + _MC_MARGIN**2) / _MC_SAMPLE),
            numel // _MAX_BLOCK_DIVISOR,  # room for ties at the bound, as on the CPU path
        ),
    )
    sample = _exact_float(z.view(-1).index_select(0, _sample_positions(numel, z.device)))
    bound = torch.kthvalue(sample, _MC_SAMPLE - rank + 1).values.to(z.dtype)
    flat = z.view(-1)
    # z >= b and z > 0 in one comparison; one slot more than C shows an overflow without a
    # separate count of the candidates (the list is in flat order, padding last).
    listed = torch.nonzero_static(flat > _just_below(bound), size=capacity + 1, fill_value=numel)
    overflow = listed[capacity, 0] < numel
    index = listed[:capacity, 0]
    real = index < numel
    values = _exact_float(flat.index_select(0, index.clamp(max=numel - 1)))
    values = torch.where(real, values, torch.full_like(values, float("-inf")))
    # At least m candidates: the m-th slot holds one (1 <= m <= C: C >= T r / s >= m).
    enough = index[m - 1] < numel
    # Fewer than m candidates with b <= 0: fewer than m positive entries, all kept (cut-off 0).
    top = torch.topk(values, min(m, capacity), sorted=False).values.min()
    cutoff = torch.where(enough, top, torch.zeros_like(top))
    above = values > cutoff
    keep = above | _first_count(values == cutoff, m - above.sum())
    complete = ~overflow & (enough | (bound <= 0))
    if not _host_bool(complete):
        return _mutual_choice_dense(z, m)
    return index, keep, cutoff.to(z.dtype)


def _mutual_choice_dense(z: torch.Tensor, m: int) -> tuple[None, torch.Tensor, torch.Tensor]:
    """Mutual Choice over all T entries with no host synchronisation: cutoff = the m-th largest
    relu(z) from `torch.topk`; keep the entries above it and the first tied ones in flat order
    (every positive entry when the cut-off is 0)."""
    acts = z.view(-1).relu()
    cutoff = torch.topk(acts, m, sorted=False).values.min()
    above = acts > cutoff
    keep = above | _first_count(acts == cutoff, m - above.sum())
    return None, torch.where(cutoff > 0, keep, acts > 0), cutoff


def _feature_choice_static(
    z: torch.Tensor, caps: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Feature Choice with static shapes (z: N x F contiguous; caps: host long tensor [F] in
    [0, N]); returns (index or None, keep, cutoff) for `_codes_static`. One host
    synchronisation when the candidate path runs (N*F >= 65536, N >= 8), none otherwise.

    Candidates: entries with z_j >= b_j, b_j the group-maxima bound of `_feature_choice_grouped`
    (never above the m_j-th largest z_j, so column j holds at least m_j of them). Capacity
    C = N * #(latents with no bound) + (1 + slack) * sum of the other m_j + extra; a count above
    C (heavy ties) runs `_feature_choice_dense`."""
    n_rows, n_latents = z.shape
    device = z.device
    if z.numel() < _FAST_MIN_NUMEL or n_rows < _BLOCK or n_latents == 0:
        return _feature_choice_dense(z, caps)
    maxima = _block_maxima(z)
    n_blocks = maxima.shape[0]
    typical = int(torch.kthvalue(caps, (99 * n_latents) // 100 + 1).values)
    groups = min(n_blocks, max(_FC_MIN_GROUPS, 2 * typical))
    bounded = caps <= groups
    depth = int(torch.where(bounded, caps, 0).max())
    capacity = min(
        z.numel(),
        n_rows * int((~bounded).sum())
        + math.ceil((1 + _FC_CAPACITY_SLACK) * int(torch.where(bounded, caps, 0).sum()))
        + _FC_CAPACITY_EXTRA,
    )
    dev_caps = to_device_async(caps, device)
    bound = torch.full((n_latents,), float("-inf"), dtype=z.dtype, device=device)
    if depth:
        group_maxima = maxima[: n_blocks // groups * groups].view(-1, groups, n_latents).amax(0)
        top = torch.topk(group_maxima.t().contiguous(), depth, dim=1).values
        from_groups = top.gather(1, (dev_caps.clamp(1, depth) - 1)[:, None]).squeeze(1)
        bound = torch.where((dev_caps <= groups) & (dev_caps >= 1), from_groups, bound)
    bound = torch.where(dev_caps == 0, torch.full_like(bound, float("inf")), bound)
    del maxima
    numel = z.numel()
    # One slot more than C shows an overflow without a separate count of the candidates.
    listed = torch.nonzero_static((z >= bound).view(-1), size=capacity + 1, fill_value=numel)
    overflow = listed[capacity, 0] < numel
    index = listed[:capacity, 0]
    real = index < numel
    values = z.view(-1).index_select(0, index.clamp(max=numel - 1))
    # Padding sorts after every real column.
    column = torch.where(real, index.remainder(n_latents), n_latents)
    order = _column_value_order(values, column)
    sorted_column = column.index_select(0, order)
    starts = torch.searchsorted(
        sorted_column, torch.arange(n_latents, device=device, dtype=sorted_column.dtype)
    )
    ends = torch.cat([starts + dev_caps, starts.new_zeros(1)])
    position = torch.arange(capacity, device=device)
    keep = position < ends.index_select(0, sorted_column)
    last = order.index_select(0, (starts + dev_caps - 1).clamp(0, capacity - 1))
    inf = torch.full((n_latents,), float("inf"), dtype=z.dtype, device=device)
    cutoff = torch.where(dev_caps > 0, values.index_select(0, last), inf)
    if not _host_bool(~overflow):
        return _feature_choice_dense(z, caps)
    return index.index_select(0, order), keep, cutoff


def _feature_choice_dense(
    z: torch.Tensor, caps: torch.Tensor
) -> tuple[None, torch.Tensor, torch.Tensor]:
    """Feature Choice over all of z with no host synchronisation: cutoff_j = the m_j-th largest
    z_j from `torch.topk` down the batch; keep the entries above it and the first tied rows."""
    n_rows, n_latents = z.shape
    inf = torch.full((n_latents,), float("inf"), dtype=z.dtype, device=z.device)
    depth = int(caps.max()) if caps.numel() else 0
    if depth == 0:
        return None, torch.zeros(z.numel(), dtype=torch.bool, device=z.device), inf
    dev_caps = to_device_async(caps, z.device)
    top = torch.topk(z, depth, dim=0).values
    last = top.gather(0, (dev_caps.clamp(min=1) - 1)[None, :]).squeeze(0)
    cutoff = torch.where(dev_caps > 0, last, inf)
    above = z > cutoff
    keep = above | _first_count(z == cutoff, dev_caps - above.sum(0))
    return None, keep.view(-1), cutoff
