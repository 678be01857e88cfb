"""Per-row sums of the comparison's metrics on held-out data, so that every figure can be
recomputed from the saved rows (rows.pt of a comparison) and pooled over any subset of rows.

A row is one held-out sequence (language model) or one block of samples (synthetic). Special
tokens (BOS/EOS/PAD) are left out as SAELens' `run_evals(exclude_special_tokens=True)` leaves
them out: their activations are neither encoded nor replaced, and predictions of them are not
scored. Activation-level sums (EV, L0, firing) cover every held-out row; the language-model
sums (CE, KL) may cover fewer rows, since each needs full forward passes. Definitions (project;
docs/results.md "Metrics"):
    EV        = 1 - sum ||x - x_hat||^2 / (sum ||x||^2 - ||sum x||^2 / n)
    CE        = mean next-token cross-entropy with the reconstruction spliced in at the hook
    CE rec.   = (CE_zero - CE_sae) / (CE_zero - CE_clean), CE_zero with zeros spliced in
    KL        = mean KL(p_clean || p_sae) of the next-token distributions
    L0        = mean number of active latents per token
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from sae_lens_allocation.tokens import keep_mask
from sae_lens_allocation.training.gradients import activation_gradients

# (x [..., d], g [..., d] or None) -> (codes [..., d_sae], x_hat [..., d])
Reconstruct = Callable[[torch.Tensor, "torch.Tensor | None"], tuple[torch.Tensor, torch.Tensor]]


def export_reconstruct(sae: Any) -> Reconstruct:
    """Encode and decode with a SAELens inference SAE (the export)."""
    def run(x: torch.Tensor, g: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        codes = sae.encode(x)
        return codes, sae.decode(codes)
    return run


def gradient_reconstruct(sae: Any) -> Reconstruct:
    """Gradient TopK's own selection at evaluation: codes chosen with the LM-loss gradient g at x
    (`encode_with_gradients`, running RMS read, not updated)."""
    def run(x: torch.Tensor, g: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if g is None:
            raise ValueError("gradient selection needs the gradient g at the hook")
        codes = sae.encode_with_gradients(x, g)
        return codes, sae.decode(codes)
    return run


def _splice(model: Any, tokens: torch.Tensor, hook_name: str, replacement: torch.Tensor) -> torch.Tensor:
    def put(act: torch.Tensor, hook: Any) -> torch.Tensor:
        return replacement.to(act.dtype)
    return model.run_with_hooks(tokens, fwd_hooks=[(hook_name, put)])


def _token_ce(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[b, T-1] next-token cross-entropy."""
    return F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), tokens[:, 1:], reduction="none")


