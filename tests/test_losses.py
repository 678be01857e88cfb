"""Auxiliary losses (losses.py): registry, validation, aux_k = SAELens aux-k, aux_zipf's
reduction to aux_k, dead latents first, weights on gradients, the Zipf fit and underused set, the
firing EMA, and the buffers."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sae_lens import SAE, TrainingSAE
from sae_lens.saes.topk_sae import TopKSAE, TopKTrainingSAE, TopKTrainingSAEConfig
from safetensors.torch import load_file

from sae_lens_allocation.allocation import ranks_from_frequency
from sae_lens_allocation.saes.aux_losses import (
    AUX_LOSS_KEY,
    AUX_LOSSES,
    AuxLossContext,
    aux_activations,
    reconstruct_residual_loss,
    register_aux_loss,
)
from sae_lens_allocation.saes.topk_aux import TopKAuxTrainingSAE, TopKAuxTrainingSAEConfig
from sae_lens_allocation.saes.zipf import (
    ema_warmup_steps,
    expected_frequency,
    fit_zipf,
    update_firing_ema,
    zipf_underuse,
)

import support

D_IN, D_SAE, K = 16, 64, 4


# Off the symmetric init, so every latent has its own pre-activation.
make_sae = functools.partial(support.plugin_sae, "topk_aux", d_in=D_IN, d_sae=D_SAE, k=K,
                             b_enc_std=0.1, uneven_decoder=True)


def aux_loss_of(sae: TopKAuxTrainingSAE, x: torch.Tensor, dead: torch.Tensor | None) -> torch.Tensor:
    return sae.training_forward_pass(support.step_input(x, dead)).losses[AUX_LOSS_KEY]


def zipf_profile(d_sae: int = D_SAE, s: float = 1.0, c: float = 0.3) -> torch.Tensor:
    return c * torch.arange(1, d_sae + 1, dtype=torch.float32) ** -s


def warm(sae: TopKAuxTrainingSAE, p: torch.Tensor) -> None:
    """Put the SAE past the EMA warm-up with firing frequencies p and their Zipf fit."""
    with torch.no_grad():
        sae.firing_ema.copy_(p)
        sae.firing_ema_steps.fill_(ema_warmup_steps(sae.cfg.firing_ema_decay))
        sae.zipf_fit.copy_(fit_zipf(p, sae.cfg.aux_zipf_fit_fraction, sae.cfg.aux_zipf_exponent))


# -- registry and validation -------------------------------------------------------------------


def test_builtin_losses_are_registered():
    assert {"none", "aux_k", "aux_zipf"} <= set(AUX_LOSSES)


def test_registering_a_taken_name_raises():
    with pytest.raises(ValueError, match="'aux_k' is already registered"):
        register_aux_loss("aux_k")(lambda sae, ctx: (ctx.sae_out.new_zeros(()), {}))


@pytest.fixture
def scaled_mse_loss():
    @register_aux_loss("test_scaled_mse")
    def scaled_mse(sae, ctx: AuxLossContext):
        loss = sae.cfg.aux_loss_coefficient * (ctx.sae_out - ctx.step_input.sae_in).pow(2).mean()
        return loss, {"test_metric": 7.0}

    yield "test_scaled_mse"
    AUX_LOSSES.pop("test_scaled_mse")


def test_a_registered_loss_is_a_valid_aux_loss_and_is_used(scaled_mse_loss):
    sae = make_sae(aux_loss=scaled_mse_loss, aux_loss_coefficient=3.0)
    x = torch.randn(8, D_IN)
    out = sae.training_forward_pass(support.step_input(x, None))
    expected = 3.0 * (out.sae_out - x).pow(2).mean()
    torch.testing.assert_close(out.losses[AUX_LOSS_KEY], expected)
    assert out.metrics["test_metric"] == 7.0


def test_bad_loss_name_raises_listing_registered_names():
    with pytest.raises(ValueError) as excinfo:
        TopKAuxTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, aux_loss="aux_kk")
    message = str(excinfo.value)
    assert "aux_loss='aux_kk'" in message
    for name in AUX_LOSSES:
        assert name in message


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("aux_loss_coefficient", -1.0),
        ("aux_loss_coefficient", math.nan),
        ("aux_k", 0),
        ("aux_k", 2.5),
        ("aux_loss_normalization", "variance"),
        ("aux_zipf_tau", 1.5),
        ("aux_zipf_tau", -0.1),
        ("aux_zipf_exponent", 0.0),
        ("aux_zipf_exponent", math.inf),
        ("aux_zipf_fit_fraction", 0.0),
        ("aux_zipf_fit_fraction", 1.2),
        ("firing_ema_decay", 1.0),
        ("firing_ema_decay", -0.5),
    ],
)
def test_invalid_field_raises_naming_field_and_value(field, value):
    with pytest.raises(ValueError, match=rf"{field}={value!r} is not allowed"):
        TopKAuxTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, **{field: value})


def test_layer_norm_inputs_are_refused_with_an_aux_loss_but_not_without():
    with pytest.raises(ValueError, match="normalize_activations='layer_norm'"):
        TopKAuxTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, normalize_activations="layer_norm")
    cfg = TopKAuxTrainingSAEConfig(
        d_in=D_IN, d_sae=D_SAE, k=K, normalize_activations="layer_norm", aux_loss="none"
    )
    assert cfg.aux_loss == "none"


# -- aux_k equals SAELens, aux_zipf reduces to aux_k ---------------------------------------------


@pytest.mark.parametrize("n_dead", [0, 3, 40])
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("shape", [(32,), (4, 8)])
def test_aux_k_equals_saelens_topk_aux_loss(n_dead, rescale, shape):
    sae = make_sae(rescale_acts_by_decoder_norm=rescale, aux_loss_coefficient=0.7)
    ref = TopKTrainingSAE(
        TopKTrainingSAEConfig(
            d_in=D_IN, d_sae=D_SAE, k=K, rescale_acts_by_decoder_norm=rescale, aux_loss_coefficient=0.7
        )
    )
    ref.load_state_dict({n: t for n, t in sae.state_dict().items() if n not in sae.AUX_STATE_BUFFERS})
    x = torch.randn(*shape, D_IN)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[torch.randperm(D_SAE)[:n_dead]] = True
    _, hidden_pre = ref.encode_with_hidden_pre(x)
    expected = ref.calculate_topk_aux_loss(
        sae_in=x, sae_out=ref(x), hidden_pre=hidden_pre, dead_neuron_mask=dead
    )
    got = aux_loss_of(sae, x, dead)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    if n_dead:
        assert got > 0


def saelens_aux_k(
    sae: TopKAuxTrainingSAE, x: torch.Tensor, dead: torch.Tensor
) -> tuple[torch.Tensor, TopKTrainingSAE]:
    """SAELens' own TopKTrainingSAE.calculate_topk_aux_loss on a copy of the weights (and the
    copy, for its gradients)."""
    cfg = sae.cfg
    ref = TopKTrainingSAE(
        TopKTrainingSAEConfig(
            d_in=D_IN, d_sae=D_SAE, k=K, rescale_acts_by_decoder_norm=cfg.rescale_acts_by_decoder_norm,
            aux_loss_coefficient=cfg.aux_loss_coefficient,
        )
    )
    ref.load_state_dict({n: t for n, t in sae.state_dict().items() if n not in sae.AUX_STATE_BUFFERS})
    _, hidden_pre = ref.encode_with_hidden_pre(x)
    loss = ref.calculate_topk_aux_loss(sae_in=x, sae_out=ref(x), hidden_pre=hidden_pre, dead_neuron_mask=dead)
    return loss, ref


@pytest.mark.parametrize("n_dead", [0, 3, 40])
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("shape", [(64,), (8, 8)])
def test_aux_zipf_with_tau_0_and_default_normalisation_equals_saelens_aux_k(n_dead, rescale, shape):
    """Default normalisation, tau = 0 (U = dead, w = 1 on U), past the warm-up: aux_zipf is
    SAELens' aux-k loss, value and gradients."""
    x = torch.randn(*shape, D_IN)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[torch.randperm(D_SAE)[:n_dead]] = True
    p = zipf_profile()
    p[20:30] *= 0.01  # alive but underused: tau = 0.5 would add them to U
    p[dead] = 0.0
    sae = make_sae(aux_loss="aux_zipf", aux_zipf_tau=0.0, rescale_acts_by_decoder_norm=rescale)
    warm(sae, p)
    sae.eval()  # keep the warmed state fixed
    assert bool(sae.zipf_ready())
    got = aux_loss_of(sae, x, dead)
    expected, ref = saelens_aux_k(sae, x, dead)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    if n_dead:
        names = ["W_enc", "W_dec", "b_enc", "b_dec"]
        got_grads = torch.autograd.grad(got, [getattr(sae, n) for n in names])
        expected_grads = torch.autograd.grad(expected, [getattr(ref, n) for n in names])
        for grad, want in zip(got_grads, expected_grads):
            torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-7)


