"""`compare`: miniature end-to-end comparisons (tiny LM and tiny synthetic model) and config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import support

from sae_lens_allocation.analysis.compare import check_compare_config, run_compare
from sae_lens_allocation.yaml_config import ConfigError

CONFIGS = Path(__file__).parent.parent / "configs"


def _lm_config(tmp_path: Path) -> dict:
    base = support.runner_cfg_dict("topk", tmp_path, training_tokens=4 * 256, sae_k=4)
    base["sae"].pop("architecture")
    for key in ("output_path", "checkpoint_path"):
        base.pop(key)
    return {
        "source": "language_model",
        "seed": 3,
        "threads": 1,
        "base": base,
        "architectures": [
            {"architecture": "topk"},
            {"name": "mc-aux_zipf", "architecture": "mutual_choice",
             "sae": {"aux_loss": "aux_zipf", "calibration_tokens": 512}},
            {"name": "fc-zipf", "architecture": "feature_choice",
             "sae": {"capacity": "zipf", "calibration_tokens": 512}},
            {"architecture": "gradient_topk"},
        ],
        "eval": {"n_batches": 2, "batch_size_prompts": 4},
    }


def test_language_model_comparison_end_to_end(tmp_path, tiny_model):
    result = run_compare(_lm_config(tmp_path), output_dir=tmp_path / "cmp", override_model=tiny_model,
                         override_dataset=support.tiny_dataset(256), override_heldout=support.tiny_dataset(64, seed=9))
    out = tmp_path / "cmp"
    saved = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in saved["rows"]] == ["topk", "mc-aux_zipf", "fc-zipf", "gradient_topk"]
    assert {r["export_architecture"] for r in saved["rows"]} == {"topk", "jumprelu"}
    for row in result["rows"]:
        assert row["ce_loss_recovered"] is not None and row["train_tokens_per_s"] > 0
        assert 0.0 <= row["dead_share"] <= row["underused_share"] <= 1.0
        assert row["l0_per_token"]["p5"] <= row["l0_per_token"]["mean"] <= row["l0_per_token"]["p95"]
        # topk exports keep at most k latents per token
        if row["architecture"] == "topk":
            assert row["l0_per_token"]["max"] <= 4
    gaps = {r["name"]: r.get("gap") for r in result["rows"]}
    assert gaps["topk"] is None and gaps["mc-aux_zipf"] is not None
    assert saved["data"]["train_dataset_sha256"] and saved["data"]["heldout_tokens_sha256"]
    report = (out / "report.md").read_text()
    assert "| fc-zipf |" in report and "l0_histogram.png" in report
    assert (out / "l0_histogram.png").stat().st_size > 0 and (out / "density_rank.png").is_file()


def test_synthetic_comparison_with_k_sweep(tmp_path):
    cfg = {
        "source": "synthetic",
        "seed": 0,
        "threads": 1,
        "base": {
            "synthetic_model": {"num_features": 32, "hidden_dim": 16, "seed": 0, "firing_probability": {
                "generator_name": "zipfian", "exponent": 1.0, "max_prob": 0.3, "min_prob": 0.01}},
            "training_samples": 8 * 256, "batch_size": 256, "lr": 3e-3, "device": "cpu",
            "dead_feature_window": 4, "feature_sampling_window": 4,
            "sae": {"d_in": 16, "d_sae": 32, "k": 2},
        },
        "architectures": [
            {"architecture": "topk"},
            {"name": "fc-uniform", "architecture": "feature_choice",
             "sae": {"capacity": "uniform", "calibration_tokens": 512}},
        ],
        "k_values": [2, 4],
        "eval": {"samples": 1024},
    }
    result = run_compare(cfg, output_dir=tmp_path / "syn")
    names = [r["name"] for r in result["rows"]]
    assert names == ["topk@k=2", "topk@k=4", "fc-uniform@k=2", "fc-uniform@k=4"]
    for row in result["rows"]:
        assert 0.0 <= row["mcc"] <= 1.0 and 0.0 <= row["f1"] <= 1.0
        assert "ce_loss_recovered" not in row
    assert (tmp_path / "syn" / "ev_vs_l0.png").is_file()
    assert "MCC" in (tmp_path / "syn" / "report.md").read_text()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(sourse="x"), "unknown compare config key sourse"),
        (lambda c: c["architectures"].append({"architecture": "nope"}), "nope"),
        (lambda c: c["architectures"][0].setdefault("sae", {}).update(kk=1), "unknown config key sae.kk"),
        (lambda c: c.update(k_values=[0]), "k_values"),
        (lambda c: c["architectures"].append({"architecture": "topk"}), "used twice"),
    ],
)
def test_config_errors_are_one_line(tmp_path, edit, message):
    cfg = _lm_config(tmp_path)
    edit(cfg)
    with pytest.raises(ConfigError, match=message) as err:
        check_compare_config(cfg)
    assert "\n" not in str(err.value)


def test_gradient_topk_is_refused_on_synthetic_data(tmp_path):
    cfg = {"source": "synthetic", "base": {"synthetic_model": {"num_features": 8, "hidden_dim": 4},
                                          "sae": {"d_in": 4, "d_sae": 8, "k": 2}},
           "architectures": [{"architecture": "gradient_topk"}]}
    with pytest.raises(ConfigError, match="gradient"):
        check_compare_config(cfg)


@pytest.mark.parametrize("name", ["compare-embedded.yaml", "compare-synthetic.yaml", "compare-gpt2-small.yaml"])
def test_shipped_configs_build(name):
    from sae_lens_allocation.yaml_config import read_yaml

    cfg = check_compare_config(read_yaml(CONFIGS / name))
    archs = {a["architecture"] for a in cfg["architectures"]}
    assert {"topk", "batchtopk", "mutual_choice", "feature_choice"} <= archs
    assert ("gradient_topk" in archs) == (cfg["source"] == "language_model")
