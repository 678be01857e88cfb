"""Statistics of a comparison over seeds: mean +- sd with a t interval, paired t intervals of
differences against a control arm, margins measured on control seeds, the verdict wording
docs/results.md uses, and Benjamini-Hochberg control over the claims.

Project definitions (issue 33, docs/results.md "Statistical method"). Seeds are the unit: each run
is one training seed, and every metric of a run is one number over the fixed held-out set that
every run shares (no row is resampled, so the clustering of held-out rows by source file enters
no interval):
- summary over n seeds: mean, sample sd (n - 1), 95% t interval mean +- t_{0.975, n-1} sd / sqrt(n);
- paired difference of arm and control: d_s = M_arm(s) - M_control(s) on the n shared seeds,
  D = mean_s d_s, interval D +- t_{0.975, n-1} sd(d) / sqrt(n) (the same t interval on d);
- margin of a metric, measured on m control seeds that take no part in any contrast:
  margin = t_{0.975, m-1} * sd_control * sqrt(2 / n), the 95% bound of the difference between
  the means of two independent groups of n control seeds, i.e. what seed noise alone gives;
- verdict for a claim "arm is better than control on M", better = +1 (higher is better) or -1:
    "better"                         the whole interval lies past +margin on the better side,
    "worse"                          the whole interval lies past the margin on the other side,
    "equivalent within the margin"   the interval lies inside (-margin, +margin) (two one-sided
                                     tests at 2.5% each, on the same 95% interval),
    "inconclusive"                   otherwise, and wherever no margin was measured or n = 1;
- p-value of "the difference is beyond the margin": p = 2 * (1 - F_{n-1}((|D| - margin) / se)),
  se = sd(d) / sqrt(n), F the t CDF; p < 0.05 exactly when the interval clears the margin;
- Benjamini-Hochberg over the claims table (m claims, p sorted p_(1) <= ... <= p_(m)): adjusted
  p_(i) = min_{j >= i} m p_(j) / j; a claim's "better"/"worse" stands when adjusted p < 0.05;

The t CDF for integer df is the finite series of Abramowitz and Stegun 26.7.3 and 26.7.4; its
quantile is found by bisection.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

BETTER = "better"
WORSE = "worse"
EQUIVALENT = "equivalent within the margin"
INCONCLUSIVE = "inconclusive"
ALPHA = 0.05


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with integer df >= 1: with theta = atan(t / sqrt(df)), c = cos,
    s = sin, A = P(|T| < |t|) signed is 2/pi (theta + s c sum_{i<(df-1)/2} a_i c^{2i}) for odd df,
    a_0 = 1, a_i = a_{i-1} 2i/(2i+1), and s sum_{i<df/2} b_i c^{2i} for even df, b_0 = 1,
    b_i = b_{i-1} (2i-1)/(2i); then P(T <= t) = (1 + A) / 2."""
    if df < 1:
        raise ValueError(f"df={df} is not allowed: an integer >= 1")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    theta = math.atan(t / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    term, total = 1.0, 1.0
    if df % 2:
        for i in range(1, (df - 1) // 2):
            term *= c2 * 2 * i / (2 * i + 1)
            total += term
        a = 2 / math.pi * (theta + (s * math.cos(theta) * total if df > 1 else 0.0))
    else:
        for i in range(1, df // 2):
            term *= c2 * (2 * i - 1) / (2 * i)
            total += term
        a = s * total
    return (1 + a) / 2


@functools.lru_cache(maxsize=256)
def t_quantile(df: int, p: float = 0.975) -> float:
    """The p quantile of Student's t with df degrees of freedom (t_cdf inverted by bisection)."""
    if df < 1:
        raise ValueError(f"df={df} is not allowed: an integer >= 1")
    if not 0 < p < 1:
        raise ValueError(f"p={p} is not allowed: a number in (0, 1)")
    if p < 0.5:
        return -t_quantile(df, 1 - p)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        low, high = high, 2 * high
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if t_cdf(mid, df) < p else (low, mid)
    return (low + high) / 2


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
    """Difference arm - base of a per-seed metric, paired by seed: D, the t interval and se."""
    if len(arm) != len(base):
        raise ValueError(f"paired by seed: {len(arm)} arm values vs {len(base)} baseline values")
    out = summarize([a - b for a, b in zip(arm, base)])
    se = None if out["sd"] is None else out["sd"] / math.sqrt(out["n"])
    return {"diff": out["mean"], "low": out["low"], "high": out["high"], "se": se, "n_seeds": out["n"],
            "method": "paired t over seeds"}


def margin(control: Sequence[float], n: int) -> float | None:
    """t_{0.975, m-1} sd(control) sqrt(2 / n) over the m control seeds (module docstring); None
    for fewer than 2 control seeds."""
    s = summarize(control)
    if s["sd"] is None:
        return None
    return t_quantile(s["n"] - 1) * s["sd"] * math.sqrt(2 / n)


def verdict(diff: float, low: float | None, high: float | None, better: int, margin: float | None) -> str:
    """The wording of a claim "arm better than control" given D, its interval and the measured
    margin (module docstring)."""
    if better not in (1, -1):
        raise ValueError(f"better={better!r} is not allowed: +1 (higher is better) or -1")
    if low is None or high is None or margin is None:
        return INCONCLUSIVE
    up, down = (low, high) if better == 1 else (-high, -low)  # the interval on the "better" axis
    if up > margin:
        return BETTER
    if down < -margin:
        return WORSE
    if -margin < up and down < margin:
        return EQUIVALENT
    return INCONCLUSIVE


def beyond_margin_p(diff: float, se: float | None, n: int, margin: float | None) -> float | None:
    """Two-sided p of "|difference| > margin" (module docstring); None without an interval or margin."""
    if se is None or margin is None:
        return None
    excess = abs(diff) - margin
    if se == 0:
        return 0.0 if excess > 0 else 1.0
    return min(1.0, 2 * (1 - t_cdf(excess / se, n - 1)))


def benjamini_hochberg(pvalues: Sequence[float]) -> list[float]:
    """Benjamini-Hochberg adjusted p-values, in the order given (module docstring)."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [0.0] * m
    running = 1.0
    for rank in range(m, 0, -1):
        i = order[rank - 1]
        running = min(running, pvalues[i] * m / rank)
        adjusted[i] = running
    return adjusted
