"""Allocation kernels and capacities (sae_lens_allocation/allocation.py).

Mutual Choice is checked against SAELens' own BatchTopK operator and Feature Choice against
`torch.topk` down the batch, for every path: the public functions, the plain path, and the
candidate (fast) path called directly on small inputs. With ties, `torch.topk` may keep other
tied entries, so those comparisons are tie-robust (same count, same multiset of kept values,
nothing dropped above anything kept); the documented tie rule (lowest index wins) is checked
exactly against a stable-sort reference.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sae_lens.saes.batchtopk_sae import BatchTopK

from sae_lens_allocation.allocation import (
    budget,
    feature_choice,
    mutual_choice,
    ranks_from_frequency,
    uniform_capacities,
    zipf_capacities,
    zipf_targets,
)
from sae_lens_allocation.allocation import cpu as alloc

DTYPES = [torch.float32, torch.bfloat16, torch.float64]


# --- references ---------------------------------------------------------------------------------


def mc_topk(x: torch.Tensor, k: float) -> torch.Tensor:
    """SAELens' BatchTopK operator (relu, one topk over the flattened batch)."""
    return BatchTopK(k)(x)


def fc_topk(x: torch.Tensor, caps: torch.Tensor) -> torch.Tensor:
    """Feature Choice with torch.topk down the batch, then relu."""
    z = x.reshape(-1, x.shape[-1])
    caps = caps.clamp(max=z.shape[0])
    values, indices = torch.topk(z, int(caps.max()) if caps.numel() else 0, dim=0)
    keep = torch.arange(values.shape[0])[:, None] < caps[None, :]
    return torch.zeros_like(z).scatter(0, indices, values.relu() * keep).reshape(x.shape)


