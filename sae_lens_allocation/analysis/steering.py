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
"""

from __future__ import annotations

from typing import Any

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


@torch.no_grad()
def steering_effects(model: Any, contexts: torch.Tensor, hook_name: str, W_dec: torch.Tensor,
                     latents: torch.Tensor, alpha: float, special_ids: list[int]) -> torch.Tensor:
    """steer_j (module docstring) for each latent in `latents`: a [len(latents)] tensor."""
    keep = keep_mask(contexts, special_ids)
    pred = keep[:, 1:].float()
    clean = F.log_softmax(model(contexts)[:, :-1].float(), -1)
    units = W_dec[latents].float()
    units = units / units.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(units.dtype).tiny)
    effects = []
    for u in units:
        shift = (alpha * u).to(contexts.device)

        def add(act: torch.Tensor, hook: Any) -> torch.Tensor:
            return act + (keep[..., None] * shift).to(act.dtype)

        steered = F.log_softmax(model.run_with_hooks(contexts, fwd_hooks=[(hook_name, add)])[:, :-1].float(), -1)
        kl = (clean.exp() * (clean - steered)).sum(-1)
        effects.append((kl * pred).sum() / pred.sum())
    return torch.stack(effects).cpu() if effects else torch.zeros(0)
