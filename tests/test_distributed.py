"""Data-parallel training: exact global allocation across ranks, and W processes training the
same weights as one process on the global batch (docs/distributed.md)."""

from __future__ import annotations

import os
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sae_lens_allocation.allocation import budget, feature_choice, mutual_choice, zipf_capacities
from sae_lens_allocation.allocation.global_merge import (
    feature_choice_keep,
    local_feature_choice,
    local_mutual_choice,
    merge_feature_choice,
    merge_mutual_choice,
    prefix_keep,
)

# --- the merge rule with simulated ranks -------------------------------------------------------


def _split(z: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(torch.split(z, sizes, dim=0))


def simulated_mutual_choice(z: torch.Tensor, k: float, sizes: list[int]):
    """What W ranks holding rows `sizes` of z compute, concatenated in rank order."""
    shards = _split(z, sizes)
    m = min(budget(z.shape[0], k), z.numel())
    local = [local_mutual_choice(s, m) for s in shards]
    cutoff, kept = merge_mutual_choice([c.values for c in local], m)
    codes = [c.codes(s, prefix_keep(c, n)) for c, s, n in zip(local, shards, kept)]
    return torch.cat(codes), cutoff, sum(c.values.numel() for c in local)


def simulated_feature_choice(z: torch.Tensor, caps: torch.Tensor, sizes: list[int]):
    shards = _split(z, sizes)
    caps = caps.clamp(max=z.shape[0])
    local = [local_feature_choice(s, caps) for s in shards]
    counts = [caps.clamp(max=n) for n in sizes]
    cutoff, kept = merge_feature_choice([c.values for c in local], counts, caps)
    codes = [c.codes(s, feature_choice_keep(c, n)) for c, s, n in zip(local, shards, kept)]
    return torch.cat(codes), cutoff


@st.composite
def split_batches(draw, max_rows: int = 24, max_latents: int = 12):
    """A batch with many ties (small integer values, zeros, negatives) and a split into ranks
    (some ranks may hold no rows)."""
    n = draw(st.integers(1, max_rows))
    f = draw(st.integers(1, max_latents))
    levels = draw(st.integers(1, 5))
    values = draw(st.lists(st.integers(-2, levels), min_size=n * f, max_size=n * f))
    z = torch.tensor(values, dtype=torch.float32).view(n, f) / 2
    w = draw(st.integers(1, 4))
    cuts = sorted(draw(st.lists(st.integers(0, n), min_size=w - 1, max_size=w - 1)))
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, n])]
    return z, sizes


@settings(max_examples=150, deadline=None)
@given(batch=split_batches(), k=st.floats(0, 8, allow_nan=False))
def test_global_mutual_choice_equals_single_process_exactly(batch, k):
    z, sizes = batch
    expected = mutual_choice(z, k)
    codes, cutoff, _ = simulated_mutual_choice(z, k, sizes)
    assert torch.equal(codes, expected.codes)
    assert torch.equal(cutoff, expected.cutoff)


@settings(max_examples=150, deadline=None)
@given(batch=split_batches(), data=st.data())
def test_global_feature_choice_equals_single_process_exactly(batch, data):
    z, sizes = batch
    caps = torch.tensor(
        data.draw(st.lists(st.integers(0, z.shape[0] + 2), min_size=z.shape[1], max_size=z.shape[1]))
    )
    expected = feature_choice(z, caps)
    codes, cutoff = simulated_feature_choice(z, caps, sizes)
    assert torch.equal(codes, expected.codes)
    assert torch.equal(cutoff, expected.cutoff)