def _token_kl(clean: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """[b, T-1] KL(p_clean || p_other) of the next-token distributions."""
    lp = F.log_softmax(clean[:, :-1].float(), -1)
    lq = F.log_softmax(other[:, :-1].float(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


@torch.no_grad()
def lm_row_activations(model: Any, tokens: torch.Tensor, hook_name: str, batch_rows: int = 8) -> torch.Tensor:
    """Activations at the hook of every row, [R, T, d] (float32, on the tokens' device); the
    forward stops after the hook's block (`blocks.L.*`)."""
    layer = int(hook_name.split(".")[1]) + 1 if hook_name.startswith("blocks.") else None
    out = []
    for batch in tokens.split(batch_rows):
        _, cache = model.run_with_cache(batch, names_filter=hook_name, stop_at_layer=layer)
        out.append(cache[hook_name].float())
    return torch.cat(out)


@torch.no_grad()
def activation_sums(reconstruct: Reconstruct, acts: torch.Tensor, keep: torch.Tensor,
                    batch_rows: int = 8) -> dict[str, Any]:
    """Activation-level sums of every row of `acts` [R, T, d] over its kept positions `keep`
    [R, T]: `rows` (n, sx, sxx, sse, l0, each per row), `fired` (each latent's firing count) and
    `l0_tokens` (the L0 of every kept position). A synthetic block of samples is a row."""
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("n", "sx", "sxx", "sse", "l0")}
    fired: torch.Tensor | None = None
    l0_tokens = []
    for x, k in zip(acts.split(batch_rows), keep.split(batch_rows)):
        codes, x_hat = reconstruct(x, None)
        m = k[..., None].float()
        active = (codes != 0) & k[..., None]
        out["n"].append(k.sum(1).float())
        out["sx"].append((x * m).sum(1))
        out["sxx"].append((x.pow(2) * m).sum((1, 2)))
        out["sse"].append(((x_hat.float() - x).pow(2) * m).sum((1, 2)))
        out["l0"].append(active.sum((1, 2)).float())
        counts = active.sum((0, 1)).double().cpu()
        fired = counts if fired is None else fired + counts
        l0_tokens.append(active.sum(-1)[k].cpu())
    assert fired is not None
    return {"rows": {k: torch.cat(v).double().cpu() for k, v in out.items()}, "fired": fired,
            "l0_tokens": torch.cat(l0_tokens)}


@torch.no_grad()
def lm_reference_sums(model: Any, tokens: torch.Tensor, hook_name: str, special_ids: list[int],
                      batch_rows: int = 8) -> dict[str, torch.Tensor]:
    """Per-row sums that do not depend on the SAE: clean and zero-ablation CE and the number
    of scored predictions."""
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("ce_clean", "ce_zero", "n_pred")}
    for batch in tokens.split(batch_rows):
        keep = keep_mask(batch, special_ids)
        logits, cache = model.run_with_cache(batch, names_filter=hook_name)
        acts = cache[hook_name]
        zero = torch.where(keep[..., None], torch.zeros_like(acts), acts)
        pred = keep[:, 1:].float()
        out["ce_clean"].append((_token_ce(logits, batch) * pred).sum(1))
        out["ce_zero"].append((_token_ce(_splice(model, batch, hook_name, zero), batch) * pred).sum(1))
        out["n_pred"].append(pred.sum(1))
    return {k: torch.cat(v).double().cpu() for k, v in out.items()}


def lm_sae_sums(model: Any, tokens: torch.Tensor, hook_name: str, reconstruct: Reconstruct,
                special_ids: list[int], batch_rows: int = 8, with_gradients: bool = False) -> dict[str, torch.Tensor]:
    """Per-row sums with the SAE's reconstruction spliced in at the hook: ce_sae and kl.
    `with_gradients`: g = d(sum of next-token CE)/dx at the hook on the clean text (teacher
    forcing) is passed to `reconstruct`."""
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("ce_sae", "kl")}
    for batch in tokens.split(batch_rows):
        keep = keep_mask(batch, special_ids)
        g = None
        if with_gradients:
            _, g = activation_gradients(model, batch, hook_name)
        with torch.no_grad():
            logits, cache = model.run_with_cache(batch, names_filter=hook_name)
            acts = cache[hook_name]
            _, x_hat = reconstruct(acts, g)
            spliced = torch.where(keep[..., None], x_hat.to(acts.dtype), acts)
            with_sae = _splice(model, batch, hook_name, spliced)
            pred = keep[:, 1:].float()
            out["ce_sae"].append((_token_ce(with_sae, batch) * pred).sum(1))
            out["kl"].append((_token_kl(logits, with_sae) * pred).sum(1))
    return {k: torch.cat(v).double().cpu() for k, v in out.items()}


def explained_variance(s: dict[str, torch.Tensor]) -> torch.Tensor:
    total = s["sxx"] - s["sx"].pow(2).sum(-1) / s["n"]
    return 1 - s["sse"] / total


def mean_l0(s: dict[str, torch.Tensor]) -> torch.Tensor:
    return s["l0"] / s["n"]


def ce_with_sae(s: dict[str, torch.Tensor]) -> torch.Tensor:
    return s["ce_sae"] / s["n_pred"]


def ce_recovered(s: dict[str, torch.Tensor]) -> torch.Tensor:
    return (s["ce_zero"] - s["ce_sae"]) / (s["ce_zero"] - s["ce_clean"])


def kl_div(s: dict[str, torch.Tensor]) -> torch.Tensor:
    return s["kl"] / s["n_pred"]


# Dead share thresholds besides "never fired": a latent firing once in a million tokens is as
# good as dead for a dictionary, yet "never fired" counts it alive.
DEAD_THRESHOLDS = (1e-6, 1e-5)


def density_stats(fired: torch.Tensor, n_tokens: float) -> dict[str, Any]:
    """Firing density p_j = count_j / n of every latent; dead = never fires on these tokens, and
    the shares with p_j below each of DEAD_THRESHOLDS (a threshold below 1/n counts the same
    latents as never firing); the histogram of log10 p_j over the firing latents (bins of 0.25
    decades)."""
    p = fired / n_tokens
    alive = p[p > 0]
    log_p = alive.log10()
    edges = torch.arange(-8.0, 0.25, 0.25, dtype=torch.float64)
    bins = len(edges) - 1
    hist = torch.histc(log_p.clamp(-8, 0), bins=bins, min=-8, max=0) if alive.numel() else torch.zeros(bins)
    return {"tokens": int(n_tokens), "dead_share": float((p == 0).double().mean()),
            "dead_share_below": {f"{t:g}": float((p < t).double().mean()) for t in DEAD_THRESHOLDS},
            "log10_density_edges": edges.tolist(), "log10_density_hist": hist.tolist()}
