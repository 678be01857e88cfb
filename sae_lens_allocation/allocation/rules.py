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
        Floored Mutual Choice: [F], the lower of the two (`floored_mutual_choice`).
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
    n_tokens = pre_acts.shape[:-1].numel()
    return _mutual_choice_of_budget(pre_acts, min(budget(n_tokens, k), pre_acts.numel()))


def _mutual_choice_of_budget(pre_acts: torch.Tensor, m: int) -> Allocation:
    """Mutual Choice with the budget given as a count, 0 <= m <= N*F."""
    flat = pre_acts.reshape(-1)
    n_tokens = pre_acts.shape[:-1].numel()
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


def floor_budget(n_tokens: int, n_latents: int, k: float, floor: int) -> int:
    """The budget left after the floor, M - F m with M = min(floor(k N), N F); refuses
    (ValueError, one line) a batch on which the floor cannot be kept: m > N, or F m > M."""
    if isinstance(floor, bool) or not isinstance(floor, int) or floor < 0:
        raise ValueError(f"floored_mutual_choice: the floor must be an integer >= 0, got {floor!r}")
    if not k >= 0:
        raise ValueError(f"floored_mutual_choice: k must be a number >= 0, got k={k!r}")
    total = min(budget(n_tokens, k), n_tokens * n_latents)
    if floor > n_tokens or n_latents * floor > total:
        raise ValueError(
            f"floored_mutual_choice: a floor of {floor} tokens per latent needs m <= N and "
            f"F * m <= min(floor(k * N), N * F); here N = {n_tokens}, F = {n_latents}, F * m = "
            f"{n_latents * floor}, min(floor(k * N), N * F) = {total} (k={k}); use a smaller floor, "
            "a larger k or a larger batch"
        )
    return total - n_latents * floor


def floored_mutual_choice(pre_acts: torch.Tensor, k: float, floor: int) -> Allocation:
    """Mutual Choice with a per-latent floor of m = `floor` tokens (project definition,
    docs/architectures.md#per-latent-floor):

        A = for every latent j, its m largest z_j down the batch (Feature Choice, capacity m)
        B = the R largest relu(z) over the entries outside A,   R = M - F m
        S = A + B,   f = relu(z) * S

    with N the product of the leading dims and M = min(floor(k N), N F) (as `mutual_choice`).
    m = 0 is `mutual_choice` itself (the same call, bit for bit). A batch with m > N or F m > M
    is refused (ValueError).

    S maximises the kept mass sum_{S} relu(z) over the sets with |S| <= M and at least m
    entries in every column. Proof (exchange): take an optimal S*. If S* misses an entry t of
    column j's top-m, column j of S* holds >= m entries, so one of them, s, is outside the top-m
    and z_s <= z_t; S* - s + t keeps every column count and |S*|, and its mass is not smaller. So
    some optimum contains A, and its other <= R entries may be any entries outside A (the floor
    already holds): the R largest relu(z) outside A are best. A's entries with z <= 0 count as
    kept but give code 0 (relu after the choice, as Feature Choice); with fewer than R positive
    entries outside A, all of them are kept (as Mutual Choice).

    Ties: in A, the lowest rows of each column (the Feature Choice rule); in B, the lowest flat
    index among the entries outside A (the Mutual Choice rule). Built from the two exact kernels,
    so it is exact on every device.

    cutoff: [F], min(c_j, c), c_j = the m-th largest z_j (A's cut-off for latent j) and c = the
    R-th largest relu(z) outside A (+inf when R = 0): latent j fires on z_j above either.
    """
    n_latents = pre_acts.shape[-1]
    rest_budget = floor_budget(pre_acts.shape[:-1].numel(), n_latents, k, floor)
    if floor == 0:
        return mutual_choice(pre_acts, k)
    chosen = feature_choice(pre_acts, torch.full((n_latents,), floor, dtype=torch.long))
    rest = _outside(pre_acts, chosen)
    extra = _mutual_choice_of_budget(rest, rest_budget)
    return _floored(chosen, extra)


def _outside(pre_acts: torch.Tensor, chosen: Allocation) -> torch.Tensor:
    """z with the floor's positive entries set to 0. The floor's entries with z <= 0 stay: no
    Mutual Choice step keeps an entry with relu(z) = 0, so the rest never takes an entry twice;
    autograd reaches z through the entries left."""
    return pre_acts.masked_fill(chosen.codes.detach() != 0, 0)


def _floored(chosen: Allocation, extra: Allocation) -> Allocation:
    """The floored allocation from the floor's and the rest's (disjoint supports)."""
    cutoff = torch.minimum(chosen.cutoff, extra.cutoff.to(chosen.cutoff.dtype))
    return Allocation(codes=chosen.codes + extra.codes, cutoff=cutoff)


def _allocation(flat: torch.Tensor, shape: torch.Size, static: Any, picked: Any) -> Allocation:
    """The codes of a selection, shaped like the pre-activations: from the static path's
    (index or None, keep, cutoff) when it ran, else from the CPU path's (index, keep, cutoff)."""
    if static is not None:
        index, keep, cutoff = static
        return Allocation(device_path._codes_static(flat, index, keep).view(shape), cutoff)
    index, keep, cutoff = picked
    return Allocation(codes=_codes(flat, index, keep).reshape(shape), cutoff=cutoff)
