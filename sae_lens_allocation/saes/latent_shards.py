"""What a latent-sharded SAE computes (docs/distributed.md#latent-sharding).

With S latent shards a rank holds latents s F_l .. (s + 1) F_l - 1 of the F = S F_l latents: the
columns W_enc[:, shard], b_enc[shard], the rows W_dec[shard] and every per-latent buffer; b_dec and
the input are replicated over the S ranks of its latent group (`BatchGroup.latents`). The step:

    x' = x - b_dec                                  (replicated; gradient summed over shards)
    z_s = x' W_enc_s + b_enc_s   (times ||W_dec_j|| with rescale_acts_by_decoder_norm)
    f_s = this shard's columns of the architecture's codes of the whole N x F matrix z
          (allocation/latent_merge.py: exact, the unsharded selection)
    x_hat = sum_s f_s W_dec_s (/ ||W_dec_j||) + b_dec  (one all-reduce of N x d_in)

so x_hat, the losses and b_dec's gradient are the unsharded ones on every shard, and each shard's
parameters get their own columns of the unsharded gradient. With one shard (`BatchGroup`'s
default) every method below is SAELens' own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from sae_lens.saes.topk_sae import act_times_W_dec

from sae_lens_allocation.saes.batch_group import BatchGroupMixin
from sae_lens_allocation.saes.sparse_codes import decode_sparse_codes
from sae_lens_allocation.validation import field_error, is_int


def validate_latent_shards(cfg: Any) -> None:
    """`latent_shards` S: an integer >= 1 that divides d_sae (each shard holds d_sae / S)."""
    shards = cfg.latent_shards
    if not is_int(shards) or shards < 1:
        raise field_error("latent_shards", shards, "an integer >= 1")
    if cfg.d_sae % shards:
        raise field_error(
            "latent_shards", shards, f"a divisor of d_sae ({cfg.d_sae}): every shard holds "
            "d_sae / latent_shards latents"
        )


class LatentShardMixin(BatchGroupMixin):
    """The encoder input and decoder output of a latent-sharded SAE (module doc). Put it before
    `SparseActivationsMixin` and the SAELens base class."""

    cfg: Any

    def process_sae_in(self, sae_in: torch.Tensor) -> torch.Tensor:
        x = super().process_sae_in(sae_in)  # type: ignore[misc]
        if self.batch_group.shards == 1:
            return x
        return self.batch_group.shard_input(x)  # type: ignore[attr-defined]

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        if self.batch_group.shards == 1:
            return super().decode(feature_acts)  # type: ignore[misc]
        sae: Any = self
        rescale = self.cfg.rescale_acts_by_decoder_norm
        if feature_acts.is_sparse and feature_acts.dim() == 2:
            partial = decode_sparse_codes(feature_acts, sae.W_dec, rescale)
        else:
            partial = act_times_W_dec(feature_acts, sae.W_dec, rescale)
        recons = self.batch_group.reduce_partial(partial)  # type: ignore[attr-defined]
        sae_out_pre = sae.hook_sae_recons(recons + sae.b_dec)
        sae_out_pre = sae.run_time_activation_norm_fn_out(sae_out_pre)
        return sae.reshape_fn_out(sae_out_pre, sae.d_head)

    def row_topk_codes(
        self, hidden_pre: torch.Tensor, scores: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, mask): relu(z) on each row's top-k of `scores` over all F latents, this
        shard's columns (autograd into z through the kept entries only, as SAELens' TopK), and
        the selection as a bool mask."""
        flat = hidden_pre.reshape(-1, hidden_pre.shape[-1])
        mask = self.batch_group.row_topk_mask(  # type: ignore[attr-defined]
            scores.reshape(flat.shape), k
        )
        codes = torch.where(mask, flat.relu(), torch.zeros_like(flat)).reshape(hidden_pre.shape)
        return codes, mask.reshape(hidden_pre.shape)


@dataclass(kw_only=True)
class LatentShardsConfig:
    """latent_shards: S, the number of ranks the latents are split over (docs/distributed.md
    #latent-sharding); 1 = every rank holds the whole SAE. Put it before the SAELens base class;
    `validate_latent_shards(self)` in `__post_init__`."""

    latent_shards: int = 1
