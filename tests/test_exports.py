"""Every plugin architecture exports a plain SAELens SAE: one fresh process that never imports
the plugin loads all of the session's exports (the `plugin_exports` fixture) and computes what
the trained SAEs compute in eval mode."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import sae_lens_allocation

import support

EXPORT_CLASS = {"jumprelu": "sae_lens.saes.jumprelu_sae.JumpReLUSAE",
                "topk": "sae_lens.saes.topk_sae.TopKSAE"}

_LOAD_WITHOUT_PLUGIN = """
import json, sys
from safetensors.torch import load_file, save_file
from sae_lens import SAE

folders = json.loads(sys.argv[1])
x = load_file(sys.argv[2])["x"]
described, outputs = {}, {}
for name, folder in folders.items():
    sae = SAE.load_from_disk(folder)
    described[name] = {"architecture": sae.cfg.architecture(), "k": getattr(sae.cfg, "k", None),
                       "class": f"{type(sae).__module__}.{type(sae).__name__}"}
    outputs[f"{name}.codes"] = sae.encode(x)
    outputs[f"{name}.out"] = sae(x)
save_file(outputs, sys.argv[3])
plugin = sorted(m for m in sys.modules if m.startswith("sae_lens_allocation"))
print(json.dumps({"saes": described, "plugin_modules": plugin}))
"""


@pytest.mark.slow
def test_every_export_loads_in_a_fresh_process_without_the_plugin(plugin_exports, tmp_path):
    assert set(plugin_exports) == set(sae_lens_allocation.ARCHITECTURES)
    # 3-D, as evals and HookedSAETransformer feed it.
    x = torch.randn(2, 5, support.D_MODEL, generator=torch.Generator().manual_seed(0))
    save_file({"x": x}, tmp_path / "x.safetensors")
    folders = {arch: str(folder) for arch, (folder, _) in plugin_exports.items()}
    done = subprocess.run(
        [sys.executable, "-c", _LOAD_WITHOUT_PLUGIN, json.dumps(folders),
         str(tmp_path / "x.safetensors"), str(tmp_path / "y.safetensors")],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["plugin_modules"] == []
    outputs = load_file(tmp_path / "y.safetensors")
    for arch, (_, sae) in plugin_exports.items():
        export = support.EXPORT_ARCHITECTURE[arch]
        described = report["saes"][arch]
        assert described["architecture"] == export, arch
        assert described["class"] == EXPORT_CLASS[export], arch
        if export == "topk":
            assert described["k"] == sae.cfg.k == 8, arch
        with torch.no_grad():
            codes, out = sae.encode(x), sae(x)
        assert (codes != 0).any(), arch
        torch.testing.assert_close(outputs[f"{arch}.codes"], codes, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, arch=arch: f"{arch} codes: {m}")
        torch.testing.assert_close(outputs[f"{arch}.out"], out, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, arch=arch: f"{arch} output: {m}")
