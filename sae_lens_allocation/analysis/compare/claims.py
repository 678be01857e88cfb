"""The claims of a comparison (analysis/statistics.py gives every rule as a formula): per arm the
mean +- sd of each metric over the main seeds; per contrast and claim metric (config.claim_metrics)
the paired difference over seeds with its t interval, the margin measured on the control's margin
seeds and the verdict; one primary metric per contrast, the others secondary; Benjamini-Hochberg
over the primary claims of the whole table; the length check; the anneal diagnostic."""

from __future__ import annotations

from typing import Any

from sae_lens_allocation.analysis import statistics as st
from sae_lens_allocation.analysis.compare.config import MATCHED_METRICS, claim_metrics
from sae_lens_allocation.analysis.compare.frontier import MATCHED_SUFFIX, matched_values

Record = dict[str, Any]


def measure_margins(cfg: dict[str, Any], control: list[Record]) -> dict[str, Any]:
    """Per claim metric of the control: its values on the margin seeds and the margin
    `statistics.margin(values, n)`, n the number of main seeds."""
    metrics = {}
    for _, base, _ in claim_metrics(cfg):
        values = [r["metrics"].get(base) for r in control]
        if control and None not in values and base not in metrics:
            metrics[base] = {"values": values, "margin": st.margin(values, len(cfg["seeds"]))}
    return {"control": cfg["baseline"], "seeds": cfg["margin_seeds"] or [], "runs": [r["label"] for r in control],
            "metrics": metrics}


def contrast(arm: list[Record], base: list[Record], metric: str, base_metric: str, better: int,
             margin: float | None) -> dict[str, Any] | None:
    """The paired difference arm - base over the seeds (records in seed order) of one metric, its
    interval, p beyond the margin and verdict; None where the metric does not apply to these arms."""
    values = [r["metrics"].get(metric) for r in arm], [r["metrics"].get(base_metric) for r in base]
    if None in values[0] or None in values[1]:
        return None
    out = st.paired_seed_difference(*values)
    return {**out, "metric": metric, "better": better, "margin": margin,
            "p_beyond_margin": st.beyond_margin_p(out["diff"], out["se"], out["n_seeds"], margin),
            "verdict": st.verdict(out["diff"], out["low"], out["high"], better, margin)}


def _arm_summary(recs: list[Record]) -> dict[str, Any]:
    names = sorted({m for r in recs for m, v in r["metrics"].items() if v is not None})
    return {
        "runs": [r["label"] for r in recs],
        "metrics": {m: st.summarize([r["metrics"][m] for r in recs]) for m in names
                    if all(r["metrics"].get(m) is not None for r in recs)},
        "train_tokens_per_s": st.summarize([r["train_tokens_per_s"] for r in recs]),
        "l0_within_5pct": all(abs(r["metrics"].get("l0_relative_error", 0.0)) <= 0.05 for r in recs),
        "anneal": anneal_diagnostic(recs),
    }


