"""Firing-frequency statistics for the Zipf rules: the firing EMA, the Zipf fit of the ranked
frequencies, and the underused set of aux_zipf (docs/losses.md). Pure tensor functions with no
host synchronisation; ranks come from `allocation.ranks_from_frequency`, the one rank rule.
"""

from __future__ import annotations

import math

import torch

# ---------------------------------------------------------------------------------------------


def ema_warmup_steps(decay: float) -> int:
    """Steps before the firing EMA is trusted: ceil(1 / (1 - decay)), its effective window."""
    return max(1, math.ceil(1.0 / (1.0 - decay)))


def update_firing_ema(
    ema: torch.Tensor, fired_fraction: torch.Tensor, step: torch.Tensor, decay: float
) -> torch.Tensor:
    """p <- p + alpha (f - p) with alpha = max(1/t, 1 - decay), t = 1, 2, ... the update count.

    Project definition. For t < 1/(1-decay) this is the running mean of the per-step firing
    fractions f (no zero-initialisation bias); afterwards an EMA with rate 1 - decay.
    """
    alpha = torch.clamp(1.0 / step.to(torch.float32), min=1.0 - decay)
    return ema + alpha * (fired_fraction - ema)


def fit_zipf(
    p: torch.Tensor, fit_fraction: float, exponent: float | None = None
) -> torch.Tensor:
    """Least-squares fit of log p_(r) = log C - s log r. Returns [log C, s, n_points] (float32).

    Project definition (docs/losses.md#zipf-fit): the points are the firing latents (p > 0) in rank order;
    only the most frequent ceil(fit_fraction * #firing) ranks enter the fit, because feature
    densities follow Zipf except at the low end (Ayonrinde 2024), the end under test. With a fixed
    `exponent` s, only log C is fitted. n_points = 0 marks "no fit" (fewer than 2 points, or 1
    with a fixed s). No host synchronisation.
    """
    p = p.to(torch.float32)
    p_sorted = torch.sort(p, descending=True).values
    r = torch.arange(1, p.numel() + 1, dtype=torch.float32, device=p.device)
    n_firing = (p > 0).sum()
    in_fit = ((r <= torch.ceil(fit_fraction * n_firing)) & (p_sorted > 0)).to(torch.float32)
    n = in_fit.sum()
    x = r.log()
    y = p_sorted.clamp_min(torch.finfo(torch.float32).tiny).log()
    x_mean = (in_fit * x).sum() / n.clamp_min(1)
    y_mean = (in_fit * y).sum() / n.clamp_min(1)
    if exponent is None:
        sxx = (in_fit * (x - x_mean) ** 2).sum()
        sxy = (in_fit * (x - x_mean) * (y - y_mean)).sum()
        s = -sxy / sxx.clamp_min(torch.finfo(torch.float32).tiny)
        min_points = 2
    else:
        s = torch.tensor(float(exponent), device=p.device)
        min_points = 1
    log_c = y_mean + s * x_mean
    n_points = torch.where(n >= min_points, n, torch.zeros_like(n))
    return torch.stack([log_c, s, n_points])


def expected_frequency(ranks: torch.Tensor, log_c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """p_hat_j = C * rank_j^(-s)."""
    return torch.exp(log_c - s * ranks.log())


def zipf_underuse(
    p: torch.Tensor,
    p_hat: torch.Tensor,
    dead: torch.Tensor,
    tau: float,
    ready: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Underused set and weights (project definition, docs/losses.md#underused-set-and-weights).

    U = {j : p_j < tau * p_hat_j} | dead;  w_j = clip(1 - p_j / p_hat_j, 0, 1), w_j = 1 if dead.
    While not `ready` (EMA warming up, or no Zipf fit) U = dead and w = 1: exactly aux-k.
    """
    ratio = p / p_hat
    underused = ((ratio < tau) & ready) | dead
    weights = torch.where(dead | ~ready, torch.ones_like(ratio), (1.0 - ratio).clamp(0.0, 1.0))
    return underused, weights
