"""The compare config: its keys, their checks and defaults, and the runs and runner configs an arm
expands to."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Any

from sae_lens_allocation.analysis.compare.frontier import MATCHED_SUFFIX
from sae_lens_allocation.analysis.compare.settings import SETTING_METRICS, check_settings, setting_config
from sae_lens_allocation.validation import one_line, reject_unknown_keys
from sae_lens_allocation.yaml_config import ConfigError

SOURCES = ("language_model", "synthetic")
_TOP_KEYS = {"source", "output_dir", "seeds", "threads", "base", "architectures", "baseline",
             "contrasts", "lr_values", "k_values", "eval", "lockstep", "length_check", "margin_seeds",
             "primary_metric", "frontier_k", "hierarchies", "settings", "selection_seeds"}
_LM = ("language_model",)
# The metrics a contrast can claim: (metric of the arm, metric of the control it is paired with,
# better: +1 higher is better, -1 lower, sources). Gradient selection at evaluation is paired
# with the control's plain export. Diagnostics without a claim: the underused share (it scores
# the Zipf prior that aux_zipf and Zipf capacities impose) and steering (reported with a
# random-direction baseline and a dose-response, but a larger effect need not mean a better
# latent: a direction off the data manifold also moves the output).
CLAIM_METRICS: tuple[tuple[str, str, int, tuple[str, ...]], ...] = (
    ("explained_variance", "explained_variance", 1, SOURCES),
    ("ce_with_sae", "ce_with_sae", -1, _LM),
    ("ce_with_sae_gradient_selection", "ce_with_sae", -1, _LM),
    ("ce_recovered", "ce_recovered", 1, _LM),
    ("kl", "kl", -1, _LM),
    ("dead_share", "dead_share", -1, SOURCES),
    ("dead_share_below_1e-06", "dead_share_below_1e-06", -1, SOURCES),
    ("dead_share_below_1e-05", "dead_share_below_1e-05", -1, SOURCES),
    ("sparse_probe_accuracy", "sparse_probe_accuracy", 1, _LM),
    ("mcc", "mcc", 1, ("synthetic",)),
    ("f1", "f1", 1, ("synthetic",)),
)


def claim_metrics(cfg: dict[str, Any]) -> list[tuple[str, str, int]]:
    """(metric, control metric, better) of every claim of a comparison: CLAIM_METRICS of its source,
    then the absorption on each of its hierarchies (`absorption_<name>`, lower is better), then
    settings.SETTING_METRICS on each of its settings (`<metric>@<name>`)."""
    out = [(m, base, better) for m, base, better, sources in CLAIM_METRICS if cfg["source"] in sources]
    out += [(f"absorption_{h['name']}",) * 2 + (-1,) for h in cfg.get("hierarchies") or []]
    return out + [(f"{m}@{s['name']}",) * 2 + (better,) for s in cfg.get("settings") or []
                  for m, better in SETTING_METRICS]


# Metrics also claimed at matched sparsity (frontier.py), with their direction.
MATCHED_METRICS = (("explained_variance", 1), ("ce_with_sae", -1), ("ce_recovered", 1), ("kl", -1), ("mcc", 1))
_ARCH_KEYS = {"name", "architecture", "sae", "runner"}
_EVAL_DEFAULTS: dict[str, Any] = {
    "heldout_rows": None,          # language model: held-out rows (null: the whole embedded held-out split)
    "batch_rows": 8,               # language model: held-out rows per forward pass
    "ce_rows": 256,                # language model: the first held-out rows used for CE and KL
    "samples": 65536,              # synthetic: held-out samples for EV, L0, MCC
    "block_samples": 256,          # synthetic: samples per row of held-out sums
    "density_samples": 1_048_576,  # samples (tokens) for the dead share and density histogram
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
    "sparse_probe_tokens": 16384,  # language model: tokens of each split (train, test) of the top-5
                                   # latent probes (analysis/probing.py); 0: no sparse probing
    "absorption_samples": 16384,   # synthetic: samples per run and hierarchy for absorption
    "selection_rows": 0,           # the first held-out rows (synthetic: blocks) that choose the lr and
                                   # no row metric reports (synthetic MCC and F1 still read every
                                   # held-out sample); 0: the lr is chosen on the reported rows
}
_EVAL_INT_MIN = {"batch_rows": 1, "ce_rows": 1, "samples": 1, "block_samples": 1, "density_samples": 1,
                 "steering_latents": 1, "steering_contexts": 1, "convergence_points": 2,
                 "probe_rows": 1, "heldout_skip_rows": 0, "selection_rows": 0, "sparse_probe_tokens": 0,
                 "absorption_samples": 1}
_LM_ONLY = ("gradient_topk",)


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


def _check_hierarchies(value: Any, source: str) -> list[dict[str, Any]]:
    """`hierarchies`: a list of {name, ...HierarchyConfig fields of sae_lens.synthetic}, each
    checked by building the HierarchyConfig."""
    from sae_lens.synthetic import HierarchyConfig

    if value is None:
        return []
    usage = ("use a list of {name: NAME, total_root_nodes: ..., branching_factor: ..., max_depth: ...} "
             "(sae_lens.synthetic HierarchyConfig fields) with distinct names")
    if source != "synthetic":
        raise ConfigError("hierarchies is not allowed with source: language_model; absorption is measured on "
                          "synthetic hierarchies")
    if not isinstance(value, list):
        raise ConfigError(f"hierarchies={value!r} is not allowed; {usage}")
    names = []
    for i, h in enumerate(value):
        h = _mapping(h, f"hierarchies[{i}]")
        name = h.get("name")
        if not isinstance(name, str) or not name or name in names or not name.replace("-", "_").isidentifier():
            raise ConfigError(f"hierarchies[{i}].name={name!r} is not allowed; {usage} (letters, digits, _ and -)")
        names.append(name)
        try:
            HierarchyConfig.from_dict({k: v for k, v in h.items() if k != "name"})
        except (TypeError, ValueError) as err:
            raise ConfigError(f"hierarchies[{i}] ({name}): {one_line(err)}") from None
    return value


def _check_eval(ev: dict[str, Any], source: str) -> dict[str, Any]:
    reject_unknown_keys(ev, _EVAL_DEFAULTS, "compare config", prefix="eval.", error=ConfigError)
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
    if source == "synthetic" and out["samples"] < out["block_samples"] * (2 + out["selection_rows"]):
        raise ConfigError(f"eval.samples={out['samples']} is not allowed: at least 2 blocks of "
                          f"eval.block_samples={out['block_samples']} besides eval.selection_rows="
                          f"{out['selection_rows']} blocks")
    if source == "language_model" and out["selection_rows"] >= out["ce_rows"]:
        raise ConfigError(f"eval.selection_rows={out['selection_rows']} is not allowed: it must leave some of "
                          f"the eval.ce_rows={out['ce_rows']} rows that CE and KL are reported on")
    return out


def check_compare_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Validate a compare config dict and fill defaults; raises `ConfigError`."""
    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

    import sae_lens_allocation  # noqa: F401  (registers the plugin architectures)
    from sae_lens_allocation.loading import unknown_architecture_message

    train_key = next((key for key in ("sae", "saes") if key in cfg), None)
    if train_key is not None and "architectures" not in cfg:
        raise ConfigError(f"this is a train config (it has '{train_key}:'), not a compare config: train it with "
                          "`sae-lens-allocation train CONFIG`; for a comparison start from `sae-lens-allocation "
                          "init compare-embedded`")
    if "seed" in cfg:
        raise ConfigError(f"seed={cfg['seed']!r} is not allowed: a comparison runs several seeds; "
                          "use seeds: [42, 43, 44]")
    reject_unknown_keys(cfg, _TOP_KEYS, "compare config", error=ConfigError)
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
        reject_unknown_keys(entry, _ARCH_KEYS, "compare config", prefix=f"architectures[{i}].", error=ConfigError)
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
    frontier_k = _number_list(cfg, "frontier_k")
    claimable = [m for m, _, _, sources in CLAIM_METRICS if source in sources]
    if frontier_k:
        main_k = arm_setting({"base": base}, next(e for e in entries if e["name"] == baseline), "k")
        if len({*frontier_k, main_k}) < 3:
            raise ConfigError(f"frontier_k={frontier_k!r} is not allowed: with the baseline's k ({main_k}) the "
                              "frontier needs at least 3 distinct k values")
        claimable += [m + MATCHED_SUFFIX for m, _ in MATCHED_METRICS if m in claimable]
    primary = cfg.get("primary_metric", "ce_with_sae" if source == "language_model" else "explained_variance")
    if primary not in claimable:
        raise ConfigError(f"primary_metric={primary!r} is not allowed; use one of {', '.join(claimable)}")
    contrasts = [{"arm": n, "against": baseline, "primary": primary} for n in names if n != baseline]
    raw = cfg.get("contrasts") or []
    if not isinstance(raw, list):
        raise ConfigError("contrasts must be a list of {arm, against, primary}")
    for i, c in enumerate(raw):
        c = _mapping(c, f"contrasts[{i}]")
        if (not {"arm", "against"} <= set(c) <= {"arm", "against", "primary"} or c["arm"] not in names
                or c["against"] not in names or c["arm"] == c["against"]
                or c.get("primary", primary) not in claimable):
            raise ConfigError(f"contrasts[{i}]={c!r} is not allowed; use {{arm: NAME, against: OTHER_NAME, "
                              f"primary: METRIC}} with two different arms of: {', '.join(names)} and a "
                              f"metric of: {', '.join(claimable)} (primary optional)")
        contrasts = [x for x in contrasts if (x["arm"], x["against"]) != (c["arm"], c["against"])]
        contrasts.append({"arm": c["arm"], "against": c["against"], "primary": c.get("primary", primary)})
    margin_seeds = cfg.get("margin_seeds")
    if margin_seeds is not None and (
            not isinstance(margin_seeds, list) or len(margin_seeds) < 2 or len(set(margin_seeds)) != len(margin_seeds)
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in margin_seeds)
            or set(margin_seeds) & set(seeds)):
        raise ConfigError(f"margin_seeds={margin_seeds!r} is not allowed; use null or a list of at least 2 "
                          "distinct integers >= 0 that are not in seeds (the margins need control seeds that "
                          "take no part in the contrasts)")
    selection_seeds = cfg.get("selection_seeds", min(2, len(seeds)))
    if (isinstance(selection_seeds, bool) or not isinstance(selection_seeds, int)
            or not 1 <= selection_seeds <= len(seeds)):
        raise ConfigError(f"selection_seeds={selection_seeds!r} is not allowed; use an integer from 1 to the "
                          f"number of seeds ({len(seeds)}): the lr is chosen on that many of the first seeds")
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
        "k_values": k_values, "length_check": length, "eval": ev, "margin_seeds": margin_seeds,
        "primary_metric": primary, "frontier_k": frontier_k, "selection_seeds": selection_seeds,
        "hierarchies": _check_hierarchies(cfg.get("hierarchies"), source),
        "settings": check_settings(cfg.get("settings"), source, base),
        "output_dir": str(cfg.get("output_dir") or "runs/compare"),
    }
    for entry in entries:
        for lr in lr_values or (None,):
            for k in k_values or (None,):
                run_config(out, make_run(out, entry, seeds[0], lr, k), Path(out["output_dir"]))
        if length:
            run_config(out, make_run(out, entry, seeds[0], None, None, length), Path(out["output_dir"]))
        for setting in out["settings"]:
            try:
                sub = setting_config(out, setting)
                run_config(sub, make_run(sub, entry, seeds[0], None, None), Path(out["output_dir"]))
            except ConfigError as err:
                raise ConfigError(f"settings ({setting['name']}): {err}") from None
    return out