def test_fast_paths_and_the_volume_sent():
    """Shapes large enough for the allocation package's candidate paths; the candidates sent are at most
    M per rank (MC) and sum_j min(m_j, n_r) (FC), not the n_r x F matrix."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(512, 512, generator=g)
    z[100:140] = z[100:140].round()  # ties at the cut-off
    sizes = [256, 128, 128]
    k = 6.0
    codes, cutoff, sent = simulated_mutual_choice(z, k, sizes)
    expected = mutual_choice(z, k)
    assert torch.equal(codes, expected.codes) and torch.equal(cutoff, expected.cutoff)
    assert sent <= len(sizes) * budget(512, k) < z.numel() // 20

    ranks = torch.randperm(512, generator=g) + 1
    caps = zipf_capacities(512, k, ranks, 1.0, torch.Generator().manual_seed(1))
    codes, cutoff = simulated_feature_choice(z, caps, sizes)
    expected = feature_choice(z, caps)
    assert torch.equal(codes, expected.codes) and torch.equal(cutoff, expected.cutoff)


def test_gradient_flows_through_the_kept_values_only():
    z = torch.randn(16, 8, generator=torch.Generator().manual_seed(3), requires_grad=True)
    codes, _, _ = simulated_mutual_choice(z, 2.0, [8, 8])
    codes.sum().backward()
    assert torch.equal(z.grad, (mutual_choice(z.detach(), 2.0).codes > 0).float())


# --- real processes: gloo on CPU -------------------------------------------------------------

D_IN, D_SAE, N_ROWS, STEPS = 16, 64, 128, 20
NORM_BATCHES = 2

VARIANTS = {
    "mutual_choice": {
        "architecture": "mutual_choice", "k": 4.0, "aux_loss": "aux_zipf",
        "normalize_activations": "expected_average_only_in",
    },
    "feature_choice_uniform": {"architecture": "feature_choice", "k": 4.0, "capacity": "uniform"},
    "feature_choice_zipf": {"architecture": "feature_choice", "k": 4.0, "capacity": "zipf"},
    "feature_choice_thresholds": {
        "architecture": "feature_choice", "k": 4.0, "training_rule": "thresholds",
    },
    "mutual_choice_floor": {"architecture": "mutual_choice", "k": 4.0, "min_tokens_per_latent": 1},
    "topk_aux": {"architecture": "topk_aux", "k": 4, "aux_loss": "aux_k"},
    "gradient_topk": {"architecture": "gradient_topk", "k": 4, "beta": 1.0},
    # The sparse step (saes/sparse_codes.py): firing counts from sparse codes, sparse gradients.
    "mutual_choice_sparse": {
        "architecture": "mutual_choice", "k": 4.0, "aux_loss": "aux_zipf",
        "use_sparse_activations": True,
    },
    "gradient_topk_sparse": {
        "architecture": "gradient_topk", "k": 4, "beta": 1.0, "use_sparse_activations": True,
    },
}


def _build_sae(variant: str, seed: int):
    from support import plugin_sae

    # A short firing-EMA window so aux_zipf's Zipf rule and the dead mask act within 20 steps.
    return plugin_sae(seed=seed, d_in=D_IN, d_sae=D_SAE, firing_ema_decay=0.8, **VARIANTS[variant])


def _trainer_cfg():
    from sae_lens.config import SAETrainerConfig

    return SAETrainerConfig(
        total_training_samples=STEPS * N_ROWS, train_batch_size_samples=N_ROWS, lr=3e-3,
        lr_end=3e-3, dead_feature_window=4, feature_sampling_window=10,
        n_batches_for_norm_estimate=NORM_BATCHES,
    )


def _global_batches(variant: str) -> torch.Tensor:
    """[batches, N, width] rows with a few strong directions, so latents compete and die."""
    g = torch.Generator().manual_seed(7)
    width = 2 * D_IN if variant.startswith("gradient_topk") else D_IN
    codes = torch.rand(STEPS + NORM_BATCHES, N_ROWS, 8, generator=g).pow(4)
    return codes @ torch.randn(8, width, generator=g) * 3 + 0.1 * torch.randn(
        STEPS + NORM_BATCHES, N_ROWS, width, generator=g
    )


def _dp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import datetime

    import torch.distributed as dist

    from sae_lens_allocation.allocation import BatchGroup, DataParallelError
    from sae_lens_allocation.training.distributed import DataParallelSAETrainer

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=30),
    )
    torch.set_num_threads(1)
    group = BatchGroup.from_default_group()
    share = N_ROWS // world
    for variant in VARIANTS:
        rows = _global_batches(variant)[:, rank * share : (rank + 1) * share]
        # A different seed on each rank: the trainer must start every rank from rank 0's SAE.
        sae = _build_sae(variant, seed=rank)
        trainer = DataParallelSAETrainer(_trainer_cfg(), sae, iter(rows), group)
        trainer.fit()
        torch.save(
            {"state": sae.state_dict(), "dead": trainer.dead_neurons, "freq": trainer.act_freq_scores},
            f"{out_dir}/{variant}-rank{rank}.pt",
        )
    # A rank that dies: the other one stops with a clear error instead of hanging.
    sae = _build_sae("mutual_choice", seed=0)
    rows = _global_batches("mutual_choice")[:, rank * share : (rank + 1) * share]

    def dying():
        for step, batch in enumerate(rows):
            if rank == 1 and step == NORM_BATCHES + 3:
                os._exit(0)
            yield batch

    try:
        DataParallelSAETrainer(_trainer_cfg(), sae, dying(), group).fit()
    except DataParallelError as error:
        with open(f"{out_dir}/dead-rank{rank}.txt", "w") as f:
            f.write(str(error))


def _reference(variant: str) -> dict:
    """W = 1: SAELens' own SAETrainer on the global batches."""
    from sae_lens.training.sae_trainer import SAETrainer

    sae = _build_sae(variant, seed=0)
    trainer = SAETrainer(_trainer_cfg(), sae, iter(_global_batches(variant)))
    trainer.fit()
    return {"state": sae.state_dict(), "dead": trainer.dead_neurons, "freq": trainer.act_freq_scores}


