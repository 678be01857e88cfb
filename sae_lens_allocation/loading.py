"""Load any SAE this plugin writes: inference exports and training checkpoints alike.

A folder that cannot be loaded is a `UsageError` naming the file and what is wrong with it
(missing, empty, truncated or corrupted, or weights whose shapes disagree with cfg.json), checked
before SAELens' loader runs, whose own errors name no file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sae_lens import SAE, TrainingSAE
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY

from sae_lens_allocation.registration import PLUGIN_PACKAGE, plugin_architectures
from sae_lens_allocation.validation import UsageError, one_line

# Written by SAELens' trainer into every training checkpoint, never into an export.
TRAINER_STATE_FILENAME = "trainer_state.pt"
# Checkpoints are written under <checkpoint_path>/.incomplete/ and exports into a hidden sibling
# `.<name>.incomplete-<pid>`, then renamed into place when complete (training/resume.py).
INCOMPLETE_DIRNAME = ".incomplete"


def is_incomplete(path: str | Path) -> bool:
    """True inside a checkpoint or export that is still being written (or whose writer died)."""
    return any(
        part == INCOMPLETE_DIRNAME or (part.startswith(".") and ".incomplete-" in part)
        for part in Path(path).resolve().parts
    )


def unknown_architecture_message(name: str, where: str) -> str:
    known = sorted(set(SAE_CLASS_REGISTRY) | set(SAE_TRAINING_CLASS_REGISTRY))
    return (
        f"unknown SAE architecture {name!r} in {where}. Registered architectures: "
        f"{', '.join(known)}. Plugin architectures ({', '.join(plugin_architectures()) or 'none'}) are "
        f"provided by the {PLUGIN_PACKAGE} package (import sae_lens_allocation); other plugin "
        f"names need their own package imported first."
    )


def read_sae_cfg(path: str | Path) -> dict[str, Any]:
    """cfg.json of an SAE folder; `UsageError` when the folder or the file is missing or broken."""
    path = Path(path)
    if path.is_file():
        raise UsageError(f"{path} is a file; give the SAE folder that holds cfg.json and the weights: {path.parent}")
    if not path.is_dir():
        raise UsageError(f"SAE folder {path} does not exist")
    if is_incomplete(path):
        raise UsageError(
            f"{path} is a checkpoint or export that was never completed (its writer stopped "
            "before renaming it into place); use a finished one"
        )
    cfg_path = path / SAE_CFG_FILENAME
    if not cfg_path.is_file():
        raise UsageError(f"no {SAE_CFG_FILENAME} in {path}: not an SAE folder")
    text = cfg_path.read_text(errors="replace")
    if not text.strip():
        raise UsageError(f"{cfg_path} is empty: the SAE was not written completely")
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError(
            f"{cfg_path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}): "
            "truncated or corrupted"
        ) from None
    if not isinstance(cfg, dict):
        raise UsageError(f"{cfg_path} must hold a JSON object, got {type(cfg).__name__}")
    for name in ("architecture", "d_in", "d_sae"):
        if name not in cfg:
            raise UsageError(f"{cfg_path} has no {name!r} field: not an SAE config")
    return cfg


def check_sae_weights(path: str | Path, cfg: dict[str, Any]) -> None:
    """The weights file exists, parses as safetensors, and its W_enc / W_dec shapes are
    [d_in, d_sae] / [d_sae, d_in] as cfg.json says."""
    # Older safetensors stubs lack SafetensorError and the context manager; newer ones have both.
    from safetensors import SafetensorError, safe_open  # type: ignore[attr-defined, unused-ignore]

    weights = Path(path) / SAE_WEIGHTS_FILENAME
    if not weights.is_file():
        raise UsageError(f"no {SAE_WEIGHTS_FILENAME} in {path}: the SAE has no weights")
    if weights.stat().st_size == 0:
        raise UsageError(f"{weights} is empty: the SAE was not written completely")
    try:
        with safe_open(str(weights), framework="pt") as f:  # type: ignore[attr-defined, unused-ignore]
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise UsageError(
            f"{weights} is not a readable safetensors file ({one_line(err)}): truncated or corrupted"
        ) from None
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    expected = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in)}
    for name, shape in expected.items():
        if name in shapes and shapes[name] != shape:
            raise UsageError(
                f"{weights} does not match {Path(path) / SAE_CFG_FILENAME}: {name} has shape "
                f"{list(shapes[name])}, but d_in={d_in}, d_sae={d_sae} needs {list(shape)}"
            )


def is_training_checkpoint(cfg: dict[str, Any]) -> bool:
    """A training checkpoint's cfg.json is a TrainingSAEConfig dump: it names a training-only
    architecture or carries `decoder_init_norm`, a field only TrainingSAEConfig has."""
    arch = cfg.get("architecture")
    return arch not in SAE_CLASS_REGISTRY or "decoder_init_norm" in cfg


def load_sae(path: str | Path, device: str = "cpu") -> SAE[Any]:
    """Load an SAE folder written by SAELens or this plugin.

    Inference exports (`jumprelu`, `topk`, ...) load as SAELens inference SAEs; training
    checkpoints (`mutual_choice`, ...) load as the registered training SAE. An architecture nobody
    registered, or a missing, empty, truncated or mismatched file, raises `UsageError` naming it.
    """
    cfg = read_sae_cfg(path)
    arch = cfg.get("architecture")
    if arch not in SAE_CLASS_REGISTRY and arch not in SAE_TRAINING_CLASS_REGISTRY:
        raise UsageError(unknown_architecture_message(str(arch), str(Path(path) / SAE_CFG_FILENAME)))
    check_sae_weights(path, cfg)
    loader = TrainingSAE if is_training_checkpoint(cfg) else SAE
    try:
        return loader.load_from_disk(path, device=device)
    except RuntimeError as err:
        # torch's load_state_dict: missing, unexpected or mis-shaped tensors.
        if "state_dict" not in str(err):
            raise
        raise UsageError(
            f"{Path(path) / SAE_WEIGHTS_FILENAME} does not fit the {arch} architecture of "
            f"{Path(path) / SAE_CFG_FILENAME}: {one_line(err)[:300]}"
        ) from None
