"""The gradient cache: SAELens' activation cache plus `<hook>.grad`, whose rows are the live
gradient store's rows; gradient_topk trained from it equals gradient_topk trained live."""

from __future__ import annotations

import pytest
import torch
import yaml
from datasets import load_from_disk
from sae_lens.config import CacheActivationsRunnerConfig
from sae_lens.training.activations_store import ActivationsStore

import sae_lens_allocation  # noqa: F401  (registers the architectures)
from sae_lens_allocation.training.gradient_cache import build_cache
from sae_lens_allocation.training.gradients import GradientActivationsStore
from sae_lens_allocation.training.runner import build_runner
from sae_lens_allocation_cli import main

import support

N_SEQUENCES = 48  # 48 x 32 tokens, cached in 3 buffers of 16 sequences
BATCH_PROMPTS = 8


def _cache_cfg(path, **overrides) -> CacheActivationsRunnerConfig:
    fields = dict(
        dataset_path="local", model_name="tiny-offline", model_batch_size=BATCH_PROMPTS,
        hook_name=support.HOOK_NAME, d_in=support.D_MODEL, context_size=support.CONTEXT_SIZE,
        training_tokens=N_SEQUENCES * support.CONTEXT_SIZE, shuffle=False, device="cpu",
        new_cached_activations_path=str(path),
        # 16 sequences of 32 float32 rows of width 32 per buffer.
        buffer_size_gb=16 * support.CONTEXT_SIZE * support.D_MODEL * 4 / 1e9,
    )
    fields.update(overrides)
    return CacheActivationsRunnerConfig(**fields)


@pytest.fixture(scope="module")
def gradient_cache(tmp_path_factory, tiny_model, tiny_dataset):
    path = tmp_path_factory.mktemp("cache") / "grads"
    build_cache(_cache_cfg(path), override_model=tiny_model, override_dataset=tiny_dataset)
    return path


def test_cache_rows_are_the_live_stores_rows(gradient_cache, tmp_path, tiny_model, tiny_dataset):
    cached = load_from_disk(str(gradient_cache)).with_format("torch")
    grad_column = f"{support.HOOK_NAME}.grad"
    assert set(cached.column_names) == {support.HOOK_NAME, grad_column, "token_ids"}
    assert len(cached) == N_SEQUENCES
    live = GradientActivationsStore.from_config(
        tiny_model, support.runner_cfg("gradient_topk", tmp_path), override_dataset=tiny_dataset
    )
    rows, token_ids = live.get_raw_llm_batch()
    first = cached[:BATCH_PROMPTS]
    d = support.D_MODEL
    torch.testing.assert_close(first[support.HOOK_NAME].reshape(-1, d), rows[:, :d], rtol=0, atol=0)
    torch.testing.assert_close(first[grad_column].reshape(-1, d), rows[:, d:], rtol=0, atol=0)
    assert torch.equal(first["token_ids"].reshape(-1).long(), token_ids)


def test_gradient_topk_from_the_cache_equals_live_training(
    gradient_cache, tmp_path, tiny_model, tiny_dataset
):
    common = dict(training_tokens=4 * 256, store_batch_size_prompts=BATCH_PROMPTS, sae_beta=2.0)
    live = build_runner(
        support.runner_cfg_dict("gradient_topk", tmp_path / "live", **common),
        override_model=tiny_model, override_dataset=tiny_dataset,
    ).run()
    runner = build_runner(
        support.runner_cfg_dict(
            "gradient_topk", tmp_path / "cached", use_cached_activations=True,
            cached_activations_path=str(gradient_cache), **common,
        ),
        override_model=tiny_model, override_dataset=tiny_dataset,
    )
    assert runner.activations_store.cached_activation_dataset is not None
    cached = runner.run()
    for key, value in live.state_dict().items():
        torch.testing.assert_close(cached.state_dict()[key], value, rtol=1e-5, atol=1e-6)
    assert int(cached.grad_rms_updates) == 4 and float(cached.grad_rms) > 0


