"""The CPU candidate path (steps 1-4 of the package docstring) and the helpers every path
shares: a sampled or group-maxima lower bound, candidates from block maxima, the exact cut-off
among the candidates, and the plain `torch.topk` path when the bound misses."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

# The sample changes speed, never results; a fixed seed makes runs reproducible.
_SEED = 0x5AE
# Below this many entries the plain path is used (the candidate machinery does not pay off).
_FAST_MIN_NUMEL = 1 << 16
# Rows per block of the block maxima that locate candidates.
_BLOCK = 8
# The candidate path gives up when more than T / _MAX_BLOCK_DIVISOR blocks pass (T / 4 entries to
# read again): too many to pay off, e.g. massive ties at the cut-off.
_MAX_BLOCK_DIVISOR = 32
# Mutual Choice: sample size and safety margin (standard deviations of the sample count).
_MC_SAMPLE = 1 << 16
_MC_MARGIN = 4.5
# Feature Choice: at least this many row groups for the bound (more groups, tighter bound).
_FC_MIN_GROUPS = 32
# Entries compared per chunk when collecting tied entries (no full-size mask).
_TIE_CHUNK = 1 << 22
# Guards the temporary one-thread setting of `_serial` (re-entrant: `_serial` nests).
_THREADS_LOCK = threading.RLock()


def _codes(flat: torch.Tensor, index: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Dense codes: relu(flat) at `index` (times `keep`), 0 elsewhere. Gathering from `flat` keeps
    autograd on the kept values only (gradient 1 at kept positive entries, as relu + topk gives);
    scattering in place into fresh zeros avoids the extra full-size copy of `zeros.scatter`."""
    values = flat.gather(0, index).relu()
    if keep is not None:
        values = values * keep
    return flat.new_zeros(flat.shape).scatter_(0, index, values)


def _empty_index(z: torch.Tensor) -> torch.Tensor:
    return torch.zeros(0, dtype=torch.long, device=z.device)


@contextmanager
def _serial(device: torch.device) -> Iterator[None]:
    """Run candidate-sized work (about M entries, far below T) on one CPU thread. ATen splits
    element-wise work of 32768 or more entries over its thread team; for arrays this small the
    fork/join costs more than it saves, and on a busy CPU each of the ~30 such ops can wait
    milliseconds for a core (measured: 2-3x slower end to end). The full-size passes stay
    parallel. The thread count is process-wide: the lock keeps concurrent callers from restoring
    each other's setting, and it is restored on exit, also on error."""
    if device.type != "cpu":
        yield
        return
    with _THREADS_LOCK:
        threads = torch.get_num_threads()
        if threads > 1:
            torch.set_num_threads(1)
        try:
            yield
        finally:
            if threads > 1:
                torch.set_num_threads(threads)


def _flat_nonzero(mask: torch.Tensor) -> torch.Tensor:
    """Indices of the True entries of a contiguous 1-D bool tensor, ascending. On CPU, for sparse
    masks, finding the non-zero 8-byte words first and then the set bytes inside those words only
    is several times faster than `nonzero` over every byte."""
    if mask.device.type != "cpu":
        return mask.nonzero().squeeze(1)
    n8 = mask.numel() // 8 * 8
    words = mask[:n8].view(torch.int64).nonzero().squeeze(1)
    with _serial(mask.device):
        within = mask[:n8].view(-1, 8).index_select(0, words).nonzero()
        index = torch.add(within[:, 1], words.index_select(0, within[:, 0]), alpha=8)
        if n8 < mask.numel():
            index = torch.cat([index, mask[n8:].nonzero().squeeze(1) + n8])
    return index


def _block_maxima(z: torch.Tensor) -> torch.Tensor:
    """Maxima of z (N x F) over blocks of _BLOCK consecutive rows: [N // _BLOCK, F]. The only
    full-size pass of the candidate path; the last N mod _BLOCK rows are in no block."""
    n_blocks = z.shape[0] // _BLOCK
    return z[: n_blocks * _BLOCK].view(n_blocks, _BLOCK, z.shape[1]).amax(1)


