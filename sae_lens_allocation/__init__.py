"""sae-lens-allocation: Mutual Choice, Feature Choice and Gradient TopK SAEs for SAELens.

Importing this package registers every plugin architecture with SAELens' registry, so
`architecture: mutual_choice` (etc.) works in any SAELens config, loader or runner afterwards.
"""

from sae_lens_allocation.loading import load_sae
from sae_lens_allocation.registration import register_architecture, registered_architectures

_PLUGIN_CLASSES: tuple[tuple[str, type, type, type | None, type | None], ...] = ()

for _name, _train_cls, _train_cfg, _inf_cls, _inf_cfg in _PLUGIN_CLASSES:
    register_architecture(_name, _train_cls, _train_cfg, _inf_cls, _inf_cfg)

ARCHITECTURES: tuple[str, ...] = tuple(entry[0] for entry in _PLUGIN_CLASSES)

__all__ = [
    "ARCHITECTURES",
    "load_sae",
    "register_architecture",
    "registered_architectures",
]
