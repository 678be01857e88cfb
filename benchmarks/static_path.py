"""The static-shape allocation path (what runs on a GPU) of this tree against the same path at
an earlier git revision, in one run, interleaved, with SAELens' BatchTopK operator alongside.

On a CPU the static path is forced (it is the GPU path; the CPU path, which `allocation.py`
benchmarks, is not involved). Prints median milliseconds and the ratio old / new per kernel.

    python benchmarks/static_path.py --before 9851838            # N 4096, F 24576, k 32
    python benchmarks/static_path.py --before 9851838 --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
from cpu_path import module_at
from sae_lens.saes.batchtopk_sae import BatchTopK

from sae_lens_allocation.allocation import static, uniform_capacities


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="git revision to compare against")
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--f", type=int, default=24576)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    before = module_at(args.before, "sae_lens_allocation/allocation/static.py")
    z = torch.randn(args.n, args.f, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    m = args.n * args.k
    caps = uniform_capacities(args.n, args.f, args.k, torch.Generator().manual_seed(1))
    kernels = {
        "batchtopk": lambda: BatchTopK(args.k)(z),
        "mc_before": lambda: before._mutual_choice_static(z, m),
        "mc_now": lambda: static._mutual_choice_static(z, m),
        "fc_before": lambda: before._feature_choice_static(z, caps),
        "fc_now": lambda: static._feature_choice_static(z, caps),
    }
    for fn in kernels.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in kernels}
    for _ in range(args.repeats):
        for name, fn in kernels.items():
            times[name].append(timed(fn, device))
    ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.2f}; "
          f"{args.device} {args.dtype}, N {args.n}, F {args.f}, k {args.k}, median of {args.repeats}")
    for name, value in ms.items():
        print(f"{name:10s} {value:9.1f} ms")
    print(f"mutual choice: before / now {ms['mc_before'] / ms['mc_now']:.2f}; "
          f"batchtopk / now {ms['batchtopk'] / ms['mc_now']:.2f}")
    print(f"feature choice: before / now {ms['fc_before'] / ms['fc_now']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
