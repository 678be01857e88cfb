"""Time the allocation kernels against their `torch.topk` references, in one process.

Mutual Choice is timed against SAELens' own BatchTopK operator (`sae_lens.saes.batchtopk_sae.
BatchTopK`: relu, one `torch.topk` over the flattened N x F matrix, scatter into zeros); Feature
Choice against `torch.topk` down the batch dim with m_max = max_j m_j, then relu and scatter.
Inputs are standard normal, capacities uniform (`uniform_capacities`). Reference and kernel are
interleaved within every repeat so drift in machine load hits both alike; the table reports
medians and the speed ratio reference / kernel. Every shape is also checked once against the
reference: the same kept values (for every latent, for Feature Choice).

    python benchmarks/allocation.py          # N {1024,4096,16384} x F {8192,24576} x k {16,32,64}
    python benchmarks/allocation.py --quick  # the N=4096, F=24576, k=32 row only (about 1 min)
    python benchmarks/allocation.py --n 1024 4096  # about 8 min on 2 CPU cores (N=16384: 30 more)
    python benchmarks/allocation.py --n 4096 --threads 1 --json out.json
    python benchmarks/allocation.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch
from sae_lens.saes.batchtopk_sae import BatchTopK

from sae_lens_allocation.allocation import feature_choice, mutual_choice, uniform_capacities

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_JSON = Path(__file__).parent / "results" / "allocation.json"


def feature_choice_topk(pre_acts: torch.Tensor, capacities: torch.Tensor) -> torch.Tensor:
    """Reference Feature Choice: top-m_max down the batch with `torch.topk`, the first m_j kept."""
    z = pre_acts.reshape(-1, pre_acts.shape[-1])
    caps = capacities.clamp(max=z.shape[0])
    values, indices = torch.topk(z, int(caps.max()), dim=0)
    keep = torch.arange(values.shape[0], device=z.device)[:, None] < caps[None, :]
    return torch.zeros_like(z).scatter(0, indices, values.relu() * keep).reshape(pre_acts.shape)


def _same_selection(reference: torch.Tensor, codes: torch.Tensor, per_latent: bool) -> bool:
    """Same kept values: overall (Mutual Choice) or for every latent (Feature Choice). With tens of
    millions of fp32 entries a tie at a cut-off is likely, and the kernel keeps the lowest-index
    tied entry where `torch.topk` may keep another, so positions are not compared."""

    def kept(codes: torch.Tensor) -> torch.Tensor:
        flat = codes.reshape(-1)
        index = flat.nonzero().squeeze(1)
        values = flat[index].double()
        column = index % codes.shape[-1] if per_latent else torch.zeros_like(index)
        by_value = torch.sort(values, stable=True).indices
        order = by_value[torch.sort(column[by_value], stable=True).indices]
        return torch.stack([column[order].double(), values[order]])

    return torch.equal(kept(reference), kept(codes))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], torch.Tensor], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    elapsed = time.perf_counter() - start
    del out
    return elapsed


def _compare(
    label: str,
    reference: Callable[[], torch.Tensor],
    kernel: Callable[[], torch.Tensor],
    per_latent: bool,
    device: torch.device,
    repeats: int,
    warmup: int,
) -> dict[str, object]:
    if not _same_selection(reference(), kernel(), per_latent):
        raise AssertionError(f"{label}: kernel output differs from the torch.topk reference")
    for _ in range(warmup):
        _timed(reference, device)
        _timed(kernel, device)
    ref_times, kernel_times = [], []
    for _ in range(repeats):
        ref_times.append(_timed(reference, device))
        kernel_times.append(_timed(kernel, device))
    ref_med, kernel_med = statistics.median(ref_times), statistics.median(kernel_times)
    return {
        "reference_s": ref_med,
        "kernel_s": kernel_med,
        "ratio": ref_med / kernel_med,
        "reference_times_s": ref_times,
        "kernel_times_s": kernel_times,
    }


def _cells(row: dict[str, object]) -> str:
    ref, kernel, ratio = row["reference_s"], row["kernel_s"], row["ratio"]
    return f"{ref * 1e3:>8.1f}ms {kernel * 1e3:>7.1f}ms {ratio:>5.1f}x"  # type: ignore[operator]


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(
            line.split(":", 1)[1].strip()
            for line in lscpu.splitlines()
            if line.startswith("Model name")
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {torch.get_num_threads()} torch threads"


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--n", type=int, nargs="+", default=[1024, 4096, 16384], help="tokens N")
    parser.add_argument("--f", type=int, nargs="+", default=[8192, 24576], help="latents F")
    parser.add_argument("--k", type=float, nargs="+", default=[16, 32, 64], help="mean L0 k")
    parser.add_argument("--quick", action="store_true", help="only N=4096, F=24576, k=32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write results")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.f, args.k = [4096], [24576], [32]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    machine = _machine(device)
    print(f"device {device} ({machine}), dtype {args.dtype}, torch {torch.__version__}, "
          f"median of {args.repeats} (after {args.warmup} warm-up)")
    header = (
        f"{'N':>6} {'F':>6} {'k':>4} | {'BatchTopK':>10} {'MC':>9} {'ratio':>6} | "
        f"{'topk dim0':>10} {'FC':>9} {'ratio':>6}"
    )
    print(header)
    print("-" * len(header))
    rows: list[dict[str, object]] = []
    generator = torch.Generator().manual_seed(0)
    for n in args.n:
        for f in args.f:
            for k in args.k:
                x = torch.randn(n, f, generator=generator).to(device=device, dtype=dtype)
                caps = uniform_capacities(n, f, k, generator).to(device)
                batchtopk = BatchTopK(k)
                # x is bound as a default: ruff (F821) misreads a closure over a name deleted below.
                mc = _compare(
                    f"mutual_choice N={n} F={f} k={k}", lambda x=x: batchtopk(x),
                    lambda x=x: mutual_choice(x, k).codes, False, device, args.repeats, args.warmup,
                )
                fc = _compare(
                    f"feature_choice N={n} F={f} k={k}", lambda x=x: feature_choice_topk(x, caps),
                    lambda x=x: feature_choice(x, caps).codes, True, device, args.repeats, args.warmup,
                )
                del x
                rows.append({"n": n, "f": f, "k": k, "mutual_choice": mc, "feature_choice": fc})
                print(f"{n:>6} {f:>6} {k:>4g} | {_cells(mc)} | {_cells(fc)}", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    summary = {
        "device": str(device),
        "machine": machine,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "rows": rows,
    }
    args.json.write_text(json.dumps(summary, indent=1))
    print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
