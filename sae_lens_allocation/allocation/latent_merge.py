"""Exact allocation with the latents of the SAE split across processes (latent sharding), on a
2-D mesh of ranks: data x latents (docs/distributed.md#latent-sharding).

W = D S ranks; rank g holds data index r = g // S and latent shard s = g % S: rows o_r ..
o_r + n_r - 1 of the global batch (o_r = sum_{q<r} n_q, as in global_merge.py) and latents
s F_l .. (s + 1) F_l - 1 of the F = S F_l latents. Rank g's block of the global N x F matrix z has
local entry (i, c) at global flat index

    gi(i, c) = (o_r + i) F + s F_l + c.

The rules are the single-process rules of `allocation.rules` on the whole N x F matrix:

- Mutual Choice: the M = min(floor(k N), N F) largest relu(z), ties to the lowest global flat
  index. Local order (value descending, local flat index ascending) is the global order restricted
  to the block, since gi is increasing in the local flat index, so the proof of global_merge.py
  carries over: the global top-M lies in the union of the blocks' local top-M, and each block's
  share is a prefix of its list. Every rank sends its at most M candidate values to all W ranks;
  the cut-off v and the counts > v follow as in global_merge.py. Blocks no longer follow the global
  index in rank order (shard 1 of row 0 comes before shard 0 of row 1), so when more candidates
  equal v than slots are left, a second all-gather sends the tied candidates' global indices only
  (ties of continuous values are rare), and the lowest indices take the slots.
- Feature Choice: latent j's column lives on one shard, spread over the D data ranks of that
  shard: global_merge.py's Feature Choice over the data group, with this shard's capacities.
- TopK per token (topk_aux, gradient_topk, the aux losses' top-k over dead latents): each shard
  sends its top-min(k, F_l) (value, global latent) pairs of every row to the S ranks of its latent
  group; the row's top-k of their union by (value descending, latent ascending) is the top-k of the
  row, by the same argument on one row. Ties between equal values go to the lower latent index
  (SAELens' torch.topk leaves them unspecified; continuous values do not tie).

Communication helpers for the sharded encoder and decoder (Megatron's column-parallel pair):
`shard_input` is the identity forward and sums the input's gradient over the latent group
backward (every shard's encoder reads the replicated x - b_dec); `reduce_partial` sums the
shards' partial reconstructions forward and passes the gradient unchanged backward (the loss is
replicated, so every shard already holds d loss / d x_hat).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from sae_lens_allocation.allocation.global_merge import (
    BatchGroup,
    cutoff_counts,
    local_mutual_choice,
    prefix_keep,
)
from sae_lens_allocation.allocation.rules import (
    Allocation,
    _floored,
    _outside,
    budget,
    floor_budget,
)


def resolve_ties(
    greater: list[int], ties: list[int], slots: int, tied_index: list[torch.Tensor]
) -> list[int]:
    """How many candidates each rank keeps when ties at the cut-off go to the lowest global
    index: rank r keeps its greater[r] candidates above the cut-off and those of its tied ones
    (`tied_index[r]`, ascending) whose global index is among the `slots` lowest of all ranks'."""
    if slots <= 0:
        return list(greater)
    everything = torch.cat(tied_index)
    if everything.numel() <= slots:
        return [g + e for g, e in zip(greater, ties)]
    limit = torch.kthvalue(everything, slots).values
    return [g + int((t <= limit).sum()) for g, t in zip(greater, tied_index)]


