"""Allocation rules: which (token, latent) entries of a batch's pre-activations are kept.

Pure functions, no module state. All leading dims are one batch of N tokens; z is the N x F
matrix of pre-activations, T = N * F its number of entries.

Exactness and speed. `mutual_choice` and `feature_choice` return exactly the selection of a full
`torch.topk`, but do not sort or partially sort the whole matrix:

1. A cheap lower bound t on the cut-off is found (MC: an order statistic of a random sample of
   entries, with a safety margin; FC: for latent j, the m_j-th largest of G disjoint row-group
   maxima of z_j, which is never above the m_j-th largest z_j because the m_j largest group maxima
   are m_j distinct entries).
2. One pass over z collects the candidates z >= t (typically about 1.2 M entries for MC and a
   little over M for FC, out of T).
3. The exact cut-off is selected among the candidates only (MC: `kthvalue`; FC: one sort of the
   candidates keyed by (latent, value)), so every non-candidate is below it.
4. If the candidates cannot contain the answer (MC sample estimate too high: fewer than M
   candidates) or are too many to pay off (more than T / 8, e.g. massive ties), the plain path
   runs instead: the exact cut-off from `torch.topk`, then the same keep rule.

The random sample only decides how fast the answer is found, never the answer; it is drawn from a
generator with a fixed seed, so runs are reproducible.

Ties at the cut-off (project definition): exactly the budget is kept (MC: M entries when at least
M exist; FC: min(m_j, N) per latent), and among entries equal to the cut-off those with the lowest
index are kept (flattened index for MC, row for FC). `torch.topk` may keep other tied entries; the
kept values are the same multiset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Sampling only changes speed, never results, so a fixed seed costs nothing and gives reproducibility.
_SEED = 0x5AE
# Below this many entries the plain path is as fast and has no overhead.
_FAST_MIN_NUMEL = 1 << 16
# Entries compared per chunk on CPU: the chunk's mask stays in cache and nothing of size T is made.
_CPU_CHUNK = 1 << 22
# Mutual Choice: sample size and safety margin (standard deviations of the sample count).
_MC_SAMPLE = 1 << 16
_MC_MARGIN = 4.5
# The candidate path is abandoned above T / _MAX_CANDIDATE_DIVISOR candidates.
_MAX_CANDIDATE_DIVISOR = 8
# Feature Choice: at least this many row groups, and rows read per group row (1 in _FC_ROW_STRIDE).
_FC_MIN_GROUPS = 32
_FC_ROW_STRIDE = 4


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
    whole N x F matrix, N = product of the leading dims. Equal to SAELens `batchtopk`.

    cutoff = the M-th largest relu(z) (+inf when M = 0). Ties at the cut-off: see the module doc.
    """
    if not k >= 0:
        raise ValueError(f"mutual_choice: k must be a number >= 0, got k={k!r}")
    flat = pre_acts.reshape(-1)
    n_tokens = pre_acts.shape[:-1].numel()
    m = min(budget(n_tokens, k), flat.numel())
    with torch.no_grad():
        z = flat.detach().contiguous().view(n_tokens, pre_acts.shape[-1])
        picked = None
        if m > 0 and z.numel() >= _FAST_MIN_NUMEL:
            picked = _mutual_choice_sampled(z, m)
        if picked is None:
            picked = _mutual_choice_plain(z, m)
    index, keep, cutoff = picked
    return Allocation(codes=_codes(flat, index, keep).reshape(pre_acts.shape), cutoff=cutoff)


def feature_choice(pre_acts: torch.Tensor, capacities: torch.Tensor) -> Allocation:
    """Feature Choice (Ayonrinde 2024): latent j keeps its m_j largest z_j down the batch, then
    relu ("at most m_j tokens"). `capacities` is an integer tensor [F]; m_j > N keeps all N.

    cutoff[j] = the min(m_j, N)-th largest z_j (+inf where m_j = 0). Ties: see the module doc.
    """
    n_latents = pre_acts.shape[-1]
    if capacities.shape != (n_latents,) or capacities.is_floating_point() or capacities.is_complex():
        raise ValueError(
            f"feature_choice: capacities must be an integer tensor of shape ({n_latents},), got "
            f"dtype {capacities.dtype} and shape {tuple(capacities.shape)}"
        )
    flat = pre_acts.reshape(-1)
    with torch.no_grad():
        z = flat.detach().contiguous().view(pre_acts.shape[:-1].numel(), n_latents)
        caps = capacities.to(device=z.device, dtype=torch.long)
        if n_latents and bool((caps < 0).any()):
            raise ValueError(f"feature_choice: capacities must be >= 0, got min {int(caps.min())}")
        caps = caps.clamp(max=z.shape[0])
        picked = None
        if z.numel() >= _FAST_MIN_NUMEL:
            picked = _feature_choice_grouped(z, caps)
        if picked is None:
            picked = _feature_choice_plain(z, caps)
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


def _chunk_size(z: torch.Tensor) -> int:
    """One chunk on accelerators (one host sync); cache-sized chunks on CPU."""
    return max(z.numel(), 1) if z.device.type != "cpu" else _CPU_CHUNK


