"""Latent sharding (docs/distributed.md#latent-sharding): the allocation over latents split across
ranks equals the unsharded one bit for bit, and gloo processes on a data x latents mesh train the
weights of one process on the global batch; a per-shard allocation without the exchange does not."""

from __future__ import annotations

import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_distributed import (
    N_ROWS,
    _build_sae,
    _global_batches,
    _reference,
    _relative_difference,
    _trainer_cfg,
)

from sae_lens_allocation.allocation import budget, mutual_choice
from sae_lens_allocation.allocation.global_merge import cutoff_counts, local_mutual_choice
from sae_lens_allocation.allocation.latent_merge import merge_row_topk, resolve_ties
from sae_lens_allocation.training.latent_shards import (
    latent_dim,
    local_config,
    merge_state_dicts,
    shard_state_dict,
)

# --- the merge rules with simulated blocks ---------------------------------------------------


def _simulated_block_mutual_choice(z: torch.Tensor, k: float, row_sizes: list[int], shards: int):
    """Codes of the N x F matrix from its (row block, latent shard) blocks, by the rule of
    allocation/latent_merge.py, with every rank simulated in turn."""
    n, f = z.shape
    width = f // shards
    m = min(budget(n, k), n * f)
    blocks, offsets, start = [], [], 0
    for rows in row_sizes:
        for s in range(shards):
            blocks.append(z[start : start + rows, s * width : (s + 1) * width])
            offsets.append((start, s * width))
        start += rows
    candidates = [local_mutual_choice(b, m) for b in blocks]
    values = [c.values for c in candidates]
    _, greater, ties = cutoff_counts(values, m)
    slots = m - sum(greater)
    tied = []
    for c, g, e, (row0, col0) in zip(candidates, greater, ties, offsets):
        index = c.index[g : g + e]
        tied.append((row0 + index // width) * f + col0 + index % width)
    kept = resolve_ties(greater, ties, slots, tied)
    out = torch.zeros_like(z)
    for c, keep, b, (row0, col0) in zip(candidates, kept, blocks, offsets):
        mask = torch.arange(c.index.numel()) < keep
        out[row0 : row0 + b.shape[0], col0 : col0 + width] = c.codes(b, mask)
    return out


@st.composite
def block_batches(draw):
    shards = draw(st.sampled_from([1, 2, 3]))
    width = draw(st.integers(1, 5))
    row_sizes = draw(st.lists(st.integers(0, 6), min_size=1, max_size=3))
    n = sum(row_sizes)
    # Few distinct values: heavy ties across blocks, the case the index round settles.
    values = draw(st.lists(st.integers(-2, 3), min_size=n * shards * width, max_size=n * shards * width))
    z = torch.tensor(values, dtype=torch.float32).reshape(n, shards * width)
    return z, row_sizes, shards


@settings(max_examples=150, deadline=None)
@given(block_batches(), st.sampled_from([0.5, 1.0, 2.0, 7.0]))
def test_block_mutual_choice_equals_the_unsharded_rule_exactly(batch, k):
    z, row_sizes, shards = batch
    got = _simulated_block_mutual_choice(z, k, row_sizes, shards)
    assert torch.equal(got, mutual_choice(z, k).codes)


def test_row_topk_merge_is_the_top_k_by_value_then_lowest_latent():
    values = torch.tensor([[3.0, 1.0, 3.0, 2.0], [0.0, 5.0, 5.0, 5.0]])
    latents = torch.tensor([[7, 0, 2, 5], [1, 9, 3, 4]])
    assert merge_row_topk(values, latents, 2).tolist() == [[2, 7], [3, 4]]


def test_shard_layout_splits_latents_and_refuses_unknown_shapes():
    sae = _build_sae("mutual_choice", seed=0)
    state = sae.state_dict()
    shards = [shard_state_dict(state, 64, s, 4) for s in range(4)]
    assert shards[1]["W_enc"].shape == (16, 16) and shards[1]["W_dec"].shape == (16, 16)
    assert torch.equal(shards[2]["b_dec"], state["b_dec"])
    merged = merge_state_dicts(shards, 64)
    assert all(torch.equal(merged[name], state[name]) for name in state)
    with pytest.raises(ValueError, match="not known to be per-latent"):
        latent_dim("mystery", torch.zeros(5), 64)
    sae.cfg.latent_shards = 4
    assert local_config(sae.cfg).d_sae == 16 and sae.cfg.d_sae == 64


@pytest.mark.parametrize("architecture", ["mutual_choice", "feature_choice", "topk_aux", "gradient_topk"])
def test_latent_shards_must_divide_d_sae(architecture):
    from support import plugin_sae

    with pytest.raises(ValueError, match="latent_shards=3.*divisor of d_sae"):
        plugin_sae(architecture, d_in=16, d_sae=64, k=4, latent_shards=3)
    with pytest.raises(ValueError, match="latent_shards=0"):
        plugin_sae(architecture, d_in=16, d_sae=64, k=4, latent_shards=0)


def test_feature_choice_thresholds_rule_refuses_latent_shards():
    from support import plugin_sae

    with pytest.raises(ValueError, match="latent_shards=2.*training_rule='thresholds'"):
        plugin_sae("feature_choice", d_in=16, d_sae=64, k=4.0, training_rule="thresholds",
                   latent_shards=2)


# --- real processes: gloo on CPU, a data x latents mesh --------------------------------------

#: 2 processes, latents split 2 ways.
SHARDED_VARIANTS = [
    "mutual_choice", "mutual_choice_floor", "mutual_choice_sparse", "feature_choice_uniform",
    "feature_choice_zipf", "topk_aux", "gradient_topk", "gradient_topk_sparse",
]
#: 4 processes, 2 data x 2 latent shards.
MESH_VARIANTS = ["mutual_choice", "feature_choice_uniform", "feature_choice_zipf"]


def _naive_group(group):
    """A per-shard Mutual Choice without the exchange: each shard keeps the top floor(k N / S)
    of its own N x F / S block, its share of the budget."""
    from sae_lens_allocation.allocation import BatchGroup
    from sae_lens_allocation.allocation.latent_merge import ShardedBatchGroup

    class PerShardGroup(ShardedBatchGroup):
        def mutual_choice(self, pre_acts, k):
            return BatchGroup.mutual_choice(self, pre_acts, k / self.shards)

    return PerShardGroup(BatchGroup(group.process_group), group.latents, group.world)


def _mesh_worker(rank: int, world: int, shards: int, port: int, out_dir: str, variants: list[str]) -> None:
    import datetime

    import torch.distributed as dist

    from sae_lens_allocation.allocation.latent_merge import ShardedBatchGroup
    from sae_lens_allocation.training.latent_shards import LatentShardedSAETrainer

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    torch.set_num_threads(1)
    group = ShardedBatchGroup.from_default_group(shards)
    data_rank, share = rank // shards, N_ROWS // (world // shards)
    runs = [(v, group) for v in variants] + ([("naive", _naive_group(group))] if world == shards else [])
    for variant, run_group in runs:
        arch = "mutual_choice" if variant == "naive" else variant
        rows = _global_batches(arch)[:, data_rank * share : (data_rank + 1) * share]
        full = _build_sae(arch, seed=0)
        full.cfg.latent_shards = shards
        sae = type(full)(local_config(full.cfg))
        sae.load_state_dict(shard_state_dict(full.state_dict(), full.cfg.d_sae, group.shard, shards))
        # Shards of one latent group read different rows here: the trainer must use shard 0's.
        provider = iter(rows if group.shard == 0 else rows.flip(1))
        trainer = LatentShardedSAETrainer(_trainer_cfg(), sae, provider, run_group)
        trainer.fit()
        torch.save(
            {"state": sae.state_dict(), "dead": trainer.dead_neurons, "freq": trainer.act_freq_scores},
            f"{out_dir}/{variant}-rank{rank}.pt",
        )
    dist.destroy_process_group()


def _launch(tmp_path_factory, world: int, shards: int, variants: list[str]):
    import socket

    import torch.multiprocessing as mp

    out_dir = tmp_path_factory.mktemp(f"mesh{world}x{shards}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.start_processes(
        _mesh_worker, args=(world, shards, port, str(out_dir), variants), nprocs=world, join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + 600
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("latent-sharded workers did not finish within 600 s")
    return out_dir


@pytest.fixture(scope="module")
def two_shards(tmp_path_factory):
    return _launch(tmp_path_factory, world=2, shards=2, variants=SHARDED_VARIANTS)


@pytest.fixture(scope="module")
def mesh_2x2(tmp_path_factory):
    return _launch(tmp_path_factory, world=4, shards=2, variants=MESH_VARIANTS)


def _merged(out_dir, variant: str, world: int, shards: int) -> list[dict]:
    """Each data rank's run, its latent shards merged into one unsharded state."""
    runs = []
    for data_rank in range(world // shards):
        parts = [torch.load(out_dir / f"{variant}-rank{data_rank * shards + s}.pt") for s in range(shards)]
        runs.append({
            "state": merge_state_dicts([p["state"] for p in parts], shards * parts[0]["freq"].numel()),
            "dead": torch.cat([p["dead"] for p in parts]),
            "freq": torch.cat([p["freq"] for p in parts]),
        })
    return runs


def _largest_difference(reference: dict, run: dict) -> float:
    worst = 0.0
    for name, expected in reference["state"].items():
        got = run["state"][name]
        if expected.is_floating_point():
            worst = max(worst, _relative_difference(expected, got))
        else:
            assert torch.equal(expected, got), name
    return worst


def _check_equal(out_dir, variant: str, world: int, shards: int) -> None:
    reference = _reference(variant)
    for run in _merged(out_dir, variant, world, shards):
        worst = _largest_difference(reference, run)
        print(f"{variant} {world // shards}x{shards}: largest relative difference {worst:.2e}")
        assert worst <= 1e-5, variant
        assert torch.equal(run["dead"], reference["dead"])
        assert torch.equal(run["freq"], reference["freq"])


@pytest.mark.slow
@pytest.mark.parametrize("variant", SHARDED_VARIANTS)
def test_two_latent_shards_train_the_weights_of_one_process(two_shards, variant):
    _check_equal(two_shards, variant, world=2, shards=2)


@pytest.mark.slow
@pytest.mark.parametrize("variant", MESH_VARIANTS)
def test_a_2x2_mesh_trains_the_weights_of_one_process(mesh_2x2, variant):
    _check_equal(mesh_2x2, variant, world=4, shards=2)


@pytest.mark.slow
def test_per_shard_allocation_without_the_exchange_is_not_the_unsharded_run(two_shards):
    reference = _reference("mutual_choice")
    (run,) = _merged(two_shards, "naive", world=2, shards=2)
    worst = _largest_difference(reference, run)
    print(f"per-shard Mutual Choice: largest relative difference {worst:.2e}")
    assert worst > 1e-3


def test_latent_shards_need_a_divisor_of_the_processes_in_one_line(monkeypatch):
    from sae_lens_allocation.training.runner import check_latent_shards
    from sae_lens_allocation.validation import UsageError

    check_latent_shards(1)
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(UsageError, match=r"sae.latent_shards=2 .*divisor of the number of processes \(3") as error:
        check_latent_shards(2)
    assert "\n" not in str(error.value)
    monkeypatch.setenv("WORLD_SIZE", "4")
    check_latent_shards(2)


def test_a_sharded_config_refuses_what_it_cannot_honour_in_one_line(tmp_path):
    from sae_lens_allocation.training.latent_shard_runner import check_latent_sharded_config
    from sae_lens_allocation.validation import UsageError

    from support import runner_cfg

    cfg = runner_cfg("mutual_choice", tmp_path, sae_latent_shards=2)
    check_latent_sharded_config(cfg, 4)
    with pytest.raises(UsageError, match=r"sae.latent_shards=2 .*divisor of the number of processes \(3\)"):
        check_latent_sharded_config(cfg, 3)
    cfg.logger.log_to_wandb = True
    with pytest.raises(UsageError, match="logger.log_to_wandb=True") as error:
        check_latent_sharded_config(cfg, 2)
    assert "\n" not in str(error.value)


def test_a_checkpoint_resumes_only_on_the_mesh_that_wrote_it(tmp_path, monkeypatch):
    import json

    from sae_lens_allocation.training.resume import sharded_checkpoint_rank
    from sae_lens_allocation.validation import UsageError

    assert sharded_checkpoint_rank(tmp_path, 0, 1) == tmp_path
    with pytest.raises(UsageError, match="a checkpoint of a latent-sharded run"):
        sharded_checkpoint_rank(tmp_path, 0, 2)
    (tmp_path / "latent_shards.json").write_text(json.dumps(
        {"world_size": 4, "data_parallel_size": 2, "latent_shards": 2}))
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert sharded_checkpoint_rank(tmp_path, 3, 2) == tmp_path / "rank_3"
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="written by .*'world_size': 4"):
        sharded_checkpoint_rank(tmp_path, 0, 2)
    with pytest.raises(UsageError, match="written by"):
        sharded_checkpoint_rank(tmp_path, 0, 1)
