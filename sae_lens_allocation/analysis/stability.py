"""Stability across seeds: do SAEs trained with different seeds learn the same decoder directions?

For decoders A [n_a, d_in] and B [n_b, d_in] (rows: one latent's decoder direction, any norm)
with unit rows a_i, b_j and cosines C_ij = <a_i, b_j>:

    best_A(i) = max_j C_ij        best_B(j) = max_i C_ij

    matched_share(A, B) = (#{i : best_A(i) >= t} + #{j : best_B(j) >= t}) / (n_a + n_b)
    mean_max_cosine(A, B) = (sum_i best_A(i) + sum_j best_B(j)) / (n_a + n_b)

Both directions are pooled, so the figure is symmetric in A and B and a latent of the larger
SAE that has no partner counts against it. Cosines are signed: SAE activations are non-negative,
so a latent whose direction is the negative of another's is a different feature. The threshold
t = 0.7 (`MATCH_THRESHOLD`, project choice, a parameter) asks for a partner much closer than
chance: two random directions in d_in = 128 have |cosine| above 0.3 with probability ~5e-4.

`random_baseline` gives the same figures for decoders drawn at random (isotropic Gaussian rows),
the value two unrelated SAEs of the same shape reach by chance; `seed_stability` averages the
figures over every pair of several seeds.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

MATCH_THRESHOLD = 0.7
# Rows of A compared with all of B at once; bounds memory at _CHUNK x n_b cosines.
_CHUNK = 1024


@dataclass(frozen=True)
class StabilityResult:
    """`matched_share` and `mean_max_cosine` pooled over both directions (module docstring), and
    each direction's own figures (`*_a_to_b`: rows of A looking for a partner in B)."""

    threshold: float
    matched_share: float
    mean_max_cosine: float
    matched_share_a_to_b: float
    matched_share_b_to_a: float
    mean_max_cosine_a_to_b: float
    mean_max_cosine_b_to_a: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _unit_rows(w: torch.Tensor, name: str) -> torch.Tensor:
    if w.ndim != 2 or w.shape[0] == 0:
        raise ValueError(f"{name} has shape {list(w.shape)}; give a decoder [d_sae, d_in] with d_sae >= 1")
    w = w.detach().float()
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


def best_cosines(w_a: torch.Tensor, w_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(best_A [n_a], best_B [n_b]): each row's highest signed cosine with any row of the other
    decoder, computed in chunks of rows so large dictionaries fit in memory."""
    a, b = _unit_rows(w_a, "w_a"), _unit_rows(w_b, "w_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"decoders have d_in {a.shape[1]} and {b.shape[1]}; they must read the same space")
    best_a = torch.empty(a.shape[0])
    best_b = torch.full((b.shape[0],), -1.0)
    for start in range(0, a.shape[0], _CHUNK):
        cos = a[start:start + _CHUNK] @ b.T
        best_a[start:start + _CHUNK] = cos.max(dim=1).values
        best_b = torch.maximum(best_b, cos.max(dim=0).values)
    return best_a, best_b


def decoder_stability(w_a: torch.Tensor, w_b: torch.Tensor, threshold: float = MATCH_THRESHOLD) -> StabilityResult:
    """The figures of the module docstring for two decoders (e.g. `sae.W_dec` of two seeds)."""
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold={threshold} is not allowed; a cosine lies in [-1, 1]")
    best_a, best_b = best_cosines(w_a, w_b)
    both = torch.cat([best_a, best_b])

    def share(best: torch.Tensor) -> float:
        return int((best >= threshold).sum()) / best.numel()

    return StabilityResult(
        threshold=threshold,
        matched_share=share(both),
        mean_max_cosine=float(both.double().mean()),
        matched_share_a_to_b=share(best_a),
        matched_share_b_to_a=share(best_b),
        mean_max_cosine_a_to_b=float(best_a.double().mean()),
        mean_max_cosine_b_to_a=float(best_b.double().mean()),
    )


def seed_stability(decoders: Sequence[torch.Tensor], threshold: float = MATCH_THRESHOLD) -> dict[str, float]:
    """Mean and range of `matched_share` and `mean_max_cosine` over every unordered pair of the
    decoders (one per seed; at least two): keys `matched_share`, `matched_share_min`,
    `matched_share_max`, `mean_max_cosine`, `mean_max_cosine_min`, `mean_max_cosine_max`, `pairs`."""
    if len(decoders) < 2:
        raise ValueError(f"got {len(decoders)} decoder(s); stability needs at least two seeds")
    results = [decoder_stability(a, b, threshold) for a, b in itertools.combinations(decoders, 2)]
    out: dict[str, float] = {"pairs": float(len(results)), "threshold": threshold}
    for name in ("matched_share", "mean_max_cosine"):
        values = torch.tensor([getattr(r, name) for r in results])
        out[name] = float(values.mean())
        out[f"{name}_min"] = float(values.min())
        out[f"{name}_max"] = float(values.max())
    return out


def random_baseline(n_a: int, n_b: int, d_in: int, threshold: float = MATCH_THRESHOLD,
                    seed: int = 0) -> StabilityResult:
    """`decoder_stability` of two decoders with isotropic Gaussian rows ([n_a, d_in], [n_b, d_in],
    drawn with `seed`): what unrelated SAEs of this shape score by chance."""
    g = torch.Generator().manual_seed(seed)
    return decoder_stability(torch.randn(n_a, d_in, generator=g), torch.randn(n_b, d_in, generator=g), threshold)
