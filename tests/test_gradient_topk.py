"""Gradient TopK SAE: the selection rule, the training step, the refusals, the `topk` export, and
training through SAELens' runner from a config dict."""

import functools
import json
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from sae_lens import SAE, LanguageModelSAERunnerConfig
from sae_lens.saes.topk_sae import TopKSAE, TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.training.activation_scaler import ActivationScaler
from safetensors.torch import load_file

from sae_lens_allocation.saes.gradient_topk import (
    GradientTopKTrainingSAE,
    GradientTopKTrainingSAEConfig,
    changed_selection_share,
    decoder_alignment,
    gradient_scores,
    select_topk,
)
from sae_lens_allocation.training.gradients import GradientActivationsStore
from sae_lens_allocation.training.runner import build_runner, train

import support

CONFIGS = Path(__file__).parent.parent / "configs"
D_IN, D_SAE = 16, 64


# A non-trivial encoder bias, so folding is exercised.
_sae = functools.partial(support.plugin_sae, "gradient_topk", d_in=D_IN, d_sae=D_SAE, b_enc_std=0.05)


def _topk_twin(sae) -> TopKTrainingSAE:
    """SAELens' TopK training SAE with the same k and weights."""
    topk = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=sae.cfg.k))
    topk.load_state_dict({name: sae.state_dict()[name] for name in topk.state_dict()})
    return topk


# Every latent alive: the aux loss sees no dead latents.
_step = functools.partial(support.training_step, dead=torch.zeros(D_SAE, dtype=torch.bool))


# -- the selection rule -----------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(1, 12),
    k=st.integers(1, D_SAE),
    grad_scale=st.sampled_from([0.0, 1e-3, 1.0, 1e3]),
)
def test_beta_zero_is_exactly_saelens_topk(seed, n, k, grad_scale):
    sae = _sae(seed, k=k, beta=0.0)
    topk = _topk_twin(sae)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, generator=g)
    grads = grad_scale * torch.randn(n, D_IN, generator=g)
    codes, hidden_pre = sae.encode_with_hidden_pre(torch.cat([x, grads], -1))
    ref_codes, ref_hidden_pre = topk.encode_with_hidden_pre(x)
    assert torch.equal(hidden_pre, ref_hidden_pre)
    assert torch.equal(codes, ref_codes)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(1, 10),
    k=st.integers(1, 12),
    beta=st.floats(0.0, 20.0),
)
def test_selection_keeps_k_per_token_with_relu_of_z(seed, n, k, beta):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 3, 12, generator=g)  # leading dims of any shape
    a = torch.randn(n, 3, 12, generator=g)
    scores = gradient_scores(z, a, beta, a.square().mean().sqrt())
    codes, indices = select_topk(z, scores, k)
    assert indices.shape == (n, 3, k)
    assert all(len(set(row)) == k for row in indices.reshape(-1, k).tolist())
    kept = torch.zeros_like(z, dtype=torch.bool).scatter(-1, indices, True)
    assert torch.equal(codes, torch.where(kept, z.relu(), torch.zeros_like(z)))
    # The kept set is the top-k of the scores.
    worst_kept = scores.gather(-1, indices).min(-1).values
    best_dropped = scores.masked_fill(kept, -torch.inf).max(-1).values
    assert torch.all(worst_kept >= best_dropped)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.floats(1e-4, 1e4))
def test_beta_is_dimensionless_gradient_scale_does_not_change_selection(seed, scale):
    sae = _sae(seed, k=4, beta=2.0)
    g = torch.Generator().manual_seed(seed)
    x, grads = torch.randn(8, D_IN, generator=g), torch.randn(8, D_IN, generator=g)
    # A fresh SAE normalises by the batch RMS of a; training would use the running RMS.
    codes = sae.encode_with_gradients(x, grads)
    assert torch.equal(codes, sae.encode_with_gradients(x, scale * grads))