def test_sealens_reads_the_gradient_cache_as_a_plain_cache(gradient_cache, tiny_model):
    store = ActivationsStore(
        model=tiny_model, dataset=None, streaming=False, hook_name=support.HOOK_NAME,
        hook_head_index=None, context_size=support.CONTEXT_SIZE, d_in=support.D_MODEL,
        n_batches_in_buffer=4, total_training_tokens=1024, store_batch_size_prompts=BATCH_PROMPTS,
        train_batch_size_tokens=256, prepend_bos=False, normalize_activations="none",
        device=torch.device("cpu"), dtype="float32", cached_activations_path=str(gradient_cache),
    )
    acts, _ = store.get_raw_llm_batch()
    first = load_from_disk(str(gradient_cache)).with_format("torch")[:BATCH_PROMPTS]
    torch.testing.assert_close(acts, first[support.HOOK_NAME].reshape(-1, support.D_MODEL))


def test_a_plain_cache_is_refused_for_gradient_topk(tmp_path, tiny_model, tiny_dataset):
    plain = tmp_path / "plain"
    build_cache(_cache_cfg(plain), override_model=tiny_model, override_dataset=tiny_dataset,
                gradients=False)
    assert f"{support.HOOK_NAME}.grad" not in load_from_disk(str(plain)).column_names
    with pytest.raises(ValueError, match=r"has no column .*\.grad.*sae-lens-allocation cache"):
        build_runner(
            support.runner_cfg_dict("gradient_topk", tmp_path, use_cached_activations=True,
                                    cached_activations_path=str(plain)),
            override_model=tiny_model, override_dataset=tiny_dataset,
        )


def test_a_buffer_larger_than_the_data_is_refused(tmp_path, tiny_model, tiny_dataset):
    with pytest.raises(ValueError, match=r"buffer_size_gb=2\.0 is not allowed"):
        build_cache(_cache_cfg(tmp_path / "c", buffer_size_gb=2.0), override_model=tiny_model,
                    override_dataset=tiny_dataset)


def test_cache_command_builds_from_yaml_and_checks_keys(tmp_path, capsys):
    cfg = {
        "model_name": "embedded", "dataset_path": "embedded", "hook_name": "blocks.1.hook_resid_pre",
        "d_in": 128, "context_size": 32, "training_tokens": 512, "model_batch_size": 4,
        "buffer_size_gb": 256 * 128 * 4 / 1e9, "shuffle": False, "device": "cpu",
        "new_cached_activations_path": str(tmp_path / "cache"),
    }
    path = tmp_path / "cache.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["cache", str(path)]) == 0
    assert "cached 16 sequences of 32 tokens (activations and gradients)" in capsys.readouterr().out
    cached = load_from_disk(str(tmp_path / "cache"))
    assert "blocks.1.hook_resid_pre.grad" in cached.column_names

    assert main(["cache", str(path), "--set", "hook=x"]) == 2
    assert "unknown cache config key hook;" in capsys.readouterr().err
    assert main(["cache", str(path), "--set", "gradients=maybe"]) == 2
    assert "gradients='maybe' is not allowed" in capsys.readouterr().err


def test_shipped_cache_config_builds():
    from pathlib import Path

    from sae_lens_allocation.training.gradient_cache import cache_config_from_dict

    configs = Path(__file__).parents[1] / "configs"
    cfg, gradients = cache_config_from_dict(
        yaml.safe_load((configs / "embedded-gradient-cache.yaml").read_text()))
    assert gradients and cfg.n_tokens_in_batch <= cfg.n_tokens_in_buffer <= cfg.training_tokens
    train = yaml.safe_load((configs / "embedded-gradient-topk-cached.yaml").read_text())
    assert train["cached_activations_path"] == cfg.new_cached_activations_path
    assert (train["hook_name"], train["sae"]["d_in"], train["context_size"]) == (
        cfg.hook_name, cfg.d_in, cfg.context_size)
