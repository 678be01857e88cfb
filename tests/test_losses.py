"""Auxiliary losses (losses.py): registry, validation, aux_k = SAELens aux-k, aux_zipf's
reduction to aux_k, the Zipf fit and underused set, the firing EMA, and the buffers."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from sae_lens import SAE, TrainingSAE
from sae_lens.saes.sae import TrainStepInput
from sae_lens.saes.topk_sae import TopKSAE, TopKTrainingSAE, TopKTrainingSAEConfig

from sae_lens_allocation import register_architecture
from sae_lens_allocation.training.losses import (
    AUX_LOSS_KEY,
    AUX_LOSSES,
    AuxLossContext,
    ema_warmup_steps,
    expected_frequency,
    fit_zipf,
    frequency_ranks,
    register_aux_loss,
    update_firing_ema,
    zipf_underuse,
)
from sae_lens_allocation.saes.topk_aux import TopKAuxTrainingSAE, TopKAuxTrainingSAEConfig

register_architecture("topk_aux", TopKAuxTrainingSAE, TopKAuxTrainingSAEConfig)

D_IN, D_SAE, K = 16, 64, 4


def make_sae(seed: int = 0, **fields) -> TopKAuxTrainingSAE:
    torch.manual_seed(seed)
    sae = TopKAuxTrainingSAE(TopKAuxTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, **fields))
    with torch.no_grad():  # move off the symmetric init so every latent has its own pre-activation
        sae.b_enc.normal_(0, 0.1)
        sae.W_dec.mul_(torch.rand(D_SAE, 1) + 0.5)
    return sae


def step_input(x: torch.Tensor, dead: torch.Tensor | None) -> TrainStepInput:
    return TrainStepInput(
        sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False
    )


def aux_loss_of(sae: TopKAuxTrainingSAE, x: torch.Tensor, dead: torch.Tensor | None) -> torch.Tensor:
    return sae.training_forward_pass(step_input(x, dead)).losses[AUX_LOSS_KEY]


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
    out = sae.training_forward_pass(step_input(x, None))
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


def test_aux_zipf_with_dead_set_and_unit_weights_equals_aux_k():
    """tau = 0 makes U = dead (w = 1 on dead): aux_zipf with SAELens' reduction is aux_k."""
    x = torch.randn(64, D_IN)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[-12:] = True
    p = zipf_profile()
    p[20:30] *= 0.01  # underused, so tau = 0.5 would differ
    p[dead] = 0.0
    losses = {}
    for name, fields in {
        "aux_k": dict(aux_loss="aux_k"),
        "zipf_tau0": dict(aux_loss="aux_zipf", aux_zipf_tau=0.0, aux_loss_normalization="none"),
        "zipf_tau05": dict(aux_loss="aux_zipf", aux_loss_normalization="none"),
    }.items():
        sae = make_sae(**fields)
        warm(sae, p)
        sae.eval()  # keep the warmed state fixed
        losses[name] = aux_loss_of(sae, x, dead)
    torch.testing.assert_close(losses["zipf_tau0"], losses["aux_k"], rtol=1e-6, atol=0)
    assert not torch.isclose(losses["zipf_tau05"], losses["aux_k"])


def test_aux_zipf_during_ema_warmup_equals_aux_k():
    x = torch.randn(64, D_IN)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[:5] = True
    zipf = make_sae(aux_loss="aux_zipf", aux_loss_normalization="none", firing_ema_decay=0.9)
    auxk = make_sae(aux_loss="aux_k", firing_ema_decay=0.9)
    for _ in range(ema_warmup_steps(0.9) - 1):
        torch.testing.assert_close(aux_loss_of(zipf, x, dead), aux_loss_of(auxk, x, dead))
    assert not bool(zipf.zipf_ready())
    aux_loss_of(zipf, x, dead)
    assert bool(zipf.zipf_ready())


def test_aux_zipf_default_normalization_divides_by_residual_variance():
    x = torch.randn(64, D_IN)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[:10] = True
    plain = make_sae(aux_loss="aux_zipf", aux_loss_normalization="none")
    normalised = make_sae(aux_loss="aux_zipf")
    plain.eval()
    normalised.eval()
    out = normalised.training_forward_pass(step_input(x, dead))
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
    losses = sae.calculate_aux_loss(step_input(x, dead), feature_acts, hidden_pre, sae_out)
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
    ranks = frequency_ranks(p)
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
    p_hat = expected_frequency(frequency_ranks(p), *fit_zipf(p, 0.5)[:2])
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
        ema = update_firing_ema(ema, f, torch.tensor(t), decay)
        if t <= ema_warmup_steps(decay):
            torch.testing.assert_close(ema, torch.stack(fractions[:t]).mean(0))
        else:
            torch.testing.assert_close(ema, previous + 0.25 * (f - previous))
        previous = ema


def test_firing_ema_counts_over_all_leading_dims_and_only_in_training():
    flat, nested = make_sae(), make_sae()
    x = torch.randn(6, 8, D_IN)
    flat.training_forward_pass(step_input(x.reshape(-1, D_IN), None))
    out = nested.training_forward_pass(step_input(x, None))
    fired = (out.feature_acts != 0).reshape(-1, D_SAE).float().mean(0)
    torch.testing.assert_close(nested.firing_ema, fired)
    torch.testing.assert_close(flat.firing_ema, nested.firing_ema)
    nested.eval()
    before = {n: getattr(nested, n).clone() for n in nested.AUX_STATE_BUFFERS}
    nested.training_forward_pass(step_input(torch.randn(16, D_IN), None))
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
    out = sae.training_forward_pass(step_input(torch.randn(32, D_IN), dead))
    m = out.metrics
    assert m["aux_dead"].item() == 4
    assert m["aux_underused"].item() == 9
    torch.testing.assert_close(m["aux_loss"], out.losses[AUX_LOSS_KEY].detach())
    assert m["aux_zipf_exponent"].item() == pytest.approx(1.0, abs=1e-4)


# -- buffers: checkpoint round trip, never exported -----------------------------------------------


def test_aux_buffers_round_trip_through_a_checkpoint_and_never_reach_the_export(tmp_path):
    sae = make_sae(aux_loss="aux_zipf")
    for _ in range(3):
        sae.training_forward_pass(step_input(torch.randn(32, D_IN), None))
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
