"""The public CPU kernels (`mutual_choice`, `feature_choice`) of this tree against those of an
earlier git revision, in one run, interleaved (median ms, ratio before / now). The revision's
kernels are read from a file of that revision that defines both and imports only torch: the
flat `sae_lens_allocation/allocation.py` before the allocation package (eef4c61 and earlier).

    python benchmarks/cpu_path.py --before eef4c61          # N 4096, F 24576, k 32
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch

from sae_lens_allocation.allocation import feature_choice, mutual_choice, uniform_capacities

ROOT = Path(__file__).parents[1]


def module_at(revision: str, path: str) -> ModuleType:
    """The file `path` as it was at git `revision`, imported as a module of its own (beside the
    current package, whose modules it may import)."""
    source = subprocess.run(["git", "show", f"{revision}:{path}"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    file = Path(tempfile.mkdtemp()) / "kernels_before.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location("kernels_before", file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="git revision to compare against")
    parser.add_argument("--file", default="sae_lens_allocation/allocation.py")
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--f", type=int, default=24576)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    before = module_at(args.before, args.file)
    z = torch.randn(args.n, args.f, generator=torch.Generator().manual_seed(0))
    caps = uniform_capacities(args.n, args.f, args.k, torch.Generator().manual_seed(1))
    kernels = {
        "mc_before": lambda: before.mutual_choice(z, args.k),
        "mc_now": lambda: mutual_choice(z, args.k),
        "fc_before": lambda: before.feature_choice(z, caps),
        "fc_now": lambda: feature_choice(z, caps),
    }
    assert torch.equal(kernels["mc_before"]().codes, kernels["mc_now"]().codes)
    assert torch.equal(kernels["fc_before"]().codes, kernels["fc_now"]().codes)
    times: dict[str, list[float]] = {name: [] for name in kernels}
    for _ in range(args.repeats):
        for name, fn in kernels.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
    print(f"# {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, threads "
          f"{torch.get_num_threads()}, load {os.getloadavg()[0]:.2f}; N {args.n}, F {args.f}, "
          f"k {args.k}, median of {args.repeats}; identical codes before and now")
    for name, value in ms.items():
        print(f"{name:10s} {value:9.1f} ms")
    print(f"before / now: mutual choice {ms['mc_before'] / ms['mc_now']:.2f}, "
          f"feature choice {ms['fc_before'] / ms['fc_now']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
