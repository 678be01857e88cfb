"""Auxiliary training losses against dead and underused latents, as a registry of named losses.

SAELens hard-codes the aux-k loss inside `TopKTrainingSAE`. Here every plugin architecture picks
its auxiliary loss by name (`aux_loss` config field) from `AUX_LOSSES`:

- `none`: no auxiliary loss.
- `aux_k` (Gao et al. 2024, exactly as SAELens' `TopKTrainingSAE.calculate_topk_aux_loss` codes
  it): the top-k_aux *dead* latents of each token, by pre-activation, reconstruct the detached
  residual e = x - x_hat.
- `aux_zipf` (Ayonrinde 2024 names it and says it generalises aux-k to dead *and underused*
  latents; the formula is not public, the one here is this project's definition, see
  docs/losses.md): aux_k on the dead latents, which take the k_aux slots first, plus the alive
  underused latents (below tau times their Zipf-expected firing frequency) reconstructing the
  residual with the slots left free, each latent's gradient weighted by how far below it is.
  Both share one normalisation (`aux_loss_normalization`, default SAELens' "none"), so aux_zipf
  with U = dead and unit weights is aux_k exactly.

A new loss is a function `fn(sae, ctx: AuxLossContext) -> (loss, metrics)` decorated with
`@register_aux_loss("name")`; it becomes a valid `aux_loss` value at once.

`AuxLossConfig` (config fields) and `AuxLossMixin` (buffers and the SAELens
`calculate_aux_loss` hook) are what an architecture mixes in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from sae_lens.saes.sae import TrainStepInput
from sae_lens.saes.topk_sae import act_times_W_dec

from sae_lens_allocation.allocation import ranks_from_frequency
from sae_lens_allocation.saes.batch_group import BatchGroupMixin
from sae_lens_allocation.saes.sparse_codes import (
    Selection,
    SparseEncoding,
    decode_entries,
    firing_per_latent,
)
from sae_lens_allocation.saes.zipf import (
    ema_warmup_steps,
    expected_frequency,
    fit_zipf,
    update_firing_ema,
    zipf_underuse,
)
from sae_lens_allocation.validation import field_error, is_finite_number

AuxLossMetrics = dict[str, "torch.Tensor | float"]
AuxLossFn = Callable[[Any, "AuxLossContext"], "tuple[torch.Tensor, AuxLossMetrics]"]

AUX_LOSSES: dict[str, AuxLossFn] = {}

#: Key of the auxiliary loss in `TrainStepOutput.losses`, the same as SAELens TopK's.
AUX_LOSS_KEY = "auxiliary_reconstruction_loss"

#: How the residual reconstruction error is reduced to a scalar (before coefficient and scale).
AUX_LOSS_NORMALIZATIONS = ("none", "residual_variance")

# Activation normalisations under which the aux reconstruction would live in a different space
# from the residual (SAELens raises the same at its first aux-k step).
_UNSUPPORTED_NORMALIZE_ACTIVATIONS = ("constant_norm_rescale", "layer_norm")


def register_aux_loss(name: str) -> Callable[[AuxLossFn], AuxLossFn]:
    """Decorator adding `fn(sae, ctx) -> (loss, metrics)` to `AUX_LOSSES` under `name`.

    A name that is already registered raises `ValueError`.
    """

    def decorator(fn: AuxLossFn) -> AuxLossFn:
        if name in AUX_LOSSES:
            raise ValueError(
                f"auxiliary loss {name!r} is already registered (by {AUX_LOSSES[name].__module__}."
                f"{AUX_LOSSES[name].__qualname__}); registered: {', '.join(sorted(AUX_LOSSES))}"
            )
        AUX_LOSSES[name] = fn
        return fn

    return decorator


# ---------------------------------------------------------------------------------------------
# Loss context and the shared residual reconstruction
# ---------------------------------------------------------------------------------------------


@dataclass
class AuxLossContext:
    """Everything an auxiliary loss sees for one training step.

    dead_mask: SAELens' dead mask (no firing for `dead_feature_window` steps), bool [d_sae];
        all False when the trainer passes none.
    firing_ema: p_j, EMA of the per-step firing fraction, [d_sae].
    ranks: rank_j of p_j (1 = most frequent), [d_sae].
    expected_frequency: p_hat_j = C rank_j^(-s) from the current Zipf fit, [d_sae].
    zipf_exponent: the fitted (or fixed) s, 0-dim.
    zipf_ready: 0-dim bool, the EMA has seen `ema_warmup_steps` steps and a Zipf fit exists.
    underused, underuse_weights: U and w from `zipf_underuse` (U includes the dead latents).
    k_aux: latents per token in the auxiliary reconstruction (`aux_k`, default d_in // 2).
    encoding: the step's sparse encoder state under `use_sparse_activations` (hidden_pre then
        has no autograd and reconstructions are decoded from selected entries), else None.
    """

    step_input: TrainStepInput
    feature_acts: torch.Tensor
    hidden_pre: torch.Tensor
    sae_out: torch.Tensor
    dead_mask: torch.Tensor
    firing_ema: torch.Tensor
    ranks: torch.Tensor
    expected_frequency: torch.Tensor
    zipf_exponent: torch.Tensor
    zipf_ready: torch.Tensor
    underused: torch.Tensor
    underuse_weights: torch.Tensor
    k_aux: int
    encoding: SparseEncoding | None = None


def scale_gradient(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Value t exactly, gradient w * dL/dt: sg(t) + w (t - sg(t)), sg = stop-gradient."""
    detached = t.detach()
    return detached + w * (t - detached)


