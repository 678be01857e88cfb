"""Where models and token data come from: the shipped embedded model and stdlib corpus
(`embedded`), or SAELens/TransformerLens names as usual."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

from sae_lens.load_model import load_model

from sae_lens_allocation.validation import UsageError, one_line

EMBEDDED = "embedded"

# The calibration pool holds at least this many times the calibration tokens and this many files
# (its rows are then sampled), so the rows come from many more documents than a consecutive run.
CALIBRATION_POOL_FACTOR = 8
CALIBRATION_POOL_FILES = 32


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


def runner_sources(cfg: Any, override_model: Any = None, override_dataset: Any = None) -> tuple[Any, Any]:
    """(model, dataset) overrides for the stock runner (`runner_model`, `runner_dataset`):
    `model_name: embedded` and `dataset_path: embedded` resolve to the shipped model and the
    corpus' train split."""
    check_embedded_sources(cfg, override_model, override_dataset)
    model = runner_model(cfg, override_model)
    return model, runner_dataset(cfg, model, override_dataset)


def special_token_ids(model: Any) -> list[int]:
    """BOS, EOS and PAD ids of the model's tokenizer: positions evals and dashboards leave out."""
    tok = model.tokenizer
    ids = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    return sorted(int(i) for i in ids if i is not None)


_FILE_TOKENS: dict[tuple[str, str], list[int]] = {}


def _file_tokens(tokenizer: Any, path: Any) -> list[int]:
    """Token ids of one corpus file, as the corpus stream encodes it (cached per process)."""
    from sae_lens_allocation.embedded.corpus import read_source

    key = (str(tokenizer.name_or_path), str(path))
    if key not in _FILE_TOKENS:
        _FILE_TOKENS[key] = tokenizer([read_source(path)], add_special_tokens=False)["input_ids"][0]
    return _FILE_TOKENS[key]


def embedded_unseen_files(model: Any, training_rows: Any, training_seed: int) -> list[Any]:
    """Train-split files a run trained on `training_rows` never reads, in the run's file order.

    The training rows are the first rows of the split's stream with files in the order shuffled
    by `training_seed` (in any row order, `embedded_training_rows`); the BOS separators inside
    them count the files they finished, so every later file but the next (the one the rows may
    have read in part) is unseen."""
    from sae_lens_allocation.embedded import corpus_files

    bos = model.tokenizer.bos_token_id
    # A slice, not `training_rows["tokens"]`: datasets >= 4 answers a column name with a lazy
    # Column (of tensors when the runner set the torch format), which torch cannot convert.
    body = training_rows.with_format("torch")[:]["tokens"][:, 1:]
    finished = int((body == bos).sum())
    files = corpus_files("train")
    random.Random(training_seed).shuffle(files)
    return files[finished + 1:]


def _file_stream(tokenizer: Any, files: list[Any],
                 enough: Callable[[int, int], bool]) -> tuple[list[int], list[int], int]:
    """The token stream of `files` in order (each file followed by BOS), with the file index of
    every token, read until `enough(tokens, files read)`; returns (stream, documents, files read)."""
    bos = tokenizer.bos_token_id
    stream: list[int] = []
    docs: list[int] = []
    used = 0
    for index, path in enumerate(files):
        if enough(len(stream), used):
            break
        ids = _file_tokens(tokenizer, path)
        stream += [*ids, bos]
        docs += [index] * (len(ids) + 1)
        used += 1
    return stream, docs, used


def _calibration_pool(tokenizer: Any, unseen: list[Any], n_tokens: int) -> tuple[list[int], list[int], int]:
    """The unseen files calibration samples `n_tokens` from: the first ones, until they hold
    CALIBRATION_POOL_FACTOR x n_tokens tokens and CALIBRATION_POOL_FILES files."""
    return _file_stream(tokenizer, unseen, lambda tokens, used: tokens >= CALIBRATION_POOL_FACTOR * n_tokens
                        and used >= CALIBRATION_POOL_FILES)


def _cut_rows(stream: list[int], docs: list[int], context_size: int, bos: int) -> tuple[Any, Any]:
    """Rows as the corpus cuts them: [BOS] + context_size - 1 stream tokens, with the file index
    of every position (the BOS takes its row's first file)."""
    import torch

    n_rows = len(stream) // (context_size - 1)
    cut = n_rows * (context_size - 1)
    rows = torch.tensor(stream[:cut], dtype=torch.long).reshape(n_rows, context_size - 1)
    row_docs = torch.tensor(docs[:cut], dtype=torch.long).reshape(n_rows, context_size - 1)
    rows = torch.cat([torch.full((n_rows, 1), bos), rows], dim=1)
    row_docs = torch.cat([row_docs[:, :1], row_docs], dim=1)
    return rows, row_docs


