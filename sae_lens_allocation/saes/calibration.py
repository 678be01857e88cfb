"""Inference thresholds for batch-allocation SAEs (project definition,
docs/architectures.md#export-thresholds).

Allocation across a batch cannot run on one token, so Mutual Choice and Feature Choice SAEs export
to SAELens `jumprelu`: f_j = relu(z_j) * [z_j > theta_j]. The thresholds are calibrated on N
calibration rows of activations (rows training never saw, drawn across documents; the caller
chooses them) so the export keeps the training sparsity budget on unseen rows:

- Mutual Choice, one global theta: exactly M = floor(k N) entries of z exceed it, so the mean L0 on
  the calibration rows is k. theta = midpoint of the M-th and (M+1)-th largest relu(z).
- Feature Choice, one theta_j per latent, a cross-fitted quantile. Latent j fires on a fraction
  q_j = E[m_j] / N_train of training tokens, so theta_j is the (1 - a q_j) quantile of z_j:
  theta_j(a) = midpoint of the c_j-th and (c_j+1)-th largest z_j, c_j = round(a q_j N).
  A per-latent quantile near q_j ~ 1/64 estimated from a finite sample of bursty documents fires
  more on new documents than on its own sample (a latent whose documents are missing gets a
  threshold inside its noise), so a = 1 overshoots. The level a is cross-fitted: the rows are split
  into K folds by document; for fold i the thresholds are estimated on the other folds and counted
  on fold i; a is the level whose out-of-fold mean L0, sum_i sum_j #{t in fold i: z_tj >
  theta_j^(-i)(a)} / N, equals the target sum_j q_j (= k). The exported thresholds are theta_j(a)
  on all N rows.

- Mutual Choice with a per-latent floor of m tokens: theta_j = min(theta, phi_j), phi_j the
  Feature Choice threshold of the floor (q_j = m / N_train), theta the Mutual Choice threshold
  of the entries not above their phi_j (`floored_mutual_choice_thresholds`).

Latent shards (docs/distributed.md#latent-sharding; `shards`, a `BatchGroup`, gives the latent
group of a sharded SAE; one shard by default): `z_block` covers this shard's latents and every
rule is computed over all F latents. Mutual Choice: each fold's M+1 largest relu(z) over F are the
M+1 largest of the union of every shard's M+1 largest (the argument that lets blocks of latents
be merged one after the other), so each shard's per-fold lists are gathered over the latent group
and cut to M+1: the same multisets of values, hence the same theta. Feature Choice: theta_j(a)
depends on latent j's column only; the level a is global, so the out-of-fold firings per level
(integer counts) are summed over the shards and the target sum_j q_j is summed over the gathered
q of all F latents in latent order (the same float64 sum as one process). The in-sample and
out-of-fold L0s are summed the same way.

The out-of-fold mean L0 is reported for both rules (for Mutual Choice as a diagnostic: one global
quantile over N F entries has little sampling error). Thresholds are clamped at 0 (relu already
zeroes negatives) and at the dtype's largest finite value where a latent must never fire (c_j = 0),
so the export stays a valid safetensors file. Non-finite calibration rows are refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from sae_lens_allocation.allocation import SINGLE_PROCESS, BatchGroup
from sae_lens_allocation.allocation.transfer import to_device_async

# Cross-fitted quantile levels a: a log grid 1/4 .. 2 with ratio 2^(1/64) (1.1% apart).
LEVELS = 2.0 ** torch.linspace(-2.0, 1.0, 193, dtype=torch.float64)

# z of all calibration rows for the given latents (a long index tensor): [N, len(latents)].
ZBlock = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class CalibrationRows:
    """Activation rows for calibration. `documents[t]` names the document (or the smallest known
    unit: a sequence, a row) that row t came from; folds never split one. `info` says what the
    rows are (source, overlaps_training, special_tokens_excluded, ...) for cfg.metadata."""

    acts: torch.Tensor
    documents: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.acts.ndim != 2 or self.documents.shape != self.acts.shape[:1]:
            raise ValueError(
                f"CalibrationRows needs acts [N, d] and documents [N], got {tuple(self.acts.shape)} "
                f"and {tuple(self.documents.shape)}"
            )
        check_finite(self.acts)


def check_finite(acts: torch.Tensor) -> None:
    """Refuse rows holding NaN or Inf: a threshold computed from them is meaningless (NaN sorts
    above every number, so it silently lowers the thresholds)."""
    finite = torch.isfinite(acts).all(dim=-1)
    # One host read of a flag; the count only on the error path.
    if not bool(finite.all()):
        n_bad = int((~finite).sum())
        raise ValueError(
            f"calibration data has {n_bad} of {acts.shape[0]} rows with NaN or Inf values; "
            "thresholds are not computed from them. Remove those rows (or find where they come "
            "from: a refused training step, an overflow in the model) and calibrate again"
        )


def collect_rows(
    source: torch.Tensor | Iterable[torch.Tensor] | Callable[[], torch.Tensor],
    n_tokens: int,
    documents: torch.Tensor | None = None,
) -> CalibrationRows:
    """The first `n_tokens` rows of `source` as CalibrationRows.

    `source` is a tensor [N, d] or [B, S, d], an iterable of batches, or a callable returning the
    next batch (e.g. an ActivationsStore's `next_batch`). Documents: `documents` when given (one id
    per row of a tensor source), else the sequence of a [B, S, d] tensor, else each row its own."""
    if isinstance(source, torch.Tensor):
        d = source.shape[-1]
        acts = source.reshape(-1, d)[:n_tokens]
        if documents is not None:
            docs, unit = documents.reshape(-1)[:n_tokens], "document"
            if docs.shape[0] != acts.shape[0]:
                raise ValueError(f"documents has {docs.shape[0]} ids for {acts.shape[0]} rows")
        elif source.ndim >= 3:
            per_seq = source.shape[-2]
            docs, unit = torch.arange(acts.shape[0]) // per_seq, "sequence"
        else:
            docs, unit = torch.arange(acts.shape[0]), "row"
        return CalibrationRows(acts, docs.long(), {"fold_unit": unit})
    if documents is not None:
        raise ValueError("documents is only allowed with a tensor source")
    batches: Iterable[torch.Tensor] = iter(source, None) if callable(source) else source
    chunks, total = [], 0
    for batch in batches:
        rows = batch.detach().reshape(-1, batch.shape[-1])[: n_tokens - total]
        chunks.append(rows)
        total += rows.shape[0]
        if total >= n_tokens:
            break
    if not chunks:
        raise ValueError("calibration needs at least one row of activations; the source was empty")
    acts = torch.cat(chunks)
    return CalibrationRows(acts, torch.arange(acts.shape[0]), {"fold_unit": "row"})


def document_folds(documents: torch.Tensor, n_folds: int, seed: int) -> torch.Tensor:
    """Fold index in [0, n_folds) of every row: documents in a random order (seeded), cut into
    n_folds consecutive runs of about N / n_folds rows, so a document lies in one fold."""
    ids, inverse, counts = torch.unique(documents.cpu(), return_inverse=True, return_counts=True)
    if ids.numel() < n_folds:
        raise ValueError(
            f"cross-fitting over {n_folds} folds needs at least {n_folds} documents, the "
            f"calibration rows come from {ids.numel()}; use more rows or fewer calibration_folds"
        )
    order = torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(seed))
    start = torch.cumsum(counts[order], 0) - counts[order]  # rows before each document
    fold_of = torch.empty(ids.numel(), dtype=torch.long)
    fold_of[order] = (start * n_folds) // documents.numel()
    return fold_of[inverse]


def _midpoint_below(sorted_desc: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Midpoint between the count-th and (count+1)-th largest values of each row of
    `sorted_desc` [B, n] (descending), for counts [B, G] (1-based); returns float64 [B, G].

    count == 0 gives +inf (nothing may pass); count >= n gives -inf (everything passes)."""
    n = sorted_desc.shape[1]
    inf = torch.full_like(sorted_desc[:, :1], float("inf"))
    padded = torch.cat([inf, sorted_desc, -inf], dim=1).double()
    idx = count.long().clamp(0, n)
    upper = padded.gather(1, idx)
    lower = padded.gather(1, idx + 1)
    mid = (upper + lower) / 2
    mid = torch.where(torch.isinf(upper), upper, mid)
    return torch.where(torch.isinf(lower), lower, mid)


