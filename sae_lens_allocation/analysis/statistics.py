"""Statistics of a comparison over seeds: mean +- sd with a t interval, paired bootstrap intervals
of differences against a baseline arm, and the verdict wording docs/results.md uses.

Project definitions (the comparison issue, docs/results.md "How to read a verdict"):
- summary over n seeds: mean, sample sd (n - 1), 95% t interval mean +- t_{0.975, n-1} sd/sqrt(n);
- paired bootstrap of a row-decomposable metric M (explained variance, CE, KL, L0): one draw
  resamples the seeds with replacement and, independently, the held-out rows with replacement
  (multinomial weights); both arms see the same draw, so the difference is paired on seeds and
  rows: D* = mean_{s in seeds*} M_arm(s, rows*) - mean_{s in seeds*} M_base(s, rows*); the
  interval is the 2.5 and 97.5 percentiles of D* over the draws;
- per-seed metrics (dead share, MCC): paired differences over seeds, t interval;
- per-latent metrics (steering): seeds resampled jointly, latents resampled within each seed and
  arm (the arms' latents are not paired);
- verdict for a claim "arm is better than baseline on M", better = +1 (higher is better) or -1,
  noise = the seed-to-seed difference of the baseline (0 when none is known):
    "consistent with the claim"  better * low > 0 and |D| >= noise,
    "contradicts"                better * high < 0 and |D| >= noise,
    "no detectable difference"   otherwise (an interval that includes 0, or |D| below noise);
- length check: with D_1 and D_f the differences on one seed at the main training length and at
  f times it, the verdict at length f is estimated as the main verdict of (D + s, [low + s,
  high + s]), s = D_f - D_1; the verdict is stable when that is the main verdict.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

# t_{0.975, df} for df = 1..30; larger df use the normal quantile.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
         2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
         2.052, 2.048, 2.045, 2.042)

CONSISTENT = "consistent with the claim"
NO_DIFFERENCE = "no detectable difference"
CONTRADICTS = "contradicts"

RowSums = Mapping[str, torch.Tensor]  # name -> [seeds, rows, ...] per-row sums of one arm
RowMetric = Callable[[dict[str, torch.Tensor]], torch.Tensor]  # summed rows [..., *] -> [...]


def t_quantile(df: int) -> float:
    """t_{0.975, df}: two-sided 95% quantile of Student's t."""
    if df < 1:
        raise ValueError(f"df={df} is not allowed: an integer >= 1")
    return _T975[df - 1] if df <= len(_T975) else 1.960


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """n, mean, sd (n - 1) and the 95% t interval of the mean; sd and interval are None for n = 1."""
    v = [float(x) for x in values]
    n = len(v)
    if n == 0:
        raise ValueError("summarize needs at least one value")
    mean = sum(v) / n
    if n == 1:
        return {"n": 1, "mean": mean, "sd": None, "low": None, "high": None}
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1))
    half = t_quantile(n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "low": mean - half, "high": mean + half}


def paired_seed_difference(arm: Sequence[float], base: Sequence[float]) -> dict[str, Any]:
    """Difference arm - base of a per-seed metric, paired by seed: mean and t interval."""
    if len(arm) != len(base):
        raise ValueError(f"paired by seed: {len(arm)} arm values vs {len(base)} baseline values")
    out = summarize([a - b for a, b in zip(arm, base)])
    return {"diff": out["mean"], "low": out["low"], "high": out["high"], "n_seeds": out["n"],
            "method": "paired t over seeds"}


