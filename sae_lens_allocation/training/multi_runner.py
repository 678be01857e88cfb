"""Several SAEs from one language-model pass: SAELens' `MultiSAETrainingRunner` for every plugin
architecture.

SAELens' multi runner trains N SAEs in lockstep on a shared multi-hook activation stream: one
LM forward per batch captures every hook, one shuffle permutation keeps the hooks' rows aligned,
and each SAE has its own `SAETrainer` (optimiser, schedules, scaler, sparsity), exactly as in a
single run. `PluginMultiSAETrainingRunner` is that runner with what the plugin's single-run entry
point (`runner.build_runner`) adds:

- `model_name: embedded` / `dataset_path: embedded` resolve to the shipped model and corpus;
- every SAE is initialised under `torch.manual_seed(cfg.seed)` (the single runner's rule), and
  the global RNG is reseeded with `cfg.seed` before the stream starts, so SAE i of a multi run
  equals a single run with SAE i's config and the same seed and data (tested);
- held-out calibration per SAE, as in the single runner (held_out.py): rows reserved once for
  the run before training, each Mutual/Feature Choice SAE reading them at its own hook, all
  hooks' activations from one LM forward per batch. SAEs with the same calibration settings
  calibrate on the same rows as a single run of each would;
- gradients for `gradient_topk` (any SAE whose config sets `needs_activation_gradients`):
  `MultiHookGradientActivationsStore` runs one forward to the logits and one backward down to
  the lowest requested hook per LM batch (`gradients.multi_hook_activation_gradients`) and
  yields, next to each hook's activations, rows `[acts | grads]` under `gradient_rows_key(hook)`;
  the gradient SAEs read those rows, the others the activations.

What SAELens' multi runner does not support stays unsupported (V1: cached activations,
`compile_sae`, `from_pretrained_path` per SAE; see its module docstring).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from sae_lens import LoggingConfig
from sae_lens.config import HfDataset
from sae_lens.multi_sae_training_runner import MultiSAETrainingRunnerConfig
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.sae import TrainingSAE
from sae_lens.training.activations_store import ActivationsStore
from sae_lens.training.mixing_buffer import multi_hook_concat_split_iter
from sae_lens.training.multi_sae_trainer import MultiSAETrainer

from sae_lens_allocation.saelens_compat import (
    MULTI_RUNNER_DERIVED_FIELDS,
    PluginActivationsStore,
    PluginMultiRunnerBase,
)
from sae_lens_allocation.tokens import run_special_tokens
from sae_lens_allocation.training.gradients import HookedRootModule, multi_hook_activation_gradients
from sae_lens_allocation.training.held_out import attach_calibration
from sae_lens_allocation.training.output_lock import RunLock, check_output_paths
from sae_lens_allocation.training.provenance import record_provenance
from sae_lens_allocation.training.sources import EMBEDDED, check_special_tokens, runner_sources


def gradient_rows_key(hook_name: str) -> str:
    """Key of the rows `[acts | grads]` at `hook_name` in a multi-hook batch."""
    return f"{hook_name}:acts+grads"


def sae_needs_gradients(sae_cfg: Any) -> bool:
    return bool(getattr(sae_cfg, "needs_activation_gradients", False))


class MultiHookGradientActivationsStore(PluginActivationsStore):
    """SAELens' multi-hook store whose batches also carry LM-loss gradients at `gradient_hooks`.

    Per LM batch: one forward to the logits capturing every hook and one backward down to the
    lowest gradient hook. A batch is `{hook: acts}` for every hook plus
    `{gradient_rows_key(hook): [acts | grads]}` for each gradient hook, shuffled by SAELens'
    `multi_hook_concat_split_iter` with one permutation, so all of a token's rows stay aligned.
    Rows are float32, sliced by `seqpos_slice` and head index as SAELens' store slices them;
    special tokens are dropped as SAELens drops them. Built with SAELens'
    `from_config_multi_hook`, plus `gradient_hooks`.
    """

    gradient_hooks: list[str]

    @classmethod
    def from_runner_config(
        cls,
        model: HookedRootModule,
        cfg: MultiSAETrainingRunnerConfig,
        dataset: HfDataset | str,
        exclude_special_tokens: torch.Tensor | None,
        gradient_hooks: Sequence[str],
    ) -> MultiHookGradientActivationsStore:
        """The store SAELens' multi runner builds for `cfg`, with gradients at `gradient_hooks`."""
        hooks = list(dict.fromkeys(cfg.hook_names_per_sae.values()))
        unknown = sorted(set(gradient_hooks) - set(hooks))
        if unknown:
            raise ValueError(f"gradient_hooks {unknown} are not hooks of this run ({hooks})")
        d_ins: dict[str, int] = {}
        heads: dict[str, int | None] = {}
        for name, hook in cfg.hook_names_per_sae.items():
            d_ins.setdefault(hook, cfg.saes[name].d_in)
            heads.setdefault(hook, cfg.hook_head_indices_per_sae[name])
        store = cls.from_config_multi_hook(
            model=model,
            dataset=dataset,
            hook_names=hooks,
            hook_d_ins=d_ins,
            hook_head_indices=heads,
            streaming=cfg.streaming,
            context_size=cfg.context_size,
            n_batches_in_buffer=cfg.n_batches_in_buffer,
            total_training_tokens=cfg.training_tokens,
            store_batch_size_prompts=cfg.store_batch_size_prompts,
            train_batch_size_tokens=cfg.train_batch_size_tokens,
            prepend_bos=cfg.prepend_bos,
            normalize_activations="none",
            device=torch.device(cfg.act_store_device),
            dtype=cfg.dtype,
            model_kwargs=cfg.model_kwargs,
            autocast_lm=cfg.autocast_lm,
            dataset_trust_remote_code=cfg.dataset_trust_remote_code,
            seqpos_slice=cfg.seqpos_slice,
            exclude_special_tokens=exclude_special_tokens,
            disable_concat_sequences=cfg.disable_concat_sequences,
            sequence_separator_token=cfg.sequence_separator_token,
            activations_mixing_fraction=cfg.activations_mixing_fraction,
            use_chat_formatting=cfg.use_chat_formatting,
        )
        store.gradient_hooks = [h for h in hooks if h in set(gradient_hooks)]
        return store

    def _rows(self, t: torch.Tensor, hook: str) -> torch.Tensor:
        """[batch, pos, ...] at `hook` -> [batch * kept_pos, d_in] float32 rows (SAELens' slicing)."""
        t = t[:, slice(*self.seqpos_slice)]
        head = self.multi_hook_head_indices.get(hook)
        if head is not None:
            t = t[:, :, head]
        return t.reshape(-1, self.multi_hook_d_ins[hook]).to(device=self.device, dtype=torch.float32)

    def filtered_multi_hook_llm_batch(
        self, raise_on_epoch_end: bool = False
    ) -> dict[str, torch.Tensor]:
        hooks = self.multi_hook_names
        batch_tokens = self.get_batch_tokens(raise_at_epoch_end=raise_on_epoch_end)
        acts, grads = multi_hook_activation_gradients(
            self.model, batch_tokens, self.gradient_hooks, self.autocast_lm, self.model_kwargs,
            activation_hooks=hooks,
        )
        out = {h: self._rows(acts[h], h) for h in hooks}
        for h in self.gradient_hooks:
            out[gradient_rows_key(h)] = torch.cat([out[h], self._rows(grads[h], h)], dim=-1)
        if self.exclude_special_tokens is None:
            return out
        token_ids = batch_tokens[:, slice(*self.seqpos_slice)].reshape(-1).to(self.device)
        keep = ~torch.isin(token_ids, self.exclude_special_tokens)
        return {key: rows[keep] for key, rows in out.items()}

    def get_multi_hook_data_loader(self) -> Iterator[dict[str, torch.Tensor]]:
        """SAELens' multi-hook stream over the activation and `[acts | grads]` keys."""
        return multi_hook_concat_split_iter(
            buffer_size=self.n_batches_in_buffer * self.training_context_size,
            batch_size=self.train_batch_size_tokens,
            activations_loader=self.filtered_multi_hook_activations(),
            hook_names=self.multi_hook_names + [gradient_rows_key(h) for h in self.gradient_hooks],
            mix_fraction=self.activations_mixing_fraction,
        )


