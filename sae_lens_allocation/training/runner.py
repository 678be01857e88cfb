"""Training with the plugin's `ResumableTrainingRunner`, a subclass of SAELens'
`LanguageModelSAETrainingRunner`.

`train(cfg)` is `build_runner(cfg).run()`. `build_runner` checks the config before anything
heavy runs (field types and ranges, batch budgets, the resume checkpoint, then the hook: it must
exist in the model and its width must equal `sae.d_in`), resolves `model_name: embedded` /
`dataset_path: embedded` to the shipped model and corpus, builds the runner (SAELens' runner with
clean stops and exact resume, resume.py), attaches calibration rows that training never reads to
Mutual/Feature Choice SAEs (held_out.py) and, when the SAE architecture needs activation
gradients (its config class sets `needs_activation_gradients = True`, e.g. `gradient_topk`),
uses a `GradientActivationsStore` as both the training data and the evaluator's store (reading
the gradients from a gradient cache when `use_cached_activations`, gradient_cache.py). Several
SAEs from one LM pass: multi_runner.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from sae_lens import LanguageModelSAERunnerConfig
from sae_lens.config import HfDataset
from sae_lens.saes.sae import TrainingSAE

from sae_lens_allocation.tokens import run_special_tokens
from sae_lens_allocation.training.gradients import GradientActivationsStore, HookedRootModule
from sae_lens_allocation.training.held_out import attach_calibration
from sae_lens_allocation.training.output_lock import check_output_paths
from sae_lens_allocation.training.provenance import resume_changes
from sae_lens_allocation.training.resume import (
    ResumableActivationsStore,
    ResumableTrainingRunner,
    sharded_checkpoint_rank,
)
from sae_lens_allocation.training.sources import (
    EMBEDDED,
    check_embedded_sources,
    check_special_tokens,
    runner_dataset,
    runner_model,
)
from sae_lens_allocation.validation import check_runner_fields, field_error


def needs_activation_gradients(cfg: LanguageModelSAERunnerConfig[Any]) -> bool:
    return bool(getattr(cfg.sae, "needs_activation_gradients", False))


def check_latent_shards(shards: int) -> None:
    """`latent_shards` S > 1 needs W = WORLD_SIZE a multiple of S (torchrun starts the W
    ranks; latent_shard_runner.py trains them): refused in one line, never trained unsharded."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if shards != 1 and world % shards:
        raise field_error(
            "sae.latent_shards", shards,
            f"a divisor of the number of processes ({world}; torchrun --nproc-per-node W)",
        )


