"""Where models and token data come from: the shipped embedded model and stdlib corpus
(`embedded`), or SAELens/TransformerLens names as usual."""

from __future__ import annotations

import math
from typing import Any

from sae_lens.load_model import load_model

EMBEDDED = "embedded"


def load_lm(
    name: str, device: str = "cpu", model_class_name: str = "HookedTransformer",
    model_from_pretrained_kwargs: dict[str, Any] | None = None,
) -> Any:
    """`embedded` gives the shipped model; any other name goes to SAELens' `load_model`
    (TransformerLens names need the model hub)."""
    if name == EMBEDDED:
        from sae_lens_allocation.embedded import load_embedded_model

        return load_embedded_model(device=device)
    return load_model(model_class_name, name, device=device,
                      model_from_pretrained_kwargs=model_from_pretrained_kwargs)


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


def runner_sources(cfg: Any, override_model: Any = None, override_dataset: Any = None) -> tuple[Any, Any]:
    """(model, dataset) overrides for the stock runner: `model_name: embedded` and
    `dataset_path: embedded` resolve to the shipped model and the corpus' train split."""
    model = override_model
    if model is None and cfg.model_name == EMBEDDED:
        model = load_lm(EMBEDDED, device=cfg.llm_device or cfg.device)
    dataset = override_dataset
    if dataset is None and cfg.dataset_path == EMBEDDED:
        if model is None:
            raise ValueError(
                "dataset_path='embedded' is not allowed with this model_name: the stdlib corpus is "
                "tokenized for the embedded model; use model_name: embedded"
            )
        # Enough rows for training plus the shuffle buffer's refills and the in-training evals.
        extra = (cfg.n_batches_in_buffer * cfg.store_batch_size_prompts + 64) * cfg.context_size
        dataset = embedded_tokens(model, "train", cfg.context_size, cfg.training_tokens + extra, cfg.seed)
    return model, dataset


def special_token_ids(model: Any) -> list[int]:
    """BOS, EOS and PAD ids of the model's tokenizer: positions evals and dashboards leave out."""
    tok = model.tokenizer
    ids = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    return sorted(int(i) for i in ids if i is not None)
