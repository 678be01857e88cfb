"""`topk_aux`: trains exactly like SAELens `topk` by default, swaps the aux loss by name, exports
as a plain `topk` SAE that loads without the plugin, keeps its aux state through resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from sae_lens import SAE, LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.saes.topk_sae import TopKSAE, TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer
from safetensors.torch import load_file

from sae_lens_allocation.saes.aux_losses import AUX_LOSS_KEY
from sae_lens_allocation.saes.topk_aux import TopKAuxTrainingSAE, TopKAuxTrainingSAEConfig

import support

D_IN, D_SAE, K = 16, 64, 4
AUX_BUFFERS = TopKAuxTrainingSAE.AUX_STATE_BUFFERS


def train(sae, batches: list[torch.Tensor]) -> None:
    cfg = SAETrainerConfig(
        n_checkpoints=0,
        checkpoint_path=None,
        save_final_checkpoint=False,
        total_training_samples=sum(b.shape[0] for b in batches),
        device="cpu",
        autocast=False,
        lr=1e-2,
        lr_end=1e-2,
        lr_scheduler_name="constant",
        lr_warm_up_steps=0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        lr_decay_steps=0,
        n_restart_cycles=1,
        train_batch_size_samples=batches[0].shape[0],
        dead_feature_window=1,  # latents count as dead quickly, so the aux loss is active
        feature_sampling_window=1000,
        logger=LoggingConfig(log_to_wandb=False),
        n_batches_for_norm_estimate=1,
    )
    SAETrainer(cfg=cfg, sae=sae, data_provider=iter(batches)).fit()


def test_default_topk_aux_trains_exactly_like_saelens_topk():
    torch.manual_seed(0)
    plugin = TopKAuxTrainingSAE(TopKAuxTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K))
    builtin = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K))
    builtin.load_state_dict({n: t for n, t in plugin.state_dict().items() if n not in AUX_BUFFERS})
    batches = [torch.randn(32, D_IN) * 3 + 1 for _ in range(8)]
    train(plugin, batches)
    train(builtin, batches)
    assert plugin.aux_loss_metrics()["aux_loss"] > 0  # aux-k was active
    for name, tensor in builtin.state_dict().items():
        torch.testing.assert_close(plugin.state_dict()[name], tensor, rtol=1e-5, atol=1e-6)


def test_aux_loss_is_swapped_by_name():
    torch.manual_seed(0)
    x = torch.randn(32, D_IN)
    values = {}
    for name in ("none", "aux_k", "aux_zipf"):
        torch.manual_seed(0)
        sae = TopKAuxTrainingSAE(TopKAuxTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, aux_loss=name))
        dead = torch.zeros(D_SAE, dtype=torch.bool)
        dead[:10] = True
        out = support.training_step(sae, x, dead)
        values[name] = out.losses[AUX_LOSS_KEY].item()
        assert set(out.metrics) >= {"aux_loss", "aux_underused", "aux_dead", "aux_zipf_exponent"}
    assert values["none"] == 0.0
    assert values["aux_k"] > 0 and values["aux_zipf"] > 0
    # A fresh SAE is in the firing-EMA warm-up, where aux_zipf is aux_k.
    assert values["aux_k"] == pytest.approx(values["aux_zipf"], rel=1e-6)


def test_export_is_plain_topk_equal_to_the_training_sae(tmp_path):
    """Loading such an export in a process without the plugin is test_exports.py's check."""
    # Uneven decoder norms, so the fold matters.
    sae = support.plugin_sae("topk_aux", d_in=D_IN, d_sae=D_SAE, k=K, aux_loss="aux_zipf",
                             b_enc_std=0.1, uneven_decoder=True)
    sae.save_inference_model(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == "topk"
    assert cfg["metadata"]["training_architecture"] == "topk_aux"
    weights = load_file(tmp_path / "sae_weights.safetensors")
    assert set(weights) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    torch.testing.assert_close(weights["W_dec"].norm(dim=-1), torch.ones(D_SAE))

    exported = SAE.load_from_disk(tmp_path)
    assert isinstance(exported, TopKSAE) and exported.cfg.k == K
    x = torch.randn(20, D_IN)
    sae.eval()
    torch.testing.assert_close(exported(x), sae(x), rtol=1e-5, atol=1e-5)


def test_runner_trains_topk_aux_and_resume_keeps_the_aux_state(tmp_path):
    def run(folder: Path, **overrides):
        cfg = LanguageModelSAERunnerConfig.from_dict(
            support.runner_cfg_dict(
                "topk_aux", folder, sae_k=4, sae_aux_loss="aux_zipf", sae_firing_ema_decay=0.5,
                **overrides,
            )
        )
        runner = LanguageModelSAETrainingRunner(
            cfg, override_model=support.tiny_model(), override_dataset=support.tiny_dataset()
        )
        return runner.run()

    sae = run(tmp_path / "first", n_checkpoints=1)
    total_steps = 8  # training_tokens 2048 / batch 256
    assert sae.firing_ema_steps.item() == total_steps
    assert bool(sae.zipf_ready())
    (checkpoint,) = [p.parent for p in (tmp_path / "first" / "checkpoints").rglob("trainer_state.pt")]
    saved = load_file(checkpoint / "sae_weights.safetensors")
    steps_at_checkpoint = int(saved["firing_ema_steps"])
    assert 0 < steps_at_checkpoint < total_steps
    assert saved["firing_ema"].sum() > 0

    output = tmp_path / "first" / "output"
    assert json.loads((output / "cfg.json").read_text())["architecture"] == "topk"
    assert not set(AUX_BUFFERS) & set(load_file(output / "sae_weights.safetensors"))
    assert isinstance(SAE.load_from_disk(output), TopKSAE)

    resumed = run(tmp_path / "second", resume_from_checkpoint=str(checkpoint))
    # Steps after the checkpoint add to the restored counter instead of starting from zero.
    assert resumed.firing_ema_steps.item() == total_steps
