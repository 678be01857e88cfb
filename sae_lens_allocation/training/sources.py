"""Where models and token data come from: the shipped embedded model and stdlib corpus
(`embedded`), or SAELens/TransformerLens names as usual."""

from __future__ import annotations

import math
from typing import Any

from sae_lens.load_model import load_model

from sae_lens_allocation.validation import UsageError, one_line

EMBEDDED = "embedded"


def load_lm(
    name: str, device: str = "cpu", model_class_name: str = "HookedTransformer",
    model_from_pretrained_kwargs: dict[str, Any] | None = None,
    hook_names: list[str] | None = None,
) -> Any:
    """`embedded` gives the shipped model; any other name goes to SAELens' `load_model`
    (TransformerLens names need the model hub). A name that cannot be loaded (unknown, or not
    cached while offline) is a `UsageError`."""
    if name == EMBEDDED:
        from sae_lens_allocation.embedded import load_embedded_model

        return load_embedded_model(device=device)
    try:
        return load_model(model_class_name, name, device=device,
                          model_from_pretrained_kwargs=model_from_pretrained_kwargs,
                          hook_names=hook_names)
    except (OSError, ValueError) as err:
        # TransformerLens: ValueError for an unknown name; huggingface_hub: OSError offline.
        raise UsageError(
            f"cannot load model {name!r} ({model_class_name}): {one_line(err)[:200]}; without the model "
            f"hub use model '{EMBEDDED}' or a model already in the local cache"
        ) from None


def embedded_tokens(model: Any, split: str, context_size: int, n_tokens: int | None, seed: int = 0) -> Any:
    """Pretokenized rows of the stdlib corpus covering about `n_tokens` tokens (all rows of the
    split when None, or when the split holds fewer)."""
    from sae_lens_allocation.embedded import corpus_dataset

    n_rows = None if n_tokens is None else math.ceil(n_tokens / context_size)
    try:
        return corpus_dataset(model, split=split, context_size=context_size, n_rows=n_rows, seed=seed)
    except ValueError:
        # The split is smaller than asked: SAELens then cycles through it (and warns).
        return corpus_dataset(model, split=split, context_size=context_size, seed=seed)


def embedded_training_rows(model: Any, context_size: int, n_tokens: int, seed: int) -> Any:
    """Training rows of the stdlib corpus: `embedded_tokens` of the train split (files in the
    order shuffled by `seed`, rows cut from their stream), then the rows in a random order
    (`seed`). SAELens mixes activations only within its buffer (n_batches_in_buffer x
    store_batch_size_prompts rows, one or two files here); without the row shuffle every
    training batch would come from the one or two files the stream is in, a topical drift that
    slowed convergence (docs/results.md)."""
    import torch
    from datasets import Dataset

    rows = embedded_tokens(model, "train", context_size, n_tokens, seed)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
    return Dataset.from_dict({"tokens": torch.tensor(rows[:]["tokens"])[order].tolist()})


def runner_model(cfg: Any, override_model: Any = None) -> Any:
    """The model for the stock runner: `override_model`, the shipped model for
    `model_name: embedded`, else `cfg.model_name` loaded here, so a name that cannot be loaded is
    one `UsageError`."""
    if override_model is not None:
        return override_model
    return load_lm(cfg.model_name, device=cfg.llm_device or cfg.device,
                   model_class_name=cfg.model_class_name,
                   model_from_pretrained_kwargs=cfg.model_from_pretrained_kwargs,
                   hook_names=config_hook_names(cfg))


def config_hook_names(cfg: Any) -> list[str]:
    """The hooks a runner config reads: `hook_name` (single runner) or every SAE's hook
    (`hook_names`, a name or a mapping, in SAELens' multi-SAE runner config)."""
    if hasattr(cfg, "hook_name"):
        return [cfg.hook_name]
    names = cfg.hook_names
    return [names] if isinstance(names, str) else list(dict.fromkeys(names.values()))


def runner_dataset(cfg: Any, model: Any, override_dataset: Any = None) -> Any:
    """The dataset for the stock runner: `override_dataset`, the corpus' train split for
    `dataset_path: embedded`, else None (SAELens opens `cfg.dataset_path`)."""
    if override_dataset is not None or cfg.dataset_path != EMBEDDED:
        return override_dataset
    # Enough rows for training plus the shuffle buffer's refills and the in-training evals.
    extra = (cfg.n_batches_in_buffer * cfg.store_batch_size_prompts + 64) * cfg.context_size
    return embedded_training_rows(model, cfg.context_size, cfg.training_tokens + extra, cfg.seed)


def check_embedded_sources(cfg: Any, override_model: Any = None, override_dataset: Any = None) -> None:
    if override_model is None and override_dataset is None and cfg.dataset_path == EMBEDDED \
            and cfg.model_name != EMBEDDED:
        raise UsageError(
            "dataset_path='embedded' is not allowed with this model_name: the stdlib corpus is "
            "tokenized for the embedded model; use model_name: embedded"
        )


def check_special_tokens(model: Any, exclude_special_tokens: Any) -> None:
    """`exclude_special_tokens: true` asks the model's tokenizer for the ids; a model without one
    (a `HookedTransformer` built from a config) needs the ids listed, or false."""
    if exclude_special_tokens is True and getattr(model, "tokenizer", None) is None:
        raise UsageError("exclude_special_tokens=True is not allowed: the model has no tokenizer to "
                         "read the ids from; use false or a list of token ids")


def runner_sources(cfg: Any, override_model: Any = None, override_dataset: Any = None) -> tuple[Any, Any]:
    """(model, dataset) overrides for the stock runner (`runner_model`, `runner_dataset`):
    `model_name: embedded` and `dataset_path: embedded` resolve to the shipped model and the
    corpus' train split."""
    check_embedded_sources(cfg, override_model, override_dataset)
    model = runner_model(cfg, override_model)
    return model, runner_dataset(cfg, model, override_dataset)