def arm_setting(cfg: dict[str, Any], entry: dict[str, Any], key: str) -> Any:
    """The arm's lr (runner) or k (sae) before any sweep."""
    if key == "k":
        return _merge(_mapping(cfg["base"].get("sae"), "base.sae"), entry["sae"]).get("k")
    return _merge(cfg["base"], entry["runner"]).get("lr")


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of an arm: the arm's sae and runner overrides with its k and lr (and the
    length check's training size), its seed, and its label (the key of its record)."""

    arm: str
    architecture: str
    sae: dict[str, Any]
    runner: dict[str, Any]
    seed: int
    lr: float | None
    k: float | None
    length: float | None
    label: str


def make_run(cfg: dict[str, Any], entry: dict[str, Any], seed: int, lr: float | None,
             k: float | None, length: float | None = None) -> Run:
    """One training run of an arm: its seed, lr and k (None: the arm's own); `length` (the
    length check) multiplies its training tokens (samples) and `lr_decay_steps`, so the lr
    schedule keeps its shape; the warm-up stays as it is."""
    lr = arm_setting(cfg, entry, "lr") if lr is None else lr
    k = arm_setting(cfg, entry, "k") if k is None else k
    name = entry["name"]
    run = Run(arm=name, architecture=entry["architecture"], sae={**entry["sae"], **({"k": k} if k is not None else {})},
              runner={**entry["runner"], **({"lr": lr} if lr is not None else {})}, seed=seed, lr=lr, k=k,
              length=length, label=f"{name}@lr={lr:g},k={k:g},seed={seed}" if lr and k else f"{name}@seed={seed}")
    if length is None:
        return run
    size = "training_tokens" if cfg["source"] == "language_model" else "training_samples"
    given = run_config(cfg, run, Path(cfg["output_dir"]))
    runner = {**run.runner, size: round(getattr(given, size) * length),
              "lr_decay_steps": round(given.lr_decay_steps * length)}
    return dataclasses.replace(run, runner=runner, label=run.label + f",x{length:g}")


