"""Feature Choice Zipf capacities: the rank statistic (Mutual Choice selection rate, ties by
positive mass), the warm-up / re-ranking schedule, a small run whose ranking tracks the statistic
rather than the latent index, and the buffers through checkpoint and export."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sae_lens import SAE, TrainingSAE
from safetensors.torch import load_file

import sae_lens_allocation  # noqa: F401  (registers the architectures)
from sae_lens_allocation import FeatureChoiceTrainingSAEConfig
from sae_lens_allocation.allocation import budget, ranks_from_frequency
from sae_lens_allocation.saes.feature_choice import FeatureChoiceTrainingSAE

import support

D_IN, D_SAE, K, N = 16, 64, 4.0, 256
RANK_BUFFERS = ("rank_selection_ema", "rank_mass_ema", "rank_updates", "capacity_ranks")


make_sae = functools.partial(support.plugin_sae, "feature_choice", d_in=D_IN, d_sae=D_SAE, k=K,
                             capacity="zipf")


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 40),
    levels=st.integers(1, 4),
    use_tie_break=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_ranks_from_frequency_breaks_ties_by_the_second_key_then_index(n, levels, use_tie_break, seed):
    g = torch.Generator().manual_seed(seed)
    freq = torch.randint(0, levels, (n,), generator=g).float() / levels  # many ties
    second = torch.randint(0, 3, (n,), generator=g).float()
    tie_break = second if use_tie_break else None
    ranks = ranks_from_frequency(freq, tie_break)
    key = (lambda j: (-freq[j].item(), -second[j].item(), j)) if use_tie_break else (
        lambda j: (-freq[j].item(), j))
    expected = torch.empty(n, dtype=torch.long)
    for rank, j in enumerate(sorted(range(n), key=key), start=1):
        expected[j] = rank
    assert torch.equal(ranks, expected)


@pytest.mark.parametrize("field", ["capacity_warmup_steps", "capacity_rerank_steps"])
@pytest.mark.parametrize("value", [0, -3, 2.5, True])
def test_schedule_fields_must_be_positive_integers(field, value):
    with pytest.raises(ValueError, match=rf"{field}={value!r} is not allowed"):
        FeatureChoiceTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, **{field: value})


def test_rank_statistic_is_the_mutual_choice_selection_rate_and_the_positive_mass():
    sae = make_sae()
    x = torch.randn(8, N // 8, D_IN)  # 3-D: all leading dims are one batch
    with torch.no_grad():
        # z as SAELens TopK computes it.
        z = sae.process_sae_in(x) @ sae.W_enc + sae.b_enc
        if sae.cfg.rescale_acts_by_decoder_norm:
            z = z * sae.W_dec.norm(dim=-1)
        z = z.reshape(-1, D_SAE)
    support.training_step(sae, x)
    # Reference: a full torch.topk over the batch's relu(z) (Mutual Choice's selection).
    m = budget(N, K)
    top = torch.topk(z.relu().reshape(-1), m).indices
    selected = torch.zeros(N * D_SAE)
    selected[top] = 1.0
    torch.testing.assert_close(sae.rank_selection_ema, selected.view(N, D_SAE).mean(0))
    torch.testing.assert_close(sae.rank_mass_ema, z.relu().mean(0))
    assert sae.rank_updates.item() == 1


def test_uniform_capacities_in_the_warmup_then_zipf_by_the_statistic_on_schedule():
    warmup, rerank = 3, 2
    sae = make_sae(capacity_warmup_steps=warmup, capacity_rerank_steps=rerank)
    g = torch.Generator().manual_seed(1)
    for t in range(1, 9):
        caps = sae.capacities(N)
        if t <= warmup:  # steps 1..W run before the W-th update: uniform
            assert not sae.zipf_ranked()
            assert int(caps.max() - caps.min()) <= 1
        else:
            assert sae.zipf_ranked()
            order = torch.argsort(sae.capacity_ranks)
            assert int(caps[order[0]]) > int(caps[order[-1]])  # rank 1 gets the most tokens
        before = sae.capacity_ranks.clone()
        support.training_step(sae, torch.randn(N, D_IN, generator=g) + torch.rand(D_IN, generator=g))
        now = ranks_from_frequency(sae.rank_selection_ema, sae.rank_mass_ema)
        if t >= warmup and (t - warmup) % rerank == 0:
            assert torch.equal(sae.capacity_ranks, now), t
        else:
            assert torch.equal(sae.capacity_ranks, before), t
    assert sae.rank_updates.item() == 8


def zipfian_batches(n_batches: int, seed: int = 0):
    """Activations made of 32 true directions firing with Zipf probabilities, in a random
    order relative to the latent index."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(32, D_IN, generator=g), dim=-1)
    probs = 0.4 * torch.arange(1, 33, dtype=torch.float32) ** -1.0
    for _ in range(n_batches):
        fires = torch.rand(N, 32, generator=g) < probs
        yield (fires * (1 + torch.rand(N, 32, generator=g))) @ directions


