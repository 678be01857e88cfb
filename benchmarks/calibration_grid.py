"""Does the calibrated `jumprelu` export keep the training sparsity budget? A grid on the embedded
model: Mutual Choice, Feature Choice (uniform, zipf) x hooks x k x training batch sizes, each
trained with `sae_lens_allocation.train`'s runner (`build_runner`), calibrated by default on
rows training never read, exported and loaded back. Per run it prints

- the export's mean L0 over ALL held-out rows of the corpus (special tokens excluded), against k;
- the export's explained variance against the training-mode SAE's (batch rule at the training
  batch size), on the same held-out rows (shuffled across prompts like the training stream,
  whole batches only);
- the matched-L0 gap: the export's EV minus that of the same training SAE's batch rule run with
  its budget k replaced by k L0_export / L0_train(k) on those rows (same weights, same batches;
  the achieved L0 is stored as `matched_training_l0`), so the export is not credited for firing
  more;
- the calibration metadata (source, tokens, documents, overlap, out-of-fold L0, quantile level,
  and the export's flag `trained_and_deployed_under_different_rules`, saes/rule_gap.py).

It ends with how many runs hold |L0 / k - 1| <= 5%, how many the one-sided matched-L0 rule
(matched gap >= -0.01, docs/architectures.md#acceptance-bounds), and how many both. `--wide-batches B ...`
adds the gap against the same training-mode SAE run on held-out batches of B tokens: how far the
export is from the batch rule's large-batch limit (the SAE still trained at its own batch size).

    python benchmarks/calibration_grid.py                      # the docs' grid (54 runs)
    python benchmarks/calibration_grid.py --archs mc --ks 16 --hooks blocks.0.hook_resid_post \\
        --batches 512 --json out.json
    python benchmarks/calibration_grid.py --archs fc-uniform-thresholds fc-zipf-thresholds \\
        --batches 512                                          # training_rule: thresholds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from sae_lens_allocation.analysis.compare import heldout_stats, lm_activations, training_gap
from sae_lens_allocation.embedded import load_embedded_model
from sae_lens_allocation.loading import load_sae
from sae_lens_allocation.saes.rule_gap import RULE_GAP_FLAG
from sae_lens_allocation.training.runner import build_runner
from sae_lens_allocation.training.sources import embedded_tokens

ARCHS = {
    "mc": {"architecture": "mutual_choice", "aux_loss": "aux_k"},
    "fc-uniform": {"architecture": "feature_choice", "capacity": "uniform"},
    "fc-zipf": {"architecture": "feature_choice", "capacity": "zipf"},
    # Feature Choice trained with its export's rule (no calibration) and Mutual Choice with a
    # per-latent floor of one token (docs/architectures.md).
    "fc-uniform-thresholds": {"architecture": "feature_choice", "capacity": "uniform",
                              "training_rule": "thresholds"},
    "fc-zipf-thresholds": {"architecture": "feature_choice", "capacity": "zipf",
                           "training_rule": "thresholds"},
    "mc-floor": {"architecture": "mutual_choice", "aux_loss": "aux_k", "min_tokens_per_latent": 1},
}
HOOKS = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z", "blocks.1.hook_mlp_out"]
L0_BOUND, EV_BOUND = 0.05, 0.01


def run_config(arch: str, hook: str, k: float, batch: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    sae = {"d_in": 128, "d_sae": args.d_sae, "k": k, **ARCHS[arch]}
    if args.calibration_tokens:
        sae["calibration_tokens"] = args.calibration_tokens
    return {
        "sae": sae,
        "model_name": "embedded",
        "hook_name": hook,
        "dataset_path": "embedded",
        "is_dataset_tokenized": True,
        "streaming": False,
        "context_size": 128,
        "training_tokens": args.training_tokens,
        "train_batch_size_tokens": batch,
        "store_batch_size_prompts": 8,
        "n_batches_in_buffer": args.n_batches_in_buffer,
        "lr": args.lr,
        "lr_warm_up_steps": 10,
        "device": "cpu",
        "seed": args.seed,
        "n_eval_batches": 1,
        "eval_batch_size_prompts": 4,
        "checkpoint_path": str(out / "checkpoints"),
        "output_path": str(out / "output"),
        "verbose": False,
        "logger": {"log_to_wandb": False},
    }


def one_run(model: Any, x_heldout: torch.Tensor, arch: str, hook: str, k: float, batch: int,
            args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = run_config(arch, hook, k, batch, args, Path(tmp))
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        training_sae = build_runner(cfg, override_model=model).run()
        seconds = time.perf_counter() - start
        export = load_sae(Path(tmp) / "output")
    # L0 and EV of the export over all held-out rows; the gap on whole training batches only,
    # the export and the training-mode SAE on exactly the same rows.
    every = heldout_stats(export, None, x_heldout, batch, 0.5, 0.1)
    gap = training_gap(export, training_sae, x_heldout, batch)
    matched = matched_gap(export, training_sae, x_heldout, batch, k * gap["export_l0"] / gap["training_l0"])
    wide = {b: training_gap(export, training_sae, x_heldout, b)["export_minus_training_ev"] for b in args.wide_batches}
    l0 = every["l0_per_token"]["mean"]
    return {
        "arch": arch, "hook": hook, "k": k, "batch": batch, "seconds": seconds,
        "export_l0": l0, "l0_error": l0 / k - 1,
        "export_ev": gap["export_explained_variance"], "training_ev": gap["training_explained_variance"],
        "ev_gap": gap["export_minus_training_ev"], "ev_gap_wide": wide,
        "gap_export_l0": gap["export_l0"], "training_l0": gap["training_l0"],
        "matched_training_ev": matched["training_explained_variance"],
        "matched_training_l0": matched["training_l0"], "matched_gap": matched["export_minus_training_ev"],
        "heldout_tokens": every["heldout_rows"], "gap_tokens": gap["rows"],
        "calibration": dict(export.cfg.metadata.calibration or {}),
    }


def matched_gap(export: Any, training_sae: Any, x: torch.Tensor, batch: int, budget: float) -> dict[str, Any]:
    """`training_gap` with the training rule's budget k set to `budget` (restored after):
    k L0_export / L0_train(k), one proportional step to the export's L0 on these rows (the batch
    rules keep floor(k N) entries, fewer where relu zeroes some), as saes/rule_gap.py does."""
    k = training_sae.cfg.k
    training_sae.cfg.k = budget
    try:
        return training_gap(export, training_sae, x, batch)
    finally:
        training_sae.cfg.k = k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--hooks", nargs="+", default=HOOKS)
    parser.add_argument("--ks", nargs="+", type=float, default=[4, 16, 64])
    parser.add_argument("--batches", nargs="+", type=int, default=[512, 1024])
    parser.add_argument("--d-sae", type=int, default=512)
    parser.add_argument("--training-tokens", type=int, default=131_072)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--n-batches-in-buffer", type=int, default=16,
                        help="SAELens' mixing buffer, in store batches of 8 prompts")
    parser.add_argument("--calibration-tokens", type=int, default=0, help="0: the config default")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--wide-batches", nargs="*", type=int, default=[],
                        help="also the EV gap against the batch rule on held-out batches of these sizes")
    parser.add_argument("--json", type=str, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = load_embedded_model()
    heldout = embedded_tokens(model, "heldout", 128, None)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.1f}; torch {torch.__version__}, {args.threads} thread(s); "
          f"held-out rows {len(heldout)}", flush=True)
    header = ("arch", "hook", "k", "batch", "L0", "L0 err", "EV export", "EV train", "EV gap",
              "matched gap", "flag", "cal tokens", "docs", "overlap", "oof L0", "level", "s",
              *(f"EV gap @{b}" for b in args.wide_batches))
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header), flush=True)
    results, start = [], time.perf_counter()
    for hook in args.hooks:
        x = lm_activations(model, heldout, hook, len(heldout), 8)
        x = x.reshape(x.shape[0], -1)  # attn.hook_z: heads concatenated, as the store gives them
        x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(args.seed))]
        for arch in args.archs:
            for k in args.ks:
                for batch in args.batches:
                    r = one_run(model, x, arch, hook, k, batch, args)
                    c = r["calibration"]
                    level = c.get("quantile_level")
                    print(f"| {arch} | {hook} | {k:g} | {batch} | {r['export_l0']:.2f} | "
                          f"{100 * r['l0_error']:+.1f}% | {r['export_ev']:.4f} | {r['training_ev']:.4f} | "
                          f"{r['ev_gap']:+.4f} | {r['matched_gap']:+.4f} | "
                          f"{c.get('trained_and_deployed_under_different_rules')} | {c.get('tokens')} | "
                          f"{c.get('documents')} | "
                          f"{c.get('overlaps_training')} | {c.get('out_of_fold_l0', float('nan')):.2f} | "
                          f"{'-' if level is None else f'{level:.3f}'} | {r['seconds']:.0f} |"
                          + "".join(f" {g:+.4f} |" for g in r["ev_gap_wide"].values()), flush=True)
                    results.append(r)
    l0_ok = [abs(r["l0_error"]) <= L0_BOUND for r in results]
    ev_ok = [r["matched_gap"] >= -EV_BOUND for r in results]
    worst_l0 = max(abs(r["l0_error"]) for r in results)
    print(f"\n{sum(l0_ok)}/{len(results)} runs within |L0/k - 1| <= {L0_BOUND:.0%} (worst "
          f"{100 * worst_l0:.2f}%); {sum(ev_ok)}/{len(results)} with matched-L0 gap >= -{EV_BOUND} "
          f"(lowest {min(r['matched_gap'] for r in results):+.4f}); "
          f"{sum(a and b for a, b in zip(l0_ok, ev_ok))}/{len(results)} both; "
          f"{sum(r['ev_gap'] > RULE_GAP_FLAG for r in results)} with held-out EV gap > {RULE_GAP_FLAG}; "
          f"wall {time.perf_counter() - start:.0f} s, load {os.getloadavg()[0]:.1f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": results}, indent=1))


if __name__ == "__main__":
    main()