def mc_tie_rule(x: torch.Tensor, k: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The documented rule: the M largest relu(z), ties to the lowest flattened index."""
    acts = x.relu().flatten()
    m = min(budget(x.shape[:-1].numel(), k), acts.numel())
    order = torch.argsort(acts, descending=True, stable=True)[:m]
    codes = torch.zeros_like(acts).scatter(0, order, acts[order]).reshape(x.shape)
    cutoff = acts[order[-1]] if m else torch.tensor(float("inf"), dtype=x.dtype)
    return codes, cutoff


def fc_tie_rule(x: torch.Tensor, caps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The documented rule: per latent the min(m_j, N) largest z_j, ties to the lowest row."""
    z = x.reshape(-1, x.shape[-1])
    caps = caps.clamp(max=z.shape[0])
    order = torch.argsort(z, dim=0, descending=True, stable=True)
    keep = torch.arange(z.shape[0])[:, None] < caps[None, :]
    values = z.gather(0, order)
    codes = torch.zeros_like(z).scatter(0, order, values.relu() * keep).reshape(x.shape)
    last = values.gather(0, (caps.clamp(min=1) - 1)[None, :]).squeeze(0)
    cutoff = torch.where(caps > 0, last, torch.tensor(float("inf"), dtype=z.dtype))
    return codes, cutoff


def codes_from(picked, x: torch.Tensor) -> torch.Tensor:
    """Codes of a private path's (index, keep, cutoff)."""
    index, keep, _ = picked
    return alloc._codes(x.reshape(-1), index, keep).reshape(x.shape)


def assert_same_choice(codes: torch.Tensor, reference: torch.Tensor, scores: torch.Tensor) -> None:
    """Tie-robust equality of two selections along the last dim of [groups, entries] views:
    same number kept, same sorted kept values, and no dropped score above a kept one. Inputs are
    positive where this is used, so every kept entry is visible in the codes."""
    for got, want, score in zip(codes, reference, scores):
        kept, ref_kept = got != 0, want != 0
        assert int(kept.sum()) == int(ref_kept.sum())
        assert torch.equal(got[kept].sort().values, want[ref_kept].sort().values)
        assert torch.equal(got[kept], score[kept])
        if kept.any() and (~kept).any():
            assert got[kept].min() >= score[~kept].max()


# --- input strategies ---------------------------------------------------------------------------


@st.composite
def batches(draw, max_rows: int = 40, max_latents: int = 40):
    n = draw(st.integers(1, max_rows))
    f = draw(st.integers(1, max_latents))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    if draw(st.booleans()):  # integer values: many ties
        low = draw(st.integers(-4, 1))
        x = torch.randint(low, low + draw(st.integers(1, 6)), (n, f), generator=generator)
    else:
        x = torch.randn(n, f, generator=generator, dtype=torch.float64) + draw(st.floats(-2, 2))
    return x.to(dtype)


def capacities_for(x: torch.Tensor, draw) -> torch.Tensor:
    n, f = x.reshape(-1, x.shape[-1]).shape
    caps = draw(st.lists(st.integers(0, n + 3), min_size=f, max_size=f))
    return torch.tensor(caps, dtype=torch.long)


# --- Mutual Choice ------------------------------------------------------------------------------


def check_mutual_choice(x: torch.Tensor, k: float) -> None:
    rule_codes, rule_cutoff = mc_tie_rule(x, k)
    result = mutual_choice(x, k)
    assert torch.equal(result.codes, rule_codes)
    assert torch.equal(result.cutoff, rule_cutoff)
    assert result.cutoff.dim() == 0 and not result.cutoff.requires_grad
    m = min(budget(x.shape[:-1].numel(), k), x.numel())
    plain = alloc._mutual_choice_plain(x.reshape(-1, x.shape[-1]).contiguous(), m)
    assert torch.equal(codes_from(plain, x), rule_codes)
    if m:
        # No block limit: small inputs exercise the candidate path too (it may still miss).
        fast = alloc._mutual_choice_sampled(x.reshape(-1, x.shape[-1]).contiguous(), m, x.numel())
        if fast is not None:
            assert torch.equal(codes_from(fast, x), rule_codes)
            assert torch.equal(fast[2], rule_cutoff)
    # BatchTopK refuses a budget above N*F; mutual_choice then keeps every entry.
    reference = mc_topk(x, k) if budget(x.shape[:-1].numel(), k) <= x.numel() else x.relu()
    positive = x.flatten().relu()
    assert_same_choice(result.codes.flatten()[None], reference.flatten()[None], positive[None])


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_mutual_choice_matches_batchtopk(data):
    x = data.draw(batches())
    k = data.draw(st.one_of(st.floats(0, x.shape[-1] + 2), st.integers(0, x.shape[-1])))
    check_mutual_choice(x, k)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
def test_mutual_choice_fast_path_is_taken_and_exact(dtype):
    x = torch.randn(2, 128, 512, generator=torch.Generator().manual_seed(1)).to(dtype)
    m = budget(256, 16)
    assert alloc._mutual_choice_sampled(x.reshape(256, 512), m) is not None
    check_mutual_choice(x, 16)
    if dtype != torch.bfloat16 and dtype != torch.float16:  # no ties: exactly BatchTopK
        assert torch.equal(mutual_choice(x, 16).codes, mc_topk(x, 16))


def test_mutual_choice_fast_path_with_ties():
    generator = torch.Generator().manual_seed(2)
    x = torch.randint(-20, 60, (300, 400), generator=generator).float()
    m = budget(300, 7.5)
    assert alloc._mutual_choice_sampled(x, m) is not None
    check_mutual_choice(x, 7.5)


def test_mutual_choice_sample_miss_falls_back_to_the_same_result():
    # Put large values exactly where the sampler looks: its bound then lies above all but the
    # (at most 65536) sampled entries, fewer than M = 131072, so the candidate path must give up.
    n, f = 1024, 1024
    generator = torch.Generator().manual_seed(alloc._SEED)
    draws = torch.randint(0, n * f, (alloc._MC_SAMPLE,), generator=generator)
    x = torch.rand(n * f, generator=torch.Generator().manual_seed(3))
    x[draws] += 10
    x = x.reshape(n, f)
    assert alloc._mutual_choice_sampled(x, budget(n, 128)) is None
    check_mutual_choice(x, 128)
    assert torch.equal(mutual_choice(x, 128).codes, mc_topk(x, 128))


def test_mutual_choice_massive_ties_fall_back_to_the_same_result():
    x = torch.full((512, 256), 3.0)
    assert alloc._mutual_choice_sampled(x, budget(512, 4)) is None  # every block passes
    codes = mutual_choice(x, 4).codes
    assert torch.equal(codes, mc_tie_rule(x, 4)[0])
    assert int((codes != 0).sum()) == budget(512, 4)


def test_mutual_choice_result_does_not_depend_on_the_sample(monkeypatch):
    x = torch.randint(0, 40, (256, 512), generator=torch.Generator().manual_seed(4)).float()
    first = mutual_choice(x, 12)
    monkeypatch.setattr(alloc, "_SEED", 12345)
    second = mutual_choice(x, 12)
    assert torch.equal(first.codes, second.codes) and torch.equal(first.cutoff, second.cutoff)


def test_mutual_choice_3d_equals_flattened():
    x = torch.randn(4, 64, 300, generator=torch.Generator().manual_seed(5))
    for k in (3, 5.5):
        three, two = mutual_choice(x, k), mutual_choice(x.reshape(256, 300), k)
        assert torch.equal(three.codes.reshape(256, 300), two.codes)
        assert torch.equal(three.cutoff, two.cutoff)


@pytest.mark.parametrize("value", [0.0, -1.5])
def test_mutual_choice_all_zero_or_negative_keeps_nothing(value):
    x = torch.full((300, 300), value)
    result = mutual_choice(x, 4)
    assert not result.codes.any()
    assert float(result.cutoff) == 0.0


def test_mutual_choice_budget_above_positive_count_keeps_every_positive():
    x = torch.randn(300, 400, generator=torch.Generator().manual_seed(6))
    x[:, 10:] = -1  # about 1500 positive entries left, budget 300 * 20 = 6000
    result = mutual_choice(x, 20)
    assert torch.equal(result.codes, x.relu())
    assert float(result.cutoff) == 0.0


def test_non_contiguous_input_equals_its_contiguous_copy():
    base = torch.randn(400, 600, generator=torch.Generator().manual_seed(13))
    x = base.t()[:, ::2]  # 600 x 200, strided
    caps = uniform_capacities(600, 200, 4, torch.Generator().manual_seed(6))
    for fn in (lambda t: mutual_choice(t, 4), lambda t: feature_choice(t, caps)):
        strided, dense = fn(x), fn(x.contiguous())
        assert torch.equal(strided.codes, dense.codes) and torch.equal(strided.cutoff, dense.cutoff)


def test_mutual_choice_zero_budget():
    result = mutual_choice(torch.randn(5, 7), 0.1)  # floor(0.5) = 0
    assert not result.codes.any() and math.isinf(float(result.cutoff))


def test_mutual_choice_rejects_negative_k():
    with pytest.raises(ValueError, match="k must be"):
        mutual_choice(torch.randn(3, 4), -1)


# --- Feature Choice -----------------------------------------------------------------------------


def check_feature_choice(x: torch.Tensor, caps: torch.Tensor) -> None:
    rule_codes, rule_cutoff = fc_tie_rule(x, caps)
    result = feature_choice(x, caps)
    assert torch.equal(result.codes, rule_codes)
    assert torch.equal(result.cutoff, rule_cutoff)
    assert result.cutoff.shape == (x.shape[-1],) and not result.cutoff.requires_grad
    z = x.reshape(-1, x.shape[-1]).contiguous()
    clamped = caps.clamp(max=z.shape[0])
    assert torch.equal(codes_from(alloc._feature_choice_plain(z, clamped), x), rule_codes)
    fast = alloc._feature_choice_grouped(z, clamped, z.numel())
    if fast is not None:
        assert torch.equal(codes_from(fast, x), rule_codes)
        assert torch.equal(fast[2], rule_cutoff)
        kept = fast[0][fast[1]] % z.shape[1]  # exactly min(m_j, N) kept per latent, before relu
        assert torch.equal(torch.bincount(kept, minlength=z.shape[1]), clamped)
    reference = fc_topk(x, caps).reshape(z.shape).t()
    got = result.codes.reshape(z.shape).t()
    assert torch.equal(got.sort(dim=1).values, reference.sort(dim=1).values)
    shifted = z - z.min() + 1  # positive, so every kept entry shows in the codes
    assert_same_choice(
        feature_choice(shifted, caps).codes.t(), fc_topk(shifted, caps).t(), shifted.t()
    )


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_feature_choice_matches_topk_down_the_batch(data):
    x = data.draw(batches())
    check_feature_choice(x, capacities_for(x, data.draw))


@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
def test_feature_choice_fast_path_is_taken_and_exact(dtype):
    x = torch.randn(2, 160, 400, generator=torch.Generator().manual_seed(7)).to(dtype)
    caps = uniform_capacities(320, 400, 6.5, torch.Generator().manual_seed(0))
    assert alloc._feature_choice_grouped(x.reshape(320, 400), caps) is not None
    check_feature_choice(x, caps)
    if dtype != torch.bfloat16 and dtype != torch.float16:
        assert torch.equal(feature_choice(x, caps).codes, fc_topk(x, caps))


def test_feature_choice_fast_path_with_ties_and_zipf_capacities():
    x = torch.randint(-100, 400, (517, 301), generator=torch.Generator().manual_seed(8)).float()
    ranks = ranks_from_frequency(torch.rand(301, generator=torch.Generator().manual_seed(9)))
    caps = zipf_capacities(517, 9, ranks, 1.0, torch.Generator().manual_seed(1))
    assert int(caps.max()) > 32  # some latents beyond the grouped bound: whole columns
    assert alloc._feature_choice_grouped(x, caps) is not None
    check_feature_choice(x, caps)


def test_feature_choice_massive_ties_fall_back_to_the_same_result():
    x = torch.full((512, 256), -2.0)
    caps = torch.full((256,), 8)
    assert alloc._feature_choice_grouped(x, caps) is None  # every block passes
    result = feature_choice(x, caps)
    assert torch.equal(result.cutoff, torch.full((256,), -2.0))
    check_feature_choice(x, caps)


def test_feature_choice_3d_equals_flattened():
    x = torch.randn(4, 50, 400, generator=torch.Generator().manual_seed(10))
    caps = uniform_capacities(200, 400, 5, torch.Generator().manual_seed(2))
    three, two = feature_choice(x, caps), feature_choice(x.reshape(200, 400), caps)
    assert torch.equal(three.codes.reshape(200, 400), two.codes)
    assert torch.equal(three.cutoff, two.cutoff)


def test_feature_choice_capacity_above_n_keeps_the_whole_column():
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(11))
    caps = torch.tensor([0, 1, 6, 7, 100])
    result = feature_choice(x, caps)
    assert not result.codes[:, 0].any() and math.isinf(float(result.cutoff[0]))
    assert torch.equal(result.codes[:, 2:], x[:, 2:].relu())
    assert torch.equal(result.cutoff[2:], x[:, 2:].min(0).values)


