"""The language-model source of a comparison: held-out rows and their activations, lockstep
multi-SAE training with convergence probes, and evaluation on the held-out text (and sparse
probing on the embedded corpus' concepts, feature_quality.SparseProbes)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sae_lens_allocation.analysis import row_metrics as rm
from sae_lens_allocation.analysis.compare.config import Run, make_run, run_config, slug
from sae_lens_allocation.analysis.compare.feature_quality import SparseProbes
from sae_lens_allocation.analysis.compare.heldout import (
    load_export,
    run_gap,
    tensor_sha256,
    trained_run,
    training_rule_stats,
    underused_share,
)
from sae_lens_allocation.analysis.steering import pick_latents, random_directions, steering_effects
from sae_lens_allocation.tokens import keep_mask, special_token_ids
from sae_lens_allocation.yaml_config import ConfigError


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
# Multiples of alpha besides 1 for the steering dose-response: three norms in all.
STEERING_DOSES = (0.5, 2.0)
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


def lockstep_config(configs: list[Any], runs: list[Run], out: Path, n_points: int) -> Any:
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
        saes={slug(run): c.sae for run, c in zip(runs, configs)},
        hook_names=first.hook_name, hook_head_indices=first.hook_head_index,
        output_path=str(out / "saes"), checkpoint_path=None, n_checkpoints=n_points - 1,
    )


def _probed_multi_runner(cfg: Any, dataset: Any, model: Any, probe: Callable[[dict[str, Any]], None]) -> Any:
    """The plugin's multi runner whose checkpoint hook evaluates the SAEs instead of writing files."""
    from sae_lens_allocation.training.multi_runner import PluginMultiSAETrainingRunner

    class ProbedMultiSAETrainingRunner(PluginMultiSAETrainingRunner):
        def save_runner_checkpoint_files(self, checkpoint_path: Path | None) -> None:
            probe(self.saes)

    return ProbedMultiSAETrainingRunner(cfg, override_dataset=dataset, override_model=model)


