"""Held-out statistics shared by both sources: dead and underused shares, the export vs
training-rule gap, the training rule's probes, and what evaluation keeps of a trained run."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import torch

from sae_lens_allocation.analysis import row_metrics as rm
from sae_lens_allocation.analysis.compare.config import Run

# Exports whose inference rule differs from the training rule (batch allocation -> thresholds).
_GAP_ARCHITECTURES = ("mutual_choice", "feature_choice", "batchtopk")


def tensor_sha256(t: torch.Tensor) -> str:
    """The SHA-256 of a tensor's bytes: the record that two runs read the same data."""
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def underused_share(fired: torch.Tensor, n: float, tau: float, fit_fraction: float) -> dict[str, Any]:
    """Dead and underused shares from firing counts over `n` tokens: p_j = fired_j / n; dead:
    p_j = 0; underused: dead or p_j < tau * p_hat_j, with p_hat the Zipf fit of `saes.zipf.fit_zipf`
    to the top `fit_fraction` of the ranked densities (`aux_zipf`'s own rule, `zipf_underuse`)."""
    from sae_lens_allocation.allocation import ranks_from_frequency
    from sae_lens_allocation.saes.zipf import expected_frequency, fit_zipf, zipf_underuse

    p = fired.double().cpu() / n
    log_c, s, n_points = fit_zipf(p.float(), fit_fraction).tolist()
    p_hat = expected_frequency(ranks_from_frequency(p).float(), torch.tensor(log_c), torch.tensor(s))
    dead = p == 0
    underused, _ = zipf_underuse(p, p_hat, dead, tau, torch.tensor(n_points > 0))
    return {"dead_share": float(dead.double().mean()), "underused_share": float(underused.double().mean()),
            "zipf_log_c": log_c, "zipf_s": s, "density": sorted(p.tolist(), reverse=True)}


