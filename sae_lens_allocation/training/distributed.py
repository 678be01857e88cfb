"""Data-parallel training on torch.distributed (docs/distributed.md).

W processes (launched by `torchrun`) train one SAE on one global batch of N =
`train_batch_size_tokens` rows per step; each rank reads its own disjoint shard of the dataset and
encodes N / W rows. Project definition (docs/distributed.md#what-is-exact): one step equals a
single-process step on the global batch:

- identical start: every parameter and buffer is broadcast from rank 0;
- allocation over the global batch: Mutual Choice and Feature Choice through
  `allocation.BatchGroup` (exact, ties included); TopK, topk_aux and gradient_topk select
  per token and need nothing (gradient_topk's activation gradients come with each rank's rows);
- gradients averaged, g = (1/W) sum_r g_r, which is the gradient of the global-batch mean loss
  since every rank holds N / W rows; SAELens' grad-norm clip and Adam then see the same numbers;
- global statistics: firing counts (SAELens' dead mask and feature sparsity), the aux-loss firing
  EMA and residual variance, gradient_topk's running RMS, the Zipf ranking (it reads the global
  EMA) and the activation-norm scaling factor are reduced over ranks;
- rank 0 writes checkpoints and the export; the export calibrates on calibration rows drawn from
  every rank's shard;
- a collective waits at most `timeout` for the other ranks; a dead or stuck rank makes the others
  raise `DataParallelError` instead of hanging.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from sae_lens import LanguageModelSAERunnerConfig
from sae_lens.config import HfDataset, SAETrainerConfig
from sae_lens.saes.sae import TrainingSAE, TrainStepOutput
from sae_lens.training.activation_scaler import ActivationScaler
from sae_lens.training.sae_trainer import Evaluator, SaveCheckpointFn
from sae_lens.training.types import DataProvider

from sae_lens_allocation.allocation import BatchGroup, DataParallelError
from sae_lens_allocation.saelens_compat import SeamedSAETrainer, run_language_model_runner
from sae_lens_allocation.saes.batch_group import BatchGroupMixin
from sae_lens_allocation.saes.calibration import CalibrationRows
from sae_lens_allocation.training.gradients import HookedRootModule
from sae_lens_allocation.training.output_lock import RunLock
from sae_lens_allocation.training.runner import build_runner
from sae_lens_allocation.training.sources import runner_sources
from sae_lens_allocation.validation import UsageError, field_error

#: Environment variable: seconds a collective waits for the other ranks (default 300).
TIMEOUT_ENV = "SAE_LENS_ALLOCATION_DP_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0


def launched_by_torchrun() -> bool:
    """True when torchrun (or another launcher) set WORLD_SIZE > 1 for this process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def process_rank() -> int:
    """This process's global rank as the launcher set it (0 without a launcher)."""
    return int(os.environ.get("RANK", "0"))


def timeout_from_env() -> timedelta:
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{TIMEOUT_ENV}={raw!r}: allowed is a number of seconds > 0")
    return timedelta(seconds=seconds)


def init_from_env(device: str, timeout: timedelta | None = None) -> BatchGroup:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT,
    LOCAL_RANK): NCCL when `device` is CUDA, else gloo. Returns the group of all ranks."""
    if not dist.is_initialized():
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(
            backend="nccl" if cuda else "gloo", timeout=timeout or timeout_from_env()
        )
    return BatchGroup.from_default_group()


def local_device(device: str) -> str:
    """CUDA devices become this process's GPU, cuda:LOCAL_RANK; others are unchanged."""
    if torch.device(device).type == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def check_data_parallel_config(cfg: LanguageModelSAERunnerConfig[Any], world_size: int) -> None:
    """Fields that data-parallel training cannot honour raise, naming the field."""
    n = cfg.train_batch_size_tokens
    if n % world_size:
        raise field_error(
            "train_batch_size_tokens",
            n,
            f"a multiple of the number of processes ({world_size}), so every rank encodes "
            "N / W rows and averaged gradients equal the global-batch gradient",
        )
    if cfg.use_cached_activations:
        raise field_error(
            "use_cached_activations",
            True,
            "False under data parallel (cached activations are not sharded)",
        )
    if cfg.compile_sae:
        raise field_error(
            "compile_sae", True, "False under data parallel (collectives inside the step)"
        )
    if cfg.sae.normalize_activations not in ("none", "expected_average_only_in"):
        raise field_error(
            "sae.normalize_activations",
            cfg.sae.normalize_activations,
            "'none' or 'expected_average_only_in' under data parallel (reduced over ranks)",
        )


