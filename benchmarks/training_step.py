"""Time one SAE training step (forward, backward, grad clip, Adam) per architecture, in one process.

Each step goes through SAELens' own `SAETrainer.step` (firing statistics included), so the timing
is what the runner pays. Every plugin architecture runs dense and with `use_sparse_activations`
(one SAE and trainer per architecture, the flag switched between the two arms); SAELens `topk`
runs dense, and with its own sparse flag, which is reported as failing where it raises (on the
CPU: no SparseCPU kernel for aten::view). Arms are interleaved within every repeat so drift in
machine load hits all of them alike; the table reports medians, the ratio to SAELens' dense
`topk`, and the peak memory of a step above the memory held before it (CUDA: the allocator's
peak; CPU: the process's resident set, sampled every millisecond by a thread).

    python benchmarks/training_step.py                       # d_in 768, d_sae 24576, k 32, N 4096
    python benchmarks/training_step.py --d-sae 98304 --repeats 1
    python benchmarks/training_step.py --device cuda --autocast --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time
from typing import Any

import torch
from sae_lens import LanguageModelSAERunnerConfig, TrainingSAE, TrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer

import sae_lens_allocation  # noqa: F401  (registers the plugin architectures)

# (label, architecture, extra sae config); the plugin architectures run dense and sparse.
ARCHITECTURES: list[tuple[str, str, dict[str, Any]]] = [
    ("topk", "topk", {}),
    ("mutual_choice", "mutual_choice", {"aux_loss": "aux_k"}),
    ("feature_choice", "feature_choice", {"aux_loss": "aux_k"}),
    ("topk_aux", "topk_aux", {"aux_loss": "aux_k"}),
    ("gradient_topk", "gradient_topk", {"aux_loss": "aux_k"}),
]
PLUGIN = {"mutual_choice", "feature_choice", "topk_aux", "gradient_topk"}


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


class PeakMemory:
    """Peak memory of a block above the memory held when it starts, in bytes: the CUDA
    allocator's peak, or on the CPU the resident set size sampled every millisecond."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize()
            self.start = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.start = self.peak_rss = self._rss()
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak_rss = max(self.peak_rss, self._rss())
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            self.running = False
            self.thread.join()
            self.peak = max(self.peak_rss, self._rss()) - self.start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-in", type=int, default=768)
    parser.add_argument("--d-sae", type=int, default=24576)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096, help="tokens per step")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--autocast", action="store_true", help="bf16 autocast, as the runner's autocast")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--architectures", nargs="+", default=[a for a, _, _ in ARCHITECTURES],
                        help="labels to run (topk always runs: it is the baseline)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()

    torch.manual_seed(0)
    chosen = [row for row in ARCHITECTURES if row[0] in args.architectures or row[0] == "topk"]
    trainers = {label: build_trainer(arch, extra, args) for label, arch, extra in chosen}
    # SAELens' own sparse TopK, a separate SAE: its TopK module reads the flag when built.
    trainers["topk[sparse]"] = build_trainer("topk", {"use_sparse_activations": True}, args)
    arms = [("topk", False)] + [
        (label, sparse) for label, _, _ in chosen if label in PLUGIN for sparse in (False, True)
    ] + [("topk[sparse]", True)]
    acts = torch.randn(args.batch, args.d_in, device=args.device)
    # gradient_topk reads rows [acts | grads] (docs/gradient-topk.md).
    with_grads = torch.cat([acts, torch.randn_like(acts) * 1e-2], dim=-1)
    times: dict[str, list[float]] = {}
    peaks: dict[str, list[int]] = {}
    failures: dict[str, str] = {}
    for rep in range(args.warmup + args.repeats):
        for label, sparse in arms:
            name = f"{label}[sparse]" if sparse and label in PLUGIN else label
            if name in failures:
                continue
            trainer = trainers[label]
            if label in PLUGIN:
                trainer.sae.cfg.use_sparse_activations = sparse
            batch = with_grads if label == "gradient_topk" else acts
            _sync(args.device)
            try:
                with PeakMemory(args.device) as memory:
                    start = time.perf_counter()
                    trainer.step(batch)
                    _sync(args.device)
                    elapsed = time.perf_counter() - start
            except (RuntimeError, NotImplementedError) as err:
                failures[name] = str(err).splitlines()[0][:120]
                continue
            if rep >= args.warmup:
                times.setdefault(name, []).append(elapsed)
                peaks.setdefault(name, []).append(memory.peak)

    base = statistics.median(times["topk"])
    cuda = args.device.startswith("cuda")
    device = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    print(f"d_in={args.d_in} d_sae={args.d_sae} k={args.k} batch={args.batch} device={args.device} "
          f"({device}, {torch.get_num_threads()} threads) autocast={args.autocast} "
          f"repeats={args.repeats} load={os.getloadavg()[0]:.2f}")
    print(f"{'architecture':<26}{'median ms':>12}{'ratio to topk':>16}{'peak MiB':>12}")
    rows = []
    for name, values in times.items():
        med = statistics.median(values)
        peak = max(peaks[name]) / 2**20
        rows.append({"architecture": name, "median_s": med, "ratio_to_topk": med / base,
                     "peak_mib": peak, "times_s": values})
        print(f"{name:<26}{med * 1e3:>12.1f}{med / base:>16.3f}{peak:>12.0f}")
    for name, reason in failures.items():
        rows.append({"architecture": name, "failed": reason})
        print(f"{name:<26} fails: {reason}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": device, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