@pytest.mark.parametrize("value", [0.0, -1.5])
def test_feature_choice_all_zero_or_negative_keeps_nothing_positive(value):
    x = torch.full((300, 300), value)
    caps = torch.full((300,), 4)
    result = feature_choice(x, caps)
    assert not result.codes.any()
    assert torch.equal(result.cutoff, torch.full((300,), value))


@pytest.mark.parametrize(
    "caps", [torch.zeros(3), torch.zeros(4, dtype=torch.long), torch.tensor([1, -1, 2])]
)
def test_feature_choice_rejects_bad_capacities(caps):
    with pytest.raises(ValueError, match="capacities"):
        feature_choice(torch.randn(5, 3), caps)


def test_thread_count_is_restored():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.randn(256, 512, generator=torch.Generator().manual_seed(14))
        mutual_choice(x, 8)
        feature_choice(x, uniform_capacities(256, 512, 8))
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError, match="inside"):
            with alloc._serial(torch.device("cpu")):
                assert torch.get_num_threads() == 1
                raise RuntimeError("inside")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# --- gradients ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7, 13), (3, 90, 400)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_equal_the_references(shape, dtype):
    generator = torch.Generator().manual_seed(12)
    x = torch.randn(shape, generator=generator, dtype=dtype)
    weights = torch.randn(shape, generator=generator, dtype=dtype)
    n, f = x.reshape(-1, shape[-1]).shape
    caps = uniform_capacities(n, f, 3, torch.Generator().manual_seed(3))
    for ours, reference in [
        (lambda t: mutual_choice(t, 3).codes, lambda t: mc_topk(t, 3)),
        (lambda t: feature_choice(t, caps).codes, lambda t: fc_topk(t, caps)),
    ]:
        grads = []
        for fn in (ours, reference):
            leaf = x.clone().requires_grad_(True)
            (fn(leaf) * weights).sum().backward()
            grads.append(leaf.grad)
        assert torch.equal(grads[0], grads[1])
        assert grads[0].count_nonzero() > 0


