"""sae-lens-allocation: Mutual Choice, Feature Choice and Gradient TopK SAEs for SAELens.

Importing this package registers every plugin architecture with SAELens' registry, so
`architecture: mutual_choice` (etc.) works in any SAELens config, loader or runner afterwards.
"""

from sae_lens_allocation.loading import load_sae
from sae_lens_allocation.registration import register_architecture, registered_architectures
from sae_lens_allocation.saes.aux_losses import AUX_LOSSES, register_aux_loss
from sae_lens_allocation.saes.batch_allocation import calibrate
from sae_lens_allocation.saes.feature_choice import FeatureChoiceTrainingSAE, FeatureChoiceTrainingSAEConfig
from sae_lens_allocation.saes.gradient_topk import GradientTopKTrainingSAE, GradientTopKTrainingSAEConfig
from sae_lens_allocation.saes.mutual_choice import MutualChoiceTrainingSAE, MutualChoiceTrainingSAEConfig
from sae_lens_allocation.saes.topk_aux import TopKAuxTrainingSAE, TopKAuxTrainingSAEConfig
from sae_lens_allocation.training.distributed import train_data_parallel
from sae_lens_allocation.training.gradients import GradientActivationsStore, activation_gradients
from sae_lens_allocation.training.latent_shard_runner import train_latent_sharded
from sae_lens_allocation.training.multi_runner import build_multi_runner, train_multi
from sae_lens_allocation.training.runner import build_runner, train

# (name, training SAE, training config, inference SAE, inference config); the inference classes
# are None where the export is a SAELens built-in (jumprelu, topk).
_PLUGIN_CLASSES: tuple[tuple[str, type, type, type | None, type | None], ...] = (
    ("mutual_choice", MutualChoiceTrainingSAE, MutualChoiceTrainingSAEConfig, None, None),
    ("feature_choice", FeatureChoiceTrainingSAE, FeatureChoiceTrainingSAEConfig, None, None),
    ("gradient_topk", GradientTopKTrainingSAE, GradientTopKTrainingSAEConfig, None, None),
    ("topk_aux", TopKAuxTrainingSAE, TopKAuxTrainingSAEConfig, None, None),
)

for _name, _train_cls, _train_cfg, _inf_cls, _inf_cfg in _PLUGIN_CLASSES:
    register_architecture(_name, _train_cls, _train_cfg, _inf_cls, _inf_cfg)

ARCHITECTURES: tuple[str, ...] = tuple(entry[0] for entry in _PLUGIN_CLASSES)

__all__ = [
    "ARCHITECTURES",
    "AUX_LOSSES",
    "FeatureChoiceTrainingSAE",
    "GradientActivationsStore",
    "GradientTopKTrainingSAE",
    "GradientTopKTrainingSAEConfig",
    "FeatureChoiceTrainingSAEConfig",
    "MutualChoiceTrainingSAE",
    "MutualChoiceTrainingSAEConfig",
    "activation_gradients",
    "build_multi_runner",
    "build_runner",
    "calibrate",
    "load_sae",
    "register_architecture",
    "register_aux_loss",
    "registered_architectures",
    "TopKAuxTrainingSAE",
    "TopKAuxTrainingSAEConfig",
    "train",
    "train_data_parallel",
    "train_latent_sharded",
    "train_multi",
]
