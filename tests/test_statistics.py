"""Statistics of comparisons (analysis/statistics.py), per-row metrics (analysis/row_metrics.py)
and the steering metric (analysis/steering.py) against plain references."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sae_lens_allocation.analysis import row_metrics as rm
from sae_lens_allocation.analysis import statistics as stats
from sae_lens_allocation.analysis.steering import pick_latents, steering_effects
from sae_lens_allocation.tokens import keep_mask

import support


def test_summarize_matches_the_textbook_t_interval():
    s = stats.summarize([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["sd"] == pytest.approx(1.0)
    half = 4.303 / math.sqrt(3)
    assert (s["low"], s["high"]) == pytest.approx((2 - half, 2 + half))
    one = stats.summarize([5.0])
    assert one["sd"] is None and one["low"] is None


@pytest.mark.parametrize(
    ("diff", "low", "high", "better", "noise", "expected"),
    [
        (0.02, 0.01, 0.03, 1, 0.009, stats.CONSISTENT),
        (0.02, 0.01, 0.03, -1, 0.009, stats.CONTRADICTS),
        (0.005, 0.001, 0.009, 1, 0.009, stats.NO_DIFFERENCE),  # below the seed noise
        (0.02, -0.01, 0.05, 1, 0.0, stats.NO_DIFFERENCE),  # interval includes 0
        (-0.1, -0.2, -0.05, -1, 0.06, stats.CONSISTENT),
        (0.1, None, None, 1, 0.0, stats.NO_DIFFERENCE),  # one seed: no interval
    ],
)
def test_verdict_wording(diff, low, high, better, noise, expected):
    assert stats.verdict(diff, low, high, better, noise) == expected


@settings(max_examples=30, deadline=None)
@given(d=st.floats(-1, 1), w=st.floats(0, 1), noise=st.floats(0, 0.5))
def test_verdict_is_antisymmetric_in_the_direction_of_the_claim(d, w, noise):
    up = stats.verdict(d, d - w, d + w, 1, noise)
    down = stats.verdict(d, d - w, d + w, -1, noise)
    swap = {stats.CONSISTENT: stats.CONTRADICTS, stats.CONTRADICTS: stats.CONSISTENT,
            stats.NO_DIFFERENCE: stats.NO_DIFFERENCE}
    assert down == swap[up]


def test_length_check_shifts_the_main_verdict_by_the_change_seen_on_one_seed():
    main = {"diff": 0.012, "low": 0.010, "high": 0.014, "better": 1, "noise": 0.009,
            "verdict": stats.CONSISTENT}
    # EV advantage 0.012 with a tight interval; on one seed it shrinks by 0.004 at twice the
    # training: 0.008 is below the 0.009 noise, so the verdict would not survive.
    gone = stats.shifted_verdict(main, short=0.013, long=0.009)
    assert gone["shift"] == pytest.approx(-0.004)
    assert (gone["shifted_verdict"], gone["stable"]) == (stats.NO_DIFFERENCE, False)
    kept = stats.shifted_verdict(main, short=0.013, long=0.014)
    assert (kept["shifted_verdict"], kept["stable"]) == (stats.CONSISTENT, True)
    # A one-seed main verdict (no interval) stays "no detectable difference" whatever the shift.
    lone = stats.shifted_verdict({**main, "low": None, "high": None, "verdict": stats.NO_DIFFERENCE}, 0.0, 0.5)
    assert lone["stable"]


def _ev_sums(n_seeds: int, n_rows: int, noise: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_seeds, n_rows, 10, 4, generator=g)
    x_hat = x + noise * torch.randn(x.shape, generator=g)
    return {"n": torch.full((n_seeds, n_rows), 10.0), "sx": x.sum(2), "sxx": x.pow(2).sum((2, 3)),
            "sse": (x - x_hat).pow(2).sum((2, 3))}


def test_paired_bootstrap_of_identical_arms_is_zero():
    sums = _ev_sums(3, 40, 0.5, 0)
    out = stats.paired_bootstrap(sums, sums, rm.explained_variance, n_boot=200)
    assert out["diff"] == 0 and out["low"] == 0 and out["high"] == 0
    assert (out["n_seeds"], out["n_rows"]) == (3, 40)


def test_paired_bootstrap_point_estimate_is_the_pooled_metric_and_the_interval_covers_it():
    arm, base = _ev_sums(3, 60, 0.3, 1), _ev_sums(3, 60, 0.6, 1)
    out = stats.paired_bootstrap(arm, base, rm.explained_variance, n_boot=500)

    def ev(s, i):  # plain reference: EV of seed i over all its rows
        x_sum, n = s["sx"][i].sum(0), s["n"][i].sum()
        return 1 - s["sse"][i].sum() / (s["sxx"][i].sum() - x_sum.pow(2).sum() / n)

    expected = sum(float(ev(arm, i) - ev(base, i)) for i in range(3)) / 3
    assert out["diff"] == pytest.approx(expected)
    assert out["low"] < expected < out["high"] and out["low"] > 0  # less noise: better EV


def test_latent_bootstrap_and_seed_differences():
    arm = [torch.full((8,), 2.0) + 0.01 * i for i in range(3)]
    base = [torch.full((8,), 1.0) for _ in range(3)]
    out = stats.latent_bootstrap(arm, base, n_boot=200)
    assert out["diff"] == pytest.approx(1.01) and 1.0 <= out["low"] <= out["high"] <= 1.02
    d = stats.paired_seed_difference([0.5, 0.6, 0.7], [0.4, 0.4, 0.4])
    assert d["diff"] == pytest.approx(0.2) and d["low"] < 0.2 < d["high"]
    with pytest.raises(ValueError, match="paired by seed"):
        stats.paired_seed_difference([1.0], [1.0, 2.0])


def _identity(x, g):
    return torch.ones(*x.shape[:-1], 3), x


def _zero(x, g):
    return torch.zeros(*x.shape[:-1], 3), torch.zeros_like(x)


def test_lm_sums_of_a_perfect_and_of_a_zero_reconstruction(tiny_model):
    tokens = torch.tensor(support.tiny_dataset(6, seed=2)["tokens"])
    tokens[:, 0] = tiny_model.tokenizer.bos_token_id
    special = [tiny_model.tokenizer.bos_token_id]
    hook = support.HOOK_NAME
    ref = rm.lm_reference_sums(tiny_model, tokens, hook, special, batch_rows=4)
    perfect = {**ref, **rm.lm_sae_sums(tiny_model, tokens, hook, _identity, special, batch_rows=4)}
    total = {k: v.sum(0) for k, v in perfect.items()}
    assert float(rm.ce_with_sae(total)) == pytest.approx(float(total["ce_clean"] / total["n_pred"]), abs=1e-5)
    assert float(rm.kl_div(total)) == pytest.approx(0, abs=1e-5)
    assert float(rm.ce_recovered(total)) == pytest.approx(1, abs=1e-4)
    zero = {**ref, **rm.lm_sae_sums(tiny_model, tokens, hook, _zero, special, batch_rows=4)}
    assert float(rm.ce_recovered({k: v.sum(0) for k, v in zero.items()})) == pytest.approx(0, abs=1e-5)
    # predictions of the BOS token and BOS activations are not scored
    assert float(ref["n_pred"].sum()) == tokens.shape[0] * (tokens.shape[1] - 1)
    acts = rm.lm_row_activations(tiny_model, tokens, hook, batch_rows=4)
    keep = keep_mask(tokens, special)
    a = rm.activation_sums(_identity, acts, keep, batch_rows=4)
    assert float(rm.explained_variance({k: v.sum(0) for k, v in a["rows"].items()})) == pytest.approx(1)
    assert a["l0_tokens"].numel() == int(keep.sum()) and torch.all(a["l0_tokens"] == 3)
    assert torch.all(a["fired"] == keep.sum())


def test_explained_variance_from_row_sums_equals_the_direct_formula():
    g = torch.Generator().manual_seed(0)
    x, x_hat = torch.randn(5, 7, 3, generator=g), torch.randn(5, 7, 3, generator=g)
    keep = torch.rand(5, 7, generator=g) > 0.2
    out = rm.activation_sums(lambda a, _: (a, x_hat), x, keep, batch_rows=5)  # one batch: all rows
    rows = x[keep]
    direct = 1 - (x_hat[keep] - rows).pow(2).sum() / (rows - rows.mean(0)).pow(2).sum()
    ev = rm.explained_variance({k: v.sum(0) for k, v in out["rows"].items()})
    assert float(ev) == pytest.approx(float(direct), rel=1e-6)


def test_steering_effects_are_zero_without_a_push_and_grow_with_it(tiny_model):
    contexts = torch.tensor(support.tiny_dataset(2, seed=4)["tokens"])
    W = torch.randn(5, support.D_MODEL)
    latents = torch.tensor([0, 3])
    none = steering_effects(tiny_model, contexts, support.HOOK_NAME, W, latents, 0.0, [])
    small = steering_effects(tiny_model, contexts, support.HOOK_NAME, W, latents, 1.0, [])
    large = steering_effects(tiny_model, contexts, support.HOOK_NAME, W, latents, 10.0, [])
    assert torch.allclose(none, torch.zeros(2), atol=1e-6)
    assert torch.all(small > 0) and torch.all(large > small)
    fired = torch.tensor([0.0, 2.0, 0.0, 5.0, 1.0])
    picked = pick_latents(fired, 2, seed=0)
    assert len(picked) == 2 and set(picked.tolist()) <= {1, 3, 4}
    assert set(pick_latents(fired, 10, seed=0).tolist()) == {1, 3, 4}