def merge_row_topk(values: torch.Tensor, latents: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, the k candidates with the largest values, ties to the lower latent index.
    values, latents: [n, c] (every shard's candidates side by side); returns the chosen global
    latents [n, k]."""
    by_latent = latents.argsort(dim=-1, stable=True)
    values = values.gather(-1, by_latent)
    latents = latents.gather(-1, by_latent)
    # Stable: equal values keep ascending latent order.
    order = torch.sort(values, dim=-1, descending=True, stable=True).indices[:, :k]
    return latents.gather(-1, order)


class _ShardInput(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the latent group."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: ShardedBatchGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        return ctx.group.latents.sum(grad.contiguous()), None


class _ReducePartial(torch.autograd.Function):
    """Sum over the latent group forward; the gradient passes unchanged backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: ShardedBatchGroup) -> torch.Tensor:
        return group.latents.sum(x.contiguous())

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        return grad, None


class ShardedBatchGroup(BatchGroup):
    """One rank of the data x latents mesh. As a `BatchGroup` it is the data group (the D ranks
    holding this latent shard, different rows): `sum`, `row_counts`, `feature_choice` and the
    gradient average run over it. `latents` is the latent group (the S ranks holding these rows,
    different latents), `world` all W ranks. `mutual_choice`, `floored_mutual_choice` and
    `row_topk_mask` are exact over the whole N x F batch (module doc)."""

    def __init__(self, data: BatchGroup, latents: BatchGroup, world: BatchGroup):
        super().__init__(data.process_group, distributed=True)
        self.latents = latents
        self.world = world
        self.shards = latents.world_size
        self.shard = latents.rank

    @classmethod
    def from_default_group(cls, latent_shards: int = 1, device: str = "cpu") -> ShardedBatchGroup:
        """The mesh over the default process group: W / S data ranks x S latent shards, the S
        ranks of one latent group consecutive (on one node they share the fastest links)."""
        from torch.distributed.device_mesh import init_device_mesh

        world = dist.get_world_size()
        if latent_shards < 1 or world % latent_shards:
            raise ValueError(
                f"latent_shards={latent_shards}: allowed is a divisor of the number of "
                f"processes ({world})"
            )
        mesh = init_device_mesh(
            torch.device(device).type, (world // latent_shards, latent_shards),
            mesh_dim_names=("data", "latents"),
        )
        return cls(
            BatchGroup(mesh.get_group("data")),
            BatchGroup(mesh.get_group("latents")),
            BatchGroup.from_default_group(),
        )

    # -- latent-group collectives ------------------------------------------------------------
    def sum_latents(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.latents.sum(tensor)

    def gather_latents(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.latents.all_gather(tensor.contiguous()), dim=-1)

    def local_latents(self, tensor: torch.Tensor) -> torch.Tensor:
        width = tensor.shape[-1] // self.shards
        return tensor[..., self.shard * width : (self.shard + 1) * width]

    def gather_latent_lists(self, values: torch.Tensor) -> list[torch.Tensor]:
        lengths = self.latents.row_counts(values.numel(), values.device)
        return self.latents._gather_padded(values.contiguous(), lengths)

    def shard_input(self, x: torch.Tensor) -> torch.Tensor:
        """x for this shard's encoder; its gradient is summed over the shards."""
        return _ShardInput.apply(x, self)

    def reduce_partial(self, x: torch.Tensor) -> torch.Tensor:
        """sum over the shards of their partial reconstructions (one all-reduce of n x d_in)."""
        return _ReducePartial.apply(x, self)

    # -- allocations ---------------------------------------------------------------------------
    def mutual_choice(self, pre_acts: torch.Tensor, k: float) -> Allocation:
        if not k >= 0:
            raise ValueError(f"mutual_choice: k must be a number >= 0, got k={k!r}")
        rows = self.row_counts(pre_acts.shape[:-1].numel(), pre_acts.device)
        n_latents = pre_acts.shape[-1] * self.shards
        m = min(budget(sum(rows), k), sum(rows) * n_latents)
        return self._mutual_choice_of_budget(pre_acts, m, rows)

    def floored_mutual_choice(self, pre_acts: torch.Tensor, k: float, floor: int) -> Allocation:
        """The floor's Feature Choice over the data group (columns are local), then the Mutual
        Choice of the rest over the mesh, as `allocation.floored_mutual_choice` on N x F."""
        rows = self.row_counts(pre_acts.shape[:-1].numel(), pre_acts.device)
        local = pre_acts.shape[-1]
        rest_budget = floor_budget(sum(rows), local * self.shards, k, floor)
        if floor == 0:
            return self.mutual_choice(pre_acts, k)
        chosen = self.feature_choice(pre_acts, torch.full((local,), floor, dtype=torch.long))
        rest = _outside(pre_acts, chosen)
        return _floored(chosen, self._mutual_choice_of_budget(rest, rest_budget, rows))

    def _mutual_choice_of_budget(
        self, pre_acts: torch.Tensor, m: int, rows: list[int] | None = None
    ) -> Allocation:
        if rows is None:
            rows = self.row_counts(pre_acts.shape[:-1].numel(), pre_acts.device)
        candidates = local_mutual_choice(pre_acts, m)
        lengths = self.world.row_counts(candidates.values.numel(), pre_acts.device)
        gathered = self.world._gather_padded(candidates.values.detach(), lengths)
        self.last_sent_values = self.world.last_sent_values
        cutoff, greater, ties = cutoff_counts(gathered, m)
        slots = m - sum(greater)
        me = self.world.rank
        if sum(ties) > slots:
            mine = self._global_index(candidates.index, pre_acts.shape[-1], rows)
            tied = mine[greater[me] : greater[me] + ties[me]]
            gathered_ties = self.world._gather_padded(tied, ties)
            kept = resolve_ties(greater, ties, slots, gathered_ties)[me]
        else:
            kept = greater[me] + ties[me]
        codes = candidates.codes(pre_acts, prefix_keep(candidates, kept))
        return Allocation(codes=codes, cutoff=cutoff)

    def _global_index(self, index: torch.Tensor, local: int, rows: list[int]) -> torch.Tensor:
        """gi = (o_r + i) F + s F_l + c of local flat indices i F_l + c."""
        offset = sum(rows[: self.rank])
        row = torch.div(index, local, rounding_mode="floor")
        return (offset + row) * (local * self.shards) + self.shard * local + (index - row * local)

    def row_topk_mask(self, scores: torch.Tensor, k: int) -> torch.Tensor:
        """Bool [n, F_l]: this shard's entries of each row's top-k of `scores` over all F
        latents (module doc). scores: [n, F_l], no autograd needed."""
        local = scores.shape[-1]
        top = scores.detach().topk(min(k, local), dim=-1, sorted=False)
        values = torch.cat(self.latents.all_gather(top.values.contiguous()), dim=-1)
        latents = torch.cat(
            self.latents.all_gather((top.indices + self.shard * local).contiguous()), dim=-1
        )
        chosen = merge_row_topk(values, latents, k) - self.shard * local
        here = (chosen >= 0) & (chosen < local)
        mask = torch.zeros_like(scores, dtype=torch.bool)
        rows = torch.arange(scores.shape[0], device=scores.device)[:, None].expand_as(chosen)
        mask[rows[here], chosen[here]] = True
        return mask
