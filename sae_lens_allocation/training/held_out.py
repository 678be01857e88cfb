"""Calibration rows that training never reads, for the Mutual/Feature Choice SAEs of a run.

Both runners call `attach_calibration` before training starts: the single runner
(runner.py) for its one SAE, the multi-SAE runner (multi_runner.py) for every SAE at its hook.
Where the rows come from:

- the embedded corpus (`embedded_dataset`, the training rows `runner_sources` built): rows of
  train-split files the run never reads, sampled across documents
  (`embedded.splits.embedded_calibration_tokens`); SAEs with the same calibration settings share them;
- any other dataset, once for all SAEs: enough rows for the largest `calibration_tokens`
  (counted without special tokens unless every SAE keeps them), cut into sequences by the
  store's own tokenisation:
  - a dataset with a length: its last rows. The training stream is untouched, so it does not
    depend on which architectures a run holds (a topk_aux SAE trains on the same rows alone or
    next to a Mutual Choice SAE); `overlaps_training` is true if training reads that far
    (including by wrapping to a second epoch);
  - a dataset without a length (streaming): its first rows, read from the store now so that the
    trainer's stream starts after them; whether it wraps back onto them is unknown (null).

Where neither gives rows, nothing is attached and each SAE calibrates on its training-row
reservoir (recorded as overlapping training). The activations of reserved rows are computed when
the SAEs calibrate (at a checkpoint or the final save), by the store as training computes them:
one LM forward per batch of `store_batch_size_prompts` rows for every hook of the run, shared by
the SAEs that read those rows and dropped once each of them has.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

from sae_lens_allocation.embedded.splits import embedded_calibration_tokens
from sae_lens_allocation.saelens_compat import restart_tokenized_sequences
from sae_lens_allocation.saes.calibration import CalibrationRows

# A batch of token rows -> {hook: activations [rows, positions, d_in]}, positions sliced by the
# store's `seqpos_slice` as training slices them.
HookActivations = Callable[[torch.Tensor], dict[str, torch.Tensor]]


class CalibrationTokens:
    """Token rows reserved for calibration, the document of every position, and what they are
    (`info()`, evaluated when calibrating, since whether training wrapped onto them is known only
    then). `rows(name, ...)` gives SAE `name` its CalibrationRows; the activations of all hooks
    are computed once and kept until every reader in `readers` has taken its rows."""

    def __init__(self, tokens: torch.Tensor, documents: torch.Tensor,
                 info: Callable[[], dict[str, Any]], store: Any, activations: HookActivations,
                 special: list[int]) -> None:
        self.tokens, self.documents, self.info = tokens, documents, info
        self.store, self.activations, self.special = store, activations, special
        self.readers: set[str] = set()
        self._pending: set[str] = set()
        self._acts: list[dict[str, torch.Tensor]] | None = None

    @torch.no_grad()
    def rows(self, name: str, hook: str, n_tokens: int, keep_special: bool) -> CalibrationRows:
        """SAE `name`'s rows at `hook`: special-token positions dropped unless `keep_special`,
        the first `n_tokens` positions kept."""
        if not self._pending:
            self._pending = set(self.readers)
            self._acts = None
        if self._acts is None:
            device = next(self.store.model.parameters()).device
            self._acts = [self.activations(batch.to(device))
                          for batch in self.tokens.split(self.store.store_batch_size_prompts)]
        window = slice(*self.store.seqpos_slice)
        t = self.tokens[:, window].to(self.store.device)
        d = self.documents[:, window].to(self.store.device)
        a = torch.cat([acts[hook].to(self.store.device) for acts in self._acts])
        keep = torch.ones_like(t, dtype=torch.bool)
        if not keep_special:
            keep = ~torch.isin(t, torch.tensor(self.special, device=t.device))
        self._pending.discard(name)
        if not self._pending:
            self._acts = None
        return CalibrationRows(a[keep].float()[:n_tokens], d[keep][:n_tokens],
                               {**self.info(), "special_tokens_excluded": not keep_special})


def _read_tokens(store: Any, n_tokens: int, keep_special: bool,
                 special: list[int]) -> torch.Tensor | None:
    """The store's next token rows (whole batches) holding n_tokens positions, special tokens not
    counted unless keep_special; None if its dataset ends first."""
    batches, kept = [], 0
    window = slice(*store.seqpos_slice)
    while kept < n_tokens:
        try:
            batch = store.get_batch_tokens(raise_at_epoch_end=True).cpu()
        except StopIteration:
            return None
        batches.append(batch)
        w = batch[:, window]
        kept += w.numel() if keep_special else int((~torch.isin(w, torch.tensor(special))).sum())
    return torch.cat(batches)


def _last_rows(store: Any, n_tokens: int, keep_special: bool,
               special: list[int]) -> tuple[torch.Tensor, Callable[[], dict[str, Any]]] | None:
    """Token rows from the dataset's last rows, cut into sequences as the store cuts its own;
    the training stream is left as it is."""
    dataset, length = store.dataset, len(store.dataset)
    per_batch = store.store_batch_size_prompts
    rows = min(length, (n_tokens // (per_batch * store.context_size) + 2) * per_batch)
    while True:
        tail = copy.copy(store)  # the store's tokenisation and slicing, its own position
        tail.dataset = dataset.select(range(length - rows, length))
        tail.n_dataset_processed = 0
        restart_tokenized_sequences(tail)
        tokens = _read_tokens(tail, n_tokens, keep_special, special)
        if tokens is not None:
            break
        if rows == length:
            return None
        rows = min(length, 2 * rows)
    first = length - rows

    def info() -> dict[str, Any]:
        # Training reads the dataset from row 0; it reaches these rows only past row `first`.
        return {"source": "the dataset's last rows", "fold_unit": "sequence",
                "overlaps_training": store.n_dataset_processed >= first,
                "sequences": tokens.shape[0], "first_dataset_row": first, "dataset_rows": length}

    return tokens, info


def _first_rows(store: Any, n_tokens: int, keep_special: bool,
                special: list[int]) -> tuple[torch.Tensor, Callable[[], dict[str, Any]]] | None:
    """Token rows taken from the store before training, so its stream starts after them."""
    tokens = _read_tokens(store, n_tokens, keep_special, special)
    if tokens is None:
        return None
    end = store.n_dataset_processed

    def info() -> dict[str, Any]:
        # Without a length it is unknown whether the stream wraps back onto them.
        return {"source": "dataset rows reserved before training", "overlaps_training": None,
                "fold_unit": "sequence", "sequences": tokens.shape[0],
                "dataset_samples_read_before_training": end}

    return tokens, info


def attach_calibration(saes: Mapping[str, Any], hooks: Mapping[str, str], model: Any, store: Any,
                       activations: HookActivations, context_size: int, training_seed: int,
                       special: list[int], embedded_dataset: Any = None) -> dict[str, CalibrationTokens]:
    """Attach held-out calibration rows (module docstring) to every SAE of `saes` (name -> SAE)
    that takes a calibration source, at its hook `hooks[name]`; returns the reservation each
    SAE reads. `training_seed` is the seed the embedded training rows were built with; `special`
    the token ids calibration leaves out (`tokens.run_special_tokens`)."""
    saes = {n: s for n, s in saes.items() if hasattr(s, "set_calibration_source")}
    if not saes:
        return {}
    reserved: dict[str, CalibrationTokens] = {}
    if embedded_dataset is not None:
        by_settings: dict[tuple[int, int, bool], CalibrationTokens | None] = {}
        for name, sae in saes.items():
            c = sae.cfg
            key = (c.calibration_tokens, c.calibration_seed, c.calibration_include_special_tokens)
            if key not in by_settings:
                found = embedded_calibration_tokens(model, embedded_dataset, context_size, key[0],
                                                    training_seed, key[1], key[2])
                by_settings[key] = None if found is None else CalibrationTokens(
                    found[0], found[1], found[2].copy, store, activations, special)
            if (shared_rows := by_settings[key]) is not None:
                reserved[name] = shared_rows
    else:
        n_tokens = max(s.cfg.calibration_tokens for s in saes.values())
        keep_all = all(s.cfg.calibration_include_special_tokens for s in saes.values())
        sized = hasattr(store.dataset, "__len__") and hasattr(store.dataset, "select")
        found_rows = (_last_rows if sized else _first_rows)(store, n_tokens, keep_all, special)
        if found_rows is None:
            warnings.warn(
                f"the dataset holds fewer than calibration_tokens={n_tokens} tokens besides "
                "training; the export is calibrated on the training-row reservoir instead",
                stacklevel=2,
            )
            return {}
        tokens, info = found_rows
        documents = torch.arange(tokens.shape[0])[:, None].expand_as(tokens)
        shared = CalibrationTokens(tokens, documents, info, store, activations, special)
        reserved = dict.fromkeys(saes, shared)
    for name, source in reserved.items():
        source.readers.add(name)
        c = saes[name].cfg
        saes[name].set_calibration_source(
            lambda t=source, n=name, h=hooks[name], k=c.calibration_tokens,
            keep=c.calibration_include_special_tokens: t.rows(n, h, k, keep))
    return reserved
