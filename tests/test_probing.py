"""Sparse probing of code concepts (analysis/code_concepts.py, analysis/probing.py, the `probe`
command): labels, probe pieces on constructed data, and the protocol on trained embedded exports."""

from __future__ import annotations

import json

import pytest
import torch

from sae_lens_allocation.analysis import probing
from sae_lens_allocation.analysis.code_concepts import CONCEPTS, char_labels, token_labels

SNIPPET = 'def f(x):\n    """doc"""\n    if x:\n        return 1  # c\n'


def _labels_of(text: str) -> dict[str, set[str]]:
    from sae_lens_allocation.embedded import load_embedded_tokenizer

    tokenizer = load_embedded_tokenizer()
    found = token_labels(text, tokenizer)
    assert found is not None
    ids, labels = found
    return {tokenizer.decode([i]): {c for c, v in zip(CONCEPTS, row) if v} for i, row in zip(ids, labels)}


def test_tokens_take_the_concepts_of_their_first_non_blank_character():
    labels = _labels_of(SNIPPET)
    assert labels["def"] == {"keyword"} and labels[" f"] == {"name"} and labels["("] == {"operator"}
    assert labels['"""'] == {"string", "docstring", "def_body"}
    assert labels[" if"] == {"keyword", "def_body"}
    assert labels[" return"] == {"keyword", "def_body", "indent_gt1"}
    assert labels[" 1"] == {"number", "def_body", "indent_gt1"}
    assert labels[" c"] == {"comment", "indent_gt1"}  # after the last statement's end: not def_body


def test_labels_use_character_columns_where_ast_counts_bytes():
    text = 's = "é"\ndef g():\n    "ü doc"\n'
    labels = char_labels(text)
    assert labels is not None
    doc = labels[:, CONCEPTS.index("docstring")]
    assert text[int(doc.nonzero()[0])] == '"' and doc.sum() == len('"ü doc"')
    assert char_labels("def (:\n") is None
    assert char_labels("x = 1\r\ny = 2\r\n") is not None


def test_balanced_accuracy_gives_a_majority_guess_one_half():
    truth = torch.tensor([True] + [False] * 99)
    assert probing.balanced_accuracy(torch.zeros(100, dtype=torch.bool), truth) == 0.5
    assert probing.balanced_accuracy(truth.clone(), truth) == 1.0


def test_logistic_probe_separates_a_rare_class_that_a_plain_loss_would_ignore():
    g = torch.Generator().manual_seed(0)
    y = torch.rand(4000, generator=g) < 0.02
    x = torch.randn(4000, 3, generator=g) + y[:, None] * torch.tensor([1.5, 0.0, 0.0])
    predict = probing.logistic_probe(x[:3000], y[:3000])
    assert probing.balanced_accuracy(predict(x[3000:]), y[3000:]) > 0.7


class _PlantedSAE:
    """Latent 3 fires exactly on concept 0's tokens, latent 5 on the others; the rest is noise."""

    def __init__(self, labels: torch.Tensor):
        self.labels, self.W_dec = labels, torch.zeros(8, 4)

    def encode(self, x):
        codes = x[:, 0:1].abs().repeat(1, 8) * 0.01
        codes[:, 3] = x[:, 1]
        codes[:, 5] = x[:, 2]
        return codes


def test_latents_are_chosen_by_mean_difference_between_positives_and_negatives():
    labels = torch.zeros(200, len(CONCEPTS), dtype=torch.bool)
    labels[::4, 0] = True
    acts = torch.stack([torch.randn(200), labels[:, 0].float(), (~labels[:, 0]).float(), torch.zeros(200)], 1)
    chosen = probing.top_latents(_PlantedSAE(labels), acts, labels, 2)
    assert chosen.shape == (len(CONCEPTS), 2)
    assert set(chosen[0].tolist()) == {3, 5}  # both separate concept 0, by 1.0 each


def test_the_untrained_jumprelu_floor_is_as_sparse_as_the_trained_sae():
    from sae_lens import SAE

    torch.manual_seed(3)
    trained = SAE.from_dict({"architecture": "jumprelu", "d_in": 16, "d_sae": 64})
    with torch.no_grad():
        trained.threshold.fill_(1.0)  # a fresh one has threshold 0 and fires about half
    acts = torch.randn(2000, 16)
    l0 = float((probing.sae_codes(trained, acts) != 0).sum(1).float().mean())
    floor = probing.untrained_like(trained, 0, acts)
    assert float((probing.sae_codes(floor, acts) != 0).sum(1).float().mean()) == pytest.approx(l0, rel=0.05)
    again = probing.untrained_like(trained, 0, acts)
    assert torch.equal(floor.W_enc, again.W_enc) and not torch.equal(floor.W_enc, trained.W_enc)


def test_probe_of_a_folder_without_sae_is_one_line_and_exit_2(capsys, tmp_path):
    from sae_lens_allocation_cli import main

    code = main(["probe", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "does not exist" in err


@pytest.fixture(scope="module")
def embedded_exports(tmp_path_factory):
    """Every plugin architecture trained on the embedded model for 40 steps of 2048 tokens from
    one LM pass (the `saes:` form), d_sae 256, k 8: {architecture: export folder}."""
    from sae_lens_allocation import ARCHITECTURES
    from sae_lens_allocation_cli import main

    root = tmp_path_factory.mktemp("embedded-exports")
    config = {
        "model_name": "embedded", "dataset_path": "embedded", "streaming": False, "context_size": 128,
        "hook_names": "blocks.1.hook_resid_pre",
        "saes": {arch: {"architecture": arch, "d_in": 128, "d_sae": 256, "k": 8,
                        **({"calibration_tokens": 2048} if arch in {"mutual_choice", "feature_choice"} else {})}
                 for arch in ARCHITECTURES},
        "training_tokens": 81920, "train_batch_size_tokens": 2048, "store_batch_size_prompts": 16,
        "n_batches_in_buffer": 16, "lr": 3e-3, "lr_warm_up_steps": 5, "device": "cpu", "seed": 42,
        "n_eval_batches": 1, "eval_batch_size_prompts": 4, "checkpoint_path": str(root / "checkpoints"),
        "output_path": str(root / "out"), "logger": {"log_to_wandb": False},
    }
    path = root / "multi.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    assert main(["train", str(path)]) == 0
    return {arch: root / "out" / arch for arch in ARCHITECTURES}


@pytest.mark.slow
def test_trained_exports_probe_above_the_untrained_floor_and_below_the_raw_ceiling(embedded_exports, capsys,
                                                                                      tmp_path):
    from sae_lens_allocation_cli import main

    for arch, folder in embedded_exports.items():
        out = tmp_path / f"{arch}.json"
        code = main(["probe", str(folder), "--json", str(out), "--n-train-tokens", "8192",
                     "--n-test-tokens", "8192"])
        printed = capsys.readouterr().out
        assert code == 0
        result = json.loads(out.read_text())
        assert result["metric"] == "balanced_accuracy" and result["model"] == "embedded"
        assert result["tokens"]["test"] == 8192 and result["tokens"]["test_files"] >= 8
        assert set(result["concepts"]) == set(CONCEPTS) and len(CONCEPTS) >= 8
        floor, ceiling = result["floor"]["mean_accuracy"], result["ceiling"]["mean_accuracy"]
        assert floor < result["mean_accuracy"] < ceiling, (arch, floor, result["mean_accuracy"], ceiling)
        assert "mean" in printed and "keyword" in printed
