"""Clean stops and exact resume for SAELens' `LanguageModelSAETrainingRunner`.

SAELens' runner (6.54) raises from its SIGINT/SIGTERM handler at whatever line is running, then
saves only the activation store's state into a folder nobody created (`SafetensorError`). Its
checkpoints restore the weights, the optimiser and the trainer counters, but not the RNG, the
shuffle buffer or the store's exact position, and record `n_training_steps` one step short, so a
resumed run differs from an uninterrupted one. Here, by subclassing (no patching):

- `ResumableActivationsStore` shuffles with its own `torch.Generator` (seeded with `cfg.seed`)
  through `MixingBuffer`, the same algorithm as SAELens' `mixing_buffer` with its state in the
  open, and counts the token sequences it pulls from the dataset. Its checkpoint adds
  `resume_store_state.pt`: that count, the buffer's rows and the generator's state. Loading
  replays the count from a fresh dataset iterator (cheap: no model forward), so any
  deterministic dataset, pretokenized or not, comes back to the same row.
- `ResumableTrainingRunner` turns the first SIGINT/SIGTERM into a request that the store honours
  at the next step boundary (before it hands out the next batch): a complete checkpoint is
  written, then `TrainingInterrupted` (exit code 130 / 143 in the CLI). A second signal stops at
  once. Checkpoints add `resume_state.pt` (the completed step count, the global torch / CUDA /
  Python / NumPy RNG states and the state of every `torch.Generator` attribute of the SAE's
  modules) and are written under `<checkpoint_path>/.incomplete/` and renamed into place when
  complete; the export is written to a hidden sibling folder and moved into `output_path` with
  cfg.json last. A folder a kill leaves behind therefore never looks like a finished SAE.

Resuming from `resume_from_checkpoint` then continues exactly as the uninterrupted run would
(same weights, buffers and data order on CPU). `prefetch_llm_batches` reads the store ahead in a
thread, so a checkpoint taken with it cannot record where training stood: such a resume is as
SAELens' (not exact).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from sae_lens import LanguageModelSAETrainingRunner, logger
from sae_lens.constants import SAE_CFG_FILENAME

from sae_lens_allocation.loading import INCOMPLETE_DIRNAME
from sae_lens_allocation.saelens_compat import (
    MixingBuffer,
    PluginActivationsStore,
    PluginSAETrainer,
    run_language_model_runner,
)
from sae_lens_allocation.training.output_lock import RunLock
from sae_lens_allocation.training.provenance import mesh_layout, record_provenance

RESUME_STATE_FILENAME = "resume_state.pt"
STORE_STATE_FILENAME = "resume_store_state.pt"
#: The mesh a latent-sharded checkpoint was written by (training/latent_shard_runner.py).
LAYOUT_FILENAME = "latent_shards.json"
_SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


class TrainingInterrupted(Exception):
    """Training stopped by SIGINT or SIGTERM. `checkpoint` is the folder to resume from, if one
    was written; `exit_code` is 128 + the signal number."""

    def __init__(self, signum: int, message: str, checkpoint: Path | None = None) -> None:
        super().__init__(message)
        self.signum = signum
        self.checkpoint = checkpoint
        self.exit_code = _SIGNAL_EXIT.get(signal.Signals(signum), 128 + int(signum))


class _StopAtStepBoundary(Exception):
    """Raised by the store instead of handing out the next training batch."""


class StopRequest:
    """The first SIGINT/SIGTERM sets `signum`; a second one raises `TrainingInterrupted` at once."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise TrainingInterrupted(
                signum, f"stopped at once by a second {signal.Signals(signum).name}; no checkpoint "
                "was written for the current step (finished checkpoints and exports are intact)"
            )
        self.signum = signum

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Route SIGINT and SIGTERM here (main thread only), restoring the old handlers on exit."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


# --------------------------------------------------------------------------------------------
# The store


