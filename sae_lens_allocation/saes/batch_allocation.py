"""Shared base of the batch-allocation SAEs (Mutual Choice, Feature Choice).

Training: pre-activations as SAELens TopK computes them, z = ((x - b_dec) W_enc + b_enc) * ||W_dec_i||
when `rescale_acts_by_decoder_norm`; codes f = relu(z) * S with S chosen by the architecture's
allocation rule over the whole batch (`allocate`). Inference: SAELens `jumprelu`,
f = relu(z) * [z > theta], with theta calibrated after training (calibration.py). In `eval()` mode
the training SAE already encodes with those thresholds, so in-training evals measure the export.

Calibration data, in order of preference: a source set with `set_calibration_source` (the plugin's
`train()` attaches the runner's activation store, so the final save calibrates on fresh batches
the SAE never trained on), else the last `calibration_tokens` training rows (each seen once, in
the final steps), else the running estimate of the training cut-off.
"""

from __future__ import annotations

import math
import warnings
from abc import abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sae_lens.saes.jumprelu_sae import JumpReLUSAEConfig
from sae_lens.saes.sae import SAEConfig, TrainStepInput, TrainStepOutput
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from typing_extensions import override

from sae_lens_allocation.allocation import Allocation
from sae_lens_allocation.loading import load_sae
from sae_lens_allocation.training.calibration import iter_rows
from sae_lens_allocation.training.losses import AuxLossConfig, AuxLossMixin
from sae_lens_allocation.validation import field_error, is_finite_number

_SUPPORTED_NORMALIZATION = ("none", "expected_average_only_in")



