"""Steering effect of SAE latents: this project's reading of the g-SAE paper's third claim
("latents steer the model more effectively in arbitrary contexts", Olmo et al. 2024), defined in
docs/results.md#steering.

For latent j with decoder row W_dec_j, u_j = W_dec_j / ||W_dec_j||; at the hook every
non-special position of every context gets x + alpha * u_j, with one fixed norm
alpha = scale * mean_t ||x_t|| (mean activation norm over the held-out non-special tokens, the
same alpha for every SAE); the latent's effect is

    steer_j = mean over scored predictions of KL(p_clean || p_steered)

(predictions of special tokens not scored). Contexts are held-out rows, the same for every SAE;
latents are drawn uniformly at random among those that fire on held-out text (a dead latent's
direction is whatever initialisation left). Controls for reading it: the same effect for random
unit directions (Gaussian, normalised) at the same alpha, and the effect at several multiples of
alpha (dose-response).

Specificity (project definition): does the push raise the tokens the direction itself writes
towards, more than the vocabulary at large? With Delta_t = mean over scored predictions of
log p_steered(t) - log p_clean(t), and S_j the `OWN_TOKENS` tokens of largest direct logit
score (u_j * w_ln) W_U (the unembedding, through the final LayerNorm's weight w_ln where the
model has one; the logit lens of u_j),

    spec_j = mean_{t in S_j} Delta_t - mean_{t in V} Delta_t   (nats).

Random directions get the same figure, with their own S, as its baseline. At the final
LayerNorm's output spec_j is the mean direct logit gain of S_j over the vocabulary; earlier in
the model the layers in between may move the effect elsewhere, which is what it measures.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from sae_lens_allocation.tokens import keep_mask


def pick_latents(fired: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Up to n latents drawn without replacement among those with a firing count > 0."""
    alive = torch.nonzero(fired > 0).flatten()
    g = torch.Generator().manual_seed(seed)
    return alive[torch.randperm(alive.numel(), generator=g)[:n]].sort().values


def random_directions(n: int, d: int, seed: int) -> torch.Tensor:
    """n random unit directions in R^d (Gaussian, normalised), fixed by `seed`."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, d, generator=g)
    return v / v.norm(dim=-1, keepdim=True)


OWN_TOKENS = 10


class SteeringEffects(NamedTuple):
    kl: torch.Tensor  # [n] steer_j
    specificity: torch.Tensor  # [n] spec_j


def own_tokens(model: Any, units: torch.Tensor, top: int = OWN_TOKENS) -> torch.Tensor:
    """S_j (module docstring): per unit direction, the `top` tokens of largest direct logit score."""
    ln = getattr(getattr(model, "ln_final", None), "w", None)
    scores = (units * ln.float() if ln is not None else units) @ model.W_U.float()
    return scores.topk(min(top, scores.shape[-1]), dim=-1).indices


@torch.no_grad()
def steering_effects(model: Any, contexts: torch.Tensor, hook_name: str, W_dec: torch.Tensor,
                     latents: torch.Tensor, alpha: float, special_ids: list[int]) -> SteeringEffects:
    """steer_j and spec_j (module docstring) for each latent in `latents`, [len(latents)] each."""
    keep = keep_mask(contexts, special_ids)
    pred = keep[:, 1:].float()
    clean = F.log_softmax(model(contexts)[:, :-1].float(), -1)
    units = W_dec[latents].float()
    units = units / units.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(units.dtype).tiny)
    owned = own_tokens(model, units.to(model.W_U.device))
    effects, specific = [], []
    for u, tokens in zip(units, owned):
        shift = (alpha * u).to(contexts.device)

        def add(act: torch.Tensor, hook: Any) -> torch.Tensor:
            return act + (keep[..., None] * shift).to(act.dtype)

        steered = F.log_softmax(model.run_with_hooks(contexts, fwd_hooks=[(hook_name, add)])[:, :-1].float(), -1)
        kl = (clean.exp() * (clean - steered)).sum(-1)
        effects.append((kl * pred).sum() / pred.sum())
        delta = ((steered - clean) * pred[..., None]).sum((0, 1)) / pred.sum()
        specific.append(delta[tokens].mean() - delta.mean())
    if not effects:
        return SteeringEffects(torch.zeros(0), torch.zeros(0))
    return SteeringEffects(torch.stack(effects).cpu(), torch.stack(specific).cpu())