def finalise(theta: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Clamp at 0 and at the dtype's largest finite value; cast."""
    big = torch.finfo(dtype).max
    return theta.clamp(min=0.0).nan_to_num(posinf=big).clamp(max=big).to(dtype)


def _count_above(sorted_asc: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """#{values > theta} per row: sorted_asc [B, n] ascending, theta [B, G] -> [B, G]."""
    theta = theta.to(sorted_asc.dtype).contiguous()
    return sorted_asc.shape[1] - torch.searchsorted(sorted_asc, theta, right=True)


def _latent_blocks(latents: torch.Tensor, n_rows: int, budget: int) -> list[torch.Tensor]:
    width = max(1, budget // max(n_rows, 1))
    return list(latents.split(width))


def _fold_bounds(folds: torch.Tensor) -> list[tuple[int, int]]:
    """Row ranges of the folds; the rows must be ordered by fold."""
    if folds.numel() == 0:
        raise ValueError("calibration needs at least one row of activations")
    if bool((folds[1:] < folds[:-1]).any()):
        raise ValueError("calibration rows must be ordered by fold (sort them by document_folds)")
    sizes = torch.bincount(folds.cpu()).tolist()
    ends = torch.cumsum(torch.tensor(sizes), 0).tolist()
    return [(e - n, e) for e, n in zip(ends, sizes) if n]


@torch.no_grad()
def mutual_choice_threshold(
    z_block: ZBlock,
    n_latents: int,
    folds: torch.Tensor,
    k: float,
    budget: int,
    dtype: torch.dtype = torch.float32,
    shards: BatchGroup = SINGLE_PROCESS,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """One global theta over N rows (M = floor(k N) entries above it) and its out-of-fold mean L0.

    `z_block(latents)` gives z [N, len(latents)] of all rows, which are ordered by fold (`folds`,
    non-decreasing); blocks are sized so that N x width <= `budget` entries. Per fold the M+1
    largest relu(z) are kept (the M'+1 largest of any union of folds lie in the union of those
    lists, M' <= M; entries not above a full list's minimum are skipped); a second pass counts
    fold i's entries above the threshold computed without fold i."""
    bounds = _fold_bounds(folds)
    n = folds.numel()
    blocks = _latent_blocks(torch.arange(n_latents), n, budget)
    bound = int(k * n) + 1
    kept: list[torch.Tensor] = []
    for latents in blocks:
        z = z_block(latents)
        for i, (a, b) in enumerate(bounds):
            flat = z[a:b].relu().float().reshape(-1)
            if i < len(kept):
                if kept[i].numel() >= bound:
                    flat = flat[flat > kept[i].min()]
                flat = torch.cat([kept[i], flat])
            top = torch.topk(flat, bound, sorted=False).values if flat.numel() > bound else flat
            kept[i:i + 1] = [top]
    if shards.shards > 1:
        # Every fold's M+1 largest over all F latents (module doc: latent shards).
        for i, mine in enumerate(kept):
            union = torch.cat(shards.gather_latent_lists(mine))
            kept[i] = torch.topk(union, bound, sorted=False).values if union.numel() > bound else union

    def theta_over(parts: list[torch.Tensor], rows: int) -> torch.Tensor:
        values = torch.cat(parts)
        m, size = int(k * rows), values.numel()
        # Midpoint of the m-th and (m+1)-th largest (selection, not a sort).
        upper = values.kthvalue(size - m + 1).values.double() if m > 0 else torch.tensor(math.inf)
        lower = values.kthvalue(size - m).values.double() if m < size else torch.tensor(-math.inf)
        mid = upper if math.isinf(upper) else (lower if math.isinf(lower) else (upper + lower) / 2)
        return finalise(torch.as_tensor(mid), dtype)

    theta = theta_over(kept, n)
    oof_theta = [
        theta_over(kept[:i] + kept[i + 1:], n - (b - a)) for i, (a, b) in enumerate(bounds)
    ] if len(bounds) > 1 else []
    fired_oof, fired_in = 0, 0
    for latents in blocks:
        z = z_block(latents)
        fired_in += int((z > theta).sum())
        for (a, b), th in zip(bounds, oof_theta):
            fired_oof += int((z[a:b] > th).sum())
    fired_in, fired_oof = _sum_counts(shards, [fired_in, fired_oof], kept[0].device)
    return theta, {
        "target_l0": float(k),
        "in_sample_l0": fired_in / n,
        "out_of_fold_l0": fired_oof / n if oof_theta else None,
        "folds": len(bounds),
    }


def _sum_counts(shards: BatchGroup, counts: list[int], device: torch.device) -> list[int]:
    """Integer counts summed over the latent shards (the counts themselves with one shard)."""
    if shards.shards == 1:
        return counts
    total = shards.sum_latents(torch.tensor(counts, dtype=torch.long, device=device))
    return [int(c) for c in total.tolist()]


def _order_statistic(desc: torch.Tensor, position: torch.Tensor, count: torch.Tensor,
                     available: int) -> torch.Tensor:
    """The count-th largest of a subset given the subset's positions in `desc` [B, T]
    (`position` [B, G], from searchsorted on the subset's running count): +inf for count 0,
    -inf beyond the subset's `available` values. float64 [B, G]."""
    value = desc.gather(1, position.clamp(max=desc.shape[1] - 1)).double()
    value = torch.where(count <= 0, torch.full_like(value, float("inf")), value)
    return torch.where(count > available, torch.full_like(value, float("-inf")), value)


def _fold_sweep(
    zt: torch.Tensor, folds: torch.Tensor, n_folds: int, q: torch.Tensor, levels: torch.Tensor, top: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One block zt [B, N] (latents x rows) at levels [G]: out-of-fold firings summed over latents
    [G] and the thresholds on all rows [B, G], from the `top` largest z of each latent; None when
    `top` < N turns out too few (then call again with top = N).

    With latent j's rows in descending order of z_j and each row's fold known, the c-th largest
    value outside fold i sits where the running count of rows outside fold i reaches c, and the
    fold-i rows above a threshold are the running count of fold-i rows at the number of rows
    above it."""
    n = zt.shape[1]
    if top < n:
        desc, order = zt.topk(top, dim=1)
    else:
        desc, order = zt.sort(dim=1, descending=True)
    asc = desc.flip(1)
    fold_desc = folds.to(zt.device)[order].to(torch.int32)
    lv, qq = levels.to(zt.device)[None, :], q.to(zt.device)[:, None]
    ranks = torch.arange(1, top + 1, device=zt.device, dtype=torch.int32)
    sizes = torch.bincount(folds.cpu(), minlength=n_folds).tolist()
    fired = torch.zeros(levels.numel(), dtype=torch.float64)
    for i in range(n_folds):
        outside = torch.cumsum(fold_desc != i, dim=1, dtype=torch.int32)  # [B, T]
        n_out = n - sizes[i]
        count = (lv * qq * n_out).round().to(torch.int32).contiguous()
        if top < n and bool((torch.clamp(count + 1, max=n_out) > outside[:, -1:]).any()):
            return None
        upper = _order_statistic(desc, torch.searchsorted(outside, count), count, n_out)
        lower = _order_statistic(desc, torch.searchsorted(outside, count + 1), count + 1, n_out)
        mid = torch.where(torch.isinf(upper), upper, (upper + lower) / 2)
        theta = finalise(torch.where(torch.isinf(lower), lower, mid))
        if top < n and bool((theta < desc[:, -1:]).any()):
            return None  # rows outside the kept top could pass this threshold
        above = top - torch.searchsorted(asc, theta.contiguous(), right=True)  # rows z > theta
        inside = ranks - outside  # fold-i rows among the top
        fired_in = inside.gather(1, (above - 1).clamp(min=0))
        fired += torch.where(above > 0, fired_in, torch.zeros_like(fired_in)).sum(0).double().cpu()
    counts = (lv * qq * n).round().expand(zt.shape[0], -1)
    if top < n and bool((counts + 1 > top).any()):
        return None
    return fired, finalise(_midpoint_below(desc, counts))


@torch.no_grad()
def feature_choice_thresholds(
    z_block: ZBlock,
    fractions: torch.Tensor,
    folds: torch.Tensor,
    budget: int,
    dtype: torch.dtype = torch.float32,
    shards: BatchGroup = SINGLE_PROCESS,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Cross-fitted per-latent thresholds (module docstring): theta_j(a) on all rows, with the
    level a from LEVELS (1/4 .. 2, 1.1% apart) whose exact out-of-fold mean L0 is closest to
    sum_j q_j. `fractions` are q_j in [0, 1]; `folds` [N] the fold of each row. If no level in
    range reaches the target (e.g. too few positive z), the nearest end is used and reported;
    with a single fold there is no cross-fit and the level is 1.

    Latents are processed in blocks of similar q_j; only the largest z of each latent that the
    levels can reach are sorted (all of them for the most frequent latents)."""
    n = folds.numel()
    if n == 0:
        raise ValueError("calibration needs at least one row of activations")
    q = fractions.double()
    # The target over all F latents, summed in latent order (module doc: latent shards).
    target = float(torch.cat(shards.gather_latent_lists(q)).cpu().sum())
    n_folds = int(folds.max()) + 1
    n_out_min = n - int(torch.bincount(folds.cpu()).max())
    levels = LEVELS
    fired = torch.zeros(levels.numel(), dtype=torch.float64)
    theta_all = torch.empty(q.numel(), levels.numel(), dtype=dtype)
    for latents in _latent_blocks(torch.argsort(q, descending=True), n, budget):
        zt = z_block(latents).t().float().contiguous()
        reach = math.ceil(float(levels.max() * q[latents].max()) * n) + 2
        top = min(n, 2 * reach * n // max(n_out_min, 1) + 256)
        result = _fold_sweep(zt, folds, n_folds, q[latents], levels, top)
        if result is None:
            result = _fold_sweep(zt, folds, n_folds, q[latents], levels, n)
        assert result is not None
        fired += result[0]
        theta_all[latents] = result[1].to(dtype).cpu()
    # Integer counts in float64: their sum over the shards is exact.
    fired = shards.sum_latents(fired.to(q.device)).cpu()
    l0 = fired / n
    # One fold has nothing out of it: the plain quantile (level 1, exactly on the grid).
    best = int((l0 - target).abs().argmin()) if n_folds > 1 else int((levels - 1).abs().argmin())
    theta = theta_all[:, best]
    in_sample = 0
    for latents in _latent_blocks(torch.arange(q.numel()), n, budget):
        z = z_block(latents)
        in_sample += int((z > theta[latents].to(z.device, torch.float32)).sum())
    (in_sample,) = _sum_counts(shards, [in_sample], q.device)
    return theta, {
        "target_l0": target,
        "in_sample_l0": in_sample / n,
        "out_of_fold_l0": float(l0[best]) if n_folds > 1 else None,
        "quantile_level": float(levels[best]),
        "folds": n_folds,
    }


@torch.no_grad()
def floored_mutual_choice_thresholds(
    z_block: ZBlock,
    n_latents: int,
    floor_fraction: float,
    folds: torch.Tensor,
    k: float,
    budget: int,
    dtype: torch.dtype = torch.float32,
    shards: BatchGroup = SINGLE_PROCESS,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Thresholds of Mutual Choice with a per-latent floor: theta_j = min(theta, phi_j).

    phi_j, the floor's threshold: the Feature Choice thresholds with q_j = `floor_fraction` =
    m / N_train for every latent (cross-fitted level, `feature_choice_thresholds`). theta, the
    global one: the Mutual Choice threshold (`mutual_choice_threshold`) of z with every entry
    above its phi_j raised to +inf, so the M = floor(k N) entries above it are the floor's
    entries and the largest others: the export's mean L0 on the calibration rows is k, as the
    training rule keeps k N entries per batch of N (the floor's first, then the largest)."""
    floor, floor_stats = feature_choice_thresholds(
        z_block, torch.full((n_latents,), floor_fraction, dtype=torch.float64), folds, budget, dtype,
        shards,
    )
    raised = torch.tensor(float("inf"))

    def rest_block(latents: torch.Tensor) -> torch.Tensor:
        z = z_block(latents)
        phi = floor[latents].to(device=z.device, dtype=z.dtype)
        return torch.where(z > phi, raised.to(z.device, z.dtype), z)

    theta, stats = mutual_choice_threshold(rest_block, n_latents, folds, k, budget, dtype, shards)
    return torch.minimum(theta, floor), {
        **stats,
        "floor_target_l0": floor_stats["target_l0"],
        "floor_out_of_fold_l0": floor_stats["out_of_fold_l0"],
        "floor_quantile_level": floor_stats["quantile_level"],
    }


class RowReservoir:
    """A uniform random sample of `capacity` rows of a stream (Vitter's Algorithm R): the first
    `capacity` rows fill it; row t >= capacity (0-based) replaces slot j ~ U{0..t} when
    j < capacity. Vectorised per batch with the sequential meaning kept (a later row of the batch
    drawing the same slot wins). Its random numbers come from its own generator, so the global
    RNG (which SAELens' mixing buffer uses) is untouched."""

    def __init__(self, capacity: int, seed: int) -> None:
        self.capacity = capacity
        self.rows: torch.Tensor | None = None
        self.seen = 0
        self._generator = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    # Eager under `compile_sae: true`: dynamo would guard on the Python counters and the
    # growing buffer's shape and recompile; no graph needs to see them.
    @torch.compiler.disable
    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().reshape(-1, rows.shape[-1]).float()
        if self.rows is None or self.rows.device != rows.device:
            self.rows = rows.new_empty(0, rows.shape[1])
        free = self.capacity - self.rows.shape[0]
        if free > 0:
            self.rows = torch.cat([self.rows, rows[:free]])
            self.seen += min(free, rows.shape[0])
            rows = rows[free:]
        n = rows.shape[0]
        if n == 0:
            return
        t = torch.arange(self.seen, self.seen + n, dtype=torch.float64)
        slot = (torch.rand(n, generator=self._generator, dtype=torch.float64) * (t + 1)).long()
        self.seen += n
        keep = (slot < self.capacity).nonzero().squeeze(1)
        if keep.numel() == 0:
            return
        slots, inverse = torch.unique(slot[keep], return_inverse=True)
        last = torch.full((slots.numel(),), -1, dtype=torch.long).scatter_reduce(
            0, inverse, keep, reduce="amax"
        )
        # Indices drawn on the host go over without blocking it.
        self.rows[to_device_async(slots, rows.device)] = rows[to_device_async(last, rows.device)]

    def scale_(self, factor: float) -> None:
        if self.rows is not None:
            self.rows *= factor
