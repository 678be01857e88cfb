"""`train` for a latent-sharded SAE under torchrun (docs/distributed.md#latent-sharding).

`torchrun --nproc-per-node W -m sae_lens_allocation train CONFIG` with `sae.latent_shards: S`
(W a multiple of S) runs `train_latent_sharded` on every rank, the data-parallel runner
(distributed.py) on a W / S x S mesh:

- the mesh: `ShardedBatchGroup.from_default_group(S)`; rank g is data rank r = g // S and latent
  shard s = g % S. The dataset is split by data rank (`split_dataset_by_node` into D = W / S
  parts, so the S ranks of a latent group read the same part) and each store gives N / D rows per
  step (`LatentShardedSAETrainer` encodes shard 0's on every shard of the group).
- the SAE: the unsharded SAE is built as SAELens' runner builds it, after
  `torch.manual_seed(cfg.seed)` (build_runner), and rank g keeps shard s (`shard_state_dict`):
  the start is the unsharded start. The full SAE lives in host memory only while it is cut.
- checkpoints, written by every rank into `<checkpoint_path>/<tokens>/`:
  `rank_<g>/` holds rank g's store state and `resume_state.pt` (step, RNG, SAE generators:
  resume.py), and for g < S (data rank 0) SAELens' checkpoint files of shard s:
  sae_weights.safetensors and cfg.json (d_sae = F / S), the feature sparsity, trainer_state.pt
  (Adam state, schedulers, firing statistics) and the activation scaler; data ranks r > 0 hold
  the same shard and do not write it again. Rank 0 adds the unsharded `cfg.json` and
  `runner_cfg.json` and `latent_shards.json` (the mesh) at the top, then renames the folder into
  place as for one process (after all ranks have written).
- resume: rank g loads shard s's weights and trainer state from `rank_<s>/`, and its own store
  and RNG from `rank_<g>/`; the checkpoint's mesh must be this run's (`sharded_checkpoint_rank`).
- the export: latent_export.py (one SAELens folder, streamed to rank 0).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from sae_lens import LanguageModelSAERunnerConfig
from sae_lens.config import HfDataset
from sae_lens.constants import RUNNER_CFG_FILENAME, SAE_CFG_FILENAME
from sae_lens.saes.sae import TrainingSAE, TrainingSAEConfig

from sae_lens_allocation.allocation import BatchGroup
from sae_lens_allocation.allocation.latent_merge import ShardedBatchGroup
from sae_lens_allocation.saelens_compat import run_language_model_runner
from sae_lens_allocation.training.distributed import (
    check_data_parallel_config,
    join_process_group,
    rank0_output_lock,
    rank_sources,
    share_calibration_rows,
)
from sae_lens_allocation.training.gradients import HookedRootModule
from sae_lens_allocation.training.latent_export import (
    broadcast_calibration_rows,
    save_sharded_export,
)
from sae_lens_allocation.training.latent_shards import (
    LatentShardedSAETrainer,
    local_config,
    shard_state_dict,
)
from sae_lens_allocation.training.provenance import mesh_layout
from sae_lens_allocation.training.resume import (
    LAYOUT_FILENAME,
    publish_folder,
    rank_folder,
    sharded_checkpoint_rank,
)
from sae_lens_allocation.training.runner import build_runner
from sae_lens_allocation.validation import field_error


def check_latent_sharded_config(cfg: LanguageModelSAERunnerConfig[Any], world_size: int) -> None:
    """Fields a latent-sharded run cannot honour raise, naming the field: S must divide W, the
    data-parallel checks hold for the D = W / S data ranks, wandb is off (SAELens logs and runs
    its evals on rank 0 alone, and a shard's forward needs the other shards), and the SAE is
    built from the config (`from_pretrained_path` is not sharded)."""
    shards = cfg.sae.latent_shards
    if world_size % shards:
        raise field_error("sae.latent_shards", shards,
                          f"a divisor of the number of processes ({world_size})")
    check_data_parallel_config(cfg, world_size // shards)
    if cfg.logger.log_to_wandb:
        raise field_error("logger.log_to_wandb", True,
                          "False with sae.latent_shards > 1 (SAELens' evals and logs run on rank "
                          "0 alone; a shard's forward pass needs every shard)")
    if cfg.from_pretrained_path is not None:
        raise field_error("from_pretrained_path", cfg.from_pretrained_path,
                          "null with sae.latent_shards > 1 (a pretrained SAE is not sharded)")


def shard_sae(cfg: LanguageModelSAERunnerConfig[Any], shard: int) -> TrainingSAE[Any]:
    """Shard `shard` of the SAE SAELens' runner builds for `cfg` (its init, from the global RNG
    as it stands), on the CPU; the RNG is left as the unsharded build leaves it."""
    full = TrainingSAE.from_dict(
        TrainingSAEConfig.from_dict(cfg.get_training_sae_cfg_dict()).to_dict()
    )
    after_full = torch.get_rng_state()
    local = type(full)(local_config(full.cfg))
    torch.set_rng_state(after_full)
    local.load_state_dict(
        shard_state_dict(full.state_dict(), full.cfg.d_sae, shard, full.cfg.latent_shards)
    )
    return local


def train_latent_sharded(
    cfg: LanguageModelSAERunnerConfig[Any] | Mapping[str, Any],
    override_model: HookedRootModule | None = None,
    override_dataset: HfDataset | None = None,
    timeout: timedelta | None = None,
) -> TrainingSAE[Any]:
    """Train this rank's latent shard of `cfg`'s SAE on the torchrun job this process belongs to
    (module doc); returns the shard (F / S latents). Every rank writes its part of each
    checkpoint; rank 0 writes the export to `cfg.output_path`."""
    if isinstance(cfg, Mapping):
        cfg = LanguageModelSAERunnerConfig.from_dict(dict(cfg))
    # Every rank checks the same config before joining (which turns wandb off on ranks > 0).
    check_latent_sharded_config(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    cfg, world = join_process_group(cfg, timeout)
    group = ShardedBatchGroup.from_default_group(cfg.sae.latent_shards, cfg.device)
    model, dataset = rank_sources(cfg, override_model, override_dataset, group)
    runner = build_runner(cfg, override_model=model, override_dataset=dataset,
                          make_sae=lambda: shard_sae(cfg, group.shard))
    runner.activations_store.train_batch_size_tokens = cfg.train_batch_size_tokens // group.world_size
    runner.world_size = world.world_size
    runner.checkpoint_subfolder = rank_folder(world.rank)
    try:
        with rank0_output_lock(runner, cfg, world):
            return _run_sharded(runner, cfg, group)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run_sharded(runner: Any, cfg: LanguageModelSAERunnerConfig[Any],
                 group: ShardedBatchGroup) -> TrainingSAE[Any]:
    world: BatchGroup = group.world
    shards = group.shards

    def make_trainer(data_provider: Any) -> LatentShardedSAETrainer:
        trainer = LatentShardedSAETrainer(
            cfg=cfg.to_sae_trainer_config(), sae=runner.sae, data_provider=data_provider,
            group=group, evaluator=runner.evaluator,
            save_checkpoint_fn=runner.write_checkpoint_files,
        )
        trainer.publish_checkpoint = publish
        return trainer

    def publish(folder: Path) -> None:
        """Rank 0, once every rank has written its part: the unsharded config and the mesh at
        the top, then the folder into place."""
        (folder / SAE_CFG_FILENAME).write_text(json.dumps(cfg.sae.to_dict()))
        (folder / RUNNER_CFG_FILENAME).write_text(json.dumps(cfg.to_dict()))
        (folder / LAYOUT_FILENAME).write_text(json.dumps(mesh_layout(world.world_size, shards)))
        publish_folder(folder, Path(cfg.checkpoint_path) / folder.name)

    def resume(trainer: Any, checkpoint: str) -> None:
        path = Path(checkpoint)
        # Shard s's weights and trainer state: data rank 0's folder, global rank s.
        shard = sharded_checkpoint_rank(path, group.shard, shards)
        trainer.load_trainer_state(shard)
        runner.sae.load_weights_from_checkpoint(shard)
        runner.activations_store.load_from_checkpoint(path / rank_folder(world.rank))

    def finish(sae: TrainingSAE[Any], trainer: Any) -> None:
        if hasattr(sae, "set_calibration_source"):
            share_calibration_rows(sae, group)
            broadcast_calibration_rows(sae, group.latents)
        if group.rank == 0 and cfg.output_path is not None:
            save_sharded_export(runner, sae, trainer, group, cfg.output_path)
        world.barrier()

    return run_language_model_runner(runner, make_trainer, finish, resume)

