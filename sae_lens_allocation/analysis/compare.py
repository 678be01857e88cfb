"""`sae-lens-allocation compare CONFIG.yaml`: several architectures trained on the same data over
several seeds, evaluated on the same held-out data, with intervals and verdicts against a
baseline (report.md, results.json, rows.pt, PNG plots).

Config (YAML mapping; every key checked, errors are one-line `ConfigError`s):

    source: language_model | synthetic
    output_dir: runs/compare          # report.md, results.json, rows.pt, plots, one SAE folder per run
    seeds: [42, 43, 44]               # every arm at its best lr and the main k, once per seed
    threads: 2                        # torch.set_num_threads
    base: {...}                       # language_model: a SAELens runner config without
                                      # sae.architecture (model_name defaults to the embedded
                                      # model and its corpus); synthetic: SyntheticSAERunnerConfig
                                      # fields (synthetic_model, training_samples, batch_size, ...)
    architectures:                    # the arms: any registered training architecture, with overrides
      - {name: mc-aux_zipf, architecture: mutual_choice, sae: {aux_loss: aux_zipf}, runner: {}}
    baseline: topk                    # the arm every other arm is compared with (default: the
                                      # arm named topk, else the first)
    contrasts: [{arm: g-beta1, against: g-beta0}]   # further paired comparisons
    lr_values: [3.0e-4, 1.0e-3, 3.0e-3]   # optional lr sweep on seeds[0] at the main k; every arm
                                      # is then reported at its best lr
    k_values: [8, 32]                 # optional k sweep on seeds[0] at each arm's best lr
    length_check: 2                   # optional: every arm again on seeds[0] at its best lr with
                                      # this many times the training (tokens or samples, and
                                      # lr_decay_steps); do the verdicts survive longer training?
    lockstep: true                    # language_model: arms that share seed and lr train in one
                                      # multi-SAE run (one LM pass per batch)
    eval: {...}                       # see _EVAL_DEFAULTS

Protocol (docs/results.md "Protocol"): (1) the lr sweep, one seed, main k; the best lr of an arm
has the lowest held-out CE with the SAE spliced in (language model) or the highest explained
variance (synthetic); (2) every arm at its best lr and the main k for every seed (the sweep's
run at seeds[0] is reused); (3) the k sweep on seeds[0]; (4) the length check on seeds[0]. Main-k results are reported as
mean +- sd over seeds with paired intervals against the baseline (statistics.py) and a verdict
per metric; convergence is checked on every main run: the training rule's held-out EV and dead
share at the last two of `eval.convergence_points` evenly spaced evaluations must move less
than their sd over seeds. Under a schedule that decays the lr to 0 that check measures the
anneal, so the length check asks the question the verdicts need: with D_1 and D_f the
differences arm - against on seeds[0] at the main length and at `length_check` times it, is the
main verdict unchanged when its difference and interval move by D_f - D_1
(`statistics.shifted_verdict`)?

Same data: every run of a seed reads the same rows in the same order. Language model: each run is
a SAELens multi-SAE run (training/multi_runner.py) seeded with its seed, so an arm trained in
lockstep with others equals the arm trained alone (tested); on the embedded corpus the runner
builds each seed's training rows as a single run would (files in the seed's order), so exports
calibrate on files that seed never trains on; other datasets are read as given. The synthetic
stream draws batch i of seed s from its own seed `s * 1_000_003 + i`. Held-out rows are the
same for every run: all rows of the embedded model's held-out split (or `eval.heldout_rows`
rows), or `eval.samples` synthetic samples from a seed no run trains or calibrates on.

Metrics: analysis/row_metrics.py (EV, CE with the SAE, CE recovered, KL, L0; special tokens
excluded), the export's dead share over `eval.density_samples` tokens (all held-out tokens, then
on the embedded corpus rows of train-split files neither training nor calibration of that seed
read; other language-model sources: the held-out tokens; synthetic: fresh samples) with the
log10-density histogram, the underused share (p_j < tau * p_hat_j under the
Zipf fit of losses.fit_zipf, dead included), the exported-vs-training gap, steering
(analysis/steering.py), MCC and per-latent F1 (synthetic, sae_lens.synthetic), training tokens/s.
gradient_topk arms are evaluated twice: the plain-TopK export, and gradient selection on the
held-out text (teacher forcing: g = d(sum next-token CE)/dx on the clean text).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from sae_lens_allocation.analysis import row_metrics as rm
from sae_lens_allocation.tokens import keep_mask, special_token_ids
from sae_lens_allocation.yaml_config import ConfigError, apply_overrides, read_yaml

SOURCES = ("language_model", "synthetic")
_TOP_KEYS = {"source", "output_dir", "seeds", "threads", "base", "architectures", "baseline",
             "contrasts", "lr_values", "k_values", "eval", "lockstep", "length_check"}
_ARCH_KEYS = {"name", "architecture", "sae", "runner"}
_EVAL_DEFAULTS: dict[str, Any] = {
    "heldout_rows": None,          # language model: held-out rows (null: the whole embedded held-out split)
    "batch_rows": 8,               # language model: held-out rows per forward pass
    "ce_rows": 256,                # language model: the first held-out rows used for CE and KL
    "samples": 65536,              # synthetic: held-out samples for EV, L0, MCC
    "block_samples": 256,          # synthetic: samples per bootstrap row
    "density_samples": 1_048_576,  # samples (tokens) for the dead share and density histogram
    "bootstrap": 1000,             # bootstrap draws per interval
    "steering_latents": 32,        # language model: latents per SAE in the steering metric
    "steering_contexts": 8,        # language model: held-out rows used as steering contexts
    "steering_scale": 1.0,         # alpha = steering_scale * mean activation norm at the hook
    "convergence_points": 4,       # evenly spaced evaluations of the training rule per run
    "probe_rows": 16384,           # held-out rows for those evaluations
    "underused_tau": 0.5,
    "fit_fraction": 0.5,
    "heldout_dataset_path": None,  # hub models: pretokenized held-out rows
    "heldout_split": "train",
    "heldout_skip_rows": 0,
}
_EVAL_INT_MIN = {"batch_rows": 1, "ce_rows": 1, "samples": 1, "block_samples": 1, "density_samples": 1, "bootstrap": 100,
                 "steering_latents": 1, "steering_contexts": 1, "convergence_points": 2, "probe_rows": 1,
                 "heldout_skip_rows": 0}
# Exports whose inference rule differs from the training rule (batch allocation -> thresholds).
_GAP_ARCHITECTURES = ("mutual_choice", "feature_choice", "batchtopk")
_LM_ONLY = ("gradient_topk",)
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


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(value).__name__}")
    return value


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _number_list(cfg: dict[str, Any], key: str) -> list[float] | None:
    values = cfg.get(key)
    if values is not None and (
        not isinstance(values, list) or not values or len(set(values)) != len(values)
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values)
    ):
        raise ConfigError(f"{key}={values!r} is not allowed; use null or a list of distinct numbers > 0")
    return values


def _check_eval(ev: dict[str, Any], source: str) -> dict[str, Any]:
    unknown = sorted(set(ev) - set(_EVAL_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown eval key eval.{unknown[0]}; allowed: {', '.join(sorted(_EVAL_DEFAULTS))}")
    out = {**_EVAL_DEFAULTS, **ev}
    for name, low in _EVAL_INT_MIN.items():
        v = out[name]
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ConfigError(f"eval.{name}={v!r} is not allowed; use an integer >= {low}")
    rows = out["heldout_rows"]
    if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
        raise ConfigError(f"eval.heldout_rows={rows!r} is not allowed; use null (all rows) or an integer >= 1")
    for name in ("steering_scale", "underused_tau"):
        v = out[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ConfigError(f"eval.{name}={v!r} is not allowed; use a finite number > 0")
    if not (isinstance(out["fit_fraction"], (int, float)) and 0 < out["fit_fraction"] <= 1):
        raise ConfigError(f"eval.fit_fraction={out['fit_fraction']!r} is not allowed; use a number in (0, 1]")
    if source == "synthetic" and out["samples"] < out["block_samples"] * 2:
        raise ConfigError(f"eval.samples={out['samples']} is not allowed: at least 2 blocks of "
                          f"eval.block_samples={out['block_samples']}")
    return out


def check_compare_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Validate a compare config dict and fill defaults; raises `ConfigError`."""
    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

    import sae_lens_allocation  # noqa: F401  (registers the plugin architectures)
    from sae_lens_allocation.loading import unknown_architecture_message

    if "seed" in cfg:
        raise ConfigError(f"seed={cfg['seed']!r} is not allowed: a comparison runs several seeds; "
                          "use seeds: [42, 43, 44]")
    unknown = sorted(set(cfg) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"unknown compare config key {unknown[0]}; allowed: {', '.join(sorted(_TOP_KEYS))}")
    source = cfg.get("source", "language_model")
    if source not in SOURCES:
        raise ConfigError(f"source={source!r} is not allowed; use one of {', '.join(SOURCES)}")
    seeds = cfg.get("seeds", [42, 43, 44])
    if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise ConfigError(f"seeds={seeds!r} is not allowed; use a list of distinct integers >= 0")
    threads = cfg.get("threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads={threads!r} is not allowed; use null or an integer >= 1")
    base = _mapping(cfg.get("base"), "base")
    if "architecture" in _mapping(base.get("sae"), "base.sae"):
        raise ConfigError("base.sae.architecture is not allowed: name architectures in 'architectures'")
    archs = cfg.get("architectures")
    if not isinstance(archs, list) or not archs:
        raise ConfigError("'architectures' must be a non-empty list of {name, architecture, sae, runner}")
    k_values = _number_list(cfg, "k_values")
    lr_values = _number_list(cfg, "lr_values")
    ev = _check_eval(_mapping(cfg.get("eval"), "eval"), source)
    entries = []
    names: list[str] = []
    for i, entry in enumerate(archs):
        entry = _mapping(entry, f"architectures[{i}]")
        unknown = sorted(set(entry) - _ARCH_KEYS)
        if unknown:
            raise ConfigError(f"unknown key architectures[{i}].{unknown[0]}; allowed: {', '.join(sorted(_ARCH_KEYS))}")
        arch = entry.get("architecture")
        if arch not in SAE_TRAINING_CLASS_REGISTRY:
            raise ConfigError(unknown_architecture_message(str(arch), f"architectures[{i}].architecture"))
        if source == "synthetic" and arch in _LM_ONLY:
            raise ConfigError(f"architectures[{i}].architecture={arch!r} is not allowed with source: "
                              "synthetic; it needs gradients of a language model's loss")
        name = str(entry.get("name") or arch)
        if name in names:
            raise ConfigError(f"architectures[{i}].name={name!r} is used twice; names must be unique")
        names.append(name)
        entries.append({"name": name, "architecture": arch,
                        "sae": _mapping(entry.get("sae"), f"architectures[{i}].sae"),
                        "runner": _mapping(entry.get("runner"), f"architectures[{i}].runner")})
    baseline = cfg.get("baseline", "topk" if "topk" in names else names[0])
    if baseline not in names:
        raise ConfigError(f"baseline={baseline!r} is not allowed; use the name of an arm: {', '.join(names)}")
    contrasts = [(n, baseline) for n in names if n != baseline]
    raw = cfg.get("contrasts") or []
    if not isinstance(raw, list):
        raise ConfigError("contrasts must be a list of {arm, against}")
    for i, c in enumerate(raw):
        c = _mapping(c, f"contrasts[{i}]")
        if set(c) != {"arm", "against"} or c["arm"] not in names or c["against"] not in names or c["arm"] == c["against"]:
            raise ConfigError(f"contrasts[{i}]={c!r} is not allowed; use {{arm: NAME, against: OTHER_NAME}} "
                              f"with two different arms of: {', '.join(names)}")
        if (c["arm"], c["against"]) not in contrasts:
            contrasts.append((c["arm"], c["against"]))
    lockstep = cfg.get("lockstep", True)
    if not isinstance(lockstep, bool):
        raise ConfigError(f"lockstep={lockstep!r} is not allowed; use true or false")
    length = cfg.get("length_check")
    if length is not None and (isinstance(length, bool) or not isinstance(length, (int, float))
                               or not math.isfinite(length) or length <= 1):
        raise ConfigError(f"length_check={length!r} is not allowed; use null or a number > 1 "
                          "(the factor on the training length)")
    out = {
        "source": source, "seeds": seeds, "threads": threads, "base": base, "architectures": entries,
        "baseline": baseline, "contrasts": contrasts, "lockstep": lockstep, "lr_values": lr_values,
        "k_values": k_values, "length_check": length, "eval": ev,
        "output_dir": str(cfg.get("output_dir") or "runs/compare"),
    }
    for entry in entries:
        for lr in lr_values or [None]:
            for k in k_values or [None]:
                run_config(out, make_run(out, entry, seeds[0], lr, k), Path(out["output_dir"]))
        if length:
            run_config(out, make_run(out, entry, seeds[0], None, None, length), Path(out["output_dir"]))
    return out