class ResumableActivationsStore(PluginActivationsStore):
    """SAELens' `ActivationsStore` with a saved shuffle buffer, its own shuffle generator and an
    exact dataset position (see the module docstring)."""

    mixing_seed: int = 0
    sequences_pulled: int = 0
    stop_check: Callable[[], None] | None = None

    @classmethod
    def from_config(cls, model: Any, cfg: Any, override_dataset: Any = None) -> Any:
        store = super().from_config(model, cfg, override_dataset=override_dataset)
        store.mixing_seed = int(cfg.seed)
        return store

    def tokenized_sequences(self) -> Any:
        for sequence in super().tokenized_sequences():
            self.sequences_pulled += 1
            yield sequence

    def get_data_loader(self) -> MixingBuffer:
        return MixingBuffer(
            buffer_size=self.n_batches_in_buffer * self.training_context_size,
            batch_size=self.train_batch_size_tokens,
            loader=self.filtered_activations(),
            mix_fraction=self.activations_mixing_fraction,
            generator=torch.Generator().manual_seed(self.mixing_seed),
        )

    def __next__(self) -> torch.Tensor:
        if self.stop_check is not None:
            self.stop_check()
        return super().__next__()

    def save_to_checkpoint(self, checkpoint_path: str | Path) -> None:
        super().save_to_checkpoint(checkpoint_path)
        loader = self.data_loader
        state = {
            "sequences_pulled": self.sequences_pulled,
            "current_row_idx": getattr(self, "current_row_idx", None),
            "mixing": loader.state_dict() if isinstance(loader, MixingBuffer) else None,
        }
        torch.save(state, Path(checkpoint_path) / STORE_STATE_FILENAME)

    def load_from_checkpoint(self, checkpoint_path: str | Path) -> None:
        path = Path(checkpoint_path) / STORE_STATE_FILENAME
        if not path.is_file():
            # A checkpoint SAELens wrote: its own (approximate) fast-forward.
            super().load_from_checkpoint(checkpoint_path)
            return
        state = torch.load(path, map_location="cpu", weights_only=False)
        if self.cached_activation_dataset is not None:
            self.current_row_idx = state["current_row_idx"]
        else:
            self._replay_sequences(int(state["sequences_pulled"]))
        if state["mixing"] is not None:
            loader = self.get_data_loader()
            loader.load_state_dict(state["mixing"], self.device)
            self.data_loader = loader

    def _replay_sequences(self, target: int) -> None:
        """Pull `target` sequences from a fresh dataset iterator, restarting it at each epoch end
        as `get_batch_tokens` does."""
        self.sequences_pulled = 0
        self.n_dataset_processed = 0
        self.iterable_sequences = self.tokenized_sequences()
        while self.sequences_pulled < target:
            try:
                next(self.iterable_sequences)
            except StopIteration:
                self.iterable_sequences = self.tokenized_sequences()


# --------------------------------------------------------------------------------------------
# Files


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def publish_folder(tmp: Path, final: Path) -> None:
    """Move the complete folder `tmp` to `final`. A new `final` appears in one rename; into an
    existing folder, cfg.json is removed first and moved last, so at no moment does `final` hold
    a cfg.json next to weights that do not belong to it."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if not final.exists():
        os.replace(tmp, final)
        return
    if not final.is_dir():
        raise FileExistsError(f"{final} exists and is not a folder")
    (final / SAE_CFG_FILENAME).unlink(missing_ok=True)
    names = sorted(p.name for p in tmp.iterdir() if p.name != SAE_CFG_FILENAME)
    for name in [*names, SAE_CFG_FILENAME]:
        if (tmp / name).exists():
            _remove(final / name)
            os.replace(tmp / name, final / name)
    shutil.rmtree(tmp, ignore_errors=True)


def rank_folder(rank: int) -> str:
    """The folder of global rank `rank` inside a latent-sharded checkpoint."""
    return f"rank_{rank}"


def sharded_checkpoint_rank(path: Path, rank: int, shards: int) -> Path:
    """Where global rank `rank`'s files of checkpoint `path` lie: `path` itself without latent
    shards, else its rank folder, once the checkpoint's layout file says it was written by the
    same mesh as this run's (WORLD_SIZE ranks, `shards` latent shards): a shard's files hold
    F / S latents and one rank's store, so no other mesh can continue them."""
    import json

    from sae_lens_allocation.validation import field_error

    layout_file = path / LAYOUT_FILENAME
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if shards == 1 and not layout_file.is_file():
        return path
    if not layout_file.is_file():
        raise field_error("resume_from_checkpoint", str(path),
                          f"a checkpoint of a latent-sharded run (it has no {LAYOUT_FILENAME}); "
                          f"this run has sae.latent_shards={shards}")
    layout = json.loads(layout_file.read_text())
    if layout != mesh_layout(world, shards):
        raise field_error("resume_from_checkpoint", str(path),
                          f"a checkpoint of this run's mesh {mesh_layout(world, shards)}; it was "
                          f"written by {layout} (resume with that many processes and "
                          "sae.latent_shards)")
    return path / rank_folder(rank)