def slug(run: Run) -> str:
    """The run's folder name under saes/: its label without /, @, ',' and =."""
    return run.label.replace("/", "_").replace("@", "_").replace(",", "_").replace("=", "")


def run_config(cfg: dict[str, Any], run: Run, out: Path) -> Any:
    """The runner config (language model) or SyntheticSAERunnerConfig of one run."""
    d = _merge(cfg["base"], run.runner)
    d["sae"] = {**_merge(_mapping(d.get("sae"), "base.sae"), run.sae), "architecture": run.architecture}
    d["seed"] = run.seed
    folder = str(out / "saes" / slug(run))
    if cfg["source"] == "language_model":
        from sae_lens_allocation.embedded import DEFAULT_HOOK_NAME
        from sae_lens_allocation.yaml_config import runner_config_from_dict

        if d.setdefault("model_name", "embedded") == "embedded":
            # The embedded model is the default source; its corpus is pretokenized.
            d.setdefault("dataset_path", "embedded")
            d.setdefault("hook_name", DEFAULT_HOOK_NAME)
            d.setdefault("is_dataset_tokenized", True)
            d.setdefault("streaming", False)
        d["output_path"] = folder
        d["checkpoint_path"] = None
        d.setdefault("n_checkpoints", 0)
        try:
            return runner_config_from_dict(d)
        except ConfigError as err:
            raise ConfigError(f"run {run.label}: {err}") from None
    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY
    from sae_lens.synthetic.synthetic_sae_runner import SyntheticSAERunnerConfig

    d.pop("seed")
    d.update(output_path=folder, checkpoint_path=None, run_final_eval=False)
    d.setdefault("logger", {"log_to_wandb": False})
    arch = run.architecture
    try:
        reject_unknown_keys(d, SyntheticSAERunnerConfig.__dataclass_fields__,
                            note="for the synthetic runner config", error=ConfigError)
        reject_unknown_keys(d["sae"], {*SAE_TRAINING_CLASS_REGISTRY[arch][1].__dataclass_fields__, "architecture"},
                            prefix="sae.", note=f"(architecture {arch})", error=ConfigError)
        return SyntheticSAERunnerConfig.from_dict(d)
    except ConfigError as err:
        raise ConfigError(f"run {run.label}: {err}") from None
    except KeyError as err:
        raise ConfigError(f"run {run.label}: missing synthetic config field {err} (e.g. "
                          "synthetic_model.firing_probability with generator_name: zipfian)") from None
    except (ValueError, TypeError) as err:
        raise ConfigError(f"run {run.label}: {one_line(err)}") from None