class PluginMultiSAETrainingRunner(PluginMultiRunnerBase):
    """SAELens' `MultiSAETrainingRunner` with the plugin's sources, seeding, held-out
    calibration and gradient store (module docstring). `run()` is SAELens' own."""

    activations_store: ActivationsStore

    def __init__(
        self,
        cfg: MultiSAETrainingRunnerConfig,
        override_dataset: HfDataset | None = None,
        override_model: HookedRootModule | None = None,
        override_saes: dict[str, TrainingSAE[Any]] | None = None,
    ) -> None:
        for sae_cfg in cfg.saes.values():
            if hasattr(sae_cfg, "check_batch_tokens"):
                sae_cfg.check_batch_tokens(cfg.train_batch_size_tokens)
        override_dataset_given = override_dataset is not None
        check_output_paths([("output_path", cfg.output_path), ("checkpoint_path", cfg.checkpoint_path)])
        override_model, override_dataset = runner_sources(cfg, override_model, override_dataset)
        check_special_tokens(override_model, cfg.exclude_special_tokens)
        if override_saes is None:
            override_saes = {}
            for name, sae_cfg in cfg.saes.items():
                # SAELens does not seed the SAE's initialisation; each SAE starts as a single run
                # with this seed would.
                torch.manual_seed(cfg.seed)
                override_saes[name] = get_sae_training_class(sae_cfg.architecture())[0](sae_cfg)
        super().__init__(cfg, override_dataset, override_model, override_saes)
        self.gradient_saes = [n for n, c in cfg.saes.items() if sae_needs_gradients(c)]
        if self.gradient_saes:
            store = MultiHookGradientActivationsStore.from_runner_config(
                self.model, cfg, self.activations_store.dataset,
                self.activations_store.exclude_special_tokens,
                [cfg.hook_names_per_sae[n] for n in self.gradient_saes],
            )
            self.activations_store = store
            self.evaluator.activations_store = store
        hooks = cfg.hook_names_per_sae
        special_ids, special_source = run_special_tokens(self.model, cfg.exclude_special_tokens)
        self.special_tokens = {"ids": special_ids, "source": special_source}
        embedded_rows = not override_dataset_given and cfg.dataset_path == EMBEDDED
        # name -> the held-out calibration rows that SAE reads (held_out.CalibrationTokens).
        self.calibration_tokens = attach_calibration(
            self.saes, hooks, self.model, self.activations_store,
            self.activations_store.get_multi_hook_activations, cfg.context_size, cfg.seed,
            special_ids, override_dataset if embedded_rows else None)
        # The shuffle order depends on the seed only, not on how many numbers the inits drew.
        torch.manual_seed(cfg.seed)

    def run(self) -> dict[str, TrainingSAE[Any]]:
        """SAELens' `run()`, holding the lock on `output_path` and `checkpoint_path`
        (output_lock.py)."""
        with RunLock([("output_path", self.cfg.output_path),
                      ("checkpoint_path", self.cfg.checkpoint_path)]):
            return super().run()

    def after_fit(self, trainer: MultiSAETrainer, saes: dict[str, TrainingSAE[Any]]) -> None:
        # Provenance for every export (provenance.py); a multi run is one process. A resume
        # is recorded without comparing configs (the multi runner's resume is SAELens' own).
        resumes = [] if self.cfg.resume_from_checkpoint is None else [
            {"checkpoint": str(self.cfg.resume_from_checkpoint), "tokens_seen": None, "changed": None}]
        for name, sae in saes.items():
            record_provenance(sae, self.cfg, trainer.trainers[name].n_training_samples, 1,
                              self.special_tokens, resumes)

    def before_fit(self, trainer: MultiSAETrainer) -> None:
        # Route the gradient SAEs to their [acts | grads] rows.
        for name in self.gradient_saes:
            trainer.hook_names[name] = gradient_rows_key(self.cfg.hook_names_per_sae[name])


