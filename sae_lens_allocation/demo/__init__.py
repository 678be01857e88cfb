"""The offline demo's embedded language model and its corpus (the standard library's sources)."""

from sae_lens_allocation.demo.corpus import corpus_dataset, corpus_files
from sae_lens_allocation.demo.model import (
    DEFAULT_HOOK_NAME,
    EMBEDDED_MODEL_NAME,
    embedded_model_record,
    load_embedded_model,
    load_embedded_tokenizer,
)

__all__ = [
    "DEFAULT_HOOK_NAME",
    "EMBEDDED_MODEL_NAME",
    "corpus_dataset",
    "corpus_files",
    "embedded_model_record",
    "load_embedded_model",
    "load_embedded_tokenizer",
]
