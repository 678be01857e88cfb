"""Several SAEs from one LM pass (SAELens' MultiSAETrainingRunner): every plugin architecture at
two hooks of the embedded model equals its single-runner run, calibrates on held-out rows,
exports for SAELens alone; gradients at several hooks from one backward; the `saes:` YAML form."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from sae_lens import SAE
from sae_lens.saes.jumprelu_sae import JumpReLUSAE
from sae_lens.saes.topk_sae import TopKSAE
from safetensors.torch import load_file

import sae_lens_allocation  # noqa: F401  (registers the architectures)
from sae_lens_allocation.training.gradients import (
    activation_gradients,
    multi_hook_activation_gradients,
)
from sae_lens_allocation.training.multi_runner import build_multi_runner
from sae_lens_allocation.training.runner import build_runner
from sae_lens_allocation.training.sources import embedded_tokens, load_lm
from sae_lens_allocation.yaml_config import ConfigError, multi_runner_config_from_dict
from sae_lens_allocation_cli import main

import support

H0, H1 = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"
ARCHITECTURES = ("mutual_choice", "feature_choice", "topk_aux", "gradient_topk")
EXPORT_ARCHITECTURE = support.EXPORT_ARCHITECTURE
EXPORT_CLASS = {"jumprelu": JumpReLUSAE, "topk": TopKSAE}
CONTEXT = 32


@pytest.fixture(scope="module")
def embedded():
    model = load_lm("embedded")
    return model, embedded_tokens(model, "train", CONTEXT, 64 * CONTEXT, seed=0)


def _sae_section(architecture: str) -> dict:
    sae = {"architecture": architecture, "d_in": 128, "d_sae": 128, "k": 8}
    if architecture in ("mutual_choice", "feature_choice"):
        sae["calibration_tokens"] = 256
    return sae


def _runner_fields(tmp_path: Path) -> dict:
    return {
        "model_name": "embedded", "dataset_path": "embedded", "streaming": False,
        "context_size": CONTEXT, "training_tokens": 4 * 128, "train_batch_size_tokens": 128,
        "store_batch_size_prompts": 4, "n_batches_in_buffer": 8, "seed": 3, "lr": 1e-3,
        "dead_feature_window": 50, "feature_sampling_window": 50, "checkpoint_path": None,
        "device": "cpu", "logger": {"log_to_wandb": False},
    }


def _export_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "sae_weights.safetensors"))


@pytest.mark.slow
def test_one_multi_run_equals_single_runs_at_two_hooks(embedded, tmp_path):
    model, dataset = embedded
    names = {f"{arch}@{i}": (arch, hook) for arch in ARCHITECTURES for i, hook in enumerate((H0, H1))}
    multi_cfg = {
        **_runner_fields(tmp_path),
        "saes": {name: _sae_section(arch) for name, (arch, _) in names.items()},
        "hook_names": {name: hook for name, (_, hook) in names.items()},
        "output_path": str(tmp_path / "multi"),
    }
    runner = build_multi_runner(multi_runner_config_from_dict(multi_cfg), model, dataset)
    assert runner.activations_store.gradient_hooks == [H0, H1]
    trained = runner.run()

    for name, (arch, hook) in names.items():
        single_cfg = {**_runner_fields(tmp_path), "sae": _sae_section(arch), "hook_name": hook,
                      "is_dataset_tokenized": True, "output_path": str(tmp_path / "single" / name)}
        single = build_runner(single_cfg, override_model=model, override_dataset=dataset).run()
        single_state = single.state_dict()
        for key, value in trained[name].state_dict().items():
            torch.testing.assert_close(value, single_state[key], rtol=1e-5, atol=1e-6,
                                       msg=lambda m, key=key, name=name: f"{name} {key}: {m}")
        multi_export = _export_tensors(tmp_path / "multi" / name)
        single_export = _export_tensors(tmp_path / "single" / name)
        assert multi_export.keys() == single_export.keys()
        for key in multi_export:
            torch.testing.assert_close(multi_export[key], single_export[key], rtol=1e-5, atol=1e-6)
        cfg = json.loads((tmp_path / "multi" / name / "cfg.json").read_text())
        assert cfg["metadata"]["hook_name"] == hook
        assert cfg["metadata"]["training_architecture"] == arch
        if arch in ("mutual_choice", "feature_choice"):
            # The dataset's last rows, as the single runner reserves them.
            single_meta = json.loads((tmp_path / "single" / name / "cfg.json").read_text())
            calibration = cfg["metadata"]["calibration"]
            assert calibration == single_meta["metadata"]["calibration"]
            assert calibration["source"] == "the dataset's last rows"
            assert calibration["overlaps_training"] is False and calibration["tokens"] == 256
        assert (tmp_path / "multi" / name / "sparsity.safetensors").is_file()
        # A SAELens built-in, as the single run's (test_exports.py loads those without the plugin).
        assert cfg["architecture"] == EXPORT_ARCHITECTURE[arch]
        assert type(SAE.load_from_disk(tmp_path / "multi" / name)) is EXPORT_CLASS[cfg["architecture"]]


def test_sae_sharing_a_hook_calibrate_on_the_same_held_out_rows(embedded, tmp_path, capsys):
    model, dataset = embedded
    multi_cfg = {
        **_runner_fields(tmp_path), "output_path": str(tmp_path / "multi"), "hook_names": H1,
        "saes": {"a": _sae_section("mutual_choice"), "b": _sae_section("mutual_choice")},
    }
    trained = build_multi_runner(multi_runner_config_from_dict(multi_cfg), model, dataset).run()
    # Same config and seed: same initialisation and training data; a global threshold from
    # other rows would differ.
    torch.testing.assert_close(trained["a"].threshold, trained["b"].threshold, rtol=0, atol=0)
    assert trained["a"].cfg.metadata.calibration == trained["b"].cfg.metadata.calibration
    assert trained["a"].cfg.metadata.calibration["tokens"] == 256
    # A short multi run's progress bar moves (SAELens' updates every 100 steps only).
    assert re.search(r"\b[1-9]\d?\| a: ", capsys.readouterr().err)


@pytest.mark.parametrize("hooks", [
    (support.HOOK_NAME, "blocks.1.hook_resid_post"),
    ("blocks.0.attn.hook_z", "blocks.0.hook_mlp_out", "blocks.1.hook_resid_pre"),
    ("hook_embed", "hook_pos_embed", "blocks.1.hook_resid_mid"),  # parallel lowest hooks
])
def test_gradients_at_several_hooks_equal_one_hook_at_a_time(tiny_model, tiny_dataset, hooks):
    tokens = torch.stack([torch.as_tensor(tiny_dataset[i]["tokens"]) for i in range(4)])
    acts, grads = multi_hook_activation_gradients(tiny_model, tokens, hooks)
    for hook in hooks:
        ref_acts, ref_grads = activation_gradients(tiny_model, tokens, hook)
        torch.testing.assert_close(acts[hook], ref_acts)
        torch.testing.assert_close(grads[hook], ref_grads)
        assert grads[hook].abs().sum() > 0


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_one_backward_stops_at_the_lowest_hook(tiny_dataset):
    model = support.tiny_model()
    fired: list[str] = []
    handles = [
        module.register_full_backward_hook(lambda m, gi, go, name=name: fired.append(name))
        for name, module in model.named_modules() if name in ("embed", "blocks.0", "blocks.1")
    ]
    tokens = torch.stack([torch.as_tensor(tiny_dataset[i]["tokens"]) for i in range(2)])
    _, grads = multi_hook_activation_gradients(
        model, tokens, ["blocks.1.hook_resid_post", "blocks.1.hook_resid_pre"],
        activation_hooks=["blocks.0.hook_resid_mid"],
    )
    for h in handles:
        h.remove()
    assert fired == ["blocks.1"]  # once, and nothing below the lowest gradient hook
    assert set(grads) == {"blocks.1.hook_resid_post", "blocks.1.hook_resid_pre"}
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def _write(tmp_path: Path, cfg: dict) -> str:
    path = tmp_path / "multi.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _multi_yaml(tmp_path: Path) -> dict:
    return {**_runner_fields(tmp_path), "output_path": str(tmp_path / "out"),
            "hook_names": {"mc": H0, "g": H1},
            "saes": {"mc": _sae_section("mutual_choice"), "g": _sae_section("gradient_topk")}}


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(hook_name=H0), "unknown config key hook_name for the multi-SAE runner"),
    (lambda c: c["saes"]["mc"].update(kk=3), "unknown config key saes.mc.kk (architecture mutual_choice)"),
    (lambda c: c["saes"]["g"].update(architecture="nope"), "saes.g.architecture"),
    (lambda c: c["logger"].update(wandb=1), "unknown config key logger.wandb"),
    (lambda c: c.update(sae=c["saes"]["mc"]), "either 'sae' (one SAE) or 'saes'"),
    (lambda c: c["hook_names"].pop("g"), "hook_names keys must match saes keys"),
    (lambda c: c["saes"]["mc"].update(k=0), "k=0 is not allowed"),
])
def test_saes_yaml_is_checked_strictly(tmp_path, capsys, edit, message):
    cfg = _multi_yaml(tmp_path)
    edit(cfg)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        multi_runner_config_from_dict(cfg)
    assert main(["train", _write(tmp_path, cfg)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_train_command_runs_the_saes_form(tmp_path, capsys):
    path = _write(tmp_path, _multi_yaml(tmp_path))
    assert main(["train", path, "--set", "saes.g.k=4", "--set", "training_tokens=256"]) == 0
    out = capsys.readouterr().out
    for name in ("mc", "g"):
        assert f"exported SAE {name}: {tmp_path / 'out' / name}" in out
    cfg = json.loads((tmp_path / "out" / "g" / "cfg.json").read_text())
    assert cfg["k"] == 4 and cfg["metadata"]["hook_name"] == H1
    runner_cfg = json.loads((tmp_path / "out" / "runner_cfg.json").read_text())
    assert runner_cfg["training_tokens"] == 256 and set(runner_cfg["saes"]) == {"mc", "g"}


def test_compare_trains_arms_in_lockstep_with_the_same_result_as_one_by_one(tmp_path, tiny_model):
    from sae_lens_allocation.analysis.compare import run_compare

    base = support.runner_cfg_dict("topk", tmp_path, training_tokens=3 * 256, sae_k=4)
    base["sae"].pop("architecture")
    for key in ("output_path", "checkpoint_path", "seed"):
        base.pop(key)
    cfg = {
        "source": "language_model", "seeds": [3], "threads": 1, "base": base,
        "architectures": [
            {"name": "mc", "architecture": "mutual_choice", "sae": {"calibration_tokens": 256}},
            {"name": "g", "architecture": "gradient_topk"},
        ],
        "eval": {"heldout_rows": 8, "batch_rows": 4, "steering_latents": 2,
                 "steering_contexts": 2, "probe_rows": 256},
    }
    results = {}
    for lockstep in (True, False):
        results[lockstep] = run_compare(
            {**cfg, "lockstep": lockstep}, output_dir=tmp_path / str(lockstep),
            override_model=tiny_model, override_dataset=support.tiny_dataset(128),
            override_heldout=support.tiny_dataset(32, seed=9),
        )
    for name in ("mc", "g"):
        (label,) = results[True]["main"][name]
        together = _export_tensors(Path(results[True]["runs"][label]["sae_dir"]))
        alone = _export_tensors(Path(results[False]["runs"][label]["sae_dir"]))
        for key in together:
            torch.testing.assert_close(together[key], alone[key], rtol=1e-5, atol=1e-6)
        # The convergence probes evaluate during training without changing it.
        assert len(results[True]["runs"][label]["convergence"]) >= 2
    runs = {r["arm"]: r for r in results[True]["runs"].values()}
    assert runs["mc"]["lockstep_arms"] == 2 and runs["mc"]["train_seconds"] == runs["g"]["train_seconds"]
    assert {r["lockstep_arms"] for r in results[False]["runs"].values()} == {1}


def test_shipped_multi_config_builds():
    from sae_lens_allocation.yaml_config import load_train_config

    cfg = load_train_config(Path(__file__).parents[1] / "configs" / "embedded-multi.yaml")
    assert {n: c.architecture() for n, c in cfg.saes.items()} == {
        "mc-l0": "mutual_choice", "mc-l1": "mutual_choice", "fc-l0": "feature_choice",
        "gtopk-l1": "gradient_topk"}
    assert set(cfg.hook_names_per_sae.values()) == {H0, H1}
    assert cfg.n_batches_in_buffer * cfg.context_size >= cfg.train_batch_size_tokens


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mutual_choice", "gradient_topk"])
def test_multi_run_trains_the_sparse_step_as_the_dense_one(embedded, tmp_path, arch):
    """use_sparse_activations under the multi runner: an SAE trained with the sparse step next to
    its dense twin (same seed, same batches) ends with the same weights, firing counts and
    export, up to floating-point summation order."""
    model, dataset = embedded
    multi_cfg = {
        **_runner_fields(tmp_path),
        "saes": {"dense": _sae_section(arch), "sparse": {**_sae_section(arch), "use_sparse_activations": True}},
        "hook_names": {"dense": H0, "sparse": H0},
        "output_path": str(tmp_path / "multi"),
    }
    trained = build_multi_runner(multi_runner_config_from_dict(multi_cfg), model, dataset).run()
    sparse_state = trained["sparse"].state_dict()
    for key, value in trained["dense"].state_dict().items():
        torch.testing.assert_close(sparse_state[key], value, rtol=1e-4, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")
    dense_export, sparse_export = (_export_tensors(tmp_path / "multi" / n) for n in ("dense", "sparse"))
    for key in dense_export:
        torch.testing.assert_close(sparse_export[key], dense_export[key], rtol=1e-4, atol=1e-5)
    dense_sparsity, sparse_sparsity = (
        load_file(str(tmp_path / "multi" / n / "sparsity.safetensors"))["sparsity"] for n in ("dense", "sparse")
    )
    torch.testing.assert_close(sparse_sparsity, dense_sparsity)
    # The runner built the sparse twin with the flag on: its training mode encodes sparse codes.
    rows = torch.randn(8, 2 * 128 if arch == "gradient_topk" else 128)  # g-SAE rows: [acts | grads]
    assert trained["sparse"].train().encode_with_hidden_pre(rows)[0].is_sparse
