"""Feature Choice SAE ("feature_choice"), Ayonrinde 2024 (arXiv 2411.02124).

Training: each latent j keeps the m_j tokens of the batch with the largest z_j, then relu
("each feature matches with at most m tokens"; paper). Capacities (project definition,
docs/architectures.md#feature-choice-capacities): `capacity="uniform"` gives m_j = M/F with
randomised rounding, sum_j m_j = M = floor(k * N); `capacity="zipf"` gives m_j proportional to
rank_j^(-s), s = `zipf_exponent`, floored at 1, capped at N, renormalised to sum M. Every latent
gets m_j >= 1 tokens per batch, so none is dead by construction.
Zipf ranking (project definition, docs/architectures.md#zipf-ranking): not by the latent's own firing rate,
which under Feature Choice is mostly its capacity (ranking by it froze the initial order, the
latent index), but by how often z_j would be selected by Mutual Choice on the same batch:
u_j = EMA over steps of the fraction of tokens n with z_nj among the floor(k*N) largest entries of
relu(z) (ties by the positive mass EMA of relu(z_j)). Uniform capacities for the first
`capacity_warmup_steps` steps, then the ranks are recomputed every `capacity_rerank_steps` steps.
Export: SAELens `jumprelu` with per-latent thresholds theta_j, the (1 - a q_j) quantile of z_j on
calibration tokens, q_j = E[m_j] / N the training firing fraction and the level a cross-fitted over
document folds so the out-of-fold mean L0 is sum_j q_j = k (calibration.py).

`training_rule="thresholds"` (project definition, docs/architectures.md#feature-choice-trained-with-thresholds)
trains with the export's rule instead: f = relu(z) * [z > theta], the thresholds tracking each
latent's target rate q_j by quantile tracking (`update_thresholds`), so the export is the
training-mode encoder and needs no calibration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput
from typing_extensions import override

from sae_lens_allocation.allocation import (
    Allocation,
    budget,
    ranks_from_frequency,
    uniform_capacities,
    zipf_capacities,
    zipf_targets,
)
from sae_lens_allocation.allocation.transfer import copy_to_host, wait_for_host_copy
from sae_lens_allocation.saes.batch_allocation import (
    BatchAllocationTrainingSAE,
    BatchAllocationTrainingSAEConfig,
)
from sae_lens_allocation.saes.calibration import ZBlock, feature_choice_thresholds
from sae_lens_allocation.saes.zipf import update_firing_ema
from sae_lens_allocation.validation import UsageError, field_error, is_finite_number

CAPACITIES = ("uniform", "zipf")
TRAINING_RULES = ("top_m", "thresholds")
# Smallest step scale, as a fraction of the mean threshold, so a threshold at 0 can rise again.
_MIN_SCALE_FRACTION = 0.1


@dataclass(kw_only=True)
class FeatureChoiceTrainingSAEConfig(BatchAllocationTrainingSAEConfig):
    """Feature Choice training config.

    capacity: "uniform" | "zipf", how the budget M = floor(k * N) is split over latents.
    zipf_exponent: s in m_j ~ rank_j^(-s) (capacity="zipf" only), > 0.
    capacity_seed: seed of the randomised rounding of uniform capacities.
    capacity_warmup_steps: capacity="zipf": training steps with uniform capacities while the rank
        statistic accumulates; the first Zipf ranking is taken after this many steps; >= 1.
    capacity_rerank_steps: capacity="zipf": steps between re-rankings after the warm-up; >= 1.
    training_rule: "top_m" (the paper's: latent j keeps its top-m_j tokens of the batch) or
        "thresholds" (the export's rule, f = relu(z) [z > theta_j], theta_j tracking the rate
        q_j = E[m_j] / N; no calibration).
    threshold_learning_rate: eta of the threshold tracking (training_rule="thresholds"), in
        units of the latent's threshold per step; 0 < eta <= 1.
    """

    capacity: Literal["uniform", "zipf"] = "uniform"
    zipf_exponent: float = 1.0
    capacity_seed: int = 0
    capacity_warmup_steps: int = 1
    capacity_rerank_steps: int = 1
    training_rule: Literal["top_m", "thresholds"] = "top_m"
    threshold_learning_rate: float = 0.05

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
        for name in ("capacity_warmup_steps", "capacity_rerank_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise field_error(name, value, "an integer >= 1")
        if self.training_rule not in TRAINING_RULES:
            raise field_error("training_rule", self.training_rule, f"one of {TRAINING_RULES}")
        rate = self.threshold_learning_rate
        if not (is_finite_number(rate) and 0 < rate <= 1):
            raise field_error("threshold_learning_rate", rate, "a number with 0 < rate <= 1")
        if self.training_rule == "thresholds" and self.latent_shards > 1:
            raise field_error(
                "latent_shards", self.latent_shards,
                "1 with training_rule='thresholds' (its step scale reads the mean threshold of "
                "every latent; latent sharding trains training_rule='top_m')",
            )

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

    cfg: FeatureChoiceTrainingSAEConfig

    def __init__(self, cfg: FeatureChoiceTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self._generator = torch.Generator().manual_seed(cfg.capacity_seed)
        # Tokens per training batch, so the export can reproduce the firing fractions m_j / N.
        device = self.W_dec.device
        self.register_buffer("capacity_tokens", torch.zeros((), dtype=torch.long, device=device))
        # Zipf ranking state (training checkpoints keep it; the export drops every buffer but the
        # threshold): EMAs of the Mutual Choice selection rate u_j and of the positive mass
        # E[relu(z_j)], their update count, and the ranks the capacities use.
        d_sae = cfg.d_sae
        self.register_buffer("rank_selection_ema", torch.zeros(d_sae, device=device))
        self.register_buffer("rank_mass_ema", torch.zeros(d_sae, device=device))
        self.register_buffer("rank_updates", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer(
            "capacity_ranks", torch.arange(1, d_sae + 1, dtype=torch.long, device=device)
        )
        # Host mirrors, so a training step reads nothing from the device for them: the update
        # count, and the ranks as of the last re-ranking, copied without blocking when they
        # change and waited for (an event long complete by then) at the next step.
        self._rank_updates_seen = 0
        self._host_ranks: tuple[torch.Tensor, Any] | None = None
        # training_rule="thresholds": whether the thresholds have been set from a batch (a host
        # mirror of threshold_updates > 0, so no step reads the device for it).
        self._thresholds_started = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before the rank buffers existed ranked by the firing EMA: keep that
        # ranking and the step count, so their export calibrates to the capacities they trained
        # with; a resumed run then re-ranks from a rank statistic that starts at zero.
        if prefix + "capacity_ranks" not in state_dict and prefix + "firing_ema" in state_dict:
            firing = state_dict[prefix + "firing_ema"]
            state_dict[prefix + "capacity_ranks"] = ranks_from_frequency(firing)
            state_dict[prefix + "rank_updates"] = state_dict.get(
                prefix + "firing_ema_steps", torch.zeros((), dtype=torch.long)
            )
            state_dict[prefix + "rank_selection_ema"] = torch.zeros_like(firing)
            state_dict[prefix + "rank_mass_ema"] = torch.zeros_like(firing)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "rank_updates" in state_dict:
            self._rank_updates_seen = int(state_dict[prefix + "rank_updates"])
        if prefix + "threshold_updates" in state_dict:
            self._thresholds_started = int(state_dict[prefix + "threshold_updates"]) > 0
        self._host_ranks = None

    def zipf_ranked(self) -> bool:
        """True once Zipf capacities are in use: capacity="zipf" and the warm-up is over."""
        return self.cfg.capacity == "zipf" and self._rank_updates_seen >= self.cfg.capacity_warmup_steps

    def capacities(self, n_tokens: int) -> torch.Tensor:
        """m_j for a batch of n_tokens tokens ([F], long, sums to floor(k * N)): uniform, or Zipf
        by `capacity_ranks` once the warm-up is over. With latent shards, every shard draws the
        capacities of all F latents (same generator, same draws) and keeps its own slice."""
        self.cfg.check_batch_tokens(n_tokens)
        group = self.batch_group
        if not self.zipf_ranked():
            n_latents = self.cfg.d_sae * group.shards
            caps = uniform_capacities(n_tokens, n_latents, self.cfg.k, self._generator)
        else:
            ranks = self.host_capacity_ranks()
            caps = zipf_capacities(n_tokens, self.cfg.k, ranks, self.cfg.zipf_exponent, self._generator)
        return group.local_latents(caps)

    @torch.no_grad()
    def update_rank_statistic(self, hidden_pre: torch.Tensor) -> None:
        """One update of the Zipf rank statistic from a training batch's z (all leading dims).

        u_j <- EMA of (1/N) sum_n [entry (n, j) in the Mutual Choice selection of the batch, the
        floor(k*N) largest relu(z)]; mass_j <- EMA of (1/N) sum_n relu(z_nj); both with the
        firing EMA's rule (`zipf.update_firing_ema`, decay `firing_ema_decay`). After
        `capacity_warmup_steps` updates and every `capacity_rerank_steps` after that,
        capacity_ranks <- ranks by descending u, ties by descending mass, then index.
        """
        z = hidden_pre.detach().reshape(-1, hidden_pre.shape[-1])
        # Over the global batch under data parallel (allocation/global_merge.py), as the capacities.
        group = self.batch_group
        n_tokens = group.total_rows(z.shape[0], z.device)
        selected = group.sum((group.mutual_choice(z, self.cfg.k).codes != 0).float().sum(0)) / n_tokens
        mass = group.sum(z.relu().float().sum(0)) / n_tokens
        self.rank_updates += 1
        self._rank_updates_seen += 1
        decay = self.cfg.firing_ema_decay
        self.rank_selection_ema.copy_(
            update_firing_ema(self.rank_selection_ema, selected, self.rank_updates, decay)
        )
        self.rank_mass_ema.copy_(update_firing_ema(self.rank_mass_ema, mass, self.rank_updates, decay))
        since_warmup = self._rank_updates_seen - self.cfg.capacity_warmup_steps
        if since_warmup >= 0 and since_warmup % self.cfg.capacity_rerank_steps == 0:
            # The ranking is over all F latents: with latent shards, of the gathered EMAs.
            ranks = ranks_from_frequency(
                group.gather_latents(self.rank_selection_ema), group.gather_latents(self.rank_mass_ema)
            )
            self.capacity_ranks.copy_(group.local_latents(ranks))
            self._host_ranks = copy_to_host(ranks)

    def host_capacity_ranks(self) -> torch.Tensor:
        """The ranks of all F latents on the host: the copy started at the last re-ranking
        (waiting for it if it has not landed), or a blocking copy after a load."""
        if self._host_ranks is None:
            self._host_ranks = copy_to_host(self.batch_group.gather_latents(self.capacity_ranks))
        return wait_for_host_copy(self._host_ranks)

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        output = super().training_forward_pass(step_input)
        if self.training and self.cfg.capacity == "zipf":
            self.update_rank_statistic(output.hidden_pre)
        if self.cfg.training_rule == "thresholds":
            # The trained thresholds are the export's: no calibration replaces them.
            self.calibrated.fill_(True)
            self.cfg.metadata.calibration = {"source": "training-thresholds", "tokens": 0}
        return output

    @override
    def allocate(self, hidden_pre: torch.Tensor) -> Allocation:
        # Capacities from the global budget; one process: allocation.feature_choice, data
        # parallel: exact over the global batch (allocation/global_merge.py).
        n_tokens = self.batch_group.total_rows(hidden_pre.shape[:-1].numel(), hidden_pre.device)
        self.capacity_tokens.fill_(n_tokens)
        if self.cfg.training_rule == "thresholds":
            return self._threshold_allocation(hidden_pre, n_tokens)
        # Host capacities: on a GPU the kernel sizes its buffers from them without a sync.
        return self.batch_group.feature_choice(hidden_pre, self.capacities(n_tokens))

    @override
    def training_rule_codes(self, hidden_pre: torch.Tensor, k: float | None = None) -> torch.Tensor:
        # The capacities' randomised rounding draws from the training generator: put its state
        # back, so a comparison at calibration leaves later training steps as they were.
        state = self._generator.get_state()
        try:
            return super().training_rule_codes(hidden_pre, k)
        finally:
            self._generator.set_state(state)

    def _threshold_allocation(self, hidden_pre: torch.Tensor, n_tokens: int) -> Allocation:
        """training_rule="thresholds": f = relu(z) [z > theta], the export's JumpReLU. The first
        batch sets theta_j to its Feature Choice cut-off (the m_j-th largest z_j, over the global
        batch), so the rates start at their targets."""
        if not self._thresholds_started:
            with torch.no_grad():
                start = self.batch_group.feature_choice(hidden_pre, self.capacities(n_tokens))
                self.threshold.copy_(start.cutoff.to(self.threshold.dtype).clamp(min=0))
            self._thresholds_started = True
        theta = self.threshold.to(hidden_pre.dtype)
        codes = hidden_pre.relu() * (hidden_pre > theta)
        # This rank's firing counts, for the step's threshold update (the codes are not kept).
        self._last_fired = (codes.detach() != 0).reshape(-1, codes.shape[-1]).sum(0)
        return Allocation(codes=codes, cutoff=self.threshold)

    @override
    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        # The base class rescales theta with the weights; trained thresholds stay the export's.
        trained = self.cfg.training_rule == "thresholds" and bool(self.calibrated)
        super().fold_activation_norm_scaling_factor(scaling_factor)
        if trained:
            self.calibrated.fill_(True)

    @override
    def update_running_threshold(self, cutoff: torch.Tensor) -> None:
        if self.cfg.training_rule == "thresholds":
            self.update_thresholds(self._last_fired)
            return
        self._ema_threshold(cutoff.nan_to_num(posinf=0.0), torch.isfinite(cutoff))

    @torch.no_grad()
    def update_thresholds(self, fired: torch.Tensor) -> None:
        """One step of quantile tracking (training_rule="thresholds"; Robbins-Monro on the
        firing rate, project definition, docs/architectures.md#feature-choice-trained-with-thresholds):

            theta_j <- max(0, theta_j + eta s_j (r_j - q_j) / q_j)

        r_j = the fraction of the batch's N tokens on which latent j fired (`fired`: this rank's
        counts of codes != 0; over the global batch, one all-reduce of F counts),
        q_j = `firing_fractions()` (E[m_j] / N), s_j = max(theta_j, 0.1 mean_i theta_i),
        eta = `threshold_learning_rate`.

        The fixed point has E[r_j] = q_j: the rate is the target on average, whatever the scale.
        The error is relative to q_j, so a latent moves as fast at q_j = 1e-3 as at 1e-1; the step
        is relative to theta_j, a quantile of z_j and so its natural unit (the floor lets a
        threshold at 0 rise again). The error is >= -1, so one step lowers theta_j by at most
        eta s_j; it is not clipped above: a clip would bias every bursty latent (one that fires on
        many times q_j N tokens of some batches) above its rate, and early in training, when z
        grows fast, the large errors let the thresholds catch up (measured on the embedded model:
        a clip at 3 let the training L0 reach 38 k, none 9 k). theta >= 0: below 0 the code
        relu(z) [z > theta] no longer changes."""
        fired = self.batch_group.sum(fired)
        n_tokens = self.capacity_tokens.to(self.threshold.dtype)
        target = self.firing_fractions().to(self.threshold)
        error = (fired.to(self.threshold.dtype) / n_tokens - target) / target
        theta = self.threshold
        scale = torch.maximum(theta, _MIN_SCALE_FRACTION * theta.mean())
        self.threshold.copy_((theta + self.cfg.threshold_learning_rate * scale * error).clamp(min=0))
        self.threshold_updates.add_(1)

    def firing_fractions(self) -> torch.Tensor:
        """q_j = E[m_j] / N at the training batch size: k / F for uniform capacities (and during
        the Zipf warm-up), the expected Zipf capacity by `capacity_ranks` over N otherwise. With
        latent shards, F counts every shard's latents and this shard's slice is returned."""
        group = self.batch_group
        n_latents = self.cfg.d_sae * group.shards
        if not self.zipf_ranked():
            return torch.full((self.cfg.d_sae,), self.cfg.k / n_latents, dtype=torch.float64)
        n_tokens = int(self.capacity_tokens) or self.cfg.calibration_tokens
        ranks = group.gather_latents(self.capacity_ranks).cpu()
        targets = zipf_targets(n_tokens, self.cfg.k, ranks, self.cfg.zipf_exponent).double()
        return group.local_latents(targets / n_tokens)

    @override
    def calibrated_thresholds(
        self, z_block: ZBlock, folds: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        budget = self.cfg.calibration_chunk_tokens * self.cfg.d_sae
        return feature_choice_thresholds(
            z_block, self.firing_fractions(), folds, budget, shards=self.batch_group
        )
