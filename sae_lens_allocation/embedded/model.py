"""Load the embedded demo language model: a small HookedTransformer trained on the stdlib corpus.

Its weights, tokenizer and training record ship in `assets/` (written by `train_model.py`), so
loading needs no model hub and works with `HF_HUB_OFFLINE=1`.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch

EMBEDDED_MODEL_NAME = "embedded"
ASSETS_DIR = Path(__file__).parent / "assets"
MODEL_WEIGHTS_FILE = "model.safetensors"
MODEL_RECORD_FILE = "model.json"  # not config.json: AutoTokenizer would read that as a model config
WEIGHTS_DTYPE = torch.float16
BOS_TOKEN = "<|endoftext|>"

# The residual stream between the two blocks: the middle of the model, where an SAE's
# reconstruction still has a whole block downstream of it (the CE loss sees its errors).
DEFAULT_HOOK_NAME = "blocks.1.hook_resid_pre"


def load_tokenizer_from(folder: str | Path) -> Any:
    """A `PreTrainedTokenizerFast` from a local folder; `add_bos_token=True` keeps TransformerLens
    from reloading it by name, and the folder name keeps any reload local."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(folder), add_bos_token=True)


def load_embedded_tokenizer() -> Any:
    """The embedded model's byte-level BPE tokenizer (`<|endoftext|>` is BOS, EOS and PAD)."""
    return load_tokenizer_from(ASSETS_DIR)


def embedded_model_record() -> dict[str, Any]:
    """`assets/model.json`: the HookedTransformerConfig fields (`config`), how the model was
    trained (`training`) and its recorded losses in nats per token (`losses`)."""
    return json.loads((ASSETS_DIR / MODEL_RECORD_FILE).read_text())


def new_hooked_transformer(cfg: Any, tokenizer: Any) -> Any:
    """`HookedTransformer(cfg, tokenizer=tokenizer)`. TransformerLens 3 deprecates the class in
    favour of TransformerBridge, but SAELens' runner and evals and sae-dashboard take a
    HookedTransformer (TransformerLens 2 has no bridge), so it stays one: this warning alone is
    silenced."""
    from transformer_lens import HookedTransformer

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="HookedTransformer is deprecated", category=DeprecationWarning)
        return HookedTransformer(cfg, tokenizer=tokenizer)


def load_embedded_model(device: str = "cpu") -> Any:
    """The embedded HookedTransformer in eval mode, with its tokenizer, on `device`."""
    from safetensors.torch import load_file
    from transformer_lens import HookedTransformerConfig

    cfg = HookedTransformerConfig(**embedded_model_record()["config"], device=device, init_weights=False)
    model = new_hooked_transformer(cfg, load_embedded_tokenizer())
    weights = {k: v.float() for k, v in load_file(str(ASSETS_DIR / MODEL_WEIGHTS_FILE)).items()}
    result = model.load_state_dict(weights, strict=False)
    parameters = {name for name, _ in model.named_parameters()}
    missing = parameters.intersection(result.missing_keys)
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"{ASSETS_DIR / MODEL_WEIGHTS_FILE} does not match {MODEL_RECORD_FILE}: missing "
            f"{sorted(missing)}, unexpected {sorted(result.unexpected_keys)}"
        )
    model.to(device)
    model.eval()
    return model


@torch.no_grad()
def mean_token_loss(model: Any, tokens: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats) over every predicted position of `tokens` [rows, ctx]."""
    total, count = 0.0, 0
    for start in range(0, len(tokens), batch_size):
        batch = tokens[start : start + batch_size].to(model.cfg.device)
        per_token = model(batch, return_type="loss", loss_per_token=True)
        total += float(per_token.sum())
        count += per_token.numel()
    return total / count


def tokens_sha256(tokens: torch.Tensor) -> str:
    """Fingerprint of a token matrix: tells whether this interpreter's stdlib gives the very rows
    a recorded loss was measured on."""
    return hashlib.sha256(tokens.to(torch.int64).numpy().tobytes()).hexdigest()
