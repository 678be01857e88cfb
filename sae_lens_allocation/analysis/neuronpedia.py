"""The Neuronpedia batch JSON of a dashboard, and what it records about the SAE.

`neuronpedia_batch` is sae-dashboard's `NeuronpediaConverter.convert_to_np_json` output (token
strings as sae-dashboard's `NeuronpediaRunner` writes them, `layer` from the hook name) plus a
`metadata` object: the SAE's inference architecture and the architecture it was trained as
(`metadata.training_architecture`, which SAELens records on export), so a Mutual Choice export is
recorded as `mutual_choice` though it loads as `jumprelu`.
"""

from __future__ import annotations

import json
import re
from typing import Any

from sae_lens_allocation.validation import UsageError

NEURONPEDIA_NAME = "neuronpedia/batch-0.json"

# Token strings for the Neuronpedia JSON, as sae-dashboard's NeuronpediaRunner writes them
# (copied: importing the runner module pulls in wandb).
_NP_TOKEN_REPLACEMENTS = {
    "âĢĶ": "—",
    "âĢĵ": "–",
    "âĢľ": "“",
    "âĢĿ": "”",
    "âĢĺ": "‘",
    "âĢĻ": "’",
    "âĢĭ": " ",
    "Ġ": " ",
    "Ċ": "\n",
    "ĉ": "\t",
}
_NP_OUT_OF_RANGE_TOKEN = "<|outofrange|>"


def sae_architecture(sae: Any) -> str:
    """The SAE's architecture name (SAELens 6 configs give it by a method, `cfg.architecture()`)."""
    arch = sae.cfg.architecture
    return arch() if callable(arch) else str(arch)


def training_architecture(sae: Any) -> str:
    """The architecture the SAE was trained as (`metadata.training_architecture`, which SAELens
    records on export), else its own architecture."""
    return str(sae.cfg.metadata.training_architecture or sae_architecture(sae))



def hook_layer(hook_name: str) -> int:
    """The block a hook `blocks.<layer>.<...>` is in: Neuronpedia's `layer`, and the block after
    which the model can stop when only the SAE's input is needed."""
    match = re.match(r"blocks\.(\d+)\.", hook_name)
    if match is None:
        raise UsageError(
            f"hook_name={hook_name!r} is not supported: sae-dashboard needs a hook inside a "
            "block, 'blocks.<layer>.<...>'"
        )
    return int(match.group(1))


def sae_metadata(sae: Any) -> dict[str, Any]:
    """What the dashboard records about the SAE (the Neuronpedia JSON's `metadata`)."""
    meta = sae.cfg.metadata
    out = {
        "architecture": sae_architecture(sae),
        "training_architecture": training_architecture(sae),
        "training_architecture_details": meta.training_architecture_details,
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        "model_name": meta.model_name,
        "hook_name": meta.hook_name,
        "sae_lens_version": meta.sae_lens_version,
        "sae_lens_training_version": meta.sae_lens_training_version,
    }
    return {k: v for k, v in out.items() if v is not None}


def neuronpedia_vocab(model: Any) -> dict[int, str]:
    """Token id -> string as sae-dashboard's NeuronpediaRunner builds it (vocab strings with the
    byte-level markers replaced, ids past the tokenizer padded with an out-of-range marker)."""
    vocab: dict[int, str] = {}
    for token, idx in model.tokenizer.vocab.items():
        for old, new in _NP_TOKEN_REPLACEMENTS.items():
            token = token.replace(old, new)
        vocab[idx] = token
    for idx in range(len(vocab), model.cfg.d_vocab):
        vocab[idx] = _NP_OUT_OF_RANGE_TOKEN
    return vocab


def neuronpedia_batch(
    vis_data: Any,
    model: Any,
    sae: Any,
    sae_set: str,
    n_prompts: int,
    context_size: int,
    dataset_name: str,
    extra_metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """sae-dashboard's `NeuronpediaConverter.convert_to_np_json` output as a dict, with a
    `metadata` object: `sae_metadata(sae)` (architecture, training_architecture, ...) plus
    `extra_metadata`."""
    from sae_dashboard.neuronpedia.neuronpedia_converter import NeuronpediaConverter
    from sae_dashboard.neuronpedia.neuronpedia_runner_config import NeuronpediaRunnerConfig

    hook = sae.cfg.metadata.hook_name
    np_cfg = NeuronpediaRunnerConfig(
        sae_set=sae_set,
        sae_path="",
        outputs_dir="",
        huggingface_dataset_path=dataset_name,
        n_prompts_total=n_prompts,
        n_tokens_in_prompt=context_size,
        model_id=sae.cfg.metadata.model_name or model.cfg.model_name,
        layer=hook_layer(hook),
    )
    batch = json.loads(NeuronpediaConverter.convert_to_np_json(model, vis_data, np_cfg, neuronpedia_vocab(model)))
    batch["metadata"] = {**sae_metadata(sae), **(extra_metadata or {})}
    return batch
