"""Exact batch allocation over a batch split across processes (data parallel).

Project definition (docs/distributed.md#what-is-exact). W processes
(ranks) each hold n_r rows of one global batch of N = sum_r n_r rows; local row i of rank r is
global row o_r + i, o_r = sum_{s<r} n_s (rank-major order). The rules are the single-process
rules of `allocation.rules` applied to the concatenated N x F matrix z:

- Mutual Choice: keep the M = min(floor(k*N), N*F) largest entries of relu(z); ties at the
  cut-off go to the lowest global flat index (global row * F + column).
- Feature Choice: latent j keeps its min(m_j, N) largest z_j down the batch, then relu; ties go to
  the lowest global row. The capacities m_j come from the global budget (same on every rank).

So the result does not depend on W: rank r's codes equal rows o_r .. o_r + n_r - 1 of the
single-process codes, exactly, ties included.

Why only O(M) values travel. Order the entries by (value descending, global index ascending).
An entry in the global top-M has fewer than M entries before it, so fewer than M of its own rank
before it: it is in its rank's local top-M, and the global top set lies inside the union of the
local top sets. Because local order is the global order restricted to the rank, the global top-M
is the top-M of that union, and rank r's share of it is a prefix of its local list. Rank r
therefore sends its local top-min(M, n_r F) values (MC) or its per-latent top-min(m_j, n_r)
values (FC, sum_j min(m_j, n_r) <= M values), never the n_r x F matrix, and receives the
others'; every rank then computes the same cut-off and its own share.

Three pure steps, so the rule can be checked with simulated ranks:
1. `local_mutual_choice` / `local_feature_choice`: this rank's candidates (the local top set).
2. `merge_mutual_choice` / `merge_feature_choice`: from every rank's candidate values, the
   global cut-off and how many of its candidates each rank keeps.
3. `Candidates.codes`: the codes of this rank (autograd through the kept values).
`BatchGroup` is the communication (one all-gather of the candidate values per step).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from sae_lens_allocation.allocation.cpu import (
    _codes,
    _column_value_order,
    _exact_float,
    _feature_choice_pick,
    _mutual_choice_pick,
)
from sae_lens_allocation.allocation.rules import (
    Allocation,
    _floored,
    _outside,
    budget,
    feature_choice,
    floor_budget,
    floored_mutual_choice,
    mutual_choice,
)
from sae_lens_allocation.validation import one_line

_T = TypeVar("_T")


class DataParallelError(RuntimeError):
    """A collective with the other ranks failed: one died, or did not answer within the process
    group's timeout."""


