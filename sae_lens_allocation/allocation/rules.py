"""The allocation rules and their dispatch: the CPU candidate path (`cpu`) or, on every other
device, the static-shape path (`static`); the package docstring gives the rule and the tie rule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sae_lens_allocation.allocation import static as device_path
from sae_lens_allocation.allocation.cpu import (
    _codes,
    _feature_choice_pick,
    _mutual_choice_pick,
)


@dataclass
class Allocation:
    """Result of an allocation rule.

    codes: relu(pre_acts) at the kept entries, 0 elsewhere; same shape as pre_acts; autograd
        flows through the kept values.
    cutoff: the selection cut-off. Mutual Choice: 0-dim, the (k*N)-th largest relu(z) of the
        batch. Feature Choice: [F], the m_j-th largest z_j down the batch (+inf where m_j = 0).
    """

    codes: torch.Tensor
    cutoff: torch.Tensor


def budget(n_tokens: int, k: float) -> int:
    """M = floor(k * N), as SAELens BatchTopK computes it (`int(k * N)`)."""
    return int(k * n_tokens)


def mutual_choice(pre_acts: torch.Tensor, k: float) -> Allocation:
    """Mutual Choice (Ayonrinde 2024): keep the M = floor(k*N) largest entries of relu(z) over the
    whole N x F matrix, N = product of the leading dims (M capped at N*F; with fewer than M
    positive entries every positive one is kept). The operator of SAELens `batchtopk`.

    cutoff = the M-th largest relu(z) (+inf when M = 0). Ties at the cut-off: see the module doc.
    """
    if not k >= 0:
        raise ValueError(f"mutual_choice: k must be a number >= 0, got k={k!r}")
    flat = pre_acts.reshape(-1)
    n_tokens = pre_acts.shape[:-1].numel()
    m = min(budget(n_tokens, k), flat.numel())
    with torch.no_grad():
        z = flat.detach().contiguous().view(n_tokens, pre_acts.shape[-1])
        if device_path._static_shapes(z.device):
            static, picked = device_path._mutual_choice_static(z, m), None
        else:
            static = None
            picked = _mutual_choice_pick(z, m)
    return _allocation(flat, pre_acts.shape, static, picked)


def feature_choice(pre_acts: torch.Tensor, capacities: torch.Tensor) -> Allocation:
    """Feature Choice (Ayonrinde 2024): latent j keeps its m_j largest z_j down the batch, then
    relu ("at most m_j tokens"). `capacities` is an integer tensor [F]; m_j > N keeps all N.

    cutoff[j] = the min(m_j, N)-th largest z_j (+inf where m_j = 0). Ties: see the module doc.
    """
    n_latents = pre_acts.shape[-1]
    integer = not (capacities.is_floating_point() or capacities.is_complex())
    if capacities.shape != (n_latents,) or not integer:
        raise ValueError(
            f"feature_choice: capacities must be an integer tensor of shape ({n_latents},), got "
            f"dtype {capacities.dtype} and shape {tuple(capacities.shape)}"
        )
    flat = pre_acts.reshape(-1)
    with torch.no_grad():
        z = flat.detach().contiguous().view(pre_acts.shape[:-1].numel(), n_latents)
        static_shapes = device_path._static_shapes(z.device)
        # With static shapes the capacities decide buffer sizes, so they are read on the host:
        # free when they are there already (as the plugin's SAEs pass them), one copy otherwise.
        caps = capacities.detach().to(device="cpu" if static_shapes else z.device, dtype=torch.long)
        if n_latents and bool((caps < 0).any()):
            raise ValueError(f"feature_choice: capacities must be >= 0, got min {int(caps.min())}")
        caps = caps.clamp(max=z.shape[0])
        if static_shapes:
            static, picked = device_path._feature_choice_static(z, caps), None
        else:
            static = None
            picked = _feature_choice_pick(z, caps)
    return _allocation(flat, pre_acts.shape, static, picked)


def _allocation(flat: torch.Tensor, shape: torch.Size, static: Any, picked: Any) -> Allocation:
    """The codes of a selection, shaped like the pre-activations: from the static path's
    (index or None, keep, cutoff) when it ran, else from the CPU path's (index, keep, cutoff)."""
    if static is not None:
        index, keep, cutoff = static
        return Allocation(device_path._codes_static(flat, index, keep).view(shape), cutoff)
    index, keep, cutoff = picked
    return Allocation(codes=_codes(flat, index, keep).reshape(shape), cutoff=cutoff)
