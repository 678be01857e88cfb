"""The comparison protocol (package docstring): lr sweep, seeds, k sweep and length check; the
summary with intervals and verdicts; the `compare` command."""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sae_lens_allocation.analysis import row_metrics as rm
from sae_lens_allocation.analysis.compare.claims import length_check, measure_margins, summarise
from sae_lens_allocation.analysis.compare.config import Run, arm_setting, check_compare_config, make_run
from sae_lens_allocation.analysis.compare.feature_quality import arm_stability, hierarchy_config
from sae_lens_allocation.analysis.compare.heldout import sparsity_dead_share
from sae_lens_allocation.analysis.compare.lm_study import LanguageModelStudy
from sae_lens_allocation.analysis.compare.settings import SETTING_METRICS, setting_config
from sae_lens_allocation.analysis.compare.store import Record, RunStore, RunTensors
from sae_lens_allocation.analysis.compare.synthetic_study import SyntheticStudy
from sae_lens_allocation.yaml_config import apply_overrides, read_yaml

# name -> (metric over summed rows, the sums it needs)
ROW_METRICS: dict[str, tuple[Callable[[dict[str, torch.Tensor]], torch.Tensor], tuple[str, ...]]] = {
    "explained_variance": (rm.explained_variance, ("sse", "sxx", "sx", "n")),
    "l0": (rm.mean_l0, ("l0", "n")),
    "ce_with_sae": (rm.ce_with_sae, ("ce_sae", "n_pred")),
    "ce_recovered": (rm.ce_recovered, ("ce_sae", "ce_zero", "ce_clean")),
    "kl": (rm.kl_div, ("kl", "n_pred")),
}


def _scalar_metrics(rows: dict[str, dict[str, torch.Tensor]], part: slice) -> dict[str, float]:
    """Row-decomposable metrics over the held-out rows `part`, per protocol (`_gradient_selection`)."""
    out = {}
    for protocol, sums in rows.items():
        total = {name: t[part].double().sum(0) for name, t in sums.items()}
        suffix = "" if protocol == "export" else f"_{protocol}"
        for name, (fn, keys) in ROW_METRICS.items():
            if all(key in total for key in keys):
                out[name + suffix] = float(fn(total))
    return out


def _record(run: Run, trained: dict[str, Any], evaluated: dict[str, Any]) -> dict[str, Any]:
    from sae_lens_allocation.analysis.evaluation import l0_distribution

    # The first eval.selection_rows rows choose the lr; the others are reported (config.py).
    n = evaluated["selection_rows"]
    metrics: dict[str, Any] = _scalar_metrics(evaluated["rows"], slice(n, None))
    metrics.update(dead_share=evaluated["density"]["dead_share"], underused_share=evaluated["underused_share"],
                   **evaluated.get("scalars", {}))
    metrics.update({f"dead_share_below_{t}": v for t, v in evaluated["density"]["dead_share_below"].items()})
    if run.k:
        metrics["l0_relative_error"] = metrics["l0"] / run.k - 1
    if "steering_values" in evaluated:
        values = evaluated["steering_values"]
        metrics["steering"] = float(values.mean()) if values.numel() else None
    return {
        "label": run.label, "arm": run.arm, "architecture": run.architecture,
        "export_architecture": evaluated["export_architecture"], "seed": run.seed, "lr": run.lr,
        "k": run.k, "d_sae": evaluated["d_sae"], "train_seconds": trained["seconds"],
        "train_tokens_per_s": trained["tokens_per_s"], "lockstep_arms": trained["lockstep_arms"],
        "sae_dir": str(trained["sae_dir"]), "metrics": metrics,
        "l0_per_token": l0_distribution(evaluated["l0_tokens"]), "density": evaluated["density"],
        "gap": evaluated["gap"], "training_window_dead_share": sparsity_dead_share(Path(trained["sae_dir"])),
        "convergence": trained["convergence"], "density_source": evaluated.get("density_source"),
        "selection": _scalar_metrics(evaluated["rows"], slice(None, n or None)),
    }