def _draws(n_boot: int, n_seeds: int, n_rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    seeds = torch.randint(n_seeds, (n_boot, n_seeds), generator=g)
    rows = torch.randint(n_rows, (n_boot, n_rows), generator=g)
    weights = torch.zeros(n_boot, n_rows, dtype=torch.float64)
    weights.scatter_add_(1, rows, torch.ones_like(rows, dtype=torch.float64))
    return seeds, weights


def _weighted(sums: RowSums, weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """Row sums weighted per draw: name -> [draws, seeds, ...]."""
    out = {}
    for name, t in sums.items():
        t = t.double()
        flat = t.reshape(t.shape[0], t.shape[1], -1)  # [S, R, K]
        w = torch.einsum("br,srk->bsk", weights, flat)
        out[name] = w.reshape(weights.shape[0], t.shape[0], *t.shape[2:])
    return out


def row_metric(sums: RowSums, metric: RowMetric) -> list[float]:
    """The metric of each seed over all rows (no resampling)."""
    total = {name: t.double().sum(1) for name, t in sums.items()}
    return [float(v) for v in metric(total)]


def paired_bootstrap(arm: RowSums, base: RowSums, metric: RowMetric, n_boot: int = 1000,
                     seed: int = 0) -> dict[str, Any]:
    """Paired bootstrap interval of mean_s M_arm - mean_s M_base (module docstring); `arm` and
    `base` hold per-row sums [seeds, rows, ...] over the same seeds and held-out rows."""
    n_seeds, n_rows = next(iter(base.values())).shape[:2]
    for name, t in arm.items():
        if tuple(t.shape[:2]) != (n_seeds, n_rows):
            raise ValueError(f"{name}: arm sums {tuple(t.shape[:2])} vs baseline ({n_seeds}, {n_rows})")
    diff = sum(row_metric(arm, metric)) / n_seeds - sum(row_metric(base, metric)) / n_seeds
    picks, weights = _draws(n_boot, n_seeds, n_rows, seed)
    chunks = []
    for p, w in zip(picks.split(100), weights.split(100)):
        m_arm = metric(_weighted(arm, w))  # [draws, seeds]
        m_base = metric(_weighted(base, w))
        chunks.append(m_arm.gather(1, p).mean(1) - m_base.gather(1, p).mean(1))
    d = torch.cat(chunks)
    low, high = torch.quantile(d.float(), torch.tensor([0.025, 0.975])).tolist()
    return {"diff": diff, "low": low, "high": high, "n_seeds": int(n_seeds), "n_rows": int(n_rows),
            "method": f"paired bootstrap over seeds and rows ({n_boot} draws)"}


def latent_bootstrap(arm: Sequence[torch.Tensor], base: Sequence[torch.Tensor], n_boot: int = 1000,
                     seed: int = 0) -> dict[str, Any]:
    """Bootstrap interval of the difference of per-latent means, one tensor of per-latent values
    per seed and arm; seeds resampled jointly, latents within each seed and arm."""
    if len(arm) != len(base):
        raise ValueError(f"paired by seed: {len(arm)} arm seeds vs {len(base)} baseline seeds")
    g = torch.Generator().manual_seed(seed)
    n = len(arm)

    def resampled(values: Sequence[torch.Tensor]) -> torch.Tensor:  # [draws, seeds]
        cols = []
        for v in values:
            idx = torch.randint(v.numel(), (n_boot, v.numel()), generator=g)
            cols.append(v.double()[idx].mean(1))
        return torch.stack(cols, 1)

    picks = torch.randint(n, (n_boot, n), generator=g)
    d = resampled(arm).gather(1, picks).mean(1) - resampled(base).gather(1, picks).mean(1)
    diff = float(sum(float(v.double().mean()) for v in arm) / n - sum(float(v.double().mean()) for v in base) / n)
    low, high = torch.quantile(d.float(), torch.tensor([0.025, 0.975])).tolist()
    return {"diff": diff, "low": low, "high": high, "n_seeds": n,
            "n_latents": int(min(v.numel() for v in [*arm, *base])),
            "method": f"bootstrap over seeds and latents ({n_boot} draws)"}


def verdict(diff: float, low: float | None, high: float | None, better: int, noise: float = 0.0) -> str:
    """The wording of a claim "arm better than baseline" given D and its interval (module docstring)."""
    if better not in (1, -1):
        raise ValueError(f"better={better!r} is not allowed: +1 (higher is better) or -1")
    if low is None or high is None or abs(diff) < noise:
        return NO_DIFFERENCE
    if better * low > 0 and better * high > 0:
        return CONSISTENT
    if better * low < 0 and better * high < 0:
        return CONTRADICTS
    return NO_DIFFERENCE


def shifted_verdict(main: Mapping[str, Any], short: float, long: float) -> dict[str, Any]:
    """The length check of one verdict (module docstring): `main` a contrast with diff, low, high,
    better, noise and verdict; `short` and `long` the differences on one seed at the main
    training length and the longer one."""
    shift = long - short
    low = None if main["low"] is None else main["low"] + shift
    high = None if main["high"] is None else main["high"] + shift
    moved = verdict(main["diff"] + shift, low, high, main["better"], main["noise"])
    return {"short": short, "long": long, "shift": shift, "verdict": main["verdict"],
            "shifted_verdict": moved, "stable": moved == main["verdict"]}
