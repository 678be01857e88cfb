"""Offline test base: a tiny HookedTransformer with a local tokenizer, a local pretokenized
dataset, and a valid small runner config. Nothing here touches the model hub."""

from __future__ import annotations

import functools
import inspect
import os
import tempfile
from pathlib import Path
from typing import Any

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

CONTEXT_SIZE = 32
D_MODEL = 32
HOOK_NAME = "blocks.0.hook_resid_post"
# What each plugin architecture exports as: a SAELens built-in.
EXPORT_ARCHITECTURE = {"mutual_choice": "jumprelu", "feature_choice": "jumprelu",
                       "gradient_topk": "topk", "topk_aux": "topk"}


def _corpus_text() -> str:
    # Any text works; the sources of a few standard modules are always present and offline.
    import json
    import textwrap

    return "\n".join(inspect.getsource(m) for m in (json.encoder, json.decoder, textwrap))


@functools.lru_cache(maxsize=1)
def tiny_tokenizer() -> Any:
    """Byte-level BPE (vocab 512) trained in memory; `add_bos_token=True` keeps TransformerLens
    from reloading it by name."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_corpus_text()], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        add_bos_token=True,
    )
    # TransformerLens re-creates the tokenizer from `name_or_path`: give it a local folder.
    folder = Path(tempfile.mkdtemp(prefix="tiny-tokenizer-"))
    fast.save_pretrained(folder)
    return PreTrainedTokenizerFast.from_pretrained(folder, add_bos_token=True)


def tiny_model(seed: int = 0, n_layers: int = 2) -> Any:
    """A random-weight 2-layer HookedTransformer (d_model 32) built from a config."""
    from transformer_lens import HookedTransformerConfig

    from sae_lens_allocation.embedded.model import new_hooked_transformer

    tok = tiny_tokenizer()
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=D_MODEL,
        n_ctx=CONTEXT_SIZE,
        d_head=8,
        n_heads=4,
        d_mlp=4 * D_MODEL,
        d_vocab=len(tok),
        act_fn="gelu",
        normalization_type="LN",
        seed=seed,
        device="cpu",
    )
    model = new_hooked_transformer(cfg, tok)
    model.eval()
    return model


def tiny_dataset(n_rows: int = 256, context_size: int = CONTEXT_SIZE, seed: int = 0) -> Dataset:
    """Pretokenized rows (`tokens` column) cut from the local corpus, shuffled with `seed`. No
    special tokens: transformers 5 honours `add_bos_token` here and 4.x does not, and the rows must
    not depend on the transformers version."""
    ids = tiny_tokenizer()(_corpus_text(), add_special_tokens=False)["input_ids"]
    n_chunks = len(ids) // context_size
    chunks = [ids[i * context_size : (i + 1) * context_size] for i in range(n_chunks)]
    g = torch.Generator().manual_seed(seed)
    rows = [chunks[int(i) % n_chunks] for i in torch.randint(0, n_chunks, (n_rows,), generator=g)]
    return Dataset.from_dict({"tokens": rows})


def rows_sharing_a_window(rows: torch.Tensor, references: list[torch.Tensor], width: int = 48) -> int:
    """How many of `rows` [R, T] (their BOS column left out) share a `width`-token window with any
    of `references` ([R', T] each, BOS column left out, rows read as one stream): the disjointness
    check for token rows drawn from files training or calibration never read."""
    seen: set[tuple[int, ...]] = set()
    for reference in references:
        flat = reference[:, 1:].reshape(-1).tolist()
        seen |= {tuple(flat[i:i + width]) for i in range(len(flat) - width + 1)}
    return sum(any(tuple(row[i:i + width]) in seen for i in range(len(row) - width + 1))
               for row in rows[:, 1:].tolist())


def plugin_sae(architecture: str, seed: int | None = 0, *, d_in: int = 16, d_sae: int = 64,
               b_enc_std: float = 0.0, uneven_decoder: bool = False, **fields: Any) -> Any:
    """A plugin training SAE built as a config's `architecture:` builds it (SAELens' registry,
    `from_dict`), after `torch.manual_seed(seed)` unless `seed` is None. `b_enc_std` draws a
    non-zero encoder bias and `uneven_decoder` scales decoder rows by U[0.5, 1.5), in that order,
    so folding and per-latent pre-activations are exercised."""
    from sae_lens import TrainingSAE

    import sae_lens_allocation  # noqa: F401  (registers the architectures)

    if seed is not None:
        torch.manual_seed(seed)
    sae = TrainingSAE.from_dict({"architecture": architecture, "d_in": d_in, "d_sae": d_sae, **fields})
    with torch.no_grad():
        if b_enc_std:
            sae.b_enc.normal_(0, b_enc_std)
        if uneven_decoder:
            sae.W_dec.mul_(torch.rand(d_sae, 1) + 0.5)
    return sae


def step_input(x: torch.Tensor, dead: torch.Tensor | None = None, step: int = 0,
               logging: bool = False) -> Any:
    """SAELens' `TrainStepInput` for rows `x`: no coefficients, the dead-latent mask `dead`."""
    from sae_lens.saes.sae import TrainStepInput

    return TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=step,
                          is_logging_step=logging)


