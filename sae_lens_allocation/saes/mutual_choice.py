"""Mutual Choice SAE ("mutual_choice"), Ayonrinde 2024 (arXiv 2411.02124).

Training: S = the M = floor(k * N) largest entries of relu(z) over the whole N x F batch matrix,
so tokens receive a variable number of latents (mean k). Same operator as SAELens `batchtopk`.
Export: SAELens `jumprelu` with one global threshold theta calibrated so that mean L0 = k on
calibration activations, its out-of-fold mean L0 recorded (project definition, calibration.py).

With `min_tokens_per_latent` m > 0 (project definition, docs/architectures.md#per-latent-floor):
every latent first keeps its m largest z of the batch, then the rest of the budget,
floor(k N) - F m, goes to the largest remaining relu(z) (`allocation.floored_mutual_choice`,
which proves this maximises the kept mass under the floor). Export: per-latent thresholds
min(theta, phi_j), phi_j the floor's quantile threshold (calibration.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from typing_extensions import override

from sae_lens_allocation.allocation import Allocation, budget, floor_budget
from sae_lens_allocation.saes.batch_allocation import (
    BatchAllocationTrainingSAE,
    BatchAllocationTrainingSAEConfig,
)
from sae_lens_allocation.saes.calibration import (
    ZBlock,
    floored_mutual_choice_thresholds,
    mutual_choice_threshold,
)
from sae_lens_allocation.validation import field_error, is_int


@dataclass(kw_only=True)
class MutualChoiceTrainingSAEConfig(BatchAllocationTrainingSAEConfig):
    """Mutual Choice training config. Fields as BatchAllocationTrainingSAEConfig; the auxiliary
    loss defaults to `aux_zipf`, since Mutual Choice can starve latents (the paper's remedy).

    min_tokens_per_latent: m, tokens every latent keeps per batch before the rest of the budget is
        shared (0: the paper's rule exactly); an integer >= 0 with F m <= floor(k N) and m <= N
        (checked against the batch size by `check_batch_tokens` and on every batch).
    """

    aux_loss: str = "aux_zipf"
    min_tokens_per_latent: int = 0

    @override
    @classmethod
    def architecture(cls) -> str:
        return "mutual_choice"

    def __post_init__(self) -> None:
        super().__post_init__()
        floor = self.min_tokens_per_latent
        if not is_int(floor) or floor < 0:
            raise field_error("min_tokens_per_latent", floor, "an integer >= 0")

    def check_batch_tokens(self, n_tokens: int) -> None:
        """The batch budget M = floor(k * N) must be >= 1, or every code of every batch is zero;
        with a floor m, F m <= M and m <= N."""
        floor = self.min_tokens_per_latent
        if floor:
            try:
                floor_budget(n_tokens, self.d_sae, self.k, floor)
            except ValueError:
                raise field_error(
                    "min_tokens_per_latent", floor,
                    f"d_sae * m <= floor(k * N) and m <= N for train_batch_size_tokens N = "
                    f"{n_tokens} (d_sae={self.d_sae}, k={self.k}: floor(k * N) = "
                    f"{budget(n_tokens, self.k)}, so m <= {budget(n_tokens, self.k) // self.d_sae})",
                ) from None
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

    def __init__(self, cfg: MutualChoiceTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        if cfg.min_tokens_per_latent:
            # Tokens per training batch, so the export can reproduce the floor's rate m / N.
            self.register_buffer(
                "floor_tokens", torch.zeros((), dtype=torch.long, device=self.W_dec.device)
            )

    @override
    def allocate(self, hidden_pre: torch.Tensor) -> Allocation:
        # One process: allocation.mutual_choice; data parallel: exact over the global batch.
        floor = self.cfg.min_tokens_per_latent
        if not floor:
            return self.batch_group.mutual_choice(hidden_pre, self.cfg.k)
        allocation = self.batch_group.floored_mutual_choice(hidden_pre, self.cfg.k, floor)
        self.floor_tokens.fill_(
            self.batch_group.total_rows(hidden_pre.shape[:-1].numel(), hidden_pre.device)
        )
        return allocation

    @override
    def update_running_threshold(self, cutoff: torch.Tensor) -> None:
        self._ema_threshold(cutoff)

    @override
    def calibrated_thresholds(
        self, z_block: ZBlock, folds: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        budget = self.cfg.calibration_chunk_tokens * self.cfg.d_sae
        floor = self.cfg.min_tokens_per_latent
        if floor:
            # The floor's rate m / N at the training batch size (before training: at the
            # calibration row count, as Feature Choice does).
            n_tokens = int(self.floor_tokens) or self.cfg.calibration_tokens
            return floored_mutual_choice_thresholds(
                z_block, self.cfg.d_sae, floor / n_tokens, folds, self.cfg.k, budget,
                shards=self.batch_group,
            )
        theta, stats = mutual_choice_threshold(
            z_block, self.cfg.d_sae, folds, self.cfg.k, budget, shards=self.batch_group
        )
        return theta.expand(self.cfg.d_sae), stats