def embedded_density_tokens(model: Any, training_rows: Any, context_size: int, training_seed: int,
                            calibration_tokens: int, n_tokens: int) -> tuple[Any, dict[str, Any]] | None:
    """Rows of train-split files that neither training (`embedded_unseen_files`) nor the
    calibration pool of `calibration_tokens` tokens reads: the unseen files after that pool, in
    order, cut as the corpus cuts them, until `n_tokens` non-special positions; fewer when the
    split runs out, None when no row is left. Returns (tokens [R, context_size], info)."""
    import torch

    tokenizer = model.tokenizer
    unseen = embedded_unseen_files(model, training_rows, training_seed)
    _, _, pool_files = _calibration_pool(tokenizer, unseen, calibration_tokens)
    special = torch.tensor(special_token_ids(model))
    # 5% more stream than positions: each file's BOS separator is a special token; rows are then
    # cut back to exactly the first n_tokens kept positions' rows.
    stream, docs, used = _file_stream(tokenizer, unseen[pool_files:],
                                      lambda tokens, _: tokens >= 1.05 * n_tokens + context_size)
    if len(stream) < context_size - 1:
        return None
    rows, _ = _cut_rows(stream, docs, context_size, tokenizer.bos_token_id)
    kept = torch.cumsum(rows.shape[1] - torch.isin(rows, special).sum(1), 0)
    rows = rows[: int(torch.searchsorted(kept, n_tokens)) + 1]
    info = {"source": "embedded train split, files neither training nor calibration read",
            "documents": used, "calibration_pool_documents": pool_files, "sequences": int(rows.shape[0]),
            "tokens": int((~torch.isin(rows, special)).sum())}
    return rows, info


def embedded_calibration_tokens(
    model: Any, training_rows: Any, context_size: int, n_tokens: int, training_seed: int,
    sample_seed: int, keep_special: bool,
) -> tuple[Any, Any, dict[str, Any]] | None:
    """Token rows of the corpus' train split that a run trained on `training_rows` (the dataset
    `runner_sources` built with `training_seed` and `context_size`) never reads
    (`embedded_unseen_files`), sampled at random (`sample_seed`) across documents; None when the
    split has no such rows.

    The first unseen files form a pool of CALIBRATION_POOL_FACTOR x n_tokens tokens and at least
    CALIBRATION_POOL_FILES files, cut into rows as the corpus cuts them ([BOS] + context_size - 1
    stream tokens); rows are drawn from it in a random order (seeded) that takes one row of every
    document before a second one, until `n_tokens` positions are kept (special tokens not counted
    unless `keep_special`). Returns (tokens [R, context_size], documents [R, context_size], info);
    documents index files."""
    import torch

    tokenizer = model.tokenizer
    special = torch.tensor(special_token_ids(model))
    unseen = embedded_unseen_files(model, training_rows, training_seed)
    stream, docs, used_files = _calibration_pool(tokenizer, unseen, n_tokens)
    if len(stream) < context_size - 1:
        return None
    rows, row_docs = _cut_rows(stream, docs, context_size, tokenizer.bos_token_id)
    n_rows = rows.shape[0]
    kept = rows.shape[1] - torch.isin(rows, special).sum(1) if not keep_special else torch.full(
        (n_rows,), rows.shape[1])
    # A random order that visits documents round-robin: every document's first drawn row, then
    # every document's second, ... (a row belongs to the file of its first token).
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(sample_seed))
    rank = torch.zeros(n_rows, dtype=torch.long)
    drawn: dict[int, int] = {}
    for i, d in enumerate(row_docs[order, 1].tolist()):
        rank[i] = drawn.get(d, 0)
        drawn[d] = int(rank[i]) + 1
    order = order[torch.sort(rank, stable=True).indices]
    take = int(torch.searchsorted(torch.cumsum(kept[order], 0), n_tokens)) + 1
    chosen = order[:take].sort().values
    info = {
        "source": "embedded train split, files training never read",
        "overlaps_training": False,
        "fold_unit": "document",
        "pool_documents": used_files,
        "unseen_documents": len(unseen),
        "sequences": int(chosen.numel()),
    }
    return rows[chosen], row_docs[chosen], info
