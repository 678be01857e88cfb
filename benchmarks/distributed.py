"""Data-parallel allocation: what each rank sends per step, and how long the step takes.

W processes on one machine (gloo on CPU), each holding N / W rows of a global batch of
pre-activations z (N x F, standard normal). Per step and per rank, timed as the slowest rank:

- ours: `BatchGroup.mutual_choice` / `.feature_choice` (allocation/global_merge.py): local top set,
  one all-gather of the candidate values (at most M = floor(k N) per rank), merge, own codes;
- all-gather: the exact alternative that ships the matrix: all-gather the full N x F z, run the
  single-process kernel (allocation/rules.py) on it, keep the own rows;
- W = 1 only: SAELens' BatchTopK operator (relu, torch.topk over N x F, scatter), the built-in
  the kernels are compared with, and the single-process kernels.

"sent" is the payload each rank puts into the collectives of one step (the candidate values
plus two 8-byte row counts for ours; its n_r x F slice for the all-gather). A ring all-gather
moves (W - 1) times the payload per rank over the wire, for both methods alike. Every run
checks once that ours and the all-gather give identical codes on every rank.

    python benchmarks/distributed.py              # GPT-2-small shapes: N 4096, F 24576, k 32
    python benchmarks/distributed.py --n 1024     # smaller, about 4x faster
    python benchmarks/distributed.py --world 1 2 --repeats 5 --threads 1 --json out.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sae_lens_allocation.allocation import (
    BatchGroup,
    budget,
    feature_choice,
    mutual_choice,
    uniform_capacities,
)

_SEED = 0


def _global_z(n: int, f: int) -> torch.Tensor:
    return torch.randn(n, f, generator=torch.Generator().manual_seed(_SEED))


def _max(group: BatchGroup, seconds: float) -> float:
    """The step takes as long as its slowest rank."""
    return max(float(t) for t in group.all_gather(torch.tensor([seconds], dtype=torch.float64)))


def _timed(group: BatchGroup, fn: Callable[[], Any]) -> float:
    group.barrier()
    start = time.perf_counter()
    fn()
    return _max(group, time.perf_counter() - start)


def _all_gather_then(
    group: BatchGroup, z: torch.Tensor, kernel: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    full = torch.cat(group.all_gather(z))
    rows = z.shape[0]
    return kernel(full)[group.rank * rows : (group.rank + 1) * rows]


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(minutes=10),
    )
    group = BatchGroup.from_default_group()
    rows = args.n // world
    z = _global_z(args.n, args.f)[rank * rows : (rank + 1) * rows].clone()
    caps = uniform_capacities(args.n, args.f, args.k, torch.Generator().manual_seed(1))
    m = budget(args.n, args.k)

    def ours_mc() -> torch.Tensor:
        return group.mutual_choice(z, args.k).codes

    def ours_fc() -> torch.Tensor:
        return group.feature_choice(z, caps).codes

    def gather_mc() -> torch.Tensor:
        return _all_gather_then(group, z, lambda full: mutual_choice(full, args.k).codes)

    def gather_fc() -> torch.Tensor:
        return _all_gather_then(group, z, lambda full: feature_choice(full, caps).codes)

    # With W = 1 nothing is exchanged: the group runs the single-process kernels directly.
    alone = world == 1
    same_mc = torch.equal(ours_mc(), gather_mc())
    sent_mc = 0 if alone else group.last_sent_values * z.element_size() + 16
    same_fc = torch.equal(ours_fc(), gather_fc())
    sent_fc = 0 if alone else group.last_sent_values * z.element_size() + 8
    methods: dict[str, Callable[[], Any]] = {
        "mutual_choice ours": ours_mc,
        "mutual_choice all-gather": gather_mc,
        "feature_choice ours": ours_fc,
        "feature_choice all-gather": gather_fc,
    }
    if world == 1:
        from sae_lens.saes.batchtopk_sae import BatchTopK

        batchtopk = BatchTopK(args.k)
        methods["SAELens BatchTopK (W=1)"] = lambda: batchtopk(z)
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.repeats):
        # Interleaved, so drift in the machine's load hits every method alike.
        for name, fn in methods.items():
            times[name].append(_timed(group, fn))
    if rank == 0:
        result = {
            "world": world,
            "rows_per_rank": rows,
            "budget_M": m,
            "identical_codes": {"mutual_choice": same_mc, "feature_choice": same_fc},
            "sent_bytes_per_rank": {
                "mutual_choice ours": sent_mc,
                "feature_choice ours": sent_fc,
                "all-gather": 0 if alone else z.numel() * z.element_size(),
            },
            "median_s": {name: statistics.median(t) for name, t in times.items()},
        }
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def _run(world: int, args: argparse.Namespace) -> dict[str, Any]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = Path(f"/tmp/dp-bench-{os.getpid()}-{world}.json")
    mp.start_processes(_worker, args=(world, port, args, str(out)), nprocs=world, start_method="spawn")
    result = json.loads(out.read_text())
    out.unlink()
    return result


def _machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(
            line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} logical CPUs, torch {torch.__version__}"


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096, help="global batch rows N")
    parser.add_argument("--f", type=int, default=24576, help="latents F (d_sae)")
    parser.add_argument("--k", type=float, default=32.0)
    parser.add_argument("--world", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    load_before = os.getloadavg()
    results = [_run(world, args) for world in args.world]
    load_after = os.getloadavg()
    print(f"machine: {_machine()}; load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    print(f"N={args.n} F={args.f} k={args.k:g} (M={budget(args.n, args.k)}), {args.threads} thread(s) "
          f"per rank, median of {args.repeats}, slowest rank per step")
    for r in results:
        print(f"\nW={r['world']} ({r['rows_per_rank']} rows per rank); identical codes: {r['identical_codes']}")
        sent, med = r["sent_bytes_per_rank"], r["median_s"]
        for rule in ("mutual_choice", "feature_choice"):
            ours, gathered = med[f"{rule} ours"], med[f"{rule} all-gather"]
            print(
                f"  {rule:15s} ours {ours * 1e3:8.1f} ms, sent {_mib(sent[f'{rule} ours']):>11s} | "
                f"all-gather {gathered * 1e3:8.1f} ms, sent {_mib(sent['all-gather']):>11s} | "
                f"time ratio {gathered / ours:5.2f}x, bytes ratio "
                + (f"{sent['all-gather'] / sent[f'{rule} ours']:6.1f}x" if sent["all-gather"] else "   n/a")
            )
        if "SAELens BatchTopK (W=1)" in med:
            ref = med["SAELens BatchTopK (W=1)"]
            print(f"  SAELens BatchTopK {ref * 1e3:8.1f} ms "
                  f"(mutual_choice ours: {ref / med['mutual_choice ours']:.2f}x faster)")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results,
                                         "machine": _machine(), "load": [load_before, load_after]}, indent=2))
    return results


if __name__ == "__main__":
    main()
