"""Special tokens: the positions evaluations, calibration and dashboards leave out."""

from __future__ import annotations

from typing import Any

import torch


def special_token_ids(model: Any) -> list[int]:
    """BOS, EOS and PAD ids of the model's tokenizer; none for a model without a tokenizer (a
    `HookedTransformer` built from a config, fed pretokenized rows)."""
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return []
    ids = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    return sorted(int(i) for i in ids if i is not None)


def run_special_tokens(model: Any, exclude_special_tokens: Any = False) -> tuple[list[int], str]:
    """The special token ids a training run leaves out of calibration, and where they came from
    (recorded in the export's metadata): the runner config's `exclude_special_tokens` when it is
    a list of ids ("config"), else the model's tokenizer ("tokenizer"), else none ("none": a
    model without a tokenizer and no ids in the config)."""
    if isinstance(exclude_special_tokens, (list, tuple)):
        return sorted({int(i) for i in exclude_special_tokens}), "config"
    if getattr(model, "tokenizer", None) is not None:
        return special_token_ids(model), "tokenizer"
    return [], "none"


def keep_mask(tokens: torch.Tensor, special_ids: list[int]) -> torch.Tensor:
    """True where a token is not one of `special_ids` (BOS/EOS/PAD): the positions evaluations score."""
    keep = torch.ones_like(tokens, dtype=torch.bool)
    for t in special_ids:
        keep &= tokens != t
    return keep
