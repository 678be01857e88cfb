"""`use_sparse_activations`: the sparse training step equals the dense one (loss and every
parameter gradient) for every plugin architecture, ties and rows without a selection included."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from sae_lens import TrainingSAE, TrainingSAEConfig
from sae_lens.saes.sae import TrainStepInput

import sae_lens_allocation  # noqa: F401  (registers the architectures)
from sae_lens_allocation.saes.sparse_codes import (
    Selection,
    decode_entries,
    firing_per_latent,
    firing_per_token,
)
from sae_lens_allocation.saes.zipf import fit_zipf

D_IN, D_SAE, N = 16, 64, 96

ARCHITECTURES: dict[str, dict[str, Any]] = {
    "mutual_choice": {"k": 4.0},
    "feature_choice": {"k": 4.0},
    "topk_aux": {"k": 4},
    "gradient_topk": {"k": 4, "beta": 1.0},
    # The variants select differently; each label names its architecture.
    "mutual_choice_floor": {"architecture": "mutual_choice", "k": 4.0, "min_tokens_per_latent": 1},
    "feature_choice_thresholds": {"architecture": "feature_choice", "k": 4.0, "training_rule": "thresholds"},
}


def _sae(arch: str, sparse: bool, aux_loss: str, rescale: bool) -> Any:
    cfg = TrainingSAEConfig.from_dict({
        "architecture": arch, "d_in": D_IN, "d_sae": D_SAE, "aux_loss": aux_loss,
        "aux_k": 6, "aux_zipf_tau": 0.9, "rescale_acts_by_decoder_norm": rescale,
        "use_sparse_activations": sparse, **ARCHITECTURES[arch],
    })
    torch.manual_seed(0)
    sae = TrainingSAE.from_dict(cfg.to_dict())
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1)
        # Negative encoder biases: rows whose input equals b_dec have every z < 0 (no selection).
        sae.b_enc.copy_(-0.5 - torch.rand(D_SAE))
        sae.W_dec.mul_(torch.linspace(0.5, 2.0, D_SAE)[:, None])
        # A warm firing EMA, so aux_zipf has alive underused latents as well as dead ones.
        sae.firing_ema.copy_(torch.rand(D_SAE) ** 4 * 0.2)
        sae.firing_ema_steps.fill_(10_000)
        sae.zipf_fit.copy_(fit_zipf(sae.firing_ema, sae.cfg.aux_zipf_fit_fraction, None))
    return sae


def _batch(arch: str) -> torch.Tensor:
    torch.manual_seed(1)
    x = torch.randn(N, D_IN) * 2
    x[10:20] = x[0]  # identical rows: tied z down every latent
    x[30:34] = 0.0  # replaced by b_dec below: no positive z
    if arch == "gradient_topk":
        x = torch.cat([x, torch.randn(N, D_IN)], dim=-1)
    return x


def _step(sae: Any, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], Any]:
    x = x.clone()
    x[30:34, :D_IN] = sae.b_dec.detach()
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::5] = True
    sae.train()
    out = sae.training_forward_pass(TrainStepInput(
        sae_in=x, dead_neuron_mask=dead, coefficients={}, n_training_steps=0,
        is_logging_step=False,
    ))
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in sae.named_parameters()}, out


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("aux_loss,rescale", [("aux_k", True), ("aux_zipf", True), ("aux_zipf", False)])
def test_sparse_step_equals_dense_step(arch: str, aux_loss: str, rescale: bool) -> None:
    x = _batch(arch)
    dense_loss, dense_grads, dense_out = _step(_sae(arch, False, aux_loss, rescale), x)
    sparse_loss, sparse_grads, sparse_out = _step(_sae(arch, True, aux_loss, rescale), x)
    assert sparse_out.feature_acts.is_sparse and not dense_out.feature_acts.is_sparse
    torch.testing.assert_close(sparse_out.feature_acts.to_dense(), dense_out.feature_acts,
                               rtol=0, atol=0)
    # The batch really has rows without a selection, ties, and a nonzero auxiliary loss.
    per_token = firing_per_token(dense_out.feature_acts)
    assert (per_token[30:34] == 0).all() and (per_token[10:20] == per_token[0]).all()
    assert float(dense_out.losses["auxiliary_reconstruction_loss"].detach()) > 0
    assert abs(float(sparse_loss) - float(dense_loss)) <= 1e-5 * abs(float(dense_loss))
    for key, dense_part in dense_out.losses.items():
        part, reference = float(sparse_out.losses[key].detach()), float(dense_part.detach())
        assert abs(part - reference) <= 1e-5 * abs(reference), key
    for name, dense in dense_grads.items():
        error = (sparse_grads[name] - dense).abs().max()
        assert error <= 1e-4 * dense.abs().max(), (name, float(error), float(dense.abs().max()))
        assert dense.abs().max() > 0, name


def test_sparse_firing_counts_equal_dense() -> None:
    torch.manual_seed(0)
    codes = torch.randn(7, 9).relu() * (torch.rand(7, 9) < 0.3)
    sparse = codes.to_sparse()
    assert torch.equal(firing_per_latent(sparse), (codes != 0).float().sum(0))
    assert torch.equal(firing_per_token(sparse), (codes != 0).float().sum(1))
    assert torch.equal(firing_per_latent(codes), (codes != 0).float().sum(0))


def test_decode_entries_matches_dense_product_and_gradients() -> None:
    torch.manual_seed(0)
    n, f, d = 12, 20, 5
    codes = torch.randn(n, f) * (torch.rand(n, f) < 0.25)
    codes[3] = 0.0  # an empty row
    selection = Selection.from_nonzero(codes)
    values = codes.reshape(-1)[selection.flat()].clone().requires_grad_(True)
    w_sparse = torch.randn(f, d, requires_grad=True)
    w_dense = w_sparse.detach().clone().requires_grad_(True)
    dense_codes = codes.clone().requires_grad_(True)
    upstream = torch.randn(n, d)
    out = decode_entries(selection, values, w_sparse, rescale=True)
    reference = (dense_codes * (1 / w_dense.norm(dim=-1))) @ w_dense
    torch.testing.assert_close(out, reference)
    (out * upstream).sum().backward()
    (reference * upstream).sum().backward()
    torch.testing.assert_close(w_sparse.grad, w_dense.grad)
    assert dense_codes.grad is not None
    torch.testing.assert_close(values.grad, dense_codes.grad.reshape(-1)[selection.flat()])


def test_short_training_run_exports_the_same_sae_sparse_and_dense(tmp_path):
    """Mutual Choice on the embedded model, 32 steps through the plugin's runner, dense and
    sparse: the exports reach the same explained variance and L0 on held-out rows (the corpus'
    held-out split, which neither training nor calibration reads), within 0.001. (gradient_topk
    passes it too: 20 s more, so not run here.)"""
    from sae_lens import SAE

    from sae_lens_allocation.training.runner import build_runner
    from sae_lens_allocation.training.sources import embedded_tokens, load_lm

    hook, context = "blocks.0.hook_resid_post", 32
    model = load_lm("embedded")
    dataset = embedded_tokens(model, "train", context, 64 * context, seed=0)
    heldout = torch.tensor(embedded_tokens(model, "heldout", context, 32 * context, seed=0)["tokens"])
    with torch.no_grad():
        _, cache = model.run_with_cache(heldout, names_filter=hook, stop_at_layer=1)
    acts = cache[hook][:, 1:].reshape(-1, cache[hook].shape[-1])  # BOS positions left out, as `eval`
    results = {}
    for sparse in (False, True):
        cfg = {
            "sae": {"architecture": "mutual_choice", "d_in": acts.shape[-1], "d_sae": 256, "k": 8,
                    "calibration_tokens": 256, "use_sparse_activations": sparse},
            "model_name": "embedded", "dataset_path": "embedded", "streaming": False,
            "is_dataset_tokenized": True, "hook_name": hook, "context_size": context,
            "training_tokens": 32 * 128, "train_batch_size_tokens": 128, "store_batch_size_prompts": 4,
            "n_batches_in_buffer": 8, "seed": 3, "lr": 4e-3, "dead_feature_window": 50,
            "feature_sampling_window": 50, "checkpoint_path": None, "device": "cpu",
            "logger": {"log_to_wandb": False}, "output_path": str(tmp_path / f"sparse-{sparse}"),
        }
        build_runner(cfg, override_model=model, override_dataset=dataset).run()
        sae = SAE.load_from_disk(cfg["output_path"])
        assert sae.cfg.architecture() == "jumprelu"
        assert sae.cfg.metadata.training_architecture_details["use_sparse_activations"] is sparse
        with torch.no_grad():
            codes = sae.encode(acts)
            error = (sae.decode(codes) - acts).pow(2).sum()
        variance = (acts - acts.mean(0)).pow(2).sum()
        results[sparse] = (float(1 - error / variance), float((codes != 0).sum(-1).float().mean()))
    (ev_dense, l0_dense), (ev_sparse, l0_sparse) = results[False], results[True]
    assert abs(ev_sparse - ev_dense) <= 1e-3 and abs(l0_sparse - l0_dense) <= 1e-3, results
    assert l0_dense > 0 and ev_dense > 0.2, results  # a trained SAE (EV 0.35, L0 6.8 here)


def _max_relative_error(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    return max(float((grads[n] - g).abs().max() / g.abs().max()) for n, g in reference.items())


def test_sparse_step_under_compile_equals_dense_step() -> None:
    """`compile_sae` compiles `training_forward_pass`; the sparse parts run eagerly inside it
    (aot_eager: the same graph breaks as inductor, without its C++ build)."""
    x = _batch("mutual_choice")
    dense_loss, dense_grads, _ = _step(_sae("mutual_choice", False, "aux_zipf", True), x)
    sae = _sae("mutual_choice", True, "aux_zipf", True)
    sae.training_forward_pass = torch.compile(sae.training_forward_pass, backend="aot_eager")
    loss, grads, out = _step(sae, x)
    assert out.feature_acts.is_sparse
    assert abs(float(loss) - float(dense_loss)) <= 1e-5 * abs(float(dense_loss))
    assert _max_relative_error(grads, dense_grads) <= 1e-4


def test_sparse_step_under_bf16_autocast_is_close_to_dense_step() -> None:
    """Under autocast the sparse products run in the parameters' fp32, the dense ones in bf16:
    equal to bf16 precision."""
    x = _batch("topk_aux")
    results = []
    for sparse in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(_step(_sae("topk_aux", sparse, "aux_k", True), x))
    (dense_loss, dense_grads, _), (loss, grads, _) = results
    assert abs(float(loss) - float(dense_loss)) <= 1e-2 * abs(float(dense_loss))
    assert _max_relative_error(grads, dense_grads) <= 2e-2