@dataclasses.dataclass
class Runs:
    """The finished runs of a comparison: records and held-out tensors by run label, kept in the
    output folder's store as they finish."""

    study: Any
    store: RunStore
    records: dict[str, Record] = dataclasses.field(default_factory=dict)
    tensors: dict[str, RunTensors] = dataclasses.field(default_factory=dict)

    def execute(self, runs: list[Run]) -> None:
        """Reuse the stored runs, then train and evaluate the others, grouped by (seed, lr) where
        the study trains in lockstep (one multi-SAE run each), else one at a time; each group is
        stored as soon as it is evaluated, so an interruption loses at most one group. Then the
        study's data gains where each run's dead share read its tokens, in the order of `runs`
        (the same whether a run is fresh or reused)."""
        groups: dict[Any, list[Run]] = {}
        for run in runs:
            if run.label in self.records:
                continue
            stored = self.store.load(run)
            if stored is not None:
                self.records[run.label], self.tensors[run.label] = stored
            else:
                groups.setdefault((run.seed, run.lr) if self.study.lockstep else run.label, []).append(run)
        for group in groups.values():
            trained = self.study.train(group)
            for run in group:
                evaluated = self.study.evaluate(run, trained[run.label])
                tensors = RunTensors(evaluated["rows"], evaluated.get("steering_values"))
                self.records[run.label] = self.store.save(run, _record(run, trained[run.label], evaluated),
                                                             tensors)
                self.tensors[run.label] = tensors
                trained[run.label]["sae"] = None  # the training SAE is not needed any more
        for run in runs:
            source = self.records[run.label]["density_source"]
            if source is not None:
                info = {k: v for k, v in source.items() if k not in ("where", "seed")}
                self.study.data.setdefault(source["where"], {})[source["seed"]] = info


def _runs_again(sub: dict[str, Any], folder: Path, runs: list[Run], records: dict[str, Record],
                names: dict[str, str]) -> dict[str, Any]:
    """`runs` (the main and margin runs, each at its own seed and lr) again under the comparison
    config `sub`, stored in `folder`; each run's metric m there joins its main record's metrics as
    names[m], so it is paired by seed as the other metrics are (a claim metric, config.claim_metrics)."""
    study = SyntheticStudy(sub, folder)
    done = Runs(study, RunStore(folder, sub, study.data))
    again = [make_run(sub, next(e for e in sub["architectures"] if e["name"] == r.arm), r.seed, r.lr, None)
             for r in runs]
    done.execute(again)
    for run, twin in zip(runs, again):
        m = done.records[twin.label]["metrics"]
        records[run.label]["metrics"].update({new: m[old] for old, new in names.items()})
    return {"folder": str(folder), "data": study.data,
            "metrics": {r.label: done.records[r.label]["metrics"] for r in again}}


def hierarchy_runs(cfg: dict[str, Any], hierarchy: dict[str, Any], out: Path, runs: list[Run],
                   records: dict[str, Record]) -> dict[str, Any]:
    """`runs` again on the synthetic model with `hierarchy`, in out/hierarchy-<name>; their
    absorption becomes `absorption_<name>`. These runs report no other claim, so their dead share
    reads `eval.samples` samples rather than `eval.density_samples`."""
    sub = hierarchy_config(cfg, hierarchy)
    sub["eval"]["density_samples"] = sub["eval"]["samples"]
    name = hierarchy["name"]
    return _runs_again(sub, out / f"hierarchy-{name}", runs, records,
                       {"absorption": f"absorption_{name}", "main_silent": f"main_silent_{name}"})


def setting_runs(cfg: dict[str, Any], setting: dict[str, Any], out: Path, runs: list[Run],
                 records: dict[str, Record]) -> dict[str, Any]:
    """`runs` again on a setting's synthetic model and d_sae (compare/settings.py), in
    out/setting-<name>; each of settings.SETTING_METRICS m becomes `m@<name>`."""
    name = setting["name"]
    return _runs_again(setting_config(cfg, setting), out / f"setting-{name}", runs, records,
                       {m: f"{m}@{name}" for m, _ in SETTING_METRICS})


def selection_metric(source: str) -> tuple[str, int]:
    """(metric, better) choosing an arm's lr: held-out CE with the SAE spliced in (language model),
    explained variance (synthetic)."""
    return ("ce_with_sae", -1) if source == "language_model" else ("explained_variance", 1)


