"""The demo corpus: the standard library's own Python sources, read from the running interpreter.

Every Python installation carries this text (code, comments, docstrings), so the demo needs no
download. The files are split into a train and a held-out part by a stable hash of their path
relative to the stdlib folder (project definition):

    heldout  <=>  int(sha256(relative_posix_path)[:8 bytes], big endian) / 2**64 < HELDOUT_FRACTION

so a file keeps its side of the split on every machine and every Python version that has it.

Token rows follow SAELens' pretokenization convention (`begin_batch_token="bos"`,
`sequence_separator_token="bos"`): files are concatenated into one stream with the BOS token
between them, and every row is `[BOS] + context_size - 1` tokens of that stream. The embedded model
was trained on rows of exactly this form.
"""

from __future__ import annotations

import hashlib
import os
import random
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

SPLITS = ("train", "heldout")
HELDOUT_FRACTION = 0.05

# Test suites, the IDLE application, installed third-party packages, generated codec tables
# (`encodings`) and the generated help-text dump (`pydoc_data`) are not representative source.
EXCLUDED_DIRS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "site-packages",
        "dist-packages",
        "__pycache__",
        "encodings",
        "pydoc_data",
    }
)

# Files are tokenised in groups of this many (the tokenizer encodes a group in one call).
_ENCODE_GROUP = 32


def stdlib_root() -> Path:
    """The running interpreter's standard library folder (`sysconfig.get_paths()["stdlib"]`)."""
    return Path(sysconfig.get_paths()["stdlib"])


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not allowed; use one of {', '.join(SPLITS)}")


def split_of(relative_path: str) -> str:
    """'heldout' or 'train' for a path relative to the stdlib root, by the hash rule above."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "heldout" if u < HELDOUT_FRACTION else "train"


def corpus_files(split: str = "train") -> list[Path]:
    """The `.py` files of one split, sorted by their relative POSIX path."""
    _check_split(split)
    root = stdlib_root()
    rels = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in EXCLUDED_DIRS]  # prune: the test suite is huge
        base = Path(folder).relative_to(root)
        rels += [(base / n).as_posix() for n in names if n.endswith(".py")]
    return [root / rel for rel in sorted(rels) if split_of(rel) == split]


def read_source(path: Path) -> str:
    """A source file's text; undecodable bytes (none in a normal stdlib) become U+FFFD."""
    return path.read_bytes().decode("utf-8", errors="replace")


def resolve_tokenizer(tokenizer_or_model: Any) -> Any:
    """The tokenizer itself, or the `.tokenizer` of a HookedTransformer."""
    tokenizer = getattr(tokenizer_or_model, "tokenizer", tokenizer_or_model)
    if tokenizer is None or not callable(tokenizer) or getattr(tokenizer, "bos_token_id", None) is None:
        raise ValueError(
            f"tokenizer_or_model={type(tokenizer_or_model).__name__} is not allowed; pass a "
            "tokenizer with a BOS token or a model whose `.tokenizer` has one"
        )
    return tokenizer


def iter_token_stream(tokenizer: Any, files: Iterable[Path]) -> Iterator[int]:
    """Token ids of the files in order, each file followed by the BOS token (the separator)."""
    bos = tokenizer.bos_token_id
    group: list[Path] = []

    def encode(paths: list[Path]) -> Iterator[int]:
        encoded = tokenizer([read_source(p) for p in paths], add_special_tokens=False)
        for ids in encoded["input_ids"]:
            yield from ids
            yield bos

    for path in files:
        group.append(path)
        if len(group) == _ENCODE_GROUP:
            yield from encode(group)
            group = []
    if group:
        yield from encode(group)


def token_stream(tokenizer_or_model: Any, split: str = "train") -> list[int]:
    """The whole split as one token stream, files in sorted order (used for training)."""
    _check_split(split)
    return list(iter_token_stream(resolve_tokenizer(tokenizer_or_model), corpus_files(split)))


def corpus_dataset(
    tokenizer_or_model: Any,
    split: str = "train",
    context_size: int = 128,
    n_rows: int | None = None,
    seed: int = 0,
) -> Any:
    """A pretokenized `datasets.Dataset` (`tokens` column) for SAELens' `override_dataset`.

    Files of `split` are taken in an order shuffled by `seed` and tokenised only until `n_rows`
    rows are filled (all rows the split gives when `n_rows` is None). Each row is
    `[BOS] + context_size - 1` consecutive stream tokens, so it can be used with
    `prepend_bos=False` semantics: SAELens uses pretokenized rows as they are.
    """
    from datasets import Dataset

    _check_split(split)
    if not isinstance(context_size, int) or context_size < 2:
        raise ValueError(f"context_size={context_size!r} is not allowed; use an int >= 2")
    if n_rows is not None and (not isinstance(n_rows, int) or n_rows < 1):
        raise ValueError(f"n_rows={n_rows!r} is not allowed; use None or an int >= 1")
    tokenizer = resolve_tokenizer(tokenizer_or_model)
    files = corpus_files(split)
    random.Random(seed).shuffle(files)

    body = context_size - 1
    rows: list[list[int]] = []
    chunk: list[int] = []
    for tok in iter_token_stream(tokenizer, files):
        chunk.append(tok)
        if len(chunk) == body:
            rows.append([tokenizer.bos_token_id, *chunk])
            chunk = []
            if n_rows is not None and len(rows) == n_rows:
                break
    if n_rows is not None and len(rows) < n_rows:
        raise ValueError(
            f"n_rows={n_rows} is not allowed for split={split!r} with context_size={context_size}: "
            f"this interpreter's stdlib gives only {len(rows)} rows"
        )
    return Dataset.from_dict({"tokens": rows})
