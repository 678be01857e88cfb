"""Gradient TopK SAE, g-SAE ("gradient_topk"), Olmo et al. 2024 (arXiv 2411.10397).

Paper: a TopK SAE whose choice of each token's k latents uses the gradient g of the language
model's loss with respect to the SAE input, so latents with small activations but a large effect
on the output are not neglected; the kept values are the ordinary relu(z).

Project definition (docs/gradient-topk.md#the-rule):
    z    = pre-activations as SAELens TopK computes them (times ||W_dec_i|| when
           `rescale_acts_by_decoder_norm`)
    a_i  = (W_dec_i / ||W_dec_i||) . g, divided by a running RMS of a (buffer `grad_rms`), so
           `beta` is dimensionless
    s_i  = z_i * (1 + beta * |a_i|)
    S    = top-k of s per token;  f_i = relu(z_i) for i in S, 0 elsewhere.
beta = 0 is exactly SAELens TopK. g is the gradient of the summed per-token next-token
cross-entropy (gradients.py); z_i * a_i is the first-order estimate of the loss change from
removing latent i.

Training input rows are `[acts | grads]` (width 2 * d_in) from `GradientActivationsStore`; the
reconstruction (MSE) and auxiliary losses see the activation half only. Without a gradient no
score exists: in eval mode the SAE then encodes as plain TopK (what `run_evals` and the export
do); in training mode it raises. Export: SAELens `topk` (beta = 0), decoder norms folded as TopK
does, plugin buffers dropped, so the export loads without this package.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ClassVar

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
from sae_lens_allocation.validation import field_error

GRADIENT_STATE_BUFFERS = ("grad_rms", "grad_rms_updates")



# -- pure selection rule --------------------------------------------------------------------


def decoder_alignment(grads: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """a_i = (W_dec_i / ||W_dec_i||) . g for every latent i; grads [..., d_in] -> [..., d_sae]."""
    unit = W_dec / W_dec.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(W_dec.dtype).tiny)
    return grads.to(W_dec.dtype) @ unit.T


def gradient_scores(
    hidden_pre: torch.Tensor, alignment: torch.Tensor, beta: float, rms: torch.Tensor | float
) -> torch.Tensor:
    """s_i = z_i * (1 + beta * |a_i| / rms); beta = 0 returns z itself (exactly TopK)."""
    if beta == 0:
        return hidden_pre
    if isinstance(rms, torch.Tensor):
        rms = rms.clamp_min(torch.finfo(alignment.dtype).tiny)
    return hidden_pre * (1 + beta * alignment.abs() / rms)


def select_topk(
    hidden_pre: torch.Tensor, scores: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """S = top-k of `scores` along the last dim; codes f = relu(z) on S, 0 elsewhere.

    Returns (codes, indices [..., k]). Same operations as SAELens' TopK activation, so
    scores = z gives its codes bit for bit. Autograd flows into z through the kept values only.
    """
    indices = torch.topk(scores, k=k, dim=-1, sorted=False).indices
    values = hidden_pre.gather(-1, indices).relu()
    return torch.zeros_like(hidden_pre).scatter(-1, indices, values), indices


def changed_selection_share(
    hidden_pre: torch.Tensor, indices: torch.Tensor, k: int
) -> torch.Tensor:
    """Share of the k selections per token (over all tokens) that plain TopK of z would not make."""
    plain = torch.topk(hidden_pre, k=k, dim=-1, sorted=False).indices
    in_plain = torch.zeros_like(hidden_pre, dtype=torch.bool).scatter(-1, plain, True)
    return 1.0 - in_plain.gather(-1, indices).float().mean()


# -- config and training SAE ----------------------------------------------------------------


@dataclass(kw_only=True)
class GradientTopKTrainingSAEConfig(AuxLossConfig, LatentShardsConfig, TopKTrainingSAEConfig):
    """Gradient TopK training config.

    k: latents per token (integer, 1 <= k <= d_sae).
    beta: weight of the gradient term in s = z (1 + beta |a| / rms(a)); >= 0, 0 = plain TopK.
        Dimensionless thanks to the RMS normalisation; default 1.0 (project choice: a latent
        whose alignment is one RMS above typical doubles its score).
    grad_rms_ema_rate: rate r of the running mean square of a,
        ms <- ms + max(r, 1/t) (mean(a^2) - ms), t = 1, 2, ... (the plain mean for the first 1/r
        batches, then an EMA); in (0, 1].
    aux_loss: default "aux_zipf" (aux_losses.py); fields as AuxLossConfig.
    Inherited from SAELens TopK: rescale_acts_by_decoder_norm (default True), decoder_init_norm.
    normalize_activations must be "none" (a scaling of x changes g by the inverse factor, and
    SAELens would estimate the norm over [acts | grads]).
    use_sparse_activations (SAELens' field): the sparse training step (sparse_codes.py).
    """

    needs_activation_gradients: ClassVar[bool] = True

    beta: float = 1.0
    grad_rms_ema_rate: float = 0.01
    aux_loss: str = "aux_zipf"

    @override
    @classmethod
    def architecture(cls) -> str:
        return "gradient_topk"

    @override
    def get_inference_config_class(self) -> type[SAEConfig]:
        return TopKSAEConfig

    def __post_init__(self) -> None:
        super().__post_init__()
        self.validate_aux_loss()
        validate_sparse_activations(self)
        validate_latent_shards(self)
        if isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= self.d_sae:
            raise field_error("k", self.k, f"an integer with 1 <= k <= d_sae (d_sae={self.d_sae})")
        if (
            isinstance(self.beta, bool)
            or not isinstance(self.beta, (int, float))
            or not math.isfinite(self.beta)
            or self.beta < 0
        ):
            raise field_error("beta", self.beta, "a finite number >= 0 (0 = plain TopK)")
        if not (
            isinstance(self.grad_rms_ema_rate, (int, float)) and 0 < self.grad_rms_ema_rate <= 1
        ):
            raise field_error("grad_rms_ema_rate", self.grad_rms_ema_rate, "0 < rate <= 1")
        if self.normalize_activations != "none":
            raise field_error(
                "normalize_activations",
                self.normalize_activations,
                "'none' for gradient_topk (activation scaling would need the gradient scaled by "
                "the inverse factor, and SAELens estimates norms over whole [acts | grads] rows)",
            )


class GradientTopKTrainingSAE(
    FiniteLossGuard, AuxLossMixin, LatentShardMixin, SparseActivationsMixin, TopKTrainingSAE
):
    """Gradient TopK training SAE; see the module docstring for the rule.

    Buffers (training checkpoints only, dropped on export): grad_rms, the running RMS of a;
    grad_rms_updates, how many batches it has seen.
    """

    cfg: GradientTopKTrainingSAEConfig
    NONFINITE_ADVICE = "Lower lr or check the activations and gradients for NaN/Inf."
    grad_rms: torch.Tensor
    grad_rms_updates: torch.Tensor

    def __init__(self, cfg: GradientTopKTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        device = self.W_dec.device
        self.register_buffer("grad_rms", torch.zeros((), dtype=torch.float32, device=device))
        self.register_buffer("grad_rms_updates", torch.zeros((), dtype=torch.long, device=device))
        self._last_selection: tuple[torch.Tensor, torch.Tensor] | None = None
        self._last_changed = torch.zeros(())
        self._pending_gradients: tuple[torch.Tensor, bool] | None = None
        self.init_aux_loss_state()

    # -- encoding -----------------------------------------------------------------------------
    def split_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[..., 2*d_in] -> (acts, grads); [..., d_in] -> (acts, None)."""
        d_in = self.cfg.d_in
        if x.shape[-1] == 2 * d_in:
            return x[..., :d_in], x[..., d_in:]
        if x.shape[-1] == d_in:
            return x, None
        raise ValueError(
            f"gradient_topk expects inputs of width d_in={d_in} (activations) or 2*d_in={2 * d_in} "
            f"([activations | gradients]), got {x.shape[-1]}"
        )

    @torch.no_grad()
    def _update_grad_rms(self, alignment: torch.Tensor) -> None:
        # Tensor arithmetic only: no host sync per step.
        rate = (1.0 / (self.grad_rms_updates + 1)).clamp(min=self.cfg.grad_rms_ema_rate)
        mean_square = self.grad_rms.square()
        # mean(a^2) over the global batch when it is split across processes, and over all F
        # latents when they are sharded.
        squares = alignment.float().square()
        group = self.batch_group
        count = group.total_rows(squares.numel(), squares.device) * group.shards
        total = group.sum_latents(group.sum(squares.sum()))
        mean_square += rate * (total / count - mean_square)
        self.grad_rms.copy_(mean_square.sqrt())
        self.grad_rms_updates.add_(1)

    def _gradient_codes(
        self, hidden_pre: torch.Tensor, grads: torch.Tensor, update_rms: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            if self.cfg.beta == 0:
                scores = hidden_pre.detach()
            else:
                alignment = decoder_alignment(grads.to(hidden_pre.device), self.W_dec)
                if update_rms:
                    self._update_grad_rms(alignment)
                    rms = self.grad_rms
                elif bool(self.grad_rms_updates > 0):
                    rms = self.grad_rms
                else:
                    # Analysis before any training batch: the batch's own RMS.
                    rms = alignment.float().square().mean().sqrt()
                scores = gradient_scores(hidden_pre.detach(), alignment, self.cfg.beta, rms)
        return self._select(hidden_pre, scores)

    def _select(self, hidden_pre: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, selection): `select_topk`'s codes and indices; with latent shards the top-k
        of each row over all F latents (saes/latent_shards.py), its selection a bool mask."""
        if self.batch_group.shards == 1:
            return select_topk(hidden_pre, scores, self.cfg.k)
        return self.row_topk_codes(hidden_pre, scores, self.cfg.k)

    @override
    def get_activation_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        # SAELens' encode_with_hidden_pre computes z (decoder-norm rescaled when configured) from
        # the activation half and applies this to it; the gradient half waits in
        # `_pending_gradients`, set by `encode_with_hidden_pre` and read once here.
        return self.codes_from_hidden_pre

    def codes_from_hidden_pre(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        """With pending gradients: the gradient selection (updating the running RMS when asked).
        Without: plain TopK in eval mode; an error in training mode."""
        pending, self._pending_gradients = self._pending_gradients, None
        if pending is None:
            if self.training:
                raise RuntimeError(
                    "gradient_topk got activations without gradients in training mode. It needs "
                    "the LM-loss gradient next to each activation (rows [acts | grads] of width "
                    f"{2 * self.cfg.d_in}): train it with sae_lens_allocation.train(cfg) or "
                    "`sae-lens-allocation train config.yaml`, which use "
                    "sae_lens_allocation.training.gradients.GradientActivationsStore. Call sae.eval() to "
                    "encode activations alone (plain TopK, as the exported SAE does)."
                )
            codes, indices = self._select(hidden_pre, hidden_pre.detach())
        else:
            grads, update_rms = pending
            codes, indices = self._gradient_codes(hidden_pre, grads, update_rms)
        if self.batch_group.shards > 1 and self.training:
            # Collectives cannot wait for the lazy metric (only logging ranks evaluate it).
            self._last_changed = self._changed_share_over_shards(hidden_pre.detach(), indices)
        self._last_selection = (hidden_pre.detach(), indices)
        return codes

    def _changed_share_over_shards(self, hidden_pre: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """`changed_selection_share` with latent shards: chosen and plain TopK as masks over
        this shard's latents, the counts summed over the shards."""
        flat = hidden_pre.reshape(-1, hidden_pre.shape[-1])
        plain = self.batch_group.row_topk_mask(flat, self.cfg.k)  # type: ignore[attr-defined]
        counts = torch.stack([(plain & chosen.reshape(plain.shape)).sum(), chosen.sum()]).float()
        kept, total = self.batch_group.sum_latents(counts)
        return 1.0 - kept / total.clamp_min(1)

    def _encode_with_pending(
        self, acts: torch.Tensor, pending: tuple[torch.Tensor, bool] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if pending is not None:
            self._pending_gradients = pending
        try:
            return super().encode_with_hidden_pre(acts)
        finally:
            self._pending_gradients = None

    @override
    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows [acts | grads]: the gradient selection (updating the running RMS in training
        mode). Rows of width d_in: plain TopK in eval mode; an error in training mode."""
        acts, grads = self.split_rows(x)
        return self._encode_with_pending(acts, None if grads is None else (grads, self.training))

    def encode_with_gradients(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Codes chosen with the gradient g at x (analysis), whatever the mode; the running RMS
        is read, not updated. x, g: [..., d_in]."""
        if x.shape != g.shape:
            raise ValueError(
                f"x and g must have the same shape, got {tuple(x.shape)} and {tuple(g.shape)}"
            )
        return self._encode_with_pending(x, (g, False))[0]

    # -- training step --------------------------------------------------------------------------
    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        """SAELens' step on the activation half (MSE and auxiliary loss against it), the
        selection made with the gradient half."""
        acts, grads = self.split_rows(step_input.sae_in)
        if grads is not None:
            self._pending_gradients = (grads, self.training)
        try:
            output = super().training_forward_pass(replace(step_input, sae_in=acts))
        finally:
            self._pending_gradients = None
        self.guard_loss(output.loss, step_input.n_training_steps)
        output.metrics.update(self._step_metrics())
        output.metrics.update(self.aux_loss_metrics())
        return output

    def _step_metrics(self) -> dict[str, Any]:
        assert self._last_selection is not None
        hidden_pre, indices = self._last_selection
        k = self.cfg.k
        rms = self.grad_rms.detach().clone()
        if self.batch_group.shards > 1:
            changed = self._last_changed
            return {"gradient_selection_changed": lambda: changed, "gradient_alignment_rms": lambda: rms}
        # Lazy: the trainer only evaluates callables on logging steps.
        return {
            "gradient_selection_changed": lambda: changed_selection_share(hidden_pre, indices, k),
            "gradient_alignment_rms": lambda: rms,
        }

    # -- export ---------------------------------------------------------------------------------
    @override
    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        """SAELens TopK export (decoder norms folded), minus the plugin's training buffers."""
        super().process_state_dict_for_saving_inference(state_dict)
        self.drop_aux_state(state_dict)
        for name in GRADIENT_STATE_BUFFERS:
            state_dict.pop(name, None)