def run_compare(cfg: dict[str, Any], output_dir: str | Path | None = None, override_model: Any = None,
                override_dataset: Any = None, override_heldout: Any = None,
                config_path: str | None = None) -> dict[str, Any]:
    """Train and evaluate every run of a compare config (module docstring), reusing the runs
    already finished in the output folder (store.py); writes results.json, rows.pt (per-row sums
    and steering values of every run), report.md and plots."""
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
    done = Runs(study, RunStore(out, cfg, study.data))
    records = done.records
    seeds, entries = cfg["seeds"], cfg["architectures"]
    metric, better = selection_metric(cfg["source"])
    best_lr = {e["name"]: arm_setting(cfg, e, "lr") for e in entries}
    lr_sweep: dict[str, dict[str, float]] = {}
    lr_at_edge: list[str] = []
    if cfg["lr_values"]:
        # The lr with the best mean selection metric over the first selection_seeds seeds.
        chosen_on = seeds[:cfg["selection_seeds"]]
        runs = [make_run(cfg, e, s, lr, None) for s in chosen_on for lr in cfg["lr_values"] for e in entries]
        done.execute(runs)
        for e in entries:
            scores = {lr: sum(records[make_run(cfg, e, s, lr, None).label]["selection"][metric]
                              for s in chosen_on) / len(chosen_on) for lr in cfg["lr_values"]}
            lr_sweep[e["name"]] = scores
            best_lr[e["name"]] = max(scores, key=lambda lr: better * scores[lr])
            if len(scores) > 2 and best_lr[e["name"]] in (min(scores), max(scores)):
                lr_at_edge.append(e["name"])
    main = {e["name"]: [make_run(cfg, e, s, best_lr[e["name"]], None) for s in seeds] for e in entries}
    done.execute([r for s in range(len(seeds)) for runs in main.values() for r in runs[s:s + 1]])
    # Every arm at every k of k_values on every seed (its main k is the main run).
    k_sweep: dict[str, dict[str, list[str]]] = {}
    if cfg["k_values"]:
        done.execute([make_run(cfg, e, s, best_lr[e["name"]], k)
                      for s in seeds for k in cfg["k_values"] for e in entries])
        for e in entries:
            ks = sorted({*cfg["k_values"], arm_setting(cfg, e, "k")})
            k_sweep[e["name"]] = {f"{k:g}": [make_run(cfg, e, s, best_lr[e["name"]], k).label for s in seeds]
                                  for k in ks}
    # The margins' control runs: the baseline at its best lr on seeds no contrast uses.
    control = next(e for e in entries if e["name"] == cfg["baseline"])
    margin_runs = [make_run(cfg, control, s, best_lr[control["name"]], None) for s in cfg["margin_seeds"] or []]
    done.execute(margin_runs)
    # The control's L0 frontier on every main seed (frontier.py); its main-k run is one point.
    ks = sorted({*(cfg["frontier_k"] or []), arm_setting(cfg, control, "k")})
    frontier = [[make_run(cfg, control, s, best_lr[control["name"]], k) for k in ks] for s in seeds] \
        if cfg["frontier_k"] else []
    done.execute([r for runs in frontier for r in runs])
    frontier_labels = [[r.label for r in runs] for runs in frontier]
    main_labels = {arm: [r.label for r in runs] for arm, runs in main.items()}
    again = [*(r for runs in main.values() for r in runs), *margin_runs]
    hierarchies = {h["name"]: hierarchy_runs(cfg, h, out, again, records) for h in cfg["hierarchies"]}
    settings = {s["name"]: setting_runs(cfg, s, out, again, records) for s in cfg["settings"]}
    margins = measure_margins(cfg, [records[r.label] for r in margin_runs])
    summary = summarise(cfg, records, main_labels, margins, frontier_labels)
    summary["stability"] = arm_stability(records, main_labels)
    length: dict[str, Any] = {}
    if cfg["length_check"]:
        longer = {e["name"]: [make_run(cfg, e, s, best_lr[e["name"]], None, cfg["length_check"]) for s in seeds]
                  for e in entries}
        done.execute([r for s in range(len(seeds)) for runs in longer.values() for r in runs[s:s + 1]])
        length = length_check(cfg, records, {arm: [r.label for r in runs] for arm, runs in longer.items()},
                              summary)
    result: dict[str, Any] = {
        "source": cfg["source"], "seeds": seeds, "baseline": cfg["baseline"], "data": study.data,
        "selection": {"metric": metric, "better": better, "seeds": seeds[:cfg["selection_seeds"]]},
        "best_lr": best_lr, "lr_sweep": lr_sweep, "lr_at_edge": lr_at_edge,
        "k_sweep": k_sweep, "main": main_labels, "frontier": frontier_labels, "summary": summary,
        "hierarchies": hierarchies, "settings": settings, "probing": getattr(study, "probing", None),
        "length_check": length,
        "total_seconds": time.perf_counter() - start,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "sae_lens": sae_lens.__version__},
        "config": cfg,
    }
    torch.save({label: {"rows": t.rows, "steering": t.steering} for label, t in done.tensors.items()},
               out / "rows.pt")
    result["runs"] = records
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