@torch.no_grad()
def broadcast_module(module: torch.nn.Module, group: BatchGroup, src: int = 0) -> None:
    """Every parameter and buffer of `module` becomes rank `src`'s."""
    for tensor in [*module.parameters(), *module.buffers()]:
        group.broadcast_(tensor.data, src)


class GlobalActivationScaler(ActivationScaler):
    """SAELens' `ActivationScaler` whose norm estimate covers every rank's batches:
    scaling_factor = sqrt(d_in) / mean ||x|| over `n_batches_for_norm_estimate` batches of each
    of the W ranks (SAELens' `estimate_scaling_factor` over the global batches)."""

    def __init__(self, group: BatchGroup, device: torch.device | str) -> None:
        super().__init__()
        self.group = group
        self.device = device

    @torch.no_grad()
    def estimate_scaling_factor(
        self, d_in: int, data_provider: DataProvider, n_batches_for_norm_estimate: int = int(1e3)
    ) -> None:
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for _ in range(n_batches_for_norm_estimate):
            norms = next(data_provider).to(self.device).norm(dim=-1)
            total[0] += norms.double().sum()
            total[1] += norms.numel()
        total = self.group.sum(total)
        self.scaling_factor = d_in**0.5 / float(total[0] / total[1])


class DataParallelSAETrainer(SeamedSAETrainer):
    """SAELens' `SAETrainer`, one rank of W: the data provider gives this rank's N / W rows;
    `cfg` is the global trainer config (train_batch_size_samples = N, total samples global).

    `step` counts global samples; SAELens' step runs with the firing counts summed over ranks
    (`count_firing`) and the gradients averaged before the grad-norm clip (`before_clip`);
    `save_checkpoint` writes on rank 0 only; the activation-norm scaling factor is estimated over
    every rank's batches (`GlobalActivationScaler`, which SAELens' `fit` calls).
    """

    def __init__(
        self,
        cfg: SAETrainerConfig,
        sae: TrainingSAE[Any],
        data_provider: DataProvider,
        group: BatchGroup,
        evaluator: Evaluator[Any] | None = None,
        save_checkpoint_fn: SaveCheckpointFn | None = None,
    ) -> None:
        if cfg.train_batch_size_samples % group.world_size:
            raise field_error(
                "train_batch_size_tokens",
                cfg.train_batch_size_samples,
                f"a multiple of the number of processes ({group.world_size})",
            )
        self.group = group
        sae.to(cfg.device)
        # Set before SAETrainer builds the optimiser: the batch statistics of a plugin SAE reduce
        # over the group from the first step on (SAELens' own SAEs have none).
        if isinstance(sae, BatchGroupMixin):
            sae.use_batch_group(group)
        broadcast_module(sae, group)
        super().__init__(cfg, sae, data_provider, evaluator, save_checkpoint_fn)
        self.activation_scaler = GlobalActivationScaler(group, self.sae.device)

    @property
    def rows_per_rank(self) -> int:
        return self.cfg.train_batch_size_samples // self.group.world_size

    def step(self, batch: torch.Tensor) -> TrainStepOutput:
        if batch.shape[0] != self.rows_per_rank:
            raise DataParallelError(
                f"rank {self.group.rank} got a batch of {batch.shape[0]} rows; every rank must "
                f"give train_batch_size_tokens / W = {self.rows_per_rank} rows per step"
            )
        # `step` counts global samples; SAELens' step adds this rank's rows.
        self.n_training_samples += self.cfg.train_batch_size_samples - batch.shape[0]
        return super().step(batch)

    def count_firing(self, fired: torch.Tensor) -> torch.Tensor:
        return self.group.sum(fired)

    def before_clip(self) -> None:
        self.average_gradients()

    @torch.no_grad()
    def average_gradients(self) -> None:
        """g <- (1/W) sum_r g_r for every parameter, in one all-reduce of the flattened grads."""
        if self.group.world_size == 1:
            return
        params = [p for p in self.sae.parameters() if p.grad is not None]
        if not params:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        flat = self.group.sum(flat) / self.group.world_size
        offset = 0
        for p in params:
            n = p.grad.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n

    def save_checkpoint(self, checkpoint_name: str, *args: Any, **kwargs: Any) -> None:
        """Rank 0 writes (every rank holds the same weights and statistics)."""
        if self.group.rank == 0:
            super().save_checkpoint(checkpoint_name, *args, **kwargs)


