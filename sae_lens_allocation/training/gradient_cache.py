"""A cache of activations with their LM-loss gradients, in SAELens' cache format.

SAELens' `CacheActivationsRunner` writes a `datasets` folder with one column per hook,
`<hook_name>`: Array2D(context_size, d_in), plus `token_ids`; `use_cached_activations: true`
then trains from it without running the model. A cache holds no gradients, which Gradient TopK
needs, so `GradientCacheActivationsRunner` subclasses it and adds one column:

    <hook_name>.grad : Array2D(context_size, d_in),  g = dL/dx at the hook

with L the summed next-token cross-entropy of the row's sequence (gradients.py). Each row's
activations and gradients come from the same `GradientActivationsStore.get_raw_llm_batch` call
that trains gradient_topk live, so training from the cache sees the very rows live training
sees. SAELens' machinery does the rest: buffers written as shards, consolidated, optionally
shuffled (whole rows, so a gradient stays with its activation) and pushed to the hub. Any
SAELens SAE can train from the same cache: its loader reads only `<hook_name>` and `token_ids`.

SAELens sizes shards by `buffer_size_gb` of activations; with gradients a shard holds twice that.
`gradients=False` writes a plain SAELens cache (useful for `model_name: embedded`, which
SAELens' own runner cannot load).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import einops
import torch
from datasets import Dataset
from sae_lens.config import CacheActivationsRunnerConfig, HfDataset
from sae_lens.training.activations_store import ActivationsStore

from sae_lens_allocation.saelens_compat import PluginCacheRunnerBase
from sae_lens_allocation.training.gradients import GradientActivationsStore, HookedRootModule, gradient_column
from sae_lens_allocation.training.sources import EMBEDDED, embedded_training_rows, load_lm
from sae_lens_allocation.validation import check_bool_fields, field_error, reject_unknown_keys


class GradientCacheActivationsRunner(PluginCacheRunnerBase):
    """SAELens' `CacheActivationsRunner` that also stores the gradient at the hook.

    `run()` is SAELens' own (shards, consolidation, shuffle, hub upload); this class supplies the
    store (a `GradientActivationsStore`, or SAELens' store with `gradients=False`), the features
    and the shard layout. `model_name: embedded` / `dataset_path: embedded` resolve to the
    shipped model and the corpus' train split.
    """

    def __init__(
        self,
        cfg: CacheActivationsRunnerConfig,
        override_dataset: HfDataset | None = None,
        override_model: HookedRootModule | None = None,
        gradients: bool = True,
    ) -> None:
        if not cfg.n_tokens_in_batch <= cfg.n_tokens_in_buffer <= cfg.training_tokens:
            # SAELens writes whole buffers: a buffer larger than training_tokens repeats the data.
            raise field_error(
                "buffer_size_gb", cfg.buffer_size_gb,
                f"a size whose buffer holds between one LM batch ({cfg.n_tokens_in_batch} tokens, "
                f"{cfg.n_tokens_in_batch * cfg.bytes_per_token / 1e9:.3g} GB) and training_tokens "
                f"({cfg.training_tokens} tokens, {cfg.training_tokens * cfg.bytes_per_token / 1e9:.3g}"
                " GB) of activations; SAELens writes whole buffers",
            )
        self.gradients = gradients
        model = override_model if override_model is not None else load_lm(
            cfg.model_name, device=cfg.device, model_class_name=cfg.model_class_name,
            model_from_pretrained_kwargs=cfg.model_from_pretrained_kwargs,
        )
        if cfg.compile_llm:
            model = torch.compile(model, mode=cfg.llm_compilation_mode)
        if override_dataset is None and cfg.dataset_path == EMBEDDED:
            override_dataset = embedded_training_rows(model, cfg.context_size, cfg.training_tokens, cfg.seed)
        store_class = GradientActivationsStore if gradients else ActivationsStore
        # The arguments of SAELens' cache_activations_runner._mk_activations_store.
        store = store_class(
            model=model,
            dataset=override_dataset if override_dataset is not None else cfg.dataset_path,
            streaming=cfg.streaming,
            hook_name=cfg.hook_name,
            hook_head_index=None,
            context_size=cfg.context_size,
            d_in=cfg.d_in,
            n_batches_in_buffer=cfg.n_batches_in_buffer,
            total_training_tokens=cfg.training_tokens,
            store_batch_size_prompts=cfg.model_batch_size,
            train_batch_size_tokens=-1,
            prepend_bos=cfg.prepend_bos,
            normalize_activations="none",
            device=torch.device("cpu"),  # rows go to disk
            dtype=cfg.dtype,
            cached_activations_path=None,
            model_kwargs=cfg.model_kwargs,
            autocast_lm=cfg.autocast_lm,
            dataset_trust_remote_code=cfg.dataset_trust_remote_code,
            seqpos_slice=cfg.seqpos_slice,
            use_chat_formatting=cfg.use_chat_formatting,
        )
        # SAELens' own __init__ would load the model by its hub name.
        self.init_with(cfg, model, store, (gradient_column(cfg.hook_name),) if gradients else ())

    def create_shard(self, buffer: tuple[torch.Tensor, torch.Tensor | None]) -> Dataset:
        """SAELens' shard layout; rows `[acts | grads]` are split into their two columns."""
        rows, token_ids = buffer
        d_in, hook = self.cfg.d_in, self.cfg.hook_name

        def per_sequence(t: torch.Tensor) -> torch.Tensor:
            return einops.rearrange(
                t, "(bs ctx) d -> bs ctx d", bs=self.cfg.n_seq_in_buffer, ctx=self.context_size
            )

        shard: dict[str, Any] = {hook: per_sequence(rows[:, :d_in])}
        if self.gradients:
            shard[gradient_column(hook)] = per_sequence(rows[:, d_in:])
        if token_ids is not None:
            shard["token_ids"] = einops.rearrange(
                token_ids, "(bs ctx) -> bs ctx", bs=self.cfg.n_seq_in_buffer, ctx=self.context_size
            ).to(torch.int32)
        return Dataset.from_dict(shard, features=self.features)


def cache_config_from_dict(cfg: Mapping[str, Any]) -> tuple[CacheActivationsRunnerConfig, bool]:
    """(`CacheActivationsRunnerConfig`, gradients) from a mapping of its fields plus the plugin's
    `gradients` flag (default true). Unknown keys and missing required fields raise
    `ValueError` naming them."""
    import dataclasses

    cfg = dict(cfg)
    gradients = cfg.pop("gradients", True)
    if not isinstance(gradients, bool):
        raise field_error("gradients", gradients, "true or false")
    fields = {f.name: f for f in dataclasses.fields(CacheActivationsRunnerConfig)}
    reject_unknown_keys(cfg, {"gradients", *fields}, "cache config", error=ValueError)
    check_bool_fields(cfg, CacheActivationsRunnerConfig)
    required = [
        name for name, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [name for name in required if name not in cfg]
    if missing:
        raise ValueError(f"the cache config needs {', '.join(missing)}")
    if "seqpos_slice" in cfg and isinstance(cfg["seqpos_slice"], list):
        cfg["seqpos_slice"] = tuple(cfg["seqpos_slice"])
    return CacheActivationsRunnerConfig(**cfg), gradients


def build_cache(
    cfg: CacheActivationsRunnerConfig | Mapping[str, Any],
    override_model: HookedRootModule | None = None,
    override_dataset: HfDataset | None = None,
    gradients: bool = True,
) -> Dataset:
    """Write the cache to `cfg.new_cached_activations_path` (must be empty) and return it.
    A mapping is read by `cache_config_from_dict`, whose `gradients` key then decides."""
    if isinstance(cfg, Mapping):
        cfg, gradients = cache_config_from_dict(cfg)
    # SAELens refuses a non-empty folder too, but with a bare Exception after loading the model.
    target = Path(str(cfg.new_cached_activations_path))
    if target.exists() and not (target.is_dir() and not any(target.iterdir())):
        what = "a file" if not target.is_dir() else "a folder that is not empty"
        raise field_error("new_cached_activations_path", str(target),
                          f"a new or empty folder; {target} is {what} (choose another path or empty it)")
    runner = GradientCacheActivationsRunner(
        cfg, override_dataset=override_dataset, override_model=override_model, gradients=gradients
    )
    return runner.run()
