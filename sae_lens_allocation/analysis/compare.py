"""`sae-lens-allocation compare CONFIG.yaml`: several architectures trained on the same data,
evaluated on the same held-out data, reported side by side (report.md, results.json, PNG plots).

Config (YAML mapping; every key checked, errors are one-line `ConfigError`s):

    source: language_model | synthetic
    output_dir: runs/compare          # report.md, results.json, plots, one SAE folder per run
    seed: 42                          # the same for every run
    threads: 2                        # torch.set_num_threads
    base: {...}                       # language_model: a SAELens runner config without
                                      # sae.architecture (model_name defaults to the embedded
                                      # model and its corpus); synthetic: SyntheticSAERunnerConfig
                                      # fields (synthetic_model, training_samples, batch_size, ...)
    architectures:                    # any registered training architecture, with overrides
      - {name: mc-aux_zipf, architecture: mutual_choice, sae: {aux_loss: aux_zipf}, runner: {}}
    k_values: [8, 16, 32]             # optional sweep of sae.k (explained variance vs L0 plot)
    eval: {n_batches: 8, batch_size_prompts: 8, samples: 65536}
    lockstep: true                    # language_model: train the arms in one multi-SAE run
                                      # when their runner settings agree (see below)
                                      # hub models: heldout_dataset_path, heldout_split and
                                      # heldout_skip_rows (rows past those used in training)

Same data: the training dataset (language model) or the synthetic sample stream is built once;
every run starts from `torch.manual_seed(seed)` and reads the same rows in the same order.
Language model, `lockstep: true` (default): when the arms' runner configs agree on everything
but the SAE section, they train in lockstep in one SAELens multi-SAE run
(training/multi_runner.py): one LM pass per batch feeds every arm the very same shuffled
batches, so identical data holds by construction; tok/s is then that run's, shared by the arms.
Otherwise each arm runs alone, as below.
SAELens' mixing buffer shuffles with the global torch RNG, so the in-buffer order is identical
between runs up to the first refill and afterwards for architectures that draw no random numbers
while training (Feature Choice's randomised rounding does). The synthetic stream draws batch i
from its own seed `seed * 1_000_003 + i`, so it is identical for every architecture.

Metrics (project definitions; algorithms.md "Metrics the comparisons report"), all on held-out
data with the exported SAE unless said otherwise:
  explained variance  1 - sum||x - x_hat||^2 / sum||x - mean(x)||^2 (SAELens run_evals for LMs)
  normalised MSE      sum||x - x_hat||^2 / sum||x||^2
  CE loss recovered, KL score: SAELens run_evals (language model only)
  per-token L0        mean, std, 5th and 95th percentile
  dead share          latents that never fire on the held-out tokens
  underused share     p_j < tau * p_hat_j under the Zipf fit of losses.fit_zipf (dead included)
  training-window dead share: log10 density <= -9 in SAELens' sparsity.safetensors
  exported-vs-training gap: EV and mean L0 of the export minus those of the training SAE (batch
                      rule, train mode, batches of the training batch size) on the same held-out
                      rows, shuffled like the training stream
  MCC, mean per-latent F1 (synthetic only): sae_lens.synthetic.eval_sae_on_synthetic_data
  training tokens/s   training tokens (samples) / wall time of the training call
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import platform
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from sae_lens_allocation.yaml_config import ConfigError, apply_overrides, read_yaml

SOURCES = ("language_model", "synthetic")
_TOP_KEYS = {"source", "output_dir", "seed", "threads", "base", "architectures", "k_values", "eval",
             "lockstep"}
_ARCH_KEYS = {"name", "architecture", "sae", "runner"}
_EVAL_KEYS = {"n_batches", "batch_size_prompts", "samples", "underused_tau", "fit_fraction",
              "heldout_dataset_path", "heldout_split", "heldout_skip_rows"}
_EVAL_DEFAULTS = {"n_batches": 8, "batch_size_prompts": 8, "samples": 65536,
                  "underused_tau": 0.5, "fit_fraction": 0.5, "heldout_dataset_path": None,
                  "heldout_split": "train", "heldout_skip_rows": 0}
# Exports whose inference rule differs from the training rule (batch allocation -> thresholds).
_GAP_ARCHITECTURES = ("mutual_choice", "feature_choice", "batchtopk")
_LM_ONLY = ("gradient_topk",)


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


def check_compare_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Validate a compare config dict and fill defaults; raises `ConfigError`."""
    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

    import sae_lens_allocation  # noqa: F401  (registers the plugin architectures)
    from sae_lens_allocation.loading import unknown_architecture_message

    unknown = sorted(set(cfg) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"unknown compare config key {unknown[0]}; allowed: {', '.join(sorted(_TOP_KEYS))}")
    source = cfg.get("source", "language_model")
    if source not in SOURCES:
        raise ConfigError(f"source={source!r} is not allowed; use one of {', '.join(SOURCES)}")
    seed = cfg.get("seed", 42)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed={seed!r} is not allowed; use an integer")
    threads = cfg.get("threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads={threads!r} is not allowed; use null or an integer >= 1")
    base = _mapping(cfg.get("base"), "base")
    if "architecture" in _mapping(base.get("sae"), "base.sae"):
        raise ConfigError("base.sae.architecture is not allowed: name architectures in 'architectures'")
    archs = cfg.get("architectures")
    if not isinstance(archs, list) or not archs:
        raise ConfigError("'architectures' must be a non-empty list of {name, architecture, sae, runner}")
    k_values = cfg.get("k_values")
    if k_values is not None and (
        not isinstance(k_values, list) or not k_values
        or not all(isinstance(k, (int, float)) and not isinstance(k, bool) and k > 0 for k in k_values)
    ):
        raise ConfigError(f"k_values={k_values!r} is not allowed; use null or a list of numbers > 0")
    ev = _mapping(cfg.get("eval"), "eval")
    unknown = sorted(set(ev) - _EVAL_KEYS)
    if unknown:
        raise ConfigError(f"unknown eval key eval.{unknown[0]}; allowed: {', '.join(sorted(_EVAL_KEYS))}")
    entries = []
    names: set[str] = set()
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
        names.add(name)
        entries.append({"name": name, "architecture": arch,
                        "sae": _mapping(entry.get("sae"), f"architectures[{i}].sae"),
                        "runner": _mapping(entry.get("runner"), f"architectures[{i}].runner")})
    lockstep = cfg.get("lockstep", True)
    if not isinstance(lockstep, bool):
        raise ConfigError(f"lockstep={lockstep!r} is not allowed; use true or false")
    out = {
        "source": source, "seed": seed, "threads": threads, "base": base, "architectures": entries,
        "lockstep": lockstep,
        "k_values": k_values, "eval": {**_EVAL_DEFAULTS, **ev},
        "output_dir": str(cfg.get("output_dir") or "runs/compare"),
    }
    runs = expand_runs(out)
    for run in runs:  # every run's config must build before anything trains
        run_config(out, run, Path(out["output_dir"]))
    return out