def training_step(sae: Any, x: torch.Tensor, dead: torch.Tensor | None = None, step: int = 0,
                  logging: bool = False) -> Any:
    """`sae.training_forward_pass` on `step_input(x, dead, step, logging)`."""
    return sae.training_forward_pass(step_input(x, dead, step, logging))


def runner_cfg_dict(architecture: str, tmp_path: Path | str, **overrides: Any) -> dict[str, Any]:
    """A dict for `LanguageModelSAERunnerConfig.from_dict` with a plain `architecture` string.

    Respects SAELens' buffer rule: n_batches_in_buffer * context_size >= train_batch_size_tokens.
    `sae_*` keys in `overrides` go to the `sae` section.
    """
    tmp_path = Path(tmp_path)
    sae = {"architecture": architecture, "d_in": D_MODEL, "d_sae": 128}
    sae.update({k[4:]: v for k, v in overrides.items() if k.startswith("sae_")})
    cfg: dict[str, Any] = {
        "sae": sae,
        "model_name": "tiny-offline",
        "hook_name": HOOK_NAME,
        "dataset_path": "local",
        "is_dataset_tokenized": True,
        "streaming": False,
        "context_size": CONTEXT_SIZE,
        "training_tokens": 8 * 256,
        "train_batch_size_tokens": 256,
        "store_batch_size_prompts": 8,
        "n_batches_in_buffer": 16,
        "device": "cpu",
        "seed": 42,
        "lr": 1e-3,
        "n_eval_batches": 2,
        "eval_batch_size_prompts": 4,
        "dead_feature_window": 50,
        "feature_sampling_window": 50,
        "checkpoint_path": str(tmp_path / "checkpoints"),
        "output_path": str(tmp_path / "output"),
        "verbose": False,
        "logger": {"log_to_wandb": False},
    }
    cfg.update({k: v for k, v in overrides.items() if not k.startswith("sae_")})
    assert cfg["n_batches_in_buffer"] * cfg["context_size"] >= cfg["train_batch_size_tokens"]
    return cfg


def runner_cfg(architecture: str, tmp_path: Path | str, **overrides: Any) -> Any:
    from sae_lens import LanguageModelSAERunnerConfig

    return LanguageModelSAERunnerConfig.from_dict(runner_cfg_dict(architecture, tmp_path, **overrides))


def train_export(architecture: str, folder: Path) -> tuple[Path, Any]:
    """`architecture` trained on the tiny model through the plugin's runner (`train`, 8 steps of
    256 tokens, k 8; Mutual and Feature Choice calibrated on 1024 held-out tokens). Returns the
    export folder and the trained SAE in eval mode."""
    from sae_lens_allocation.training.runner import train

    overrides: dict[str, Any] = {"sae_k": 8}
    if EXPORT_ARCHITECTURE[architecture] == "jumprelu":
        overrides["sae_calibration_tokens"] = 1024
    cfg = runner_cfg_dict(architecture, folder, **overrides)
    sae = train(cfg, override_model=tiny_model(), override_dataset=tiny_dataset())
    return Path(cfg["output_path"]), sae.eval()