def _relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / a.norm().clamp_min(1e-30))


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    import socket

    import torch.multiprocessing as mp

    out_dir = tmp_path_factory.mktemp("dp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.start_processes(_dp_worker, args=(2, port, str(out_dir)), nprocs=2, join=False, start_method="spawn")
    # The join loop has its own limit, so a hang fails the test instead of stalling the suite.
    deadline = time.monotonic() + 600
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("data-parallel workers did not finish within 600 s")
    return out_dir


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_ranks_train_the_weights_of_one_process_on_the_global_batch(two_rank_run, variant):
    reference = _reference(variant)
    ranks = [torch.load(two_rank_run / f"{variant}-rank{r}.pt") for r in range(2)]
    for name, expected in reference["state"].items():
        for rank in ranks:
            got = rank["state"][name]
            if expected.is_floating_point():
                assert _relative_difference(expected, got) < 1e-5, (variant, name)
            else:
                assert torch.equal(expected, got), (variant, name)
    for rank in ranks:
        assert torch.equal(rank["dead"], reference["dead"])
        assert torch.equal(rank["freq"], reference["freq"])
    # The run exercised what it claims to: latents died (global dead mask used by the aux losses),
    # except where every latent gets tokens in every batch (Feature Choice, the floor).
    keeps_every_latent = variant.startswith("feature_choice") or variant == "mutual_choice_floor"
    assert reference["dead"].any() or keeps_every_latent


@pytest.mark.slow
def test_a_dead_rank_makes_the_others_stop_with_a_clear_error(two_rank_run):
    message = (two_rank_run / "dead-rank0.txt").read_text()
    assert "rank 0 of 2" in message and "Another rank probably died" in message


# --- the command line under torchrun ------------------------------------------------------------


@pytest.mark.slow
def test_torchrun_trains_on_the_embedded_model_and_rank_0_writes(tmp_path):
    """`torchrun --nproc-per-node 2 -m sae_lens_allocation train CONFIG`: one checkpoint and
    one export, written by rank 0, the export calibrated on rows of both ranks."""
    import json
    import shutil
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from sae_lens_allocation import load_sae

    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        torchrun = shutil.which("torchrun")
    assert torchrun, "torchrun is installed with torch"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    overrides = {
        "training_tokens": 4096, "train_batch_size_tokens": 512, "sae.d_sae": 128, "sae.k": 8,
        "sae.calibration_tokens": 1024, "n_batches_in_buffer": 8, "store_batch_size_prompts": 4,
        "n_checkpoints": 1, "checkpoint_path": tmp_path / "ckpt", "output_path": tmp_path / "sae",
    }
    command = [
        str(torchrun), "--nproc-per-node", "2", "--master-port", str(port),
        "-m", "sae_lens_allocation", "train", "configs/embedded-mutual-choice.yaml",
    ]
    for key, value in overrides.items():
        command += ["--set", f"{key}={value}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SAE_LENS_ALLOCATION_DP_TIMEOUT": "120"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("exported SAE:") == 1
    checkpoints = list((tmp_path / "ckpt").iterdir())
    assert len(checkpoints) == 1 and (checkpoints[0] / "trainer_state.pt").is_file()
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu"
    calibration = cfg["metadata"]["calibration"]
    assert calibration["tokens"] == 1024 and calibration["ranks"] == 2
    runner_cfg = json.loads((tmp_path / "sae" / "runner_cfg.json").read_text())
    assert runner_cfg["train_batch_size_tokens"] == 512
    assert load_sae(tmp_path / "sae").cfg.d_sae == 128


def test_configs_that_data_parallel_cannot_honour_name_the_field(tmp_path):
    from sae_lens_allocation.training.distributed import check_data_parallel_config

    from support import runner_cfg

    with pytest.raises(ValueError, match="train_batch_size_tokens.*multiple of the number of processes \\(3\\)"):
        check_data_parallel_config(runner_cfg("mutual_choice", tmp_path), 3)
    with pytest.raises(ValueError, match="compile_sae"):
        check_data_parallel_config(runner_cfg("mutual_choice", tmp_path, compile_sae=True), 2)
    check_data_parallel_config(runner_cfg("mutual_choice", tmp_path), 2)


def test_a_multi_sae_config_under_torchrun_is_refused_in_one_line_before_training(tmp_path, monkeypatch, capsys):
    """Under torchrun (WORLD_SIZE > 1) every rank would otherwise train every SAE alone and write
    the same output paths."""
    from sae_lens_allocation_cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    code = main(["train", "configs/embedded-multi.yaml", "--set", f"output_path={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "cannot be trained under torchrun" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_torchrun_with_a_multi_sae_config_refuses_before_training(tmp_path):
    """Every rank refuses (the in-process test above); torchrun stops the other rank as soon as
    one has failed, so the message appears once or twice."""
    import shutil
    import socket
    import subprocess
    import sys
    from pathlib import Path

    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        torchrun = shutil.which("torchrun")
    assert torchrun, "torchrun is installed with torch"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run(
        [str(torchrun), "--nproc-per-node", "2", "--master-port", str(port), "-m", "sae_lens_allocation",
         "train", "configs/embedded-multi.yaml", "--set", f"output_path={tmp_path / 'out'}"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode != 0
    assert done.stderr.count("cannot be trained under torchrun") >= 1
    assert not (tmp_path / "out").exists()