def _passing_blocks(
    maxima: torch.Tensor, bound: torch.Tensor, compare: Callable[..., torch.Tensor]
) -> torch.Tensor:
    """Flat positions (block * F + column, ascending) of the blocks whose maximum passes."""
    return _flat_nonzero(compare(maxima, bound).view(-1))


def _block_entries(
    z: torch.Tensor, bound: torch.Tensor, blocks: torch.Tensor, compare: Callable[..., torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices and values of the entries of z (N x F) that pass compare(z, bound) (bound
    0-dim or [F]), given the passing `blocks` of `_passing_blocks`; the rows in no block are
    checked directly. Within each column the entries come in ascending row order."""
    n_rows, width = z.shape
    column = blocks.remainder(width)
    first = torch.add(blocks * _BLOCK, column, alpha=1 - _BLOCK)  # flat index of the block's row 0
    flat = (first[:, None] + torch.arange(_BLOCK, device=z.device) * width).view(-1)
    values = z.view(-1).index_select(0, flat).view(-1, _BLOCK)
    column_bound = bound if bound.dim() == 0 else bound.index_select(0, column)[:, None]
    passed = compare(values, column_bound).view(-1).nonzero().squeeze(1)
    index = flat.index_select(0, passed)
    values = values.view(-1).index_select(0, passed)
    done = n_rows // _BLOCK * _BLOCK
    if done < n_rows:
        rest = z[done:]
        passed = compare(rest, bound).view(-1).nonzero().squeeze(1)
        index = torch.cat([index, passed + done * width])
        values = torch.cat([values, rest.reshape(-1).index_select(0, passed)])
    return index, values


def _entries_above(z: torch.Tensor, cutoff: torch.Tensor) -> torch.Tensor:
    """Flat indices of the entries of z strictly above `cutoff` (0-dim or [F])."""
    blocks = _passing_blocks(_block_maxima(z), cutoff, torch.gt)
    with _serial(z.device):
        return _block_entries(z, cutoff, blocks, torch.gt)[0]


def _first_ties(z: torch.Tensor, cutoff: torch.Tensor, need: torch.Tensor | int) -> torch.Tensor:
    """Flat indices of the first `need` entries of z (N x F) equal to `cutoff`: in flat order when
    cutoff is 0-dim and need an int, per column in row order when both are [F]. Chunked over rows,
    so no full-size mask is made even when almost every entry ties."""
    n_rows, width = z.shape
    per_column = cutoff.dim() == 1
    step = max(1, _TIE_CHUNK // max(width, 1))
    taken = torch.zeros(width, dtype=torch.long, device=z.device) if per_column else 0
    found = [_empty_index(z)]
    for start in range(0, n_rows, step):
        satisfied = bool((taken >= need).all()) if isinstance(taken, torch.Tensor) else taken >= need
        if satisfied:
            break
        equal = z[start : start + step] == cutoff
        if per_column:
            rank = equal.cumsum(0) + taken
            taken = taken + equal.sum(0)
            index = _flat_nonzero((equal & (rank <= need)).view(-1))
        else:
            index = _flat_nonzero(equal.view(-1))[: need - taken]
            taken += index.numel()
        found.append(index + start * width)
    return torch.cat(found)


# --- Mutual Choice -----------------------------------------------------------------------------


def _mutual_choice_sampled(
    z: torch.Tensor, m: int, max_blocks: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Candidate path for Mutual Choice (z: N x F contiguous, 0 < m <= N*F). Returns (index,
    keep, cutoff) for `_codes`, or None when the bound misses or more than `max_blocks` blocks
    (default T / _MAX_BLOCK_DIVISOR) pass.

    Bound: draw s entries with replacement; with p = m / T, the r-th largest sample value,
    r = ceil(s p + c sqrt(s p (1 - p)) + c), c = _MC_MARGIN, has at least m entries of z at or
    above it unless Binomial(s, p) >= r, a tail of about Phi(-c) = 3e-6."""
    numel = z.numel()
    p = m / numel
    mean = _MC_SAMPLE * p
    rank = math.ceil(mean + _MC_MARGIN * math.sqrt(mean * (1 - p)) + _MC_MARGIN)
    if rank > _MC_SAMPLE:
        return None
    generator = torch.Generator(device=z.device)
    generator.manual_seed(_SEED)
    with _serial(z.device):
        draws = torch.randint(0, numel, (_MC_SAMPLE,), generator=generator, device=z.device)
        sample = _exact_float(z.view(-1).index_select(0, draws))
        bound = torch.kthvalue(sample, _MC_SAMPLE - rank + 1).values.to(z.dtype)
    if not bool(bound > 0):
        return None
    blocks = _passing_blocks(_block_maxima(z), bound, torch.ge)
    if blocks.numel() > (numel // _MAX_BLOCK_DIVISOR if max_blocks is None else max_blocks):
        return None
    with _serial(z.device):
        index, values = _block_entries(z, bound, blocks, torch.ge)
        if index.numel() < m:
            return None
        return _select_top(index, values, m)


def _exact_float(values: torch.Tensor) -> torch.Tensor:
    """float32 for 16- and 32-bit floats (exact), float64 kept."""
    return values if values.dtype == torch.float64 else values.float()


def _select_top(
    index: torch.Tensor, values: torch.Tensor, m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the m largest of `values` (> 0, at least m of them, at flat positions `index`); ties
    at the cut-off go to the lowest flat indices."""
    work = _exact_float(values)
    cutoff = torch.kthvalue(work, work.numel() - m + 1).values
    keep = work >= cutoff
    excess = int(keep.sum()) - m
    if excess:
        tied = work == cutoff
        last = torch.kthvalue(index[tied], int(tied.sum()) - excess).values
        keep = (work > cutoff) | (tied & (index <= last))
    return index, keep, cutoff.to(values.dtype)


def _mutual_choice_plain(
    z: torch.Tensor, m: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Exact cut-off from `torch.topk` of relu(z); keep every entry above it and the first ties."""
    if m == 0:
        return _empty_index(z), None, z.new_tensor(float("inf"))
    acts = z.view(-1).relu()
    cutoff = torch.topk(acts, m, sorted=False).values.min()
    if not bool(cutoff > 0):
        # Fewer than m positive entries: every positive one is kept; the tied zeros add nothing.
        return (acts > 0).nonzero().squeeze(1), None, cutoff
    del acts
    above = _entries_above(z, cutoff)
    return torch.cat([above, _first_ties(z, cutoff, m - above.numel())]), None, cutoff


def _mutual_choice_pick(
    z: torch.Tensor, m: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(index, keep, cutoff) for `_codes`: the candidate path when it applies and its bound
    holds, the plain path otherwise."""
    picked = _mutual_choice_sampled(z, m) if m > 0 and z.numel() >= _FAST_MIN_NUMEL else None
    return _mutual_choice_plain(z, m) if picked is None else picked


# --- Feature Choice ----------------------------------------------------------------------------


def _feature_choice_grouped(
    z: torch.Tensor, caps: torch.Tensor, max_blocks: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Candidate path for Feature Choice (z: N x F contiguous, caps in [0, N]). Returns (index,
    keep, cutoff) for `_codes`, or None when N < _BLOCK or more than `max_blocks` blocks (default
    T / _MAX_BLOCK_DIVISOR) pass.

    Bound: deal the blocks of _BLOCK rows round-robin into G disjoint groups and take each
    group's maximum of z_j; the m_j-th largest of the G maxima is <= the m_j-th largest z_j,
    since those m_j maxima are distinct entries of column j. Latents with m_j > G get no bound
    (all N rows are candidates)."""
    n_rows, n_latents = z.shape
    maxima = _block_maxima(z)
    n_blocks = maxima.shape[0]
    if n_blocks == 0 or n_latents == 0:
        return None
    typical = int(torch.kthvalue(caps, (99 * n_latents) // 100 + 1).values)  # 99th percentile
    groups = min(n_blocks, max(_FC_MIN_GROUPS, 2 * typical))
    group_maxima = maxima[: n_blocks // groups * groups].view(-1, groups, n_latents).amax(0)
    depth = int(torch.where(caps <= groups, caps, 0).max())
    bound = torch.full((n_latents,), float("-inf"), dtype=z.dtype, device=z.device)
    if depth:
        top = torch.topk(group_maxima.t().contiguous(), depth, dim=1).values
        from_groups = top.gather(1, (caps.clamp(1, depth) - 1)[:, None]).squeeze(1)
        bound = torch.where((caps >= 1) & (caps <= groups), from_groups, bound)
    bound = torch.where(caps == 0, torch.full_like(bound, float("inf")), bound)
    blocks = _passing_blocks(maxima, bound, torch.ge)
    if blocks.numel() > (z.numel() // _MAX_BLOCK_DIVISOR if max_blocks is None else max_blocks):
        return None
    with _serial(z.device):
        return _select_per_latent(*_block_entries(z, bound, blocks, torch.ge), caps)


def _select_per_latent(
    index: torch.Tensor, values: torch.Tensor, caps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep, per latent j, the caps[j] largest candidates of column j (candidates at flat
    positions `index`, in ascending row order within each column; column j holds at least caps[j]
    of them and every entry of z_j above its cut-off). Ties go to the lowest rows. One stable sort
    by (column, value descending); rank within the column < caps[j] is kept."""
    n_latents = caps.numel()
    column = index.remainder(n_latents)
    order = _column_value_order(values, column)
    sorted_column = column.index_select(0, order)
    starts = torch.searchsorted(
        sorted_column, torch.arange(n_latents, device=index.device, dtype=sorted_column.dtype)
    )
    position = torch.arange(index.numel(), device=index.device)
    keep = position < (starts + caps).index_select(0, sorted_column)
    inf = torch.full((n_latents,), float("inf"), dtype=values.dtype, device=values.device)
    if not index.numel():
        return index, keep, inf
    last = order.index_select(0, (starts + caps - 1).clamp(0, index.numel() - 1))
    cutoff = torch.where(caps > 0, values.index_select(0, last), inf)
    return index.index_select(0, order), keep, cutoff


def _column_value_order(values: torch.Tensor, column: torch.Tensor) -> torch.Tensor:
    """Permutation sorting by column ascending, then value descending, then input order.

    Floats of at most 32 bits go into one int64 key, column * 2^32 + d, where d is the value's
    float32 bit pattern b mapped to a signed 32-bit integer that decreases as the value increases
    (d = b ^ (~(b >> 31) | INT32_MIN)); one stable integer sort then does it."""
    if values.dtype == torch.float64:
        by_value = torch.sort(values, descending=True, stable=True).indices
        by_column = torch.sort(column.index_select(0, by_value), stable=True).indices
        return by_value.index_select(0, by_column)
    bits = (values.float() + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0 (they tie)
    descending = bits ^ ((~bits >> 31) | torch.iinfo(torch.int32).min)
    return torch.sort(torch.add(descending.long(), column, alpha=1 << 32), stable=True).indices


def _feature_choice_plain(
    z: torch.Tensor, caps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Exact per-latent cut-offs from `torch.topk` down the batch; keep every entry above the
    cut-off and the first tied rows."""
    n_latents = z.shape[1]
    inf = torch.full((n_latents,), float("inf"), dtype=z.dtype, device=z.device)
    depth = int(caps.max()) if caps.numel() else 0
    if depth == 0:
        return _empty_index(z), None, inf
    top = torch.topk(z, depth, dim=0).values
    cutoff = torch.where(caps > 0, top.gather(0, (caps.clamp(min=1) - 1)[None, :]).squeeze(0), inf)
    above = _entries_above(z, cutoff)
    count = torch.zeros(n_latents, dtype=torch.long, device=z.device)
    count.index_add_(0, above.remainder(n_latents), torch.ones_like(above))
    return torch.cat([above, _first_ties(z, cutoff, caps - count)]), None, cutoff


def _feature_choice_pick(
    z: torch.Tensor, caps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(index, keep, cutoff) for `_codes`: the candidate path when it applies and passes few
    enough blocks, the plain path otherwise."""
    picked = _feature_choice_grouped(z, caps) if z.numel() >= _FAST_MIN_NUMEL else None
    return _feature_choice_plain(z, caps) if picked is None else picked
