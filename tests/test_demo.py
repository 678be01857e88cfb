"""The main job end to end on a reduced token budget: export, evaluation JSON, and a dashboard
with the `dashboard` extra (without it, one line saying why there is none)."""

import json
from importlib.util import find_spec
from pathlib import Path

import pytest
from sae_lens import SAE
from sae_lens.saes.jumprelu_sae import JumpReLUSAE

from sae_lens_allocation.demo import run_demo

HAS_DASHBOARD = find_spec("sae_dashboard") is not None


@pytest.mark.slow
def test_demo_writes_a_plain_saelens_export_an_eval_and_a_dashboard(tmp_path, capsys):
    report = run_demo(tmp_path, ["training_tokens=8192", "sae.calibration_tokens=2048"])
    # A SAELens built-in; test_exports.py loads such exports in a process without the plugin.
    assert json.loads((Path(report["sae_dir"]) / "cfg.json").read_text())["architecture"] == "jumprelu"
    assert isinstance(SAE.load_from_disk(report["sae_dir"]), JumpReLUSAE)
    result = json.loads((tmp_path / "eval.json").read_text())
    assert 0.0 < result["summary"]["ce_loss_recovered"] <= 1.0
    assert result["l0_per_token"]["tokens"] > 0
    printed = capsys.readouterr().out
    if HAS_DASHBOARD:
        assert report["dashboard"] is not None
        assert "<script>" in open(report["dashboard"]["html"]).read()
    else:
        assert report["dashboard"] is None
        assert [line for line in printed.splitlines() if "dashboard" in line] == [
            "[demo] no dashboard: sae-dashboard is not installed "
            "(pip install 'sae-lens-allocation[dashboard]')"
        ]
