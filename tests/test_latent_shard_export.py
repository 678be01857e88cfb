"""The export of a latent-sharded SAE (training/latent_export.py) and the sharded run under
torchrun (training/latent_shard_runner.py): the streamed export equals the unsharded export of
the same weights tensor for tensor, calibration over shards included; a resumed sharded run
equals an uninterrupted one exactly; the sharded run's export equals the unsharded run's."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import N_ROWS, _build_sae, _global_batches, _relative_difference, _trainer_cfg

from sae_lens_allocation.training.latent_shards import (
    local_config,
    merge_state_dicts,
    shard_state_dict,
)

#: Exported as jumprelu (calibrated over the shards) or topk.
EXPORT_VARIANTS = ["mutual_choice", "mutual_choice_floor", "feature_choice_zipf", "topk_aux"]
CALIBRATION_ROWS = 96


def _calibration_rows():
    from sae_lens_allocation.saes.calibration import CalibrationRows

    g = torch.Generator().manual_seed(11)
    acts = _global_batches("mutual_choice")[0, :CALIBRATION_ROWS] + 0.05 * torch.randn(
        CALIBRATION_ROWS, 16, generator=g)
    return CalibrationRows(acts, torch.arange(CALIBRATION_ROWS) // 4, {"source": "test"})


def _export_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import datetime

    import torch.distributed as dist

    from sae_lens_allocation.allocation.latent_merge import ShardedBatchGroup
    from sae_lens_allocation.training.latent_export import save_sharded_export
    from sae_lens_allocation.training.latent_shards import LatentShardedSAETrainer

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    group = ShardedBatchGroup.from_default_group(world)
    for variant in EXPORT_VARIANTS:
        full = _build_sae(variant, seed=0)
        full.cfg.latent_shards = world
        sae = type(full)(local_config(full.cfg))
        sae.load_state_dict(shard_state_dict(full.state_dict(), full.cfg.d_sae, rank, world))
        trainer = LatentShardedSAETrainer(_trainer_cfg(), sae, iter(_global_batches(variant)), group)
        trainer.fit()
        if hasattr(sae, "set_calibration_source"):
            # Shard 1 is handed other rows: the export must calibrate on shard 0's.
            rows = _calibration_rows()
            if rank == 1:
                rows.acts = rows.acts.flip(0)
            sae.set_calibration_source(rows)
            from sae_lens_allocation.training.latent_export import broadcast_calibration_rows

            broadcast_calibration_rows(sae, group.latents)
        runner = SimpleNamespace(cfg=SimpleNamespace(seed=0, train_batch_size_tokens=N_ROWS,
                                                     to_dict=lambda: {}),
                                 world_size=world, special_tokens={}, resumes=[])
        save_sharded_export(runner, sae, trainer, group, Path(out_dir) / variant)
        torch.save({"state": sae.state_dict(), "sparsity": trainer.log_feature_sparsity},
                   f"{out_dir}/{variant}-rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded_exports(tmp_path_factory):
    import torch.multiprocessing as mp

    out_dir = tmp_path_factory.mktemp("export")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.start_processes(_export_worker, args=(2, port, str(out_dir)), nprocs=2,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + 600
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("export workers did not finish within 600 s")
    return out_dir


@pytest.mark.slow
@pytest.mark.parametrize("variant", EXPORT_VARIANTS)
def test_the_streamed_export_is_the_unsharded_export_of_the_same_weights(sharded_exports, variant,
                                                                          tmp_path):
    """Shards merged into one SAE and exported in one process (SAELens' save_inference_model,
    calibrated on the same rows) give the same file contents bit for bit; the folder loads in
    plain SAELens."""
    from sae_lens import SAE

    parts = [torch.load(sharded_exports / f"{variant}-rank{r}.pt") for r in range(2)]
    full = _build_sae(variant, seed=0)
    full.load_state_dict(merge_state_dicts([p["state"] for p in parts], full.cfg.d_sae))
    if hasattr(full, "set_calibration_source"):
        full.calibrated.fill_(False)
        full.set_calibration_source(_calibration_rows())
    full.save_inference_model(tmp_path)
    expected, got = load_file(tmp_path / "sae_weights.safetensors"), load_file(
        sharded_exports / variant / "sae_weights.safetensors")
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), (variant, name)
    sparsity = load_file(sharded_exports / variant / "sparsity.safetensors")["sparsity"]
    assert torch.equal(sparsity, torch.cat([p["sparsity"] for p in parts]))
    cfg = json.loads((sharded_exports / variant / "cfg.json").read_text())
    unsharded = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == unsharded["architecture"] and cfg["d_sae"] == 64
    calibration, expected_calibration = (dict(c["metadata"].get("calibration") or {}) for c in (cfg, unsharded))
    if calibration:
        # The export-vs-training-rule comparison needs all latents in one process: not made on shards.
        assert calibration.pop("rule_gap") == {"not_compared": "latent_shards > 1"}
        assert calibration.pop("trained_and_deployed_under_different_rules") is None
        expected_calibration.pop("rule_gap"), expected_calibration.pop("trained_and_deployed_under_different_rules")
    assert calibration == expected_calibration
    assert cfg["metadata"]["training"]["latent_shards"] == {
        "world_size": 2, "data_parallel_size": 1, "latent_shards": 2}
    loaded = SAE.load_from_disk(str(sharded_exports / variant))
    assert loaded.cfg.architecture() == ("topk" if variant == "topk_aux" else "jumprelu")


# --- the command line: torchrun, resume, and the unsharded run -----------------------------------

OVERRIDES = {
    "training_tokens": 4096, "train_batch_size_tokens": 512, "sae.d_sae": 128, "sae.k": 8,
    "sae.calibration_tokens": 1024, "n_batches_in_buffer": 8, "store_batch_size_prompts": 4,
    "n_checkpoints": 1,
}
CONFIG = "configs/embedded-mutual-choice.yaml"


def _torchrun(tmp: Path, name: str, **extra) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    overrides = {**OVERRIDES, "sae.latent_shards": 2, "checkpoint_path": tmp / f"{name}-ckpt",
                 "output_path": tmp / name, **extra}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", str(port), "-m", "sae_lens_allocation", "train", CONFIG]
    for key, value in overrides.items():
        command += ["--set", f"{key}={value}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SAE_LENS_ALLOCATION_DP_TIMEOUT": "120"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_torchrun_latent_shards_resume_exactly_and_export_the_unsharded_sae(tmp_path):
    """W = 2 ranks, S = 2 shards: every rank writes its checkpoint folder; a run resumed from the
    checkpoint exports exactly the uninterrupted run's SAE; both equal the unsharded one-process
    run of the same config (same rows: D = 1) to float rounding of the training sums."""
    from sae_lens_allocation.training.runner import train
    from sae_lens_allocation.training.sources import runner_sources
    from sae_lens_allocation.yaml_config import load_runner_config

    done = _torchrun(tmp_path, "full")
    assert done.stdout.count("exported SAE:") == 1
    (checkpoint,) = (tmp_path / "full-ckpt").iterdir()
    assert json.loads((checkpoint / "latent_shards.json").read_text()) == {
        "world_size": 2, "data_parallel_size": 1, "latent_shards": 2}
    for rank in range(2):
        files = {p.name for p in (checkpoint / f"rank_{rank}").iterdir()}
        assert {"sae_weights.safetensors", "trainer_state.pt", "resume_state.pt",
                "resume_store_state.pt"} <= files
    _torchrun(tmp_path, "resumed", resume_from_checkpoint=checkpoint)
    full = load_file(tmp_path / "full" / "sae_weights.safetensors")
    resumed = load_file(tmp_path / "resumed" / "sae_weights.safetensors")
    for name, tensor in full.items():
        assert torch.equal(resumed[name], tensor), name
    resumed_cfg = json.loads((tmp_path / "resumed" / "cfg.json").read_text())
    assert resumed_cfg["metadata"]["training"]["resumes"][0]["checkpoint"] == str(checkpoint)

    cfg = load_runner_config(CONFIG, [f"{k}={v}" for k, v in {
        **OVERRIDES, "checkpoint_path": tmp_path / "one-ckpt", "output_path": tmp_path / "one"}.items()])
    # Built before the seed, as the torchrun path builds it (runner_sources): the embedded model's
    # construction draws from the RNG, so a one-process `train` that builds it after the seed
    # starts from another initialisation.
    model, dataset = runner_sources(cfg, None, None)
    train(cfg, override_model=model, override_dataset=dataset)
    one = load_file(tmp_path / "one" / "sae_weights.safetensors")
    worst = max(_relative_difference(tensor, full[name]) for name, tensor in one.items())
    print(f"sharded vs unsharded export: largest relative difference {worst:.2e}")
    assert worst <= 1e-5