def _flat_nonzero(mask: torch.Tensor) -> torch.Tensor:
    """Indices of the True entries of a 1-D bool tensor, ascending. On CPU, for sparse masks,
    scanning 8-byte words first and then only the words with a hit is several times faster."""
    n = mask.numel()
    if mask.device.type != "cpu" or n % 8:
        return mask.nonzero().squeeze(1)
    words = mask.view(torch.int64).nonzero().squeeze(1)
    hits = mask.view(-1, 8).index_select(0, words).nonzero()
    return words[hits[:, 0]] * 8 + hits[:, 1]


def _candidates(z: torch.Tensor, threshold: torch.Tensor, limit: int | None) -> torch.Tensor | None:
    """Flat indices (ascending) of the entries of z (N x F, contiguous) that are >= threshold
    (a scalar, or [F] broadcast over rows). None as soon as more than `limit` are found."""
    n_rows, width = z.shape
    step = max(1, _chunk_size(z) // max(width, 1))
    buffer = torch.empty(min(step, n_rows) * width + 8, dtype=torch.bool, device=z.device)
    found = [_empty_index(z)]
    total = 0
    for start in range(0, n_rows, step):
        block = z[start : start + step]
        n = block.numel()
        mask = buffer[: -(-n // 8) * 8]
        mask[n:].zero_()
        torch.ge(block, threshold, out=mask[:n].view(block.shape))
        index = _flat_nonzero(mask)
        total += index.numel()
        if limit is not None and total > limit:
            return None
        found.append(index + start * width)
    return torch.cat(found)


def _candidate_limit(numel: int) -> int:
    return numel // _MAX_CANDIDATE_DIVISOR


# --- Mutual Choice -----------------------------------------------------------------------------


def _mutual_choice_sampled(
    z: torch.Tensor, m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Candidate path for Mutual Choice (z: N x F contiguous, 0 < m <= N*F). Returns (index,
    keep, cutoff) or None when the sampled bound misses or yields too many candidates.

    Bound: draw s entries with replacement; with p = m / T, the r-th largest sample value,
    r = ceil(s p + c sqrt(s p (1 - p)) + c), c = _MC_MARGIN, has at least m entries of z above it
    unless Binomial(s, p) >= r, a tail of about Phi(-c) (3e-6)."""
    numel = z.numel()
    generator = torch.Generator(device=z.device)
    generator.manual_seed(_SEED)
    draws = torch.randint(0, numel, (_MC_SAMPLE,), generator=generator, device=z.device)
    sample = z.view(-1)[draws]
    sample = sample if sample.dtype == torch.float64 else sample.float()
    p = m / numel
    mean = _MC_SAMPLE * p
    rank = math.ceil(mean + _MC_MARGIN * math.sqrt(mean * (1 - p)) + _MC_MARGIN)
    if rank > _MC_SAMPLE:
        return None
    bound = torch.kthvalue(sample, _MC_SAMPLE - rank + 1).values.to(z.dtype)
    if not bool(bound > 0):
        return None
    index = _candidates(z, bound, _candidate_limit(numel))
    if index is None or index.numel() < m:
        return None
    return _select_top(z, index, m)


def _select_top(
    z: torch.Tensor, index: torch.Tensor, m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the m largest of z[index] (index ascending, values > 0, numel >= m); ties at the
    cut-off go to the lowest indices."""
    values = z.view(-1)[index]
    work = values if values.dtype == torch.float64 else values.float()
    cutoff = torch.kthvalue(work, work.numel() - m + 1).values
    above = work > cutoff
    tied = work == cutoff
    keep = above | (tied & (tied.cumsum(0) <= m - above.sum()))
    return index, keep, cutoff.to(z.dtype)


def _mutual_choice_plain(
    z: torch.Tensor, m: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Exact cut-off from `torch.topk` of relu(z), then the same keep rule as the candidate path."""
    if m == 0:
        return _empty_index(z), None, z.new_tensor(float("inf"))
    acts = z.view(-1).relu()
    cutoff = torch.topk(acts, m, sorted=False).values.min()
    if not bool(cutoff > 0):
        # Fewer than m positive entries: every positive one is kept; the tied zeros add nothing.
        return (acts > 0).nonzero().squeeze(1), None, cutoff
    del acts
    index = _candidates(z, cutoff, None)
    return _select_top(z, index, m)


def _empty_index(z: torch.Tensor) -> torch.Tensor:
    return torch.zeros(0, dtype=torch.long, device=z.device)


# --- Feature Choice ----------------------------------------------------------------------------


def _feature_choice_grouped(
    z: torch.Tensor, caps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Candidate path for Feature Choice (z: N x F contiguous, caps in [0, N]). Returns (index,
    keep, cutoff) or None when the candidates are too many to pay off.

    Bound: split (a strided subset of) the rows into G disjoint groups and take each group's
    maximum of z_j; the m_j-th largest of the G maxima is <= the m_j-th largest z_j, since those
    m_j maxima are distinct entries of column j. Latents with m_j > G get no bound (-inf)."""
    n_rows, n_latents = z.shape
    if n_rows == 0 or n_latents == 0:
        return None
    typical = int(caps.sort().values[(99 * n_latents) // 100])
    groups = min(n_rows, max(_FC_MIN_GROUPS, 2 * typical))
    stride = max(1, min(_FC_ROW_STRIDE, n_rows // groups))
    per_group = n_rows // (groups * stride)
    maxima = (
        z[: per_group * groups * stride]
        .view(per_group, groups, stride, n_latents)[:, :, 0, :]
        .amax(0)
    )
    depth = int(torch.where(caps <= groups, caps, 0).max())
    bound = torch.full((n_latents,), float("-inf"), dtype=z.dtype, device=z.device)
    if depth:
        top = torch.topk(maxima.t().contiguous(), depth, dim=1).values
        from_groups = top.gather(1, (caps.clamp(1, depth) - 1)[:, None]).squeeze(1)
        bound = torch.where((caps >= 1) & (caps <= groups), from_groups, bound)
    bound = torch.where(caps == 0, torch.full_like(bound, float("inf")), bound)
    index = _candidates(z, bound, _candidate_limit(z.numel()))
    if index is None:
        return None
    return _select_per_latent(z, index, caps)


def _select_per_latent(
    z: torch.Tensor, index: torch.Tensor, caps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep, per latent j, the caps[j] largest of the candidates z.flat[index] in column j (index
    ascending; each column holds at least caps[j] candidates, all entries of z_j above its cut-off);
    ties go to the lowest rows. One stable sort by (column, value descending)."""
    n_latents = z.shape[1]
    values = z.view(-1)[index]
    column = index % n_latents
    order = _column_value_order(values, column)
    sorted_index = index[order]
    sorted_values = values[order]
    sorted_column = column[order]
    starts = torch.searchsorted(
        sorted_column, torch.arange(n_latents, device=z.device, dtype=sorted_column.dtype)
    )
    rank = torch.arange(index.numel(), device=z.device) - starts[sorted_column]
    keep = rank < caps[sorted_column]
    inf = torch.full((n_latents,), float("inf"), dtype=z.dtype, device=z.device)
    if not index.numel():
        return sorted_index, keep, inf
    last = (starts + caps - 1).clamp(0, index.numel() - 1)
    cutoff = torch.where(caps > 0, sorted_values[last], inf)
    return sorted_index, keep, cutoff


def _column_value_order(values: torch.Tensor, column: torch.Tensor) -> torch.Tensor:
    """Permutation sorting by column ascending, then value descending, then input order.

    Floats of at most 32 bits are packed with the column into one int64 key (column in the high
    32 bits, an order-reversed bit pattern of the value below), so one integer sort does it."""
    if values.dtype == torch.float64:
        by_value = torch.sort(values, descending=True, stable=True).indices
        return by_value[torch.sort(column[by_value], stable=True).indices]
    wide = values.float()
    wide = torch.where(wide == 0, torch.zeros_like(wide), wide)  # -0.0 ties with +0.0
    bits = wide.view(torch.int32).long()
    ascending = torch.where(bits >= 0, bits + (1 << 31), -1 - bits)
    key = (column << 32) | ((1 << 32) - 1 - ascending)
    return torch.sort(key, stable=True).indices


def _feature_choice_plain(
    z: torch.Tensor, caps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact per-latent cut-offs from `torch.topk` down the batch, then the same keep rule."""
    n_rows, n_latents = z.shape
    inf = torch.full((n_latents,), float("inf"), dtype=z.dtype, device=z.device)
    if n_rows == 0 or n_latents == 0:
        return _empty_index(z), torch.zeros(0, dtype=torch.bool, device=z.device), inf
    depth = int(caps.max())
    if depth == 0:
        return _empty_index(z), torch.zeros(0, dtype=torch.bool, device=z.device), inf
    top = torch.topk(z, depth, dim=0).values
    cutoff = top.gather(0, (caps.clamp(min=1) - 1)[None, :]).squeeze(0)
    cutoff = torch.where(caps > 0, cutoff, inf)
    index = _candidates(z, cutoff, None)
    return _select_per_latent(z, index, caps)


# --- capacities --------------------------------------------------------------------------------


def uniform_capacities(
    n_tokens: int, d_sae: int, k: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """m_j = floor(M/F) or floor(M/F)+1 with randomised rounding: the M - F*floor(M/F) extra units
    go to latents drawn without replacement, so sum_j m_j = M = floor(k*N) exactly and
    E[m_j] = M/F. Project definition (algorithms.md)."""
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
    shares = fractions[order] * (extra / float(fractions.sum()))
    cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), shares.cumsum(0)])
    cumulative[-1] = extra
    offset = torch.rand(1, generator=generator, dtype=torch.float64)
    steps = torch.ceil(cumulative - offset).long().diff()
    caps[order] += steps
    return caps


def ranks_from_frequency(freq: torch.Tensor) -> torch.Tensor:
    """1-based ranks by descending frequency (ties by index), for `zipf_capacities`."""
    order = torch.argsort(freq.float(), descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(1, freq.numel() + 1, device=freq.device)
    return ranks