@torch.no_grad()
def training_gap(export: Any, training_sae: Any, x: torch.Tensor, batch_tokens: int) -> dict[str, float] | None:
    """Export vs training rule on the same rows: the whole batches of `batch_tokens` rows of `x`
    [N, d_in], the export in eval mode, the training SAE in train mode (its batch rule). None when
    `x` holds no whole batch."""
    n_full = (x.shape[0] // batch_tokens) * batch_tokens
    if not n_full:
        return None
    export.eval()
    torch.nn.Module.train(training_sae, True)
    x = x[:n_full]
    sse = {"export": 0.0, "training": 0.0}
    l0 = {"export": 0.0, "training": 0.0}
    for chunk in x.split(batch_tokens):
        codes = export.encode(chunk)
        acts, _ = training_sae.encode_with_hidden_pre(chunk)
        for name, c, x_hat in (("export", codes, export.decode(codes)), ("training", acts, training_sae.decode(acts))):
            sse[name] += float((x_hat - chunk).pow(2).sum())
            l0[name] += float((c != 0).sum())
    total = float((x - x.mean(0)).pow(2).sum())
    ev = {name: 1.0 - v / total for name, v in sse.items()}
    return {"rows": n_full, "export_explained_variance": ev["export"], "training_explained_variance": ev["training"],
            "export_l0": l0["export"] / n_full, "training_l0": l0["training"] / n_full,
            "export_minus_training_ev": ev["export"] - ev["training"],
            "export_minus_training_l0": (l0["export"] - l0["training"]) / n_full}


@torch.no_grad()
def heldout_stats(export: Any, training_sae: Any, x: torch.Tensor, batch_tokens: int,
                  tau: float, fit_fraction: float) -> dict[str, Any]:
    """Export-side firing, dead/underused shares, NMSE, EV, per-token L0 on rows `x` [N, d_in];
    with `training_sae` also `gap` (`training_gap`: export vs batch rule on the whole batches)."""
    from sae_lens_allocation.analysis.evaluation import l0_distribution

    export.eval()
    counts = torch.zeros(export.cfg.d_sae, dtype=torch.float64)
    sq_err, l0s = 0.0, []
    for chunk in x.split(batch_tokens):
        codes = export.encode(chunk)
        sq_err += float((export.decode(codes) - chunk).pow(2).sum())
        fired = codes != 0
        counts += fired.sum(0).double().cpu()
        l0s.append(fired.sum(-1).cpu())
    total_var = float((x - x.mean(0)).pow(2).sum())
    out: dict[str, Any] = {
        "explained_variance": 1.0 - sq_err / total_var,
        "nmse": sq_err / float(x.pow(2).sum()),
        "l0_per_token": l0_distribution(torch.cat(l0s)),
        **underused_share(counts, x.shape[0], tau, fit_fraction),
        "heldout_rows": int(x.shape[0]),
    }
    if training_sae is not None:
        out["gap"] = training_gap(export, training_sae, x, batch_tokens)
    return out


def run_gap(run: Run, trained: dict[str, Any], export: Any, x: torch.Tensor) -> dict[str, float] | None:
    """`training_gap` for the architectures whose export rule differs from their training rule."""
    if run.architecture not in _GAP_ARCHITECTURES:
        return None
    return training_gap(export, trained["sae"], x, trained["batch_tokens"])


def sparsity_dead_share(sae_dir: Path) -> float | None:
    """Share of latents with log10 firing density <= -9 in SAELens' sparsity.safetensors (the
    last feature_sampling_window of training; SAELens stores log10(p + 1e-10))."""
    path = sae_dir / "sparsity.safetensors"
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    log_p = load_file(str(path))["sparsity"]
    return float((log_p <= -9).float().mean())




@torch.no_grad()
def training_rule_stats(sae: Any, x: torch.Tensor, batch_tokens: int, architecture: str) -> dict[str, float]:
    """Held-out EV and dead share of a training SAE under its training rule: the batch rule (train
    mode, batches of the training batch size) for batch-allocation architectures, the per-token
    rule (eval mode) otherwise (gradient_topk: plain TopK, no gradient at hand). The SAE's buffers,
    generators, mode and the global RNG are restored, so a probe during training changes nothing."""
    from sae_lens_allocation.training.resume import generator_states, set_generator_states

    batch_rule = architecture in _GAP_ARCHITECTURES
    saved = {k: v.clone() for k, v in sae.state_dict().items()}
    generators, mode = generator_states(sae), sae.training
    n_full = (x.shape[0] // batch_tokens) * batch_tokens if batch_rule else x.shape[0]
    x = x[:n_full].to(sae.W_enc.device)
    sse, fired = 0.0, torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.nn.Module.train(sae, batch_rule)
            for chunk in x.split(batch_tokens):
                codes, _ = sae.encode_with_hidden_pre(chunk)
                sse += float((sae.decode(codes) - chunk).pow(2).sum())
                fired |= (codes != 0).any(0).cpu()
    finally:
        sae.load_state_dict(saved)
        set_generator_states(sae, generators)
        torch.nn.Module.train(sae, mode)
    total = float((x - x.mean(0)).pow(2).sum())
    return {"explained_variance": 1.0 - sse / total, "dead_share": float((~fired).float().mean())}


def trained_run(sae: Any, seconds: float, tokens: int, arms: int, sae_dir: Path, batch: int,
                points: list[dict[str, float]], n_points: int) -> dict[str, Any]:
    """What evaluation needs of a trained run; the probes' points get their token counts."""
    at = convergence_points(tokens, n_points, batch)
    return {"sae": sae, "seconds": seconds, "tokens_per_s": tokens / seconds, "lockstep_arms": arms,
            "sae_dir": sae_dir, "batch_tokens": batch,
            "convergence": [{"tokens": t, **p} for t, p in zip(at[-len(points):], points)]}


def load_export(sae_dir: Path, device: str) -> tuple[Any, Any]:
    """The export in eval mode and its `row_metrics.Reconstruct`."""
    from sae_lens_allocation.loading import load_sae

    export = load_sae(sae_dir, device=device)
    export.eval()
    return export, rm.export_reconstruct(export)


def convergence_points(total: int, n_points: int, batch: int) -> list[int]:
    """Training samples at the evaluations of a run: SAELens checkpoints (n_checkpoints =
    n_points - 1) after the first step past each multiple of ceil(total / n_points), then the end."""
    step = math.ceil(total / n_points)
    at = [(t // batch + 1) * batch for t in range(step, total, step)][: n_points - 1]
    return [t for t in at if t < total] + [total]
