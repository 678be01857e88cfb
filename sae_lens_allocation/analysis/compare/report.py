"""report.md and plots of a comparison (the compare package): the main table (mean +- sd over
seeds), the verdicts with their intervals, margins and n, the measured margins, feature quality
(stability, absorption, sparse probing), the anneal
diagnostic and the length check, the lr and k sweeps,
the two g-SAE protocols, per-token L0 and log-density histograms, and metrics against L0."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from sae_lens_allocation.analysis.compare.settings import settings_report
from sae_lens_allocation.analysis.statistics import summarize

# (metric, header, digits) of the main table, by source.
_MAIN_COLUMNS = {
    "language_model": (("l0", "L0", 2), ("explained_variance", "EV", 4), ("ce_with_sae", "CE (nats)", 4),
                       ("ce_recovered", "CE rec.", 4), ("kl", "KL", 4), ("dead_share", "dead", 3),
                       ("dead_share_below_1e-05", "p < 1e-5", 3), ("underused_share", "underused*", 3),
                       ("steering", "steering KL*", 4)),
    "synthetic": (("l0", "L0", 2), ("explained_variance", "EV", 4), ("mcc", "MCC", 3), ("f1", "F1", 3),
                  ("dead_share", "dead", 3), ("dead_share_below_1e-05", "p < 1e-5", 3),
                  ("underused_share", "underused*", 3)),
}


def _pm(summary: dict[str, Any] | None, digits: int) -> str:
    if summary is None:
        return "-"
    if summary["sd"] is None:
        return f"{summary['mean']:.{digits}f}"
    return f"{summary['mean']:.{digits}f} ± {summary['sd']:.{digits}f}"


def _sd(v: float | None, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def main_table(result: dict[str, Any]) -> str:
    cols = _MAIN_COLUMNS[result["source"]]
    head = ["arm", "export", "lr", "k"] + [c[1] for c in cols] + ["L0 within 5%", "tok/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, s in result["summary"]["arms"].items():
        first = result["runs"][s["runs"][0]]
        cells = [arm, first["export_architecture"], f"{first['lr']:g}", f"{first['k']:g}"]
        cells += [_pm(s["metrics"].get(m), d) for m, _, d in cols]
        cells += ["yes" if s["l0_within_5pct"] else "no", f"{s['train_tokens_per_s']['mean']:,.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _num(v: float | None, fmt: str = "+.4f") -> str:
    return "-" if v is None else format(v, fmt)


def verdict_table(result: dict[str, Any]) -> str:
    """Every claim: primary (one per contrast, under Benjamini-Hochberg) or secondary, D with its
    95% paired t interval, the measured margin, n, the adjusted p and the verdict."""
    n = len(result["seeds"])
    lines = ["| arm | against | metric | role | difference | 95% interval | margin | n | BH-adjusted p | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in result["summary"]["contrasts"]:
        for m in c["metrics"]:
            interval = "-" if m["low"] is None else f"[{m['low']:+.4f}, {m['high']:+.4f}]"
            margin = "not measured" if m["margin"] is None else f"±{m['margin']:.4f}"
            lines.append(f"| {c['arm']} | {c['against']} | {m['metric']} | {m['role']} | {m['diff']:+.4f} | "
                         f"{interval} | {margin} | {n} seeds | {_num(m.get('p_adjusted'), '.3f')} | {m['verdict']} |")
    return "\n".join(lines)


def margin_table(result: dict[str, Any]) -> str:
    """The margins: the control's values on the margin seeds and the margin of each metric."""
    margins = result["summary"]["margins"]
    if not margins["metrics"]:
        return ("No margin seeds (config `margin_seeds`): no margin was measured, so every verdict is "
                "\"inconclusive\".")
    seeds = ", ".join(map(str, margins["seeds"]))
    lines = [f"Control `{margins['control']}` at its best lr on margin seeds {seeds} (runs "
             + ", ".join(f"`{r}`" for r in margins["runs"]) + f"); margin = t(0.975, {len(margins['seeds']) - 1}) "
             f"x sd x sqrt(2 / {len(result['seeds'])}), the 95% bound of the difference between two independent "
             f"groups of {len(result['seeds'])} control seeds.", "", "| metric | control values | margin |",
             "|---|---|---|"]
    for metric, m in margins["metrics"].items():
        lines.append(f"| {metric} | {', '.join(f'{v:.4f}' for v in m['values'])} | {_num(m['margin'], '.4f')} |")
    return "\n".join(lines)


