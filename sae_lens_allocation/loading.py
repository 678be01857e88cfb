"""Load any SAE this plugin writes: inference exports and training checkpoints alike."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sae_lens import SAE, TrainingSAE
from sae_lens.constants import SAE_CFG_FILENAME
from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY

from sae_lens_allocation.registration import PLUGIN_PACKAGE, plugin_architectures


def unknown_architecture_message(name: str, where: str) -> str:
    known = sorted(set(SAE_CLASS_REGISTRY) | set(SAE_TRAINING_CLASS_REGISTRY))
    return (
        f"unknown SAE architecture {name!r} in {where}. Registered architectures: "
        f"{', '.join(known)}. Plugin architectures ({', '.join(plugin_architectures()) or 'none'}) are "
        f"provided by the {PLUGIN_PACKAGE} package (import sae_lens_allocation); other plugin "
        f"names need their own package imported first."
    )


def read_sae_cfg(path: str | Path) -> dict[str, Any]:
    cfg_path = Path(path) / SAE_CFG_FILENAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"no {SAE_CFG_FILENAME} in {path}: not an SAE folder")
    with open(cfg_path) as f:
        return json.load(f)


def is_training_checkpoint(cfg: dict[str, Any]) -> bool:
    """A training checkpoint's cfg.json is a TrainingSAEConfig dump: it names a training-only
    architecture or carries `decoder_init_norm`, a field only TrainingSAEConfig has."""
    arch = cfg.get("architecture")
    return arch not in SAE_CLASS_REGISTRY or "decoder_init_norm" in cfg


def load_sae(path: str | Path, device: str = "cpu") -> SAE[Any]:
    """Load an SAE folder written by SAELens or this plugin.

    Inference exports (`jumprelu`, `topk`, ...) load as SAELens inference SAEs; training
    checkpoints (`mutual_choice`, ...) load as the registered training SAE. An architecture nobody
    registered raises `ValueError` naming the registered ones.
    """
    cfg = read_sae_cfg(path)
    arch = cfg.get("architecture")
    if arch not in SAE_CLASS_REGISTRY and arch not in SAE_TRAINING_CLASS_REGISTRY:
        raise ValueError(unknown_architecture_message(str(arch), str(Path(path) / SAE_CFG_FILENAME)))
    if is_training_checkpoint(cfg):
        return TrainingSAE.load_from_disk(path, device=device)
    return SAE.load_from_disk(path, device=device)