def test_aux_zipf_with_tau_differs_from_aux_k_when_underused_latents_get_slots():
    x = torch.randn(64, D_IN)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[-3:] = True  # fewer dead latents than k_aux = 8: the free slots go to U \ dead
    p = zipf_profile()
    p[20:30] *= 0.01
    p[dead] = 0.0
    sae = make_sae(aux_loss="aux_zipf")
    warm(sae, p)
    sae.eval()
    assert not torch.isclose(aux_loss_of(sae, x, dead), saelens_aux_k(sae, x, dead)[0])


def reference_aux_activations(z: torch.Tensor, candidates, slots: int, rectify: bool) -> torch.Tensor:
    """Plain reference: per token, the `slots` candidates with the largest z keep z (or relu z)."""
    flat = z.reshape(-1, z.shape[-1])
    out = torch.zeros_like(flat)
    chosen = [j for j in range(flat.shape[1]) if candidates[j]]
    for n, row in enumerate(flat.tolist()):
        for j in sorted(chosen, key=lambda j: -row[j])[:slots]:
            out[n, j] = max(row[j], 0.0) if rectify else row[j]
    return out.reshape(z.shape)


@settings(max_examples=40, deadline=None)
@given(
    n_candidates=st.integers(1, 30),
    slots=st.integers(1, 12),
    rectify=st.booleans(),
    shape=st.sampled_from([(7,), (3, 5)]),
    seed=st.integers(0, 2**16),
)
def test_aux_activations_keep_the_top_candidates_per_token(n_candidates, slots, rectify, shape, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(*shape, 30, generator=g) * 3
    candidates = torch.zeros(30, dtype=torch.bool)
    candidates[torch.randperm(30, generator=g)[:n_candidates]] = True
    slots = min(slots, n_candidates)
    got = aux_activations(z, candidates, slots, rectify)
    torch.testing.assert_close(got, reference_aux_activations(z, candidates, slots, rectify))


def test_aux_zipf_is_aux_k_plus_the_alive_underused_latents_in_the_free_slots():
    """Dead latents take the k_aux slots first and their term is aux_k; the alive underused
    latents reconstruct e on their own with the free slots (relu(z)); checked against a plain
    computation."""
    x = torch.randn(32, D_IN)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[-3:] = True  # 3 dead < k_aux = 8: 5 free slots
    p = zipf_profile()
    p[20:30] *= 0.01
    p[dead] = 0.0
    sae = make_sae(aux_loss="aux_zipf", aux_loss_coefficient=0.7)
    warm(sae, p)
    sae.eval()
    underused = sae.underused_mask(dead)
    alive = underused & ~dead
    assert alive[20:30].all() and int(alive.sum()) >= 5
    out = sae.training_forward_pass(support.step_input(x, dead))
    expected_dead, _ = saelens_aux_k(sae, x, dead)
    with torch.no_grad():
        _, z = sae.encode_with_hidden_pre(x)
        residual = x - out.sae_out
        acts = reference_aux_activations(z, alive, 5, rectify=True)
        recons = acts @ (sae.W_dec / sae.W_dec.norm(dim=-1, keepdim=True))
        alive_term = 0.7 * (5 / 8) * (recons - residual).pow(2).sum(-1).mean()
    torch.testing.assert_close(out.losses[AUX_LOSS_KEY], expected_dead + alive_term, rtol=1e-5, atol=1e-6)

    many_dead = torch.zeros(D_SAE, dtype=torch.bool)
    many_dead[-12:] = True  # at least k_aux dead latents: every slot is a dead latent's
    torch.testing.assert_close(aux_loss_of(sae, x, many_dead), saelens_aux_k(sae, x, many_dead)[0],
                               rtol=1e-6, atol=1e-7)


def aux_context(sae: TopKAuxTrainingSAE, x: torch.Tensor) -> AuxLossContext:
    feature_acts, hidden_pre = sae.encode_with_hidden_pre(x)
    sae_out = sae.decode(feature_acts)
    none = torch.zeros(D_SAE, dtype=torch.bool)
    zero = torch.zeros(D_SAE)
    return AuxLossContext(
        step_input=support.step_input(x, none), feature_acts=feature_acts, hidden_pre=hidden_pre,
        sae_out=sae_out, dead_mask=none, firing_ema=zero, ranks=zero, expected_frequency=zero,
        zipf_exponent=torch.tensor(1.0), zipf_ready=torch.tensor(True), underused=none,
        underuse_weights=zero, k_aux=sae.k_aux(),
    )


@pytest.mark.parametrize("rescale", [True, False])
def test_underuse_weights_scale_each_latents_gradient_not_its_value(rescale):
    sae = make_sae(rescale_acts_by_decoder_norm=rescale)
    x = torch.randn(32, D_IN)
    candidates = torch.zeros(D_SAE, dtype=torch.bool)
    candidates[::3] = True
    n = int(candidates.sum())
    weights = torch.rand(D_SAE)
    params = [sae.W_enc, sae.b_enc, sae.W_dec]
    unit = reconstruct_residual_loss(sae, aux_context(sae, x), candidates, n)
    unit_grads = torch.autograd.grad(unit, params)
    weighted = reconstruct_residual_loss(sae, aux_context(sae, x), candidates, n, weights=weights)
    weighted_grads = torch.autograd.grad(weighted, params)
    torch.testing.assert_close(weighted, unit)  # same reconstruction target and value
    w_enc, b_enc, w_dec = unit_grads
    torch.testing.assert_close(weighted_grads[0], w_enc * weights)
    torch.testing.assert_close(weighted_grads[1], b_enc * weights)
    torch.testing.assert_close(weighted_grads[2], w_dec * weights[:, None])
    assert w_dec[candidates].abs().sum() > 0 and w_dec[~candidates].abs().sum() == 0


def test_aux_zipf_during_ema_warmup_equals_aux_k():
    x = torch.randn(64, D_IN)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[:5] = True
    zipf = make_sae(aux_loss="aux_zipf", firing_ema_decay=0.9)
    auxk = make_sae(aux_loss="aux_k", firing_ema_decay=0.9)
    for _ in range(ema_warmup_steps(0.9) - 1):
        torch.testing.assert_close(aux_loss_of(zipf, x, dead), aux_loss_of(auxk, x, dead))
    assert not bool(zipf.zipf_ready())
    aux_loss_of(zipf, x, dead)
    assert bool(zipf.zipf_ready())


@pytest.mark.parametrize("loss", ["aux_k", "aux_zipf"])
def test_residual_variance_normalisation_divides_either_loss_by_the_residual_variance(loss):
    x = torch.randn(64, D_IN)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[:10] = True
    plain = make_sae(aux_loss=loss)
    normalised = make_sae(aux_loss=loss, aux_loss_normalization="residual_variance")
    assert plain.cfg.aux_loss_normalization == "none"
    plain.eval()
    normalised.eval()
    out = normalised.training_forward_pass(support.step_input(x, dead))
    residual = (x - out.sae_out).detach()
    variance = (residual - residual.mean(0)).pow(2).sum(-1).mean()
    torch.testing.assert_close(out.losses[AUX_LOSS_KEY], aux_loss_of(plain, x, dead) / variance)


def test_aux_zipf_trains_only_underused_latents():
    sae = make_sae(aux_loss="aux_zipf")
    p = zipf_profile()
    p[40:44] *= 0.01
    warm(sae, p)
    sae.eval()
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[60:] = True
    underused = sae.underused_mask(dead)
    assert underused[40:44].all() and underused[60:].all()
    x = torch.randn(64, D_IN)
    feature_acts, hidden_pre = sae.encode_with_hidden_pre(x)
    sae_out = sae.decode(feature_acts).detach()
    losses = sae.calculate_aux_loss(support.step_input(x, dead), feature_acts, hidden_pre, sae_out)
    losses[AUX_LOSS_KEY].backward()
    rows_with_grad = sae.W_dec.grad.abs().sum(-1) > 0
    assert rows_with_grad.any()
    assert not rows_with_grad[~underused].any()


# -- Zipf fit, underused set, EMA ----------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    s=st.floats(0.3, 2.0),
    c=st.floats(0.01, 0.5),
    n=st.integers(8, 300),
    fraction=st.sampled_from([0.5, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_fit_zipf_recovers_an_exact_power_law(s, c, n, fraction, seed):
    g = torch.Generator().manual_seed(seed)
    p = zipf_profile(n, s, c)[torch.randperm(n, generator=g)]
    log_c, fitted_s, n_points = fit_zipf(p, fraction).tolist()
    assert fitted_s == pytest.approx(s, abs=1e-3)
    assert log_c == pytest.approx(math.log(c), abs=1e-3)
    assert n_points == math.ceil(fraction * n)


def test_fit_ignores_the_low_end_and_flags_exactly_the_latents_below_tau():
    p = zipf_profile(200, s=1.2, c=0.2)[torch.randperm(200)]
    order = torch.argsort(p, descending=True)
    low_end, never = order[150:], order[180:]
    p[low_end] *= 0.1  # the low end drops off the power law
    p[never] = 0.0
    log_c, s, n_points = fit_zipf(p, 0.5)
    assert n_points.item() == 90
    assert s.item() == pytest.approx(1.2, abs=1e-4)
    assert fit_zipf(p, 1.0)[1].item() > 1.3  # fitting the low end too bends the line
    ranks = ranks_from_frequency(p).float()
    assert torch.equal(ranks[order[:180]], torch.arange(1.0, 181.0))
    p_hat = expected_frequency(ranks, log_c, s)
    dead = p == 0
    underused, weights = zipf_underuse(p, p_hat, dead, tau=0.5, ready=torch.tensor(True))
    expected = torch.zeros(200, dtype=torch.bool)
    expected[low_end] = True
    assert torch.equal(underused, expected)
    torch.testing.assert_close(weights[underused & ~dead], (1 - p / p_hat)[underused & ~dead])
    assert (weights[dead] == 1).all()


def test_not_ready_means_dead_only_with_unit_weights():
    p = zipf_profile()
    p[10:20] *= 0.01
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[-3:] = True
    p_hat = expected_frequency(ranks_from_frequency(p).float(), *fit_zipf(p, 0.5)[:2])
    underused, weights = zipf_underuse(p, p_hat, dead, tau=0.5, ready=torch.tensor(False))
    assert torch.equal(underused, dead)
    assert (weights == 1).all()


def test_fixed_exponent_is_kept_and_fewer_than_two_points_is_no_fit():
    p = zipf_profile(50, s=0.8)
    assert fit_zipf(p, 1.0, exponent=1.5)[1].item() == 1.5
    one = torch.zeros(50)
    one[3] = 0.2
    assert fit_zipf(one, 1.0)[2].item() == 0
    assert fit_zipf(one, 1.0, exponent=1.0)[2].item() == 1


def test_firing_ema_is_the_running_mean_until_warm_then_an_ema():
    decay = 0.75
    fractions = [torch.rand(5) for _ in range(10)]
    ema = torch.zeros(5)
    for t, f in enumerate(fractions, start=1):
        previous = ema
        ema = update_firing_ema(previous, f, torch.tensor(t), decay)
        if t <= ema_warmup_steps(decay):
            torch.testing.assert_close(ema, torch.stack(fractions[:t]).mean(0))
        else:
            torch.testing.assert_close(ema, previous + 0.25 * (f - previous))


def test_firing_ema_counts_over_all_leading_dims_and_only_in_training():
    flat, nested = make_sae(), make_sae()
    x = torch.randn(6, 8, D_IN)
    flat.training_forward_pass(support.step_input(x.reshape(-1, D_IN), None))
    out = nested.training_forward_pass(support.step_input(x, None))
    fired = (out.feature_acts != 0).reshape(-1, D_SAE).float().mean(0)
    torch.testing.assert_close(nested.firing_ema, fired)
    torch.testing.assert_close(flat.firing_ema, nested.firing_ema)
    nested.eval()
    before = {n: getattr(nested, n).clone() for n in nested.AUX_STATE_BUFFERS}
    nested.training_forward_pass(support.step_input(torch.randn(16, D_IN), None))
    for name, value in before.items():
        assert torch.equal(getattr(nested, name), value)


def test_step_metrics_report_loss_underused_exponent_and_dead():
    sae = make_sae(aux_loss="aux_zipf")
    p = zipf_profile()
    p[50:55] *= 0.01  # fall to the last ranks, far below the line
    warm(sae, p)
    sae.eval()
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[-4:] = True
    out = sae.training_forward_pass(support.step_input(torch.randn(32, D_IN), dead))
    m = out.metrics
    assert m["aux_dead"].item() == 4
    assert m["aux_underused"].item() == 9
    torch.testing.assert_close(m["aux_loss"], out.losses[AUX_LOSS_KEY].detach())
    assert m["aux_zipf_exponent"].item() == pytest.approx(1.0, abs=1e-4)


# -- buffers: checkpoint round trip, never exported -----------------------------------------------


def test_aux_buffers_round_trip_through_a_checkpoint_and_never_reach_the_export(tmp_path):
    sae = make_sae(aux_loss="aux_zipf")
    for _ in range(3):
        sae.training_forward_pass(support.step_input(torch.randn(32, D_IN), None))
    sae.save_model(tmp_path / "checkpoint")
    assert set(sae.AUX_STATE_BUFFERS) <= set(load_file(tmp_path / "checkpoint" / "sae_weights.safetensors"))
    loaded = TrainingSAE.load_from_disk(tmp_path / "checkpoint")
    assert isinstance(loaded, TopKAuxTrainingSAE)
    for name in sae.AUX_STATE_BUFFERS:
        assert torch.equal(getattr(loaded, name), getattr(sae, name)), name
    assert loaded.firing_ema_steps.item() == 3

    sae.save_inference_model(tmp_path / "export")
    exported = load_file(tmp_path / "export" / "sae_weights.safetensors")
    assert not set(sae.AUX_STATE_BUFFERS) & set(exported)
    assert isinstance(SAE.load_from_disk(tmp_path / "export"), TopKSAE)
