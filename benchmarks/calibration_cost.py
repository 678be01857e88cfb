"""What does calibrating a Mutual/Feature Choice export cost at GPT-2 widths? Time and peak memory
of `calibrate_thresholds` (the thresholds, and the export-vs-training-rule comparison of
saes/rule_gap.py) per calibration row count, on the CPU, in one process per arm.

The SAE has random weights (a realistic b_enc is not needed: the cost is the encoder pass, the
per-latent selections and sorts, none of which depends on what the weights learned), the rows are
Gaussian activations cut into 128-token documents. Zipf capacities are set as after a Zipf
warm-up (ranks a random permutation), so the most frequent latents' quantiles need full sorts, as
in a trained Zipf SAE. Peak memory: the process's resident set, sampled every millisecond, above
what it held before the call (rows and SAE already allocated).

    python benchmarks/calibration_cost.py                 # d_in 768, d_sae 24576, k 32, N_train 4096
    python benchmarks/calibration_cost.py --tokens 32768 65536 --archs fc-zipf
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch
from training_step import PeakMemory

ARCHS = {
    "mc": {"architecture": "mutual_choice"},
    "fc-uniform": {"architecture": "feature_choice", "capacity": "uniform"},
    "fc-zipf": {"architecture": "feature_choice", "capacity": "zipf"},
}


def one_arm(arch: str, tokens: int, args: argparse.Namespace) -> dict[str, float]:
    from sae_lens import TrainingSAE

    import sae_lens_allocation  # noqa: F401  (registers the architectures)
    from sae_lens_allocation.saes import batch_allocation

    # The export-vs-training-rule comparison timed on its own (a wrapper, same call).
    gap_seconds = []
    rule_gap = batch_allocation.rule_gap

    def timed_rule_gap(*a: object, **kw: object) -> dict:
        start = time.perf_counter()
        try:
            return rule_gap(*a, **kw)  # type: ignore[arg-type]
        finally:
            gap_seconds.append(time.perf_counter() - start)

    batch_allocation.rule_gap = timed_rule_gap  # type: ignore[assignment]

    torch.manual_seed(0)
    sae = TrainingSAE.from_dict({"d_in": args.d_in, "d_sae": args.d_sae, "k": args.k,
                                 "calibration_tokens": tokens, **ARCHS[arch]})
    sae.training_batch_tokens.fill_(args.batch)
    if arch == "fc-zipf":
        sae.capacity_tokens.fill_(args.batch)
        sae.capacity_ranks.copy_(torch.randperm(args.d_sae) + 1)
        sae._rank_updates_seen = sae.cfg.capacity_warmup_steps
    rows = torch.randn(tokens, args.d_in)
    documents = torch.arange(tokens) // 128
    with PeakMemory("cpu") as memory:
        start = time.perf_counter()
        sae.calibrate_thresholds(rows, documents=documents)
        seconds = time.perf_counter() - start
    gap = sae.cfg.metadata.calibration["rule_gap"]
    return {"seconds": seconds, "gap_seconds": sum(gap_seconds), "peak_mib": memory.peak / 2**20,
            "gap_batches": gap["batches"],
            "in_sample_l0": sae.cfg.metadata.calibration["in_sample_l0"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--tokens", nargs="+", type=int, default=[32768, 65536])
    parser.add_argument("--d-in", type=int, default=768)
    parser.add_argument("--d-sae", type=int, default=24576)
    parser.add_argument("--k", type=float, default=32.0)
    parser.add_argument("--batch", type=int, default=4096, help="training batch size (tokens)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--one", nargs=2, default=None, help=argparse.SUPPRESS)  # arch, tokens: child
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(one_arm(args.one[0], int(args.one[1]), args)))
        return
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load "
          f"{os.getloadavg()[0]:.1f}; torch {torch.__version__}, {args.threads} thread(s); d_in "
          f"{args.d_in}, d_sae {args.d_sae}, k {args.k:g}, training batch {args.batch}", flush=True)
    print("| arch | tokens | seconds | of which rule_gap | peak MiB | gap batches | load |\n"
          "|---|---|---|---|---|---|---|", flush=True)
    for tokens in args.tokens:
        for arch in args.archs:
            child = [sys.executable, __file__, "--one", arch, str(tokens), "--d-in", str(args.d_in),
                     "--d-sae", str(args.d_sae), "--k", str(args.k), "--batch", str(args.batch),
                     "--threads", str(args.threads)]
            r = json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            print(f"| {arch} | {tokens} | {r['seconds']:.1f} | {r['gap_seconds']:.1f} | {r['peak_mib']:.0f} | "
                  f"{r['gap_batches']} | "
                  f"{os.getloadavg()[0]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
