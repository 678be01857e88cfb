"""The bad-input matrix: mistakes a user makes with config fields, CLI flags, files and data.

Each runs the CLI in-process (`cli.main`) and must give exit code 2, exactly one line on stderr
naming the problem (no traceback), and write nothing where a broken result could be taken for a
good one: no export, no checkpoint, no eval.json, no dashboard. Every case is refused before
training starts (at config build or in the pre-flight checks), which keeps the matrix fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from sae_lens_allocation_cli import main

CONFIGS = Path(__file__).parent.parent / "configs"
EMBEDDED_CFG = CONFIGS / "embedded-mutual-choice.yaml"
D_IN = 128  # the embedded model's d_model
EXPORT_D_SAE = 64


def _write_export(folder: Path, d_sae: int = EXPORT_D_SAE, cfg_d_sae: int | None = None) -> Path:
    """A valid SAELens `jumprelu` export for the embedded model (random weights, no training)."""
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig

    cfg = JumpReLUSAEConfig(d_in=D_IN, d_sae=d_sae)
    cfg.metadata.hook_name = "blocks.1.hook_resid_pre"
    cfg.metadata.model_name = "embedded"
    cfg.metadata.context_size = 128
    JumpReLUSAE(cfg).save_model(folder)
    if cfg_d_sae is not None:
        data = json.loads((folder / "cfg.json").read_text())
        data["d_sae"] = cfg_d_sae
        (folder / "cfg.json").write_text(json.dumps(data))
    return folder


def _write_checkpoint(folder: Path, d_sae: int = 1024) -> Path:
    """A training checkpoint as SAELens writes it: training cfg.json, weights, trainer state."""
    from sae_lens_allocation import MutualChoiceTrainingSAE, MutualChoiceTrainingSAEConfig

    sae = MutualChoiceTrainingSAE(MutualChoiceTrainingSAEConfig(d_in=D_IN, d_sae=d_sae, k=8))
    sae.save_model(folder)
    torch.save({}, folder / "trainer_state.pt")
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Shared inputs: the base config, a valid export, a training checkpoint, broken folders."""
    root = tmp_path_factory.mktemp("bad-inputs")
    made = {"root": root}
    made["export"] = _write_export(root / "export")
    made["checkpoint"] = _write_checkpoint(root / "checkpoint")
    made["checkpoint_small"] = _write_checkpoint(root / "checkpoint_small", d_sae=512)
    weights = (made["export"] / "sae_weights.safetensors").read_bytes()
    cfg_text = (made["export"] / "cfg.json").read_text()
    for name, cfg_json, weight_bytes in (
        ("truncated_weights", cfg_text, weights[: len(weights) // 2]),
        ("empty_weights", cfg_text, b""),
        ("random_weights", cfg_text, bytes(range(256)) * 8),
        ("truncated_cfg", cfg_text[: len(cfg_text) // 2], weights),
        ("empty_cfg", "", weights),
    ):
        folder = root / name
        folder.mkdir()
        (folder / "cfg.json").write_text(cfg_json)
        (folder / "sae_weights.safetensors").write_bytes(weight_bytes)
    made["wrong_d_sae"] = _write_export(root / "wrong_d_sae", cfg_d_sae=EXPORT_D_SAE * 2)
    (root / "no_cfg").mkdir()
    made["not_yaml"] = root / "not.yaml"
    made["not_yaml"].write_text("sae: {architecture: mutual_choice\nmodel_name: [unclosed\n")
    made["topk_yaml"] = root / "topk.yaml"
    text = EMBEDDED_CFG.read_text()
    start, end = text.index("sae:\n"), text.index("training_tokens:")
    made["topk_yaml"].write_text(
        text[:start] + "sae: {architecture: topk_aux, d_in: 128, d_sae: 1024, k: 8}\n\n" + text[end:]
    )
    made["list_yaml"] = root / "list.yaml"
    made["list_yaml"].write_text("- a\n- b\n")
    return made


# (id, argv template, text the one line must contain). In argv, {root} is the shared folder,
# {out} a fresh per-case folder that must stay empty; `train` cases get --set output_path and
# checkpoint_path inside {out} appended.
TRAIN = "@train"  # the embedded Mutual Choice config
TOPK = "@train-topk"  # the same config with a TopK-shaped sae section (k=8, no calibration keys)
CASES = [
    # -- config files and overrides
    ("config-missing", ["train", "{root}/nope.yaml"], "nope.yaml"),
    ("config-invalid-yaml", ["train", "{root}/not.yaml"], "invalid YAML"),
    ("config-not-mapping", ["train", "{root}/list.yaml"], "mapping"),
    ("override-malformed", [TRAIN, "--set", "oops"], "key=value"),
    ("override-not-a-section", [TRAIN, "--set", "lr.x=1"], "'lr' is not a section"),
    ("override-bad-yaml", [TRAIN, "--set", "lr=[1"], "not valid YAML"),
    ("unknown-architecture", [TRAIN, "--set", "sae.architecture=mutal_choice"], "mutal_choice"),
    ("unknown-runner-key", [TRAIN, "--set", "traning_tokens=5"], "traning_tokens"),
    ("unknown-sae-key", [TRAIN, "--set", "sae.kk=3"], "sae.kk"),
    # -- runner fields
    ("lr-string", [TRAIN, "--set", "lr=abc"], "lr='abc'"),
    ("lr-zero", [TRAIN, "--set", "lr=0"], "lr=0"),
    ("lr-negative", [TRAIN, "--set", "lr=-1e-3"], "lr=-0.001"),
    ("training-tokens-float", [TRAIN, "--set", "training_tokens=1e6"], "training_tokens=1000000.0"),
    ("training-tokens-below-batch", [TRAIN, "--set", "training_tokens=100"], "training_tokens=100"),
    ("batch-zero", [TRAIN, "--set", "train_batch_size_tokens=0"], "train_batch_size_tokens=0"),
    ("context-zero", [TRAIN, "--set", "context_size=0"], "context_size=0"),
    ("context-over-n-ctx", [TRAIN, "--set", "context_size=256", "--set", "n_batches_in_buffer=64"],
     "n_ctx"),
    ("buffer-too-small", [TRAIN, "--set", "n_batches_in_buffer=1"], "n_batches_in_buffer=1"),
    ("seed-string", [TRAIN, "--set", "seed=abc"], "seed='abc'"),
    ("adam-beta", [TRAIN, "--set", "adam_beta1=1.5"], "adam_beta1=1.5"),
    ("d-sae-zero", [TRAIN, "--set", "sae.d_sae=0"], "d_sae=0"),
    ("d-in-string", [TRAIN, "--set", "sae.d_in=abc"], "d_in='abc'"),
    # -- plugin SAE fields
    ("mc-k-negative", [TRAIN, "--set", "sae.k=-1"], "k=-1"),
    ("mc-k-over-d-sae", [TRAIN, "--set", "sae.k=2000"], "k=2000"),
    ("mc-k-string", [TRAIN, "--set", "sae.k=abc"], "k='abc'"),
    ("mc-k-times-n-below-one", [TRAIN, "--set", "sae.k=0.05", "--set", "train_batch_size_tokens=16"],
     "floor(k * N)"),
    ("mc-ema-rate-string", [TRAIN, "--set", "sae.threshold_ema_rate=abc"], "threshold_ema_rate"),
    ("mc-ema-rate-zero", [TRAIN, "--set", "sae.threshold_ema_rate=0"], "threshold_ema_rate=0"),
    ("mc-calibration-tokens", [TRAIN, "--set", "sae.calibration_tokens=0"], "calibration_tokens=0"),
    ("aux-loss-unknown", [TRAIN, "--set", "sae.aux_loss=nope"], "aux_loss='nope'"),
    ("aux-coefficient-negative", [TRAIN, "--set", "sae.aux_loss_coefficient=-1"], "aux_loss_coefficient"),
    ("fc-batch-too-small", [TRAIN, "--set", "sae.architecture=feature_choice", "--set", "sae.k=1",
                            "--set", "train_batch_size_tokens=512"], "train_batch_size_tokens=512"),
    ("topk-aux-k-zero", [TOPK, "--set", "sae.k=0"], "k=0"),
    ("topk-aux-k-float", [TOPK, "--set", "sae.k=2.5"], "k=2.5"),
    ("topk-aux-k-string", [TOPK, "--set", "sae.k=abc"], "k='abc'"),
    ("topk-aux-k-over-d-sae", [TOPK, "--set", "sae.k=5000"], "k=5000"),
    ("gradient-topk-beta", [TOPK, "--set", "sae.architecture=gradient_topk", "--set", "sae.beta=-1"], "beta=-1"),
    ("gradient-topk-cache-missing", [TOPK, "--set", "sae.architecture=gradient_topk",
                                     "--set", "use_cached_activations=true"], "Cache directory"),
    # -- hooks and models (pre-flight)
    ("hook-missing", [TRAIN, "--set", "hook_name=blocks.9.hook_resid_pre"], "blocks.9.hook_resid_pre"),
    ("mc-d-in-mismatch", [TRAIN, "--set", "sae.d_in=64"], "which is 128"),
    ("topk-aux-d-in-mismatch", [TOPK, "--set", "sae.d_in=256"], "which is 128"),
    ("gradient-topk-d-in-half", [TOPK, "--set", "sae.architecture=gradient_topk",
                                 "--set", "sae.d_in=64"], "which is 128"),
    ("gradient-topk-d-in-double", [TOPK, "--set", "sae.architecture=gradient_topk",
                                   "--set", "sae.d_in=256"], "which is 128"),
    ("head-index-on-resid", [TRAIN, "--set", "hook_head_index=0"], "hook_head_index=0"),
    ("model-unknown", [TRAIN, "--set", "model_name=no-such-model-xyz", "--set", "dataset_path=local"],
     "no-such-model-xyz"),
    ("corpus-with-other-model", [TRAIN, "--set", "model_name=gpt2"], "dataset_path='embedded'"),
    # -- resume
    ("resume-missing", [TRAIN, "--set", "resume_from_checkpoint={root}/nope"], "resume_from_checkpoint"),
    ("resume-from-export", [TRAIN, "--set", "resume_from_checkpoint={root}/export"], "an export"),
    ("resume-other-shape", [TRAIN, "--set", "resume_from_checkpoint={root}/checkpoint_small"], "d_sae=512"),
    ("resume-truncated", [TRAIN, "--set", "resume_from_checkpoint={root}/truncated_cfg"], "cfg.json"),
    # -- eval
    ("eval-missing-folder", ["eval", "{root}/nope"], "does not exist"),
    ("eval-no-cfg", ["eval", "{root}/no_cfg"], "cfg.json"),
    ("eval-truncated-cfg", ["eval", "{root}/truncated_cfg"], "truncated_cfg/cfg.json is not valid JSON"),
    ("eval-empty-cfg", ["eval", "{root}/empty_cfg"], "empty_cfg/cfg.json is empty"),
    ("eval-empty-weights", ["eval", "{root}/empty_weights"], "empty_weights/sae_weights.safetensors is empty"),
    ("eval-truncated-weights", ["eval", "{root}/truncated_weights"],
     "truncated_weights/sae_weights.safetensors is not a readable safetensors file"),
    ("eval-random-weights", ["eval", "{root}/random_weights"],
     "random_weights/sae_weights.safetensors is not a readable safetensors file"),
    ("eval-wrong-d-sae", ["eval", "{root}/wrong_d_sae"], "does not match"),
    ("eval-training-checkpoint", ["eval", "{root}/checkpoint"], "training checkpoint"),
    ("eval-n-batches-zero", ["eval", "{root}/export", "--n-batches", "0"], "--n-batches"),
    ("eval-n-batches-string", ["eval", "{root}/export", "--n-batches", "ten"], "--n-batches"),
    ("eval-batch-size-zero", ["eval", "{root}/export", "--batch-size-prompts", "0"], "--batch-size-prompts"),
    ("eval-out-missing-folder", ["eval", "{root}/export", "--out", "{out}/missing/eval.json"], "does not exist"),
    ("eval-hub-model-offline", ["eval", "{root}/export", "--model", "no-such-model-xyz", "--out",
                                "{out}/eval.json"], "no-such-model-xyz"),
    # -- dashboard
    ("dashboard-missing-folder", ["dashboard", "{root}/nope", "--out", "{out}/dash"], "does not exist"),
    ("dashboard-training-checkpoint", ["dashboard", "{root}/checkpoint", "--out", "{out}/dash"],
     "training checkpoint"),
    ("dashboard-n-tokens-zero", ["dashboard", "{root}/export", "--n-tokens", "0", "--out", "{out}/dash"],
     "--n-tokens"),
    ("dashboard-feature-string", ["dashboard", "{root}/export", "--features", "x", "--out", "{out}/dash"],
     "--features"),
    ("dashboard-feature-out-of-range", ["dashboard", "{root}/export", "--features", "3", str(EXPORT_D_SAE),
                                        "--out", "{out}/dash"], f"[0, {EXPORT_D_SAE})"),
    ("dashboard-context-size-zero", ["dashboard", "{root}/export", "--context-size", "0", "--out", "{out}/dash"],
     "--context-size"),
    # -- booleans are read strictly: a quoted "false" is a non-empty string, which Python reads as true
    ("wandb-bool-quoted", [TRAIN, "--set", 'logger.log_to_wandb="false"'], "logger.log_to_wandb='false'"),
    ("runner-bool-number", [TRAIN, "--set", "autocast=1"], "autocast=1"),
    ("sae-bool-quoted", [TRAIN, "--set", 'sae.apply_b_dec_to_input="true"'], "sae.apply_b_dec_to_input='true'"),
    ("multi-bool-quoted", ["train", str(CONFIGS / "embedded-multi.yaml"),
                           "--set", 'saes.mc-l1.apply_b_dec_to_input="no"'], "saes.mc-l1.apply_b_dec_to_input='no'"),
    # -- a file where a folder belongs, a folder where a file belongs, one config for another command
    ("train-a-folder", ["train", "{root}"], "is a folder"),
    ("eval-cfg-json", ["eval", "{root}/export/cfg.json"], "is a file; give the SAE folder"),
    ("compare-a-train-config", ["compare", str(EMBEDDED_CFG), "--out", "{out}/cmp"], "sae-lens-allocation train"),
    ("train-a-compare-config", ["train", str(CONFIGS / "compare-embedded.yaml")], "sae-lens-allocation compare"),
    ("multi-set-sae-key", ["train", str(CONFIGS / "embedded-multi.yaml"), "--set", "sae.k=16"],
     "--set saes.<name>.k=..."),
    ("cache-into-non-empty-folder", ["cache", str(CONFIGS / "embedded-gradient-cache.yaml"),
                                     "--set", "new_cached_activations_path={root}"], "not empty"),
    # -- the command line itself
    ("no-command", [], "COMMAND"),
    ("unknown-command", ["trian"], "trian"),
    ("train-without-config", ["train"], "config"),
]


def _argv(template, files, out):
    argv = [a.format(root=files["root"], out=out) for a in template]
    if argv[:1] in ([TRAIN], [TOPK]):
        base = EMBEDDED_CFG if argv[0] == TRAIN else files["topk_yaml"]
        argv = ["train", str(base), *argv[1:],
                "--set", f"output_path={out}/export", "--set", f"checkpoint_path={out}/checkpoints"]
    return argv


def assert_one_line_error(code, err, *needles):
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("sae-lens-allocation"), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_the_matrix_has_at_least_40_mistakes():
    assert len(CASES) >= 40
    assert len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize("template,needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_mistake_is_one_line_and_exit_2(template, needle, files, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    before = {p: p.stat().st_mtime_ns for p in files["root"].rglob("*")}
    code = main(_argv(template, files, out))
    captured = capsys.readouterr()
    assert_one_line_error(code, captured.err, needle)
    # Nothing written: no export, checkpoint, eval.json or dashboard, and no input touched.
    assert list(out.iterdir()) == []
    after = {p: p.stat().st_mtime_ns for p in files["root"].rglob("*")}
    assert after == before


def test_dashboard_without_the_extra(files, tmp_path, capsys, monkeypatch):
    # find_spec answers None for a module whose sys.modules entry is None: "not installed".
    monkeypatch.setitem(sys.modules, "sae_dashboard", None)
    code = main(["dashboard", str(files["export"]), "--out", str(tmp_path / "dash")])
    assert_one_line_error(code, capsys.readouterr().err, "pip install 'sae-lens-allocation[dashboard]'")
    assert not (tmp_path / "dash").exists()


def test_dashboard_features_are_checked_before_the_model_loads(files, tmp_path, capsys, monkeypatch):
    from sae_lens_allocation.analysis import dashboard

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before --features was checked")

    monkeypatch.setattr(dashboard, "resolve_model", no_model)
    code = main(["dashboard", str(files["export"]), "--features", str(EXPORT_D_SAE), "--out", str(tmp_path / "dash")])
    assert_one_line_error(code, capsys.readouterr().err, f"feature {EXPORT_D_SAE} is not allowed")


@pytest.mark.parametrize("argv,needle", [
    ([str(EMBEDDED_CFG), "--set", "device=cuda"], "device='cuda'"),
    ([str(CONFIGS / "embedded-multi.yaml"), "--set", "device=cuda:0"], "device='cuda:0'"),
    (["eval", "{root}/export", "--device", "cuda"], "--device='cuda'"),
    (["cache", str(CONFIGS / "embedded-gradient-cache.yaml"), "--set", "device=cuda",
      "--set", "new_cached_activations_path={out}/cache"], "device='cuda'"),
    (["dashboard", "{root}/export", "--device", "cuda", "--out", "{out}/dash"], "--device='cuda'"),
    ([str(EMBEDDED_CFG), "--set", "device=gpu"], "a torch device"),
])
def test_a_device_this_torch_lacks_is_one_line(argv, needle, files, tmp_path, capsys, monkeypatch):
    """A CPU build of torch asked for CUDA: SAELens fails with an AssertionError, eval with a
    pin_memory RuntimeError. Refused first, as on a machine without CUDA."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    out.mkdir()
    argv = [a.format(root=files["root"], out=out) for a in argv]
    if argv[0].endswith(".yaml"):
        argv = ["train", *argv, "--set", f"output_path={out}/export", "--set", f"checkpoint_path={out}/checkpoints"]
    code = main(argv)
    assert_one_line_error(code, capsys.readouterr().err, needle)
    assert list(out.iterdir()) == []


def test_a_bug_keeps_its_traceback(monkeypatch):
    """Only user mistakes become one line; an unexpected exception propagates."""
    import sae_lens_allocation.yaml_config as yaml_config

    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(yaml_config, "load_runner_config", broken)
    with pytest.raises(KeyError, match="a bug"):
        main(["train", str(EMBEDDED_CFG)])


# -- the loader names the file -------------------------------------------------------------------


@pytest.mark.parametrize(
    "folder,needle",
    [("truncated_weights", "sae_weights.safetensors is not a readable"),
     ("empty_weights", "sae_weights.safetensors is empty"),
     ("random_weights", "sae_weights.safetensors is not a readable"),
     ("truncated_cfg", "cfg.json is not valid JSON"),
     ("wrong_d_sae", "W_enc has shape [128, 64], but d_in=128, d_sae=128")],
)
def test_load_sae_names_the_broken_file(files, folder, needle):
    from sae_lens_allocation import load_sae
    from sae_lens_allocation.validation import UsageError

    with pytest.raises(UsageError) as err:
        load_sae(files["root"] / folder)
    assert str(files["root"] / folder) in str(err.value)
    assert needle in str(err.value)


# -- YAML 1.2 numbers ------------------------------------------------------------------------------


def test_numbers_in_yaml_and_overrides_are_yaml_1_2(tmp_path):
    from sae_lens_allocation.yaml_config import load_runner_config

    path = tmp_path / "cfg.yaml"
    path.write_text(EMBEDDED_CFG.read_text().replace("lr: 1.0e-3", "lr: 3e-4"))
    cfg = load_runner_config(path)
    assert cfg.lr == pytest.approx(3e-4) and isinstance(cfg.lr, float)
    assert cfg.training_tokens == 500_000  # YAML 1.1 underscores still read as an integer
    cfg = load_runner_config(EMBEDDED_CFG, ["lr=1e-3", "sae.threshold_ema_rate=1e-2", "lr_end=+2E-5"])
    assert (cfg.lr, cfg.sae.threshold_ema_rate, cfg.lr_end) == (1e-3, 1e-2, 2e-5)


# -- checks that need no CLI -----------------------------------------------------------------------


def test_gradient_store_refuses_a_hook_of_another_width():
    """The gradient store's reshape(-1, d_in) would split (d_in 64) or merge (d_in 256) tokens."""
    from sae_lens_allocation.training.gradients import GradientActivationsStore
    from sae_lens_allocation.validation import UsageError

    store = GradientActivationsStore.__new__(GradientActivationsStore)
    store.seqpos_slice, store.hook_head_index, store.hook_name = (None,), None, "blocks.0.hook_resid_post"
    store.device = torch.device("cpu")
    hook_tensor = torch.randn(2, 5, 128)
    for d_in in (64, 256):
        store.d_in = d_in
        with pytest.raises(UsageError, match=f"sae.d_in={d_in} is not allowed.*which is 128"):
            store._flatten_hook_tensor(hook_tensor)
    store.d_in = 128
    assert store._flatten_hook_tensor(hook_tensor).shape == (10, 128)


def test_topk_aux_stops_on_a_non_finite_loss():
    from sae_lens.saes.sae import TrainStepInput

    from sae_lens_allocation import TopKAuxTrainingSAE, TopKAuxTrainingSAEConfig

    sae = TopKAuxTrainingSAE(TopKAuxTrainingSAEConfig(d_in=16, d_sae=64, k=4))
    x = torch.randn(32, 16)
    x[3, 2] = float("nan")
    step = TrainStepInput(sae_in=x, coefficients={"aux_loss_coefficient": 1.0},
                          dead_neuron_mask=torch.zeros(64, dtype=torch.bool), n_training_steps=7,
                          is_logging_step=False)
    with pytest.raises(FloatingPointError, match="topk_aux training met a non-finite loss"):
        sae.training_forward_pass(step)


def test_per_token_l0_on_a_hook_z_sae_without_reshaping():
    """hook_z activations are [batch, pos, heads, d_head]; an SAE trained on them flattened
    (reshape_activations 'none') must get them flattened, as SAELens' run_evals does."""
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig

    from sae_lens_allocation.analysis.evaluation import per_token_l0

    import support

    model = support.tiny_model()
    cfg = JumpReLUSAEConfig(d_in=support.D_MODEL, d_sae=16)
    cfg.metadata.hook_name = "blocks.0.attn.hook_z"
    sae = JumpReLUSAE(cfg)
    sae.eval()
    tokens = torch.randint(1, 100, (2, 8))

    class Store:
        def get_batch_tokens(self):
            return tokens

    l0 = per_token_l0(sae, Store(), model, n_batches=1)
    _, cache = model.run_with_cache(tokens, names_filter=cfg.metadata.hook_name)
    expected = (sae.encode(cache[cfg.metadata.hook_name].flatten(2)) != 0).sum(-1).flatten()
    assert torch.equal(l0, expected)


DASHBOARD_CASES = [c for c in CASES if c[1][:1] == ["dashboard"]]


@pytest.mark.parametrize("template,needle", [c[1:] for c in DASHBOARD_CASES], ids=[c[0] for c in DASHBOARD_CASES])
def test_dashboard_mistake_reads_the_same_without_the_extra(template, needle, files, tmp_path, capsys, monkeypatch):
    # The user's own mistake is named first; the missing extra only once the command could run.
    monkeypatch.setitem(sys.modules, "sae_dashboard", None)
    out = tmp_path / "out"
    out.mkdir()
    code = main(_argv(template, files, out))
    assert_one_line_error(code, capsys.readouterr().err, needle)
    assert list(out.iterdir()) == []


def test_unknown_keys_and_flattened_errors_read_the_same_everywhere():
    from sae_lens_allocation.validation import UsageError, one_line, reject_unknown_keys

    reject_unknown_keys({"k": 1}, ["k", "d_in"])
    with pytest.raises(UsageError, match=r"^unknown config key sae\.kk \(architecture topk\); allowed: d_in, k$"):
        reject_unknown_keys({"k": 1, "zz": 3, "kk": 2}, ["k", "d_in"], prefix="sae.", note="(architecture topk)")
    with pytest.raises(ValueError, match=r"^unknown cache config key 1; allowed: a$") as info:
        reject_unknown_keys({1: 0, "a": 0}, ["a"], "cache config", error=ValueError)
    assert type(info.value) is ValueError
    assert one_line("a\n  b\tc ") == "a b c"
    assert one_line(RuntimeError("first\nsecond")) == "first second"
    assert one_line(KeyError()) == "KeyError"
