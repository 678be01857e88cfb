"""Registration on import, idempotency, and the loader's error for unknown architectures."""

import importlib
import json
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from sae_lens import LanguageModelSAERunnerConfig, TrainingSAE
from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY
from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig

import sae_lens_allocation
from sae_lens_allocation import ARCHITECTURES, load_sae, register_architecture

import support


@dataclass(kw_only=True)
class _ProbeTrainingSAEConfig(StandardTrainingSAEConfig):
    @classmethod
    def architecture(cls) -> str:
        return "test_probe"

    def get_inference_config_class(self):
        from sae_lens.saes.standard_sae import StandardSAEConfig

        return StandardSAEConfig


class _ProbeTrainingSAE(StandardTrainingSAE):
    pass


@pytest.fixture
def probe_registered():
    register_architecture("test_probe", _ProbeTrainingSAE, _ProbeTrainingSAEConfig)
    yield "test_probe"
    SAE_TRAINING_CLASS_REGISTRY.pop("test_probe", None)


def test_every_plugin_architecture_is_registered():
    assert isinstance(ARCHITECTURES, tuple)
    for name in ARCHITECTURES:
        assert name in SAE_TRAINING_CLASS_REGISTRY


def test_registration_is_idempotent(probe_registered):
    register_architecture("test_probe", _ProbeTrainingSAE, _ProbeTrainingSAEConfig)
    assert SAE_TRAINING_CLASS_REGISTRY["test_probe"] == (_ProbeTrainingSAE, _ProbeTrainingSAEConfig)


def test_name_held_by_another_class_is_refused(probe_registered):
    with pytest.raises(ValueError, match="already registered"):
        register_architecture("test_probe", StandardTrainingSAE, StandardTrainingSAEConfig)


def test_registered_name_works_in_runner_config(probe_registered, tmp_path):
    cfg = LanguageModelSAERunnerConfig.from_dict(support.runner_cfg_dict("test_probe", tmp_path))
    assert isinstance(cfg.sae, _ProbeTrainingSAEConfig)


def test_reload_and_double_import_do_not_raise():
    importlib.reload(sae_lens_allocation)
    importlib.import_module("sae_lens_allocation")
    assert set(sae_lens_allocation.ARCHITECTURES) <= set(SAE_TRAINING_CLASS_REGISTRY)


@pytest.mark.slow
def test_reload_in_fresh_process_and_python_m():
    """In one fresh process: import, reload, then run the package as `python -m` does (runpy
    runs __main__.py after the package is imported), which registers everything once more."""
    code = (
        "import importlib, runpy, sys; import sae_lens_allocation; "
        "importlib.reload(sae_lens_allocation); sys.argv = ['sae_lens_allocation', '--help']; "
        "runpy.run_module('sae_lens_allocation', run_name='__main__', alter_sys=True)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "train" in out.stdout


def test_load_sae_unknown_architecture_lists_registered(tmp_path):
    sae = TrainingSAE.from_dict({"architecture": "standard", "d_in": 4, "d_sae": 8})
    sae.save_model(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["architecture"] = "not_a_real_arch"
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as err:
        load_sae(tmp_path)
    msg = str(err.value)
    assert "not_a_real_arch" in msg and "topk" in msg and "sae-lens-allocation" in msg


def test_load_sae_reads_checkpoints_and_exports(probe_registered, tmp_path):
    sae = TrainingSAE.from_dict({"architecture": "test_probe", "d_in": 4, "d_sae": 8})
    sae.save_model(tmp_path / "ckpt")
    sae.save_inference_model(tmp_path / "export")
    ckpt = load_sae(tmp_path / "ckpt")
    export = load_sae(tmp_path / "export")
    assert isinstance(ckpt, _ProbeTrainingSAE)
    assert type(export).__name__ == "StandardSAE"
    x = torch.randn(3, 4)
    torch.testing.assert_close(ckpt(x), export(x))
