"""Evaluate an exported SAE the way SAELens does (`run_evals`), plus the per-token L0 distribution
that makes adaptive allocation visible."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from sae_lens.constants import RUNNER_CFG_FILENAME
from sae_lens.evals import EvalConfig, run_evals
from sae_lens.training.activation_scaler import ActivationScaler
from sae_lens.training.activations_store import ActivationsStore

from sae_lens_allocation.loading import (
    TRAINER_STATE_FILENAME,
    check_sae_weights,
    is_training_checkpoint,
    load_sae,
    read_sae_cfg,
)
from sae_lens_allocation.tokens import keep_mask, special_token_ids
from sae_lens_allocation.training.sources import EMBEDDED, embedded_tokens, load_lm
from sae_lens_allocation.validation import UsageError, check_device

# Metrics copied into the summary, as (run_evals section, key, summary name).
_SUMMARY = (
    ("model_performance_preservation", "ce_loss_score", "ce_loss_recovered"),
    ("model_performance_preservation", "ce_loss_without_sae", "ce_loss_clean"),
    ("model_performance_preservation", "ce_loss_with_sae", "ce_loss_with_sae"),
    ("model_performance_preservation", "ce_loss_with_ablation", "ce_loss_zero_ablation"),
    ("model_behavior_preservation", "kl_div_score", "kl_div_score"),
    ("model_behavior_preservation", "kl_div_with_sae", "kl_div_with_sae"),
    ("reconstruction_quality", "explained_variance", "explained_variance"),
    ("reconstruction_quality", "mse", "mse"),
    ("sparsity", "l0", "l0"),
)


# Above this share of held-out tokens with no latent firing, `eval` warns: those tokens are
# reconstructed as b_dec alone. An allocation SAE (Mutual/Feature Choice) can leave many (one run
# left 36% and recovered 2.5% of the CE loss where TopK at the same settings recovered 67%).
NO_LATENT_WARNING_SHARE = 0.05


def no_latent_tokens(l0: torch.Tensor, limit: float = NO_LATENT_WARNING_SHARE) -> dict[str, Any]:
    """How many of the tokens in `l0` (per-token L0) have no latent firing, their share, the
    `limit` and a one-line `warning` (None when the share is at most `limit`)."""
    count, total = int((l0 == 0).sum()), int(l0.numel())
    share = count / total if total else 0.0
    warning = None
    if share > limit:
        warning = (f"warning: {count} of {total} held-out tokens ({share:.1%}) have no latent firing, above "
                   f"{limit:.0%}: the SAE reconstructs them as b_dec alone (train longer or with a larger k)")
    return {"count": count, "tokens": total, "share": share, "limit": limit, "warning": warning}


def _runner_cfg(sae_dir: Path) -> dict[str, Any]:
    path = sae_dir / RUNNER_CFG_FILENAME
    return json.loads(path.read_text()) if path.is_file() else {}


def l0_distribution(l0: torch.Tensor) -> dict[str, Any]:
    """Summary of per-token L0 values: mean, std, min, 5/50/95th percentiles, max, histogram."""
    l0 = l0.float()
    q = torch.quantile(l0, torch.tensor([0.05, 0.5, 0.95]))
    counts = torch.bincount(l0.long())
    return {
        "mean": float(l0.mean()),
        "std": float(l0.std()) if l0.numel() > 1 else 0.0,
        "min": float(l0.min()),
        "p5": float(q[0]),
        "p50": float(q[1]),
        "p95": float(q[2]),
        "max": float(l0.max()),
        "tokens": int(l0.numel()),
        "histogram": {str(i): int(c) for i, c in enumerate(counts.tolist()) if c},
    }


def check_eval_arguments(sae_dir: str | Path, out: str | Path | None = None, device: str = "cpu") -> None:
    """Refuse, before any model is loaded, what `evaluate_sae` cannot evaluate or write: a missing
    or broken SAE folder, a training checkpoint (its thresholds are not calibrated: evaluate the
    export), an output file in a folder that does not exist, a device this machine lacks. Raises
    `UsageError`."""
    check_device("--device", device)
    sae_dir = Path(sae_dir)
    cfg = read_sae_cfg(sae_dir)
    if is_training_checkpoint(cfg) or (sae_dir / TRAINER_STATE_FILENAME).is_file():
        raise UsageError(
            f"{sae_dir} is a training checkpoint of the {cfg.get('architecture')} architecture; "
            "evaluate its export instead: the runner's output_path (written at the end of "
            "training), or the folder written by `sae.save_inference_model(folder)`"
        )
    check_sae_weights(sae_dir, cfg)
    if out is not None:
        out = Path(out)
        if out.is_dir():
            raise UsageError(f"--out {out} is a folder; give a file name, e.g. {out / 'eval.json'}")
        if not out.parent.is_dir():
            raise UsageError(f"--out {out}: the folder {out.parent} does not exist")


@torch.no_grad()
def per_token_l0(sae: Any, store: ActivationsStore, model: Any, n_batches: int) -> torch.Tensor:
    """L0 of every non-special token of `n_batches` prompt batches, encoded as (batch, seq, d).

    Activations are shaped as SAELens' `run_evals` shapes them: a head index selects that head,
    a head dimension (hook_q/k/v/z) is flattened into d_in, and the SAE's hook_z reshaping is off
    while encoding."""
    hook = sae.cfg.metadata.hook_name
    head = sae.cfg.metadata.hook_head_index
    special = special_token_ids(model)
    reshaping = bool(getattr(sae, "hook_z_reshaping_mode", False))
    if reshaping:
        sae.turn_off_forward_pass_hook_z_reshaping()
    try:
        return _per_token_l0(sae, store, model, n_batches, hook, head, special)
    finally:
        if reshaping:
            sae.turn_on_forward_pass_hook_z_reshaping()


def _per_token_l0(
    sae: Any, store: ActivationsStore, model: Any, n_batches: int, hook: str, head: int | None,
    special: list[int],
) -> torch.Tensor:
    values = []
    for _ in range(n_batches):
        tokens = store.get_batch_tokens()
        _, cache = model.run_with_cache(tokens, names_filter=hook)
        acts = cache[hook]
        if head is not None:
            acts = acts[:, :, head]
        elif acts.ndim > 3:
            acts = acts.flatten(2)
        codes = sae.encode(acts.to(sae.device))
        keep = keep_mask(tokens, special)
        values.append((codes != 0).sum(-1)[keep.to(codes.device)].cpu())
    return torch.cat(values)


def evaluate_sae(
    sae_dir: str | Path,
    model: Any = None,
    dataset: Any = None,
    n_batches: int = 10,
    batch_size_prompts: int = 8,
    device: str = "cpu",
) -> dict[str, Any]:
    """Evaluate the SAE in `sae_dir` on held-out text.

    model: a HookedTransformer, a name (`embedded` or a TransformerLens name), or None for the
    model the SAE was trained on (runner_cfg.json). dataset: a `datasets.Dataset`, a dataset path,
    or None: the corpus' held-out split for the embedded model, else the training dataset.
    Returns SAELens' `run_evals` metrics (`saelens`), a `summary` of the headline ones, the
    per-token L0 distribution (`l0_per_token`) and the tokens with no latent firing
    (`no_latent_tokens`, with a warning above `NO_LATENT_WARNING_SHARE`).
    """
    sae_dir = Path(sae_dir)
    check_eval_arguments(sae_dir)
    for name, value in (("n_batches", n_batches), ("batch_size_prompts", batch_size_prompts)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"{name}={value!r} is not allowed: an integer >= 1")
    sae = load_sae(sae_dir, device=device)
    sae.eval()
    runner = _runner_cfg(sae_dir)
    model_name = runner.get("model_name") or sae.cfg.metadata.model_name
    if model is None or isinstance(model, str):
        model = load_lm(model or model_name, device=device)
    context_size = int(sae.cfg.metadata.context_size or runner.get("context_size") or 128)
    n_tokens = 2 * n_batches * batch_size_prompts * context_size
    if dataset is None:
        if (model_name == EMBEDDED) or runner.get("dataset_path") == EMBEDDED:
            dataset = embedded_tokens(model, "heldout", context_size, n_tokens)
        else:
            dataset = runner.get("dataset_path")
            if not dataset:
                raise UsageError(f"no dataset given and none recorded in {sae_dir / RUNNER_CFG_FILENAME}")
    store = ActivationsStore.from_sae(
        model, sae, dataset=dataset, context_size=context_size, streaming=isinstance(dataset, str),
        store_batch_size_prompts=batch_size_prompts, n_batches_in_buffer=2,
        train_batch_size_tokens=batch_size_prompts * context_size, device=device,
    )
    eval_config = EvalConfig(
        batch_size_prompts=batch_size_prompts,
        n_eval_reconstruction_batches=n_batches,
        n_eval_sparsity_variance_batches=n_batches,
        compute_kl=True,
        compute_ce_loss=True,
        compute_l2_norms=True,
        compute_sparsity_metrics=True,
        compute_variance_metrics=True,
    )
    metrics, _ = run_evals(sae, store, model, ActivationScaler(), eval_config,
                           exclude_special_tokens=True)
    summary = {name: metrics.get(section, {}).get(key) for section, key, name in _SUMMARY}
    meta = sae.cfg.metadata
    l0 = per_token_l0(sae, store, model, n_batches)
    return {
        "sae_dir": str(sae_dir),
        "architecture": sae.cfg.architecture(),
        "training_architecture": meta.training_architecture or sae.cfg.architecture(),
        "k": (meta.training_architecture_details or {}).get("k", getattr(sae.cfg, "k", None)),
        "summary": summary,
        "l0_per_token": l0_distribution(l0),
        "no_latent_tokens": no_latent_tokens(l0),
        "saelens": metrics,
    }


def format_table(result: dict[str, Any]) -> str:
    """A short human-readable table of `evaluate_sae`'s result."""
    s, l0 = result["summary"], result["l0_per_token"]
    rows = [
        ("architecture", f"{result['training_architecture']} (exported as {result['architecture']})"),
        ("CE loss recovered", s["ce_loss_recovered"]),
        ("CE loss clean / with SAE", f"{s['ce_loss_clean']:.4f} / {s['ce_loss_with_sae']:.4f}"),
        ("KL div score", s["kl_div_score"]),
        ("explained variance", s["explained_variance"]),
        ("L0 per token mean (std)", f"{l0['mean']:.2f} ({l0['std']:.2f})"),
        ("L0 per token p5 / p50 / p95", f"{l0['p5']:.0f} / {l0['p50']:.0f} / {l0['p95']:.0f}"),
    ]
    width = max(len(name) for name, _ in rows)
    lines = []
    for name, value in rows:
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"{name:<{width}}  {text}")
    return "\n".join(lines)
