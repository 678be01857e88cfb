"""Latent-sharded training on a data x latents mesh (docs/distributed.md#latent-sharding).

W = D S ranks (torchrun); `latent_shards: S` in the SAE config. Rank g = r S + s holds latent shard
s (F / S latents: W_enc[:, shard], b_enc[shard], W_dec[shard] and every per-latent buffer, with
their Adam moments) and reads data rank r's rows; b_dec is replicated. What makes the step the
unsharded one (each rule: where it is implemented):

- the allocation over the whole N x F batch (allocation/latent_merge.py) and the decoder's one
  all-reduce of N / D x d_in over the latent group (saes/latent_shards.py);
- the S ranks of a latent group train on the same rows: shard 0 of each latent group reads them and
  broadcasts them to the others (`LatentGroupRows`);
- gradients: averaged over the data group (DataParallelSAETrainer); b_dec's is already the whole
  one on every shard (saes/latent_shards.py), so nothing is summed over the latent group;
- the grad-norm clip, SAELens' min(1, 1 / (||g|| + 1e-6)), with
  ||g||^2 = sum_s ||g_sharded,s||^2 + ||g_b_dec||^2 (`clip_gradients`);
- statistics over latents (Zipf fits and ranks, dead counts, gradient_topk's RMS) gathered or
  summed over the latent group inside the SAE; SAELens' firing counts and dead mask stay per
  shard (each shard counts its own latents over the data group);
- checkpoints: every rank writes its folder of the checkpoint (`save_checkpoint`), and rank 0
  publishes the checkpoint once all have (latent_shard_runner.py gives the layout).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import TrainingSAE
from sae_lens.training.sae_trainer import Evaluator, SaveCheckpointFn
from sae_lens.training.types import DataProvider

from sae_lens_allocation.allocation.latent_merge import ShardedBatchGroup
from sae_lens_allocation.saelens_compat import SeamedSAETrainer
from sae_lens_allocation.training.distributed import DataParallelSAETrainer
from sae_lens_allocation.training.resume import rank_folder
from sae_lens_allocation.validation import field_error

#: Tensors of a training SAE that every latent shard holds whole.
REPLICATED = ("b_dec", "zipf_fit")


def latent_dim(name: str, tensor: torch.Tensor, d_sae: int) -> int | None:
    """The dimension of a state-dict entry that runs over latents (None: replicated): 1 for
    W_enc [d_in, F], 0 for every other entry whose first dimension is F; scalars and `REPLICATED`
    are whole on every shard. Any other shape is refused, so no tensor is split by guesswork."""
    if name == "W_enc":
        return 1
    if name in REPLICATED or tensor.dim() == 0:
        return None
    if tensor.shape[0] == d_sae:
        return 0
    raise ValueError(f"{name} of shape {tuple(tensor.shape)}: not known to be per-latent (first "
                     f"dimension d_sae={d_sae}) or replicated ({', '.join(REPLICATED)})")


def local_config(cfg: Any) -> Any:
    """The config a shard's SAE is built from: the validated global config (d_sae = F,
    latent_shards = S) with d_sae = F / S (a copy; the global config keeps F)."""
    local = copy.deepcopy(cfg)
    local.d_sae = cfg.d_sae // cfg.latent_shards
    return local


def shard_state_dict(
    state: dict[str, torch.Tensor], d_sae: int, shard: int, shards: int
) -> dict[str, torch.Tensor]:
    """Shard `shard` of an unsharded SAE's state dict (F = d_sae latents), by `latent_dim`."""
    width = d_sae // shards
    out = {}
    for name, tensor in state.items():
        dim = latent_dim(name, tensor, d_sae)
        out[name] = tensor if dim is None else tensor.narrow(dim, shard * width, width).clone()
    return out


def merge_state_dicts(states: list[dict[str, torch.Tensor]], d_sae: int) -> dict[str, torch.Tensor]:
    """The unsharded state dict from every shard's (shard order), by `latent_dim`; replicated
    entries are shard 0's."""
    width = d_sae // len(states)
    out = {}
    for name, tensor in states[0].items():
        dim = latent_dim(name, tensor, width)
        out[name] = tensor if dim is None else torch.cat([s[name] for s in states], dim=dim)
    return out


