"""Every shipped runner config parses as SAELens reads it, once the plugin is imported."""

from pathlib import Path

import pytest
import yaml
from sae_lens import LanguageModelSAERunnerConfig

import sae_lens_allocation  # noqa: F401
from sae_lens_allocation.yaml_config import load_runner_config

# Single-SAE runner configs; compare-*.yaml are comparison configs (tests/test_compare.py builds
# them), multi-SAE (`saes:`) and cache configs are built in test_multi_runner/test_gradient_cache.
CONFIGS = sorted(
    p for p in (Path(__file__).parents[1] / "configs").glob("*.yaml")
    if not p.name.startswith("compare-") and "sae" in yaml.safe_load(p.read_text())
)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_parses_with_plain_saelens_from_dict(path):
    raw = yaml.safe_load(path.read_text())
    cfg = LanguageModelSAERunnerConfig.from_dict(raw)
    assert cfg.sae.architecture() == raw["sae"]["architecture"]
    # Strict loading agrees: no key in the file is silently dropped.
    strict = load_runner_config(path)
    assert strict.sae.to_dict() == cfg.sae.to_dict()
    assert cfg.n_batches_in_buffer * cfg.context_size >= cfg.train_batch_size_tokens


def test_gpt2_recipes_have_the_issue_shapes():
    for name in ("mutual-choice", "feature-choice"):
        cfg = load_runner_config(Path(__file__).parents[1] / "configs" / f"gpt2-small-{name}.yaml")
        assert (cfg.hook_name, cfg.sae.d_sae, cfg.sae.k, cfg.train_batch_size_tokens) == (
            "blocks.8.hook_resid_pre", 24576, 32, 4096
        )