# --- capacities ---------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 500), f=st.integers(1, 300), k=st.floats(0, 50), seed=st.integers(0, 99))
def test_uniform_capacities_sum_to_the_budget(n, f, k, seed):
    caps = uniform_capacities(n, f, k, torch.Generator().manual_seed(seed))
    m = budget(n, k)
    assert caps.dtype == torch.long and caps.shape == (f,)
    assert int(caps.sum()) == m
    assert set(caps.unique().tolist()) <= {m // f, m // f + 1}


def test_uniform_capacities_are_unbiased():
    generator = torch.Generator().manual_seed(4)
    draws = torch.stack([uniform_capacities(37, 10, 2.3, generator) for _ in range(4000)])
    expected = torch.full((10,), budget(37, 2.3) / 10, dtype=torch.float64)
    assert torch.allclose(draws.double().mean(0), expected, atol=0.03)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 300),
    f=st.integers(1, 200),
    fraction=st.floats(0, 1),
    exponent=st.floats(0, 3),
    seed=st.integers(0, 99),
)
def test_zipf_capacities_invariants(n, f, fraction, exponent, seed):
    m = f + round(fraction * (f * n - f))  # a budget in [F, F*N]
    k = m / n + 1e-9 / n  # int(k * n) == m
    assert budget(n, k) == m
    ranks = torch.randperm(f, generator=torch.Generator().manual_seed(seed)) + 1
    targets = zipf_targets(n, k, ranks, exponent)
    caps = zipf_capacities(n, k, ranks, exponent, torch.Generator().manual_seed(seed))
    assert int(caps.sum()) == m
    assert int(caps.min()) >= 1 and int(caps.max()) <= n
    assert torch.all((caps == targets.floor()) | (caps == targets.ceil()))
    assert math.isclose(float(targets.sum()), m, rel_tol=1e-9, abs_tol=1e-6)
    by_rank = targets[torch.argsort(ranks)]
    assert torch.all(by_rank[:-1] >= by_rank[1:] - 1e-9)  # more frequent, more capacity


