"""Mutual Choice SAE ("mutual_choice"), Ayonrinde 2024 (arXiv 2411.02124).

Training: S = the M = floor(k * N) largest entries of relu(z) over the whole N x F batch matrix,
so tokens receive a variable number of latents (mean k). Same operator as SAELens `batchtopk`.
Export: SAELens `jumprelu` with one global threshold theta calibrated so that mean L0 = k on
calibration activations, its out-of-fold mean L0 recorded (project definition, calibration.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from typing_extensions import override

from sae_lens_allocation.allocation import Allocation, budget
from sae_lens_allocation.saes.batch_allocation import (
    BatchAllocationTrainingSAE,
    BatchAllocationTrainingSAEConfig,
)
from sae_lens_allocation.saes.calibration import ZBlock, mutual_choice_threshold
from sae_lens_allocation.validation import field_error


@dataclass(kw_only=True)
class MutualChoiceTrainingSAEConfig(BatchAllocationTrainingSAEConfig):
    """Mutual Choice training config. Fields as BatchAllocationTrainingSAEConfig; the auxiliary
    loss defaults to `aux_zipf`, since Mutual Choice can starve latents (the paper's remedy)."""

    aux_loss: str = "aux_zipf"

    @override
    @classmethod
    def architecture(cls) -> str:
        return "mutual_choice"

    def check_batch_tokens(self, n_tokens: int) -> None:
        """The batch budget M = floor(k * N) must be >= 1, or every code of every batch is zero."""
        if budget(n_tokens, self.k) < 1:
            raise field_error(
                "train_batch_size_tokens", n_tokens,
                f"floor(k * N) >= 1 for mutual_choice (k={self.k}: floor(k * N) = "
                f"{budget(n_tokens, self.k)}, every code would be zero); use "
                f"train_batch_size_tokens >= {math.ceil(1 / self.k)} or a larger k",
            )


class MutualChoiceTrainingSAE(BatchAllocationTrainingSAE):
    """Mutual Choice: one global top-(k*N) over the batch x latents matrix."""

    cfg: MutualChoiceTrainingSAEConfig

    @override
    def allocate(self, hidden_pre: torch.Tensor) -> Allocation:
        # One process: allocation.mutual_choice; data parallel: exact over the global batch.
        return self.batch_group.mutual_choice(hidden_pre, self.cfg.k)

    @override
    def update_running_threshold(self, cutoff: torch.Tensor) -> None:
        self._ema_threshold(cutoff)

    @override
    def calibrated_thresholds(
        self, z_block: ZBlock, folds: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        budget = self.cfg.calibration_chunk_tokens * self.cfg.d_sae
        theta, stats = mutual_choice_threshold(z_block, self.cfg.d_sae, folds, self.cfg.k, budget)
        return theta.expand(self.cfg.d_sae), stats
