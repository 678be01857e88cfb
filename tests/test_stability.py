"""Stability across seeds (analysis/stability.py) on constructed decoders."""

from __future__ import annotations

import pytest
import torch

from sae_lens_allocation.analysis.stability import (
    best_cosines,
    decoder_stability,
    random_baseline,
    seed_stability,
)


def test_a_permuted_rescaled_copy_matches_every_latent():
    w = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    copy = w[torch.randperm(64)] * torch.rand(64, 1).add(0.5)
    result = decoder_stability(w, copy)
    assert result.matched_share == 1.0
    assert result.mean_max_cosine == pytest.approx(1.0, abs=1e-6)


def test_random_decoders_score_the_random_baseline_and_match_nothing():
    g = torch.Generator().manual_seed(1)
    result = decoder_stability(torch.randn(256, 64, generator=g), torch.randn(256, 64, generator=g))
    baseline = random_baseline(256, 256, 64, seed=2)
    assert result.matched_share == 0.0
    assert result.mean_max_cosine == pytest.approx(baseline.mean_max_cosine, abs=0.02)
    # Far from a match: the best of 256 random cosines in 64 dimensions is about 0.35.
    assert 0.25 < result.mean_max_cosine < 0.45


def test_half_shared_decoders_match_half_and_the_figure_is_symmetric():
    g = torch.Generator().manual_seed(3)
    shared = torch.eye(128)[:32]
    a = torch.cat([shared, torch.eye(128)[32:64]])
    b = torch.cat([shared, torch.randn(32, 128, generator=g)])
    ab, ba = decoder_stability(a, b), decoder_stability(b, a)
    assert ab.matched_share == pytest.approx(0.5)
    assert ab.matched_share == ba.matched_share and ab.mean_max_cosine == pytest.approx(ba.mean_max_cosine)
    assert ab.matched_share_a_to_b == ba.matched_share_b_to_a


def test_an_unmatched_extra_latent_of_the_larger_sae_counts_against_the_pair():
    a = torch.eye(8)[:4]
    b = torch.cat([a, -a[:1]])  # the negated direction is not a partner: cosines are signed
    result = decoder_stability(a, b)
    assert result.matched_share_a_to_b == 1.0 and result.matched_share_b_to_a == 0.8
    assert result.matched_share == pytest.approx(8 / 9)


def test_chunked_cosines_equal_the_full_matrix(monkeypatch):
    import sae_lens_allocation.analysis.stability as stability

    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(50, 8, generator=g), torch.randn(30, 8, generator=g)
    full = torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).T
    monkeypatch.setattr(stability, "_CHUNK", 7)
    best_a, best_b = best_cosines(a, b)
    assert torch.allclose(best_a, full.max(1).values) and torch.allclose(best_b, full.max(0).values)


def test_seed_stability_averages_every_pair():
    w = torch.randn(32, 16, generator=torch.Generator().manual_seed(5))
    other = torch.randn(32, 16, generator=torch.Generator().manual_seed(6))
    out = seed_stability([w, w.flip(0), other])
    assert out["pairs"] == 3
    assert out["matched_share_max"] == 1.0 and out["matched_share_min"] < 0.2
    pair = decoder_stability(w, other).matched_share
    assert out["matched_share"] == pytest.approx((1.0 + 2 * pair) / 3)
    with pytest.raises(ValueError, match="at least two"):
        seed_stability([w])
