"""The embedded demo model: loads offline, is really trained, and feeds SAELens' ActivationsStore."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from sae_lens_allocation.embedded import (
    DEFAULT_HOOK_NAME,
    EMBEDDED_MODEL_NAME,
    corpus_dataset,
    corpus_files,
    embedded_model_record,
    load_embedded_model,
    load_embedded_tokenizer,
)
from sae_lens_allocation.embedded.corpus import EXCLUDED_DIRS, split_of, stdlib_root
from sae_lens_allocation.embedded.model import mean_token_loss, tokens_sha256

import support


@pytest.fixture(scope="module")
def model():
    return load_embedded_model()


@pytest.fixture(scope="module")
def record():
    return embedded_model_record()


def test_loads_offline_with_its_own_tokenizer(model):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert not model.training
    assert model.cfg.model_name == EMBEDDED_MODEL_NAME
    assert model.cfg.d_vocab == len(model.tokenizer)
    # TransformerLens reloads tokenizers by name_or_path: it must be a local folder.
    assert (Path(model.tokenizer.name_or_path) / "tokenizer.json").is_file()
    assert model.to_tokens("x = 1")[0, 0].item() == model.tokenizer.bos_token_id
    assert model.cfg.device == "cpu"


def test_heldout_loss_matches_record_and_beats_unigram(model, record):
    losses = record["losses"]
    rows = torch.tensor(
        corpus_dataset(model, "heldout", model.cfg.n_ctx, n_rows=losses["heldout_check_rows"])["tokens"]
    )
    loss = mean_token_loss(model, rows)
    if tokens_sha256(rows) == losses["heldout_check_tokens_sha256"]:
        # Same stdlib as at training time: the very rows the record was measured on.
        assert loss == pytest.approx(losses["heldout_check_loss"], abs=1e-2)
    else:
        # Another Python version's stdlib: other held-out files, same kind of text.
        assert loss == pytest.approx(losses["heldout_loss"], abs=0.5)
    assert loss < losses["unigram_entropy"] - 1.0
    assert loss < 0.6 * math.log(model.cfg.d_vocab)


def test_tokenizer_round_trips_code_and_unicode():
    tok = load_embedded_tokenizer()
    text = 'def f(x):\n    """Return x² — naïve ✓."""\n\treturn {"k": x}  # 注释\n'
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.bos_token_id == tok.eos_token_id == tok.pad_token_id
    assert tok.bos_token == "<|endoftext|>"
    assert tok.bos_token_id not in ids


def test_corpus_split_is_disjoint_stable_and_excludes_tests():
    train, heldout = corpus_files("train"), corpus_files("heldout")
    assert train == corpus_files("train")
    assert not set(train) & set(heldout)
    assert 0.02 < len(heldout) / (len(train) + len(heldout)) < 0.1
    root = stdlib_root()
    rels = [p.relative_to(root).as_posix() for p in train + heldout]
    assert rels[: len(train)] == sorted(rels[: len(train)])
    assert all(not EXCLUDED_DIRS.intersection(Path(r).parts[:-1]) for r in rels)
    # The rule is a hash of the relative path: fixed for every machine and Python version.
    assert split_of("chunk.py") == "heldout"
    assert split_of("os.py") == "train"
    with pytest.raises(ValueError, match="split='valid'"):
        corpus_files("valid")


def test_corpus_dataset_rows(model):
    ds = corpus_dataset(model, "heldout", context_size=64, n_rows=12, seed=3)
    rows = torch.tensor(ds["tokens"])
    assert rows.shape == (12, 64)
    assert (rows[:, 0] == model.tokenizer.bos_token_id).all()
    assert torch.equal(rows, torch.tensor(corpus_dataset(model.tokenizer, "heldout", 64, n_rows=12, seed=3)["tokens"]))
    assert not torch.equal(rows, torch.tensor(corpus_dataset(model, "heldout", 64, n_rows=12, seed=4)["tokens"]))
    with pytest.raises(ValueError, match="n_rows=100000"):
        corpus_dataset(model, "heldout", 64, n_rows=100_000)
    with pytest.raises(ValueError, match="context_size=1"):
        corpus_dataset(model, "heldout", 1)


def test_feeds_sae_lens_activations_store(model, tmp_path):
    from sae_lens import LanguageModelSAERunnerConfig
    from sae_lens.training.activations_store import ActivationsStore

    d_model, ctx = model.cfg.d_model, 128
    cfg = LanguageModelSAERunnerConfig.from_dict(
        support.runner_cfg_dict(
            "standard",
            tmp_path,
            model_name=EMBEDDED_MODEL_NAME,
            hook_name=DEFAULT_HOOK_NAME,
            context_size=ctx,
            sae_d_in=d_model,
            train_batch_size_tokens=512,
            n_batches_in_buffer=8,
            store_batch_size_prompts=4,
        )
    )
    ds = corpus_dataset(model, "heldout", context_size=ctx, n_rows=64)
    first_rows = torch.tensor(ds["tokens"][:4])
    store = ActivationsStore.from_config(model, cfg, override_dataset=ds)

    # Pretokenized rows are used as they are (they already start with BOS).
    tokens = store.get_batch_tokens()
    assert torch.equal(tokens, first_rows)
    acts = store.get_activations(tokens)
    _, cache = model.run_with_cache(tokens, names_filter=[DEFAULT_HOOK_NAME])
    torch.testing.assert_close(acts, cache[DEFAULT_HOOK_NAME])

    batch = store.next_batch()
    assert batch.shape == (512, d_model)
    assert torch.isfinite(batch).all()