@dataclass(kw_only=True)
class BatchAllocationTrainingSAEConfig(AuxLossConfig, TopKTrainingSAEConfig):
    """Fields shared by Mutual Choice and Feature Choice.

    k: mean L0 per token, the budget M = floor(k * N) per batch of N tokens (float, 0 < k < d_sae).
    calibration_tokens: activation rows used to calibrate the export thresholds.
    calibration_chunk_tokens: rows encoded at once while calibrating (bounds memory).
    threshold_ema_rate: rate of the running cut-off estimate (the fallback threshold).
    Inherited from SAELens TopK: rescale_acts_by_decoder_norm (default True), decoder_init_norm.
    """

    k: float = 32.0  # type: ignore[assignment]
    calibration_tokens: int = 32768
    calibration_chunk_tokens: int = 4096
    threshold_ema_rate: float = 0.01

    @override
    def get_inference_config_class(self) -> type[SAEConfig]:
        return JumpReLUSAEConfig

    def __post_init__(self) -> None:
        super().__post_init__()
        self.validate_aux_loss()
        if isinstance(self.k, bool) or not isinstance(self.k, (int, float)):
            raise field_error("k", self.k, "a number with 0 < k < d_sae")
        if not (math.isfinite(self.k) and 0 < self.k < self.d_sae):
            raise field_error("k", self.k, f"0 < k < d_sae (d_sae={self.d_sae})")
        if self.use_sparse_activations:
            raise field_error(
                "use_sparse_activations", True, "False (batch allocation produces dense codes)"
            )
        if self.normalize_activations not in _SUPPORTED_NORMALIZATION:
            raise field_error(
                "normalize_activations",
                self.normalize_activations,
                f"one of {_SUPPORTED_NORMALIZATION} (thresholds are calibrated in input units)",
            )
        for name in ("calibration_tokens", "calibration_chunk_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise field_error(name, value, "an integer >= 1")
        if not (is_finite_number(self.threshold_ema_rate) and 0 < self.threshold_ema_rate <= 1):
            raise field_error("threshold_ema_rate", self.threshold_ema_rate, "0 < rate <= 1")


class BatchAllocationTrainingSAE(AuxLossMixin, TopKTrainingSAE):
    """Training SAE whose codes come from a batch allocation rule and whose export is `jumprelu`.

    Subclasses implement `allocate(hidden_pre)` and `update_running_threshold(allocation)`, and
    `calibrated_thresholds(chunks, n_tokens)`.
    """

    cfg: BatchAllocationTrainingSAEConfig  # type: ignore[assignment]
    threshold: torch.Tensor

    def __init__(self, cfg: BatchAllocationTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)  # type: ignore[arg-type]
        device = self.W_dec.device
        # The export threshold (JumpReLU's parameter name), in units of z.
        self.register_buffer("threshold", torch.zeros(cfg.d_sae, device=device))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool, device=device))
        # Recent training rows for calibration. A plain attribute, not a buffer: it is not saved
        # (refilled after a resume) and must not exist on the meta device SAELens loads onto.
        self.calibration_rows: torch.Tensor | None = None
        self._calibration_pos = 0
        self._calibration_source: Callable[[], torch.Tensor] | Iterable[torch.Tensor] | None = None
        self.init_aux_loss_state()

    # -- encoding -------------------------------------------------------------------------
    @abstractmethod
    def allocate(self, hidden_pre: torch.Tensor) -> Allocation:
        """The training-time selection over the whole batch (all leading dims)."""

    @abstractmethod
    def update_running_threshold(self, allocation: Allocation) -> None:
        """Fold this batch's cut-off into the running threshold estimate."""

    @abstractmethod
    def calibrated_thresholds(
        self, chunks: Iterable[torch.Tensor], max_tokens: int
    ) -> tuple[torch.Tensor, int]:
        """Export thresholds from chunks of z (calibration.py); returns (theta, N_cal)."""

    def hidden_pre(self, x: torch.Tensor) -> torch.Tensor:
        """z as SAELens TopK computes it (decoder-norm rescaled when configured)."""
        sae_in = self.process_sae_in(x)
        hidden_pre = self.hook_sae_acts_pre(sae_in @ self.W_enc + self.b_enc)
        if self.cfg.rescale_acts_by_decoder_norm:
            hidden_pre = hidden_pre * self.W_dec.norm(dim=-1)
        return hidden_pre

    @override
    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training mode: the batch allocation rule. Eval mode: the export's JumpReLU,
        relu(z) * [z > theta], which depends on no other token."""
        hidden_pre = self.hidden_pre(x)
        if self.training:
            allocation = _allocate_eagerly(self, hidden_pre)
            self._last_allocation = allocation
            feature_acts = allocation.codes
        else:
            theta = self.threshold.to(hidden_pre.dtype)
            feature_acts = hidden_pre.relu() * (hidden_pre > theta)
        return self.hook_sae_acts_post(feature_acts), hidden_pre

    @override
    def train(self, mode: bool = True) -> BatchAllocationTrainingSAE:
        # Entering eval mode mid-training: recalibrate on the recent rows so evals measure what
        # an export of the current weights would do.
        if not mode and self.training and self.calibration_rows is not None:
            self.calibrate_thresholds(self.calibration_rows, source_name="training-tail")
        return super().train(mode)  # type: ignore[return-value]

    # -- training step ----------------------------------------------------------------------
    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        self._remember_rows(step_input.sae_in)
        output = super().training_forward_pass(step_input)
        if not torch.isfinite(output.loss):
            raise FloatingPointError(
                f"{self.cfg.architecture()} training met a non-finite loss "
                f"({output.loss.item()}) at step {step_input.n_training_steps}; stopping before "
                "a broken checkpoint is written. Lower lr, check the activations for NaN/Inf, or "
                "use normalize_activations='expected_average_only_in'."
            )
        allocation = self._last_allocation
        self.update_running_threshold(allocation)
        self.calibrated.fill_(False)
        output.metrics.update(self._step_metrics(output.feature_acts))
        output.metrics.update(self.aux_loss_metrics())
        return output

    def _step_metrics(self, feature_acts: torch.Tensor) -> dict[str, Any]:
        # Lazy: the trainer only evaluates callables on logging steps.
        fired = feature_acts.detach() != 0
        per_token = fired.reshape(-1, fired.shape[-1]).sum(-1).float()
        threshold = self.threshold.detach()
        return {
            "l0_per_token_mean": lambda: per_token.mean(),
            "l0_per_token_std": lambda: per_token.std(),
            "l0_per_token_min": lambda: per_token.min(),
            "l0_per_token_max": lambda: per_token.max(),
            "latents_fired_in_batch": lambda: fired.reshape(-1, fired.shape[-1]).any(0).sum(),
            "threshold_estimate": lambda: threshold.mean(),
        }

    @torch.no_grad()
    def _ema_threshold(self, new: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """theta <- theta + r (new - theta), r = max(rate, 1/(t+1)): the plain mean over the first
        1/rate updates (no slow start from 0, unlike BatchTopK), then an EMA."""
        # Tensor arithmetic throughout: no host sync per step.
        rate = (1.0 / (self.threshold_updates + 1)).clamp(min=self.cfg.threshold_ema_rate)
        new = new.to(self.threshold.dtype).clamp(min=0).expand_as(self.threshold)
        delta = (new - self.threshold) * rate
        if mask is not None:
            delta = torch.where(mask, delta, torch.zeros_like(delta))
        self.threshold.add_(delta)
        self.threshold_updates.add_(1)

    # Eager under torch.compile: dynamo would guard on the Python position counter and the
    # growing buffer's shape (recompiling until it marks them dynamic); eager, no graph sees them.
    @torch.compiler.disable
    @torch.no_grad()
    def _remember_rows(self, sae_in: torch.Tensor) -> None:
        """Ring buffer of the last `calibration_tokens` training rows."""
        rows = sae_in.detach().reshape(-1, self.cfg.d_in)
        cap = self.cfg.calibration_tokens
        if self.calibration_rows is None or self.calibration_rows.device != rows.device:
            self.calibration_rows = rows.new_empty(0, self.cfg.d_in, dtype=torch.float32)
            self._calibration_pos = 0
        if self.calibration_rows.shape[0] < cap:
            take = rows[: cap - self.calibration_rows.shape[0]].to(self.calibration_rows.dtype)
            self.calibration_rows = torch.cat([self.calibration_rows, take])
            rows = rows[take.shape[0] :]
            self._calibration_pos = self.calibration_rows.shape[0] % cap
        rows = rows[-cap:]
        n = rows.shape[0]
        if n == 0:
            return
        idx = (torch.arange(n, device=rows.device) + self._calibration_pos) % cap
        self.calibration_rows[idx] = rows.to(self.calibration_rows.dtype)
        self._calibration_pos = (self._calibration_pos + n) % cap

    # -- calibration --------------------------------------------------------------------------
    def set_calibration_source(
        self, source: Callable[[], torch.Tensor] | Iterable[torch.Tensor] | None
    ) -> None:
        """Where the final save draws held-out activations from: a callable returning a batch of
        raw activation rows (e.g. `ActivationsStore.next_batch`) or an iterable of batches."""
        self._calibration_source = source

    @torch.no_grad()
    def calibrate_thresholds(
        self,
        source: torch.Tensor | Iterable[torch.Tensor] | Callable[[], torch.Tensor],
        n_tokens: int | None = None,
        source_name: str = "held-out",
    ) -> torch.Tensor:
        """Set `threshold` so the JumpReLU encoding reproduces the training allocation on
        `n_tokens` rows of `source` (calibration.py gives the rule). Returns the thresholds."""
        n_tokens = n_tokens or self.cfg.calibration_tokens
        chunk = self.cfg.calibration_chunk_tokens
        was_training = self.training
        # Plain nn.Module.train: our override would recalibrate recursively.
        torch.nn.Module.train(self, True)
        try:
            chunks = (
                self.hidden_pre(rows.to(self.W_enc.device))
                for rows in iter_rows(source, n_tokens, chunk)
            )
            theta, seen = self.calibrated_thresholds(chunks, n_tokens)
        finally:
            torch.nn.Module.train(self, was_training)
        self.threshold.copy_(theta.to(self.threshold.dtype))
        self.calibrated.fill_(True)
        self.cfg.metadata.calibration = {"source": source_name, "tokens": seen}
        return self.threshold

    def _calibrate_for_export(self) -> None:
        if bool(self.calibrated):
            return
        if self._calibration_source is not None:
            self.calibrate_thresholds(self._calibration_source, source_name="held-out")
        elif self.calibration_rows is not None:
            self.calibrate_thresholds(self.calibration_rows, source_name="training-tail")
        else:
            warnings.warn(
                f"{self.cfg.architecture()}: no calibration data (set_calibration_source or "
                "sae_lens_allocation.calibrate); exporting the running threshold estimate",
                stacklevel=3,
            )
            self.cfg.metadata.calibration = {"source": "running-estimate", "tokens": 0}

    # -- export -------------------------------------------------------------------------------
    @override
    def save_inference_model(self, path: str | Path) -> tuple[Path, Path]:
        """Calibrate (unless already calibrated for these weights), then save as `jumprelu`."""
        self._calibrate_for_export()
        return super().save_inference_model(path)

    @override
    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        super().process_state_dict_for_saving_inference(state_dict)
        # Every plugin buffer (firing EMA, Zipf fit, counters) stays behind: JumpReLU loads strictly.
        for name, _ in self.named_buffers():
            if name != "threshold":
                state_dict.pop(name, None)
        # z already includes the decoder norms, which the TopK fold moves into W_enc and b_enc,
        # so theta needs no rescaling.
        state_dict["threshold"] = state_dict["threshold"].to(state_dict["W_enc"].dtype)

    @override
    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        """After the fold the SAE takes raw activations x = x_scaled / s; with decoder-norm
        rescaling z shrinks by s too (TopK's fold divides W_dec by s)."""
        super().fold_activation_norm_scaling_factor(scaling_factor)
        if self.cfg.rescale_acts_by_decoder_norm:
            self.threshold /= scaling_factor
        if self.calibration_rows is not None:
            self.calibration_rows /= scaling_factor
        self.calibrated.fill_(False)


@torch.compiler.disable
def _allocate_eagerly(sae: BatchAllocationTrainingSAE, hidden_pre: torch.Tensor) -> Allocation:
    """`sae.allocate`, run eagerly under `compile_sae: true`: the allocation reads data-dependent
    sizes and host values (capacities, candidate counts) that would break or specialise the
    graph; the encoder, decoder and losses around it are still compiled."""
    return sae.allocate(hidden_pre)


def calibrate(
    sae: BatchAllocationTrainingSAE | str | Path,
    source: torch.Tensor | Iterable[torch.Tensor] | Callable[[], torch.Tensor],
    n_tokens: int | None = None,
    device: str | None = None,
) -> BatchAllocationTrainingSAE:
    """Calibrate the export thresholds of a Mutual/Feature Choice training SAE on held-out
    activations, in place, and return the SAE.

    `sae` is a training SAE or the path of a training checkpoint (loaded with
    `sae_lens_allocation.load_sae`). `source` gives raw activations at the SAE's hook: a tensor,
    an iterable of batches, or a callable such as `ActivationsStore.next_batch`. `n_tokens`
    defaults to the config's `calibration_tokens`. Save the export afterwards with
    `sae.save_inference_model(path)` (which does not recalibrate once calibrated).
    """
    if not isinstance(sae, torch.nn.Module):
        sae = load_sae(sae, device=device or "cpu")
    if not isinstance(sae, BatchAllocationTrainingSAE):
        raise ValueError(
            f"calibrate() needs a mutual_choice or feature_choice training SAE, got "
            f"{type(sae).__name__}; exported jumprelu SAEs are already calibrated"
        )
    sae.calibrate_thresholds(source, n_tokens=n_tokens, source_name="held-out")
    return sae