def arm_setting(cfg: dict[str, Any], entry: dict[str, Any], key: str) -> Any:
    """The arm's lr (runner) or k (sae) before any sweep."""
    if key == "k":
        return _merge(_mapping(cfg["base"].get("sae"), "base.sae"), entry["sae"]).get("k")
    return _merge(cfg["base"], entry["runner"]).get("lr")


def make_run(cfg: dict[str, Any], entry: dict[str, Any], seed: int, lr: float | None,
             k: float | None, length: float | None = None) -> dict[str, Any]:
    """One training run of an arm: its seed, lr and k (None: the arm's own); `length` (the
    length check) multiplies its training tokens (samples) and `lr_decay_steps`, so the lr
    schedule keeps its shape; the warm-up stays as it is."""
    lr = arm_setting(cfg, entry, "lr") if lr is None else lr
    k = arm_setting(cfg, entry, "k") if k is None else k
    run = copy.deepcopy(entry)
    run["runner"] = {**run["runner"], **({"lr": lr} if lr is not None else {})}
    run["sae"] = {**run["sae"], **({"k": k} if k is not None else {})}
    run.update(arm=entry["name"], seed=seed, lr=lr, k=k, length=length,
               label=f"{entry['name']}@lr={lr:g},k={k:g},seed={seed}" if lr and k else f"{entry['name']}@seed={seed}")
    if length is not None:
        size = "training_tokens" if cfg["source"] == "language_model" else "training_samples"
        given = run_config(cfg, run, Path(cfg["output_dir"]))
        run["runner"].update({size: round(getattr(given, size) * length),
                              "lr_decay_steps": round(given.lr_decay_steps * length)})
        run["label"] += f",x{length:g}"
    return run