def test_zipf_targets_follow_the_power_law_between_floor_and_cap():
    ranks = torch.arange(1, 2001)
    targets = zipf_targets(256, 16, ranks, 1.1)
    free = (targets > 1) & (targets < 256)
    assert free.sum() > 100 and (targets == 256).any() and (targets == 1).any()
    ratio = targets[free] * ranks[free].double() ** 1.1
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-9)


def test_zipf_capacities_are_unbiased():
    ranks = torch.arange(1, 41)
    targets = zipf_targets(50, 3.3, ranks, 0.8)
    generator = torch.Generator().manual_seed(5)
    draws = torch.stack([zipf_capacities(50, 3.3, ranks, 0.8, generator) for _ in range(1500)])
    assert torch.allclose(draws.double().mean(0), targets, atol=0.05)


@pytest.mark.parametrize(("n", "k", "f"), [(10, 0.5, 8), (10, 9, 8)])
def test_zipf_capacities_reject_an_infeasible_budget(n, k, f):
    with pytest.raises(ValueError, match="d_sae <= floor"):
        zipf_capacities(n, k, torch.arange(1, f + 1), 1.0)


def test_ranks_from_frequency():
    ranks = ranks_from_frequency(torch.tensor([0.1, 0.5, 0.1, 0.9]))
    assert ranks.tolist() == [3, 2, 4, 1]
