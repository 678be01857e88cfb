"""Training with SAELens' own `LanguageModelSAETrainingRunner`.

`train(cfg)` is `build_runner(cfg).run()`. `build_runner` resolves `model_name: embedded` /
`dataset_path: embedded` to the shipped model and corpus, builds the stock runner, attaches
calibration rows that training never reads to Mutual/Feature Choice SAEs (`attach_calibration`)
and, when the
SAE architecture needs activation gradients (its config class sets
`needs_activation_gradients = True`, e.g. `gradient_topk`), swaps in a `GradientActivationsStore`
as both the training data and the evaluator's store; SAELens has no store override, and replacing
`runner.activations_store` after construction is what its runner supports.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch

from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner
from sae_lens.config import HfDataset
from sae_lens.saes.sae import TrainingSAE
from transformer_lens.hook_points import HookedRootModule

from sae_lens_allocation.training.calibration import CalibrationRows
from sae_lens_allocation.training.gradients import GradientActivationsStore
from sae_lens_allocation.training.sources import (
    EMBEDDED,
    embedded_calibration_tokens,
    runner_sources,
    special_token_ids,
)


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
    embedded_rows = override_dataset is None and cfg.dataset_path == EMBEDDED
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
    if hasattr(runner.sae, "set_calibration_source") and not cfg.use_cached_activations:
        attach_calibration(runner, override_dataset if embedded_rows else None)
    return runner


@torch.no_grad()
def _activation_rows(store: Any, tokens: torch.Tensor, documents: torch.Tensor, special: list[int],
                     keep_special: bool, n_tokens: int, info: dict[str, Any]) -> CalibrationRows:
    """Activations of token rows at the store's hook (its own `get_activations`, as training
    computes them), special-token positions dropped unless `keep_special`, first n_tokens kept."""
    window = slice(*store.seqpos_slice)
    model_device = next(store.model.parameters()).device
    acts, docs = [], []
    for batch, batch_docs in zip(tokens.split(store.store_batch_size_prompts),
                                 documents.split(store.store_batch_size_prompts)):
        a = store.get_activations(batch.to(model_device)).to(store.device)
        t, d = batch[:, window].to(store.device), batch_docs[:, window].to(store.device)
        keep = torch.ones_like(t, dtype=torch.bool)
        if not keep_special:
            keep = ~torch.isin(t, torch.tensor(special, device=t.device))
        acts.append(a[keep].float())
        docs.append(d[keep])
    info = {**info, "special_tokens_excluded": not keep_special}
    return CalibrationRows(torch.cat(acts)[:n_tokens], torch.cat(docs)[:n_tokens], info)


def attach_calibration(runner: LanguageModelSAETrainingRunner, embedded_dataset: Any = None) -> None:
    """Give the runner's Mutual/Feature Choice SAE calibration rows that training never reads
    (`calibration_tokens` positions, special tokens excluded unless
    `calibration_include_special_tokens`); their activations are computed when calibrating.

    - `embedded_dataset` (the training rows `runner_sources` built from the embedded corpus):
      rows of train-split files the run never reads, sampled across documents
      (`sources.embedded_calibration_tokens`).
    - otherwise: the dataset's first rows, taken from the runner's store now, before training, so
      the trainer's stream starts after them; overlaps_training is true if the store later wraps
      past the end of the dataset back onto them, unknown for a dataset without a length.
    Where neither gives rows, nothing is attached and the SAE's training-row reservoir is used
    (recorded as overlapping training)."""
    sae, store, cfg = runner.sae, runner.activations_store, runner.cfg
    n_tokens = sae.cfg.calibration_tokens
    keep = sae.cfg.calibration_include_special_tokens
    special = special_token_ids(runner.model)
    if embedded_dataset is not None:
        found = embedded_calibration_tokens(runner.model, embedded_dataset, cfg.context_size, n_tokens,
                                            sae.cfg.calibration_seed, keep)
        if found is None:
            return
        tokens, documents, info = found
        sae.set_calibration_source(
            lambda: _activation_rows(store, tokens, documents, special, keep, n_tokens, info))
        return
    start = store.n_dataset_processed
    batches, kept = [], 0
    window = slice(*store.seqpos_slice)
    while kept < n_tokens:
        try:
            batch = store.get_batch_tokens(raise_at_epoch_end=True).cpu()
        except StopIteration:
            warnings.warn(
                f"the dataset holds fewer than calibration_tokens={n_tokens} tokens besides "
                "training; the export is calibrated on the training-row reservoir instead",
                stacklevel=2,
            )
            return
        batches.append(batch)
        w = batch[:, window]
        kept += w.numel() if keep else int((~torch.isin(w, torch.tensor(special))).sum())
    tokens = torch.cat(batches)
    end = store.n_dataset_processed
    length = len(store.dataset) if hasattr(store.dataset, "__len__") else None

    def rows() -> CalibrationRows:
        # The trainer reads from `end` on; it reaches the reserved rows again only by wrapping.
        wrapped = None if length is None else store.n_dataset_processed - length > start
        info = {"source": "dataset rows reserved before training", "overlaps_training": wrapped,
                "fold_unit": "sequence", "sequences": tokens.shape[0],
                "dataset_samples_read_before_training": end}
        documents = torch.arange(tokens.shape[0])[:, None].expand_as(tokens)
        return _activation_rows(store, tokens, documents, special, keep, n_tokens, info)

    sae.set_calibration_source(rows)


def train(
    cfg: LanguageModelSAERunnerConfig[Any] | Mapping[str, Any],
    override_model: HookedRootModule | None = None,
    override_dataset: HfDataset | None = None,
) -> TrainingSAE[Any]:
    """Train with SAELens' runner (`build_runner(...).run()`); returns the trained SAE. The
    export goes to `cfg.output_path` as SAELens writes it."""
    return build_runner(cfg, override_model, override_dataset).run()
