"""What a dashboard is computed on: token rows (`load_tokens`) and the latents shown
(`feature_frequencies`, `default_features`), with the dashboard's user-error type.

dashboard.py builds the page from these; they need neither sae-dashboard's runner nor the page
assets (`example_positions` reads only sae-dashboard's default layout).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from sae_lens_allocation.analysis.neuronpedia import hook_layer
from sae_lens_allocation.validation import UsageError

DEFAULT_MINIBATCH_SIZE_TOKENS = 64


class DashboardError(UsageError):
    """A problem with the user's input (SAE folder, model, features, tokens)."""


class Progress:
    """Stage messages on stderr, and tqdm bars, when enabled."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(f"[dashboard] {message}", file=sys.stderr, flush=True)

    def bar(self, total: int, desc: str) -> Any:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=f"[dashboard] {desc}", disable=not self.enabled, file=sys.stderr)


def _token_rows(stream: list[int], context_size: int, n_rows: int, bos: int | None) -> list[list[int]]:
    """Cut a token stream into at most `n_rows` rows: `[BOS] + context_size - 1` stream tokens
    when `bos` is given (SAELens' pretokenisation convention), else `context_size` tokens."""
    body = context_size - 1 if bos is not None else context_size
    rows: list[list[int]] = []
    for start in range(0, len(stream) - body + 1, body):
        if len(rows) == n_rows:
            break
        chunk = stream[start : start + body]
        rows.append([bos, *chunk] if bos is not None else chunk)
    return rows


def load_tokens(
    model: Any,
    dataset: Any,
    n_prompts: int,
    context_size: int,
    seed: int = 0,
) -> tuple[torch.Tensor, str]:
    """Token rows [n_prompts (or fewer), context_size] and a description of their source.

    dataset None: the held-out split of the plugin's local corpus (the stdlib sources). A
    `datasets.Dataset`, a `save_to_disk` folder or a dataset name (streamed): rows with a `tokens`
    or `input_ids` column are taken as token ids as they are (a row of exactly `context_size`
    tokens is kept whole; other lengths are concatenated and re-cut); a `text` column is
    tokenised, with BOS between documents.
    """
    if dataset is None:
        from sae_lens_allocation.embedded import corpus_dataset

        try:
            ds = corpus_dataset(model, split="heldout", context_size=context_size, n_rows=n_prompts, seed=seed)
        except ValueError as err:
            raise DashboardError(str(err)) from err
        return torch.tensor(ds["tokens"], dtype=torch.long), "local corpus (stdlib sources, held-out split)"

    source = str(dataset) if isinstance(dataset, (str, Path)) else type(dataset).__name__
    if isinstance(dataset, (str, Path)):
        path = Path(dataset)
        if path.is_dir():
            from datasets import load_from_disk

            dataset = load_from_disk(str(path))
        else:
            from datasets import load_dataset

            try:
                dataset = load_dataset(str(dataset), split="train", streaming=True)
            except Exception as err:  # the datasets library raises many types; all mean "cannot load"
                raise DashboardError(f"could not load dataset {str(dataset)!r}: {err}") from err
    columns = list(dataset.column_names or next(iter(dataset)).keys())
    token_column = next((c for c in ("tokens", "input_ids") if c in columns), None)
    if token_column is None and "text" not in columns:
        raise DashboardError(
            f"dataset {source} has columns {columns}; it needs a 'tokens' or 'input_ids' column "
            "(pretokenized) or a 'text' column"
        )
    tokenizer = model.tokenizer
    bos = tokenizer.bos_token_id if token_column is None else None
    rows: list[list[int]] = []
    stream: list[int] = []
    for example in dataset:
        if token_column is not None:
            ids = [int(t) for t in example[token_column]]
            if len(ids) == context_size:
                rows.append(ids)
            else:
                stream.extend(ids)
        else:
            stream.extend(tokenizer(example["text"], add_special_tokens=False)["input_ids"])
            if bos is not None:
                stream.append(bos)
        if len(rows) + len(stream) // context_size >= n_prompts:
            break
    rows += _token_rows(stream, context_size, n_prompts - len(rows), bos)
    if not rows:
        raise DashboardError(f"dataset {source} gave no row of {context_size} tokens")
    return torch.tensor(rows, dtype=torch.long), f"dataset {source}"


# --------------------------------------------------------------------------------------------
# Feature selection


def example_positions(context_size: int) -> slice:
    """Token positions sae-dashboard can centre an example sequence on: it shows `buffer` =
    (5, 5) tokens around the bold token plus the one before it, so positions
    buffer[0] + 1 <= t < context_size - buffer[1] of each row."""
    from sae_dashboard.layout import SaeVisLayoutConfig

    before, after = SaeVisLayoutConfig.default_feature_centric_layout().seq_cfg.buffer
    window = slice(before + 1, context_size - after)
    if window.stop <= window.start:
        raise DashboardError(
            f"context_size={context_size} is not allowed; sae-dashboard shows {before} tokens before "
            f"and {after} after each example, so use context_size > {before + after + 1}"
        )
    return window


@torch.inference_mode()
def feature_frequencies(
    sae: Any,
    model: Any,
    tokens: torch.Tensor,
    minibatch_size_tokens: int = DEFAULT_MINIBATCH_SIZE_TOKENS,
    ignore_tokens: Sequence[int] = (),
    progress: Progress | None = None,
) -> torch.Tensor:
    """Firing frequency of every latent on `tokens`: p_j = #{t : f_j(x_t) > 0} / #{t}, over the
    positions t that can centre an example (`example_positions`) and whose token is not in
    `ignore_tokens`; so p_j > 0 exactly when the dashboard has an example to show for j. Also
    checks that the model has the SAE's hook and that its width is the SAE's d_in."""
    hook = sae.cfg.metadata.hook_name
    layer = hook_layer(hook)
    if hook not in model.hook_dict:
        raise DashboardError(f"the model has no hook {hook!r} (the SAE's metadata.hook_name)")
    ignore = torch.tensor(list(ignore_tokens), dtype=tokens.dtype)
    window = example_positions(tokens.shape[1])
    counts = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    n_positions = 0
    batches = tokens.split(minibatch_size_tokens)
    bar = (progress or Progress(False)).bar(len(batches), "firing frequencies")
    for batch in batches:
        _, cache = model.run_with_cache(batch, names_filter=hook, stop_at_layer=layer + 1)
        acts = cache[hook]
        if "hook_z" in hook:
            acts = acts.flatten(-2, -1)
        if acts.shape[-1] != sae.cfg.d_in:
            hint = sae.cfg.metadata.model_name
            raise DashboardError(
                f"the model's {hook} has width {acts.shape[-1]} but the SAE has d_in="
                f"{sae.cfg.d_in}: pass the model the SAE was trained on"
                + (f" (its metadata names {hint!r})" if hint else "")
            )
        keep = ~torch.isin(batch, ignore)
        keep[:, : window.start] = False
        keep[:, window.stop :] = False
        fired = (sae.encode(acts.to(device=sae.device, dtype=sae.dtype)) > 0) & keep.unsqueeze(-1).to(sae.device)
        counts += fired.sum(dim=(0, 1)).double().cpu()
        n_positions += int(keep.sum())
        bar.update(1)
    bar.close()
    return (counts / max(n_positions, 1)).float()


def default_features(
    frequencies: torch.Tensor,
    n_most_active: int = 8,
    n_random: int = 8,
    n_rarest: int = 4,
    seed: int = 0,
) -> list[int]:
    """A useful default selection of latents to show (project definition).

    Over the live latents L = {j : p_j > 0} ordered by firing frequency p_j (ties by index):
    the `n_most_active` most frequent, the `n_rarest` least frequent of the rest, and `n_random`
    drawn uniformly without replacement (torch generator seeded with `seed`) from what remains.
    Returned as [most active (descending p; the page opens on the first), random (ascending
    index), rarest (ascending p)]. Dead latents are never chosen: they have nothing to show.
    Fewer live latents than asked for gives all of them.
    """
    for name, value in (("n_most_active", n_most_active), ("n_random", n_random), ("n_rarest", n_rarest)):
        if not isinstance(value, int) or value < 0:
            raise DashboardError(f"{name}={value!r} is not allowed; use an int >= 0")
    freq = frequencies.detach().float().cpu()
    alive = torch.nonzero(freq > 0).flatten()
    # Stable sort on -p keeps ascending index among equal frequencies.
    by_freq = alive[torch.sort(-freq[alive], stable=True).indices]
    top = by_freq[:n_most_active]
    rest = by_freq[n_most_active:]
    rare = rest.flip(0)[:n_rarest] if n_rarest else rest[:0]
    remaining = rest[: len(rest) - len(rare)]
    g = torch.Generator().manual_seed(seed)
    sample = remaining[torch.randperm(len(remaining), generator=g)[:n_random]].sort().values
    return [int(j) for j in torch.cat([top, sample, rare])]


def check_features(features: Sequence[int], d_sae: int) -> list[int]:
    out = []
    for f in features:
        if isinstance(f, bool) or not isinstance(f, int) or not 0 <= f < d_sae:
            raise DashboardError(f"feature {f!r} is not allowed; features are ints in [0, {d_sae})")
        if f not in out:
            out.append(f)
    if not out:
        raise DashboardError("features=[] is not allowed; pass None for the default selection")
    return out