def _slug(run: dict[str, Any]) -> str:
    return run["label"].replace("/", "_").replace("@", "_").replace(",", "_").replace("=", "")


def run_config(cfg: dict[str, Any], run: dict[str, Any], out: Path) -> Any:
    """The runner config (language model) or SyntheticSAERunnerConfig of one run."""
    d = _merge(cfg["base"], run["runner"])
    d["sae"] = {**_merge(_mapping(d.get("sae"), "base.sae"), run["sae"]), "architecture": run["architecture"]}
    d["seed"] = run["seed"]
    slug = _slug(run)
    if cfg["source"] == "language_model":
        from sae_lens_allocation.embedded import DEFAULT_HOOK_NAME
        from sae_lens_allocation.yaml_config import runner_config_from_dict

        if d.setdefault("model_name", "embedded") == "embedded":
            # The embedded model is the default source; its corpus is pretokenized.
            d.setdefault("dataset_path", "embedded")
            d.setdefault("hook_name", DEFAULT_HOOK_NAME)
            d.setdefault("is_dataset_tokenized", True)
            d.setdefault("streaming", False)
        d["output_path"] = str(out / "saes" / slug)
        d["checkpoint_path"] = None
        d.setdefault("n_checkpoints", 0)
        try:
            return runner_config_from_dict(d)
        except ConfigError as err:
            raise ConfigError(f"run {run['label']}: {err}") from None
    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY
    from sae_lens.synthetic.synthetic_sae_runner import SyntheticSAERunnerConfig

    d.pop("seed")
    allowed = {f for f in SyntheticSAERunnerConfig.__dataclass_fields__}
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise ConfigError(f"run {run['label']}: unknown synthetic runner key {unknown[0]}; "
                          f"allowed: {', '.join(sorted(allowed))}")
    sae_allowed = set(SAE_TRAINING_CLASS_REGISTRY[run["architecture"]][1].__dataclass_fields__) | {"architecture"}
    unknown = sorted(set(d["sae"]) - sae_allowed)
    if unknown:
        raise ConfigError(f"run {run['label']}: unknown key sae.{unknown[0]} for architecture {run['architecture']}")
    d.update(output_path=str(out / "saes" / slug), checkpoint_path=None, run_final_eval=False)
    d.setdefault("logger", {"log_to_wandb": False})
    try:
        return SyntheticSAERunnerConfig.from_dict(d)
    except KeyError as err:
        raise ConfigError(f"run {run['label']}: missing synthetic config field {err} (e.g. "
                          "synthetic_model.firing_probability with generator_name: zipfian)") from None
    except (ValueError, TypeError) as err:
        raise ConfigError(f"run {run['label']}: {str(err).splitlines()[0] if str(err) else repr(err)}") from None


# ---------------------------------------------------------------------------------------------
# Held-out statistics shared by both sources
# ---------------------------------------------------------------------------------------------