def test_gradient_promotes_a_small_latent_with_a_large_effect():
    z = torch.tensor([[3.0, 2.0, 1.0, 0.5]])
    a = torch.tensor([[0.0, 0.0, 0.0, 10.0]])  # only latent 3 moves the loss
    plain, _ = select_topk(z, gradient_scores(z, a, 0.0, 1.0), 2)
    chosen, indices = select_topk(z, gradient_scores(z, a, 1.0, 1.0), 2)
    assert plain.nonzero()[:, 1].tolist() == [0, 1]
    assert sorted(chosen.nonzero()[:, 1].tolist()) == [0, 3]
    assert chosen[0, 3] == 0.5  # the kept value is relu(z), not the score
    assert changed_selection_share(z, indices, 2) == 0.5


def test_alignment_uses_unit_norm_decoder_rows():
    W_dec = torch.tensor([[2.0, 0.0], [0.0, 0.5]])
    a = decoder_alignment(torch.tensor([[1.0, 3.0]]), W_dec)
    assert torch.equal(a, torch.tensor([[1.0, 3.0]]))


# -- the training step ------------------------------------------------------------------------


def test_training_step_losses_on_activation_half_and_metrics():
    sae = _sae(k=4, beta=5.0, aux_loss="aux_k")
    x, grads = torch.randn(32, D_IN), torch.randn(32, D_IN)
    out = _step(sae, torch.cat([x, grads], -1))
    assert out.sae_in.shape == (32, D_IN) and torch.equal(out.sae_in, x)
    expected_mse = (sae.decode(out.feature_acts) - x).pow(2).sum(-1).mean()
    torch.testing.assert_close(out.losses["mse_loss"], expected_mse)
    assert set(out.losses) == {"mse_loss", "auxiliary_reconstruction_loss"}
    assert ((out.feature_acts != 0).sum(-1) <= 4).all()
    changed = float(out.metrics["gradient_selection_changed"]())
    assert 0 < changed <= 1
    assert "aux_loss" in out.metrics and "gradient_alignment_rms" in out.metrics
    out.loss.backward()
    assert sae.W_enc.grad is not None and sae.W_enc.grad.abs().sum() > 0
    # beta = 0: the selection never differs from TopK.
    out0 = _step(_sae(k=4, beta=0.0), torch.cat([x, grads], -1))
    assert float(out0.metrics["gradient_selection_changed"]()) == 0.0


def test_running_rms_normalises_alignment():
    sae = _sae(k=4, beta=1.0, grad_rms_ema_rate=0.5)
    x, grads = torch.randn(32, D_IN), torch.randn(32, D_IN)
    _step(sae, torch.cat([x, grads], -1))
    first = decoder_alignment(grads, sae.W_dec).square().mean().sqrt()
    torch.testing.assert_close(sae.grad_rms, first)  # the first batch sets it exactly
    _step(sae, torch.cat([x, 3 * grads], -1))
    torch.testing.assert_close(sae.grad_rms, (0.5 * first**2 + 0.5 * (3 * first) ** 2).sqrt())
    assert int(sae.grad_rms_updates) == 2


def test_without_gradients_training_mode_raises_and_eval_mode_is_topk():
    sae = _sae(k=4, beta=3.0)
    x = torch.randn(2, 5, D_IN)
    with pytest.raises(RuntimeError, match=r"sae_lens_allocation\.train"):
        sae.encode(x)
    sae.eval()
    topk = _topk_twin(sae)
    assert torch.equal(sae.encode(x), topk.encode(x))
    assert torch.equal(sae(x), topk(x))
    with pytest.raises(ValueError, match="width"):
        sae.encode(torch.randn(3, D_IN + 1))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("k", 0),
        ("k", 2.5),
        ("k", D_SAE + 1),
        ("beta", -0.1),
        ("beta", float("nan")),
        ("grad_rms_ema_rate", 0.0),
        ("normalize_activations", "expected_average_only_in"),
        ("normalize_activations", "layer_norm"),
        ("use_sparse_activations", "yes"),
        ("aux_loss", "no_such_loss"),
    ],
)
def test_config_rejects_bad_fields(field, value):
    with pytest.raises(ValueError, match=field) as err:
        GradientTopKTrainingSAEConfig(**{"d_in": D_IN, "d_sae": D_SAE, "k": 4, field: value})
    assert repr(value) in str(err.value) or field == "aux_loss"


