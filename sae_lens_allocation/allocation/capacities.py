"""Feature Choice capacities m_j (uniform and Zipf) and the frequency ranks the Zipf capacities
and the aux_zipf loss read."""

from __future__ import annotations

import math

import torch

from sae_lens_allocation.allocation.rules import budget


def uniform_capacities(
    n_tokens: int, d_sae: int, k: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """m_j = floor(M/F) or floor(M/F)+1 with randomised rounding: the M - F*floor(M/F) extra units
    go to latents drawn without replacement, so sum_j m_j = M = floor(k*N) exactly and
    E[m_j] = M/F. Project definition (docs/architectures.md#feature-choice-capacities)."""
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
    Project definition (docs/architectures.md#feature-choice-capacities); requires F <= M <= F*N
    and s >= 0."""
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
    (docs/architectures.md#feature-choice-capacities); requires F <= M <= F*N."""
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
