"""Time one SAE training step (forward, backward, grad clip, Adam) per architecture, in one process.

Each step goes through SAELens' own `SAETrainer.step` (firing statistics included), so the timing
is what the runner pays. Architectures are interleaved within every repeat so drift in machine load
hits all of them alike; the table reports medians and the ratio to SAELens `topk`.

    python benchmarks/training_step.py                       # d_in 768, d_sae 24576, k 32, N 4096
    python benchmarks/training_step.py --device cuda --autocast --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Any

import torch
from sae_lens import LanguageModelSAERunnerConfig, TrainingSAE, TrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer

import sae_lens_allocation  # noqa: F401  (registers the plugin architectures)

# (row label, architecture, extra sae config)
ROWS: list[tuple[str, str, dict[str, Any]]] = [
    ("topk", "topk", {}),
    ("batchtopk", "batchtopk", {}),
    ("mutual_choice", "mutual_choice", {"aux_loss": "aux_k"}),
    ("feature_choice", "feature_choice", {"aux_loss": "aux_k"}),
    ("mutual_choice[aux_zipf]", "mutual_choice", {"aux_loss": "aux_zipf"}),
]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build_trainer(arch: str, extra: dict[str, Any], args: argparse.Namespace) -> SAETrainer:
    sae_cfg = TrainingSAEConfig.from_dict(
        {"architecture": arch, "d_in": args.d_in, "d_sae": args.d_sae, "k": args.k,
         "device": args.device, **extra}
    )
    runner_cfg = LanguageModelSAERunnerConfig(
        sae=sae_cfg,
        device=args.device,
        autocast=args.autocast,
        train_batch_size_tokens=args.batch,
        n_batches_in_buffer=max(1, args.batch // 128),
        training_tokens=args.batch * 1000,
        checkpoint_path=None,
        output_path=None,
    )
    sae = TrainingSAE.from_dict(sae_cfg.to_dict()).to(args.device)
    return SAETrainer(cfg=runner_cfg.to_sae_trainer_config(), sae=sae, data_provider=iter(()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-in", type=int, default=768)
    parser.add_argument("--d-sae", type=int, default=24576)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096, help="tokens per step")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--autocast", action="store_true", help="bf16 autocast, as the runner's autocast")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()

    torch.manual_seed(0)
    trainers = {label: build_trainer(arch, extra, args) for label, arch, extra in ROWS}
    batch = torch.randn(args.batch, args.d_in, device=args.device)
    times: dict[str, list[float]] = {label: [] for label in trainers}
    for rep in range(args.warmup + args.repeats):
        for label, trainer in trainers.items():
            _sync(args.device)
            start = time.perf_counter()
            trainer.step(batch)
            _sync(args.device)
            if rep >= args.warmup:
                times[label].append(time.perf_counter() - start)

    base = statistics.median(times["topk"])
    cuda = args.device.startswith("cuda")
    device = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    print(f"d_in={args.d_in} d_sae={args.d_sae} k={args.k} batch={args.batch} device={args.device} "
          f"({device}, {torch.get_num_threads()} threads) autocast={args.autocast} repeats={args.repeats}")
    print(f"{'architecture':<26}{'median ms':>12}{'ratio to topk':>16}")
    rows = []
    for label, values in times.items():
        med = statistics.median(values)
        rows.append({"architecture": label, "median_s": med, "ratio_to_topk": med / base, "times_s": values})
        print(f"{label:<26}{med * 1e3:>12.1f}{med / base:>16.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": device, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