def aux_activations(
    hidden_pre: torch.Tensor, candidates: torch.Tensor, slots: int, rectify: bool = False
) -> torch.Tensor:
    """Codes of an auxiliary reconstruction: for each token the top-`slots` latents of the
    candidate set C by z keep z (relu(z) with `rectify`), every other entry is 0.

    Without `rectify` this is SAELens' `calculate_topk_aux_acts`, line by line (raw z, no ReLU).
    """
    top = torch.where(candidates, hidden_pre, -torch.inf).topk(slots, sorted=False)
    aux_acts = torch.zeros_like(hidden_pre)
    aux_acts.scatter_(-1, top.indices, top.values.relu() if rectify else top.values)
    return aux_acts


def reconstruct_residual_loss(
    sae: Any,
    ctx: AuxLossContext,
    candidates: torch.Tensor,
    n_candidates: int,
    slots: int | None = None,
    weights: torch.Tensor | None = None,
    rectify: bool = False,
) -> torch.Tensor:
    """coefficient * (s / k_aux) * R(e, e_hat) for a candidate set C (bool [d_sae]) given
    `slots` slots per token (default k_aux), s = min(slots, |C|).

    e = (x - x_hat).detach(); e_hat = sum_j a_j d_j, no b_dec, with a = `aux_activations` (the
    top-s of C by z per token) and d_j the decoder row, divided by its norm when
    `rescale_acts_by_decoder_norm` (SAELens' `act_times_W_dec`). With slots = k_aux the factor
    s / k_aux is SAELens' min(|C| / k_aux, 1). R = mean_n ||e_n - e_hat_n||^2 for normalisation
    "none" (SAELens' code), that divided by mean_n ||e_n - mean_n(e)||^2 for "residual_variance";
    `cfg.aux_loss_normalization` picks it, one setting for every loss. Weights w [d_sae] scale
    latent j's share of the gradient (of a_j and of d_j) by w_j and leave the value unchanged:
    w_j weighs how much the loss trains latent j, not the reconstruction target.
    """
    s = min(ctx.k_aux if slots is None else slots, n_candidates)
    if s <= 0:
        return ctx.sae_out.new_zeros(())
    cfg = sae.cfg
    residual = (ctx.step_input.sae_in - ctx.sae_out).detach()
    w_dec = sae.W_dec
    if weights is not None:
        w_dec = scale_gradient(w_dec, weights.to(w_dec.dtype)[:, None])
    # With latent shards the top-s per token is over all F latents and each shard decodes its
    # own (saes/latent_shards.py); one all-reduce sums the shards' reconstructions.
    group = sae.batch_group
    mask = None
    if group.shards > 1:
        hidden_pre = ctx.hidden_pre.reshape(-1, ctx.hidden_pre.shape[-1])
        scores = torch.where(candidates, hidden_pre.detach(), -torch.inf)
        mask = group.row_topk_mask(scores, s)
    if ctx.encoding is not None:
        recons = _sparse_aux_reconstruction(ctx.encoding, candidates, s, rectify, weights, w_dec,
                                            cfg.rescale_acts_by_decoder_norm, mask)
    else:
        if mask is None:
            aux_acts = aux_activations(ctx.hidden_pre, candidates, s, rectify)
        else:
            values = ctx.hidden_pre.relu() if rectify else ctx.hidden_pre
            aux_acts = torch.where(mask.reshape(values.shape), values, torch.zeros_like(values))
        if weights is not None:
            aux_acts = scale_gradient(aux_acts, weights.to(aux_acts.dtype))
        recons = act_times_W_dec(aux_acts, w_dec, cfg.rescale_acts_by_decoder_norm)
    if group.shards > 1:
        recons = group.reduce_partial(recons)
    recons = sae.reshape_fn_out(recons, sae.d_head)
    error = (recons - residual).pow(2).sum(dim=-1).mean()
    if cfg.aux_loss_normalization == "residual_variance":
        # Over the global batch when it is split across processes (sae.batch_group).
        group = sae.batch_group
        flat = residual.reshape(-1, residual.shape[-1])
        rows = group.total_rows(flat.shape[0], flat.device)
        mean = group.sum(flat.sum(dim=0)) / rows
        variance = group.sum((flat - mean).pow(2).sum()) / rows
        # Guards a residual with zero variance (e.g. a perfect reconstruction).
        error = error / variance.clamp_min(torch.finfo(variance.dtype).eps)
    return cfg.aux_loss_coefficient * (s / ctx.k_aux) * error


