"""The command-line tool: each error path is one line, exit code 2, no traceback."""

import subprocess
import sys

import pytest
import torch

from sae_lens_allocation_cli import main


def _run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0]


def test_missing_config_file(capsys, tmp_path):
    code, _, err = _run(["train", str(tmp_path / "nope.yaml")], capsys)
    _assert_one_line_error(code, err, "not found", "nope.yaml")


def test_bad_yaml(capsys, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("sae: {architecture: mutual_choice\nmodel_name: [unclosed\n")
    code, _, err = _run(["train", str(path)], capsys)
    _assert_one_line_error(code, err, "invalid YAML", "line")


def test_unknown_architecture_lists_registered(capsys, tmp_path):
    path = tmp_path / "arch.yaml"
    path.write_text("sae: {architecture: mutal_choice, d_in: 8, d_sae: 16}\n")
    code, _, err = _run(["train", str(path)], capsys)
    _assert_one_line_error(code, err, "mutal_choice", "mutual_choice", "feature_choice", "topk")


@pytest.mark.parametrize(
    "override,needle",
    [("traning_tokens=5", "traning_tokens"), ("sae.kk=3", "sae.kk"), ("logger.colour=1", "logger.colour")],
)
def test_unknown_override_key(capsys, override, needle):
    code, _, err = _run(["train", "configs/tiny-mutual-choice.yaml", "--set", override], capsys)
    _assert_one_line_error(code, err, needle, "unknown config key")


def test_malformed_override(capsys):
    code, _, err = _run(["train", "configs/tiny-mutual-choice.yaml", "--set", "oops"], capsys)
    _assert_one_line_error(code, err, "key=value")


def test_invalid_field_value_names_the_field(capsys):
    code, _, err = _run(["train", "configs/tiny-mutual-choice.yaml", "--set", "sae.k=-1"], capsys)
    _assert_one_line_error(code, err, "k=-1")


def test_eval_of_a_folder_without_sae(capsys, tmp_path):
    code, _, err = _run(["eval", str(tmp_path)], capsys)
    _assert_one_line_error(code, err, "cfg.json")


@pytest.mark.slow
def test_console_script_and_python_m_agree():
    out = subprocess.run([sys.executable, "-m", "sae_lens_allocation", "train", "missing.yaml"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "missing.yaml" in out.stderr


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["init"], ["init", "--help"], ["train", "--help"],
                                  ["train"], ["init", "no-such-config"]])
def test_help_version_init_and_argument_mistakes_import_neither_sae_lens_nor_torch(argv, tmp_path):
    """The console script parses before it imports the package (whose import registers the
    architectures, and so imports SAELens and torch): these answer in a fraction of a second."""
    probe = (
        "import sys\n"
        "from sae_lens_allocation_cli import main\n"
        "try:\n"
        f"    code = main({argv!r})\n"
        "except SystemExit as stop:\n"
        "    code = stop.code or 0\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'sae_lens', 'torch', 'sae_lens_allocation', "
        "'transformer_lens', 'datasets', 'yaml'})\n"
        "print('HEAVY', heavy, 'CODE', code)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    code = 2 if argv in (["train"], ["init", "no-such-config"]) else 0
    assert out.stdout.splitlines()[-1] == f"HEAVY [] CODE {code}", out.stdout + out.stderr


def test_version_names_the_plugin_and_sae_lens(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == (
        f"sae-lens-allocation {version('sae-lens-allocation')} (sae-lens {version('sae-lens')})")


@pytest.mark.slow
def test_train_offline_config_matches_python_api(capsys, tmp_path):
    from safetensors.torch import load_file

    import sae_lens_allocation
    from sae_lens_allocation.yaml_config import load_runner_config

    small = ["training_tokens=2048", "train_batch_size_tokens=1024", "sae.d_sae=128",
             "sae.calibration_tokens=1024", "n_batches_in_buffer=8", "store_batch_size_prompts=8",
             "n_eval_batches=1"]
    cli_out, api_out = tmp_path / "cli", tmp_path / "api"
    sets = [x for s in small + [f"output_path={cli_out}", f"checkpoint_path={tmp_path / 'c1'}"]
            for x in ("--set", s)]
    code, out, err = _run(["train", "configs/embedded-mutual-choice.yaml", *sets], capsys)
    assert code == 0, err
    assert str(cli_out) in out

    cfg = load_runner_config("configs/embedded-mutual-choice.yaml",
                             small + [f"output_path={api_out}", f"checkpoint_path={tmp_path / 'c2'}"])
    sae_lens_allocation.train(cfg)
    cli_w = load_file(cli_out / "sae_weights.safetensors")
    api_w = load_file(api_out / "sae_weights.safetensors")
    assert cli_w.keys() == api_w.keys() == {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}
    for name in cli_w:
        assert torch.equal(cli_w[name], api_w[name]), name


def test_eval_warns_with_the_figure_when_tokens_have_no_latent(capsys, tmp_path):
    """An export whose latents never fire on held-out text: one warning line with the count and
    share, recorded in eval.json; a share at the limit is not warned about."""
    import json

    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig

    from sae_lens_allocation.analysis.evaluation import NO_LATENT_WARNING_SHARE, no_latent_tokens

    cfg = JumpReLUSAEConfig(d_in=128, d_sae=32)
    cfg.metadata.hook_name = "blocks.1.hook_resid_pre"
    cfg.metadata.model_name = "embedded"
    cfg.metadata.context_size = 16
    cfg.metadata.prepend_bos = True
    sae = JumpReLUSAE(cfg)
    with torch.no_grad():
        sae.threshold.fill_(1e9)
    sae.save_model(tmp_path / "export")
    code, _, err = _run(["eval", str(tmp_path / "export"), "--n-batches", "1", "--batch-size-prompts", "2"], capsys)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "no latent firing" in line]
    assert len(warnings) == 1 and "(100.0%)" in warnings[0], err
    recorded = json.loads((tmp_path / "export" / "eval.json").read_text())["no_latent_tokens"]
    assert recorded["share"] == 1.0 and recorded["count"] == recorded["tokens"] > 0
    assert recorded["warning"] == warnings[0].removeprefix("sae-lens-allocation: ")

    at_limit = no_latent_tokens(torch.tensor([0] * 5 + [3] * 95))
    assert at_limit["share"] == NO_LATENT_WARNING_SHARE and at_limit["warning"] is None
    assert "6 of 100 held-out tokens (6.0%)" in no_latent_tokens(torch.tensor([0] * 6 + [3] * 94))["warning"]


def test_only_the_saelens_notices_a_user_cannot_act_on_are_dropped(caplog):
    import contextlib
    import logging
    import warnings

    from sae_lens_allocation.cli import quiet_saelens_notices

    saelens = logging.getLogger("sae_lens")
    copy_advice = "To copy construct from a tensor, it is recommended to use sourceTensor.detach().clone()"
    store = "sae_lens.training.activations_store"

    def emit(block):
        caplog.clear()
        with warnings.catch_warnings(record=True) as shown, caplog.at_level(logging.WARNING, logger="sae_lens"):
            warnings.simplefilter("always")
            with block:
                for text, module in [
                    ("The training dataset contains fewer samples (4995) than the number of samples required by "
                     "your training configuration (500000).", store),
                    (copy_advice, store),
                    (copy_advice, "sae_lens_allocation.training.sources"),
                    ("some other SAELens warning", store),
                ]:
                    warnings.warn_explicit(text, UserWarning, "x.py", 1, module=module)
                saelens.warning("You just passed in a dataset which will override the one specified in your "
                                "configuration: embedded.")
                saelens.warning("You just passed in a model which will override the one specified ...")
                saelens.warning("something else SAELens logs")
        return [str(w.message)[:30] for w in shown], [r.getMessage() for r in caplog.records]

    shown, logged = emit(quiet_saelens_notices())
    # Our own code's copy-construct warning and any other message stay visible.
    assert shown == [copy_advice[:30], "some other SAELens warning"]
    assert logged == ["something else SAELens logs"]
    shown, logged = emit(contextlib.nullcontext())  # outside the block nothing is dropped
    assert len(shown) == 4 and len(logged) == 3
