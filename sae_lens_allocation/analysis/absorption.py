"""Feature absorption measured on ground truth: synthetic data with parent/child features
(`sae_lens.synthetic`, a `SyntheticModel` with a hierarchy).

The definition is SAEBench's "full absorption" (its `FeatureAbsorptionCalculator`, first-letter
spelling task), with the linear probe replaced by the known parent direction and the probe's
positives by the samples where the parent truly fires. For a parent feature p with true direction
v_p (a row of the feature dictionary), unit direction u_p = v_p / |v_p|, and an SAE with decoder
rows W_j and activations a_j(x):

    main(p)        = argmax_j cos(W_j, u_p)                       the latent that stands for p
    proj_j(x, p)   = a_j(x) * <W_j, u_p>                          latent j's reconstruction along u_p
    top(x, p)      = argmax_j proj_j(x, p)                        the latent that carries most of p

A sample x with true parent activation f_p(x) > 0 is *absorbed* when all of

    1. a_main(p)(x) = 0                                           the parent's latent is silent
    2. cos(W_top, u_p) >= PARENT_COSINE (0.025)                   top carries p's direction
    3. proj_top(x, p) >= PROJECTION_SHARE (0.4) * f_p(x) * |v_p|  ... for a large part of p's
                                                                  true component along u_p
    4. cos(W_top, u_c) >= CHILD_COSINE (0.3) for some descendant c of p with f_c(x) > 0
                                                                  top is an active child's latent

    absorption(p) = #{x : f_p(x) > 0, x absorbed} / #{x : f_p(x) > 0}

Conditions 1-3 and their thresholds are SAEBench's (0.025 is its full-absorption cosine with the
probe, 0.4 its projection proportion; SAEBench divides by the probe projection of the input, here
by the parent's true component, which the input's other features and bias do not blur).
Condition 4 is what the ground truth adds: the absorbing latent must be aligned with a child that
is present (0.3: project choice; a latent that has merged a child with its parent at equal
magnitudes has cosine 0.71 with each). `proj` uses <W_j, u_p>, the latent's true contribution to
the reconstruction; SAEBench's a_j * cos(W_j, probe) is the same for unit-norm decoder rows.

`mean_absorption` averages absorption(p) over parents present in at least `min_present` samples.
`main_silent` (condition 1 alone, the parent's latent misses) is reported beside it: absorption
is the part of those misses that a child's latent explains.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch

PARENT_COSINE = 0.025
PROJECTION_SHARE = 0.4
CHILD_COSINE = 0.3
MIN_PRESENT = 20


class EncodesWithDecoder(Protocol):
    """What the metric needs of an SAE: `encode` [N, d_in] -> [N, d_sae] and `W_dec` [d_sae, d_in]."""

    W_dec: torch.Tensor

    def encode(self, x: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class Family:
    """A parent feature index and the indices of all features below it in its tree."""

    parent: int
    descendants: tuple[int, ...]


@dataclass(frozen=True)
class ParentAbsorption:
    parent: int
    main_latent: int
    main_cosine: float
    present: int
    absorbed: int
    main_silent: int

    @property
    def rate(self) -> float | None:
        """absorption(p); None when the parent never fired."""
        return self.absorbed / self.present if self.present else None


@dataclass(frozen=True)
class AbsorptionResult:
    """`mean_absorption` and `mean_main_silent` over the parents scored (present at least
    `min_present` times), and every parent's counts."""

    mean_absorption: float | None
    mean_main_silent: float | None
    parents_scored: int
    min_present: int
    thresholds: dict[str, float]
    parents: list[ParentAbsorption] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["parents"] = [{**asdict(p), "rate": p.rate} for p in self.parents]
        return out


def hierarchy_families(roots: Any) -> list[Family]:
    """Every node with a feature index and children, from a `sae_lens.synthetic.Hierarchy` (its
    `roots`) or a sequence of `HierarchyNode`s, with its descendants' feature indices. Nodes
    without an index (organisational nodes) give no family but their children are still listed."""
    nodes: Iterable[Any] = getattr(roots, "roots", roots)
    families: list[Family] = []

    def below(node: Any) -> list[int]:
        indices: list[int] = []
        for child in node.children:
            if child.feature_index is not None:
                indices.append(child.feature_index)
            indices += below(child)
        return indices

    def visit(node: Any) -> None:
        descendants = below(node)
        if node.feature_index is not None and descendants:
            families.append(Family(node.feature_index, tuple(descendants)))
        for child in node.children:
            visit(child)

    for root in nodes:
        visit(root)
    return families