class LanguageModelStudy:
    """Held-out data of a language-model comparison, and training and evaluation of its runs."""

    def __init__(self, cfg: dict[str, Any], out: Path, override_model: Any, override_dataset: Any,
                 override_heldout: Any) -> None:
        # Runs of one seed and lr train together (one LM pass per batch) when the config allows.
        self.lockstep: bool = cfg["lockstep"]
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
        # The steering metric's control: random unit directions at the same alpha, the same for
        # every run (analysis/steering.py).
        contexts = self.tokens[: ev["steering_contexts"]]
        random = random_directions(ev["steering_latents"], x.shape[-1], 0).to(x.device)
        control = steering_effects(model, contexts, self.hook, random, torch.arange(random.shape[0]), self.alpha,
                                   self.special)
        self.steering_random = float(control.kl.mean())
        self.data = {"heldout_tokens_sha256": tensor_sha256(self.tokens), "heldout_rows": n_rows,
                     "heldout_tokens": int(self.keep.sum()), "ce_rows": int(self.ce_tokens.shape[0]),
                     "model": first.model_name, "hook_name": self.hook, "steering_alpha": self.alpha,
                     "steering_random": self.steering_random,
                     "steering_specificity_random": float(control.specificity.mean())}
        # The embedded corpus: each seed's runner builds that seed's rows (module docstring).
        self.embedded_rows = override_dataset is None and first.dataset_path == EMBEDDED
        self.seed_rows = {seed: dataset if seed == first.seed or not self.embedded_rows
                          else runner_dataset(run_config(cfg, make_run(cfg, cfg["architectures"][0], seed, None, None),
                                                         out), model)
                          for seed in [*cfg["seeds"], *(cfg["margin_seeds"] or [])]}
        # Density rows skip the largest calibration pool any arm draws from.
        self.calibration_tokens = max(getattr(run_config(cfg, make_run(cfg, e, first.seed, None, None), out).sae,
                                              "calibration_tokens", 0) for e in cfg["architectures"])
        if dataset is not None:
            dcol = "tokens" if "tokens" in dataset.column_names else "input_ids"
            self.data["train_dataset_sha256"] = {seed: tensor_sha256(torch.tensor(rows[:][dcol]))
                                                 for seed, rows in self.seed_rows.items()}
            self.data["train_dataset_rows"] = {seed: len(rows) for seed, rows in self.seed_rows.items()}
        self.data["density"] = {}
        self.probes, self.probing = self._sparse_probes(), None
        if self.probes is not None:
            self.probing = self.probes.reference
        self._density: tuple[tuple[int, Any], dict[str, torch.Tensor] | None, dict[str, Any] | None] | None = None

    def _sparse_probes(self) -> SparseProbes | None:
        """The sparse probes (feature_quality.SparseProbes; seed 0 for every run) with the floor on
        the baseline's untrained SAE; None where eval.sparse_probe_tokens is 0 or the tokenizer is
        not fast (the concept labels need its character offsets)."""
        from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

        n = self.cfg["eval"]["sparse_probe_tokens"]
        if not n or not getattr(self.model.tokenizer, "is_fast", False):
            return None
        entry = next(e for e in self.cfg["architectures"] if e["name"] == self.cfg["baseline"])
        sae_cfg = run_config(self.cfg, make_run(self.cfg, entry, self.cfg["seeds"][0], None, None), self.out).sae
        with torch.random.fork_rng(devices=[]):
            floor_sae = SAE_TRAINING_CLASS_REGISTRY[entry["architecture"]][0](sae_cfg)
        return SparseProbes(self.model, self.hook, self.first.context_size, n, 0, floor_sae)

    def density_rows(self, run: Run) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any] | None]:
        """Activations and kept positions of the rows that extend the held-out tokens to
        `eval.density_samples` for the dead share of `run` (module docstring), and where they come
        from (the record's `density_source`); None, None where the source has none or the
        held-out tokens suffice. A length-check run reads more files, so its rows skip those too.
        The rows of one (seed, length) are kept at a time."""
        from sae_lens_allocation.embedded.splits import embedded_density_tokens
        from sae_lens_allocation.training.sources import runner_dataset

        seed, key = run.seed, (run.seed, run.length)
        if self._density is not None and self._density[0] == key:
            return self._density[1], self._density[2]
        extra = self.cfg["eval"]["density_samples"] - self.data["heldout_tokens"]
        found = None
        if self.embedded_rows and extra > 0:
            training = self.seed_rows[seed] if run.length is None \
                else runner_dataset(run_config(self.cfg, run, self.out), self.model)
            found = embedded_density_tokens(self.model, training, self.first.context_size, seed,
                                            self.calibration_tokens, extra)
        rows, source = None, None
        if found is not None:
            tokens, info = found
            tokens = tokens.to(self.tokens.device)
            rows = {"acts": rm.lm_row_activations(self.model, tokens, self.hook, self.cfg["eval"]["batch_rows"]),
                    "keep": keep_mask(tokens, self.special)}
            source = {"where": "density" if run.length is None else "length_check_density", "seed": seed,
                      **info, "heldout_tokens": self.data["heldout_tokens"], "tokens_sha256": tensor_sha256(tokens)}
        self._density = (key, rows, source)
        return rows, source

    def train(self, runs: list[Run]) -> dict[str, dict[str, Any]]:
        """Train `runs` (same seed and lr) in one multi-SAE run when allowed, else one by one."""
        configs = [run_config(self.cfg, run, self.out) for run in runs]
        if self.lockstep and lockstep_allowed(configs):
            groups = [(runs, configs)]
        else:
            groups = [([run], [c]) for run, c in zip(runs, configs)]
        out = {}
        for group_runs, group_configs in groups:
            out.update(self._train_group(group_runs, group_configs))
        return out

    def _train_group(self, runs: list[Run], configs: list[Any]) -> dict[str, dict[str, Any]]:
        n_points = self.cfg["eval"]["convergence_points"]
        probe_x = self.x[: self.cfg["eval"]["probe_rows"]]
        archs = {slug(r): r.architecture for r in runs}
        points: dict[str, list[dict[str, float]]] = {s: [] for s in archs}
        batch = configs[0].train_batch_size_tokens

        def probe(saes: dict[str, Any]) -> None:
            for name, sae in saes.items():
                points[name].append(training_rule_stats(sae, probe_x, batch, archs[name]))

        print(f"[compare] training {', '.join(r.label for r in runs)} "
              f"({configs[0].training_tokens:,} tokens, one LM pass per batch)", flush=True)
        runner = _probed_multi_runner(lockstep_config(configs, runs, self.out, n_points),
                                      None if self.embedded_rows else self.dataset, self.model, probe)
        start = time.perf_counter()
        saes = runner.run()
        seconds = time.perf_counter() - start
        trained = {}
        for run, c in zip(runs, configs):
            name = slug(run)
            points[name].append(training_rule_stats(saes[name], probe_x, batch, run.architecture))
            trained[run.label] = trained_run(saes[name], seconds, c.training_tokens, len(runs),
                                                Path(self.out / "saes" / name), batch, points[name], n_points)
        return trained

    def evaluate(self, run: Run, trained: dict[str, Any]) -> dict[str, Any]:
        ev = self.cfg["eval"]
        export, reconstruct = load_export(trained["sae_dir"], self.first.device)
        acts = rm.activation_sums(reconstruct, self.acts, self.keep, ev["batch_rows"])
        lm = rm.lm_sae_sums(self.model, self.ce_tokens, self.hook, reconstruct, self.special, ev["batch_rows"])
        rows = {"export": {**acts["rows"], **self.reference, **lm}}
        if run.architecture == "gradient_topk":
            sae = trained["sae"]
            sae.eval()
            rows["gradient_selection"] = {**self.reference, **rm.lm_sae_sums(
                self.model, self.ce_tokens, self.hook, rm.gradient_reconstruct(sae), self.special, ev["batch_rows"],
                with_gradients=True)}
        fired, n_tokens = acts["fired"], float(self.keep.sum())
        extra, source = self.density_rows(run)
        if extra is not None:
            more = rm.activation_sums(reconstruct, extra["acts"], extra["keep"], ev["batch_rows"])
            fired, n_tokens = fired + more["fired"], n_tokens + float(extra["keep"].sum())
        shares = underused_share(fired, n_tokens, ev["underused_tau"], ev["fit_fraction"])
        latents = pick_latents(acts["fired"], ev["steering_latents"], run.seed)
        contexts = self.tokens[: ev["steering_contexts"]]
        effects = steering_effects(self.model, contexts, self.hook, export.W_dec.detach(), latents, self.alpha,
                                   self.special)
        steer = effects.kl
        # Dose-response: the same latents at multiples of alpha (analysis/steering.py).
        dose: dict[str, float | None] = {
            f"steering_x{m:g}": float(steering_effects(self.model, contexts, self.hook, export.W_dec.detach(),
                                                       latents, m * self.alpha, self.special).kl.mean())
            for m in STEERING_DOSES if latents.numel()}
        if latents.numel():
            dose["steering_over_random"] = float(steer.mean()) / self.steering_random
            dose["steering_specificity"] = float(effects.specificity.mean())
        if self.probes is not None:
            dose["sparse_probe_accuracy"] = self.probes.accuracy(export)
        return {
            "rows": rows, "steering_values": steer, "l0_tokens": acts["l0_tokens"], "density_source": source,
            "scalars": dose,
            "selection_rows": ev["selection_rows"],
            "density": rm.density_stats(fired, n_tokens),
            "underused_share": shares["underused_share"], "gap": run_gap(run, trained, export, self.x),
            "export_architecture": export.cfg.architecture(), "d_sae": export.cfg.d_sae,
        }
