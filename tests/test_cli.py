"""The command-line tool: each error path is one line, exit code 2, no traceback."""

import subprocess
import sys

import pytest
import torch

from sae_lens_allocation.cli import main


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
