"""`topk_aux`: SAELens TopK with a pluggable auxiliary loss, to compare the losses on the baseline.

Training is SAELens' `TopKTrainingSAE` unchanged, except that `calculate_aux_loss` comes from
`AuxLossMixin`: `aux_loss="aux_k"` (the default) reproduces SAELens' aux-k loss exactly, so
`topk_aux` with default fields trains like `topk`; `aux_loss="aux_zipf"` or `"none"` swap it.
`use_sparse_activations: true` trains with the plugin's sparse step (sparse_codes.py), which
unlike SAELens' own sparse TopK also back-propagates sparsely and runs on the CPU.
The inference export is a plain SAELens `topk` SAE (decoder norms folded as TopK does, the
aux-loss buffers dropped) that loads without this plugin.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from sae_lens.saes.sae import SAEConfig, TrainStepInput, TrainStepOutput
from sae_lens.saes.topk_sae import TopKSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig
from typing_extensions import override

from sae_lens_allocation.saes.aux_losses import AuxLossConfig, AuxLossMixin
from sae_lens_allocation.saes.finite_loss import FiniteLossGuard
from sae_lens_allocation.saes.latent_shards import (
    LatentShardMixin,
    LatentShardsConfig,
    validate_latent_shards,
)
from sae_lens_allocation.saes.sparse_codes import (
    SparseActivationsMixin,
    validate_sparse_activations,
)
from sae_lens_allocation.validation import field_error, is_int


@dataclass(kw_only=True)
class TopKAuxTrainingSAEConfig(AuxLossConfig, LatentShardsConfig, TopKTrainingSAEConfig):
    """SAELens `TopKTrainingSAEConfig` plus the `AuxLossConfig` fields (default aux_loss "aux_k")."""

    @override
    @classmethod
    def architecture(cls) -> str:
        return "topk_aux"

    @override
    def get_inference_config_class(self) -> type[SAEConfig]:
        return TopKSAEConfig

    def __post_init__(self) -> None:
        super().__post_init__()
        self.validate_aux_loss()
        validate_sparse_activations(self)
        validate_latent_shards(self)
        if not (is_int(self.k) and 1 <= self.k <= self.d_sae):
            raise field_error("k", self.k, f"an integer with 1 <= k <= d_sae (d_sae={self.d_sae})")


class TopKAuxTrainingSAE(
    FiniteLossGuard, AuxLossMixin, LatentShardMixin, SparseActivationsMixin, TopKTrainingSAE
):
    """SAELens `TopKTrainingSAE` whose auxiliary loss is chosen by `cfg.aux_loss`."""

    cfg: TopKAuxTrainingSAEConfig

    def __init__(self, cfg: TopKAuxTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self.init_aux_loss_state()

    @override
    def get_activation_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        # Read at each call: the batch group is set after the activation function is built.
        topk = super().get_activation_fn()

        def codes(hidden_pre: torch.Tensor) -> torch.Tensor:
            if self.batch_group.shards == 1:
                return topk(hidden_pre)
            return self.row_topk_codes(hidden_pre, hidden_pre, self.cfg.k)[0]

        return codes

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        output = super().training_forward_pass(step_input)
        self.guard_loss(output.loss, step_input.n_training_steps)
        output.metrics.update(self.aux_loss_metrics())
        return output

    @override
    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        self.drop_aux_state(state_dict)
        super().process_state_dict_for_saving_inference(state_dict)