@torch.compiler.disable
def _sparse_aux_reconstruction(
    encoding: SparseEncoding, candidates: torch.Tensor, slots: int, rectify: bool,
    weights: torch.Tensor | None, w_dec: torch.Tensor, rescale: bool,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """`act_times_W_dec(aux_activations(...), w_dec)` from the N x slots selected entries only:
    the same top-`slots` of C per token (the same `topk` on the same hidden_pre), their values
    with autograd from `encoding.pre_acts`, decoded by `decode_entries` (sparse_codes.py). Every
    selected entry is kept, also one of value 0, whose gradient is not 0 without `rectify`. Run
    eagerly under `compile_sae` (data-dependent entry counts). `mask`: the selection made over
    all latent shards (bool [N, F_local]), when sharded."""
    if mask is not None:
        selection = Selection.from_nonzero(mask)
    else:
        with torch.no_grad():
            top = torch.where(candidates, encoding.hidden_pre, -torch.inf).topk(slots, sorted=False)
        selection = Selection.from_row_indices(top.indices, candidates.shape[-1])
    values = encoding.pre_acts(selection)
    if rectify:
        values = values.relu()
    if weights is not None:
        values = scale_gradient(values, weights.to(values.dtype)[selection.cols])
    return decode_entries(selection, values, w_dec, rescale)


@register_aux_loss("none")
def no_aux_loss(sae: Any, ctx: AuxLossContext) -> tuple[torch.Tensor, AuxLossMetrics]:
    """No auxiliary loss (0)."""
    return ctx.sae_out.new_zeros(()), {}


@register_aux_loss("aux_k")
def aux_k_loss(sae: Any, ctx: AuxLossContext) -> tuple[torch.Tensor, AuxLossMetrics]:
    """Aux-k (Gao et al. 2024) exactly as SAELens codes it: C = dead latents, w = 1,
    scale min(n_dead / k_aux, 1), normalisation `aux_loss_normalization` (default "none", SAELens';
    the paper divides by the residual's variance: "residual_variance")."""
    # One host sync for the dead count, as SAELens' aux-k has (counted over all latent shards).
    n_dead = int(sae.batch_group.sum_latents(ctx.dead_mask.sum()))
    return reconstruct_residual_loss(sae, ctx, ctx.dead_mask, n_dead), {}


@register_aux_loss("aux_zipf")
def aux_zipf_loss(sae: Any, ctx: AuxLossContext) -> tuple[torch.Tensor, AuxLossMetrics]:
    """Aux-zipf (named by Ayonrinde 2024; formula: project definition,
    docs/losses.md#aux-zipf):
    aux_k on the dead latents D, plus the alive underused latents A = U minus D reconstructing e
    on their own with the slots D leaves free, s_A = min(k_aux, |U|) - min(k_aux, |D|), values
    relu(z), latent j's gradient weighted by w_j; the normalisation aux_k uses. With U = dead
    and w = 1 (tau = 0, or during the EMA warm-up) the second term is 0: aux_k exactly."""
    # One host read for both slot sizes (aux_k reads the dead count too).
    counts = sae.batch_group.sum_latents(torch.stack([ctx.dead_mask.sum(), ctx.underused.sum()]))
    n_dead, n_underused = counts.cpu().tolist()
    loss = reconstruct_residual_loss(sae, ctx, ctx.dead_mask, n_dead)
    free = min(ctx.k_aux, n_underused) - min(ctx.k_aux, n_dead)
    if free > 0:
        alive = ctx.underused & ~ctx.dead_mask
        loss = loss + reconstruct_residual_loss(
            sae, ctx, alive, n_underused - n_dead, free, ctx.underuse_weights, rectify=True
        )
    return loss, {}


# ---------------------------------------------------------------------------------------------
# Config fields and the training-SAE mixin
# ---------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class AuxLossConfig:
    """Auxiliary-loss fields for a plugin `TrainingSAEConfig` (put before the SAELens base class).

    aux_loss: name in `AUX_LOSSES` ("none", "aux_k", "aux_zipf", or a registered one).
    aux_loss_coefficient: multiplies the loss (same name and meaning as SAELens TopK's field).
    aux_k: latents per token in the aux reconstruction; None = d_in // 2 (SAELens' heuristic).
    aux_loss_normalization: "none" (SAELens' mean squared error, the default) or
        "residual_variance" (divide by the residual's variance); one setting for every loss.
        None, which configs written by earlier versions hold, means "none".
    aux_zipf_tau: latent j is underused if p_j < tau * p_hat_j; in [0, 1] (0: only dead).
    aux_zipf_exponent: None fits s every step; a positive float fixes s (then only C is fitted).
    aux_zipf_fit_fraction: fit over the most frequent ceil(fraction * #firing) latents; (0, 1].
    firing_ema_decay: per-step decay of the firing-frequency EMA; [0, 1).
    """

    aux_loss: str = "aux_k"
    aux_loss_coefficient: float = 1.0
    aux_k: int | None = None
    aux_loss_normalization: str | None = "none"
    aux_zipf_tau: float = 0.05
    aux_zipf_exponent: float | None = None
    aux_zipf_fit_fraction: float = 0.5
    firing_ema_decay: float = 0.99

    def validate_aux_loss(self) -> None:
        """Raise `ValueError` naming the field, the value and what is allowed."""
        if self.aux_loss not in AUX_LOSSES:
            raise field_error(
                "aux_loss",
                self.aux_loss,
                f"registered auxiliary losses are {', '.join(sorted(AUX_LOSSES))} "
                "(add one with sae_lens_allocation.register_aux_loss)",
            )
        if not (is_finite_number(self.aux_loss_coefficient) and self.aux_loss_coefficient >= 0):
            raise field_error("aux_loss_coefficient", self.aux_loss_coefficient, "a finite number >= 0")
        if self.aux_k is not None and (
            isinstance(self.aux_k, bool) or not isinstance(self.aux_k, int) or self.aux_k < 1
        ):
            raise field_error("aux_k", self.aux_k, "None (= d_in // 2) or an integer >= 1")
        # None: what configs written by earlier versions hold; it now means the shared default.
        if self.aux_loss_normalization is not None and (
            self.aux_loss_normalization not in AUX_LOSS_NORMALIZATIONS
        ):
            raise field_error(
                "aux_loss_normalization",
                self.aux_loss_normalization,
                f"one of {', '.join(AUX_LOSS_NORMALIZATIONS)} (None, from older configs: none)",
            )
        if not (is_finite_number(self.aux_zipf_tau) and 0.0 <= self.aux_zipf_tau <= 1.0):
            raise field_error("aux_zipf_tau", self.aux_zipf_tau, "a number in [0, 1]")
        if self.aux_zipf_exponent is not None and not (
            is_finite_number(self.aux_zipf_exponent) and self.aux_zipf_exponent > 0
        ):
            raise field_error(
                "aux_zipf_exponent", self.aux_zipf_exponent, "None (fit s) or a finite number > 0"
            )
        if not (is_finite_number(self.aux_zipf_fit_fraction) and 0.0 < self.aux_zipf_fit_fraction <= 1.0):
            raise field_error("aux_zipf_fit_fraction", self.aux_zipf_fit_fraction, "a number in (0, 1]")
        if not (is_finite_number(self.firing_ema_decay) and 0.0 <= self.firing_ema_decay < 1.0):
            raise field_error("firing_ema_decay", self.firing_ema_decay, "a number in [0, 1)")
        normalize_activations = getattr(self, "normalize_activations", "none")
        if self.aux_loss != "none" and normalize_activations in _UNSUPPORTED_NORMALIZE_ACTIVATIONS:
            raise field_error(
                "aux_loss",
                self.aux_loss,
                f"with normalize_activations={normalize_activations!r} the auxiliary "
                "reconstruction and the residual live in different spaces; use aux_loss='none' "
                f"or normalize_activations other than {', '.join(_UNSUPPORTED_NORMALIZE_ACTIVATIONS)}",
            )


class AuxLossMixin(BatchGroupMixin):
    """Buffers and the SAELens `calculate_aux_loss` hook for a `TrainingSAE` subclass.

    Put it before the SAELens base class. Firing fractions and residual variances are over the
    global batch of `batch_group` (`BatchGroupMixin`). The SAE calls `init_aux_loss_state()` in `__init__`,
    merges `aux_loss_metrics()` into `TrainStepOutput.metrics`, and calls
    `drop_aux_state(state_dict)` in `process_state_dict_for_saving_inference`.

    Buffers (in training checkpoints, so they survive resume; never in an inference export):
    firing_ema [d_sae] float32, p_j in [0, 1]; firing_ema_steps 0-dim int64, EMA updates so far;
    zipf_fit [3] float32, [log C, s, n_points] of the last fit (n_points = 0: no fit).
    """

    AUX_STATE_BUFFERS: tuple[str, ...] = ("firing_ema", "firing_ema_steps", "zipf_fit")

    cfg: Any
    sparse_encoding: SparseEncoding | None = None
    firing_ema: torch.Tensor
    firing_ema_steps: torch.Tensor
    zipf_fit: torch.Tensor

    def init_aux_loss_state(self) -> None:
        d_sae = self.cfg.d_sae
        device = torch.device(self.cfg.device)
        register = self.register_buffer  # type: ignore[attr-defined]
        register("firing_ema", torch.zeros(d_sae, dtype=torch.float32, device=device))
        register("firing_ema_steps", torch.zeros((), dtype=torch.int64, device=device))
        register("zipf_fit", torch.zeros(3, dtype=torch.float32, device=device))
        self._aux_metrics: dict[str, torch.Tensor | float] = {}

    @torch.no_grad()
    def update_firing_stats(self, feature_acts: torch.Tensor) -> None:
        """One EMA update from (feature_acts != 0) over all leading dims (and every rank of
        `batch_group`), then refit Zipf."""
        rows = self.batch_group.total_rows(feature_acts.shape[:-1].numel(), feature_acts.device)
        fired = self.batch_group.sum(firing_per_latent(feature_acts)) / rows
        self.firing_ema_steps += 1
        decay = self.cfg.firing_ema_decay
        ema = update_firing_ema(self.firing_ema.to(torch.float32), fired, self.firing_ema_steps, decay)
        self.firing_ema.copy_(ema)
        # The fit ranks all F latents: with latent shards, the gathered EMA.
        fit = fit_zipf(self.batch_group.gather_latents(ema), self.cfg.aux_zipf_fit_fraction,
                       self.cfg.aux_zipf_exponent)
        self.zipf_fit.copy_(fit)

    def zipf_ready(self) -> torch.Tensor:
        """0-dim bool: the EMA is past its warm-up and the last Zipf fit is valid."""
        return (self.firing_ema_steps >= ema_warmup_steps(self.cfg.firing_ema_decay)) & (
            self.zipf_fit[2] > 0
        )

    def _underuse(self, dead: torch.Tensor) -> tuple[torch.Tensor, ...]:
        p = self.firing_ema.to(torch.float32)
        group = self.batch_group
        ranks = group.local_latents(ranks_from_frequency(group.gather_latents(p))).to(torch.float32)
        p_hat = expected_frequency(ranks, self.zipf_fit[0], self.zipf_fit[1])
        ready = self.zipf_ready()
        underused, weights = zipf_underuse(p, p_hat, dead, self.cfg.aux_zipf_tau, ready)
        return p, ranks, p_hat, ready, underused, weights

    def _dead_mask(self, dead_neuron_mask: torch.Tensor | None) -> torch.Tensor:
        if dead_neuron_mask is None:
            return torch.zeros(self.cfg.d_sae, dtype=torch.bool, device=self.firing_ema.device)
        return dead_neuron_mask.to(device=self.firing_ema.device, dtype=torch.bool)

    def underused_mask(self, dead_neuron_mask: torch.Tensor | None) -> torch.Tensor:
        """U = {j : p_j < tau p_hat_j} | dead, from the current buffers (U = dead in warm-up)."""
        return self._underuse(self._dead_mask(dead_neuron_mask))[4]

    def k_aux(self) -> int:
        return self.cfg.aux_k if self.cfg.aux_k is not None else max(self.cfg.d_in // 2, 1)

    def calculate_aux_loss(
        self,
        step_input: TrainStepInput,
        feature_acts: torch.Tensor,
        hidden_pre: torch.Tensor,
        sae_out: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """SAELens hook: update the firing EMA and Zipf fit (training mode only), compute the
        configured loss, store the step's metrics. Returns {AUX_LOSS_KEY: loss}."""
        if self.training:  # type: ignore[attr-defined]
            self.update_firing_stats(feature_acts)
        dead = self._dead_mask(step_input.dead_neuron_mask)
        p, ranks, p_hat, ready, underused, weights = self._underuse(dead)
        ctx = AuxLossContext(
            step_input=step_input,
            feature_acts=feature_acts,
            hidden_pre=hidden_pre,
            sae_out=sae_out,
            dead_mask=dead,
            firing_ema=p,
            ranks=ranks,
            expected_frequency=p_hat,
            zipf_exponent=self.zipf_fit[1].clone(),
            zipf_ready=ready,
            underused=underused,
            underuse_weights=weights,
            k_aux=self.k_aux(),
            encoding=self.sparse_encoding,
        )
        loss, metrics = AUX_LOSSES[self.cfg.aux_loss](self, ctx)
        self._aux_metrics = {
            "aux_loss": loss.detach(),
            "aux_underused": underused.sum(),
            "aux_dead": dead.sum(),
            "aux_zipf_exponent": ctx.zipf_exponent,
            **metrics,
        }
        return {AUX_LOSS_KEY: loss}

    def aux_loss_metrics(self) -> dict[str, torch.Tensor | float]:
        """Last training step's metrics: aux_loss, aux_underused (|U| incl. dead, by the Zipf
        rule whatever the loss), aux_dead (SAELens' dead mask), aux_zipf_exponent (s), plus any
        the loss returned. Tensors, so reading them costs no host sync until logged."""
        return dict(self._aux_metrics)

    def drop_aux_state(self, state_dict: dict[str, Any]) -> None:
        """Remove the aux-loss buffers from a state dict (for the inference export)."""
        for name in self.AUX_STATE_BUFFERS:
            state_dict.pop(name, None)
