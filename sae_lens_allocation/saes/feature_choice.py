"""Feature Choice SAE ("feature_choice"), Ayonrinde 2024 (arXiv 2411.02124).

Training: each latent j keeps the m_j tokens of the batch with the largest z_j, then relu
("each feature matches with at most m tokens"; paper). Capacities (project definition,
algorithms.md): `capacity="uniform"` gives m_j = M/F with randomised rounding, sum_j m_j = M =
floor(k * N); `capacity="zipf"` gives m_j proportional to rank_j^(-s), rank by the running firing
frequency, s = `zipf_exponent`, floored at 1, capped at N, renormalised to sum M. Every latent gets
m_j >= 1 tokens per batch, so none is dead by construction.
Export: SAELens `jumprelu` with per-latent thresholds theta_j, the (1 - a q_j) quantile of z_j on
calibration tokens, q_j = E[m_j] / N the training firing fraction and the level a cross-fitted over
document folds so the out-of-fold mean L0 is sum_j q_j = k (calibration.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from typing_extensions import override

from sae_lens_allocation.allocation import (
    Allocation,
    budget,
    ranks_from_frequency,
    uniform_capacities,
    zipf_capacities,
    zipf_targets,
)
from sae_lens_allocation.saes.batch_allocation import (
    BatchAllocationTrainingSAE,
    BatchAllocationTrainingSAEConfig,
)
from sae_lens_allocation.training.calibration import ZBlock, feature_choice_thresholds
from sae_lens_allocation.validation import UsageError, field_error

CAPACITIES = ("uniform", "zipf")


@dataclass(kw_only=True)
class FeatureChoiceTrainingSAEConfig(BatchAllocationTrainingSAEConfig):
    """Feature Choice training config.

    capacity: "uniform" | "zipf", how the budget M = floor(k * N) is split over latents.
    zipf_exponent: s in m_j ~ rank_j^(-s) (capacity="zipf" only), > 0.
    capacity_seed: seed of the randomised rounding of uniform capacities.
    """

    capacity: Literal["uniform", "zipf"] = "uniform"
    zipf_exponent: float = 1.0
    capacity_seed: int = 0

    @override
    @classmethod
    def architecture(cls) -> str:
        return "feature_choice"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.capacity not in CAPACITIES:
            raise field_error("capacity", self.capacity, f"one of {CAPACITIES}")
        if not (isinstance(self.zipf_exponent, (int, float)) and 0 < self.zipf_exponent < math.inf):
            raise field_error("zipf_exponent", self.zipf_exponent, "a finite number > 0")

    def check_batch_tokens(self, n_tokens: int) -> None:
        """Every latent needs m_j >= 1, so the budget must cover the latents: floor(k*N) >= d_sae."""
        if budget(n_tokens, self.k) < self.d_sae:
            raise UsageError(
                f"train_batch_size_tokens={n_tokens} is too small for feature_choice capacities: "
                f"floor(k * N) = {budget(n_tokens, self.k)} < d_sae = {self.d_sae}; need "
                f"train_batch_size_tokens >= {math.ceil(self.d_sae / self.k)} (or a larger k)"
            )


class FeatureChoiceTrainingSAE(BatchAllocationTrainingSAE):
    """Feature Choice: latent j picks its top-m_j tokens of the batch."""

    cfg: FeatureChoiceTrainingSAEConfig  # type: ignore[assignment]

    def __init__(self, cfg: FeatureChoiceTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self._generator = torch.Generator().manual_seed(cfg.capacity_seed)
        # Tokens per training batch, so the export can reproduce the firing fractions m_j / N.
        self.register_buffer(
            "capacity_tokens", torch.zeros((), dtype=torch.long, device=self.W_dec.device)
        )

    def capacities(self, n_tokens: int) -> torch.Tensor:
        """m_j for a batch of n_tokens tokens ([F], long, sums to floor(k * N))."""
        self.cfg.check_batch_tokens(n_tokens)
        if self.cfg.capacity == "uniform":
            return uniform_capacities(n_tokens, self.cfg.d_sae, self.cfg.k, self._generator)
        ranks = ranks_from_frequency(self.firing_ema.detach().cpu())
        return zipf_capacities(n_tokens, self.cfg.k, ranks, self.cfg.zipf_exponent, self._generator)

    @override
    def allocate(self, hidden_pre: torch.Tensor) -> Allocation:
        # Capacities from the global budget; one process: allocation.feature_choice, data
        # parallel: exact over the global batch (global_allocation.py).
        n_tokens = self.batch_group.total_rows(hidden_pre.shape[:-1].numel(), hidden_pre.device)
        self.capacity_tokens.fill_(n_tokens)
        # Host capacities: on a GPU the kernel sizes its buffers from them without a sync.
        return self.batch_group.feature_choice(hidden_pre, self.capacities(n_tokens))

    @override
    def update_running_threshold(self, allocation: Allocation) -> None:
        self._ema_threshold(allocation.cutoff.nan_to_num(posinf=0.0), torch.isfinite(allocation.cutoff))

    def firing_fractions(self) -> torch.Tensor:
        """q_j = E[m_j] / N at the training batch size: k / F for uniform capacities, the expected
        Zipf capacity over N otherwise."""
        if self.cfg.capacity == "uniform":
            return torch.full((self.cfg.d_sae,), self.cfg.k / self.cfg.d_sae, dtype=torch.float64)
        n_tokens = int(self.capacity_tokens) or self.cfg.calibration_tokens
        ranks = ranks_from_frequency(self.firing_ema.detach().cpu())
        return zipf_targets(n_tokens, self.cfg.k, ranks, self.cfg.zipf_exponent).double() / n_tokens

    @override
    def calibrated_thresholds(
        self, z_block: ZBlock, folds: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        budget = self.cfg.calibration_chunk_tokens * self.cfg.d_sae
        return feature_choice_thresholds(z_block, self.firing_fractions(), folds, budget)
