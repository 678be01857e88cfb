"""Allocation rules: which (token, latent) entries of a batch's pre-activations are kept.

Pure functions (the only module state is a lock, see `_serial`). All leading dims are one batch
of N tokens: z is the N x F matrix of pre-activations, T = N * F, M = floor(k * N).

Exact and fast. `mutual_choice` and `feature_choice` keep exactly what a full `torch.topk` keeps
(up to the choice among tied entries, below) without sorting or partially sorting all T entries:

1. Lower bound t on the cut-off. Mutual Choice: an order statistic of 65536 entries sampled with
   replacement, low enough that at least M entries lie at or above it except with probability
   about 3e-6. Feature Choice: for latent j, the m_j-th largest of G disjoint row-group maxima of
   z_j; it is never above the m_j-th largest z_j, because those m_j group maxima are distinct
   entries of column j.
2. Candidates z >= t, found with one full-size pass: the maxima of blocks of 8 rows; only the
   blocks whose maximum passes are read again. About 1.5 M (MC) and 1.1 M (FC) candidates.
3. The exact cut-off among the candidates only: `kthvalue` (MC), one sort keyed by (latent,
   value) (FC). Every entry that is not a candidate is below it, so the selection is exact.
4. If the bound misses (fewer than M candidates; MC only) or passes too many blocks (more than
   T / 32, e.g. massive ties), the plain path runs: the exact cut-off from `torch.topk`, then every
   entry above it and the first tied entries. Inputs under 65536 entries always take it.

The sample decides only how fast the answer is found, never the answer; it comes from a
generator with a fixed seed, so runs are reproducible.

Devices. The steps above, as written for the CPU, read data-dependent sizes (`nonzero`, candidate
counts, `bool(...)`), and on a GPU each such read is a host synchronisation. On any device other
than the CPU the same rule runs with static shapes instead (`_static_shapes`):

- Candidates come from `nonzero_static` into a buffer of fixed capacity C, padded with the
  out-of-range index T; C is fixed from host-known numbers only (N, F, k and, for Feature Choice,
  the capacities, which live on the host). The exact cut-off and the tie rule are then computed
  with fixed-size tensors (`topk` of C values, a running count of tied entries).
- Exactly one host synchronisation per call (`_host_bool`): whether the candidates were complete
  (no overflow of C, and for Mutual Choice the sampled bound did not miss). If not, a dense path
  with no synchronisation at all runs (the exact cut-off from `torch.topk`, ties by a running
  count over all T entries); inputs under 65536 entries take it directly, with none.
- Feature Choice capacities given on the device cost one more synchronisation (one copy to the
  host); the plugin's SAEs pass them from the host.
The result is the same as on the CPU, bit for bit, tie rule included.

Ties at the cut-off (project definition): exactly the budget is kept (MC: M entries when at least
M exist; FC: min(m_j, N) per latent before the relu), and among the entries equal to the cut-off
those with the lowest index are kept: lowest flattened index for MC, lowest row for FC.
`torch.topk` may keep other tied entries; the kept values are the same multiset.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

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
# Static-shape path: candidate capacity C = (expected count) * (1 + slack) + extra, see
# `_mutual_choice_static` and `_feature_choice_static`.
_FC_CAPACITY_SLACK = 1.0
_FC_CAPACITY_EXTRA = 1024
# Guards the temporary one-thread setting of `_serial` (re-entrant: `_serial` nests).
_THREADS_LOCK = threading.RLock()


@dataclass
class Allocation:
    """Result of an allocation rule.

    codes: relu(pre_acts) at the kept entries, 0 elsewhere; same shape as pre_acts; autograd
        flows through the kept values.
    cutoff: the selection cut-off. Mutual Choice: 0-dim, the (k*N)-th largest relu(z) of the
        batch. Feature Choice: [F], the m_j-th largest z_j down the batch (+inf where m_j = 0).
    """

    codes: torch.Tensor
    cutoff: torch.Tensor


def budget(n_tokens: int, k: float) -> int:
    """M = floor(k * N), as SAELens BatchTopK computes it (`int(k * N)`)."""
    return int(k * n_tokens)


def mutual_choice(pre_acts: torch.Tensor, k: float) -> Allocation:
    """Mutual Choice (Ayonrinde 2024): keep the M = floor(k*N) largest entries of relu(z) over the
    whole N x F matrix, N = product of the leading dims (M capped at N*F; with fewer than M
    positive entries every positive one is kept). The operator of SAELens `batchtopk`.

    cutoff = the M-th largest relu(z) (+inf when M = 0). Ties at the cut-off: see the module doc.
    """
    if not k >= 0:
        raise ValueError(f"mutual_choice: k must be a number >= 0, got k={k!r}")
    flat = pre_acts.reshape(-1)
    n_tokens = pre_acts.shape[:-1].numel()
    m = min(budget(n_tokens, k), flat.numel())
    with torch.no_grad():
        z = flat.detach().contiguous().view(n_tokens, pre_acts.shape[-1])
        if _static_shapes(z.device):
            static = _mutual_choice_static(z, m)
        else:
            static = None
            picked = None
            if m > 0 and z.numel() >= _FAST_MIN_NUMEL:
                picked = _mutual_choice_sampled(z, m)
            if picked is None:
                picked = _mutual_choice_plain(z, m)
    if static is not None:
        index, keep, cutoff = static
        return Allocation(_codes_static(flat, index, keep).view(pre_acts.shape), cutoff)
    index, keep, cutoff = picked
    return Allocation(codes=_codes(flat, index, keep).reshape(pre_acts.shape), cutoff=cutoff)


def feature_choice(pre_acts: torch.Tensor, capacities: torch.Tensor) -> Allocation:
    """Feature Choice (Ayonrinde 2024): latent j keeps its m_j largest z_j down the batch, then
    relu ("at most m_j tokens"). `capacities` is an integer tensor [F]; m_j > N keeps all N.

    cutoff[j] = the min(m_j, N)-th largest z_j (+inf where m_j = 0). Ties: see the module doc.
    """
    n_latents = pre_acts.shape[-1]
    integer = not (capacities.is_floating_point() or capacities.is_complex())
    if capacities.shape != (n_latents,) or not integer:
        raise ValueError(
            f"feature_choice: capacities must be an integer tensor of shape ({n_latents},), got "
            f"dtype {capacities.dtype} and shape {tuple(capacities.shape)}"
        )
    flat = pre_acts.reshape(-1)
    with torch.no_grad():
        z = flat.detach().contiguous().view(pre_acts.shape[:-1].numel(), n_latents)
        static_shapes = _static_shapes(z.device)
        # With static shapes the capacities decide buffer sizes, so they are read on the host:
        # free when they are there already (as the plugin's SAEs pass them), one copy otherwise.
        caps = capacities.detach().to(device="cpu" if static_shapes else z.device, dtype=torch.long)
        if n_latents and bool((caps < 0).any()):
            raise ValueError(f"feature_choice: capacities must be >= 0, got min {int(caps.min())}")
        caps = caps.clamp(max=z.shape[0])
        if static_shapes:
            static = _feature_choice_static(z, caps)
        else:
            static = None
            picked = None
            if z.numel() >= _FAST_MIN_NUMEL:
                picked = _feature_choice_grouped(z, caps)
            if picked is None:
                picked = _feature_choice_plain(z, caps)
    if static is not None:
        index, keep, cutoff = static
        return Allocation(_codes_static(flat, index, keep).view(pre_acts.shape), cutoff)
    index, keep, cutoff = picked
    return Allocation(codes=_codes(flat, index, keep).reshape(pre_acts.shape), cutoff=cutoff)


# --- shared helpers ----------------------------------------------------------------------------


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
        satisfied = bool((taken >= need).all()) if per_column else taken >= need
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


# --- static shapes (every device but the CPU) ----------------------------------------------------


def _static_shapes(device: torch.device) -> bool:
    """Whether the static-shape path runs: on every device but the CPU, where data-dependent
    sizes cost nothing and the candidate path above is measured fastest."""
    return device.type != "cpu"


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
    generator = torch.Generator()
    generator.manual_seed(_SEED)
    # Drawn on the host (the draws depend on T only) and copied over: no device generator needed.
    draws = torch.randint(0, numel, (_MC_SAMPLE,), generator=generator).to(z.device)
    sample = _exact_float(z.view(-1).index_select(0, draws))
    bound = torch.kthvalue(sample, _MC_SAMPLE - rank + 1).values.to(z.dtype)
    flat = z.view(-1)
    mask = (flat >= bound) & (flat > 0)
    count = mask.sum()
    index = torch.nonzero_static(mask, size=capacity, fill_value=numel).squeeze(1)
    del mask
    real = index < numel
    values = _exact_float(flat.index_select(0, index.clamp(max=numel - 1)))
    values = torch.where(real, values, torch.full_like(values, float("-inf")))
    enough = count >= m
    # Fewer than m candidates with b <= 0: fewer than m positive entries, all kept (cut-off 0).
    top = torch.topk(values, min(m, capacity), sorted=False).values.min()
    cutoff = torch.where(enough, top, torch.zeros_like(top))
    above = values > cutoff
    keep = above | _first_count(values == cutoff, m - above.sum())
    complete = (count <= capacity) & (enough | (bound <= 0))
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
    dev_caps = caps.to(device)
    bound = torch.full((n_latents,), float("-inf"), dtype=z.dtype, device=device)
    if depth:
        group_maxima = maxima[: n_blocks // groups * groups].view(-1, groups, n_latents).amax(0)
        top = torch.topk(group_maxima.t().contiguous(), depth, dim=1).values
        from_groups = top.gather(1, (dev_caps.clamp(1, depth) - 1)[:, None]).squeeze(1)
        bound = torch.where(bounded.to(device) & (dev_caps >= 1), from_groups, bound)
    bound = torch.where(dev_caps == 0, torch.full_like(bound, float("inf")), bound)
    del maxima
    mask = z >= bound
    count = mask.sum()
    numel = z.numel()
    index = torch.nonzero_static(mask.view(-1), size=capacity, fill_value=numel).squeeze(1)
    del mask
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
    if not _host_bool(count <= capacity):
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
    dev_caps = caps.to(z.device)
    top = torch.topk(z, depth, dim=0).values
    last = top.gather(0, (dev_caps.clamp(min=1) - 1)[None, :]).squeeze(0)
    cutoff = torch.where(dev_caps > 0, last, inf)
    above = z > cutoff
    keep = above | _first_count(z == cutoff, dev_caps - above.sum(0))
    return None, keep.view(-1), cutoff


# --- capacities --------------------------------------------------------------------------------


def uniform_capacities(
    n_tokens: int, d_sae: int, k: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """m_j = floor(M/F) or floor(M/F)+1 with randomised rounding: the M - F*floor(M/F) extra units
    go to latents drawn without replacement, so sum_j m_j = M = floor(k*N) exactly and
    E[m_j] = M/F. Project definition (algorithms.md)."""
    if d_sae < 1 or not k >= 0:
        raise ValueError(
            f"uniform capacities need d_sae >= 1 and k >= 0, got d_sae={d_sae}, k={k!r}"
        )
    m = budget(n_tokens, k)
    base, extra = divmod(m, d_sae)
    caps = torch.full((d_sae,), base, dtype=torch.long)
    if extra:
        caps[torch.randperm(d_sae, generator=generator)[:extra]] += 1
    return caps


def zipf_targets(n_tokens: int, k: float, ranks: torch.Tensor, exponent: float) -> torch.Tensor:
    """Real-valued Zipf capacities r_j = clip(c * rank_j^(-s), 1, N), c chosen so that
    sum_j r_j = M = floor(k*N) (float64 [F]); `zipf_capacities` rounds them, E[m_j] = r_j.
    Project definition (algorithms.md); requires F <= M <= F*N and s >= 0."""
    d_sae = ranks.numel()
    m = budget(n_tokens, k)
    if not d_sae <= m <= d_sae * n_tokens:
        raise ValueError(
            f"zipf capacities need d_sae <= floor(k*N) <= d_sae*N, got d_sae={d_sae}, "
            f"floor(k*N)={m}, N={n_tokens}"
        )
    if not 0 <= exponent < math.inf:
        raise ValueError(f"zipf capacities need a finite exponent >= 0, got {exponent!r}")
    weights = ranks.detach().cpu().double().clamp(min=1).pow(-exponent)

    def total(scale: float) -> float:
        return float((weights * scale).clamp(1, n_tokens).sum())

    # sum_j clip(c w_j, 1, N) rises monotonically from F (c <= 1/max w) to F*N (c >= N/min w):
    # bisect log c, keeping the lower end so that sum_j r_j <= M.
    low, high = 1 / float(weights.max()), n_tokens / float(weights.min())
    for _ in range(200):
        mid = math.sqrt(low * high)
        if mid in (low, high):
            break
        low, high = (mid, high) if total(mid) <= m else (low, mid)
    return (weights * low).clamp(1, n_tokens)


def zipf_capacities(
    n_tokens: int,
    k: float,
    ranks: torch.Tensor,
    exponent: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """m_j proportional to rank_j^(-s), floored at 1, capped at N, renormalised to sum
    M = floor(k*N): the real targets r_j of `zipf_targets`, rounded to floor(r_j) or ceil(r_j)
    by systematic randomised rounding (random order, one uniform draw), so sum_j m_j = M exactly,
    1 <= m_j <= N and E[m_j] = r_j. `ranks` are 1-based (1 = most frequent). Project definition
    (algorithms.md); requires F <= M <= F*N."""
    targets = zipf_targets(n_tokens, k, ranks, exponent)
    m = budget(n_tokens, k)
    floors = targets.floor()
    extra = m - int(floors.sum())
    caps = floors.long()
    if extra == 0:
        return caps
    fractions = targets - floors
    # Scale the fractions to sum exactly to the integer `extra`; then the ceil(C - u) increments of
    # their cumulative sum C (each 0 or 1) add up to exactly `extra`, each with probability = share.
    order = torch.randperm(ranks.numel(), generator=generator)
    shares = (fractions[order] * (extra / float(fractions.sum()))).clamp(max=1)
    cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), shares.cumsum(0)])
    cumulative[-1] = extra
    offset = torch.rand(1, generator=generator, dtype=torch.float64)
    steps = torch.ceil(cumulative - offset).long().diff()
    caps[order] += steps
    return caps


def ranks_from_frequency(freq: torch.Tensor, tie_break: torch.Tensor | None = None) -> torch.Tensor:
    """1-based ranks by descending frequency, for `zipf_capacities`: rank 1 = largest `freq`;
    equal `freq` ordered by descending `tie_break` (when given), then by index."""
    order = torch.arange(freq.numel(), device=freq.device)
    if tie_break is not None:
        order = torch.argsort(tie_break.float(), descending=True, stable=True)
    # Stable sorts: the last key sorted is the primary one, earlier orders break its ties.
    order = order[torch.argsort(freq.float()[order], descending=True, stable=True)]
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(1, freq.numel() + 1, device=freq.device)
    return ranks
