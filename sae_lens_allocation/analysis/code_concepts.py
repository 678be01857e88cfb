"""Per-token labels of Python code concepts, for sparse probing on the embedded corpus (the
standard library's sources; `probing.py`).

Every character of a source file gets a yes/no label per concept, from the standard library's
`tokenize` (lexical concepts) and `ast` (regions):

    keyword     a NAME token that `keyword.iskeyword` accepts (soft keywords such as `match` are names)
    name        any other NAME token
    string      a STRING token (and 3.12's FSTRING_START / _MIDDLE / _END)
    comment     a COMMENT token
    number      a NUMBER token
    operator    an OP token (punctuation and operators)
    docstring   the first statement of a module, class or function when it is a string literal
    def_body    the body of a `def` / `async def`, from its first statement to its last one's end
    indent_gt1  a token on a line indented more than one level (tokenize's INDENT/DEDENT depth > 1)

A language-model token, given by its character span [start, end) (the tokenizer's offset
mapping), takes the labels of its first non-whitespace character, or of its first character
when it is all whitespace; so " def" is a keyword and the indentation before a docstring line
counts as docstring but not as string (a string token starts at its quote).
"""

from __future__ import annotations

import ast
import io
import keyword
import tokenize
from typing import Any

import torch

CONCEPTS = ("keyword", "name", "string", "comment", "number", "operator", "docstring", "def_body",
            "indent_gt1")
_STRING_TYPES = {"STRING", "FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END"}
_LEXICAL = {"COMMENT": "comment", "NUMBER": "number", "OP": "operator"}


def normalise_newlines(text: str) -> str:
    """`\\r\\n` and `\\r` as `\\n`, so that `tokenize`, `ast` and character offsets count lines alike."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _line_starts(text: str) -> list[int]:
    starts = [0]
    for line in io.StringIO(text).readlines():
        starts.append(starts[-1] + len(line))
    return starts


def char_labels(text: str) -> torch.Tensor | None:
    """[len(text), len(CONCEPTS)] bool labels of every character of `text` (newlines normalised
    first, `normalise_newlines`); None when `tokenize` or `ast` rejects the text."""
    text = normalise_newlines(text)
    starts = _line_starts(text)
    lines = io.StringIO(text).readlines()
    labels = torch.zeros(len(text), len(CONCEPTS), dtype=torch.bool)
    col = {name: i for i, name in enumerate(CONCEPTS)}

    def offset(row: int, column: int) -> int:
        return starts[row - 1] + column

    def byte_offset(row: int, byte_col: int) -> int:
        # ast gives UTF-8 byte columns; tokenize gives character columns.
        line = lines[row - 1] if row - 1 < len(lines) else ""
        return starts[row - 1] + len(line.encode("utf-8")[:byte_col].decode("utf-8", errors="replace"))

    try:
        tree = ast.parse(text)
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (SyntaxError, tokenize.TokenError, ValueError):
        return None
    depth = 0
    for tok in tokens:
        kind = tokenize.tok_name[tok.type]
        if kind == "INDENT":
            depth += 1
            continue
        if kind == "DEDENT":
            depth -= 1
            continue
        if kind in {"NEWLINE", "NL", "ENDMARKER", "ENCODING"}:
            continue
        span = slice(offset(*tok.start), offset(*tok.end))
        if kind == "NAME":
            labels[span, col["keyword" if keyword.iskeyword(tok.string) else "name"]] = True
        elif kind in _STRING_TYPES:
            labels[span, col["string"]] = True
        elif kind in _LEXICAL:
            labels[span, col[_LEXICAL[kind]]] = True
        if depth > 1:
            labels[span, col["indent_gt1"]] = True
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) or not node.body:
            continue
        first, last = node.body[0], node.body[-1]
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
            labels[byte_offset(first.lineno, first.col_offset):byte_offset(
                first.end_lineno or first.lineno, first.end_col_offset or 0), col["docstring"]] = True
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            labels[byte_offset(first.lineno, first.col_offset):byte_offset(
                last.end_lineno or last.lineno, last.end_col_offset or 0), col["def_body"]] = True
    return labels


def token_labels(text: str, tokenizer: Any) -> tuple[list[int], torch.Tensor] | None:
    """The ids of `text` (newlines normalised, no special tokens) under a fast tokenizer and their
    [n_tokens, len(CONCEPTS)] labels (module docstring); None when the text does not parse."""
    text = normalise_newlines(text)
    chars = char_labels(text)
    if chars is None:
        return None
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, spans = encoded["input_ids"], encoded["offset_mapping"]
    picks = []
    for start, end in spans:
        inner = text[start:end]
        stripped = len(inner) - len(inner.lstrip())
        picks.append(min(start + (stripped if stripped < len(inner) else 0), max(len(text) - 1, 0)))
    return list(ids), chars[torch.tensor(picks, dtype=torch.long)] if picks else chars[:0]