def _unit(w: torch.Tensor) -> torch.Tensor:
    return w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def feature_absorption(
    sae: EncodesWithDecoder,
    feature_vectors: torch.Tensor,
    hidden: torch.Tensor,
    features: torch.Tensor,
    families: Sequence[Family],
    *,
    parent_cosine: float = PARENT_COSINE,
    projection_share: float = PROJECTION_SHARE,
    child_cosine: float = CHILD_COSINE,
    min_present: int = MIN_PRESENT,
    batch_size: int = 4096,
) -> AbsorptionResult:
    """absorption(p) for every family (module docstring) on samples `hidden` [N, d_in] whose true
    feature activations are `features` [N, num_features]; `feature_vectors` [num_features, d_in]
    are the true directions (`SyntheticModel.feature_dict.feature_vectors`)."""
    if hidden.shape[0] != features.shape[0]:
        raise ValueError(f"hidden has {hidden.shape[0]} samples and features {features.shape[0]}")
    w_dec = sae.W_dec.detach().float().cpu()
    v = feature_vectors.detach().float().cpu()
    if w_dec.shape[1] != v.shape[1]:
        raise ValueError(f"the SAE reads d_in={w_dec.shape[1]}, the features live in {v.shape[1]}")
    u = _unit(v)
    cos = _unit(w_dec) @ u.T  # [d_sae, num_features]
    along = w_dec @ u.T  # <W_j, u_f>
    parents = torch.tensor([f.parent for f in families], dtype=torch.long)
    main = cos[:, parents].argmax(dim=0)  # [P]
    counts = torch.zeros(len(families), 3, dtype=torch.long)  # present, absorbed, main_silent
    for start in range(0, hidden.shape[0], batch_size):
        acts = sae.encode(hidden[start:start + batch_size]).detach().float().cpu()
        f = features[start:start + batch_size].detach().float().cpu()
        for i, family in enumerate(families):
            p = family.parent
            present = f[:, p] > 0
            if not present.any():
                continue
            a, fp = acts[present], f[present]
            proj = a * along[:, p]
            top = proj.argmax(dim=1)
            silent = a[:, main[i]] <= 0
            carries = (cos[top, p] >= parent_cosine) & (
                proj.gather(1, top[:, None])[:, 0] >= projection_share * fp[:, p] * v[p].norm())
            desc = torch.tensor(family.descendants, dtype=torch.long)
            child_aligned = ((cos[top][:, desc] >= child_cosine) & (fp[:, desc] > 0)).any(dim=1)
            counts[i, 0] += int(present.sum())
            counts[i, 1] += int((silent & carries & child_aligned).sum())
            counts[i, 2] += int(silent.sum())
    per_parent = [
        ParentAbsorption(parent=fam.parent, main_latent=int(main[i]), main_cosine=float(cos[main[i], fam.parent]),
                         present=int(counts[i, 0]), absorbed=int(counts[i, 1]), main_silent=int(counts[i, 2]))
        for i, fam in enumerate(families)
    ]
    scored = [p for p in per_parent if p.present >= min_present]

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    return AbsorptionResult(
        mean_absorption=mean([p.absorbed / p.present for p in scored]),
        mean_main_silent=mean([p.main_silent / p.present for p in scored]),
        parents_scored=len(scored),
        min_present=min_present,
        thresholds={"parent_cosine": parent_cosine, "projection_share": projection_share,
                    "child_cosine": child_cosine},
        parents=per_parent,
    )


@torch.no_grad()
def synthetic_absorption(sae: EncodesWithDecoder, model: Any, n_samples: int = 50_000, seed: int = 0,
                         **options: Any) -> AbsorptionResult:
    """`feature_absorption` on `n_samples` drawn from a `sae_lens.synthetic.SyntheticModel` that
    has a hierarchy (`model.sample_with_features`, under `torch.manual_seed(seed)` without
    disturbing the caller's random state); `options` are `feature_absorption`'s keywords."""
    if model.hierarchy is None:
        raise ValueError("the synthetic model has no hierarchy: absorption needs parent/child features")
    families = hierarchy_families(model.hierarchy)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hidden, features = model.sample_with_features(n_samples)
    return feature_absorption(sae, model.feature_dict.feature_vectors, hidden, features.to_dense(), families,
                              **options)
