"""Feature absorption on synthetic hierarchies (analysis/absorption.py), on constructed SAEs whose
absorption is known."""

from __future__ import annotations

import functools

import pytest
import torch

from sae_lens_allocation.analysis.absorption import (
    feature_absorption,
    hierarchy_families,
    synthetic_absorption,
)


@functools.lru_cache(maxsize=1)
def _model():
    """16 of 32 features in 4 one-level trees (parent + 3 children; features 0-3 are the parents),
    all firing with probability 0.25 (children only with their parent), magnitude 1, in 64 dims."""
    from sae_lens.synthetic import (
        ConstantFiringProbabilityConfig,
        HierarchyConfig,
        SyntheticModel,
        SyntheticModelConfig,
    )

    return SyntheticModel(SyntheticModelConfig(
        num_features=32, hidden_dim=64, firing_probability=ConstantFiringProbabilityConfig(probability=0.25),
        hierarchy=HierarchyConfig(total_root_nodes=4, branching_factor=3, max_depth=1), seed=0))


class _ExactSAE:
    """Reads the true feature activations off x (the dictionary's rows are linearly independent)
    and decodes with the dictionary, except that each parent's first child's latent, wherever it
    fires, takes over the parent: its decoder row is v_child + v_parent and the parent's latent is
    silent. With unit magnitudes this reconstructs x exactly."""

    def __init__(self, model, absorb: bool, unrelated: bool = False):
        self.v = model.feature_dict.feature_vectors.detach()
        self.bias = model.feature_dict.bias.detach()
        self.families = hierarchy_families(model.hierarchy)
        self.W_dec = self.v.clone()
        # `unrelated`: the silent parent's direction is carried by a latent for no child (16-19
        # are features outside the trees).
        self.hosts = {fam.parent: fam.parent + 16 if unrelated else fam.descendants[0]
                      for fam in self.families} if absorb else {}
        for parent, host in self.hosts.items():
            self.W_dec[host] = self.v[host] + self.v[parent]

    def encode(self, x):
        f = (x - self.bias) @ torch.linalg.pinv(self.v)
        a = f * (f > 1e-3)
        for parent, host in self.hosts.items():
            a[:, parent] = torch.where(a[:, host] > 0, 0.0, a[:, parent])
        return a


def _samples(n=20_000, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _model().sample_with_features(n)


def test_families_list_every_parent_with_all_its_descendants():
    from sae_lens.synthetic import HierarchyNode

    tree = HierarchyNode(0, [HierarchyNode(1, [HierarchyNode(3), HierarchyNode(4)]), HierarchyNode(2)])
    families = hierarchy_families([tree, HierarchyNode(None, [HierarchyNode(5, [HierarchyNode(6)])])])
    assert [(f.parent, set(f.descendants)) for f in families] == [(0, {1, 2, 3, 4}), (1, {3, 4}), (5, {6})]
    assert [f.parent for f in hierarchy_families(_model().hierarchy)] == [0, 1, 2, 3]


def test_an_sae_set_to_the_true_features_absorbs_nothing():
    from sae_lens import SAE
    from sae_lens.synthetic import init_sae_to_match_feature_dict

    model = _model()
    sae = SAE.from_dict({"architecture": "standard", "d_in": 64, "d_sae": 32})
    init_sae_to_match_feature_dict(sae, model.feature_dict)
    with torch.no_grad():
        sae.b_dec.copy_(model.feature_dict.bias)
    result = synthetic_absorption(sae, model, n_samples=20_000)
    assert result.parents_scored == 4
    assert [p.main_latent for p in result.parents] == [0, 1, 2, 3]
    assert result.mean_absorption is not None and result.mean_absorption < 0.01
    assert result.mean_main_silent is not None and result.mean_main_silent < 0.01


def test_child_latents_that_absorb_their_parent_score_the_rate_they_absorb_at():
    model = _model()
    hidden, features = _samples()
    sae = _ExactSAE(model, absorb=True)
    assert torch.allclose(sae.encode(hidden) @ sae.W_dec + sae.bias, hidden, atol=1e-4)
    result = feature_absorption(sae, model.feature_dict.feature_vectors, hidden, features, sae.families)
    expected = []
    for fam, parent in zip(sae.families, result.parents):
        present = features[:, fam.parent] > 0
        rate = float((features[present, fam.descendants[0]] > 0).float().mean())
        expected.append(rate)
        assert parent.rate == pytest.approx(rate) and parent.main_silent == parent.absorbed
    assert 0.15 < result.mean_absorption < 0.35  # children fire with probability 0.25 given the parent
    assert result.mean_absorption == pytest.approx(sum(expected) / 4)
    clean = feature_absorption(_ExactSAE(model, absorb=False), model.feature_dict.feature_vectors, hidden,
                               features, sae.families)
    assert clean.mean_absorption == 0.0 and clean.mean_main_silent == 0.0


def test_a_silent_parent_carried_by_a_latent_of_no_child_is_a_miss_not_absorption():
    model = _model()
    hidden, features = _samples()
    sae = _ExactSAE(model, absorb=True, unrelated=True)
    result = feature_absorption(sae, model.feature_dict.feature_vectors, hidden, features, sae.families)
    assert result.mean_absorption == 0.0
    assert result.mean_main_silent > 0.15


def test_parents_seen_too_rarely_are_reported_but_not_averaged():
    model = _model()
    hidden, features = _samples(n=40)
    sae = _ExactSAE(model, absorb=True)
    result = feature_absorption(sae, model.feature_dict.feature_vectors, hidden, features, sae.families,
                                min_present=1000)
    assert result.parents_scored == 0 and result.mean_absorption is None
    assert sum(p.present for p in result.parents) > 0
