"""The one shape of user error: `UsageError`, a `ValueError` whose message is one line for the user.

`field_error` names the field, its value and what is allowed; `reject_unknown_keys` names a key no
field receives; `one_line` flattens any message to one line. The CLI prints any `UsageError` as
one line on stderr and exits with code 2; every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any


class UsageError(ValueError):
    """A mistake in the user's input (config, flag, file, data), reported as one line."""


def field_error(field: str, value: Any, allowed: str) -> UsageError:
    return UsageError(f"{field}={value!r} is not allowed: {allowed}")


def is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def one_line(message: object) -> str:
    """A message or an exception as one line: whitespace and line breaks collapsed; an exception
    with an empty message gives its type name (SAELens raises some bare `KeyError`s)."""
    text = " ".join(str(message).split())
    if not text and isinstance(message, BaseException):
        return type(message).__name__
    return text


def reject_unknown_keys(
    mapping: Mapping[Any, Any],
    allowed: Iterable[str],
    where: str = "config",
    prefix: str = "",
    note: str = "",
    error: Callable[[str], Exception] = UsageError,
) -> None:
    """Raise `error("unknown {where} key {prefix}{key} {note}; allowed: ...")` for the first
    unknown key (sorted), listing every allowed one: a key no dataclass field receives would
    otherwise be dropped, and the run would use the default (SAELens' `from_dict` drops unknown
    `sae` keys). `prefix` locates the section (`sae.`), `note` says whose fields are allowed."""
    allowed = set(allowed)
    unknown = sorted((key for key in mapping if key not in allowed), key=str)
    if unknown:
        note = f" {note}" if note else ""
        raise error(f"unknown {where} key {prefix}{unknown[0]}{note}; allowed: {', '.join(sorted(allowed))}")


# Runner fields (SAELens `LanguageModelSAERunnerConfig`) and what each allows. SAELens checks few
# of them: a string `lr` fails in its `__post_init__` with a TypeError naming no field, a batch of
# 0 tokens fails at step 1.
_POSITIVE_INTS = (
    "context_size", "training_tokens", "train_batch_size_tokens", "store_batch_size_prompts",
    "n_batches_in_buffer", "dead_feature_window", "feature_sampling_window",
    "n_batches_for_norm_estimate",
)
_NON_NEGATIVE_INTS = ("n_checkpoints", "lr_warm_up_steps", "lr_decay_steps", "n_eval_batches")
_STRINGS = ("model_name", "hook_name", "dataset_path", "device", "model_class_name", "dtype")


def check_device(name: str, device: Any) -> None:
    """Raise `UsageError` when `device` is not a torch device this machine has: a CUDA device on a
    torch build without CUDA (or without that many GPUs), `mps` where MPS is unavailable. Torch
    would fail later with a traceback (an AssertionError in SAELens, a pin_memory RuntimeError)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise field_error(name, device, "a torch device, e.g. cpu, cuda, cuda:1 or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise field_error(name, device, f"this torch ({torch.__version__}) has no CUDA device "
                              "(torch.cuda.is_available() is False); use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise field_error(name, device, f"this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise field_error(name, device, "MPS is not available here (torch.backends.mps.is_available() "
                          "is False); use cpu")


def check_bool_fields(mapping: Mapping[Any, Any], cls: type, prefix: str = "") -> None:
    """Raise `UsageError` for a value of a `bool` field of dataclass `cls` that is not a YAML
    boolean: a quoted "false" is a non-empty string, which Python would read as true."""
    import dataclasses

    for f in dataclasses.fields(cls):
        if f.type in (bool, "bool") and f.name in mapping and not isinstance(mapping[f.name], bool):
            raise field_error(f"{prefix}{f.name}", mapping[f.name], "true or false (unquoted)")


def _get(section: Any, name: str, default: Any = None) -> Any:
    if isinstance(section, dict):
        return section.get(name, default)
    return getattr(section, name, default)


def check_runner_fields(cfg: Any, dataset_given: bool = False) -> None:
    """Raise `UsageError` for the first runner field with a wrong type or range.

    `cfg` is a runner config dict (before `from_dict`) or a `LanguageModelSAERunnerConfig`.
    Absent keys keep SAELens' defaults and are not checked. With `dataset_given` (the caller
    passes `override_dataset`, as to SAELens' runner) `dataset_path` may be SAELens' default
    `''`: nothing is read from it.
    """
    missing = object()

    def value(name: str) -> Any:
        return _get(cfg, name, missing)

    for name in _POSITIVE_INTS:
        v = value(name)
        if v is not missing and not (is_int(v) and v >= 1):
            raise field_error(name, v, "an integer >= 1")
    for name in _NON_NEGATIVE_INTS:
        v = value(name)
        if v is not missing and not (is_int(v) and v >= 0):
            raise field_error(name, v, "an integer >= 0")
    seed = value("seed")
    if seed is not missing and not is_int(seed):
        raise field_error("seed", seed, "an integer")
    for name in _STRINGS:
        v = value(name)
        if name == "dataset_path" and dataset_given and v == "":
            continue
        if v is not missing and not (isinstance(v, str) and v):
            allowed = "a non-empty string"
            if name == "dataset_path":
                allowed += " (or '' with an override_dataset)"
            raise field_error(name, v, allowed)
    lr = value("lr")
    if lr is not missing and not (is_finite_number(lr) and lr > 0):
        raise field_error("lr", lr, "a finite number > 0, e.g. 3e-4")
    lr_end = value("lr_end")
    if lr_end not in (missing, None) and not (is_finite_number(lr_end) and lr_end >= 0):
        raise field_error("lr_end", lr_end, "null (lr / 10) or a finite number >= 0")
    for name in ("adam_beta1", "adam_beta2"):
        v = value(name)
        if v is not missing and not (is_finite_number(v) and 0 <= v < 1):
            raise field_error(name, v, "a number with 0 <= beta < 1")
    for name, low, high in (("activations_mixing_fraction", 0, 1), ("dead_feature_threshold", 0, math.inf)):
        v = value(name)
        if v is not missing and not (is_finite_number(v) and low <= v <= high):
            raise field_error(name, v, f"a number in [{low}, {high}]")
    eval_prompts = value("eval_batch_size_prompts")
    if eval_prompts not in (missing, None) and not (is_int(eval_prompts) and eval_prompts >= 1):
        raise field_error("eval_batch_size_prompts", eval_prompts, "null or an integer >= 1")
    head = value("hook_head_index")
    if head not in (missing, None) and not (is_int(head) and head >= 0):
        raise field_error("hook_head_index", head, "null or an integer >= 0")
    sae = value("sae")
    if sae is not missing:
        for name in ("d_in", "d_sae"):
            v = _get(sae, name, missing)
            if v is not missing and not (is_int(v) and v >= 1):
                raise field_error(f"sae.{name}", v, "an integer >= 1")
    batch, ctx, buffers, tokens = (
        value("train_batch_size_tokens"), value("context_size"), value("n_batches_in_buffer"),
        value("training_tokens"),
    )
    if missing not in (batch, ctx, buffers) and buffers * ctx < batch:
        # SAELens' shuffle buffer holds n_batches_in_buffer * context_size rows; it fails at step 1.
        raise field_error(
            "n_batches_in_buffer", buffers,
            f"n_batches_in_buffer * context_size >= train_batch_size_tokens ({buffers} * {ctx} < "
            f"{batch}); use n_batches_in_buffer >= {math.ceil(batch / ctx)}",
        )
    if missing not in (batch, tokens) and tokens < batch:
        raise field_error(
            "training_tokens", tokens, f"at least one batch (train_batch_size_tokens={batch})"
        )
