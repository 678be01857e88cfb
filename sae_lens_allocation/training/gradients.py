"""Activation gradients for Gradient TopK SAEs, and an activations store that carries them.

Project definition (docs/algorithms.md, "Gradient TopK"): for a batch of token sequences the
gradient at the hook is

    g = dL/dx,   L = sum_{b, t < T-1} CE(logits[b, t], tokens[b, t+1])

(the summed per-token next-token cross-entropy, not the mean, so its scale does not depend on the
batch size). It costs one forward pass to the logits and one backward pass that stops at the
hook: the activation at the hook is replaced by a detached leaf that requires grad, and the
model's parameters do not require grad during the pass, so no autograd graph is recorded below
the hook and no parameter gradient is computed.

SAELens' `ActivationsStore` runs the model without gradients and stops at the hook layer.
`GradientActivationsStore` overrides only its per-batch producer, `get_raw_llm_batch`, to return
rows `[acts | grads]` of width `2 * d_in`; SAELens' own `mixing_buffer` then shuffles whole rows,
so each activation stays next to its gradient. Everything else (tokens, evals, checkpoints) is
the stock store.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from sae_lens.training.activations_store import ActivationsStore
from transformer_lens.hook_points import HookPoint

try:  # TransformerLens 3 moved it; importing it from hook_points is deprecated there.
    from transformer_lens import HookedRootModule
except ImportError:  # TransformerLens 2
    from transformer_lens.hook_points import HookedRootModule


@contextmanager
def frozen_parameters(model: torch.nn.Module) -> Iterator[None]:
    """Set `requires_grad=False` on every parameter of `model`, restoring each flag on exit."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def next_token_loss_sum(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """L = sum_{b, t < T-1} CE(logits[b, t], tokens[b, t+1]), computed in float32."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="sum"
    )


def loss_at_hook(
    model: HookedRootModule,
    tokens: torch.Tensor,
    hook_name: str,
    autocast: bool = False,
    model_kwargs: Mapping[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward half of `activation_gradients`: returns `(acts, loss)` where `acts` is the leaf
    substituted at `hook_name` (requires grad) and `loss` the summed next-token cross-entropy,
    whose autograd graph starts at `acts`."""
    captured: list[torch.Tensor] = []

    def substitute(act: torch.Tensor, hook: HookPoint) -> torch.Tensor:  # noqa: ARG001
        leaf = act.detach().requires_grad_(True)
        captured.append(leaf)
        return leaf

    with (
        frozen_parameters(model),
        torch.enable_grad(),
        torch.autocast(device_type=tokens.device.type, dtype=torch.bfloat16, enabled=autocast),
    ):
        logits = model.run_with_hooks(
            tokens, fwd_hooks=[(hook_name, substitute)], **dict(model_kwargs or {})
        )
        loss = next_token_loss_sum(logits, tokens)
    if len(captured) != 1:
        raise ValueError(
            f"hook_name {hook_name!r} ran {len(captured)} times in one forward pass; "
            "a gradient store needs a hook point the model passes exactly once"
        )
    return captured[0], loss


def activation_gradients(
    model: HookedRootModule,
    tokens: torch.Tensor,
    hook_name: str,
    autocast: bool = False,
    model_kwargs: Mapping[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations at `hook_name` and g = dL/d(acts), L the summed next-token cross-entropy.

    Both are returned detached, in the hook's own shape (e.g. [batch, pos, d_model]). One
    forward to the logits, one backward that stops at the hook; model parameters get no
    gradient and their `requires_grad` flags are restored afterwards. `autocast` runs the
    forward in bfloat16 autocast, as SAELens' `autocast_lm` does.
    """
    acts, loss = loss_at_hook(model, tokens, hook_name, autocast, model_kwargs)
    (grads,) = torch.autograd.grad(loss, acts)
    return acts.detach(), grads


class GradientActivationsStore(ActivationsStore):
    """SAELens `ActivationsStore` whose training batches are rows `[acts | grads]`, width 2*d_in.

    Only `get_raw_llm_batch` differs from the stock store; `get_batch_tokens`,
    `get_activations` (used by `run_evals`), shuffling, special-token filtering and
    `save_to_checkpoint` / `load_from_checkpoint` are SAELens' own. Cached activations hold no
    gradients and are refused.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.cached_activation_dataset is not None:
            raise ValueError(
                f"cached_activations_path={self.cached_activations_path!r}: cached activations "
                "hold no gradients of the LM loss, which a gradient store must produce; set "
                "use_cached_activations=False"
            )
        if self.normalize_activations != "none":
            raise ValueError(
                f"normalize_activations={self.normalize_activations!r}: a gradient store "
                "supports only 'none' (SAELens would estimate the norm over [acts | grads])"
            )

    def _flatten_hook_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """[batch, pos, ...] at the hook -> [batch * kept_pos, d_in] float32 rows on the store
        device, with the same seqpos slice and head selection as `get_activations`."""
        t = t[:, slice(*self.seqpos_slice)]
        if self.hook_head_index is not None:
            t = t[:, :, self.hook_head_index]
        return t.reshape(-1, self.d_in).to(device=self.device, dtype=torch.float32)

    def get_raw_llm_batch(
        self, raise_on_epoch_end: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows `[acts | grads]` of shape [batch * context, 2 * d_in] and their token ids."""
        batch_tokens = self.get_batch_tokens(raise_at_epoch_end=raise_on_epoch_end)
        acts, grads = activation_gradients(
            self.model, batch_tokens, self.hook_name, self.autocast_lm, self.model_kwargs
        )
        rows = torch.cat([self._flatten_hook_tensor(acts), self._flatten_hook_tensor(grads)], -1)
        token_ids = batch_tokens[:, slice(*self.seqpos_slice)].reshape(-1).to(self.device)
        return rows, token_ids
