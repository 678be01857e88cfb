"""The comparison protocol (package docstring): lr sweep, seeds, k sweep and length check; the
summary with intervals and verdicts; the `compare` command."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sae_lens_allocation.analysis import row_metrics as rm
from sae_lens_allocation.analysis.compare.config import SOURCES, arm_setting, check_compare_config, make_run
from sae_lens_allocation.analysis.compare.heldout import sparsity_dead_share
from sae_lens_allocation.analysis.compare.lm_study import LanguageModelStudy
from sae_lens_allocation.analysis.compare.synthetic_study import SyntheticStudy
from sae_lens_allocation.yaml_config import apply_overrides, read_yaml

# Paired comparisons: (metric, better (+1 higher, -1 lower), noise, kind, arm protocol, sources).
# noise: the seed-to-seed difference of TopK on the embedded model (the developers' guide);
# a difference below it is "no detectable difference".
CONTRAST_METRICS = (
    ("explained_variance", 1, 0.009, "rows", "export", SOURCES),
    ("ce_with_sae", -1, 0.010, "rows", "export", ("language_model",)),
    ("ce_with_sae_gradient_selection", -1, 0.010, "rows", "gradient_selection", ("language_model",)),
    ("ce_recovered", 1, 0.0, "rows", "export", ("language_model",)),
    ("kl", -1, 0.0, "rows", "export", ("language_model",)),
    ("dead_share", -1, 0.06, "seeds", None, SOURCES),
    ("underused_share", -1, 0.0, "seeds", None, SOURCES),
    ("steering", 1, 0.0, "latents", None, ("language_model",)),
    ("mcc", 1, 0.0, "seeds", None, ("synthetic",)),
    ("f1", 1, 0.0, "seeds", None, ("synthetic",)),
)

# name -> (metric over summed rows, the sums it needs)
ROW_METRICS: dict[str, tuple[Callable[[dict[str, torch.Tensor]], torch.Tensor], tuple[str, ...]]] = {
    "explained_variance": (rm.explained_variance, ("sse", "sxx", "sx", "n")),
    "l0": (rm.mean_l0, ("l0", "n")),
    "ce_with_sae": (rm.ce_with_sae, ("ce_sae", "n_pred")),
    "ce_recovered": (rm.ce_recovered, ("ce_sae", "ce_zero", "ce_clean")),
    "kl": (rm.kl_div, ("kl", "n_pred")),
}


def _scalar_metrics(rows: dict[str, dict[str, torch.Tensor]]) -> dict[str, float]:
    """Row-decomposable metrics over all held-out rows, per protocol (`_gradient_selection`)."""
    out = {}
    for protocol, sums in rows.items():
        total = {name: t.double().sum(0) for name, t in sums.items()}
        suffix = "" if protocol == "export" else f"_{protocol}"
        for name, (fn, keys) in ROW_METRICS.items():
            if all(key in total for key in keys):
                out[name + suffix] = float(fn(total))
    return out


def _record(run: dict[str, Any], trained: dict[str, Any], evaluated: dict[str, Any]) -> dict[str, Any]:
    from sae_lens_allocation.analysis.evaluation import l0_distribution

    metrics: dict[str, Any] = _scalar_metrics(evaluated["rows"])
    metrics.update(dead_share=evaluated["density"]["dead_share"], underused_share=evaluated["underused_share"],
                   **evaluated.get("scalars", {}))
    if run["k"]:
        metrics["l0_relative_error"] = metrics["l0"] / run["k"] - 1
    if "steering_values" in evaluated:
        values = evaluated["steering_values"]
        metrics["steering"] = float(values.mean()) if values.numel() else None
    return {
        "label": run["label"], "arm": run["arm"], "architecture": run["architecture"],
        "export_architecture": evaluated["export_architecture"], "seed": run["seed"], "lr": run["lr"],
        "k": run["k"], "d_sae": evaluated["d_sae"], "train_seconds": trained["seconds"],
        "train_tokens_per_s": trained["tokens_per_s"], "lockstep_arms": trained["lockstep_arms"],
        "sae_dir": str(trained["sae_dir"]), "metrics": metrics,
        "l0_per_token": l0_distribution(evaluated["l0_tokens"]), "density": evaluated["density"],
        "gap": evaluated["gap"], "training_window_dead_share": sparsity_dead_share(Path(trained["sae_dir"])),
        "convergence": trained["convergence"],
        "_rows": evaluated["rows"], "_steering": evaluated.get("steering_values"),
    }


def _execute(study: Any, runs: list[dict[str, Any]], records: dict[str, dict[str, Any]]) -> None:
    """Train and evaluate the runs not yet done, grouped by (seed, lr): one multi-SAE run each."""
    todo = [r for r in runs if r["label"] not in records]
    groups: dict[tuple[int, Any], list[dict[str, Any]]] = {}
    for run in todo:
        groups.setdefault((run["seed"], run["lr"]), []).append(run)
    for group in groups.values():
        trained = study.train(group)
        for run in group:
            records[run["label"]] = _record(run, trained[run["label"]], study.evaluate(run, trained[run["label"]]))
            trained[run["label"]]["sae"] = None  # the training SAE is not needed any more


def selection_metric(source: str) -> tuple[str, int]:
    """(metric, better) choosing an arm's lr: held-out CE with the SAE spliced in (language model),
    explained variance (synthetic)."""
    return ("ce_with_sae", -1) if source == "language_model" else ("explained_variance", 1)


def _arm_rows(records: list[dict[str, Any]], protocol: str, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([r["_rows"][protocol][key] for r in records]) for key in keys}


def contrast(cfg: dict[str, Any], arm: list[dict[str, Any]], base: list[dict[str, Any]], metric: str,
             better: int, noise: float, kind: str, protocol: str | None) -> dict[str, Any] | None:
    """The paired difference arm - base of one metric over the main runs (seed-ordered), its
    interval and verdict; None where the metric does not apply to these arms."""
    from sae_lens_allocation.analysis import statistics as st

    n_boot = cfg["eval"]["bootstrap"]
    if kind == "rows":
        assert protocol is not None, f"row metric {metric} names no protocol"
        if any(protocol not in r["_rows"] for r in arm):
            return None
        name = metric.removesuffix(f"_{protocol}") if protocol != "export" else metric
        fn, keys = ROW_METRICS[name]
        if any(key not in r["_rows"][protocol] for r in arm for key in keys):
            return None
        out = st.paired_bootstrap(_arm_rows(arm, protocol, keys), _arm_rows(base, "export", keys), fn, n_boot)
    elif kind == "latents":
        if any(r["_steering"] is None for r in [*arm, *base]):
            return None
        out = st.latent_bootstrap([r["_steering"] for r in arm], [r["_steering"] for r in base], n_boot)
    else:
        values = [r["metrics"].get(metric) for r in arm], [r["metrics"].get(metric) for r in base]
        if any(v is None for v in [*values[0], *values[1]]):
            return None
        out = st.paired_seed_difference(*values)
    return {**out, "metric": metric, "better": better, "noise": noise,
            "verdict": st.verdict(out["diff"], out["low"], out["high"], better, noise)}


def summarise(cfg: dict[str, Any], records: dict[str, dict[str, Any]], main: dict[str, list[str]]) -> dict[str, Any]:
    """Per arm: mean +- sd of every metric over the seeds; per contrast: paired intervals and
    verdicts; per arm: the convergence check."""
    from sae_lens_allocation.analysis import statistics as st

    arms = {}
    for arm, labels in main.items():
        recs = [records[label] for label in labels]
        names = sorted({m for r in recs for m, v in r["metrics"].items() if v is not None})
        arms[arm] = {
            "runs": labels,
            "metrics": {m: st.summarize([r["metrics"][m] for r in recs]) for m in names
                        if all(r["metrics"].get(m) is not None for r in recs)},
            "train_tokens_per_s": st.summarize([r["train_tokens_per_s"] for r in recs]),
            "l0_within_5pct": all(abs(r["metrics"].get("l0_relative_error", 0.0)) <= 0.05 for r in recs),
            "convergence": convergence_check(recs),
        }
    contrasts = []
    for arm, against in cfg["contrasts"]:
        rows = []
        for metric, better, noise, kind, protocol, sources in CONTRAST_METRICS:
            if cfg["source"] not in sources:
                continue
            c = contrast(cfg, [records[x] for x in main[arm]], [records[x] for x in main[against]], metric,
                         better, noise, kind, protocol)
            if c is not None:
                rows.append(c)
        contrasts.append({"arm": arm, "against": against, "metrics": rows})
    return {"arms": arms, "contrasts": contrasts}


def length_check(cfg: dict[str, Any], records: dict[str, dict[str, Any]], main: dict[str, list[str]],
                 longer: dict[str, str], summary: dict[str, Any]) -> dict[str, Any]:
    """Per contrast and metric of the summary: the differences on seeds[0] at the main length
    (its main run) and at `length_check` times it (`longer`: arm -> run), and the main verdict
    shifted by their change (statistics.shifted_verdict)."""
    from sae_lens_allocation.analysis import statistics as st

    how = {metric: (kind, protocol) for metric, _, _, kind, protocol, _ in CONTRAST_METRICS}
    contrasts = []
    for c in summary["contrasts"]:
        rows = []
        for m in c["metrics"]:
            kind, protocol = how[m["metric"]]
            short, long = [contrast(cfg, [records[arm]], [records[against]], m["metric"], m["better"], m["noise"],
                                    kind, protocol)
                           for arm, against in ((main[c["arm"]][0], main[c["against"]][0]),
                                                (longer[c["arm"]], longer[c["against"]]))]
            if short is not None and long is not None:
                rows.append({"metric": m["metric"], **st.shifted_verdict(m, short["diff"], long["diff"])})
        contrasts.append({"arm": c["arm"], "against": c["against"], "metrics": rows})
    return {"factor": cfg["length_check"], "seed": cfg["seeds"][0], "runs": longer, "contrasts": contrasts}


def convergence_check(recs: list[dict[str, Any]]) -> dict[str, Any]:
    """For EV and dead share of the training rule: per seed the change between the last two
    evaluations, against the sd over seeds of the final value; converged when every |change| <= sd."""
    from sae_lens_allocation.analysis import statistics as st

    out: dict[str, Any] = {}
    for metric in ("explained_variance", "dead_share"):
        finals = [r["convergence"][-1][metric] for r in recs]
        changes = [r["convergence"][-1][metric] - r["convergence"][-2][metric]
                   for r in recs if len(r["convergence"]) >= 2]
        sd = st.summarize(finals)["sd"]
        out[metric] = {
            "last_two_tokens": [p["tokens"] for p in recs[0]["convergence"][-2:]],
            "changes": changes, "seed_sd": sd,
            "converged": None if sd is None or len(changes) != len(recs)
            else all(abs(c) <= sd for c in changes),
        }
    return out


def run_compare(cfg: dict[str, Any], output_dir: str | Path | None = None, override_model: Any = None,
                override_dataset: Any = None, override_heldout: Any = None,
                config_path: str | None = None) -> dict[str, Any]:
    """Train and evaluate every run of a compare config (module docstring); writes results.json,
    rows.pt (per-row sums and steering values of every run), report.md and plots."""
    import sae_lens

    from sae_lens_allocation.analysis.compare.report import write_plots, write_report

    cfg = check_compare_config(cfg)
    out = Path(output_dir or cfg["output_dir"]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    start = time.perf_counter()
    if cfg["source"] == "synthetic":
        study: Any = SyntheticStudy(cfg, out)
    else:
        study = LanguageModelStudy(cfg, out, override_model, override_dataset, override_heldout)
    records: dict[str, dict[str, Any]] = {}
    seeds, entries = cfg["seeds"], cfg["architectures"]
    metric, better = selection_metric(cfg["source"])
    best_lr = {e["name"]: arm_setting(cfg, e, "lr") for e in entries}
    lr_sweep: dict[str, dict[str, float]] = {}
    if cfg["lr_values"]:
        runs = [make_run(cfg, e, seeds[0], lr, None) for lr in cfg["lr_values"] for e in entries]
        _execute(study, runs, records)
        for e in entries:
            scores = {lr: records[make_run(cfg, e, seeds[0], lr, None)["label"]]["metrics"][metric]
                      for lr in cfg["lr_values"]}
            lr_sweep[e["name"]] = scores
            best_lr[e["name"]] = max(scores, key=lambda lr: better * scores[lr])
    main = {e["name"]: [make_run(cfg, e, s, best_lr[e["name"]], None) for s in seeds] for e in entries}
    _execute(study, [r for s in range(len(seeds)) for runs in main.values() for r in runs[s:s + 1]], records)
    k_sweep: dict[str, dict[str, str]] = {}
    if cfg["k_values"]:
        runs = [make_run(cfg, e, seeds[0], best_lr[e["name"]], k) for k in cfg["k_values"] for e in entries]
        _execute(study, runs, records)
        for e in entries:
            ks = sorted({*cfg["k_values"], arm_setting(cfg, e, "k")})
            k_sweep[e["name"]] = {f"{k:g}": make_run(cfg, e, seeds[0], best_lr[e["name"]], k)["label"] for k in ks}
    main_labels = {arm: [r["label"] for r in runs] for arm, runs in main.items()}
    summary = summarise(cfg, records, main_labels)
    length: dict[str, Any] = {}
    if cfg["length_check"]:
        runs = [make_run(cfg, e, seeds[0], best_lr[e["name"]], None, cfg["length_check"]) for e in entries]
        _execute(study, runs, records)
        length = length_check(cfg, records, main_labels, {r["arm"]: r["label"] for r in runs}, summary)
    result: dict[str, Any] = {
        "source": cfg["source"], "seeds": seeds, "baseline": cfg["baseline"], "data": study.data,
        "selection": {"metric": metric, "better": better}, "best_lr": best_lr, "lr_sweep": lr_sweep,
        "k_sweep": k_sweep, "main": main_labels, "summary": summary, "length_check": length,
        "total_seconds": time.perf_counter() - start,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "sae_lens": sae_lens.__version__},
        "config": cfg,
    }
    torch.save({label: {"rows": r["_rows"], "steering": r["_steering"]} for label, r in records.items()},
               out / "rows.pt")
    result["runs"] = {label: {k: v for k, v in r.items() if not k.startswith("_")} for label, r in records.items()}
    result["plots"] = write_plots(result, out)
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    write_report(result, out, config_path)
    return result


def run_compare_command(args: Any) -> int:
    from sae_lens_allocation.analysis.compare.report import verdict_table

    cfg = apply_overrides(read_yaml(args.config), args.set)
    result = run_compare(cfg, output_dir=args.out, config_path=str(args.config))
    out = Path(args.out or result["config"]["output_dir"]).resolve()
    print(verdict_table(result))
    print(f"report: {out / 'report.md'}\nresults: {out / 'results.json'}")
    return 0