def _matched_rows(cfg: dict[str, Any], arm: list[Record], frontier: list[list[Record]],
                  margins: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """The claims at matched sparsity of an arm against the control's frontier (frontier.py), and
    the metrics left out because the arm's L0 lies outside the frontier on some seed."""
    rows, off = [], []
    for metric, better in MATCHED_METRICS:
        if metric not in dict((m, b) for m, _, b in claim_metrics(cfg)):
            continue
        values = matched_values(arm, frontier, metric)
        if values is None:
            off.append(metric + MATCHED_SUFFIX)
            continue
        margin = margins["metrics"].get(metric, {}).get("margin")
        out = st.paired_seed_difference(values["arm"], values["control"])
        rows.append({**out, "metric": metric + MATCHED_SUFFIX, "better": better, "margin": margin,
                     "p_beyond_margin": st.beyond_margin_p(out["diff"], out["se"], out["n_seeds"], margin),
                     "verdict": st.verdict(out["diff"], out["low"], out["high"], better, margin), "matched": values})
    return rows, off


def summarise(cfg: dict[str, Any], records: dict[str, Record], main: dict[str, list[str]],
              margins: dict[str, Any], frontier: list[list[str]] | None = None) -> dict[str, Any]:
    """Per arm: mean +- sd over the seeds; per contrast: the claims with intervals and verdicts
    (against the baseline also at matched sparsity, where `frontier` holds the baseline's runs
    per main seed); the primary claims under Benjamini-Hochberg (a "better" or "worse" whose
    adjusted p is not below 0.05 becomes "inconclusive")."""
    arms = {arm: _arm_summary([records[label] for label in labels]) for arm, labels in main.items()}
    contrasts = []
    for c in cfg["contrasts"]:
        rows: list[dict[str, Any]] = []
        off: list[str] = []
        for metric, base_metric, better in claim_metrics(cfg):
            m = margins["metrics"].get(base_metric, {}).get("margin")
            row = contrast([records[x] for x in main[c["arm"]]], [records[x] for x in main[c["against"]]], metric,
                           base_metric, better, m)
            if row is not None:
                rows.append(row)
        if frontier and c["against"] == cfg["baseline"]:
            matched, off = _matched_rows(cfg, [records[x] for x in main[c["arm"]]],
                                         [[records[x] for x in labels] for labels in frontier], margins)
            rows += matched
        rows = [{**row, "role": "primary" if row["metric"] == c["primary"] else "secondary"} for row in rows]
        contrasts.append({"arm": c["arm"], "against": c["against"], "primary": c["primary"], "metrics": rows,
                          "off_frontier": off})
    primary = [row for c in contrasts for row in c["metrics"]
               if row["role"] == "primary" and row["p_beyond_margin"] is not None]
    for row, adjusted in zip(primary, st.benjamini_hochberg([row["p_beyond_margin"] for row in primary])):
        row["p_adjusted"] = adjusted
        row["verdict_before_adjustment"] = row["verdict"]
        if row["verdict"] in (st.BETTER, st.WORSE) and adjusted >= st.ALPHA:
            row["verdict"] = st.INCONCLUSIVE
    return {"arms": arms, "contrasts": contrasts, "margins": margins,
            "multiple_comparisons": f"Benjamini-Hochberg over {len(primary)} primary claims, FDR {st.ALPHA}"}


def length_check(cfg: dict[str, Any], records: dict[str, Record], longer: dict[str, list[str]],
                 summary: dict[str, Any]) -> dict[str, Any]:
    """Per contrast and claim of the summary (matched-sparsity claims aside): the same claim on the
    runs trained `length_check` times longer on every seed (`longer`: arm -> runs in seed
    order), with the same margin; stable when its verdict is the main one before adjustment."""
    pairs = {m: base for m, base, _ in claim_metrics(cfg)}
    contrasts = []
    for c in summary["contrasts"]:
        rows = []
        for m in (m for m in c["metrics"] if m["metric"] in pairs):
            long = contrast([records[x] for x in longer[c["arm"]]], [records[x] for x in longer[c["against"]]],
                            m["metric"], pairs[m["metric"]], m["better"], m["margin"])
            if long is not None:
                main = m.get("verdict_before_adjustment", m["verdict"])
                rows.append({"metric": m["metric"], "diff": m["diff"], "long": long, "verdict": main,
                             "long_verdict": long["verdict"], "stable": long["verdict"] == main})
        contrasts.append({"arm": c["arm"], "against": c["against"], "metrics": rows})
    return {"factor": cfg["length_check"], "seeds": cfg["seeds"], "runs": longer, "contrasts": contrasts}


def anneal_diagnostic(recs: list[Record]) -> dict[str, Any]:
    """For EV and dead share of the training rule: per seed the change between the last two
    evaluations (under a schedule that decays the lr to 0, the gain of the anneal), beside the sd
    over seeds of the final value. A diagnostic: no pass or fail is read from it."""
    out: dict[str, Any] = {}
    for metric in ("explained_variance", "dead_share"):
        finals = [r["convergence"][-1][metric] for r in recs]
        out[metric] = {
            "last_two_tokens": [p["tokens"] for p in recs[0]["convergence"][-2:]],
            "changes": [r["convergence"][-1][metric] - r["convergence"][-2][metric]
                        for r in recs if len(r["convergence"]) >= 2],
            "seed_sd": st.summarize(finals)["sd"],
        }
    return out
