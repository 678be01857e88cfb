"""Latent sharding: parameter + optimizer memory per rank at S = 1, 2, 4 latent shards.

S gloo processes on one machine (CPU) train a mutual_choice SAE of one shape (d_in x F), each
rank its shard of F / S latents (`LatentShardedSAETrainer`), for a few steps of random rows. After
the steps every rank counts the bytes of what it holds for the model: its parameters, their
gradients and Adam's two moments (the storages of the tensors themselves, so the count is exact),
and reports its peak resident memory (ru_maxrss, which also holds Python, torch and the batch).
The table gives the largest rank's numbers; the rule says they fall as 1/S except b_dec (d_in
floats per tensor, replicated).

    python benchmarks/latent_shards_memory.py                    # d_in 512, F 65536
    python benchmarks/latent_shards_memory.py --d-in 256 --d-sae 16384 --shards 1 2
"""

from __future__ import annotations

import argparse
import datetime
import platform
import resource
import socket
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, shards: int, port: int, args: argparse.Namespace, out: str) -> None:
    from sae_lens.config import SAETrainerConfig
    from sae_lens.registry import get_sae_training_class

    import sae_lens_allocation  # noqa: F401  (registers the architectures)
    from sae_lens_allocation.allocation.latent_merge import ShardedBatchGroup
    from sae_lens_allocation.training.latent_shards import LatentShardedSAETrainer, local_config

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=shards, timeout=datetime.timedelta(seconds=600))
    torch.set_num_threads(1)
    group = ShardedBatchGroup.from_default_group(shards)
    sae_class, cfg_class = get_sae_training_class("mutual_choice")
    # The global config of the measured shape, validated, then this shard's view of it.
    cfg = cfg_class(d_in=args.d_in, d_sae=args.d_sae, k=8.0, latent_shards=shards)
    torch.manual_seed(rank)
    sae = sae_class(local_config(cfg))
    rows = torch.randn(args.steps, args.rows, args.d_in)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=args.steps * args.rows, train_batch_size_samples=args.rows,
        lr=1e-4, lr_end=1e-4, n_batches_for_norm_estimate=1,
    )
    trainer = LatentShardedSAETrainer(trainer_cfg, sae, iter(rows), group)
    for batch in rows:
        trainer.step(batch)
    params = sum(p.numel() * p.element_size() for p in sae.parameters())
    # One gradient per parameter exists from the backward pass to zero_grad (freed after the step).
    grads = params
    adam = sum(
        t.numel() * t.element_size()
        for state in trainer.optimizer.state.values() for t in state.values()
        if isinstance(t, torch.Tensor) and t.dim() > 0
    )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(out, f"rank{rank}.txt").write_text(f"{sae.cfg.d_sae} {params} {grads} {adam} {rss}\n")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-in", type=int, default=512)
    parser.add_argument("--d-sae", type=int, default=65536)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    print(f"mutual_choice, d_in {args.d_in}, d_sae {args.d_sae}, {args.rows} rows per step, float32; "
          f"{platform.processor() or platform.machine()}, {torch.__version__}")
    print("| S | latents per rank | parameters | gradients | Adam moments | sum | sum x S / sum at S=1 "
          "| peak RSS |")
    print("|---|---|---|---|---|---|---|---|")
    first = None
    for shards in args.shards:
        with tempfile.TemporaryDirectory() as out, socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            s.close()
            mp.start_processes(_worker, args=(shards, port, args, out), nprocs=shards,
                               start_method="spawn")
            ranks = [list(map(int, Path(out, f"rank{r}.txt").read_text().split())) for r in range(shards)]
        local, params, grads, adam, rss = max(ranks, key=lambda r: r[1] + r[2] + r[3])
        total = params + grads + adam
        first = first or total
        mib = 2**20
        print(f"| {shards} | {local} | {params / mib:.1f} MiB | {grads / mib:.1f} MiB | "
              f"{adam / mib:.1f} MiB | {total / mib:.1f} MiB | {total * shards / first:.4f} | "
              f"{rss / mib:.0f} MiB |")


if __name__ == "__main__":
    main()
