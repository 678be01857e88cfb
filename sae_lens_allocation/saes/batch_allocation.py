"""Shared base of the batch-allocation SAEs (Mutual Choice, Feature Choice).

Training: pre-activations as SAELens TopK computes them, z = ((x - b_dec) W_enc + b_enc) * ||W_dec_i||
when `rescale_acts_by_decoder_norm`; codes f = relu(z) * S with S chosen by the architecture's
allocation rule over the whole batch (`allocate`). Inference: SAELens `jumprelu`,
f = relu(z) * [z > theta], with theta calibrated after training (calibration.py gives the rules).

`threshold` holds the running estimate of the training cut-off until `calibrate_thresholds` sets
it; `eval()` mode encodes with whatever it holds and never recalibrates (a stored calibration is
only replaced by an explicit `calibrate_thresholds` call, or by further training steps).

Calibration data, in order of preference: a source set with `set_calibration_source` (the plugin's
`train()` attaches rows training never reads: runner.py), else a uniform random reservoir of
`calibration_tokens` training rows (overlaps training, recorded so), else the running estimate.
"""

from __future__ import annotations

import itertools
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

from sae_lens_allocation.allocation import SINGLE_PROCESS, Allocation
from sae_lens_allocation.loading import load_sae
from sae_lens_allocation.saes.aux_losses import AuxLossConfig, AuxLossMixin
from sae_lens_allocation.saes.calibration import (
    CalibrationRows,
    RowReservoir,
    ZBlock,
    collect_rows,
    document_folds,
)
from sae_lens_allocation.saes.finite_loss import FiniteLossGuard
from sae_lens_allocation.saes.latent_shards import (
    LatentShardMixin,
    LatentShardsConfig,
    validate_latent_shards,
)
from sae_lens_allocation.saes.rule_gap import rule_gap
from sae_lens_allocation.saes.sparse_codes import (
    SparseActivationsMixin,
    firing_per_latent,
    firing_per_token,
    validate_sparse_activations,
)
from sae_lens_allocation.validation import field_error, is_finite_number

RowSource = torch.Tensor | Iterable[torch.Tensor] | Callable[[], torch.Tensor]
CalibrationSource = CalibrationRows | Callable[[], CalibrationRows]

_SUPPORTED_NORMALIZATION = ("none", "expected_average_only_in")