def multi_runner_config_from_dict(cfg: Mapping[str, Any]) -> MultiSAETrainingRunnerConfig:
    """A `MultiSAETrainingRunnerConfig` from a plain mapping: `saes` maps names to SAE config
    dicts with an `architecture` string (resolved through SAELens' registry), `logger` is a
    `LoggingConfig` mapping (default: no wandb), `seqpos_slice` may be a list. Key checks are
    `yaml_config.multi_runner_config_from_dict`'s; here unknown runner keys raise TypeError and
    SAE dicts go through SAELens' `from_dict`."""
    d = dict(cfg)
    saes = {}
    for name, sae in dict(d.pop("saes")).items():
        saes[name] = get_sae_training_class(sae["architecture"])[1].from_dict(dict(sae))
    d["logger"] = LoggingConfig(**dict(d.get("logger") or {"log_to_wandb": False}))
    if isinstance(d.get("seqpos_slice"), list):
        d["seqpos_slice"] = tuple(d["seqpos_slice"])
    return MultiSAETrainingRunnerConfig(saes=saes, **d)


def multi_runner_fields() -> set[str]:
    """The `MultiSAETrainingRunnerConfig` fields a config may set."""
    return {f.name for f in dataclasses.fields(MultiSAETrainingRunnerConfig)} - set(MULTI_RUNNER_DERIVED_FIELDS)


def build_multi_runner(
    cfg: MultiSAETrainingRunnerConfig | Mapping[str, Any],
    override_model: HookedRootModule | None = None,
    override_dataset: HfDataset | None = None,
) -> PluginMultiSAETrainingRunner:
    """The plugin's multi runner for `cfg` (a config, or a mapping for
    `multi_runner_config_from_dict`)."""
    if isinstance(cfg, Mapping):
        cfg = multi_runner_config_from_dict(cfg)
    return PluginMultiSAETrainingRunner(
        cfg, override_dataset=override_dataset, override_model=override_model
    )


def train_multi(
    cfg: MultiSAETrainingRunnerConfig | Mapping[str, Any],
    override_model: HookedRootModule | None = None,
    override_dataset: HfDataset | None = None,
) -> dict[str, TrainingSAE[Any]]:
    """Train every SAE of `cfg` from one LM pass per batch; returns {name: training SAE}. The
    exports go to `cfg.output_path/<name>/` as SAELens writes them."""
    return build_multi_runner(cfg, override_model, override_dataset).run()


def export_dirs(cfg: MultiSAETrainingRunnerConfig) -> dict[str, Path]:
    """Where `run()` writes each SAE's export."""
    if cfg.output_path is None:
        return {}
    return {name: Path(cfg.output_path) / name for name in cfg.saes}