def generator_states(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state of every torch.Generator attribute of `module` and its submodules, by path."""
    return {
        f"{prefix}.{name}" if prefix else name: value.get_state()
        for prefix, sub in module.named_modules()
        for name, value in vars(sub).items()
        if isinstance(value, torch.Generator)
    }


def set_generator_states(module: torch.nn.Module, states: dict[str, torch.Tensor]) -> None:
    for key, state in states.items():
        prefix, _, name = key.rpartition(".")
        getattr(module.get_submodule(prefix), name).set_state(state)


def _rng_state() -> dict[str, Any]:
    import numpy as np

    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


# --------------------------------------------------------------------------------------------
# The runner


class ResumableTrainingRunner(LanguageModelSAETrainingRunner):
    """SAELens' runner with clean stops, atomic checkpoints and exports, and exact resume.

    `store_class` (a `ResumableActivationsStore` subclass) replaces the stock store as training
    data and evaluator store.
    """

    activations_store: ResumableActivationsStore

    def __init__(self, cfg: Any, override_dataset: Any = None, override_model: Any = None,
                 override_sae: Any = None,
                 store_class: type[ResumableActivationsStore] = ResumableActivationsStore) -> None:
        super().__init__(cfg, override_dataset=override_dataset, override_model=override_model,
                         override_sae=override_sae)
        # Reuse the dataset the stock store already opened rather than loading it again.
        store = store_class.from_config(
            self.model, cfg, override_dataset=self.activations_store.dataset
        )
        self.activations_store = store
        self.evaluator.activations_store = store
        self.stop = StopRequest()
        self._trainer: Any = None
        # The held-out calibration rows build_runner reserves (held_out.CalibrationTokens).
        self.calibration_tokens: Any = None
        # Provenance (provenance.py): what build_runner found; data parallel sets world_size.
        self.world_size = 1
        self.special_tokens: dict[str, Any] = {"ids": [], "source": "none"}
        self.resume_changed: dict[str, dict[str, Any]] = {}
        self.resumes: list[dict[str, Any]] = []
        # Where this process's resume state lies inside a checkpoint (a latent-sharded run's
        # rank folder, training/latent_shard_runner.py); "" = the checkpoint folder itself.
        self.checkpoint_subfolder = ""

    def run(self) -> Any:
        """SAELens' `run()` (`saelens_compat.run_language_model_runner`) with a trainer whose
        progress bar moves on short runs, and SIGINT/SIGTERM turned into a stop at the next step
        boundary. A signal that arrives after the last step lets the export finish, then stops."""
        with self.output_lock(), self.stop.installed():
            sae = run_language_model_runner(self, self.make_trainer, self.save_export)
        if self.stop.signum is not None:
            name = signal.Signals(self.stop.signum).name
            where = f"the export in {self.cfg.output_path} is complete" if self.cfg.output_path \
                else "training had finished"
            raise TrainingInterrupted(self.stop.signum, f"stopped by {name} after the last step; {where}")
        return sae

    def make_trainer(self, data_provider: Any) -> PluginSAETrainer:
        """The trainer SAELens' `run()` builds, with the plugin's progress bar."""
        return PluginSAETrainer(cfg=self.cfg.to_sae_trainer_config(), sae=self.sae,
                                data_provider=data_provider, evaluator=self.evaluator,
                                save_checkpoint_fn=self.save_checkpoint)

    def save_export(self, sae: Any, trainer: Any) -> None:
        """The final save of SAELens' `run()`: the export, when `output_path` is set."""
        if self.cfg.output_path is not None:
            self.save_final_sae(sae=sae, output_path=self.cfg.output_path,
                                log_feature_sparsity=trainer.log_feature_sparsity)

    def output_lock(self) -> RunLock:
        """The lock on this run's `output_path` and `checkpoint_path` (output_lock.py)."""
        return RunLock([("output_path", self.cfg.output_path),
                        ("checkpoint_path", self.cfg.checkpoint_path)])

    def run_trainer_with_interruption_handling(self, trainer: Any) -> Any:
        self._trainer = trainer
        if self.cfg.resume_from_checkpoint is not None:
            self._load_resume_state(Path(self.cfg.resume_from_checkpoint), trainer)
        if trainer.cfg.checkpoint_path is not None:
            # Checkpoints are written here and renamed into checkpoint_path when complete.
            trainer.cfg.checkpoint_path = str(Path(self.cfg.checkpoint_path) / INCOMPLETE_DIRNAME)
        store = self.activations_store
        store.stop_check = lambda: self._check_stop(trainer)
        try:
            return trainer.fit()
        except _StopAtStepBoundary:
            assert self.stop.signum is not None
            signum = self.stop.signum
            name = signal.Signals(signum).name
            step = trainer.n_training_steps
            if self.cfg.checkpoint_path is None:
                raise TrainingInterrupted(
                    signum, f"stopped by {name} after step {step}; no checkpoint written "
                    "(checkpoint_path is null)"
                ) from None
            trainer.save_checkpoint(checkpoint_name=str(trainer.n_training_samples))
            final = Path(self.cfg.checkpoint_path) / str(trainer.n_training_samples)
            raise TrainingInterrupted(
                signum, f"stopped by {name} after step {step}; checkpoint written to {final}; "
                f"resume with --set resume_from_checkpoint={final}", checkpoint=final
            ) from None
        finally:
            store.stop_check = None
            if trainer.cfg.checkpoint_path is not None:
                shutil.rmtree(Path(self.cfg.checkpoint_path) / INCOMPLETE_DIRNAME, ignore_errors=True)

    def _check_stop(self, trainer: Any) -> None:
        """Stop before the next training batch, unless the trainer is still estimating the
        activation scaling (its checkpoint could not restore a half-done estimate)."""
        if self.stop.signum is None:
            return
        norm = trainer.sae.cfg.normalize_activations
        scaler = trainer.activation_scaler
        estimating = (norm == "expected_average_only_in" and scaler.scaling_factor is None) or (
            norm == "covariance_whitening" and scaler.whitening is None
        )
        if not estimating:
            raise _StopAtStepBoundary

    def save_checkpoint(self, checkpoint_path: Path | None) -> None:
        """Called by the trainer once its own files are in `checkpoint_path` (the incomplete
        area): add the store's and the resume state, then rename the folder into place."""
        if checkpoint_path is None:
            return
        self.write_checkpoint_files(Path(checkpoint_path))
        final = Path(self.cfg.checkpoint_path) / Path(checkpoint_path).name
        if final.exists():
            _remove(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(checkpoint_path, final)

    def write_checkpoint_files(self, checkpoint_path: Path) -> None:
        """The runner's files of a checkpoint: SAELens' (the store's state, runner_cfg.json), the
        store's resume state and `resume_state.pt`."""
        super().save_checkpoint(checkpoint_path)
        trainer = self._trainer
        state = {
            # SAELens saves n_training_steps before counting the step it checkpoints after.
            "n_training_steps": trainer.n_training_samples // trainer.cfg.train_batch_size_samples,
            "rng": _rng_state(),
            "sae_generators": generator_states(trainer.sae),
            "resumes": self.resumes,
        }
        torch.save(state, Path(checkpoint_path) / RESUME_STATE_FILENAME)

    def _load_resume_state(self, checkpoint: Path, trainer: Any) -> None:
        path = checkpoint / self.checkpoint_subfolder / RESUME_STATE_FILENAME
        resume = {"checkpoint": str(checkpoint), "tokens_seen": int(trainer.n_training_samples),
                  "changed": self.resume_changed}
        if not path.is_file():
            self.resumes = [resume]
            logger.warning(
                f"{checkpoint} has no {RESUME_STATE_FILENAME} (written by SAELens' own runner): "
                "resuming as SAELens does, without the RNG and step state, so the run will not "
                "match an uninterrupted one exactly"
            )
            return
        state = torch.load(path, map_location="cpu", weights_only=False)
        # Checkpoints written before resume histories were recorded have none.
        self.resumes = [*state.get("resumes", []), resume]
        trainer.n_training_steps = int(state["n_training_steps"])
        # Thresholds already passed were checkpointed by the interrupted run.
        trainer.checkpoint_thresholds = [
            t for t in trainer.checkpoint_thresholds if t >= trainer.n_training_samples
        ]
        set_generator_states(trainer.sae, state["sae_generators"])
        _set_rng_state(state["rng"])

    def save_final_sae(self, sae: Any, output_path: str,
                       log_feature_sparsity: torch.Tensor | None = None) -> None:
        """SAELens' export with the run's provenance in its metadata (provenance.py), written
        to a hidden sibling folder and then published."""
        record_provenance(sae, self.cfg, self._trainer.n_training_samples, self.world_size,
                          self.special_tokens, self.resumes)
        final = Path(output_path)
        tmp = final.parent / f".{final.name}.incomplete-{os.getpid()}"
        _remove(tmp)
        try:
            super().save_final_sae(sae, str(tmp), log_feature_sparsity)
            publish_folder(tmp, final)
        finally:
            _remove(tmp)
