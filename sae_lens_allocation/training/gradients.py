"""Activation gradients for Gradient TopK SAEs, and an activations store that carries them.

Project definition (docs/gradient-topk.md#the-rule): for a batch of token sequences the
gradient at the hook is

    g = dL/dx,   L = sum_{b, t < T-1} CE(logits[b, t], tokens[b, t+1])

(the summed per-token next-token cross-entropy, not the mean, so its scale does not depend on the
batch size). It costs one forward pass to the logits and one backward pass that stops at the
hook: the activation at the hook is replaced by a detached leaf that requires grad, and the
model's parameters do not require grad during the pass, so no autograd graph is recorded below
the hook and no parameter gradient is computed.

SAELens' `ActivationsStore` runs the model without gradients and stops at the hook layer.
`GradientActivationsStore` overrides only its per-batch producer, `get_raw_llm_batch`, to return
rows `[acts | grads]` of width `2 * d_in` (computed, or read from a gradient cache); SAELens' own
`mixing_buffer` then shuffles whole rows, so each activation stays next to its gradient.
Everything else (tokens, evals, checkpoints) is the stock store.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from datasets import Dataset
from transformer_lens.hook_points import HookPoint

try:  # TransformerLens 3 moved it; importing it from hook_points is deprecated there.
    from transformer_lens import HookedRootModule
except ImportError:  # TransformerLens 2
    from transformer_lens.hook_points import HookedRootModule  # type: ignore[no-redef, unused-ignore]

from sae_lens_allocation.training.resume import ResumableActivationsStore
from sae_lens_allocation.validation import field_error

# A gradient cache stores g next to the activations, in the column `<hook_name>.grad`.
GRADIENT_COLUMN_SUFFIX = ".grad"


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

    def substitute(act: torch.Tensor, hook: HookPoint) -> torch.Tensor:
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


def multi_hook_activation_gradients(
    model: HookedRootModule,
    tokens: torch.Tensor,
    hook_names: Sequence[str],
    autocast: bool = False,
    model_kwargs: Mapping[str, Any] | None = None,
    activation_hooks: Sequence[str] = (),
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Activations and g_h = dL/d(acts_h) at every hook h of `hook_names`, from one forward to
    the logits and one backward that stops at the lowest of them (L as in
    `activation_gradients`); `activation_hooks` are captured in the same forward, without
    gradient.

    At a hook whose input does not depend on an earlier gradient hook (the lowest one, or one on
    a parallel path) the activation is swapped for a detached leaf that requires grad, as in
    `loss_at_hook`; at the others it stays in the graph, so the gradient at a lower hook flows
    through the higher ones and each g_h equals `activation_gradients(model, tokens, h)`.
    Returns ({hook: acts} for both kinds of hook, {hook: grads}), detached, in the hooks' own
    shapes.
    """
    grad_names = list(dict.fromkeys(hook_names))
    names = list(dict.fromkeys([*grad_names, *activation_hooks]))
    captured: dict[str, list[torch.Tensor]] = {h: [] for h in names}

    def capture(act: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        assert hook.name is not None  # a hook point of a model always has its name
        if hook.name not in grad_names:
            captured[hook.name].append(act.detach())
            return act
        # With the parameters frozen, an activation requires grad only if an earlier gradient
        # hook lies upstream of it.
        kept = act if act.requires_grad else act.detach().requires_grad_(True)
        captured[hook.name].append(kept)
        return kept

    with (
        frozen_parameters(model),
        torch.enable_grad(),
        torch.autocast(device_type=tokens.device.type, dtype=torch.bfloat16, enabled=autocast),
    ):
        logits = model.run_with_hooks(
            tokens, fwd_hooks=[(h, capture) for h in names], **dict(model_kwargs or {})
        )
        loss = next_token_loss_sum(logits, tokens)
    for h, seen in captured.items():
        if len(seen) != 1:
            raise ValueError(
                f"hook_name {h!r} ran {len(seen)} times in one forward pass; a gradient store "
                "needs hook points the model passes exactly once"
            )
    grads = torch.autograd.grad(loss, [captured[h][0] for h in grad_names]) if grad_names else ()
    acts = {h: captured[h][0].detach() for h in names}
    return acts, dict(zip(grad_names, grads))


def gradient_column(hook_name: str) -> str:
    """Name of the gradient column next to `hook_name`'s activations in a gradient cache."""
    return f"{hook_name}{GRADIENT_COLUMN_SUFFIX}"


class GradientActivationsStore(ResumableActivationsStore):
    """SAELens `ActivationsStore` whose training batches are rows `[acts | grads]`, width 2*d_in.

    Only the per-batch producers differ from the (resumable, resume.py) stock store:
    `get_raw_llm_batch` computes the gradients, or, with `cached_activations_path`, reads them
    from a gradient cache (SAELens' cache format plus a column `<hook_name>.grad`, written by
    `sae-lens-allocation cache`); `get_batch_tokens`, `get_activations` (used by `run_evals`),
    shuffling, special-token filtering and `save_to_checkpoint` / `load_from_checkpoint` are
    SAELens' own. A cache without the gradient column is refused.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.normalize_activations != "none":
            raise ValueError(
                f"normalize_activations={self.normalize_activations!r}: a gradient store "
                "supports only 'none' (SAELens would estimate the norm over [acts | grads])"
            )

    def load_cached_activation_dataset(self) -> Dataset | None:
        """SAELens' cache loader, with the gradient column formatted next to the activations."""
        dataset = super().load_cached_activation_dataset()
        if dataset is None:
            return None
        column = gradient_column(self.hook_name)
        if column not in dataset.column_names:
            raise ValueError(
                f"cached_activations_path={self.cached_activations_path!r} has no column "
                f"{column!r}: a plain activation cache holds no gradients of the LM loss; build "
                "the cache with gradients (`sae-lens-allocation cache`, docs/multi-sae.md) or set "
                "use_cached_activations=False"
            )
        if dataset.features[column].shape != (self.context_size, self.d_in):
            raise ValueError(
                f"cached column {column!r} has shape {dataset.features[column].shape}, expected "
                f"(context_size, d_in) = ({self.context_size}, {self.d_in})"
            )
        # SAELens formats the activation and token columns; the gradients get their own view.
        self._cached_gradients = dataset.select_columns([column]).with_format(
            "torch", device=self.device, dtype=self.dtype
        )
        return dataset

    def cached_llm_batch(
        self, raise_on_epoch_end: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """SAELens reads the activations of the next cached rows; their gradients are the same
        rows of the gradient column."""
        acts, token_ids = super().cached_llm_batch(raise_on_epoch_end)
        end = self.current_row_idx
        rows = self._cached_gradients[end - self.store_batch_size_prompts : end]
        grads = rows[gradient_column(self.hook_name)].reshape(-1, self.d_in)
        return torch.cat([acts, grads.to(acts.dtype)], dim=-1), token_ids

    def _flatten_hook_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """[batch, pos, ...] at the hook -> [batch * kept_pos, d_in] float32 rows on the store
        device, with the same seqpos slice and head selection as `get_activations`."""
        t = t[:, slice(*self.seqpos_slice)]
        if self.hook_head_index is not None:
            t = t[:, :, self.hook_head_index]
        width = t[0, 0].numel() if t.shape[0] and t.shape[1] else self.d_in
        if width != self.d_in:
            # reshape(-1, d_in) would split or merge tokens silently.
            raise field_error(
                "sae.d_in", self.d_in, f"the width of hook {self.hook_name!r}, which is {width}"
            )
        return t.reshape(-1, self.d_in).to(device=self.device, dtype=torch.float32)

    def get_raw_llm_batch(
        self, raise_on_epoch_end: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows `[acts | grads]` of shape [batch * context, 2 * d_in] and their token ids."""
        if self.cached_activation_dataset is not None:
            return self.cached_llm_batch(raise_on_epoch_end)
        batch_tokens = self.get_batch_tokens(raise_at_epoch_end=raise_on_epoch_end)
        acts, grads = activation_gradients(
            self.model, batch_tokens, self.hook_name, self.autocast_lm, self.model_kwargs
        )
        rows = torch.cat([self._flatten_hook_tensor(acts), self._flatten_hook_tensor(grads)], -1)
        token_ids = batch_tokens[:, slice(*self.seqpos_slice)].reshape(-1).to(self.device)
        return rows, token_ids