@torch.no_grad()
def share_calibration_rows(sae: Any, group: BatchGroup) -> None:
    """Give every rank the calibration rows of all ranks, in rank order: ceil(
    calibration_tokens / W) rows each from what it would calibrate on alone (its held-out rows,
    else its training-row reservoir), as a single-process run of the same size would use. Each
    rank's document ids are renumbered after the previous ranks', so document folds never mix
    ranks' documents; the metadata keeps rank 0's description and adds the number of ranks."""
    want = math.ceil(sae.cfg.calibration_tokens / group.world_size)
    device = sae.W_enc.device
    local = sae.default_calibration_rows()
    if local is None:
        acts = torch.zeros(0, sae.cfg.d_in, device=device)
        documents = torch.zeros(0, dtype=torch.long, device=device)
        info: dict[str, Any] = {}
    else:
        acts = local.acts[:want].to(device=device, dtype=torch.float32)
        documents = torch.unique(local.documents[:want], return_inverse=True)[1].to(device)
        info = local.info
    counts = group.row_counts(acts.shape[0], device)
    padded_acts = acts.new_zeros(max(counts), sae.cfg.d_in)
    padded_acts[: acts.shape[0]] = acts
    padded_docs = documents.new_zeros(max(counts))
    padded_docs[: documents.shape[0]] = documents
    all_acts, all_docs, offset = [], [], 0
    for rank_acts, rank_docs, n in zip(
        group.all_gather(padded_acts), group.all_gather(padded_docs), counts
    ):
        all_acts.append(rank_acts[:n])
        all_docs.append(rank_docs[:n] + offset)
        offset += int(rank_docs[:n].max()) + 1 if n else 0
    rows = torch.cat(all_acts)
    if not rows.shape[0]:
        return
    sae.set_calibration_source(
        CalibrationRows(rows, torch.cat(all_docs), {**info, "ranks": group.world_size})
    )


def train_data_parallel(
    cfg: LanguageModelSAERunnerConfig[Any] | Mapping[str, Any],
    override_model: HookedRootModule | None = None,
    override_dataset: HfDataset | None = None,
    timeout: timedelta | None = None,
) -> TrainingSAE[Any]:
    """Train on every rank of the torchrun job this process belongs to; returns the trained
    SAE (identical on every rank). Rank 0 writes checkpoints and `cfg.output_path`. A config with
    `sae.latent_shards` > 1 is trained by `latent_shard_runner.train_latent_sharded`."""
    cfg, group = join_process_group(cfg, timeout)
    shards = getattr(cfg.sae, "latent_shards", 1)
    if shards != 1:
        raise field_error(
            "sae.latent_shards", shards,
            "1 in train_data_parallel; train_latent_sharded trains a latent-sharded SAE (the "
            "`train` command picks it)",
        )
    check_data_parallel_config(cfg, group.world_size)
    model, dataset = rank_sources(cfg, override_model, override_dataset, group)
    runner = build_runner(cfg, override_model=model, override_dataset=dataset)
    store = runner.activations_store
    # This rank's share of each global batch; read lazily when the store starts its loader.
    store.train_batch_size_tokens = cfg.train_batch_size_tokens // group.world_size
    runner.world_size = group.world_size
    try:
        with rank0_output_lock(runner, cfg, group):
            return _run_on_ranks(runner, cfg, group)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def join_process_group(
    cfg: LanguageModelSAERunnerConfig[Any] | Mapping[str, Any], timeout: timedelta | None
) -> tuple[LanguageModelSAERunnerConfig[Any], BatchGroup]:
    """The config for this rank (CUDA devices become cuda:LOCAL_RANK; wandb on rank 0 only) and
    the group of all ranks, after joining the process group torchrun describes."""
    if isinstance(cfg, Mapping):
        cfg = LanguageModelSAERunnerConfig.from_dict(dict(cfg))
    group = init_from_env(cfg.device, timeout)
    for name in ("device", "llm_device", "act_store_device"):
        value = getattr(cfg, name)
        if isinstance(value, str) and value != "with_model":
            setattr(cfg, name, local_device(value))
    cfg.sae.device = cfg.device
    if group.rank != 0:
        cfg.logger.log_to_wandb = False
    return cfg, group


