"""Idempotent registration of plugin architectures with SAELens' own registry.

SAELens' `register_sae_training_class` / `register_sae_class` raise on a second registration of a
name, and SAELens has no entry-point discovery, so the plugin registers on import and must survive
being imported twice, `importlib.reload`, and `python -m sae_lens_allocation`.
"""

from __future__ import annotations

from typing import Any

from sae_lens import register_sae_class, register_sae_training_class
from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY

PLUGIN_PACKAGE = "sae-lens-allocation"


def _same_class(a: type, b: type) -> bool:
    # A reloaded module re-creates its classes; identity by qualified name keeps reload harmless.
    return (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def _register(
    registry: dict[str, tuple[Any, Any]],
    register_fn: Any,
    name: str,
    classes: tuple[type, type],
) -> None:
    existing = registry.get(name)
    if existing is not None:
        if all(_same_class(old, new) for old, new in zip(existing, classes)):
            if existing != classes:
                del registry[name]
                register_fn(name, *classes)
            return
        raise ValueError(
            f"architecture {name!r} is already registered by {existing[0].__module__}."
            f"{existing[0].__qualname__}; {PLUGIN_PACKAGE} cannot register "
            f"{classes[0].__module__}.{classes[0].__qualname__} under the same name"
        )
    register_fn(name, *classes)


def register_architecture(
    name: str,
    training_sae_class: type,
    training_cfg_class: type,
    sae_class: type | None = None,
    sae_cfg_class: type | None = None,
) -> None:
    """Register a training architecture (and optionally its inference class) with SAELens.

    Registering the same classes again is a no-op; a name held by a different class raises
    `ValueError`.
    """
    _register(
        SAE_TRAINING_CLASS_REGISTRY,
        register_sae_training_class,
        name,
        (training_sae_class, training_cfg_class),
    )
    if sae_class is not None and sae_cfg_class is not None:
        _register(SAE_CLASS_REGISTRY, register_sae_class, name, (sae_class, sae_cfg_class))


def plugin_architectures() -> tuple[str, ...]:
    """Training architectures whose classes this package provides, in registration order
    (derived from SAELens' registry, so it needs no import of the architectures themselves)."""
    package = __name__.rpartition(".")[0] + "."
    return tuple(
        name
        for name, (sae_class, _) in SAE_TRAINING_CLASS_REGISTRY.items()
        if sae_class.__module__.startswith(package)
    )


def registered_architectures() -> dict[str, list[str]]:
    """Names SAELens can resolve right now: {"training": [...], "inference": [...]}."""
    return {
        "training": sorted(SAE_TRAINING_CLASS_REGISTRY),
        "inference": sorted(SAE_CLASS_REGISTRY),
    }
