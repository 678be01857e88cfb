"""The embedded language model and its corpus (the standard library's sources): the offline model
that the tests, the demo, `eval`, `compare` and `dashboard` use without a model hub."""

from sae_lens_allocation.embedded.corpus import corpus_dataset, corpus_files
from sae_lens_allocation.embedded.model import (
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
