"""Inference thresholds for batch-allocation SAEs (project definition, algorithms.md).

Allocation across a batch cannot run on one token, so Mutual Choice and Feature Choice SAEs export
to SAELens `jumprelu`: f_j = relu(z_j) * [z_j > theta_j]. The thresholds are calibrated, not
guessed: run the trained SAE over calibration activations (N_cal tokens) and choose theta so the
exported SAE reproduces the training allocation on them:

- Mutual Choice, one global theta: exactly M = floor(k * N_cal) entries of z exceed it, so the
  mean L0 is k. theta = midpoint of the M-th and (M+1)-th largest relu(z).
- Feature Choice, one theta_j per latent: latent j fires on c_j = round(q_j * N_cal) tokens,
  q_j = m_j / N its training firing fraction. theta_j = midpoint of the c_j-th and (c_j+1)-th
  largest z_j (so it is the (1 - q_j) quantile of z_j).

Thresholds are clamped at 0 (relu already zeroes negatives) and at the dtype's largest finite
value where a latent must never fire (c_j = 0), so the export stays a valid safetensors file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch

# Latents whose calibration target exceeds this many tokens keep their whole column of z instead
# of a running top-c list (only the most frequent Zipf ranks; bounded memory for the rest).
_TOPC_CAP = 256


def _midpoint_below(sorted_desc: torch.Tensor, count: torch.Tensor, dim: int) -> torch.Tensor:
    """Midpoint between the count-th and (count+1)-th largest values along `dim` (1-based count).

    count == 0 gives +inf (nothing may pass); count >= length gives -inf (everything passes)."""
    n = sorted_desc.shape[dim]
    count = count.long()
    padded = torch.cat(
        [
            torch.full_like(sorted_desc.narrow(dim, 0, 1), float("inf")),
            sorted_desc,
            torch.full_like(sorted_desc.narrow(dim, 0, 1), float("-inf")),
        ],
        dim=dim,
    )
    idx = count.clamp(0, n)
    upper = padded.gather(dim, idx.unsqueeze(dim)).squeeze(dim)
    lower = padded.gather(dim, (idx + 1).unsqueeze(dim)).squeeze(dim)
    mid = (upper.double() + lower.double()) / 2
    mid = torch.where(torch.isinf(upper), upper.double(), mid)
    mid = torch.where(torch.isinf(lower), lower.double(), mid)
    return mid


def _finalise(theta: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    big = torch.finfo(dtype).max
    return theta.clamp(min=0.0).nan_to_num(posinf=big).clamp(max=big).to(dtype)


def _gather(chunks: Iterable[torch.Tensor]) -> tuple[list[torch.Tensor], int]:
    gathered = [z.detach().reshape(-1, z.shape[-1]) for z in chunks]
    return gathered, sum(z.shape[0] for z in gathered)


def global_threshold(
    hidden_pre_chunks: Iterable[torch.Tensor],
    k: float,
    dtype: torch.dtype = torch.float32,
    max_tokens: int | None = None,
) -> tuple[torch.Tensor, int]:
    """Mutual Choice threshold over all chunks of z (each [n_i, F]); returns (theta, N_cal).

    With `max_tokens` (an upper bound on N_cal) it streams: only the M_max+1 largest relu(z) seen
    so far are kept, M_max = floor(k * max_tokens) >= M, so nothing that could be among the final
    M+1 largest is ever dropped. Without it the chunks are gathered first."""
    if max_tokens is None:
        hidden_pre_chunks, max_tokens = _gather(hidden_pre_chunks)
    bound = int(k * max_tokens) + 1
    kept: torch.Tensor | None = None
    n_tokens = 0
    for z in hidden_pre_chunks:
        z = z.detach().reshape(-1, z.shape[-1])
        n_tokens += z.shape[0]
        flat = z.relu().float().reshape(-1)
        if kept is not None:
            flat = torch.cat([kept, flat])
        kept = torch.topk(flat, bound, sorted=False).values if flat.numel() > bound else flat
    if kept is None or n_tokens == 0:
        raise ValueError("calibration needs at least one token of activations")
    top = torch.sort(kept, descending=True).values.unsqueeze(1)
    m = torch.tensor([int(k * n_tokens)], device=top.device)
    return _finalise(_midpoint_below(top, m, dim=0).squeeze(0), dtype), n_tokens


def per_latent_thresholds(
    hidden_pre_chunks: Iterable[torch.Tensor],
    fractions: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    max_tokens: int | None = None,
) -> tuple[torch.Tensor, int]:
    """Feature Choice thresholds: theta_j with round(q_j * N_cal) tokens above it; returns
    (theta [F], N_cal). `fractions` are q_j in [0, 1].

    With `max_tokens` (an upper bound on N_cal) it streams: a running top-c list per latent,
    c = max_j round(q_j * max_tokens) + 1, except latents whose c_j exceeds a cap keep their whole
    column (only the most frequent Zipf ranks). Without it the chunks are gathered first."""
    if max_tokens is None:
        hidden_pre_chunks, max_tokens = _gather(hidden_pre_chunks)
    bound = (fractions.double() * max_tokens).round().long() + 1
    big = bound > _TOPC_CAP
    small_idx = (~big).nonzero().squeeze(1)
    big_idx = big.nonzero().squeeze(1)
    c_small = int(bound[small_idx].max()) if small_idx.numel() else 0
    top_small: torch.Tensor | None = None
    big_cols: list[torch.Tensor] = []
    n_tokens = 0
    for z in hidden_pre_chunks:
        z = z.detach().reshape(-1, z.shape[-1]).float()
        n_tokens += z.shape[0]
        if small_idx.numel():
            cand = z.index_select(1, small_idx.to(z.device))
            if top_small is not None:
                cand = torch.cat([top_small, cand])
            top_small = torch.topk(cand, min(c_small, cand.shape[0]), dim=0).values
        if big_idx.numel():
            big_cols.append(z.index_select(1, big_idx.to(z.device)))
    if n_tokens == 0:
        raise ValueError("calibration needs at least one token of activations")
    counts = (fractions.double() * n_tokens).round().long().clamp(0, n_tokens)
    device = top_small.device if top_small is not None else big_cols[0].device
    counts = counts.to(device)
    theta = torch.empty(fractions.numel(), dtype=torch.float64, device=device)
    if top_small is not None:
        top_small = torch.sort(top_small, dim=0, descending=True).values
        small = small_idx.to(device)
        theta[small] = _midpoint_below(top_small, counts[small], 0)
    if big_cols:
        cols = torch.sort(torch.cat(big_cols), dim=0, descending=True).values
        bigs = big_idx.to(device)
        theta[bigs] = _midpoint_below(cols, counts[bigs], 0)
    return _finalise(theta, dtype), n_tokens


def iter_rows(
    source: torch.Tensor | Iterable[torch.Tensor] | Callable[[], torch.Tensor],
    n_tokens: int,
    chunk_size: int,
) -> Iterator[torch.Tensor]:
    """Yield [<=chunk_size, d] chunks of activation rows, n_tokens rows in all (fewer if a finite
    source runs out). `source` is a tensor (any leading dims), an iterable of batches, or a
    callable returning the next batch (e.g. an ActivationsStore's `next_batch`)."""
    if isinstance(source, torch.Tensor):
        batches: Iterable[torch.Tensor] = [source]
    elif callable(source):
        batches = iter(source, None)
    else:
        batches = source
    remaining = n_tokens
    for batch in batches:
        rows = batch.reshape(-1, batch.shape[-1])
        for start in range(0, rows.shape[0], chunk_size):
            if remaining <= 0:
                return
            chunk = rows[start : start + min(chunk_size, remaining)]
            remaining -= chunk.shape[0]
            yield chunk
        if remaining <= 0:
            return