def test_configs_parse_after_import():
    for name in ("gpt2-small-gradient-topk.yaml", "tiny-gradient-topk.yaml"):
        cfg = LanguageModelSAERunnerConfig.from_dict(yaml.safe_load((CONFIGS / name).read_text()))
        assert isinstance(cfg.sae, GradientTopKTrainingSAEConfig)
        assert cfg.n_batches_in_buffer * cfg.context_size >= cfg.train_batch_size_tokens
    gpt2 = LanguageModelSAERunnerConfig.from_dict(
        yaml.safe_load((CONFIGS / "gpt2-small-gradient-topk.yaml").read_text())
    )
    assert (gpt2.model_name, gpt2.hook_name, gpt2.sae.d_in, gpt2.sae.k) == (
        "gpt2", "blocks.7.hook_resid_pre", 768, 32
    )


# -- export -----------------------------------------------------------------------------------

def test_export_is_topk_without_plugin_buffers(tmp_path):
    sae = _sae(k=4, beta=2.0)
    rows = torch.cat([torch.randn(64, D_IN), torch.randn(64, D_IN)], -1)
    _step(sae, rows)
    sae.save_inference_model(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 4
    assert cfg["metadata"]["training_architecture"] == "gradient_topk"
    weights = load_file(tmp_path / "sae_weights.safetensors")
    assert set(weights) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    # The training checkpoint keeps the buffers, so a resumed run continues the running RMS.
    sae.save_model(tmp_path / "ckpt")
    assert {"grad_rms", "grad_rms_updates", "firing_ema"} <= set(
        load_file(tmp_path / "ckpt" / "sae_weights.safetensors")
    )


# -- the runner ---------------------------------------------------------------------------------


def test_train_through_runner_from_config_dict(tmp_path, tiny_model, tiny_dataset):
    cfg_dict = yaml.safe_load((CONFIGS / "tiny-gradient-topk.yaml").read_text())
    cfg_dict.update(
        checkpoint_path=str(tmp_path / "checkpoints"),
        output_path=str(tmp_path / "output"),
        n_checkpoints=1,
    )
    runner = build_runner(cfg_dict, override_model=tiny_model, override_dataset=tiny_dataset)
    assert isinstance(runner.activations_store, GradientActivationsStore)
    assert runner.evaluator.activations_store is runner.activations_store
    sae = runner.run()
    steps = cfg_dict["training_tokens"] // cfg_dict["train_batch_size_tokens"]
    assert isinstance(sae, GradientTopKTrainingSAE) and int(sae.grad_rms_updates) == steps

    # The in-training evaluator (run_evals) works on the SAE in eval mode: plain TopK.
    metrics = runner.evaluator(sae.eval(), runner.activations_store, ActivationScaler())
    ce_loss_score = metrics["model_performance_preservation"]["ce_loss_score"]
    assert torch.isfinite(torch.tensor(ce_loss_score))

    # The export is SAELens' topk computing what the SAE computes (test_exports.py loads such
    # exports in a process that never imports the plugin).
    exported = SAE.load_from_disk(tmp_path / "output")
    assert isinstance(exported, TopKSAE)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(exported.encode(x), sae.encode(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(exported(x), sae(x), rtol=1e-4, atol=1e-5)

    # Resume from the run's checkpoint: SAELens restores the SAE (with its buffers), the
    # trainer and the gradient store.
    (checkpoint,) = (tmp_path / "checkpoints").iterdir()
    cfg_dict.update(resume_from_checkpoint=str(checkpoint), output_path=str(tmp_path / "resumed"))
    resumed = train(cfg_dict, override_model=tiny_model, override_dataset=tiny_dataset)
    assert int(resumed.grad_rms_updates) == steps
    assert (tmp_path / "resumed" / "cfg.json").is_file()
