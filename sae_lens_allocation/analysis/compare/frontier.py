"""Claims at matched sparsity: an arm's run against the control's L0 frontier on the same seed.

The control (the baseline arm) trains on every main seed at each of `frontier_k`; its runs of
seed s give the points (log L0_j, M_j), L0 the measured mean L0 of the export on the held-out
rows. With the arm's main run on seed s at L0_a with value M_a:
    control at matched L0:  C_s = the piecewise linear interpolation of M over log L0 at log L0_a,
    the L0 the control needs:  L_s = exp(the log L0 where that interpolation reaches M_a) (first
                               crossing in increasing L0),
both None outside the frontier (no extrapolation). The claim "<metric>_at_matched_l0" is the paired
t over seeds of M_a(s) - C_s with the metric's margin (statistics.py)."""

from __future__ import annotations

import math
from typing import Any

Record = dict[str, Any]
MATCHED_SUFFIX = "_at_matched_l0"


def points(runs: list[Record], metric: str) -> list[tuple[float, float]]:
    """(log L0, metric) of the control's runs on one seed, in increasing L0."""
    return sorted((math.log(r["metrics"]["l0"]), r["metrics"][metric]) for r in runs
                  if r["metrics"].get(metric) is not None and r["metrics"]["l0"] > 0)


def interpolate(pts: list[tuple[float, float]], log_l0: float) -> float | None:
    """The frontier's value at log L0 (module docstring); None outside it."""
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= log_l0 <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (log_l0 - x0) / (x1 - x0)
    return None


def l0_to_match(pts: list[tuple[float, float]], value: float) -> float | None:
    """The L0 at which the frontier first reaches `value` (module docstring); None if it never does."""
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if min(y0, y1) <= value <= max(y0, y1):
            return math.exp(x0 if y1 == y0 else x0 + (x1 - x0) * (value - y0) / (y1 - y0))
    return None


def matched_values(arm: list[Record], frontier: list[list[Record]], metric: str) -> dict[str, Any] | None:
    """Per seed: the arm's value, the control's value at the arm's L0 and the L0 the control needs
    to match the arm; None where a seed's arm L0 lies outside the control's frontier."""
    arm_values, control, needed = [], [], []
    for run, runs in zip(arm, frontier):
        pts = points(runs, metric)
        value = run["metrics"].get(metric)
        at = None if value is None or run["metrics"]["l0"] <= 0 else interpolate(pts, math.log(run["metrics"]["l0"]))
        if at is None:
            return None
        arm_values.append(value)
        control.append(at)
        needed.append(l0_to_match(pts, value))
    return {"arm": arm_values, "control": control, "arm_l0": [r["metrics"]["l0"] for r in arm],
            "control_l0_needed": needed}
