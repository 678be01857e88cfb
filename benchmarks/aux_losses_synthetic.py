"""Auxiliary losses on synthetic data with Zipfian feature firing (sae_lens.synthetic).

Trains the same SAE (same init, same data stream) with aux_loss = none / aux_k / aux_zipf and
reports, on fresh samples encoded as in training:
  dead share       latents that never fire on the evaluation samples;
  underused share  latents with p_j < tau * p_hat_j under a Zipf fit of the evaluation firing
                   frequencies (the aux_zipf rule of losses.py, tau = 0.5), dead included;
  EV               explained variance 1 - sum||x - x_hat||^2 / sum||x - mean(x)||^2;
  EV export, MCC   from sae_lens.synthetic.eval_sae_on_synthetic_data in eval mode (for
                   mutual_choice the exported JumpReLU encoding, its thresholds calibrated on
                   calibration_tokens fresh samples);
and, per architecture, the paired per-seed difference of each loss to aux_k (mean +- sd and a
95% t-interval over the seeds). Every run uses the same `aux_loss_normalization` (default "none",
SAELens' and now both losses' default).

    python benchmarks/aux_losses_synthetic.py                 # mutual_choice (+ topk_aux)
    python benchmarks/aux_losses_synthetic.py --arch mutual_choice --losses aux_k aux_zipf --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from sae_lens.config import LoggingConfig  # noqa: E402
from sae_lens.synthetic import (  # noqa: E402
    SyntheticModel,
    SyntheticModelConfig,
    ZipfianFiringProbabilityConfig,
    eval_sae_on_synthetic_data,
)
from sae_lens.synthetic.synthetic_sae_runner import (  # noqa: E402
    SyntheticSAERunner,
    SyntheticSAERunnerConfig,
)

from sae_lens_allocation.allocation import ranks_from_frequency  # noqa: E402
from sae_lens_allocation.saes.topk_aux import TopKAuxTrainingSAEConfig  # noqa: E402
from sae_lens_allocation.saes.zipf import expected_frequency, fit_zipf  # noqa: E402

LOSSES = ("none", "aux_k", "aux_zipf")


def sae_config(arch: str, args: argparse.Namespace, aux_loss: str) -> Any:
    common: dict[str, Any] = dict(
        d_in=args.hidden_dim,
        d_sae=args.d_sae,
        aux_loss=aux_loss,
        aux_loss_coefficient=args.aux_coefficient,
        aux_loss_normalization=args.aux_normalization,
    )
    if args.tau is not None:
        common["aux_zipf_tau"] = args.tau
    if arch == "topk_aux":
        return TopKAuxTrainingSAEConfig(k=int(args.k), **common)
    if arch == "mutual_choice":
        from sae_lens_allocation.saes.mutual_choice import MutualChoiceTrainingSAEConfig

        return MutualChoiceTrainingSAEConfig(
            k=args.k, calibration_tokens=args.batch_size * 8, **common
        )
    raise ValueError(f"--arch {arch!r} is not allowed: topk_aux or mutual_choice")


def training_cls(arch: str) -> type:
    if arch == "topk_aux":
        from sae_lens_allocation.saes.topk_aux import TopKAuxTrainingSAE

        return TopKAuxTrainingSAE
    from sae_lens_allocation.saes.mutual_choice import MutualChoiceTrainingSAE

    return MutualChoiceTrainingSAE


@torch.no_grad()
def training_mode_stats(
    sae: Any, model: SyntheticModel, n_samples: int, batch_size: int, tau: float, fit_fraction: float
) -> dict[str, float]:
    """Firing frequencies, dead/underused shares and EV with the training encoding."""
    sae.train()
    counts = torch.zeros(sae.cfg.d_sae)
    sq_err = 0.0
    xs = []
    for _ in range(n_samples // batch_size):
        x = model.feature_dict(model.activation_generator(batch_size))
        acts, _ = sae.encode_with_hidden_pre(x)
        counts += (acts != 0).sum(0).float()
        sq_err += (sae.decode(acts) - x).pow(2).sum().item()
        xs.append(x)
    x_all = torch.cat(xs)
    total_var = (x_all - x_all.mean(0)).pow(2).sum().item()
    p = counts / x_all.shape[0]
    log_c, s, _ = fit_zipf(p, fit_fraction).tolist()
    p_hat = expected_frequency(ranks_from_frequency(p).float(), torch.tensor(log_c), torch.tensor(s))
    dead = p == 0
    underused = (p < tau * p_hat) | dead
    return {
        "dead": dead.float().mean().item(),
        "underused": underused.float().mean().item(),
        "ev": 1.0 - sq_err / total_var,
        "zipf_s": s,
        "l0": p.sum().item(),
    }


def run_one(arch: str, aux_loss: str, model: SyntheticModel, args: argparse.Namespace, seed: int) -> dict:
    torch.manual_seed(seed)
    cfg = SyntheticSAERunnerConfig(
        synthetic_model=model.cfg,
        sae=sae_config(arch, args, aux_loss),
        training_samples=args.samples,
        batch_size=args.batch_size,
        lr=args.lr,
        device="cpu",
        checkpoint_path=None,
        output_path=None,
        run_final_eval=False,
        dead_feature_window=args.dead_window,
        feature_sampling_window=args.dead_window,
        logger=LoggingConfig(log_to_wandb=False),
    )
    sae = training_cls(arch)(cfg.sae)
    start = time.perf_counter()
    result = SyntheticSAERunner(cfg, override_synthetic_model=model, override_sae=sae).run()
    seconds = time.perf_counter() - start
    torch.manual_seed(seed + 1)
    stats = training_mode_stats(
        result.sae, model, args.eval_samples, args.batch_size, args.eval_tau, args.eval_fit_fraction,
    )
    if hasattr(result.sae, "calibrate_thresholds"):
        # The export's thresholds, from fresh samples the evaluation does not reuse (each row
        # its own document), as train() calibrates on rows training never read.
        torch.manual_seed(seed + 2)
        rows = model.feature_dict(model.activation_generator(result.sae.cfg.calibration_tokens))
        result.sae.calibrate_thresholds(rows, info={"overlaps_training": False})
    torch.manual_seed(seed + 1)
    export = eval_sae_on_synthetic_data(
        result.sae, model.feature_dict, model.activation_generator,
        num_samples=args.eval_samples, batch_size=args.batch_size,
    )
    stats.update(ev_export=export.explained_variance, mcc=export.mcc, seconds=seconds)
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=["mutual_choice", "topk_aux"])
    parser.add_argument("--losses", nargs="+", default=list(LOSSES))
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--hidden-dim", type=int, default=64)
    parser.add_argument("--d-sae", type=int, default=256)
    parser.add_argument("--k", type=float, default=4.0)
    parser.add_argument("--zipf-exponent", type=float, default=1.0)
    parser.add_argument("--max-prob", type=float, default=0.3)
    parser.add_argument("--min-prob", type=float, default=0.002)
    parser.add_argument("--samples", type=int, default=600_000)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--aux-coefficient", type=float, default=1.0)
    parser.add_argument(
        "--aux-normalization", default="none", choices=["none", "residual_variance"],
        help="aux_loss_normalization for every run (one setting shared by the losses)",
    )
    parser.add_argument("--tau", type=float, default=None, help="aux_zipf_tau (default: the config's)")
    parser.add_argument("--eval-tau", type=float, default=0.5, help="tau of the underused share")
    parser.add_argument("--eval-fit-fraction", type=float, default=0.5)
    parser.add_argument("--dead-window", type=int, default=200)
    parser.add_argument("--eval-samples", type=int, default=100_000)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    header = (f"{'arch':14} {'aux_loss':9} {'seed':>4} {'dead':>6} {'underused':>9} {'EV':>7} "
              f"{'EV exp':>7} {'MCC':>6} {'L0':>6} {'s':>5} {'sec':>5}")
    wall = time.perf_counter()
    print(f"load average at start {' '.join(f'{v:.1f}' for v in os.getloadavg())}", flush=True)
    rows: dict[tuple[str, str], list[dict]] = {}
    for seed in args.seeds:
        model = SyntheticModel(
            SyntheticModelConfig(
                num_features=args.features,
                hidden_dim=args.hidden_dim,
                firing_probability=ZipfianFiringProbabilityConfig(
                    exponent=args.zipf_exponent, max_prob=args.max_prob, min_prob=args.min_prob
                ),
                seed=seed,
            )
        )
        true_l0 = model.activation_generator.firing_probabilities.sum().item()
        print(
            f"seed {seed}: synthetic {args.features} features (Zipf exponent {args.zipf_exponent}, p in "
            f"[{args.min_prob}, {args.max_prob}], true L0 {true_l0:.2f}), hidden_dim {args.hidden_dim}; "
            f"SAE d_sae {args.d_sae}, k {args.k}; {args.samples:,} samples, batch {args.batch_size}, "
            f"lr {args.lr}, dead window {args.dead_window} steps; eval {args.eval_samples:,} samples; "
            f"aux_loss_normalization {args.aux_normalization}",
            flush=True,
        )
        print(header, flush=True)
        for arch in args.arch:
            for loss in args.losses:
                r = run_one(arch, loss, model, args, seed)
                rows.setdefault((arch, loss), []).append(r)
                print(
                    f"{arch:14} {loss:9} {seed:4d} {r['dead']:6.3f} {r['underused']:9.3f} {r['ev']:7.4f} "
                    f"{r['ev_export']:7.4f} {r['mcc']:6.3f} {r['l0']:6.2f} {r['zipf_s']:5.2f} {r['seconds']:5.0f}",
                    flush=True,
                )
    for arch in args.arch:
        for loss in args.losses:
            if loss == "aux_k" or (arch, "aux_k") not in rows:
                continue
            base, other = rows[(arch, "aux_k")], rows[(arch, loss)]
            print(f"{arch} {loss} - aux_k over seeds {args.seeds}: " + "; ".join(
                f"{key} {summary([o[key] - b[key] for o, b in zip(other, base)])}"
                for key in ("dead", "underused", "ev", "ev_export")
            ), flush=True)
    print(f"wall time {time.perf_counter() - wall:.0f} s; load average at end "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}", flush=True)


def summary(values: list[float]) -> str:
    """mean +- sd and a 95% t-interval (Student t with n - 1 degrees of freedom; beyond 11
    seeds the 10-degree quantile, which makes the interval slightly too wide)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return f"{mean:+.4f}"
    sd = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5
    t = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)[min(n - 1, 10) - 1]
    half = t * sd / n**0.5
    return f"{mean:+.4f} +- {sd:.4f} [{mean - half:+.4f}, {mean + half:+.4f}]"


if __name__ == "__main__":
    main()