def rank_sources(
    cfg: LanguageModelSAERunnerConfig[Any],
    override_model: HookedRootModule | None,
    override_dataset: HfDataset | None,
    group: BatchGroup,
) -> tuple[Any, Any]:
    """The model and this rank's shard of the dataset: `split_dataset_by_node` with the rank and
    size of `group` (the data-parallel ranks; map-style and streaming datasets)."""
    model, dataset = runner_sources(cfg, override_model, override_dataset)
    if dataset is None:
        from datasets import load_dataset

        dataset = load_dataset(
            cfg.dataset_path,
            split="train",
            streaming=cfg.streaming,
            trust_remote_code=cfg.dataset_trust_remote_code,
        )
    from datasets.distributed import split_dataset_by_node

    return model, split_dataset_by_node(dataset, rank=group.rank, world_size=group.world_size)


@contextmanager
def rank0_output_lock(runner: Any, cfg: LanguageModelSAERunnerConfig[Any],
                       group: BatchGroup) -> Iterator[None]:
    """Rank 0, the writer, holds the run's lock on its output folders (output_lock.py); when it
    is refused every rank raises the `UsageError` before training."""
    lock = runner.output_lock() if group.rank == 0 else RunLock(())
    refused: UsageError | None = None
    try:
        lock.acquire()
    except UsageError as err:
        refused = err
    flag = torch.tensor([float(refused is not None)], device=torch.device(cfg.device))
    try:
        if group.sum(flag).item():
            raise refused or UsageError(
                f"output_path={cfg.output_path!r} or checkpoint_path={cfg.checkpoint_path!r} is "
                "in use by another run (rank 0 holds no lock on it)")
        yield
    finally:
        lock.release()


def _run_on_ranks(
    runner: Any, cfg: LanguageModelSAERunnerConfig[Any], group: BatchGroup
) -> TrainingSAE[Any]:
    """SAELens' runner loop (`saelens_compat.run_language_model_runner`) with the data-parallel
    trainer, calibration rows from every rank, and rank-0 writes."""

    def make_trainer(data_provider: Any) -> DataParallelSAETrainer:
        trainer = DataParallelSAETrainer(
            cfg=cfg.to_sae_trainer_config(),
            sae=runner.sae,
            data_provider=data_provider,
            group=group,
            evaluator=runner.evaluator,
            save_checkpoint_fn=runner.save_checkpoint,
        )
        if group.rank != 0:
            # Only rank 0 writes checkpoints; the others must not manage (and clean up) its
            # area for incomplete checkpoints (resume.py). Every rank resumes from the
            # checkpoint rank 0 wrote: same weights, optimiser and statistics.
            trainer.cfg.checkpoint_path = None
        return trainer

    def finish(sae: TrainingSAE[Any], trainer: Any) -> None:
        if hasattr(sae, "set_calibration_source"):
            share_calibration_rows(sae, group)
        if group.rank == 0 and cfg.output_path is not None:
            runner.save_final_sae(sae=sae, output_path=cfg.output_path,
                                  log_feature_sparsity=trainer.log_feature_sparsity)
        group.barrier()

    return run_language_model_runner(runner, make_trainer, finish)
