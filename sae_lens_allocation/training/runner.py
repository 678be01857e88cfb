"""Training with SAELens' own `LanguageModelSAETrainingRunner`.

`train(cfg)` is `build_runner(cfg).run()`. `build_runner` resolves `model_name: embedded` /
`dataset_path: embedded` to the shipped model and corpus, builds the stock runner, attaches the
runner's activation store as the calibration source of Mutual/Feature Choice SAEs and, when the
SAE architecture needs activation gradients (its config class sets
`needs_activation_gradients = True`, e.g. `gradient_topk`), swaps in a `GradientActivationsStore`
as both the training data and the evaluator's store; SAELens has no store override, and replacing
`runner.activations_store` after construction is what its runner supports.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner
from sae_lens.config import HfDataset
from sae_lens.saes.sae import TrainingSAE

from sae_lens_allocation.training.gradients import GradientActivationsStore, HookedRootModule
from sae_lens_allocation.training.sources import runner_sources


def needs_activation_gradients(cfg: LanguageModelSAERunnerConfig[Any]) -> bool:
    return bool(getattr(cfg.sae, "needs_activation_gradients", False))


def build_runner(
    cfg: LanguageModelSAERunnerConfig[Any] | Mapping[str, Any],
    override_model: HookedRootModule | None = None,
    override_dataset: HfDataset | None = None,
) -> LanguageModelSAETrainingRunner:
    """The stock SAELens runner for `cfg` (a runner config, or a dict for
    `LanguageModelSAERunnerConfig.from_dict`), with the gradient store where needed."""
    if isinstance(cfg, Mapping):
        cfg = LanguageModelSAERunnerConfig.from_dict(dict(cfg))
    if hasattr(cfg.sae, "check_batch_tokens"):
        cfg.sae.check_batch_tokens(cfg.train_batch_size_tokens)
    gradients = needs_activation_gradients(cfg)
    if gradients and cfg.use_cached_activations:
        raise ValueError(
            f"use_cached_activations=True is not allowed for architecture "
            f"{cfg.sae.architecture()!r}: cached activations hold no gradients of the LM loss; "
            "set use_cached_activations=False so the model runs during training"
        )
    # SAELens does not seed the SAE's initialisation; seeding here makes a config reproducible.
    torch.manual_seed(cfg.seed)
    override_model, override_dataset = runner_sources(cfg, override_model, override_dataset)
    runner = LanguageModelSAETrainingRunner(
        cfg, override_dataset=override_dataset, override_model=override_model
    )
    if gradients:
        # Reuse the dataset the stock store already opened rather than loading it again.
        store = GradientActivationsStore.from_config(
            runner.model, cfg, override_dataset=runner.activations_store.dataset
        )
        runner.activations_store = store
        runner.evaluator.activations_store = store
    if hasattr(runner.sae, "set_calibration_source"):
        # The final save calibrates the export on fresh batches from the same stream, which the
        # SAE never trained on (docs/architectures.md).
        runner.sae.set_calibration_source(runner.activations_store.next_batch)
    return runner


def train(
    cfg: LanguageModelSAERunnerConfig[Any] | Mapping[str, Any],
    override_model: HookedRootModule | None = None,
    override_dataset: HfDataset | None = None,
) -> TrainingSAE[Any]:
    """Train with SAELens' runner (`build_runner(...).run()`); returns the trained SAE. The
    export goes to `cfg.output_path` as SAELens writes it."""
    return build_runner(cfg, override_model, override_dataset).run()