def expand_runs(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """One run per architecture entry, times `k_values` when given (name gains `@k=..`)."""
    runs = []
    for entry in cfg["architectures"]:
        if cfg["k_values"]:
            for k in cfg["k_values"]:
                run = copy.deepcopy(entry)
                run["sae"] = {**run["sae"], "k": k}
                run["label"], run["family"] = f"{entry['name']}@k={k:g}", entry["name"]
                runs.append(run)
        else:
            runs.append({**copy.deepcopy(entry), "label": entry["name"], "family": entry["name"]})
    return runs


def run_config(cfg: dict[str, Any], run: dict[str, Any], out: Path) -> Any:
    """The runner config (language model) or SyntheticSAERunnerConfig of one run."""
    d = _merge(cfg["base"], run["runner"])
    d["sae"] = {**_merge(_mapping(d.get("sae"), "base.sae"), run["sae"]), "architecture": run["architecture"]}
    d["seed"] = cfg["seed"]
    slug = run["label"].replace("/", "_")
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
        d["checkpoint_path"] = str(out / "checkpoints" / slug)
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


@torch.no_grad()
def heldout_stats(export: Any, training_sae: Any, x: torch.Tensor, batch_tokens: int,
                  tau: float, fit_fraction: float) -> dict[str, Any]:
    """Export-side firing, dead/underused shares, NMSE, EV, per-token L0 on rows `x` [N, d_in];
    with `training_sae` also its train-mode EV and mean L0 (batch rule over `batch_tokens` rows)."""
    from sae_lens_allocation.analysis.evaluation import l0_distribution
    from sae_lens_allocation.training.losses import expected_frequency, fit_zipf, frequency_ranks

    export.eval()
    counts = torch.zeros(export.cfg.d_sae)
    sq_err, l0s = 0.0, []
    train_err, train_l0 = 0.0, 0.0
    if training_sae is not None:
        torch.nn.Module.train(training_sae, True)
    for chunk in x.split(batch_tokens):
        codes = export.encode(chunk)
        sq_err += float((export.decode(codes) - chunk).pow(2).sum())
        fired = codes != 0
        counts += fired.sum(0).float().cpu()
        l0s.append(fired.sum(-1).cpu())
        if training_sae is not None and chunk.shape[0] == batch_tokens:
            acts, _ = training_sae.encode_with_hidden_pre(chunk)
            train_err += float((training_sae.decode(acts) - chunk).pow(2).sum())
            train_l0 += float((acts != 0).sum())
    total_var = float((x - x.mean(0)).pow(2).sum())
    p = counts / x.shape[0]
    log_c, s, n_points = fit_zipf(p, fit_fraction).tolist()
    p_hat = expected_frequency(frequency_ranks(p), torch.tensor(log_c), torch.tensor(s))
    dead = p == 0
    underused = dead | ((p < tau * p_hat) if n_points > 0 else dead)
    ev = 1.0 - sq_err / total_var
    out: dict[str, Any] = {
        "explained_variance": ev,
        "nmse": sq_err / float(x.pow(2).sum()),
        "l0_per_token": l0_distribution(torch.cat(l0s)),
        "dead_share": float(dead.float().mean()),
        "underused_share": float(underused.float().mean()),
        "zipf_log_c": log_c, "zipf_s": s,
        "density": sorted(p.tolist(), reverse=True),
        "heldout_rows": int(x.shape[0]),
    }
    n_full = (x.shape[0] // batch_tokens) * batch_tokens
    if training_sae is not None and n_full:
        x_full = x[:n_full]
        var_full = float((x_full - x_full.mean(0)).pow(2).sum())
        ev_train, l0_train = 1.0 - train_err / var_full, train_l0 / n_full
        out["gap"] = {"training_explained_variance": ev_train, "training_l0": l0_train,
                      "export_minus_training_ev": ev - ev_train,
                      "export_minus_training_l0": out["l0_per_token"]["mean"] - l0_train}
    return out


def sparsity_dead_share(sae_dir: Path) -> float | None:
    """Share of latents with log10 firing density <= -9 in SAELens' sparsity.safetensors (the
    last feature_sampling_window of training; SAELens stores log10(p + 1e-10))."""
    path = sae_dir / "sparsity.safetensors"
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    log_p = load_file(str(path))["sparsity"]
    return float((log_p <= -9).float().mean())


# ---------------------------------------------------------------------------------------------
# Language-model source
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def lm_activations(model: Any, dataset: Any, hook: str, n_rows: int, batch_prompts: int) -> torch.Tensor:
    """Activations at `hook` of the first `n_rows` rows of a pretokenized dataset, special
    tokens (BOS/EOS/PAD) removed, as [tokens, d_in]."""
    column = "tokens" if "tokens" in dataset.column_names else "input_ids"
    tokens = torch.tensor(dataset[:n_rows][column])
    tok = model.tokenizer
    special = {t for t in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) if t is not None}
    layer = int(hook.split(".")[1]) + 1 if hook.startswith("blocks.") else None
    rows = []
    for batch in tokens.split(batch_prompts):
        _, cache = model.run_with_cache(batch, names_filter=hook, stop_at_layer=layer)
        keep = torch.ones_like(batch, dtype=torch.bool)
        for t in special:
            keep &= batch != t
        rows.append(cache[hook][keep].float().cpu())
    return torch.cat(rows)


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


def _run_language_model(cfg: dict[str, Any], runs: list[dict[str, Any]], out: Path,
                        override_model: Any, override_dataset: Any, override_heldout: Any) -> dict[str, Any]:
    from sae_lens_allocation.analysis.evaluation import evaluate_sae
    from sae_lens_allocation.loading import load_sae
    from sae_lens_allocation.training.runner import build_runner
    from sae_lens_allocation.training.sources import EMBEDDED, embedded_tokens, runner_sources

    ev = cfg["eval"]
    first = run_config(cfg, runs[0], out)
    model, dataset = runner_sources(first, override_model, override_dataset)
    if model is None:
        from sae_lens_allocation.training.sources import load_lm

        model = load_lm(first.model_name, device=first.device,
                        model_class_name=first.model_class_name,
                        model_from_pretrained_kwargs=first.model_from_pretrained_kwargs)
    n_eval_rows = 2 * ev["n_batches"] * ev["batch_size_prompts"]
    heldout = override_heldout
    if heldout is None and first.model_name == EMBEDDED:
        heldout = embedded_tokens(model, "heldout", first.context_size, n_eval_rows * first.context_size)
    if heldout is None and ev["heldout_dataset_path"]:
        heldout = hub_heldout_rows(ev["heldout_dataset_path"], ev["heldout_split"], ev["heldout_skip_rows"],
                                   n_eval_rows * 2, first.context_size)
    if heldout is None:
        raise ConfigError("source language_model with a hub model needs held-out rows: pass a "
                          "pretokenized dataset (eval.heldout_dataset_path, or run_compare(..., "
                          "override_heldout=...)) or use model_name: embedded")
    x_heldout = lm_activations(model, heldout, first.hook_name, n_eval_rows, ev["batch_size_prompts"])
    # Training batches are shuffled mixtures of many prompts; so are the batches of the gap.
    x_heldout = x_heldout[torch.randperm(x_heldout.shape[0], generator=torch.Generator().manual_seed(cfg["seed"]))]
    data = {"heldout_tokens_sha256": _sha256(torch.tensor(heldout[:n_eval_rows]["tokens"
                                                                   if "tokens" in heldout.column_names else "input_ids"])),
            "heldout_activation_rows": int(x_heldout.shape[0])}
    if dataset is not None:
        column = "tokens" if "tokens" in dataset.column_names else "input_ids"
        data["train_dataset_sha256"] = _sha256(torch.tensor(dataset[column]))
        data["train_dataset_rows"] = len(dataset)
    rows = []
    configs = [run_config(cfg, run, out) for run in runs]
    lockstep = cfg["lockstep"] and lockstep_allowed(configs)
    data["training"] = "lockstep (one multi-SAE run)" if lockstep else "one run per architecture"
    trained: dict[str, tuple[Any, float]] = {}
    if lockstep:
        from sae_lens_allocation.training.multi_runner import PluginMultiSAETrainingRunner

        print(f"[compare] training {', '.join(r['label'] for r in runs)} in lockstep "
              f"({configs[0].training_tokens:,} tokens, one LM pass per batch)", flush=True)
        multi = PluginMultiSAETrainingRunner(lockstep_config(configs, runs, out),
                                             override_dataset=dataset, override_model=model)
        start = time.perf_counter()
        saes = multi.run()
        seconds = time.perf_counter() - start
        trained = {run["label"]: (saes[_slug(run)], seconds) for run in runs}
    for run, rcfg in zip(runs, configs):
        if lockstep:
            training_sae, seconds = trained[run["label"]]
        else:
            print(f"[compare] training {run['label']} ({rcfg.sae.architecture()}, "
                  f"k={getattr(rcfg.sae, 'k', None)}, {rcfg.training_tokens:,} tokens)", flush=True)
            runner = build_runner(rcfg, override_model=model, override_dataset=dataset)
            start = time.perf_counter()
            training_sae = runner.run()
            seconds = time.perf_counter() - start
        sae_dir = Path(rcfg.output_path)
        result = evaluate_sae(sae_dir, model=model, dataset=heldout, n_batches=ev["n_batches"],
                              batch_size_prompts=ev["batch_size_prompts"], device=rcfg.device)
        export = load_sae(sae_dir, device=rcfg.device)
        gap_sae = training_sae if run["architecture"] in _GAP_ARCHITECTURES else None
        stats = heldout_stats(export, gap_sae, x_heldout.to(rcfg.device), rcfg.train_batch_size_tokens,
                              ev["underused_tau"], ev["fit_fraction"])
        s = result["summary"]
        # The table's EV is SAELens' run_evals figure; the held-out-rows EV (same rows as the
        # training-mode SAE in the gap) is kept beside it.
        stats["explained_variance_heldout_rows"] = stats.pop("explained_variance")
        rows.append(_row(run, rcfg.sae, result["architecture"], seconds, rcfg.training_tokens, stats, sae_dir, {
            "explained_variance": s["explained_variance"],
            "ce_loss_recovered": s["ce_loss_recovered"], "kl_div_score": s["kl_div_score"],
            "kl_div_with_sae": s["kl_div_with_sae"], "ce_loss_clean": s["ce_loss_clean"],
            "ce_loss_with_sae": s["ce_loss_with_sae"], "l0_per_token": result["l0_per_token"],
        }))
    data["model"] = first.model_name
    data["hook_name"] = first.hook_name
    return {"data": data, "rows": rows}


# Runner fields that may differ between the arms of a lockstep run.
_PER_RUN_FIELDS = ("sae", "output_path", "checkpoint_path", "logger")


def _slug(run: dict[str, Any]) -> str:
    return run["label"].replace("/", "_")


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


def lockstep_config(configs: list[Any], runs: list[dict[str, Any]], out: Path) -> Any:
    """The `MultiSAETrainingRunnerConfig` training every arm on the first config's settings;
    SAE `<label>` exports to out/saes/<label> as a single run would."""
    from sae_lens.multi_sae_training_runner import MultiSAETrainingRunnerConfig

    from sae_lens_allocation.training.multi_runner import multi_runner_fields

    first = configs[0]
    per_run = {"saes", "hook_names", "hook_head_indices", "output_path", "checkpoint_path"}
    fields = {f: getattr(first, f) for f in multi_runner_fields() - per_run if hasattr(first, f)}
    return MultiSAETrainingRunnerConfig(
        **fields,
        saes={_slug(run): c.sae for run, c in zip(runs, configs)},
        hook_names=first.hook_name, hook_head_indices=first.hook_head_index,
        output_path=str(out / "saes"), checkpoint_path=str(out / "checkpoints"),
    )


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


def _run_synthetic(cfg: dict[str, Any], runs: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY
    from sae_lens.synthetic import SyntheticModel, eval_sae_on_synthetic_data
    from sae_lens.training.sae_trainer import SAETrainer

    from sae_lens_allocation.loading import load_sae

    ev, seed = cfg["eval"], cfg["seed"]
    first = run_config(cfg, runs[0], out)
    model = SyntheticModel(first.synthetic_model)
    heldout_seed = seed + 7919  # a stream disjoint from training and calibration
    x_heldout = torch.cat([b for b, _ in zip(synthetic_batches(model, first.batch_size, heldout_seed),
                                             range(math.ceil(ev["samples"] / first.batch_size)))])
    first_batch = next(synthetic_batches(model, first.batch_size, seed))
    data = {"train_first_batch_sha256": _sha256(first_batch), "heldout_sha256": _sha256(x_heldout),
            "heldout_activation_rows": int(x_heldout.shape[0]),
            "true_l0": float(model.activation_generator.firing_probabilities.sum()),
            "synthetic_model": {"num_features": model.cfg.num_features, "hidden_dim": model.cfg.hidden_dim}}
    rows = []
    for run in runs:
        rcfg = run_config(cfg, run, out)
        rcfg.sae.d_in = model.cfg.hidden_dim
        print(f"[compare] training {run['label']} ({run['architecture']}, k={getattr(rcfg.sae, 'k', None)}, "
              f"{rcfg.training_samples:,} samples)", flush=True)
        torch.manual_seed(seed)
        sae = SAE_TRAINING_CLASS_REGISTRY[run["architecture"]][0](rcfg.sae)
        if hasattr(sae, "set_calibration_source"):
            sae.set_calibration_source(synthetic_batches(model, first.batch_size, seed + 1))
        trainer = SAETrainer(cfg=rcfg.to_sae_trainer_config(), sae=sae,
                             data_provider=synthetic_batches(model, rcfg.batch_size, seed))
        start = time.perf_counter()
        training_sae = trainer.fit()
        seconds = time.perf_counter() - start
        sae_dir = Path(rcfg.output_path)
        sae_dir.mkdir(parents=True, exist_ok=True)
        training_sae.save_inference_model(str(sae_dir))
        from safetensors.torch import save_file

        save_file({"sparsity": trainer.log_feature_sparsity}, str(sae_dir / "sparsity.safetensors"))
        export = load_sae(sae_dir, device=rcfg.device)
        gap_sae = training_sae if run["architecture"] in _GAP_ARCHITECTURES else None
        stats = heldout_stats(export, gap_sae, x_heldout, rcfg.batch_size, ev["underused_tau"], ev["fit_fraction"])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(heldout_seed)
            synth = eval_sae_on_synthetic_data(export, model.feature_dict, model.activation_generator,
                                               num_samples=ev["samples"], batch_size=rcfg.batch_size)
        rows.append(_row(run, rcfg.sae, export.cfg.architecture(), seconds, rcfg.training_samples, stats, sae_dir, {
            "mcc": synth.mcc, "f1": synth.classification.f1_score,
            "precision": synth.classification.precision, "recall": synth.classification.recall,
            "uniqueness": synth.uniqueness,
        }))
    return {"data": data, "rows": rows}


# ---------------------------------------------------------------------------------------------
# Rows, report, plots
# ---------------------------------------------------------------------------------------------


def _row(run: dict[str, Any], sae_cfg: Any, export_arch: str, seconds: float, tokens: int,
         stats: dict[str, Any], sae_dir: Path, extra: dict[str, Any]) -> dict[str, Any]:
    row = {
        "name": run["label"], "family": run["family"], "architecture": run["architecture"],
        "export_architecture": export_arch, "k": getattr(sae_cfg, "k", None), "d_sae": sae_cfg.d_sae,
        "aux_loss": getattr(sae_cfg, "aux_loss", None), "capacity": getattr(sae_cfg, "capacity", None),
        "train_seconds": seconds, "train_tokens_per_s": tokens / seconds, "sae_dir": str(sae_dir),
        "training_window_dead_share": sparsity_dead_share(sae_dir),
        **stats,
    }
    row.update(extra)
    return row


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def report_table(result: dict[str, Any]) -> str:
    synthetic = result["source"] == "synthetic"
    cols = [("name", "run", 0), ("export_architecture", "export", 0), ("k", "k", 0),
            ("explained_variance", "EV", 4), ("nmse", "NMSE", 4)]
    if synthetic:
        cols += [("mcc", "MCC", 3), ("f1", "F1", 3)]
    else:
        cols += [("ce_loss_recovered", "CE rec.", 4), ("kl_div_score", "KL score", 4)]
    cols += [("l0_mean", "L0 mean", 2), ("l0_std", "L0 std", 2), ("l0_p5", "L0 p5", 0), ("l0_p95", "L0 p95", 0),
             ("dead_share", "dead", 3), ("underused_share", "underused", 3),
             ("gap_ev", "EV gap", 4), ("gap_l0", "L0 gap", 2), ("train_tokens_per_s", "tok/s", 0)]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for row in result["rows"]:
        l0 = row["l0_per_token"]
        gap = row.get("gap") or {}
        flat = {**row, "l0_mean": l0["mean"], "l0_std": l0["std"], "l0_p5": l0["p5"], "l0_p95": l0["p95"],
                "gap_ev": gap.get("export_minus_training_ev"), "gap_l0": gap.get("export_minus_training_l0")}
        lines.append("| " + " | ".join(
            f"{flat[c]:.{d}f}" if isinstance(flat.get(c), float) else _fmt(flat.get(c)) for c, _, d in cols) + " |")
    return "\n".join(lines)


def _panels(result: dict[str, Any], sharey: bool) -> tuple[Any, Any, dict[str, list[dict[str, Any]]]]:
    """One panel per family (architecture entry), holding its runs (one per k when sweeping)."""
    import matplotlib.pyplot as plt

    families: dict[str, list[dict[str, Any]]] = {}
    for row in result["rows"]:
        families.setdefault(row["family"], []).append(row)
    ncols = min(4, len(families))
    nrows = math.ceil(len(families) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 2.8 * nrows), squeeze=False,
                             sharex=True, sharey=sharey)
    for ax in axes.flat[len(families):]:
        ax.axis("off")
    return fig, axes, families


def write_plots(result: dict[str, Any], out: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = {}
    # TopK's single spike would flatten the adaptive L0 distributions on a shared y axis.
    fig, axes, families = _panels(result, sharey=False)
    for ax, (family, rows) in zip(axes.flat, families.items()):
        for row in rows:
            hist = {int(k): v for k, v in row["l0_per_token"]["histogram"].items()}
            xs = list(range(0, max(hist) + 2))
            total = sum(hist.values())
            ax.step(xs, [hist.get(x, 0) / total for x in xs], where="mid",
                    label=f"k={row['k']:g}" if row["k"] is not None else row["name"])
        ax.set_title(family, fontsize=9)
        ax.legend(fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("latents active per token (L0)")
    for ax in axes[:, 0]:
        ax.set_ylabel("share of tokens")
    fig.suptitle("Per-token L0 of the exported SAEs on held-out data")
    fig.tight_layout()
    fig.savefig(out / "l0_histogram.png", dpi=100)
    plt.close(fig)
    plots["l0_histogram"] = "l0_histogram.png"

    fig, axes, families = _panels(result, sharey=True)
    for ax, (family, rows) in zip(axes.flat, families.items()):
        for row in rows:
            p = torch.tensor(row["density"])
            firing = p[p > 0]
            r = torch.arange(1, firing.numel() + 1, dtype=torch.float32)
            label = f"k={row['k']:g}" if row["k"] is not None else row["name"]
            line = ax.loglog(r, firing, label=f"{label} s={row['zipf_s']:.2f}")[0]
            fit = torch.exp(torch.tensor(row["zipf_log_c"]) - row["zipf_s"] * r.log())
            ax.loglog(r, fit, "--", color=line.get_color(), linewidth=0.8)
        dead = ", ".join(f"{r['dead_share']:.2f}" for r in rows)
        ax.set_title(f"{family} (dead: {dead})", fontsize=8)
        ax.legend(fontsize=6)
    for ax in axes[-1]:
        ax.set_xlabel("latent rank")
    for ax in axes[:, 0]:
        ax.set_ylabel("firing frequency")
    fig.suptitle("Held-out feature density by rank (dashed: Zipf fit, s = exponent)")
    fig.tight_layout()
    fig.savefig(out / "density_rank.png", dpi=100)
    plt.close(fig)
    plots["density_rank"] = "density_rank.png"

    if any(len(rows) > 1 for rows in families.values()):
        fig, ax = plt.subplots(figsize=(7, 4))
        for family, rows in families.items():
            rows = sorted(rows, key=lambda r: r["l0_per_token"]["mean"])
            ax.plot([r["l0_per_token"]["mean"] for r in rows], [r["explained_variance"] for r in rows],
                    marker="o", label=family)
        ax.set_xlabel("mean L0 per token (export, held-out)")
        ax.set_ylabel("explained variance")
        ax.set_title("Explained variance vs L0")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "ev_vs_l0.png", dpi=110)
        plt.close(fig)
        plots["ev_vs_l0"] = "ev_vs_l0.png"
    return plots


def write_report(result: dict[str, Any], out: Path, config_path: str | None) -> Path:
    lines = [f"# Architecture comparison ({result['source']})", ""]
    if config_path:
        lines += [f"Config: `{config_path}`", ""]
    m = result["machine"]
    lines += [f"Machine: {m['platform']}, {m['cpu_threads']} torch threads, torch {m['torch']}, "
              f"sae-lens {m['sae_lens']}; total wall time {result['total_seconds']:.0f} s.", ""]
    lines += ["Same data: " + ", ".join(f"{k} `{v}`" for k, v in result["data"].items()
                                         if not isinstance(v, dict)), "", report_table(result), ""]
    lines += ["EV and NMSE on held-out activations with the exported SAE; L0 per token on held-out "
              "tokens; dead = never fires on the held-out tokens; underused = below tau times its "
              "Zipf-fit expectation (dead included); EV/L0 gap = export minus training-mode SAE "
              "(batch rule) on the same held-out rows; tok/s = training tokens (samples) per second "
              "of the training call.", ""]
    for name, path in result["plots"].items():
        lines += [f"![{name}]({path})", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def run_compare(cfg: dict[str, Any], output_dir: str | Path | None = None, override_model: Any = None,
                override_dataset: Any = None, override_heldout: Any = None,
                config_path: str | None = None) -> dict[str, Any]:
    """Train and evaluate every run of a compare config; writes results.json, report.md, plots
    to the output folder and returns the results."""
    import sae_lens

    cfg = check_compare_config(cfg)
    out = Path(output_dir or cfg["output_dir"]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    runs = expand_runs(cfg)
    start = time.perf_counter()
    if cfg["source"] == "synthetic":
        result = _run_synthetic(cfg, runs, out)
    else:
        result = _run_language_model(cfg, runs, out, override_model, override_dataset, override_heldout)
    result.update(
        source=cfg["source"], seed=cfg["seed"], total_seconds=time.perf_counter() - start,
        machine={"platform": platform.platform(), "processor": platform.processor(),
                 "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
                 "sae_lens": sae_lens.__version__},
        config=cfg,
    )
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
                             "--set eval.n_batches=2")


def run_compare_command(args: Any) -> int:
    cfg = apply_overrides(read_yaml(args.config), args.set)
    result = run_compare(cfg, output_dir=args.out, config_path=str(args.config))
    out = Path(args.out or result["config"]["output_dir"]).resolve()
    print(report_table(result))
    print(f"report: {out / 'report.md'}\nresults: {out / 'results.json'}")
    return 0
