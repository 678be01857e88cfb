"""Training with SAELens' own `LanguageModelSAETrainingRunner`.

`train(cfg)` is `build_runner(cfg).run()`. `build_runner` checks the config before anything
heavy runs (field types and ranges, batch budgets, the resume checkpoint, then the hook: it must
exist in the model and its width must equal `sae.d_in`), resolves `model_name: embedded` /
`dataset_path: embedded` to the shipped model and corpus, builds the runner (SAELens' runner with
clean stops and exact resume, resume.py), attaches calibration rows that training never reads to
Mutual/Feature Choice SAEs (`attach_calibration`) and, when the SAE architecture needs activation
gradients (its config class sets `needs_activation_gradients = True`, e.g. `gradient_topk`),
uses a `GradientActivationsStore` as both the training data and the evaluator's store (reading
the gradients from a gradient cache when `use_cached_activations`, gradient_cache.py). Several
SAEs from one LM pass: multi_runner.py.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch

from sae_lens import LanguageModelSAERunnerConfig
from sae_lens.config import HfDataset
from sae_lens.saes.sae import TrainingSAE

from sae_lens_allocation.training.calibration import CalibrationRows
from sae_lens_allocation.training.gradients import GradientActivationsStore, HookedRootModule
from sae_lens_allocation.training.resume import ResumableActivationsStore, ResumableTrainingRunner
from sae_lens_allocation.training.sources import (
    EMBEDDED,
    check_embedded_sources,
    embedded_calibration_tokens,
    runner_dataset,
    runner_model,
    special_token_ids,
)
from sae_lens_allocation.validation import check_runner_fields, field_error


def needs_activation_gradients(cfg: LanguageModelSAERunnerConfig[Any]) -> bool:
    return bool(getattr(cfg.sae, "needs_activation_gradients", False))


def build_runner(
    cfg: LanguageModelSAERunnerConfig[Any] | Mapping[str, Any],
    override_model: HookedRootModule | None = None,
    override_dataset: HfDataset | None = None,
) -> ResumableTrainingRunner:
    """The runner for `cfg` (a runner config, or a dict for
    `LanguageModelSAERunnerConfig.from_dict`), with the gradient store where needed. Every check
    that can fail on the user's input runs before the runner is built (`UsageError`)."""
    if isinstance(cfg, Mapping):
        check_runner_fields(dict(cfg))
        cfg = LanguageModelSAERunnerConfig.from_dict(dict(cfg))
    check_runner_fields(cfg)
    if hasattr(cfg.sae, "check_batch_tokens"):
        cfg.sae.check_batch_tokens(cfg.train_batch_size_tokens)
    if cfg.resume_from_checkpoint is not None:
        check_resume_checkpoint(cfg)
    gradients = needs_activation_gradients(cfg)
    # SAELens does not seed the SAE's initialisation; seeding here makes a config reproducible.
    torch.manual_seed(cfg.seed)
    check_embedded_sources(cfg, override_model, override_dataset)
    embedded_rows = override_dataset is None and cfg.dataset_path == EMBEDDED
    override_model = runner_model(cfg, override_model)
    if not cfg.use_cached_activations:
        check_hook(override_model, cfg)
    override_dataset = runner_dataset(cfg, override_model, override_dataset)
    runner = ResumableTrainingRunner(
        cfg, override_dataset=override_dataset, override_model=override_model,
        store_class=GradientActivationsStore if gradients else ResumableActivationsStore,
    )
    if hasattr(runner.sae, "set_calibration_source") and not cfg.use_cached_activations:
        attach_calibration(runner, override_dataset if embedded_rows else None)
    # The shuffle order depends on the seed only, not on how many numbers the SAE's init drew:
    # the same seed gives every architecture the same stream, as in the multi runner.
    torch.manual_seed(cfg.seed)
    return runner


def check_hook(model: HookedRootModule, cfg: LanguageModelSAERunnerConfig[Any]) -> None:
    """`hook_name` is a hook point of `model`, `hook_head_index` one of its heads, and the width
    the activation store will read there (one head, or all heads flattened, as SAELens'
    `ActivationsStore.get_activations` does) equals `sae.d_in`. One forward on two tokens."""
    import difflib

    from sae_lens.util import extract_stop_at_layer_from_tlens_hook_name

    hooks = list(getattr(model, "hook_dict", {}))
    if cfg.hook_name not in hooks:
        close = difflib.get_close_matches(cfg.hook_name, hooks, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"e.g. {', '.join(hooks[:3])}"
        raise field_error("hook_name", cfg.hook_name, f"a hook point of {cfg.model_name} ({hint})")
    n_ctx = getattr(getattr(model, "cfg", None), "n_ctx", None)
    if isinstance(n_ctx, int) and cfg.context_size > n_ctx:
        raise field_error("context_size", cfg.context_size, f"at most the model's n_ctx ({n_ctx})")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    tokens = torch.zeros((1, 2), dtype=torch.long, device=device)
    with torch.no_grad():
        _, cache = model.run_with_cache(
            tokens, names_filter=[cfg.hook_name], prepend_bos=False,
            stop_at_layer=extract_stop_at_layer_from_tlens_hook_name(cfg.hook_name),
            **cfg.model_kwargs,
        )
    acts = cache[cfg.hook_name]
    if cfg.hook_head_index is not None:
        if acts.ndim < 4 or cfg.hook_head_index >= acts.shape[2]:
            heads = acts.shape[2] if acts.ndim >= 4 else 0
            raise field_error("hook_head_index", cfg.hook_head_index,
                              f"a head of {cfg.hook_name!r}, which has {heads} heads")
        acts = acts[:, :, cfg.hook_head_index]
    width = acts[0, 0].numel()
    if width != cfg.sae.d_in:
        raise field_error("sae.d_in", cfg.sae.d_in,
                          f"the width of hook {cfg.hook_name!r} in {cfg.model_name}, which is {width}")


def check_resume_checkpoint(cfg: LanguageModelSAERunnerConfig[Any]) -> None:
    """`resume_from_checkpoint` is a complete training checkpoint of the same SAE shape."""
    from pathlib import Path

    from sae_lens.constants import TRAINER_STATE_FILENAME

    from sae_lens_allocation.loading import check_sae_weights, read_sae_cfg

    path = Path(cfg.resume_from_checkpoint)  # type: ignore[arg-type]
    if not path.is_dir():
        raise field_error("resume_from_checkpoint", str(path), "an existing checkpoint folder")
    saved = read_sae_cfg(path)
    if not (path / TRAINER_STATE_FILENAME).is_file():
        raise field_error("resume_from_checkpoint", str(path),
                          f"a training checkpoint (it has no {TRAINER_STATE_FILENAME}); an export "
                          "cannot be resumed")
    check_sae_weights(path, saved)
    for name, want in (("architecture", cfg.sae.architecture()), ("d_in", cfg.sae.d_in),
                       ("d_sae", cfg.sae.d_sae)):
        if saved.get(name) != want:
            raise field_error("resume_from_checkpoint", str(path),
                              f"a checkpoint of this SAE; it has {name}={saved.get(name)!r}, the "
                              f"config says {want!r}")


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


def attach_calibration(runner: ResumableTrainingRunner, embedded_dataset: Any = None) -> None:
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
