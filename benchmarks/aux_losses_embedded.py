"""Auxiliary losses and Zipf capacities on the embedded language model (offline).

Mutual Choice (default k 16, d_sae 1024, 1,024,000 training tokens) trained with SAELens' own
runner (`sae_lens_allocation.training.runner.build_runner`, `model_name: embedded`) once per
aux loss and seed: same seed, same initialisation and data order for every loss. Each export
(the calibrated `jumprelu`) is evaluated on ALL rows of the corpus' held-out split (special tokens
excluded) with `analysis.compare.heldout_stats`:
  dead       share of latents that never fire on the held-out tokens;
  underused  p_j < tau * p_hat_j under the Zipf fit of the held-out firing frequencies (tau 0.5,
             fit over the top half; losses.fit_zipf), dead included;
  EV         explained variance of the export on those rows; EV train = the training-mode SAE
             (batch allocation over 1024-row batches) on the same rows;
and, from the SAE's per-step metrics, the steps on which the dead latents left some of the k_aux
slots free for alive underused latents (only there can aux_zipf differ from aux_k).
Then mean +- sd over seeds, and the paired per-seed difference aux_zipf - aux_k with a 95%
t-interval.

`--fc-schedules W:R ...` trains Feature Choice with `capacity: zipf` (capacity_warmup_steps W,
capacity_rerank_steps R) on the first seed and reports EV, dead share, Pearson r between the
capacity rank and the latent index (the old ranking by own firing rate gave r = 0.991), and
between the capacity rank and the rank of the current statistic.

    python benchmarks/aux_losses_embedded.py                        # MC, aux_k vs aux_zipf, 3 seeds
    python benchmarks/aux_losses_embedded.py --seeds 0 --losses --fc-schedules 100:1 1:1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

# 97.5% quantile of Student's t for 1..10 degrees of freedom (95% two-sided interval).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def runner_dict(args: argparse.Namespace, seed: int, sae: dict[str, Any], out: Path) -> dict[str, Any]:
    """The compare-embedded base setting (configs/compare-embedded.yaml) at this size."""
    return {
        "model_name": "embedded",
        "hook_name": "blocks.1.hook_resid_pre",
        "dataset_path": "embedded",
        "is_dataset_tokenized": True,
        "streaming": False,
        "context_size": 128,
        "sae": {"d_in": 128, "d_sae": args.d_sae, "k": args.k, "calibration_tokens": 16384, **sae},
        "training_tokens": args.training_tokens,
        "train_batch_size_tokens": args.batch_tokens,
        "store_batch_size_prompts": 8,
        "n_batches_in_buffer": 16,
        "lr": args.lr,
        "lr_warm_up_steps": 20,
        "dead_feature_window": 100,
        "feature_sampling_window": 100,
        "device": "cpu",
        "n_eval_batches": 2,
        "eval_batch_size_prompts": 4,
        "verbose": False,
        "seed": seed,
        "n_checkpoints": 0,
        "output_path": str(out / "sae"),
        "checkpoint_path": str(out / "checkpoints"),
    }


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def train_and_evaluate(args, seed, sae_fields, out, model, x_heldout) -> tuple[dict[str, Any], Any]:
    from sae_lens_allocation.analysis.compare import heldout_stats
    from sae_lens_allocation.loading import load_sae
    from sae_lens_allocation.training.runner import build_runner
    from sae_lens_allocation.yaml_config import runner_config_from_dict

    cfg = runner_config_from_dict(runner_dict(args, seed, sae_fields, out))
    runner = build_runner(cfg, override_model=model)
    # Per step: SAELens' dead count |D| and the Zipf-rule underused count |U| (the SAE's own
    # logged metrics), to see whether the dead latents leave any of the k_aux slots free.
    counts: list[tuple[int, int]] = []
    forward = runner.sae.training_forward_pass

    def recording_forward(step_input):
        output = forward(step_input)
        counts.append((int(output.metrics["aux_dead"]), int(output.metrics["aux_underused"])))
        return output

    runner.sae.training_forward_pass = recording_forward
    start = time.perf_counter()
    training_sae = runner.run()
    seconds = time.perf_counter() - start
    k_aux = runner.sae.k_aux()
    free = sum(1 for dead, under in counts if dead < k_aux and under > dead)
    export = load_sae(Path(cfg.output_path), device="cpu")
    stats = heldout_stats(export, training_sae, x_heldout, args.batch_tokens, args.tau, args.fit_fraction)
    row = {
        "seed": seed, **sae_fields, "train_seconds": seconds,
        "tokens_per_second": args.training_tokens / seconds,
        "dead": stats["dead_share"], "underused": stats["underused_share"],
        "ev": stats["explained_variance"], "ev_train": stats["gap"]["training_explained_variance"],
        "l0": stats["l0_per_token"]["mean"], "zipf_s": stats["zipf_s"],
        "steps": len(counts), "steps_with_free_slots": free,
        "min_dead_after_window": min((d for d, _ in counts[cfg.dead_feature_window:]), default=None),
    }
    return row, training_sae


def interval(values: list[float]) -> str:
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return f"{mean:+.4f} (1 seed)"
    sd = statistics.stdev(values)
    half = _T975[min(n - 1, len(_T975)) - 1] * sd / math.sqrt(n)
    return f"{mean:+.4f} +- {sd:.4f} sd, 95% CI [{mean - half:+.4f}, {mean + half:+.4f}]"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        cpu = next((ln.split(":", 1)[1].strip() for ln in lines.splitlines() if ln.startswith("Model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"


def load_average() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="mutual_choice")
    parser.add_argument("--losses", nargs="*", default=["aux_k", "aux_zipf"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--k", type=float, default=16.0)
    parser.add_argument("--d-sae", type=int, default=1024)
    parser.add_argument("--training-tokens", type=int, default=1_024_000)
    parser.add_argument("--batch-tokens", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--tau", type=float, default=0.5)
    parser.add_argument("--fit-fraction", type=float, default=0.5)
    parser.add_argument("--fc-schedules", nargs="*", default=[], metavar="W:R",
                        help="feature_choice capacity=zipf runs: capacity_warmup_steps:capacity_rerank_steps")
    parser.add_argument("--out", default="runs/aux-losses-embedded")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import sae_lens_allocation  # noqa: F401  (registers the architectures)
    from sae_lens_allocation.allocation import ranks_from_frequency
    from sae_lens_allocation.analysis.compare import lm_activations
    from sae_lens_allocation.training.sources import embedded_tokens, load_lm

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wall = time.perf_counter()
    print(f"machine: {machine()}; load average at start {load_average()}", flush=True)
    model = load_lm("embedded")
    heldout = embedded_tokens(model, "heldout", 128, None)
    x_heldout = lm_activations(model, heldout, "blocks.1.hook_resid_pre", len(heldout), 8)
    print(f"embedded model, hook blocks.1.hook_resid_pre; held-out: all {len(heldout)} rows, "
          f"{x_heldout.shape[0]:,} tokens without special tokens; {args.arch} k {args.k:g}, d_sae "
          f"{args.d_sae}, {args.training_tokens:,} training tokens, batch {args.batch_tokens}, lr {args.lr}",
          flush=True)
    log = (out / "results.jsonl").open("a")
    header = (f"{'run':28} {'seed':>4} {'dead':>6} {'underused':>9} {'EV':>7} {'EV train':>8} {'L0':>6} "
              f"{'tok/s':>6} {'sec':>5}")

    def report(name: str, row: dict[str, Any]) -> None:
        print(f"{name:28} {row['seed']:4d} {row['dead']:6.3f} {row['underused']:9.3f} {row['ev']:7.4f} "
              f"{row['ev_train']:8.4f} {row['l0']:6.2f} {row['tokens_per_second']:6.0f} "
              f"{row['train_seconds']:5.0f}  (load {load_average()}; steps with free aux slots "
              f"{row['steps_with_free_slots']}/{row['steps']}, min |D| after the dead window "
              f"{row['min_dead_after_window']})", flush=True)
        log.write(json.dumps({"run": name, **row}) + "\n")
        log.flush()

    rows: dict[str, list[dict[str, Any]]] = {loss: [] for loss in args.losses}
    if args.losses:
        print(header, flush=True)
    for seed in args.seeds:
        for loss in args.losses:
            fields = {"architecture": args.arch, "aux_loss": loss}
            row, _ = train_and_evaluate(args, seed, fields, out / f"{args.arch}-{loss}-seed{seed}", model, x_heldout)
            rows[loss].append(row)
            report(f"{args.arch}-{loss}", row)
    for loss, values in rows.items():
        print(f"{args.arch}-{loss}: " + "; ".join(
            f"{key} {interval([r[key] for r in values])}" for key in ("dead", "underused", "ev")), flush=True)
    if {"aux_k", "aux_zipf"} <= set(rows) and rows["aux_k"]:
        for key in ("dead", "underused", "ev", "ev_train"):
            diffs = [z[key] - k[key] for z, k in zip(rows["aux_zipf"], rows["aux_k"])]
            print(f"aux_zipf - aux_k, {key}: {interval(diffs)}", flush=True)

    for schedule in args.fc_schedules:
        warmup, rerank = (int(v) for v in schedule.split(":"))
        seed = args.seeds[0]
        fields = {"architecture": "feature_choice", "capacity": "zipf",
                  "capacity_warmup_steps": warmup, "capacity_rerank_steps": rerank}
        run_dir = out / f"fc-zipf-{warmup}-{rerank}-seed{seed}"
        row, sae = train_and_evaluate(args, seed, fields, run_dir, model, x_heldout)
        index = torch.arange(1, args.d_sae + 1)
        ranks = sae.capacity_ranks.cpu()
        current = ranks_from_frequency(sae.rank_selection_ema.cpu(), sae.rank_mass_ema.cpu())
        row.update(r_rank_index=pearson(ranks, index), r_rank_statistic=pearson(ranks, current),
                   r_firing_index=pearson(ranks_from_frequency(sae.firing_ema.cpu()), index))
        print(header, flush=True)
        report(f"fc-zipf W{warmup} R{rerank}", row)
        print(f"  r(capacity rank, index) {row['r_rank_index']:+.3f}; r(capacity rank, rank of the "
              f"statistic now) {row['r_rank_statistic']:+.3f}; r(own firing-rate rank, index) "
              f"{row['r_firing_index']:+.3f}", flush=True)
    print(f"wall time {time.perf_counter() - wall:.0f} s; load average at end {load_average()}", flush=True)


if __name__ == "__main__":
    main()