def test_a_small_run_ranks_by_the_statistic_not_by_the_latent_index():
    sae = make_sae(capacity_warmup_steps=20, capacity_rerank_steps=1, firing_ema_decay=0.9)
    optimizer = torch.optim.Adam(sae.parameters(), lr=3e-3)
    ranks_after_warmup = None
    for t, x in enumerate(zipfian_batches(150), start=1):
        out = support.training_step(sae, x)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        if t == 20:
            ranks_after_warmup = sae.capacity_ranks.clone()
    index = torch.arange(D_SAE)
    statistic_ranks = ranks_from_frequency(sae.rank_selection_ema, sae.rank_mass_ema)
    assert torch.equal(sae.capacity_ranks, statistic_ranks)
    assert abs(pearson(sae.capacity_ranks, index)) < 0.5
    # The ranking moves with the statistic during training (ranking by a latent's own FC firing
    # rate never moved from the index order, Pearson r 0.99).
    assert not torch.equal(sae.capacity_ranks, ranks_after_warmup)
    # The capacities of a batch follow the ranks: m_j falls with rank_j (up to the rounding).
    by_rank = sae.capacities(N)[torch.argsort(sae.capacity_ranks)]
    assert torch.all(by_rank[1:] <= by_rank[:-1] + 1) and by_rank[0] > by_rank[-1] + 1


def test_rank_buffers_round_trip_through_a_checkpoint_and_never_reach_the_export(tmp_path):
    sae = make_sae(capacity_warmup_steps=2)
    for x in zipfian_batches(4):
        support.training_step(sae, x)
    assert sae.zipf_ranked()
    sae.save_model(tmp_path / "checkpoint")
    assert set(RANK_BUFFERS) <= set(load_file(tmp_path / "checkpoint" / "sae_weights.safetensors"))
    loaded = TrainingSAE.load_from_disk(tmp_path / "checkpoint")
    assert isinstance(loaded, FeatureChoiceTrainingSAE)
    for name in RANK_BUFFERS:
        assert torch.equal(getattr(loaded, name), getattr(sae, name)), name
    torch.testing.assert_close(loaded.firing_fractions(), sae.firing_fractions())

    sae.save_inference_model(tmp_path / "export")
    exported = load_file(tmp_path / "export" / "sae_weights.safetensors")
    assert not set(RANK_BUFFERS) & set(exported)
    SAE.load_from_disk(tmp_path / "export")


def test_a_checkpoint_without_rank_buffers_keeps_the_ranking_it_trained_with():
    """Checkpoints from before the rank buffers ranked by the firing EMA; they load with that
    ranking, so their export calibrates to the capacities they trained with."""
    sae = make_sae()
    for x in zipfian_batches(3):
        support.training_step(sae, x)
    legacy = {name: t for name, t in sae.state_dict().items() if name not in RANK_BUFFERS}
    loaded = make_sae(seed=1)
    loaded.load_state_dict(legacy)
    assert torch.equal(loaded.capacity_ranks, ranks_from_frequency(sae.firing_ema))
    assert loaded.rank_updates.item() == sae.firing_ema_steps.item() == 3
    assert loaded.zipf_ranked()