def matched_table(result: dict[str, Any]) -> str:
    """The claims at matched sparsity: per seed the arm's L0, the control's value there and the L0
    the control needs to match the arm (frontier.py)."""
    rows = [(c, m) for c in result["summary"]["contrasts"] for m in c["metrics"] if "matched" in m]
    off = [f"{c['arm']} ({', '.join(c['off_frontier'])})" for c in result["summary"]["contrasts"]
           if c.get("off_frontier")]
    if not rows and not off:
        return ""
    ks = sorted({result["runs"][label]["k"] for labels in result["frontier"] for label in labels})
    lines = [f"The control `{result['baseline']}` on every seed at k = {', '.join(f'{k:g}' for k in ks)}; its "
             "metric interpolated linearly in log L0 at the arm's measured L0, and the L0 at which it reaches "
             "the arm's value (- where outside its frontier). Per seed:", "",
             "| arm | metric | arm L0 | arm value | control at arm's L0 | L0 the control needs |",
             "|---|---|---|---|---|---|"]
    for c, m in rows:
        v = m["matched"]
        lines.append(f"| {c['arm']} | {m['metric']} | {', '.join(f'{x:.2f}' for x in v['arm_l0'])} | "
                     f"{', '.join(f'{x:.4f}' for x in v['arm'])} | {', '.join(f'{x:.4f}' for x in v['control'])} | "
                     f"{', '.join(_num(x, '.2f') for x in v['control_l0_needed'])} |")
    if off:
        lines += ["", "No claim at matched sparsity where an arm's L0 lies outside the control's frontier on some "
                  "seed (no extrapolation): " + "; ".join(off) + "."]
    return "\n".join(lines)


def steering_table(result: dict[str, Any]) -> str:
    """The steering diagnostic with its controls: the effect at 0.5, 1 and 2 times alpha, over
    random unit directions at alpha, and its specificity beside theirs (analysis/steering.py)."""
    rows = [(arm, s["metrics"]) for arm, s in result["summary"]["arms"].items()
            if "steering_over_random" in s["metrics"]]
    if not rows:
        return ""
    data = result["data"]
    lines = [f"Random unit directions at alpha: KL {data['steering_random']:.4f}, specificity "
             f"{_num(data.get('steering_specificity_random'), '+.4f')} nats. Mean ± sd over seeds; "
             "a diagnostic without a verdict.", "",
             "| arm | KL at 0.5 alpha | KL at alpha | KL at 2 alpha | over random directions | specificity (nats) |",
             "|---|---|---|---|---|---|"]
    for arm, m in rows:
        lines.append(f"| {arm} | {_pm(m.get('steering_x0.5'), 4)} | {_pm(m.get('steering'), 4)} | "
                     f"{_pm(m.get('steering_x2'), 4)} | {_pm(m['steering_over_random'], 2)} | "
                     f"{_pm(m.get('steering_specificity'), 4)} |")
    return "\n".join(lines)


