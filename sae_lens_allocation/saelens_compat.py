"""Everything the plugin needs from SAELens that SAELens does not expose publicly, in one place.

No other module of the package names a private SAELens attribute or method (one starting with
`_`) or carries a copy of a SAELens function body; they go through the classes and functions
here. `tests/test_saelens_compat.py` (the canary) lists every private name in `PRIVATE_NAMES` and
checks it against the installed sae-lens, and hashes the upstream source of every body copied
here (`COPIED_BODIES`), so a SAELens release that moves one fails one test that names it.
docs/saelens-internals.md lists the same needs as a proposal for public hooks upstream.

Three kinds of need:
- Private steps the plugin extends. Each class below overrides SAELens' private method once and
  forwards it to a public method of the same meaning (`tokenized_sequences`, `cached_llm_batch`,
  `filtered_multi_hook_llm_batch`, `create_shard`, `before_fit` / `after_fit`,
  `save_runner_checkpoint_files`);
  plugin classes override the public one and call `super()`.
- Private state the plugin reads or sets: functions and properties with public names.
- Bodies copied because SAELens has no seam where the plugin needs one: SAELens' mixing buffer
  (the plugin's has a state to save), `LanguageModelSAETrainingRunner.run` (a data-parallel
  trainer in place of `SAETrainer`), `SAETrainer._train_step` (firing counts and gradients over
  all ranks), `CacheActivationsRunner.__init__` (without loading the model by its hub name).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from datasets import Array2D, Dataset, Features, Sequence, Value
from sae_lens.cache_activations_runner import CacheActivationsRunner
from sae_lens.config import CacheActivationsRunnerConfig
from sae_lens.llm_sae_training_runner import LanguageModelSAETrainingRunner
from sae_lens.multi_sae_training_runner import MultiSAETrainingRunner
from sae_lens.saes.sae import TrainingSAE, TrainStepInput, TrainStepOutput
from sae_lens.training.activations_store import ActivationsStore
from sae_lens.training.multi_sae_trainer import MultiSAETrainer
from sae_lens.training.sae_trainer import SAETrainer

#: Private SAELens names this module uses, as (object, name): the canary checks each exists.
PRIVATE_NAMES: tuple[tuple[Any, str], ...] = (
    (ActivationsStore, "_iterate_tokenized_sequences"),
    (ActivationsStore, "_load_raw_llm_batch_from_cached"),
    (ActivationsStore, "_get_filtered_multi_hook_llm_batch"),
    (ActivationsStore, "_iterate_filtered_activations"),
    (ActivationsStore, "_iterate_filtered_multi_hook_activations"),
    (ActivationsStore, "_dataloader"),
    (ActivationsStore, "_hook_names"),
    (ActivationsStore, "_hook_d_ins"),
    (CacheActivationsRunner, "_create_shard"),
    (CacheActivationsRunner, "_get_sliced_context_size"),
    (LanguageModelSAETrainingRunner, "_set_sae_metadata"),
    (MultiSAETrainingRunner, "_run_with_interruption_handling"),
    (MultiSAETrainingRunner, "_save_runner_checkpoint_files"),
    (SAETrainer, "_train_step"),
    (SAETrainer, "_is_logging_step"),
    (SAETrainer, "_update_pbar"),
    (MultiSAETrainer, "_update_pbar"),
    (LanguageModelSAETrainingRunner, "_compile_sae_if_needed"),
    (MultiSAETrainingRunner, "_set_sae_metadata"),
    (MultiSAETrainingRunner, "_save_final_outputs"),
)

#: Instance attributes `ActivationsStore.__init__` sets (the canary reads its source for them).
PRIVATE_STORE_ATTRIBUTES = ("_hook_head_indices",)

#: Fields of `MultiSAETrainingRunnerConfig` that SAELens derives (private) or that cannot be
#: serialised: never given in a config.
MULTI_RUNNER_DERIVED_FIELDS = ("_hook_names_per_sae", "_hook_head_indices_per_sae", "evaluator")

#: Upstream functions whose bodies are copied here: qualified name -> {sha256 of the dedented
#: `inspect.getsource`: the sae-lens versions it was read from}. Each copy here was compared with
#: those sources; the canary recomputes the hash of the installed one, and a new hash means the
#: copy must be compared with the new upstream code and the hash added.
COPIED_BODIES: dict[str, dict[str, str]] = {
    "sae_lens.training.mixing_buffer:mixing_buffer": {
        "99383289c29786dcd21bb16cc03e91e1668266de4d18e651bcf412faa5d92d5d": "6.49.2, 6.54.12",
    },
    "sae_lens.llm_sae_training_runner:LanguageModelSAETrainingRunner.run": {
        "56f8ab38f692647e74d11e4c47e063d136d4c9927bfd548f293c6a0faf818405": "6.54.12",
        # 6.49.2 does not close a prefetching iterator; the copy (6.54's) does.
        "51d3f2049558c9552dc8970b12eb9fd5b5b0b2739b5c26f6b9c6c2db2d0c8f74": "6.49.2",
    },
    "sae_lens.training.sae_trainer:SAETrainer._train_step": {
        "880080b4646e3dd0010ef4a1d21da9e5ce7f11d407906a7af8ed0d1dbd45f846": "6.49.2, 6.54.12",
    },
    "sae_lens.multi_sae_training_runner:MultiSAETrainingRunner.run": {
        "6c95ff36f5540f77f6ca6119ebaa929fcd1760750dc3ab6a1bf7adc794db636c": "6.54.12",
        # 6.49.2 does not close a prefetching iterator; the copy (6.54's) does.
        "54cfb3dbf05139847ad0ed9508f71da22bf077109c07ef454e9970071bee4cc2": "6.49.2",
    },
    "sae_lens.cache_activations_runner:CacheActivationsRunner.__init__": {
        "bcea4f07f67b8c8d2c837cbc4d104f638eda90a3cfdc83e52e5be73765b7f239": "6.49.2, 6.54.12",
    },
}


# ---------------------------------------------------------------------------------------------
# Activations stores


class PluginActivationsStore(ActivationsStore):
    """SAELens' `ActivationsStore` with the private steps the plugin extends under public names."""

    def _iterate_tokenized_sequences(self) -> Iterator[torch.Tensor]:
        return self.tokenized_sequences()

    def _load_raw_llm_batch_from_cached(
        self, raise_on_epoch_end: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.cached_llm_batch(raise_on_epoch_end)

    def _get_filtered_multi_hook_llm_batch(
        self, raise_on_epoch_end: bool = False
    ) -> dict[str, torch.Tensor]:
        return self.filtered_multi_hook_llm_batch(raise_on_epoch_end)

    def tokenized_sequences(self) -> Iterator[torch.Tensor]:
        """The dataset's token sequences, in the order the store reads them."""
        return super()._iterate_tokenized_sequences()

    def cached_llm_batch(self, raise_on_epoch_end: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The next rows of a cached activation dataset and their token ids."""
        return super()._load_raw_llm_batch_from_cached(raise_on_epoch_end)

    def filtered_multi_hook_llm_batch(self, raise_on_epoch_end: bool = False) -> dict[str, torch.Tensor]:
        """One LM batch's rows at every hook, special tokens removed."""
        return super()._get_filtered_multi_hook_llm_batch(raise_on_epoch_end)

    def filtered_activations(self) -> Iterator[torch.Tensor]:
        """The stream of activation rows the store's loader mixes."""
        return self._iterate_filtered_activations()

    def filtered_multi_hook_activations(self) -> Iterator[dict[str, torch.Tensor]]:
        """The multi-hook stream of activation rows the store's loader mixes."""
        return self._iterate_filtered_multi_hook_activations()

    @property
    def data_loader(self) -> Iterator[Any] | None:
        """The loader `__next__` reads, None before the first batch."""
        return self._dataloader

    @data_loader.setter
    def data_loader(self, loader: Iterator[Any] | None) -> None:
        self._dataloader = loader

    @property
    def multi_hook_names(self) -> list[str]:
        """The hooks of a multi-hook store, in SAELens' order."""
        assert self._hook_names is not None, "not a multi-hook store"
        return list(self._hook_names)

    @property
    def multi_hook_d_ins(self) -> dict[str, int]:
        assert self._hook_d_ins is not None, "not a multi-hook store"
        return dict(self._hook_d_ins)

    @property
    def multi_hook_head_indices(self) -> dict[str, int | None]:
        return dict(self._hook_head_indices)


def restart_tokenized_sequences(store: ActivationsStore) -> None:
    """Start the store's dataset iterator again from its first row (any SAELens store)."""
    store.iterable_sequences = store._iterate_tokenized_sequences()


# ---------------------------------------------------------------------------------------------
# The mixing buffer, with a state (copied: SAELens' `mixing_buffer` generator has none)


class MixingBuffer:
    """SAELens' `mixing_buffer` (sae-lens 6.54) as an iterator whose state can be saved.

    Rows accumulate until there are `buffer_size`; the rows are then permuted (`torch.randperm`
    with `generator`, unless mix_fraction = 0), `int(buffer_size * mix_fraction)` are kept for
    mixing and the largest multiple of `batch_size` of the rest is served in order.
    """

    def __init__(self, buffer_size: int, batch_size: int, loader: Iterator[torch.Tensor],
                 mix_fraction: float, generator: torch.Generator) -> None:
        if buffer_size < batch_size:
            raise ValueError("Buffer size must be greater than or equal to batch size")
        if not 0 <= mix_fraction <= 1:
            raise ValueError("mix_fraction must be in [0, 1]")
        self.buffer_size, self.batch_size, self.mix_fraction = buffer_size, batch_size, mix_fraction
        self.loader, self.generator = loader, generator
        self.storage: torch.Tensor | None = None
        self.serving: torch.Tensor | None = None
        self.served = 0

    def __iter__(self) -> MixingBuffer:
        return self

    @torch.no_grad()
    def __next__(self) -> torch.Tensor:
        while self.serving is None or self.served * self.batch_size >= self.serving.shape[0]:
            self._refill()
        batch = self.serving[self.served * self.batch_size : (self.served + 1) * self.batch_size]
        self.served += 1
        return batch

    def _refill(self) -> None:
        while self.storage is None or self.storage.shape[0] < self.buffer_size:
            new = next(self.loader)
            self.storage = new if self.storage is None else torch.cat([self.storage, new])
        storage = self.storage
        if self.mix_fraction > 0:
            perm = torch.randperm(storage.shape[0], generator=self.generator)
            storage = storage[perm.to(storage.device)]
        keep = int(self.buffer_size * self.mix_fraction)
        n_batches = max(1, (storage.shape[0] - keep) // self.batch_size)
        cut = n_batches * self.batch_size
        self.serving, self.storage, self.served = storage[:cut], storage[cut:], 0

    def state_dict(self) -> dict[str, Any]:
        return {"storage": self.storage, "serving": self.serving, "served": self.served,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.storage = None if state["storage"] is None else state["storage"].to(device)
        self.serving = None if state["serving"] is None else state["serving"].to(device)
        self.served = int(state["served"])
        self.generator.set_state(state["generator"])


# ---------------------------------------------------------------------------------------------
# Runners and trainers


class PluginMultiRunnerBase(MultiSAETrainingRunner):
    """SAELens' `MultiSAETrainingRunner` with its private hooks under public names and a
    trainer whose progress bar moves on short runs."""

    def run(self) -> dict[str, TrainingSAE[Any]]:
        """`MultiSAETrainingRunner.run` (sae-lens 6.54, copied) with `PluginMultiSAETrainer`."""
        import wandb
        from sae_lens import logger
        from sae_lens.training.prefetch import PrefetchingIterator

        cfg = self.cfg
        self._set_sae_metadata()
        if cfg.logger.log_to_wandb:
            wandb.init(project=cfg.logger.wandb_project, entity=cfg.logger.wandb_entity,
                       config=cfg.to_dict(), name=cfg.logger.run_name, id=cfg.logger.wandb_id)
        data_provider: Any = self.activations_store.get_multi_hook_data_loader()
        if cfg.prefetch_llm_batches:
            size = 1 if isinstance(cfg.prefetch_llm_batches, bool) else cfg.prefetch_llm_batches
            data_provider = PrefetchingIterator(data_provider, prefetch=size)
        try:
            trainer = PluginMultiSAETrainer(
                cfg=cfg.to_sae_trainer_config(), saes=self.saes, hook_names=cfg.hook_names_per_sae,
                data_provider=data_provider, evaluator=self.evaluator,
                save_checkpoint_fn=self._save_runner_checkpoint_files,
            )
            if cfg.resume_from_checkpoint is not None:
                logger.info(f"Resuming from checkpoint: {cfg.resume_from_checkpoint}")
                trainer.load_checkpoint(cfg.resume_from_checkpoint)
                self.activations_store.load_from_checkpoint(cfg.resume_from_checkpoint)
            saes = self._run_with_interruption_handling(trainer)
            if cfg.output_path is not None:
                self._save_final_outputs(saes, trainer)
            if cfg.logger.log_to_wandb:
                wandb.finish()
            return saes
        finally:
            if isinstance(data_provider, PrefetchingIterator):
                data_provider.close()

    def _run_with_interruption_handling(self, trainer: MultiSAETrainer) -> dict[str, TrainingSAE[Any]]:
        self.before_fit(trainer)
        saes = super()._run_with_interruption_handling(trainer)
        self.after_fit(trainer, saes)
        return saes

    def _save_runner_checkpoint_files(self, checkpoint_path: Path | None) -> None:
        self.save_runner_checkpoint_files(checkpoint_path)

    def before_fit(self, trainer: MultiSAETrainer) -> None:
        """Called with the trainer just before `fit` (the one place SAELens hands it over)."""

    def after_fit(self, trainer: MultiSAETrainer, saes: dict[str, TrainingSAE[Any]]) -> None:
        """Called with the trainer and the trained SAEs when `fit` returns, before the export."""

    def save_runner_checkpoint_files(self, checkpoint_path: Path | None) -> None:
        """Runner-level files of a checkpoint (SAELens': the store state and runner config)."""
        super()._save_runner_checkpoint_files(checkpoint_path)


def progress_interval(total_steps: int) -> int:
    """Steps between progress-bar updates: SAELens' 100, fewer for a run of under 10,000 steps
    so that its bar moves about 100 times (every step for a run of under 200)."""
    return max(1, min(100, total_steps // 100))


class PluginSAETrainer(SAETrainer[Any, Any]):
    """SAELens' `SAETrainer` whose progress bar moves on short runs too (`progress_interval`)."""

    def _update_pbar(self, step_output: TrainStepOutput, pbar: Any, update_interval: int = 100) -> None:
        steps = self.cfg.total_training_samples // self.cfg.train_batch_size_samples
        super()._update_pbar(step_output, pbar, update_interval=progress_interval(steps))


class PluginMultiSAETrainer(MultiSAETrainer):
    """SAELens' `MultiSAETrainer` whose progress bar moves on short runs too."""

    def _update_pbar(self, step_outputs: dict[str, TrainStepOutput], pbar: Any,
                     update_interval: int = 100) -> None:
        steps = self.cfg.total_training_samples // self.cfg.train_batch_size_samples
        super()._update_pbar(step_outputs, pbar, update_interval=progress_interval(steps))


class SeamedSAETrainer(PluginSAETrainer):
    """SAELens' `SAETrainer` whose training step has three seams: `count_firing` (the per-latent
    firing counts of the batch, before they update the dead-latent statistics), `before_clip`
    (after the backward pass, before the grad-norm clip) and `clip_gradients` (SAELens' clip at
    norm 1.0). Without overrides it is SAELens' step exactly."""

    def count_firing(self, fired: torch.Tensor) -> torch.Tensor:
        """Per-latent firing counts of this step's batch [d_sae] (float)."""
        return fired

    def before_clip(self) -> None:
        """Called after `loss.backward()`, before the grad-norm clip and the optimiser step."""

    def clip_gradients(self) -> None:
        """SAELens' grad-norm clip: every gradient scaled by min(1, 1 / (||g|| + 1e-6))."""
        torch.nn.utils.clip_grad_norm_(self.sae.parameters(), 1.0)

    def _train_step(self, sae: TrainingSAE[Any], sae_in: torch.Tensor) -> TrainStepOutput:
        # Copied: SAETrainer._train_step (sae-lens 6.54), with the two seams.
        sae.train()
        with self.autocast_if_enabled:
            output = self.sae.training_forward_pass(
                step_input=TrainStepInput(
                    sae_in=sae_in,
                    dead_neuron_mask=self.dead_neurons,
                    coefficients=self.get_coefficients(),
                    n_training_steps=self.n_training_steps,
                    is_logging_step=self._is_logging_step(),
                ),
            )
            with torch.no_grad():
                acts = output.feature_acts
                if acts.is_sparse:
                    # Sparse codes: counted from their entries, as SAELens' own step does.
                    fired = self.count_firing(acts.bool().float().sum(0).to_dense())
                else:
                    fired = self.count_firing(acts.bool().reshape(-1, acts.shape[-1]).float().sum(0))
                self.n_forward_passes_since_fired += 1
                self.n_forward_passes_since_fired[fired > 0] = 0
                self.act_freq_scores += fired
                self.n_frac_active_samples += self.cfg.train_batch_size_samples

        output.loss.backward()
        self.before_clip()
        self.clip_gradients()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.lr_scheduler.step()
        for scheduler in self.coefficient_schedulers.values():
            scheduler.step()
        return output


def run_language_model_runner(
    runner: LanguageModelSAETrainingRunner,
    make_trainer: Callable[[Any], SAETrainer[Any, Any]],
    finish: Callable[[TrainingSAE[Any], SAETrainer[Any, Any]], None],
    resume: Callable[[SAETrainer[Any, Any], str], None] | None = None,
) -> TrainingSAE[Any]:
    """`LanguageModelSAETrainingRunner.run` (sae-lens 6.54, copied) with three seams: the trainer
    comes from `make_trainer(data_provider)`, `finish(sae, trainer)` replaces the final save, and
    `resume(trainer, resume_from_checkpoint)`, when given, replaces SAELens' three loads of a
    checkpoint (trainer state, SAE weights, store). The runner's own (public)
    `run_trainer_with_interruption_handling` trains."""
    import wandb
    from sae_lens.training.prefetch import PrefetchingIterator

    cfg = runner.cfg
    runner._set_sae_metadata()
    if cfg.logger.log_to_wandb:
        wandb.init(project=cfg.logger.wandb_project, entity=cfg.logger.wandb_entity,
                   config=cfg.to_dict(), name=cfg.logger.run_name, id=cfg.logger.wandb_id)
    data_provider: Any = runner.activations_store
    if cfg.prefetch_llm_batches:
        size = 1 if isinstance(cfg.prefetch_llm_batches, bool) else cfg.prefetch_llm_batches
        data_provider = PrefetchingIterator(iter(runner.activations_store), prefetch=size)
    try:
        trainer = make_trainer(data_provider)
        if cfg.resume_from_checkpoint is not None and resume is not None:
            resume(trainer, cfg.resume_from_checkpoint)
        elif cfg.resume_from_checkpoint is not None:
            trainer.load_trainer_state(cfg.resume_from_checkpoint)
            runner.sae.load_weights_from_checkpoint(cfg.resume_from_checkpoint)
            runner.activations_store.load_from_checkpoint(cfg.resume_from_checkpoint)
        runner._compile_sae_if_needed()
        sae = runner.run_trainer_with_interruption_handling(trainer)
        finish(sae, trainer)
        if cfg.logger.log_to_wandb:
            wandb.finish()
        return sae
    finally:
        if isinstance(data_provider, PrefetchingIterator):
            data_provider.close()


class PluginCacheRunnerBase(CacheActivationsRunner):
    """SAELens' `CacheActivationsRunner` built around a model and store the caller made, with its
    shard layout under a public name."""

    def init_with(self, cfg: CacheActivationsRunnerConfig, model: Any, store: ActivationsStore,
                  extra_columns: tuple[str, ...] = ()) -> None:
        """`CacheActivationsRunner.__init__` (sae-lens 6.54, copied) without loading the model by
        its hub name: `model` and `store` are given; `extra_columns` get the activation
        column's layout."""
        self.cfg = cfg
        self.model = model
        self.activations_store = store
        self.context_size = self._get_sliced_context_size(cfg.context_size, cfg.seqpos_slice)
        array = Array2D(shape=(self.context_size, cfg.d_in), dtype=cfg.dtype)
        features: dict[str, Any] = {cfg.hook_name: array}
        features.update({name: array for name in extra_columns})
        features["token_ids"] = Sequence(Value(dtype="int32"), length=self.context_size)
        self.features = Features(features)

    def _create_shard(self, buffer: tuple[torch.Tensor, torch.Tensor | None]) -> Dataset:
        return self.create_shard(buffer)

    def create_shard(self, buffer: tuple[torch.Tensor, torch.Tensor | None]) -> Dataset:
        """One shard of the cache from a buffer of rows and their token ids (SAELens' layout)."""
        return super()._create_shard(buffer)
