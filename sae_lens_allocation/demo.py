"""The main job, offline: train a Mutual Choice SAE on the embedded model as `train` does (the
plugin's `ResumableTrainingRunner`, a subclass of SAELens' runner), evaluate its export with
SAELens' evals, and write a feature dashboard."""

from __future__ import annotations

import json
import time
from importlib.util import find_spec
from pathlib import Path
from typing import Any

DEMO_CONFIG = Path(__file__).parent / "demo-mutual-choice.yaml"


def run_demo(out: str | Path, overrides: list[str] | None = None, fetch_d3: bool = False) -> dict[str, Any]:
    """Train, evaluate and (with the dashboard extra) visualise; returns the paths and figures.

    fetch_d3: fetch d3 into the user cache first when it is not there (the `demo` command does),
        so the dashboard page works offline; without it the page links d3's CDN."""
    from sae_lens_allocation.analysis.evaluation import evaluate_sae, format_table
    from sae_lens_allocation.training.runner import train
    from sae_lens_allocation.yaml_config import load_runner_config

    out = Path(out).resolve()
    sae_dir, ckpt_dir = out / "sae", out / "checkpoints"
    cfg = load_runner_config(
        DEMO_CONFIG, [f"output_path={sae_dir}", f"checkpoint_path={ckpt_dir}", *(overrides or [])]
    )
    report: dict[str, Any] = {"config": str(DEMO_CONFIG), "sae_dir": str(sae_dir)}
    print(f"[demo] training {cfg.sae.architecture()} (k={cfg.sae.k}, d_sae={cfg.sae.d_sae}) on the "
          f"embedded model at {cfg.hook_name}, {cfg.training_tokens:,} tokens", flush=True)
    start = time.perf_counter()
    train(cfg)
    report["train_seconds"] = time.perf_counter() - start

    print("[demo] evaluating the exported SAE on held-out stdlib files", flush=True)
    start = time.perf_counter()
    result = evaluate_sae(sae_dir)
    report["eval_seconds"] = time.perf_counter() - start
    eval_path = out / "eval.json"
    eval_path.write_text(json.dumps(result, indent=2))
    report["eval_json"] = str(eval_path)
    report["summary"] = result["summary"]
    print(format_table(result), flush=True)

    if find_spec("sae_dashboard") is not None:
        from sae_lens_allocation.analysis import dashboard, dashboard_assets

        if fetch_d3 and dashboard_assets.cached_d3() is None:
            try:
                path = dashboard_assets.fetch_d3()
                print(f"[demo] fetched d3 {dashboard_assets.D3_VERSION} from the npm registry (once) into {path}",
                      flush=True)
            except OSError as err:  # urllib's errors (no network, HTTP) and a checksum mismatch
                print(f"[demo] could not fetch d3 ({err})", flush=True)
        print("[demo] writing the feature dashboard", flush=True)
        start = time.perf_counter()
        dash = dashboard.make_dashboard(sae_dir, out=out / "dashboard")
        report["dashboard"] = {"html": str(dash.html), "neuronpedia": str(dash.neuronpedia)}
        report["dashboard_d3_inlined"] = dash.d3_inlined
        report["dashboard_seconds"] = time.perf_counter() - start
    else:
        report["dashboard"] = None
        print("[demo] no dashboard: sae-dashboard is not installed "
              "(pip install 'sae-lens-allocation[dashboard]')", flush=True)
    (out / "demo.json").write_text(json.dumps(report, indent=2))
    print(f"[demo] exported SAE (loads with plain SAELens): {sae_dir}")
    print(f"[demo] evaluation: {eval_path}")
    for name, path in (report["dashboard"] or {}).items():
        print(f"[demo] dashboard {name}: {path}")
    print(f"[demo] timings: train {report['train_seconds']:.0f}s, eval {report['eval_seconds']:.0f}s"
          + (f", dashboard {report['dashboard_seconds']:.0f}s" if report["dashboard"] else ""))
    return report