def feature_quality(result: dict[str, Any]) -> str:
    """Stability per arm (a figure over seed pairs, no verdict), absorption per hierarchy and
    sparse probing per arm (mean +- sd over seeds; their claims are in the verdict table)."""
    arms = result["summary"]["arms"]
    parts = []
    stability = result["summary"].get("stability")
    if stability:
        pairs = int(next(iter(stability["arms"].values()))["pairs"])
        lines = [f"**Stability across seeds** (analysis/stability.py): the share of latents whose decoder direction "
                 f"has a partner at cosine >= {stability['threshold']:g} in the other seed's export, pooled over both "
                 f"directions, mean and range over the {pairs} pairs of the {len(result['seeds'])} seeds; random "
                 f"decoders of the same shape: {stability['random']['matched_share']:.3f}. A property of a set of "
                 "seeds, so no t verdict: the seed pairs share seeds, their differences between arms are not "
                 "independent, and disjoint pairs leave too few for an interval (compare/feature_quality.py).", "",
                 "| arm | matched share | min | max | mean max cosine |", "|---|---|---|---|---|"]
        for arm, st in stability["arms"].items():
            lines.append(f"| {arm} | {st['matched_share']:.3f} | {st['matched_share_min']:.3f} | "
                         f"{st['matched_share_max']:.3f} | {st['mean_max_cosine']:.3f} |")
        parts.append("\n".join(lines))
    for name in result.get("hierarchies") or {}:
        model = result["config"]["base"]["synthetic_model"]  # the main model; the hierarchy is added to it
        spec = next(x for x in result["config"]["hierarchies"] if x["name"] == name)
        shape = ", ".join(f"{k} {v}" for k, v in spec.items() if k != "name")
        samples = result["config"]["eval"]["absorption_samples"]
        lines = [f"**Absorption on hierarchy `{name}`** ({shape} on the {model['num_features']}-feature model; "
                 "analysis/absorption.py): every arm retrained on each seed at its best lr on the hierarchical data, "
                 f"absorption over {samples:,} held-out samples; lower is better. Mean ± sd over seeds; the claims "
                 f"are `absorption_{name}` in the verdict table.", "",
                 "| arm | absorption | parent's latent silent |", "|---|---|---|"]
        for arm, s in arms.items():
            lines.append(f"| {arm} | {_pm(s['metrics'].get('absorption_' + name), 3)} | "
                         f"{_pm(s['metrics'].get('main_silent_' + name), 3)} |")
        parts.append("\n".join(lines))
    probing = result.get("probing")
    if probing:
        t = probing["tokens"]
        lines = [f"**Sparse probing** (analysis/probing.py): mean balanced accuracy over the Python concepts of the "
                 f"logistic probe on each export's top-{probing['k']} latents, {t['train']:,} training tokens "
                 f"({t['train_files']} train-split files), {t['test']:,} test tokens ({t['test_files']} held-out "
                 f"files). Floor (the same probes on the untrained baseline SAE): {_num(probing['floor'], '.3f')}; "
                 f"ceiling (the probe on all d_in activations): {_num(probing['ceiling'], '.3f')}. The claims are "
                 "`sparse_probe_accuracy` in the verdict table.", "", f"| arm | top-{probing['k']} probe accuracy |",
                 "|---|---|"]
        for arm, s in arms.items():
            lines.append(f"| {arm} | {_pm(s['metrics'].get('sparse_probe_accuracy'), 3)} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def anneal_table(result: dict[str, Any]) -> str:
    lines = ["| arm | tokens (last two) | EV change per seed | EV seed sd | dead change per seed | dead seed sd |",
             "|---|---|---|---|---|---|"]
    for arm, s in result["summary"]["arms"].items():
        ev, dead = s["anneal"]["explained_variance"], s["anneal"]["dead_share"]
        lines.append(
            f"| {arm} | {' -> '.join(f'{t:,}' for t in ev['last_two_tokens'])} | "
            f"{', '.join(f'{c:+.4f}' for c in ev['changes'])} | {_sd(ev['seed_sd'], 4)} | "
            f"{', '.join(f'{c:+.3f}' for c in dead['changes'])} | {_sd(dead['seed_sd'], 3)} |")
    return "\n".join(lines)


def length_tables(result: dict[str, Any]) -> str:
    """The length check: every arm on every seed at both lengths (mean +- sd), then each claim at
    both lengths with its verdict."""
    check = result.get("length_check")
    if not check:
        return ""
    f = check["factor"]
    cols = [c for c in _MAIN_COLUMNS[result["source"]] if c[0] != "steering"]
    head = ["arm"] + [f"{name} {size}" for _, name, _ in cols for size in ("x1", f"x{f:g}")]
    lines = [f"Every arm at its best lr on every seed, trained for 1 and {f:g} times the main length (lr decay "
             "scaled with it); mean ± sd over seeds.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, labels in check["runs"].items():
        runs = [[result["runs"][x] for x in result["main"][arm]], [result["runs"][x] for x in labels]]
        cells = [arm]
        for m, _, d in cols:
            for group in runs:
                values = [r["metrics"].get(m) for r in group]
                cells.append("-" if None in values else _pm(summarize(values), d))
        lines.append("| " + " | ".join(cells) + " |")
    rows = [(c, m) for c in check["contrasts"] for m in c["metrics"]]
    stable = sum(m["stable"] for _, m in rows)
    lines += ["", f"{stable} of {len(rows)} verdicts (before the Benjamini-Hochberg adjustment) are the same "
              f"at x{f:g}: the same claim on the longer runs of every seed, with the same margin.", "",
              f"| arm | against | metric | D x1 | D x{f:g} | 95% interval x{f:g} | verdict x1 | verdict x{f:g} "
              "| stable |",
              "|---|---|---|---|---|---|---|---|---|"]
    for c, m in rows:
        long = m["long"]
        interval = "-" if long["low"] is None else f"[{long['low']:+.4f}, {long['high']:+.4f}]"
        lines.append(f"| {c['arm']} | {c['against']} | {m['metric']} | {m['diff']:+.4f} | {long['diff']:+.4f} | "
                     f"{interval} | {m['verdict']} | {m['long_verdict']} | {'yes' if m['stable'] else 'no'} |")
    return "\n".join(lines)


def lr_table(result: dict[str, Any]) -> str:
    # float(): results.json stores the lrs as keys, which JSON turns into strings.
    sweep = {arm: {float(lr): v for lr, v in scores.items()} for arm, scores in result["lr_sweep"].items()}
    if not sweep:
        return ""
    lrs = sorted({lr for scores in sweep.values() for lr in scores})
    metric = result["selection"]["metric"]
    lines = ["| arm | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best |", "|" + "---|" * (len(lrs) + 2)]
    for arm, scores in sweep.items():
        best = result["best_lr"][arm]
        cells = [f"**{scores[lr]:.4f}**" if lr == best else f"{scores[lr]:.4f}" for lr in lrs]
        edge = " (end of the grid)" if arm in result["lr_at_edge"] else ""
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {best:g}{edge} |")
    seeds = ", ".join(str(s) for s in result["selection"]["seeds"])
    edge = (f" The best lr is an end point of the grid for {', '.join(result['lr_at_edge'])}: the grid does "
            "not bracket it." if result["lr_at_edge"] else " Every arm's best lr lies inside the grid.")
    return (f"Selection metric: {metric} on the selection rows, mean over seeds {seeds}.{edge}\n\n"
            + "\n".join(lines))


def _k_sweep_metrics(result: dict[str, Any], labels: dict[str, list[str]]) -> list[dict[str, float]]:
    """Per k (in increasing order) the mean over seeds of each metric of the arm's runs."""
    out = []
    for k in sorted(labels, key=float):
        runs = [result["runs"][label]["metrics"] for label in labels[k]]
        names = [m for m in ("l0", "explained_variance", "ce_recovered", "kl", "mcc") if m in runs[0]]
        out.append({"k": float(k), **{m: sum(r[m] for r in runs) / len(runs) for m in names},
                    "sd_explained_variance": statistics.stdev([r["explained_variance"] for r in runs])
                    if len(runs) > 1 else 0.0})
    return out


def k_table(result: dict[str, Any]) -> str:
    if not result["k_sweep"]:
        return ""
    lm = result["source"] == "language_model"
    head = ["arm", "k", "L0", "EV (sd)"] + (["CE rec.", "KL"] if lm else ["MCC"])
    lines = [f"Means over seeds {', '.join(str(s) for s in result['seeds'])}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, labels in result["k_sweep"].items():
        for m in _k_sweep_metrics(result, labels):
            cells = [arm, f"{m['k']:g}", f"{m['l0']:.2f}",
                     f"{m['explained_variance']:.4f} ({m['sd_explained_variance']:.4f})"]
            cells += [f"{m['ce_recovered']:.4f}", f"{m['kl']:.4f}"] if lm else [f"{m['mcc']:.3f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gradient_table(result: dict[str, Any]) -> str:
    rows = [(arm, s) for arm, s in result["summary"]["arms"].items()
            if "ce_with_sae_gradient_selection" in s["metrics"]]
    if not rows:
        return ""
    lines = ["| arm | CE plain export | CE gradient selection | CE rec. plain | CE rec. gradient selection |",
             "|---|---|---|---|---|"]
    for arm, s in rows:
        m = s["metrics"]
        lines.append(f"| {arm} | {_pm(m['ce_with_sae'], 4)} | {_pm(m['ce_with_sae_gradient_selection'], 4)} | "
                     f"{_pm(m['ce_recovered'], 4)} | {_pm(m['ce_recovered_gradient_selection'], 4)} |")
    return "\n".join(lines)


def write_plots(result: dict[str, Any], out: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = {}
    arms = result["summary"]["arms"]
    ncols = min(4, len(arms))
    nrows = math.ceil(len(arms) / ncols)
    for kind in ("l0_histogram", "log_density"):
        fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 2.6 * nrows), squeeze=False, sharex=True)
        for ax in axes.flat[len(arms):]:
            ax.axis("off")
        for ax, (arm, s) in zip(axes.flat, arms.items()):
            for label in s["runs"]:
                run = result["runs"][label]
                if kind == "l0_histogram":
                    hist = {int(k): v for k, v in run["l0_per_token"]["histogram"].items()}
                    xs = list(range(0, max(hist) + 2))
                    total = sum(hist.values())
                    ax.step(xs, [hist.get(x, 0) / total for x in xs], where="mid", label=f"seed {run['seed']}")
                else:
                    d = run["density"]
                    ax.stairs(d["log10_density_hist"], d["log10_density_edges"],
                              label=f"seed {run['seed']} (dead {d['dead_share']:.2f})")
            ax.set_title(arm, fontsize=9)
            ax.legend(fontsize=6)
        for ax in axes[-1]:
            ax.set_xlabel("latents active per token (L0)" if kind == "l0_histogram" else "log10 firing density")
        for ax in axes[:, 0]:
            ax.set_ylabel("share of tokens" if kind == "l0_histogram" else "latents")
        tokens = next(iter(result["runs"].values()))["density"]["tokens"]
        fig.suptitle("Per-token L0 of the exports on held-out data" if kind == "l0_histogram"
                     else f"Firing density of the exports' latents over {tokens:,} held-out tokens (dead not shown)")
        fig.tight_layout()
        fig.savefig(out / f"{kind}.png", dpi=100)
        plt.close(fig)
        plots[kind] = f"{kind}.png"
    if result["k_sweep"]:
        lm = result["source"] == "language_model"
        metrics = [("explained_variance", "EV"), ("ce_recovered", "CE recovered"), ("kl", "KL")] if lm \
            else [("explained_variance", "EV"), ("mcc", "MCC")]
        fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
        for ax, (metric, name) in zip(axes[0], metrics):
            for arm, labels in result["k_sweep"].items():
                ms = _k_sweep_metrics(result, labels)
                ax.plot([m["l0"] for m in ms], [m[metric] for m in ms], marker="o", label=arm)
            ax.set_xscale("log")
            ax.set_xlabel("mean L0 of the export (held-out)")
            ax.set_ylabel(name)
        axes[0][0].legend(fontsize=6)
        fig.suptitle("k sweep, means over seeds: metrics against measured L0")
        fig.tight_layout()
        fig.savefig(out / "metrics_vs_l0.png", dpi=100)
        plt.close(fig)
        plots["metrics_vs_l0"] = "metrics_vs_l0.png"
    return plots


def density_lines(result: dict[str, Any]) -> list[str]:
    """Per seed: the training rows' hash and the tokens the dead share counts beyond the held-out ones."""
    data = result["data"]
    lines = []
    hashes = data.get("train_dataset_sha256")
    if isinstance(hashes, dict):
        lines += ["Training rows per seed: " + ", ".join(f"seed {s} `{h}` ({data['train_dataset_rows'][s]} rows)"
                                                      for s, h in hashes.items()), ""]
    counted = [("", seed, info) for seed, info in data.get("density", {}).items()]
    counted += [(" (length check)", seed, info) for seed, info in data.get("length_check_density", {}).items()]
    for what, seed, info in counted:
        lines += [f"Dead share, seed {seed}{what}: {info['heldout_tokens'] + info['tokens']:,} tokens = all "
                  f"{info['heldout_tokens']:,} held-out + {info['tokens']:,} from {info['documents']} files "
                  f"({info['source']}; the {info['calibration_pool_documents']} calibration-pool files "
                  f"skipped), sha256 `{info['tokens_sha256']}`", ""]
    return lines


def write_report(result: dict[str, Any], out: Path, config_path: str | None) -> Path:
    m = result["machine"]
    n_runs = len(result["runs"])
    lines = [f"# Architecture comparison ({result['source']})", ""]
    if config_path:
        lines += [f"Config: `{config_path}`", ""]
    lines += [f"Machine: {m['platform']}, {m['cpu_threads']} torch threads, torch {m['torch']}, "
              f"sae-lens {m['sae_lens']}; {n_runs} training runs, total wall time {result['total_seconds']:.0f} s.", "",
              f"Seeds {', '.join(map(str, result['seeds']))}; baseline `{result['baseline']}`; every arm at its best "
              "lr (below) and the main k.", "",
              "Data: " + ", ".join(f"{k} `{v}`" for k, v in result["data"].items() if not isinstance(v, dict)), "",
              *density_lines(result),
              "## Main results (mean ± sd over seeds)", "", main_table(result), "",
              "dead: latents that never fired on the tokens counted; p < 1e-5: firing density below 1e-5. "
              "* diagnostics without a verdict: the underused share scores the Zipf prior that aux_zipf and "
              "Zipf capacities impose, and the steering KL is not yet validated as evidence (its random-direction "
              "and dose-response controls are under Steering).",
              "",
              "## Verdicts", "", verdict_table(result), "",
              "D is arm minus control averaged over the seeds, its interval the 95% paired t interval over "
              "seeds (analysis/statistics.py). **better** / **worse**: the whole interval lies past the margin "
              "on that side; **equivalent within the margin**: the interval lies inside (-margin, +margin); "
              "**inconclusive**: anything else. One primary metric per contrast; "
              f"{result['summary']['multiple_comparisons']} (a primary better or worse whose adjusted p is not "
              "below 0.05 is inconclusive); the secondary claims are reported without adjustment.", "",
              "## Margins (measured on control seeds)", "", margin_table(result), "",
              *(["## Feature quality", "", feature_quality(result), ""] if feature_quality(result) else []),
              *(["## Synthetic settings (priors that differ from the main model)", "", settings_report(result, _pm),
                 ""] if result["config"].get("settings") else []),
              "## Anneal diagnostic (training rule, held-out rows)", "",
              "The change of the training rule's EV and dead share between its last two evaluations, beside "
              "the seed sd of the final value; a diagnostic, not a convergence test.", "", anneal_table(result), ""]
    for title, text in (("Matched sparsity (along the control's L0 frontier)", matched_table(result)),
                        ("Steering (diagnostic, with its controls)", steering_table(result)),
                        ("Length check (do the verdicts survive longer training?)", length_tables(result)),
                        ("g-SAE: plain export vs gradient selection at evaluation", gradient_table(result)),
                        ("Learning-rate sweep", lr_table(result)), ("k sweep", k_table(result))):
        if text:
            lines += [f"## {title}", "", text, ""]
    for name, path in result["plots"].items():
        lines += [f"![{name}]({path})", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
