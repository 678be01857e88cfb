"""What an export records about the run that made it, and what a resume may change.

Every export's cfg.json `metadata` holds, beside SAELens' own fields:
- `sae_lens_allocation_version` and `sae_lens_version`: the installed versions that wrote it;
- `training`: `seed`, `training_tokens_seen` (the trainer's count at the export, the tokens
  this SAE actually trained on, resumed runs included), `world_size` (processes that trained
  it), `data_parallel` (null for one data-parallel rank, else `ranks` D, `global_batch_tokens` and
  `tokens_per_rank_per_step`), `latent_shards` (the mesh of a latent-sharded run: `world_size`
  W, `data_parallel_size` D = W / S, `latent_shards` S; null without latent shards),
  `special_tokens` (`ids` left out of calibration and where they
  came from: `config` (`exclude_special_tokens` as a list), `tokenizer`, or `none` for a model
  without a tokenizer), and `resumes`: one entry per resume in the SAE's history, oldest first
  (`checkpoint`, `tokens_seen` at the resume, `changed`: {field: {"was", "now"}}).

A resume (`resume_from_checkpoint`) compares the run's config with the checkpoint's
runner_cfg.json and cfg.json (`resume_changes`):
- refused (`UsageError`, one line naming the field and both values): any `sae.*` field but
  `device` (k, d_sae, capacity, architecture, ... define the SAE and its trained weights); the
  fields that define the activations or the saved stream state (`RESUME_FIXED`, e.g.
  `hook_name`, `model_name`, `context_size`, `train_batch_size_tokens`); the fields whose value
  the checkpoint's optimiser, scheduler and RNG state override, so a new value would be ignored
  without a word (`RESUME_RESTORED`: `lr` and its schedule, Adam's betas, `seed`); and a
  `training_tokens` below the tokens the checkpoint has already trained;
- allowed and recorded in `resumes[-1].changed`: every other runner field (`training_tokens`,
  `n_checkpoints`, eval and logging settings, `output_path`, ...), except the paths that name
  the resume itself (`RESUME_IGNORED`).
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from sae_lens.constants import RUNNER_CFG_FILENAME

from sae_lens_allocation.validation import UsageError

RESUME_FIXED = (
    "model_name", "model_class_name", "hook_name", "hook_head_index", "context_size",
    "seqpos_slice", "prepend_bos", "train_batch_size_tokens", "n_batches_in_buffer",
    "is_dataset_tokenized", "use_cached_activations", "disable_concat_sequences",
    "sequence_separator_token", "exclude_special_tokens", "activations_mixing_fraction",
)
RESUME_RESTORED = (
    "lr", "lr_scheduler_name", "lr_warm_up_steps", "lr_end", "lr_decay_steps",
    "n_restart_cycles", "adam_beta1", "adam_beta2", "seed",
)
RESUME_IGNORED = ("resume_from_checkpoint", "checkpoint_path", "sae", "device", "llm_device",
                  "act_store_device")
SAE_RESUME_IGNORED = ("device", "metadata")


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _plain(value: Any) -> Any:
    """`value` as JSON gives it back (tuples become lists), for comparing with saved configs."""
    return json.loads(json.dumps(value, default=str))


def resume_changes(cfg: Any, checkpoint: Path, tokens_trained: int) -> dict[str, dict[str, Any]]:
    """The runner fields `cfg` changes against the checkpoint that are allowed (module
    docstring), as {field: {"was", "now"}}; `UsageError` for a change that is not."""
    from sae_lens_allocation.loading import read_sae_cfg

    saved_sae = read_sae_cfg(checkpoint)
    now_sae = _plain(cfg.sae.to_dict())
    for name in sorted(set(saved_sae) | set(now_sae)):
        if name in SAE_RESUME_IGNORED or name not in now_sae:
            continue
        if name in saved_sae and _plain(saved_sae[name]) != now_sae[name]:
            raise UsageError(
                f"sae.{name}={now_sae[name]!r} is not allowed when resuming from {checkpoint}: "
                f"the checkpoint's SAE has {name}={saved_sae[name]!r} (a resume continues the same "
                "SAE; train a new one without resume_from_checkpoint)")
    if cfg.training_tokens < tokens_trained:
        raise UsageError(
            f"training_tokens={cfg.training_tokens} is not allowed when resuming from {checkpoint}: "
            f"the checkpoint has already trained {tokens_trained} tokens; use at least that")
    runner_file = checkpoint / RUNNER_CFG_FILENAME
    if not runner_file.is_file():
        return {}
    saved = json.loads(runner_file.read_text())
    now = _plain(cfg.to_dict())
    changed: dict[str, dict[str, Any]] = {}
    for name in sorted(set(saved) & set(now)):
        if name in RESUME_IGNORED or saved[name] == now[name]:
            continue
        if name in RESUME_FIXED or name in RESUME_RESTORED:
            why = ("it defines the activations or the saved data stream" if name in RESUME_FIXED
                   else "the checkpoint's optimiser, schedule and RNG state would override it")
            raise UsageError(
                f"{name}={now[name]!r} is not allowed when resuming from {checkpoint}: the "
                f"checkpoint was trained with {name}={saved[name]!r} and {why}; resume with "
                f"{saved[name]!r} or train anew")
        changed[name] = {"was": saved[name], "now": now[name]}
    return changed


def mesh_layout(world_size: int, latent_shards: int) -> dict[str, int]:
    """The mesh of a latent-sharded run, as its checkpoints and export record it."""
    return {"world_size": int(world_size), "data_parallel_size": int(world_size // latent_shards),
            "latent_shards": int(latent_shards)}


def record_provenance(sae: Any, cfg: Any, tokens_seen: int, world_size: int,
                      special_tokens: dict[str, Any], resumes: list[dict[str, Any]],
                      latent_shards: int = 1) -> None:
    """Write the provenance fields (module docstring) into `sae.cfg.metadata`."""
    meta = sae.cfg.metadata
    meta.sae_lens_allocation_version = package_version("sae-lens-allocation")
    meta.sae_lens_version = package_version("sae-lens")
    batch = int(cfg.train_batch_size_tokens)
    data_ranks = world_size // latent_shards
    meta.training = {
        "seed": int(cfg.seed),
        "training_tokens_seen": int(tokens_seen),
        "world_size": int(world_size),
        "data_parallel": None if data_ranks == 1 else {
            "ranks": int(data_ranks), "global_batch_tokens": batch,
            "tokens_per_rank_per_step": batch // data_ranks,
        },
        "latent_shards": None if latent_shards == 1 else mesh_layout(world_size, latent_shards),
        "special_tokens": special_tokens,
        "resumes": list(resumes),
    }