class LatentGroupRows:
    """The data provider of one rank of a latent group: shard 0's batches, broadcast to the
    other shards (so all S shards encode the same rows). Other shards' own providers are read
    and dropped, which keeps every rank's store and language model in step."""

    def __init__(self, provider: DataProvider, group: ShardedBatchGroup):
        self.provider = provider
        self.group = group

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        batch = next(self.provider).contiguous()
        self.group.latents.broadcast_(batch, 0)
        return batch


class LatentShardedSAETrainer(DataParallelSAETrainer):
    """SAELens' `SAETrainer` for one rank of the data x latents mesh: `sae` is this rank's shard
    (built from `local_config`), `cfg` the global trainer config, `group` the mesh."""

    #: Called on global rank 0 with a checkpoint folder once every rank has written its part
    #: (the runner completes and renames it into place); None: the folder stays where written.
    publish_checkpoint: Callable[[Path], None] | None = None

    def __init__(
        self,
        cfg: SAETrainerConfig,
        sae: TrainingSAE[Any],
        data_provider: DataProvider,
        group: ShardedBatchGroup,
        evaluator: Evaluator[Any] | None = None,
        save_checkpoint_fn: SaveCheckpointFn | None = None,
    ) -> None:
        if sae.cfg.latent_shards != group.shards:
            raise field_error(
                "latent_shards", sae.cfg.latent_shards,
                f"{group.shards}, the latent shards of the mesh this rank belongs to",
            )
        super().__init__(
            cfg, sae, LatentGroupRows(data_provider, group), group, evaluator, save_checkpoint_fn
        )
        # One b_dec for the latent group (data ranks already share shard 0's via the parent).
        group.latents.broadcast_(self.sae.b_dec.data, 0)
        d_sae = self.sae.cfg.d_sae
        self._sharded = [
            name for name, p in self.sae.named_parameters() if latent_dim(name, p, d_sae) is not None
        ]

    @torch.no_grad()
    def clip_gradients(self) -> None:
        """SAELens' clip on the norm of the whole unsharded gradient (module doc)."""
        sharded = torch.zeros((), dtype=torch.float32, device=self.sae.b_dec.device)
        replicated = torch.zeros_like(sharded)
        grads = []
        for name, p in self.sae.named_parameters():
            if p.grad is None:
                continue
            grads.append(p.grad)
            square = p.grad.float().norm().square()
            if name in self._sharded:
                sharded += square
            else:
                replicated += square
        total = (self.group.sum_latents(sharded) + replicated).sqrt()
        coefficient = (1.0 / (total + 1e-6)).clamp(max=1.0)
        for grad in grads:
            grad.mul_(coefficient.to(grad.dtype))

    def save_checkpoint(self, checkpoint_name: str, *args: Any, **kwargs: Any) -> None:
        """Every rank g writes folder rank_g of checkpoint `checkpoint_name` under
        `cfg.checkpoint_path`: the ranks of data rank 0 (g = s) SAELens' checkpoint of shard s
        (weights, cfg.json, sparsity, trainer state with the optimiser; the other data ranks hold
        the same shard), every rank what `save_checkpoint_fn` adds (its store and RNG). When all
        have written, rank 0 calls `publish_checkpoint` with the folder."""
        if self.cfg.checkpoint_path is None:
            return
        folder = Path(self.cfg.checkpoint_path) / checkpoint_name
        world = self.group.world  # type: ignore[attr-defined]
        name = rank_folder(world.rank)
        if self.group.rank == 0:
            # SAELens' checkpoint (DataParallelSAETrainer's would write on rank 0 only).
            SeamedSAETrainer.save_checkpoint(self, name, base_path=folder)
        else:
            (folder / name).mkdir(parents=True, exist_ok=True)
            if self.save_checkpoint_fn is not None:
                self.save_checkpoint_fn(checkpoint_path=folder / name)
        world.barrier()
        if world.rank == 0 and self.publish_checkpoint is not None:
            self.publish_checkpoint(folder)
        world.barrier()