@dataclass(kw_only=True)
class BatchAllocationTrainingSAEConfig(AuxLossConfig, LatentShardsConfig, TopKTrainingSAEConfig):
    """Fields shared by Mutual Choice and Feature Choice.

    k: mean L0 per token, the budget M = floor(k * N) per batch of N tokens (float, 0 < k < d_sae).
    calibration_tokens: activation rows used to calibrate the export thresholds (and the size of
        the training-row reservoir used when no held-out source is attached).
    calibration_chunk_tokens: bounds calibration memory to about this many rows x d_sae entries.
    calibration_folds: document folds of the cross-fit (calibration.py), >= 2.
    calibration_include_special_tokens: keep BOS/EOS/PAD positions in the calibration rows
        (default False: excluded, as `eval` and `compare` count L0 without them).
    calibration_seed: seed of the calibration row sampling, the folds and the reservoir.
    threshold_ema_rate: rate of the running cut-off estimate (the fallback threshold).
    Inherited from SAELens TopK: rescale_acts_by_decoder_norm (default True), decoder_init_norm.
    """

    k: float = 32.0
    calibration_tokens: int = 32768
    calibration_chunk_tokens: int = 4096
    calibration_folds: int = 5
    calibration_include_special_tokens: bool = False
    calibration_seed: int = 0
    threshold_ema_rate: float = 0.01

    @override
    def get_inference_config_class(self) -> type[SAEConfig]:
        return JumpReLUSAEConfig

    def __post_init__(self) -> None:
        super().__post_init__()
        self.validate_aux_loss()
        validate_sparse_activations(self)
        validate_latent_shards(self)
        if isinstance(self.k, bool) or not isinstance(self.k, (int, float)):
            raise field_error("k", self.k, "a number with 0 < k < d_sae")
        if not (math.isfinite(self.k) and 0 < self.k < self.d_sae):
            raise field_error("k", self.k, f"0 < k < d_sae (d_sae={self.d_sae})")
        if self.normalize_activations not in _SUPPORTED_NORMALIZATION:
            raise field_error(
                "normalize_activations",
                self.normalize_activations,
                f"one of {_SUPPORTED_NORMALIZATION} (thresholds are calibrated in input units)",
            )
        for name, low in (("calibration_tokens", 1), ("calibration_chunk_tokens", 1),
                          ("calibration_folds", 2), ("calibration_seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise field_error(name, value, f"an integer >= {low}")
        if not isinstance(self.calibration_include_special_tokens, bool):
            raise field_error(
                "calibration_include_special_tokens", self.calibration_include_special_tokens,
                "true or false",
            )
        if not (is_finite_number(self.threshold_ema_rate) and 0 < self.threshold_ema_rate <= 1):
            raise field_error("threshold_ema_rate", self.threshold_ema_rate, "0 < rate <= 1")


class BatchAllocationTrainingSAE(
    FiniteLossGuard, AuxLossMixin, LatentShardMixin, SparseActivationsMixin, TopKTrainingSAE
):
    """Training SAE whose codes come from a batch allocation rule and whose export is `jumprelu`.

    Subclasses implement `allocate(hidden_pre)`, `update_running_threshold(cutoff)` and
    `calibrated_thresholds(z_block, folds)`.
    """

    cfg: BatchAllocationTrainingSAEConfig
    threshold: torch.Tensor

    def __init__(self, cfg: BatchAllocationTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        device = self.W_dec.device
        # The export threshold (JumpReLU's parameter name), in units of z.
        self.register_buffer("threshold", torch.zeros(cfg.d_sae, device=device))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool, device=device))
        # Tokens per training batch (over all ranks), so calibration can run the training rule
        # at that size (rule_gap.py); 0 until a training step has run.
        self.register_buffer("training_batch_tokens", torch.zeros((), dtype=torch.long, device=device))
        self._batch_tokens_recorded = False
        # A uniform sample of training rows, the last-resort calibration data. A plain attribute,
        # not a buffer: it is not saved (refilled after a resume) and must not exist on the meta
        # device SAELens loads onto.
        self.training_reservoir = RowReservoir(cfg.calibration_tokens, cfg.calibration_seed)
        self._calibration_source: CalibrationSource | RowSource | None = None
        self._calibration_info: dict[str, Any] = {}
        self._warned_uncalibrated = False
        self.init_aux_loss_state()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before the batch size was recorded: unknown (0), so their export
        # skips the training-rule comparison until training runs a step.
        state_dict.setdefault(prefix + "training_batch_tokens", torch.zeros((), dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- encoding -------------------------------------------------------------------------
    @abstractmethod
    def allocate(self, hidden_pre: torch.Tensor) -> Allocation:
        """The training-time selection over the whole batch (all leading dims)."""

    @torch.no_grad()
    def training_rule_codes(self, hidden_pre: torch.Tensor, k: float | None = None) -> torch.Tensor:
        """The training rule's codes of one batch, computed in this process alone (no collective:
        calibration may run on one rank only), at budget `k` (default `cfg.k`, restored after)."""
        group, self.batch_group = self.batch_group, SINGLE_PROCESS
        budget, self.cfg.k = self.cfg.k, self.cfg.k if k is None else k
        try:
            return _allocate_eagerly(self, hidden_pre).codes
        finally:
            self.batch_group = group
            self.cfg.k = budget

    @abstractmethod
    def update_running_threshold(self, cutoff: torch.Tensor) -> None:
        """Fold this batch's cut-off (`Allocation.cutoff`) into the running threshold estimate."""

    @abstractmethod
    def calibrated_thresholds(
        self, z_block: ZBlock, folds: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Export thresholds [F] from z of the calibration rows (`z_block(latents)` gives those
        latents' z for all rows, ordered by fold) and the rows' folds; returns (theta, statistics)."""

    @override
    def get_activation_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        # SAELens' encode_with_hidden_pre computes z (decoder-norm rescaled when configured) and
        # applies this to it, as for its own BatchTopK; the mode is read at each call.
        return self.codes_from_hidden_pre

    def codes_from_hidden_pre(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        """Training mode: the batch allocation rule over all leading dims. Eval mode: the
        export's JumpReLU, relu(z) * [z > theta], which depends on no other token."""
        if self.training:
            allocation = _allocate_eagerly(self, hidden_pre)
            # Only the cut-off is kept: the codes are the step's own (or, in a sparse step, a
            # dense intermediate to free before the backward pass).
            self._last_cutoff = allocation.cutoff
            return allocation.codes
        theta = self.threshold.to(hidden_pre.dtype)
        return hidden_pre.relu() * (hidden_pre > theta)

    @override
    def train(self, mode: bool = True) -> BatchAllocationTrainingSAE:
        """Eval mode encodes with the stored `threshold` and never recalibrates. Before any
        calibration that is the running estimate of the training cut-off (what SAELens'
        in-training evals then measure); a one-time warning says so outside those evals."""
        if not mode and not bool(self.calibrated) and not self._warned_uncalibrated:
            self._warned_uncalibrated = True
            warnings.warn(
                f"{self.cfg.architecture()}: eval mode before calibration encodes with the running "
                "estimate of the training cut-off; call sae.calibrate_thresholds(...) (or "
                "sae_lens_allocation.calibrate) to encode as the export will",
                stacklevel=2,
            )
        return super().train(mode)

    # -- training step ----------------------------------------------------------------------
    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        output = super().training_forward_pass(step_input)
        self.guard_loss(output.loss, step_input.n_training_steps)
        if not self._batch_tokens_recorded:
            # Once per process (one collective under data parallel): the batch size is fixed.
            rows = step_input.sae_in.shape[:-1].numel()
            self.training_batch_tokens.fill_(self.batch_group.total_rows(rows, self.W_dec.device))
            self._batch_tokens_recorded = True
        # The reservoir is the calibration data of last resort: not kept while held-out rows are
        # attached (once full, each update costs two host-to-device copies).
        if self._calibration_source is None:
            self.training_reservoir.add(step_input.sae_in)
        self.update_running_threshold(self._last_cutoff)
        self.calibrated.fill_(False)
        output.metrics.update(self._step_metrics(output.feature_acts))
        output.metrics.update(self.aux_loss_metrics())
        return output

    def _step_metrics(self, feature_acts: torch.Tensor) -> dict[str, Any]:
        # Lazy: the trainer only evaluates callables on logging steps.
        acts = feature_acts.detach()
        per_token = firing_per_token(acts)
        per_latent = firing_per_latent(acts)
        threshold = self.threshold.detach()
        return {
            "l0_per_token_mean": lambda: per_token.mean(),
            "l0_per_token_std": lambda: per_token.std(),
            "l0_per_token_min": lambda: per_token.min(),
            "l0_per_token_max": lambda: per_token.max(),
            "latents_fired_in_batch": lambda: (per_latent > 0).sum(),
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

    # -- calibration --------------------------------------------------------------------------
    def set_calibration_source(
        self, source: CalibrationSource | RowSource | None, info: dict[str, Any] | None = None
    ) -> None:
        """Where `calibrate_thresholds()` (and so the final save) takes its rows from.

        `source`: CalibrationRows; a zero-argument callable returning CalibrationRows (evaluated
        when calibrating; runner.py attaches rows training never reads) or returning the next
        batch of activations (e.g. `ActivationsStore.next_batch`); or an iterable of batches.
        Plain activations are described by `info` (e.g. {"source": "...", "overlaps_training":
        False}), else recorded as an attached source of unknown overlap. None detaches."""
        self._calibration_source = source
        self._calibration_info = info or {}

    def default_calibration_rows(self) -> CalibrationRows | None:
        """The rows an export calibrates on when none are passed: the attached calibration
        source (`set_calibration_source`), else the training-row reservoir; None when empty."""
        src = self._calibration_source
        if src is not None:
            if isinstance(src, CalibrationRows):
                return src
            first = src() if callable(src) else None
            if isinstance(first, CalibrationRows):
                return first
            if first is not None:
                batches: Any = itertools.chain([first], iter(src, None))  # type: ignore[arg-type]
            else:
                batches = src
            rows = collect_rows(batches, self.cfg.calibration_tokens)
            rows.info = {"source": "attached activations", "overlaps_training": None,
                         **rows.info, **self._calibration_info}
            return rows
        reservoir = self.training_reservoir
        if reservoir.rows is None or reservoir.rows.shape[0] == 0:
            return None
        return CalibrationRows(
            reservoir.rows,
            torch.arange(reservoir.rows.shape[0]),
            {
                "source": "training-reservoir",
                "overlaps_training": True,
                "fold_unit": "row",
                "training_rows_seen": reservoir.seen,
                # The stock runner's stream decides (runner config `exclude_special_tokens`).
                "special_tokens_excluded": None,
            },
        )

    @torch.no_grad()
    def calibrate_thresholds(
        self,
        source: CalibrationRows | RowSource | None = None,
        n_tokens: int | None = None,
        documents: torch.Tensor | None = None,
        info: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """Set `threshold` by the calibration rule (calibration.py) and record what was used in
        `cfg.metadata.calibration`; returns the thresholds. This is the only way a calibration
        is replaced.

        `source`: CalibrationRows; or activations at the SAE's hook (a tensor [N, d] or
        [B, S, d], an iterable of batches, a callable returning the next batch) of which the first
        `n_tokens` (default `calibration_tokens`) rows are used, with `documents` (ids per row of
        a tensor) and `info` (merged into the metadata, e.g. {"overlaps_training": False});
        or None: the attached source, else the training-row reservoir."""
        if source is None:
            rows = self.default_calibration_rows()
            if rows is None:
                raise ValueError(
                    f"{self.cfg.architecture()}: no calibration data: pass activations, attach a "
                    "source with set_calibration_source, or train first (training rows are sampled)"
                )
        elif isinstance(source, CalibrationRows):
            rows = source
        else:
            rows = collect_rows(source, n_tokens or self.cfg.calibration_tokens, documents)
            rows.info = {"source": "user", "overlaps_training": None, **rows.info, **(info or {})}
        # Fewer documents than folds (a short or single-document source): as many folds as
        # documents; with one, no cross-fit (recorded as folds 1).
        n_docs = int(torch.unique(rows.documents).numel())
        folds = document_folds(rows.documents, min(self.cfg.calibration_folds, n_docs),
                               self.cfg.calibration_seed)
        order = torch.argsort(folds, stable=True)  # each fold a contiguous run of rows
        acts = rows.acts[order.to(rows.acts.device)]
        theta, stats = self.calibrated_thresholds(self._z_block(acts), folds[order])
        self.threshold.copy_(theta.to(self.threshold.dtype))
        self.calibrated.fill_(True)
        if self.cfg.latent_shards > 1:
            # The comparison runs the training rule in one process on all latents; a shard holds
            # F / S of them, so it is not made (flag None, as without a whole batch).
            gap = {"not_compared": "latent_shards > 1", "trained_and_deployed_under_different_rules": None}
        else:
            # Codes decoded sparse (about k of d_sae entries per row): a dense decode of each code
            # set would cost as much as the encoder pass.
            gap = rule_gap(rows.acts, self._hidden_pre_of_rows, lambda c: self.decode(c.to_sparse()),
                           self.threshold, self.training_rule_codes, self.cfg.k,
                           int(self.training_batch_tokens), self.cfg.calibration_seed)
        self.cfg.metadata.calibration = {
            **rows.info,
            "tokens": int(rows.acts.shape[0]),
            "documents": int(torch.unique(rows.documents).numel()),
            **stats,
            "trained_and_deployed_under_different_rules":
                gap.pop("trained_and_deployed_under_different_rules"),
            "rule_gap": gap,
        }
        return self.threshold

    def _z_block(self, acts: torch.Tensor) -> ZBlock:
        """z of all calibration rows for a block of latents, exactly as `hidden_pre` computes it."""
        sae_in = torch.cat(
            [self.process_sae_in(c.to(self.W_enc.device)) for c in acts.split(self.cfg.calibration_chunk_tokens)]
        )
        norms = self.W_dec.norm(dim=-1) if self.cfg.rescale_acts_by_decoder_norm else None

        def z_block(latents: torch.Tensor) -> torch.Tensor:
            idx = latents.to(self.W_enc.device)
            z = sae_in @ self.W_enc[:, idx] + self.b_enc[idx]
            return z * norms[idx] if norms is not None else z

        return z_block

    def _hidden_pre_of_rows(self, x: torch.Tensor) -> torch.Tensor:
        """z of rows x [n, d_in] for all latents, as `_z_block` computes it."""
        z = self.process_sae_in(x.to(self.W_enc.device)) @ self.W_enc + self.b_enc
        return z * self.W_dec.norm(dim=-1) if self.cfg.rescale_acts_by_decoder_norm else z

    def calibrate_for_export(self) -> None:
        """What an export calibrates on: nothing when already calibrated for these weights, else
        the default rows (`default_calibration_rows`), else the running estimate (a warning)."""
        if bool(self.calibrated):
            return
        rows = self.default_calibration_rows()
        if rows is not None:
            self.calibrate_thresholds(rows)
            return
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
        self.calibrate_for_export()
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
        self.training_reservoir.scale_(1.0 / scaling_factor)
        self.calibrated.fill_(False)


@torch.compiler.disable
def _allocate_eagerly(sae: BatchAllocationTrainingSAE, hidden_pre: torch.Tensor) -> Allocation:
    """`sae.allocate`, run eagerly under `compile_sae: true`: the allocation reads data-dependent
    sizes and host values (capacities, candidate counts) that would break or specialise the
    graph; the encoder, decoder and losses around it are still compiled."""
    return sae.allocate(hidden_pre)


def calibrate(
    sae: BatchAllocationTrainingSAE | str | Path,
    source: CalibrationRows | RowSource,
    n_tokens: int | None = None,
    device: str | None = None,
    documents: torch.Tensor | None = None,
    overlaps_training: bool | None = None,
) -> BatchAllocationTrainingSAE:
    """Calibrate the export thresholds of a Mutual/Feature Choice training SAE, in place, and
    return the SAE (`sae.calibrate_thresholds`; calibration.py gives the rule).

    `sae` is a training SAE or the path of a training checkpoint (loaded with
    `sae_lens_allocation.load_sae`). `source` gives raw activations at the SAE's hook, special
    tokens already removed: CalibrationRows, a tensor ([N, d], or [B, S, d] whose sequences become
    the fold units), an iterable of batches, or a callable such as `ActivationsStore.next_batch`.
    `n_tokens` defaults to the config's `calibration_tokens`; `documents` gives the document id of
    each row of a tensor (folds never split a document); `overlaps_training` is recorded in the
    metadata as given (None: unknown). Save the export afterwards with
    `sae.save_inference_model(path)` (which does not recalibrate once calibrated).
    """
    if not isinstance(sae, torch.nn.Module):
        sae = load_sae(sae, device=device or "cpu")
    if not isinstance(sae, BatchAllocationTrainingSAE):
        raise ValueError(
            f"calibrate() needs a mutual_choice or feature_choice training SAE, got "
            f"{type(sae).__name__}; exported jumprelu SAEs are already calibrated"
        )
    sae.calibrate_thresholds(source, n_tokens=n_tokens, documents=documents,
                             info={"overlaps_training": overlaps_training})
    return sae
