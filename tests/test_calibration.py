"""Threshold calibration: the exported JumpReLU reproduces the training allocation exactly on the
calibration set."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sae_lens_allocation.training.calibration import global_threshold, iter_rows, per_latent_thresholds


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 64),
    f=st.integers(1, 40),
    k=st.floats(0.1, 8.0),
    chunk=st.integers(1, 20),
    seed=st.integers(0, 2**16),
)
def test_global_threshold_keeps_exactly_k_n_entries(n, f, k, chunk, seed):
    z = torch.randn(n, f, generator=torch.Generator().manual_seed(seed))
    theta, n_cal = global_threshold(iter_rows(z, n, chunk), k, max_tokens=n)
    assert n_cal == n
    expected = min(int(k * n), int((z > 0).sum()))
    assert int((z > theta).sum()) == expected
    gathered, _ = global_threshold([z], k)
    assert torch.equal(theta, gathered)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 80),
    f=st.integers(1, 12),
    chunk=st.integers(1, 30),
    seed=st.integers(0, 2**16),
)
def test_per_latent_thresholds_hit_each_latents_fraction(n, f, chunk, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, f, generator=g) + 1.0
    fractions = torch.rand(f, generator=g, dtype=torch.float64)
    theta, n_cal = per_latent_thresholds(iter_rows(z, n, chunk), fractions, max_tokens=n)
    target = (fractions * n_cal).round().long()
    fired = (z > theta).sum(0)
    positive = (z > 0).sum(0)
    assert torch.equal(fired, torch.minimum(target, positive))


def test_per_latent_thresholds_column_path_for_frequent_latents():
    # Targets above the running-top-c cap take the whole-column path; results must agree.
    z = torch.randn(2000, 3, generator=torch.Generator().manual_seed(0)) + 3.0
    fractions = torch.tensor([0.5, 0.01, 0.9], dtype=torch.float64)
    theta, _ = per_latent_thresholds(iter_rows(z, 2000, 300), fractions, max_tokens=2000)
    assert (z > theta).sum(0).tolist() == [1000, 20, 1800]


def test_thresholds_are_finite_and_non_negative():
    z = -torch.rand(10, 4)
    theta, _ = per_latent_thresholds([z], torch.tensor([0.0, 0.5, 1.0, 0.2], dtype=torch.float64))
    assert torch.isfinite(theta).all() and (theta >= 0).all()
    assert int((z > theta).sum()) == 0