@dataclass
class Candidates:
    """One rank's local top set.

    index: flat indices into this rank's n x F matrix, in the rule's order (MC: value
        descending, then index ascending; FC: column ascending, then value descending, then row
        ascending).
    values: z (FC) or relu(z) (MC) at `index`, same order.
    column_counts: FC only, [F] long, how many candidates each column has (min(m_j, n)).
    """

    index: torch.Tensor
    values: torch.Tensor
    column_counts: torch.Tensor | None = None

    def codes(self, pre_acts: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """relu(z) at the candidates where `keep` (bool, candidate order), 0 elsewhere; autograd
        flows through the kept values only, as in `allocation.rules`."""
        flat = pre_acts.reshape(-1)
        index = self.index.index_select(0, keep.nonzero().squeeze(1))
        return _codes(flat, index, None).reshape(pre_acts.shape)


# --- Mutual Choice -----------------------------------------------------------------------------


def local_mutual_choice(pre_acts: torch.Tensor, m: int) -> Candidates:
    """The top-min(m, n F) entries of relu(z) on this rank (positive ones only; fewer when fewer
    are positive), ties to the lowest flat index, ordered by value descending then index
    ascending. m is the global budget M."""
    with torch.no_grad():
        z = pre_acts.detach().reshape(-1, pre_acts.shape[-1]).contiguous()
        m = min(m, z.numel())
        index, keep, _ = _mutual_choice_pick(z, m)
        if keep is not None:
            index = index.index_select(0, keep.nonzero().squeeze(1))
        index = torch.sort(index).values
        values = z.view(-1).index_select(0, index).relu()
        # Stable: equal values keep ascending index order.
        order = torch.sort(_exact_float(values), descending=True, stable=True).indices
        return Candidates(index.index_select(0, order), values.index_select(0, order))


def merge_mutual_choice(values: list[torch.Tensor], m: int) -> tuple[torch.Tensor, list[int]]:
    """Global cut-off and each rank's share from every rank's candidate values (rank order, each
    in candidate order). Returns (cutoff, kept): cutoff = the M-th largest relu(z) of the global
    batch (0 when fewer than M are positive, +inf when M = 0), kept[r] = how many of rank r's
    candidates are in the global top-M (a prefix of its list).

    Counting, no sort: with v = the M-th largest candidate value, rank r keeps its candidates
    > v and t_r of its candidates = v, t_r = clamp(T - sum_{s<r} e_s, 0, e_r), e_s the ties of
    rank s and T = M - #(> v) the tied slots (lowest global index first = lower ranks first)."""
    cutoff, greater, ties = cutoff_counts(values, m)
    slots = m - sum(greater)
    kept = []
    for g, e in zip(greater, ties):
        take = min(max(slots, 0), e)
        kept.append(g + take)
        slots -= take
    return cutoff, kept


def cutoff_counts(values: list[torch.Tensor], m: int) -> tuple[torch.Tensor, list[int], list[int]]:
    """(cutoff, greater, ties) of a global top-M over every rank's candidate values: cutoff = the
    M-th largest value v (0 when fewer than M candidates exist, +inf when M = 0), greater[r] =
    #(rank r's values > v), ties[r] = #(rank r's values = v). With fewer than M candidates every
    candidate counts as greater. The M - sum(greater) tied slots go by the caller's tie rule."""
    if m == 0:
        return values[0].new_tensor(float("inf")), [0] * len(values), [0] * len(values)
    work = [_exact_float(v) for v in values]
    total = sum(int(v.numel()) for v in work)
    if total < m:
        # Fewer than M positive entries in the whole batch: all of them are kept.
        return values[0].new_zeros(()), [int(v.numel()) for v in work], [0] * len(values)
    cutoff = torch.kthvalue(torch.cat(work), total - m + 1).values
    greater = [int((v > cutoff).sum()) for v in work]
    ties = [int((v == cutoff).sum()) for v in work]
    return cutoff.to(values[0].dtype), greater, ties


# --- Feature Choice ----------------------------------------------------------------------------


def local_feature_choice(pre_acts: torch.Tensor, capacities: torch.Tensor) -> Candidates:
    """The top-min(m_j, n) z_j of each column on this rank, ties to the lowest row, ordered by
    column, then value descending, then row. `capacities` are the global m_j ([F], long)."""
    with torch.no_grad():
        n_latents = pre_acts.shape[-1]
        z = pre_acts.detach().reshape(-1, n_latents).contiguous()
        caps = capacities.to(device=z.device, dtype=torch.long).clamp(max=z.shape[0])
        index, keep, _ = _feature_choice_pick(z, caps)
        if keep is not None:
            index = index.index_select(0, keep.nonzero().squeeze(1))
        index = torch.sort(index).values
        values = z.view(-1).index_select(0, index)
        order = _column_value_order(values, index.remainder(n_latents))
        return Candidates(index.index_select(0, order), values.index_select(0, order), caps)


def merge_feature_choice(
    values: list[torch.Tensor], counts: list[torch.Tensor], capacities: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Per-latent cut-offs and each rank's share, from every rank's candidate values (rank order,
    each in candidate order, `counts[r]` [F] per column). `capacities` are the global m_j,
    clamped to N by the caller. Returns (cutoff [F], kept): cutoff[j] = the m_j-th largest z_j of
    the global batch (+inf where m_j = 0), kept[r][j] = how many of rank r's column-j candidates
    the global top-m_j takes (a prefix of that column's list).

    One stable sort by (column, value descending) of the concatenated candidates: the input is
    rank-major and each rank's column list is in row order among equal values, so equal values
    stay in global row order, the tie rule."""
    n_latents = capacities.numel()
    device = values[0].device
    caps = capacities.to(device=device, dtype=torch.long)
    latents = torch.arange(n_latents, device=device)
    column = torch.cat([torch.repeat_interleave(latents, c.to(device)) for c in counts])
    rank = torch.cat(
        [torch.full((int(c.sum()),), r, dtype=torch.long, device=device)
         for r, c in enumerate(counts)]
    )
    everything = torch.cat(values)
    order = _column_value_order(everything, column)
    sorted_column = column.index_select(0, order)
    starts = torch.searchsorted(sorted_column, torch.arange(n_latents, device=device))
    position = torch.arange(order.numel(), device=device)
    chosen = position < (starts + caps).index_select(0, sorted_column)
    inf = torch.full((n_latents,), float("inf"), dtype=everything.dtype, device=device)
    if order.numel():
        last = order.index_select(0, (starts + caps - 1).clamp(0, order.numel() - 1))
        cutoff = torch.where(caps > 0, everything.index_select(0, last), inf)
    else:
        cutoff = inf
    kept_rank = rank.index_select(0, order)[chosen]
    shares = torch.bincount(
        kept_rank * n_latents + sorted_column[chosen], minlength=len(values) * n_latents
    )
    kept = list(shares.view(len(values), n_latents).unbind(0))
    return cutoff, kept


def feature_choice_keep(candidates: Candidates, kept: torch.Tensor) -> torch.Tensor:
    """Bool mask over `candidates` (FC order): the first kept[j] candidates of each column j."""
    counts = candidates.column_counts
    assert counts is not None
    starts = torch.cumsum(counts, 0) - counts
    column = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    position = torch.arange(column.numel(), device=counts.device) - starts.index_select(0, column)
    return position < kept.to(counts.device).index_select(0, column)


def prefix_keep(candidates: Candidates, kept: int) -> torch.Tensor:
    """Bool mask over `candidates` (MC order): the first `kept`."""
    return torch.arange(candidates.index.numel(), device=candidates.index.device) < kept


# --- communication -----------------------------------------------------------------------------


class BatchGroup:
    """The processes that share one training batch, in rank order.

    `BatchGroup()` is a single process: every collective is the identity and the allocations are
    `allocation.rules`' (also for a process group of one). `BatchGroup(process_group)` uses
    torch.distributed on that group; `from_default_group()` on the default group. Statistics
    over the batch (firing counts, means) go through `sum`; the allocations through
    `mutual_choice` / `feature_choice`.
    """

    def __init__(self, process_group: dist.ProcessGroup | None = None, distributed: bool = False):
        self.process_group = process_group
        self.distributed = distributed or process_group is not None
        if self.distributed:
            self.rank = dist.get_rank(process_group)
            self.world_size = dist.get_world_size(process_group)
        else:
            self.rank, self.world_size = 0, 1
        # Values sent by this rank in the last allocation (for benchmarks and docs).
        self.last_sent_values = 0

    #: Latent shards of the SAE (allocation/latent_merge.py): one here, every latent local.
    shards = 1
    shard = 0

    def sum_latents(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the latent shards (the identity with one shard)."""
        return tensor

    def gather_latents(self, tensor: torch.Tensor) -> torch.Tensor:
        """[..., F_local] of every latent shard -> [..., F] (the identity with one shard)."""
        return tensor

    def local_latents(self, tensor: torch.Tensor) -> torch.Tensor:
        """This shard's slice of the last dim of a [..., F] tensor (all of it with one shard)."""
        return tensor

    def gather_latent_lists(self, values: torch.Tensor) -> list[torch.Tensor]:
        """Every latent shard's 1-D `values` (any lengths), in shard order ([values] with one
        shard)."""
        return [values]

    @classmethod
    def from_default_group(cls) -> BatchGroup:
        """The default process group (after `torch.distributed.init_process_group`)."""
        return cls(None, distributed=True)

    # -- collectives --------------------------------------------------------------------
    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `tensor` (same shape on every rank), in rank order."""
        if not self.distributed:
            return [tensor]
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        self._collective(
            "all_gather",
            lambda: dist.all_gather(out, tensor.contiguous(), group=self.process_group),
        )
        return out

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks; the input is left alone (one process: the input itself)."""
        if not self.distributed:
            return tensor
        out = tensor.detach().clone()
        self._collective(
            "all_reduce",
            lambda: dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.process_group),
        )
        return out

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> None:
        """Overwrite `tensor` in place with rank `src`'s."""
        if self.distributed:
            source = self._global_rank(src)
            self._collective(
                "broadcast", lambda: dist.broadcast(tensor, src=source, group=self.process_group)
            )

    def row_counts(self, n_rows: int, device: torch.device | str = "cpu") -> list[int]:
        """n_r of every rank."""
        if not self.distributed:
            return [n_rows]
        mine = torch.tensor([n_rows], dtype=torch.long, device=device)
        return [int(t) for t in self.all_gather(mine)]

    def total_rows(self, n_rows: int, device: torch.device | str = "cpu") -> int:
        """N = sum_r n_r."""
        return sum(self.row_counts(n_rows, device))

    def barrier(self) -> None:
        if self.distributed:
            self._collective("barrier", lambda: dist.barrier(group=self.process_group))

    def _collective(self, name: str, run: Callable[[], _T]) -> _T:
        """Run one collective; a failure (a rank died: gloo/NCCL raise at once; a rank stuck:
        they raise after the group's timeout) becomes a `DataParallelError` naming this rank."""
        try:
            return run()
        except RuntimeError as error:
            raise DataParallelError(
                f"rank {self.rank} of {self.world_size}: {name} with the other ranks failed "
                f"({one_line(error)}). Another rank probably died or is stuck: see its log."
            ) from error

    def _global_rank(self, rank: int) -> int:
        if self.process_group is None:
            return rank
        return dist.get_global_rank(self.process_group, rank)

    def _gather_padded(self, values: torch.Tensor, lengths: list[int]) -> list[torch.Tensor]:
        """Every rank's 1-D `values` (rank r's of length lengths[r]): padded to the longest for
        one all-gather, then cut back."""
        width = max(lengths)
        padded = values.new_zeros(width)
        padded[: values.numel()] = values
        self.last_sent_values = width
        return [g[:n] for g, n in zip(self.all_gather(padded), lengths)]

    # -- allocations ----------------------------------------------------------------------
    def mutual_choice(self, pre_acts: torch.Tensor, k: float) -> Allocation:
        """Mutual Choice over the global batch; this rank's codes (module doc)."""
        if self.world_size == 1:
            return mutual_choice(pre_acts, k)
        if not k >= 0:
            raise ValueError(f"mutual_choice: k must be a number >= 0, got k={k!r}")
        n_latents = pre_acts.shape[-1]
        rows = self.row_counts(pre_acts.shape[:-1].numel(), pre_acts.device)
        return self._mutual_choice_of_budget(
            pre_acts, min(budget(sum(rows), k), sum(rows) * n_latents)
        )

    def _mutual_choice_of_budget(self, pre_acts: torch.Tensor, m: int) -> Allocation:
        """Mutual Choice over the global batch with the budget given as a count (two or more
        ranks); this rank's codes."""
        candidates = local_mutual_choice(pre_acts, m)
        # A list is shorter than min(M, n_r F) when the rank has fewer positive entries, which
        # only that rank knows: the lengths go first, then the values padded to the longest.
        lengths = self.row_counts(candidates.values.numel(), pre_acts.device)
        gathered = self._gather_padded(candidates.values.detach(), lengths)
        cutoff, kept = merge_mutual_choice(gathered, m)
        codes = candidates.codes(pre_acts, prefix_keep(candidates, kept[self.rank]))
        return Allocation(codes=codes, cutoff=cutoff)

    def feature_choice(self, pre_acts: torch.Tensor, capacities: torch.Tensor) -> Allocation:
        """Feature Choice over the global batch with global capacities m_j; this rank's codes."""
        if self.world_size == 1:
            return feature_choice(pre_acts, capacities)
        n_latents = pre_acts.shape[-1]
        integer = not (capacities.is_floating_point() or capacities.is_complex())
        if capacities.shape != (n_latents,) or not integer:
            raise ValueError(
                f"feature_choice: capacities must be an integer tensor of shape ({n_latents},), "
                f"got dtype {capacities.dtype} and shape {tuple(capacities.shape)}"
            )
        if n_latents and bool((capacities < 0).any()):
            raise ValueError(
                f"feature_choice: capacities must be >= 0, got min {int(capacities.min())}"
            )
        rows = self.row_counts(pre_acts.shape[:-1].numel(), pre_acts.device)
        caps = capacities.to(device=pre_acts.device, dtype=torch.long).clamp(max=sum(rows))
        candidates = local_feature_choice(pre_acts, caps)
        counts = [caps.clamp(max=n) for n in rows]
        gathered = self._gather_padded(
            candidates.values.detach(), [int(c.sum()) for c in counts]
        )
        cutoff, kept = merge_feature_choice(gathered, counts, caps)
        codes = candidates.codes(pre_acts, feature_choice_keep(candidates, kept[self.rank]))
        return Allocation(codes=codes, cutoff=cutoff)

    def floored_mutual_choice(self, pre_acts: torch.Tensor, k: float, floor: int) -> Allocation:
        """Mutual Choice with a per-latent floor over the global batch (`allocation.rules`):
        the global Feature Choice with capacity m, then the global Mutual Choice of the rest, so
        exact as both are; this rank's codes."""
        if self.world_size == 1:
            return floored_mutual_choice(pre_acts, k, floor)
        n_latents = pre_acts.shape[-1]
        n_tokens = self.total_rows(pre_acts.shape[:-1].numel(), pre_acts.device)
        rest_budget = floor_budget(n_tokens, n_latents, k, floor)
        if floor == 0:
            return self.mutual_choice(pre_acts, k)
        chosen = self.feature_choice(pre_acts, torch.full((n_latents,), floor, dtype=torch.long))
        rest = _outside(pre_acts, chosen)
        return _floored(chosen, self._mutual_choice_of_budget(rest, rest_budget))


#: The single-process group (every collective the identity).
SINGLE_PROCESS = BatchGroup()