def build_runner(
    cfg: LanguageModelSAERunnerConfig[Any] | Mapping[str, Any],
    override_model: HookedRootModule | None = None,
    override_dataset: HfDataset | None = None,
    make_sae: Callable[[], TrainingSAE[Any]] | None = None,
) -> ResumableTrainingRunner:
    """The runner for `cfg` (a runner config, or a dict for
    `LanguageModelSAERunnerConfig.from_dict`), with the gradient store where needed. Every check
    that can fail on the user's input runs before the runner is built (`UsageError`).
    `make_sae()`, when given, builds the SAE in place of SAELens' runner, at the same point
    (after `torch.manual_seed(cfg.seed)`): a latent-sharded run's shard."""
    if isinstance(cfg, Mapping):
        check_runner_fields(dict(cfg), dataset_given=override_dataset is not None)
        cfg = LanguageModelSAERunnerConfig.from_dict(dict(cfg))
    check_runner_fields(cfg, dataset_given=override_dataset is not None)
    check_output_paths([("output_path", cfg.output_path), ("checkpoint_path", cfg.checkpoint_path)])
    if hasattr(cfg.sae, "check_batch_tokens"):
        cfg.sae.check_batch_tokens(cfg.train_batch_size_tokens)
    check_latent_shards(getattr(cfg.sae, "latent_shards", 1))
    changed = check_resume_checkpoint(cfg) if cfg.resume_from_checkpoint is not None else {}
    gradients = needs_activation_gradients(cfg)
    # SAELens does not seed the SAE's initialisation; seeding here makes a config reproducible.
    torch.manual_seed(cfg.seed)
    check_embedded_sources(cfg, override_model, override_dataset)
    embedded_rows = override_dataset is None and cfg.dataset_path == EMBEDDED
    override_model = runner_model(cfg, override_model)
    if not cfg.use_cached_activations:
        check_hook(override_model, cfg)
    check_special_tokens(override_model, cfg.exclude_special_tokens)
    override_dataset = runner_dataset(cfg, override_model, override_dataset)
    runner = ResumableTrainingRunner(
        cfg, override_dataset=override_dataset, override_model=override_model,
        override_sae=None if make_sae is None else make_sae(),
        store_class=GradientActivationsStore if gradients else ResumableActivationsStore,
    )
    runner.resume_changed = changed
    ids, source = run_special_tokens(runner.model, cfg.exclude_special_tokens)
    runner.special_tokens = {"ids": ids, "source": source}
    if not cfg.use_cached_activations:
        store = runner.activations_store
        reserved = attach_calibration(
            {"sae": runner.sae}, {"sae": cfg.hook_name}, runner.model, store,
            lambda batch: {cfg.hook_name: store.get_activations(batch)},
            cfg.context_size, cfg.seed, ids, override_dataset if embedded_rows else None)
        runner.calibration_tokens = reserved.get("sae")
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


def check_resume_checkpoint(cfg: LanguageModelSAERunnerConfig[Any]) -> dict[str, dict[str, Any]]:
    """`resume_from_checkpoint` is a complete training checkpoint of the same SAE shape, and
    `cfg` changes only what a resume may change (provenance.resume_changes); returns those
    changes."""
    from pathlib import Path

    from sae_lens.constants import TRAINER_STATE_FILENAME

    from sae_lens_allocation.loading import check_sae_weights, read_sae_cfg

    path = Path(cfg.resume_from_checkpoint)
    if not path.is_dir():
        raise field_error("resume_from_checkpoint", str(path), "an existing checkpoint folder")
    saved = read_sae_cfg(path)
    # A latent-sharded checkpoint keeps shard 0's trainer state and weights in rank 0's folder.
    shard = sharded_checkpoint_rank(path, 0, getattr(cfg.sae, "latent_shards", 1))
    if not (shard / TRAINER_STATE_FILENAME).is_file():
        raise field_error("resume_from_checkpoint", str(path),
                          f"a training checkpoint (it has no {TRAINER_STATE_FILENAME}); an export "
                          "cannot be resumed")
    check_sae_weights(shard, saved if shard == path else read_sae_cfg(shard))
    for name, want in (("architecture", cfg.sae.architecture()), ("d_in", cfg.sae.d_in),
                       ("d_sae", cfg.sae.d_sae)):
        if saved.get(name) != want:
            raise field_error("resume_from_checkpoint", str(path),
                              f"a checkpoint of this SAE; it has {name}={saved.get(name)!r}, the "
                              f"config says {want!r}")
    trained = torch.load(shard / TRAINER_STATE_FILENAME, map_location="cpu")["n_training_samples"]
    return resume_changes(cfg, path, int(trained))


def train(
    cfg: LanguageModelSAERunnerConfig[Any] | Mapping[str, Any],
    override_model: HookedRootModule | None = None,
    override_dataset: HfDataset | None = None,
) -> TrainingSAE[Any]:
    """Train with SAELens' runner (`build_runner(...).run()`); returns the trained SAE. The
    export goes to `cfg.output_path` (SAELens' default `output`, relative to the current
    folder) as SAELens writes it, with the run's provenance in its metadata (provenance.py);
    the run holds a lock on `output_path` and `checkpoint_path` (output_lock.py)."""
    return build_runner(cfg, override_model, override_dataset).run()