def _sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def underused_share(fired: torch.Tensor, n: float, tau: float, fit_fraction: float) -> dict[str, Any]:
    """Dead and underused shares from firing counts over `n` tokens: p_j = fired_j / n; dead:
    p_j = 0; underused: dead or p_j < tau * p_hat_j, with p_hat the Zipf fit of `losses.fit_zipf`
    to the top `fit_fraction` of the ranked densities (`aux_zipf`'s own rule, `zipf_underuse`)."""
    from sae_lens_allocation.allocation import ranks_from_frequency
    from sae_lens_allocation.saes.zipf import expected_frequency, fit_zipf, zipf_underuse

    p = fired.double().cpu() / n
    log_c, s, n_points = fit_zipf(p.float(), fit_fraction).tolist()
    p_hat = expected_frequency(ranks_from_frequency(p).float(), torch.tensor(log_c), torch.tensor(s))
    dead = p == 0
    underused, _ = zipf_underuse(p, p_hat, dead, tau, torch.tensor(n_points > 0))
    return {"dead_share": float(dead.double().mean()), "underused_share": float(underused.double().mean()),
            "zipf_log_c": log_c, "zipf_s": s, "density": sorted(p.tolist(), reverse=True)}


@torch.no_grad()
def training_gap(export: Any, training_sae: Any, x: torch.Tensor, batch_tokens: int) -> dict[str, float] | None:
    """Export vs training rule on the same rows: the whole batches of `batch_tokens` rows of `x`
    [N, d_in], the export in eval mode, the training SAE in train mode (its batch rule). None when
    `x` holds no whole batch."""
    n_full = (x.shape[0] // batch_tokens) * batch_tokens
    if not n_full:
        return None
    export.eval()
    torch.nn.Module.train(training_sae, True)
    x = x[:n_full]
    sse = {"export": 0.0, "training": 0.0}
    l0 = {"export": 0.0, "training": 0.0}
    for chunk in x.split(batch_tokens):
        codes = export.encode(chunk)
        acts, _ = training_sae.encode_with_hidden_pre(chunk)
        for name, c, x_hat in (("export", codes, export.decode(codes)), ("training", acts, training_sae.decode(acts))):
            sse[name] += float((x_hat - chunk).pow(2).sum())
            l0[name] += float((c != 0).sum())
    total = float((x - x.mean(0)).pow(2).sum())
    ev = {name: 1.0 - v / total for name, v in sse.items()}
    return {"rows": n_full, "export_explained_variance": ev["export"], "training_explained_variance": ev["training"],
            "export_l0": l0["export"] / n_full, "training_l0": l0["training"] / n_full,
            "export_minus_training_ev": ev["export"] - ev["training"],
            "export_minus_training_l0": (l0["export"] - l0["training"]) / n_full}


@torch.no_grad()
def heldout_stats(export: Any, training_sae: Any, x: torch.Tensor, batch_tokens: int,
                  tau: float, fit_fraction: float) -> dict[str, Any]:
    """Export-side firing, dead/underused shares, NMSE, EV, per-token L0 on rows `x` [N, d_in];
    with `training_sae` also `gap` (`training_gap`: export vs batch rule on the whole batches)."""
    from sae_lens_allocation.analysis.evaluation import l0_distribution

    export.eval()
    counts = torch.zeros(export.cfg.d_sae, dtype=torch.float64)
    sq_err, l0s = 0.0, []
    for chunk in x.split(batch_tokens):
        codes = export.encode(chunk)
        sq_err += float((export.decode(codes) - chunk).pow(2).sum())
        fired = codes != 0
        counts += fired.sum(0).double().cpu()
        l0s.append(fired.sum(-1).cpu())
    total_var = float((x - x.mean(0)).pow(2).sum())
    out: dict[str, Any] = {
        "explained_variance": 1.0 - sq_err / total_var,
        "nmse": sq_err / float(x.pow(2).sum()),
        "l0_per_token": l0_distribution(torch.cat(l0s)),
        **underused_share(counts, x.shape[0], tau, fit_fraction),
        "heldout_rows": int(x.shape[0]),
    }
    if training_sae is not None:
        out["gap"] = training_gap(export, training_sae, x, batch_tokens)
    return out


def _gap(run: dict[str, Any], trained: dict[str, Any], export: Any, x: torch.Tensor) -> dict[str, float] | None:
    """`training_gap` for the architectures whose export rule differs from their training rule."""
    if run["architecture"] not in _GAP_ARCHITECTURES:
        return None
    return training_gap(export, trained["sae"], x, trained["batch_tokens"])


def sparsity_dead_share(sae_dir: Path) -> float | None:
    """Share of latents with log10 firing density <= -9 in SAELens' sparsity.safetensors (the
    last feature_sampling_window of training; SAELens stores log10(p + 1e-10))."""
    path = sae_dir / "sparsity.safetensors"
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    log_p = load_file(str(path))["sparsity"]
    return float((log_p <= -9).float().mean())




@torch.no_grad()
def training_rule_stats(sae: Any, x: torch.Tensor, batch_tokens: int, architecture: str) -> dict[str, float]:
    """Held-out EV and dead share of a training SAE under its training rule: the batch rule (train
    mode, batches of the training batch size) for batch-allocation architectures, the per-token
    rule (eval mode) otherwise (gradient_topk: plain TopK, no gradient at hand). The SAE's buffers,
    generators, mode and the global RNG are restored, so a probe during training changes nothing."""
    from sae_lens_allocation.training.resume import generator_states, set_generator_states

    batch_rule = architecture in _GAP_ARCHITECTURES
    saved = {k: v.clone() for k, v in sae.state_dict().items()}
    generators, mode = generator_states(sae), sae.training
    n_full = (x.shape[0] // batch_tokens) * batch_tokens if batch_rule else x.shape[0]
    x = x[:n_full].to(sae.W_enc.device)
    sse, fired = 0.0, torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.nn.Module.train(sae, batch_rule)
            for chunk in x.split(batch_tokens):
                codes, _ = sae.encode_with_hidden_pre(chunk)
                sse += float((sae.decode(codes) - chunk).pow(2).sum())
                fired |= (codes != 0).any(0).cpu()
    finally:
        sae.load_state_dict(saved)
        set_generator_states(sae, generators)
        torch.nn.Module.train(sae, mode)
    total = float((x - x.mean(0)).pow(2).sum())
    return {"explained_variance": 1.0 - sse / total, "dead_share": float((~fired).float().mean())}


def trained_run(sae: Any, seconds: float, tokens: int, arms: int, sae_dir: Path, batch: int,
                points: list[dict[str, float]], n_points: int) -> dict[str, Any]:
    """What evaluation needs of a trained run; the probes' points get their token counts."""
    at = convergence_points(tokens, n_points, batch)
    return {"sae": sae, "seconds": seconds, "tokens_per_s": tokens / seconds, "lockstep_arms": arms,
            "sae_dir": sae_dir, "batch_tokens": batch,
            "convergence": [{"tokens": t, **p} for t, p in zip(at[-len(points):], points)]}


def load_export(sae_dir: Path, device: str) -> tuple[Any, Any]:
    """The export in eval mode and its `row_metrics.Reconstruct`."""
    from sae_lens_allocation.loading import load_sae

    export = load_sae(sae_dir, device=device)
    export.eval()
    return export, rm.export_reconstruct(export)


def convergence_points(total: int, n_points: int, batch: int) -> list[int]:
    """Training samples at the evaluations of a run: SAELens checkpoints (n_checkpoints =
    n_points - 1) after the first step past each multiple of ceil(total / n_points), then the end."""
    step = math.ceil(total / n_points)
    at = [(t // batch + 1) * batch for t in range(step, total, step)][: n_points - 1]
    return [t for t in at if t < total] + [total]


# ---------------------------------------------------------------------------------------------
# Language-model source
# ---------------------------------------------------------------------------------------------


def lm_activations(model: Any, dataset: Any, hook: str, n_rows: int, batch_prompts: int) -> torch.Tensor:
    """Activations at `hook` of the first `n_rows` rows of a pretokenized dataset, special
    tokens (BOS/EOS/PAD) removed, as [tokens, d_in]."""

    column = "tokens" if "tokens" in dataset.column_names else "input_ids"
    tokens = torch.tensor(dataset[:n_rows][column])
    acts = rm.lm_row_activations(model, tokens, hook, batch_prompts)
    return acts[keep_mask(tokens, special_token_ids(model))].cpu()


def hub_heldout_rows(path: str, split: str, skip_rows: int, n_rows: int, context_size: int) -> Any:
    """`n_rows` pretokenized rows of a hub dataset after skipping `skip_rows` (streaming), cut to
    `context_size` tokens, as a `datasets.Dataset` with a `tokens` column."""
    from datasets import Dataset, load_dataset

    stream = load_dataset(path, split=split, streaming=True).skip(skip_rows).take(n_rows)
    rows = []
    for item in stream:
        ids = item.get("tokens", item.get("input_ids"))
        if ids is None:
            raise ConfigError(f"eval.heldout_dataset_path={path!r} is not allowed: it needs a pretokenized "
                              "'tokens' or 'input_ids' column")
        rows.append(list(ids)[:context_size])
    return Dataset.from_dict({"tokens": rows})


# Runner fields that may differ between the arms of a lockstep run.
_PER_RUN_FIELDS = ("sae", "output_path", "checkpoint_path", "logger")


def lockstep_allowed(configs: list[Any]) -> bool:
    """Arms train in one multi-SAE run when their runner configs agree on everything but the
    SAE (same model, hook, data, batch, schedule, seed) and use nothing SAELens' multi runner
    lacks (cached activations, compile_sae, from_pretrained_path, resume)."""
    def shared(c: Any) -> dict[str, Any]:
        d = c.to_dict()
        return {k: v for k, v in d.items() if k not in _PER_RUN_FIELDS}

    first = shared(configs[0])
    return all(
        shared(c) == first and not c.use_cached_activations and not c.compile_sae
        and c.from_pretrained_path is None and c.resume_from_checkpoint is None
        for c in configs
    )


def lockstep_config(configs: list[Any], runs: list[dict[str, Any]], out: Path, n_points: int) -> Any:
    """The `MultiSAETrainingRunnerConfig` training the runs on the first config's settings; run
    `<slug>` exports to out/saes/<slug> as a single run would. `n_points - 1` checkpoints without
    a checkpoint folder: SAELens then only calls the runner's checkpoint hook (the probe)."""
    from sae_lens.multi_sae_training_runner import MultiSAETrainingRunnerConfig

    from sae_lens_allocation.training.multi_runner import multi_runner_fields

    first = configs[0]
    per_run = {"saes", "hook_names", "hook_head_indices", "output_path", "checkpoint_path", "n_checkpoints"}
    fields = {f: getattr(first, f) for f in multi_runner_fields() - per_run if hasattr(first, f)}
    return MultiSAETrainingRunnerConfig(
        **fields,
        saes={_slug(run): c.sae for run, c in zip(runs, configs)},
        hook_names=first.hook_name, hook_head_indices=first.hook_head_index,
        output_path=str(out / "saes"), checkpoint_path=None, n_checkpoints=n_points - 1,
    )


def _probed_multi_runner(cfg: Any, dataset: Any, model: Any, probe: Callable[[dict[str, Any]], None]) -> Any:
    """The plugin's multi runner whose checkpoint hook evaluates the SAEs instead of writing files."""
    from sae_lens_allocation.training.multi_runner import PluginMultiSAETrainingRunner

    class ProbedMultiSAETrainingRunner(PluginMultiSAETrainingRunner):
        def _save_runner_checkpoint_files(self, checkpoint_path: Path | None) -> None:  # noqa: ARG002
            probe(self.saes)

    return ProbedMultiSAETrainingRunner(cfg, override_dataset=dataset, override_model=model)


class LanguageModelStudy:
    """Held-out data of a language-model comparison, and training and evaluation of its runs."""

    def __init__(self, cfg: dict[str, Any], out: Path, override_model: Any, override_dataset: Any,
                 override_heldout: Any) -> None:
        from sae_lens_allocation.training.sources import (
            EMBEDDED,
            embedded_tokens,
            runner_dataset,
            runner_sources,
        )

        self.cfg, self.out, ev = cfg, out, cfg["eval"]
        first = run_config(cfg, make_run(cfg, cfg["architectures"][0], cfg["seeds"][0], None, None), out)
        model, dataset = runner_sources(first, override_model, override_dataset)
        if model is None:
            from sae_lens_allocation.training.sources import load_lm

            model = load_lm(first.model_name, device=first.device, model_class_name=first.model_class_name,
                            model_from_pretrained_kwargs=first.model_from_pretrained_kwargs)
        heldout = override_heldout
        n_rows = ev["heldout_rows"]
        if heldout is None and first.model_name == EMBEDDED:
            heldout = embedded_tokens(model, "heldout", first.context_size,
                                      None if n_rows is None else n_rows * first.context_size)
        if heldout is None and ev["heldout_dataset_path"]:
            if n_rows is None:
                raise ConfigError("eval.heldout_rows=None is not allowed with eval.heldout_dataset_path; "
                                  "give the number of held-out rows to stream")
            heldout = hub_heldout_rows(ev["heldout_dataset_path"], ev["heldout_split"], ev["heldout_skip_rows"],
                                       n_rows, first.context_size)
        if heldout is None:
            raise ConfigError("source language_model with a hub model needs held-out rows: pass a "
                              "pretokenized dataset (eval.heldout_dataset_path, or run_compare(..., "
                              "override_heldout=...)) or use model_name: embedded")
        column = "tokens" if "tokens" in heldout.column_names else "input_ids"
        n_rows = len(heldout) if n_rows is None else min(n_rows, len(heldout))
        self.tokens = torch.tensor(heldout[:n_rows][column]).to(first.device)
        self.model, self.dataset, self.first = model, dataset, first
        self.hook = first.hook_name
        self.special = special_token_ids(model)
        self.acts = rm.lm_row_activations(model, self.tokens, self.hook, ev["batch_rows"])
        self.keep = keep_mask(self.tokens, self.special)
        self.ce_tokens = self.tokens[: ev["ce_rows"]]
        self.reference = rm.lm_reference_sums(model, self.ce_tokens, self.hook, self.special, ev["batch_rows"])
        x = self.acts[self.keep]
        # Training batches are shuffled mixtures of many prompts; so are the held-out batches of
        # the gap and of the convergence probes.
        self.x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0)).to(x.device)]
        self.alpha = ev["steering_scale"] * float(x.norm(dim=-1).mean())
        self.data = {"heldout_tokens_sha256": _sha256(self.tokens), "heldout_rows": n_rows,
                     "heldout_tokens": int(self.keep.sum()), "ce_rows": int(self.ce_tokens.shape[0]),
                     "model": first.model_name, "hook_name": self.hook, "steering_alpha": self.alpha}
        # The embedded corpus: each seed's runner builds that seed's rows (module docstring).
        self.embedded_rows = override_dataset is None and first.dataset_path == EMBEDDED
        self.seed_rows = {seed: dataset if seed == first.seed or not self.embedded_rows
                          else runner_dataset(run_config(cfg, make_run(cfg, cfg["architectures"][0], seed, None, None),
                                                         out), model)
                          for seed in cfg["seeds"]}
        # Density rows skip the largest calibration pool any arm draws from.
        self.calibration_tokens = max(getattr(run_config(cfg, make_run(cfg, e, first.seed, None, None), out).sae,
                                              "calibration_tokens", 0) for e in cfg["architectures"])
        if dataset is not None:
            dcol = "tokens" if "tokens" in dataset.column_names else "input_ids"
            self.data["train_dataset_sha256"] = {seed: _sha256(torch.tensor(rows[:][dcol]))
                                                 for seed, rows in self.seed_rows.items()}
            self.data["train_dataset_rows"] = {seed: len(rows) for seed, rows in self.seed_rows.items()}
        self.data["density"] = {}
        self._density: tuple[tuple[int, Any], dict[str, torch.Tensor] | None] | None = None

    def density_rows(self, run: dict[str, Any]) -> dict[str, torch.Tensor] | None:
        """Activations and kept positions of the rows that extend the held-out tokens to
        `eval.density_samples` for the dead share of `run` (module docstring); None where the
        source has none or the held-out tokens suffice. A length-check run reads more files, so
        its rows skip those too. The rows of one (seed, length) are kept at a time."""
        from sae_lens_allocation.embedded.splits import embedded_density_tokens
        from sae_lens_allocation.training.sources import runner_dataset

        seed, key = run["seed"], (run["seed"], run["length"])
        if self._density is not None and self._density[0] == key:
            return self._density[1]
        extra = self.cfg["eval"]["density_samples"] - self.data["heldout_tokens"]
        found = None
        if self.embedded_rows and extra > 0:
            training = self.seed_rows[seed] if run["length"] is None \
                else runner_dataset(run_config(self.cfg, run, self.out), self.model)
            found = embedded_density_tokens(self.model, training, self.first.context_size, seed,
                                            self.calibration_tokens, extra)
        rows = None
        if found is not None:
            tokens, info = found
            tokens = tokens.to(self.tokens.device)
            rows = {"acts": rm.lm_row_activations(self.model, tokens, self.hook, self.cfg["eval"]["batch_rows"]),
                    "keep": keep_mask(tokens, self.special)}
            where = "density" if run["length"] is None else "length_check_density"
            self.data.setdefault(where, {})[seed] = {**info, "heldout_tokens": self.data["heldout_tokens"],
                                                     "tokens_sha256": _sha256(tokens)}
        self._density = (key, rows)
        return rows

    def train(self, runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Train `runs` (same seed and lr) in one multi-SAE run when allowed, else one by one."""
        configs = [run_config(self.cfg, run, self.out) for run in runs]
        if self.cfg["lockstep"] and lockstep_allowed(configs):
            groups = [(runs, configs)]
        else:
            groups = [([run], [c]) for run, c in zip(runs, configs)]
        out = {}
        for group_runs, group_configs in groups:
            out.update(self._train_group(group_runs, group_configs))
        return out

    def _train_group(self, runs: list[dict[str, Any]], configs: list[Any]) -> dict[str, dict[str, Any]]:
        n_points = self.cfg["eval"]["convergence_points"]
        probe_x = self.x[: self.cfg["eval"]["probe_rows"]]
        archs = {_slug(r): r["architecture"] for r in runs}
        points: dict[str, list[dict[str, float]]] = {s: [] for s in archs}
        batch = configs[0].train_batch_size_tokens

        def probe(saes: dict[str, Any]) -> None:
            for name, sae in saes.items():
                points[name].append(training_rule_stats(sae, probe_x, batch, archs[name]))

        print(f"[compare] training {', '.join(r['label'] for r in runs)} "
              f"({configs[0].training_tokens:,} tokens, one LM pass per batch)", flush=True)
        runner = _probed_multi_runner(lockstep_config(configs, runs, self.out, n_points),
                                      None if self.embedded_rows else self.dataset, self.model, probe)
        start = time.perf_counter()
        saes = runner.run()
        seconds = time.perf_counter() - start
        trained = {}
        for run, c in zip(runs, configs):
            name = _slug(run)
            points[name].append(training_rule_stats(saes[name], probe_x, batch, run["architecture"]))
            trained[run["label"]] = trained_run(saes[name], seconds, c.training_tokens, len(runs),
                                                Path(self.out / "saes" / name), batch, points[name], n_points)
        return trained

    def evaluate(self, run: dict[str, Any], trained: dict[str, Any]) -> dict[str, Any]:
        from sae_lens_allocation.analysis.steering import pick_latents, steering_effects

        ev = self.cfg["eval"]
        export, reconstruct = load_export(trained["sae_dir"], self.first.device)
        acts = rm.activation_sums(reconstruct, self.acts, self.keep, ev["batch_rows"])
        lm = rm.lm_sae_sums(self.model, self.ce_tokens, self.hook, reconstruct, self.special, ev["batch_rows"])
        rows = {"export": {**acts["rows"], **self.reference, **lm}}
        if run["architecture"] == "gradient_topk":
            sae = trained["sae"]
            sae.eval()
            rows["gradient_selection"] = {**self.reference, **rm.lm_sae_sums(
                self.model, self.ce_tokens, self.hook, rm.gradient_reconstruct(sae), self.special, ev["batch_rows"],
                with_gradients=True)}
        fired, n_tokens = acts["fired"], float(self.keep.sum())
        extra = self.density_rows(run)
        if extra is not None:
            more = rm.activation_sums(reconstruct, extra["acts"], extra["keep"], ev["batch_rows"])
            fired, n_tokens = fired + more["fired"], n_tokens + float(extra["keep"].sum())
        shares = underused_share(fired, n_tokens, ev["underused_tau"], ev["fit_fraction"])
        latents = pick_latents(acts["fired"], ev["steering_latents"], run["seed"])
        steer = steering_effects(self.model, self.tokens[: ev["steering_contexts"]], self.hook, export.W_dec.detach(),
                                 latents, self.alpha, self.special)
        return {
            "rows": rows, "steering_values": steer, "l0_tokens": acts["l0_tokens"],
            "density": rm.density_stats(fired, n_tokens),
            "underused_share": shares["underused_share"], "gap": _gap(run, trained, export, self.x),
            "export_architecture": export.cfg.architecture(), "d_sae": export.cfg.d_sae,
        }


# ---------------------------------------------------------------------------------------------
# Synthetic source
# ---------------------------------------------------------------------------------------------


def synthetic_batches(model: Any, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Batch i drawn under its own seed `seed * 1_000_003 + i`: the stream does not depend on
    how many random numbers the SAE draws in between."""
    i = 0
    while True:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1_000_003 + i)
            x = model.feature_dict(model.activation_generator(batch_size))
        yield x
        i += 1


class SyntheticStudy:
    """Held-out samples of a synthetic comparison, and training and evaluation of its runs."""

    def __init__(self, cfg: dict[str, Any], out: Path) -> None:
        from sae_lens.synthetic import SyntheticModel

        self.cfg, self.out, ev = cfg, out, cfg["eval"]
        self.first = run_config(cfg, make_run(cfg, cfg["architectures"][0], cfg["seeds"][0], None, None), out)
        self.model = SyntheticModel(self.first.synthetic_model)
        # Streams are seeded s * 1_000_003 + i (training: s, calibration: s + 1); this seed is
        # above every s + 1, so no run trains or calibrates on these samples.
        self.heldout_seed = max(cfg["seeds"]) + 7919
        bs = self.first.batch_size
        self.x = self._samples(self.heldout_seed, ev["samples"])
        self.x_density = self._samples(self.heldout_seed + 1, ev["density_samples"])
        self.data = {"heldout_sha256": _sha256(self.x), "heldout_samples": int(self.x.shape[0]),
                     "density_samples": int(self.x_density.shape[0]),
                     "train_first_batch_sha256": {s: _sha256(next(synthetic_batches(self.model, bs, s)))
                                                  for s in cfg["seeds"]},
                     "true_l0": float(self.model.activation_generator.firing_probabilities.sum()),
                     "synthetic_model": {"num_features": self.model.cfg.num_features,
                                         "hidden_dim": self.model.cfg.hidden_dim}}

    @staticmethod
    def _blocks(x: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples as rows of `size` samples (the last partial block dropped), all kept."""
        n = (x.shape[0] // size) * size
        blocks = x[:n].reshape(-1, size, x.shape[-1])
        return blocks, torch.ones(blocks.shape[:2], dtype=torch.bool)

    def _samples(self, seed: int, n: int) -> torch.Tensor:
        bs = self.first.batch_size
        return torch.cat([b for b, _ in zip(synthetic_batches(self.model, bs, seed), range(math.ceil(n / bs)))])[:n]

    def train(self, runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        import dataclasses

        from safetensors.torch import save_file
        from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY
        from sae_lens.training.sae_trainer import SAETrainer

        n_points = self.cfg["eval"]["convergence_points"]
        probe_x = self.x[: self.cfg["eval"]["probe_rows"]]
        trained = {}
        for run in runs:
            rcfg = run_config(self.cfg, run, self.out)
            rcfg.sae.d_in = self.model.cfg.hidden_dim
            print(f"[compare] training {run['label']} ({rcfg.training_samples:,} samples)", flush=True)
            torch.manual_seed(run["seed"])
            sae = SAE_TRAINING_CLASS_REGISTRY[run["architecture"]][0](rcfg.sae)
            if hasattr(sae, "set_calibration_source"):
                sae.set_calibration_source(synthetic_batches(self.model, rcfg.batch_size, run["seed"] + 1))
            points: list[dict[str, float]] = []

            def probe(checkpoint_path: Path | None, sae: Any = sae, arch: str = run["architecture"],
                      bs: int = rcfg.batch_size) -> None:  # noqa: ARG001
                points.append(training_rule_stats(sae, probe_x, bs, arch))

            tcfg = dataclasses.replace(rcfg.to_sae_trainer_config(), n_checkpoints=n_points - 1, checkpoint_path=None)
            trainer = SAETrainer(cfg=tcfg, sae=sae, save_checkpoint_fn=probe,
                                 data_provider=synthetic_batches(self.model, rcfg.batch_size, run["seed"]))
            start = time.perf_counter()
            training_sae = trainer.fit()
            seconds = time.perf_counter() - start
            points.append(training_rule_stats(training_sae, probe_x, rcfg.batch_size, run["architecture"]))
            sae_dir = Path(rcfg.output_path)
            sae_dir.mkdir(parents=True, exist_ok=True)
            training_sae.save_inference_model(str(sae_dir))
            save_file({"sparsity": trainer.log_feature_sparsity}, str(sae_dir / "sparsity.safetensors"))
            trained[run["label"]] = trained_run(training_sae, seconds, rcfg.training_samples, 1, sae_dir,
                                                rcfg.batch_size, points, n_points)
        return trained

    def evaluate(self, run: dict[str, Any], trained: dict[str, Any]) -> dict[str, Any]:
        from sae_lens.synthetic import eval_sae_on_synthetic_data

        ev = self.cfg["eval"]
        export, reconstruct = load_export(trained["sae_dir"], self.first.device)
        sums = rm.activation_sums(reconstruct, *self._blocks(self.x, ev["block_samples"]), 64)
        density = rm.activation_sums(reconstruct, *self._blocks(self.x_density, 4096), 16)
        n_density = float(density["rows"]["n"].sum())
        shares = underused_share(density["fired"], n_density, ev["underused_tau"], ev["fit_fraction"])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.heldout_seed)
            synth = eval_sae_on_synthetic_data(export, self.model.feature_dict, self.model.activation_generator,
                                               num_samples=ev["samples"], batch_size=self.first.batch_size)
        return {
            "rows": {"export": sums["rows"]}, "l0_tokens": sums["l0_tokens"],
            "density": rm.density_stats(density["fired"], n_density),
            "underused_share": shares["underused_share"], "gap": _gap(run, trained, export, self.x),
            "export_architecture": export.cfg.architecture(), "d_sae": export.cfg.d_sae,
            "scalars": {"mcc": synth.mcc, "f1": synth.classification.f1_score,
                        "precision": synth.classification.precision, "recall": synth.classification.recall},
        }


# ---------------------------------------------------------------------------------------------
# Protocol: lr sweep, seeds, k sweep; summary with intervals and verdicts
# ---------------------------------------------------------------------------------------------

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

    metrics = _scalar_metrics(evaluated["rows"])
    metrics.update(dead_share=evaluated["density"]["dead_share"], underused_share=evaluated["underused_share"],
                   **evaluated.get("scalars", {}))
    if run["k"]:
        metrics["l0_relative_error"] = metrics["l0"] / run["k"] - 1
    if "steering_values" in evaluated:
        metrics["steering"] = float(evaluated["steering_values"].mean()) if evaluated["steering_values"].numel() else None
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
            diffs = [contrast(cfg, [records[arm]], [records[against]], m["metric"], m["better"], m["noise"],
                              kind, protocol)
                     for arm, against in ((main[c["arm"]][0], main[c["against"]][0]),
                                          (longer[c["arm"]], longer[c["against"]]))]
            if None not in diffs:
                rows.append({"metric": m["metric"], **st.shifted_verdict(m, diffs[0]["diff"], diffs[1]["diff"])})
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

    from sae_lens_allocation.analysis.compare_report import write_plots, write_report

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


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def add_compare_arguments(parser: Any) -> None:
    parser.add_argument("config", help="compare config YAML (see configs/compare-*.yaml)")
    parser.add_argument("--out", default=None, help="output folder (default: the config's output_dir)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a compare config field, e.g. --set base.training_tokens=20000 "
                             "--set seeds=[1,2]")


def run_compare_command(args: Any) -> int:
    from sae_lens_allocation.analysis.compare_report import verdict_table

    cfg = apply_overrides(read_yaml(args.config), args.set)
    result = run_compare(cfg, output_dir=args.out, config_path=str(args.config))
    out = Path(args.out or result["config"]["output_dir"]).resolve()
    print(verdict_table(result))
    print(f"report: {out / 'report.md'}\nresults: {out / 'results.json'}")
    return 0
