"""Sparse probing: can a few latents of an SAE tell apart Python code concepts (`code_concepts.py`)
token by token, on source files the probes never saw?

Protocol (the shape of SAEBench's sparse probing, on code concepts of the embedded corpus):

1. Tokens and labels. Probe-training tokens come from files of the corpus' train split (in an
   order shuffled by `seed`), test tokens from its held-out split (split by file:
   docs/embedded-model.md): the first `FILE_TOKENS` tokens of each file, file after file, until
   `n_train_tokens` / `n_test_tokens` tokens (the cap spreads the tokens over many files). A file
   is tokenised on its own and cut into rows of [BOS] + context_size - 1 tokens; the BOS position
   is not probed. The model's activations at the SAE's hook are read for every token.
2. Latent choice (training split only): for concept c with positive tokens P and negatives N,
       score_j = | mean_{t in P} a_j(t) - mean_{t in N} a_j(t) |
   and the top-k latents by score are kept (k in `KS` = 1, 2, 5).
3. Probe: logistic regression on those k activations, standardised with the training split's
   mean and deviation, class-balanced (each class weighs half of the loss), L2 penalty `L2` on
   the weights, fitted by L-BFGS; predicts positive above probability 0.5.
4. Score: balanced accuracy on the held-out tokens, (TPR + TNR) / 2, which stays at 0.5 for a
   probe that always answers the majority class of a rare concept (plain accuracy would not).

`mean_accuracy` is the mean over concepts at the largest k (`mean_accuracy_by_k` gives every k).
It is reported beside a ceiling, the same logistic probe on all d_in hook activations, and a
floor, the same sparse probes on an untrained SAE of the same class and shape (freshly
initialised under `torch.manual_seed(seed)`, made as sparse as the trained one:
`untrained_like`). A concept with no positive or no negative token in either split has no score
and is left out of every mean.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sae_lens_allocation.analysis.code_concepts import CONCEPTS, token_labels
from sae_lens_allocation.embedded.corpus import corpus_files, read_source
from sae_lens_allocation.loading import load_sae
from sae_lens_allocation.training.sources import load_lm
from sae_lens_allocation.validation import UsageError

KS = (1, 2, 5)
L2 = 1e-3
DEFAULT_TOKENS = 32768
FILE_TOKENS = 1024
_BATCH = 1024


@dataclass
class ProbeTokens:
    """Hook activations [N, d_in] of N tokens, their concept labels [N, len(CONCEPTS)] and the
    number of files they came from."""

    acts: torch.Tensor
    labels: torch.Tensor
    files: int


def _hook_activations(model: Any, rows: torch.Tensor, hook_name: str, head: int | None) -> torch.Tensor:
    layer = re.match(r"blocks\.(\d+)\.", hook_name)
    # Nothing after the hook's block is needed.
    stop = int(layer.group(1)) + 1 if layer else None
    _, cache = model.run_with_cache(rows, names_filter=hook_name, stop_at_layer=stop)
    acts = cache[hook_name]
    if head is not None:
        acts = acts[:, :, head]
    elif acts.ndim > 3:
        acts = acts.flatten(2)
    return acts.float()


@torch.no_grad()
def probe_tokens(model: Any, hook_name: str, files: Sequence[Path], n_tokens: int, context_size: int,
                 head: int | None = None, file_tokens: int = FILE_TOKENS, rows_per_batch: int = 16) -> ProbeTokens:
    """Activations and labels of `n_tokens` tokens (fewer when `files` run out), the first
    `file_tokens` of each of `files` in turn (protocol step 1); files that `tokenize` or `ast`
    reject are skipped."""
    tokenizer = model.tokenizer
    bos = tokenizer.bos_token_id
    body = context_size - 1 if bos is not None else context_size
    rows, masks, labels = [], [], []
    used = total = 0
    for path in files:
        if total >= n_tokens:
            break
        found = token_labels(read_source(path), tokenizer)
        if found is None or not found[0]:
            continue
        take = min(file_tokens, n_tokens - total)
        ids, lab = found[0][:take], found[1][:take]
        used += 1
        total += len(ids)
        labels.append(lab)
        for start in range(0, len(ids), body):
            chunk = ids[start:start + body]
            # Padding after a short last chunk: causal attention keeps it from the real tokens.
            pad = [bos if bos is not None else 0] * (body - len(chunk))
            rows.append(([bos] if bos is not None else []) + chunk + pad)
            masks.append([False] * (bos is not None) + [True] * len(chunk) + [False] * len(pad))
    if not rows:
        raise ValueError("no file of the corpus could be tokenised and labelled")
    tokens, keep = torch.tensor(rows), torch.tensor(masks)
    device = next(model.parameters()).device
    acts = [
        _hook_activations(model, tokens[i:i + rows_per_batch].to(device), hook_name, head)[
            keep[i:i + rows_per_batch].to(device)].cpu()
        for i in range(0, len(rows), rows_per_batch)
    ]
    return ProbeTokens(acts=torch.cat(acts), labels=torch.cat(labels), files=used)


def balanced_accuracy(predicted: torch.Tensor, truth: torch.Tensor) -> float:
    """(TPR + TNR) / 2 of boolean predictions against boolean labels (both classes present)."""
    tpr = (predicted & truth).sum() / truth.sum()
    tnr = (~predicted & ~truth).sum() / (~truth).sum()
    return float((tpr + tnr) / 2)


def logistic_probe(x: torch.Tensor, y: torch.Tensor, l2: float = L2,
                   max_iter: int = 100) -> Callable[[torch.Tensor], torch.Tensor]:
    """Fit protocol step 3 on features `x` [N, m] and boolean labels `y` [N]; returns a function
    from features to boolean predictions."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    target = y.float()
    weight = torch.where(y, 0.5 / target.mean(), 0.5 / (1 - target.mean()))
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (weight * torch.nn.functional.binary_cross_entropy_with_logits(
            z @ w + b, target, reduction="none")).mean() + l2 * w.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w_fit, b_fit = w.detach(), b.detach()
    return lambda features: ((features - mean) / std) @ w_fit + b_fit > 0


@torch.no_grad()
def sae_codes(sae: Any, acts: torch.Tensor, latents: torch.Tensor | None = None) -> torch.Tensor:
    """`sae.encode` of `acts` in batches; only the columns `latents` when given."""
    out = []
    for i in range(0, acts.shape[0], _BATCH):
        codes = sae.encode(acts[i:i + _BATCH].to(sae.W_dec.device, sae.W_dec.dtype)).float().cpu()
        out.append(codes if latents is None else codes[:, latents])
    return torch.cat(out)


@torch.no_grad()
def top_latents(sae: Any, acts: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """[len(CONCEPTS), k] latents with the largest |mean on positives - mean on negatives| of
    each concept (protocol step 2), from `acts` in batches."""
    positives = labels.float()
    n_pos = positives.sum(0)
    pos_sum = total = None
    for i in range(0, acts.shape[0], _BATCH):
        codes = sae_codes(sae, acts[i:i + _BATCH])
        part = codes.T @ positives[i:i + _BATCH]  # [d_sae, C]
        pos_sum = part if pos_sum is None else pos_sum + part
        total = codes.sum(0) if total is None else total + codes.sum(0)
    assert pos_sum is not None and total is not None
    mean_pos = pos_sum / n_pos.clamp_min(1)
    mean_neg = (total[:, None] - pos_sum) / (acts.shape[0] - n_pos).clamp_min(1)
    return (mean_pos - mean_neg).abs().topk(k, dim=0).indices.T


def _scorable(train: ProbeTokens, test: ProbeTokens) -> list[bool]:
    return [bool(0 < train.labels[:, c].sum() < len(train.labels) and 0 < test.labels[:, c].sum() < len(test.labels))
            for c in range(len(CONCEPTS))]


def sparse_probe_accuracies(sae: Any, train: ProbeTokens, test: ProbeTokens,
                            ks: Sequence[int] = KS) -> dict[str, dict[str, Any]]:
    """Per concept: balanced accuracy of the top-k probe for every k (`by_k`, keys str(k)) and
    the chosen latents at the largest k (`latents`, best first); None for a concept without
    both classes in both splits."""
    chosen = top_latents(sae, train.acts, train.labels, max(ks))
    union = chosen.unique()
    column = {int(j): i for i, j in enumerate(union)}
    train_codes, test_codes = sae_codes(sae, train.acts, union), sae_codes(sae, test.acts, union)
    out: dict[str, dict[str, Any]] = {}
    for c, (name, ok) in enumerate(zip(CONCEPTS, _scorable(train, test))):
        by_k: dict[str, float | None] = {}
        for k in ks:
            cols = torch.tensor([column[int(j)] for j in chosen[c, :k]])
            by_k[str(k)] = balanced_accuracy(logistic_probe(train_codes[:, cols], train.labels[:, c])(
                test_codes[:, cols]), test.labels[:, c]) if ok else None
        out[name] = {"by_k": by_k, "latents": chosen[c].tolist()}
    return out


def raw_probe_accuracies(train: ProbeTokens, test: ProbeTokens) -> dict[str, float | None]:
    """The ceiling: balanced accuracy of the logistic probe on all d_in activations, per concept."""
    return {name: balanced_accuracy(logistic_probe(train.acts, train.labels[:, c])(test.acts), test.labels[:, c])
            if ok else None for c, (name, ok) in enumerate(zip(CONCEPTS, _scorable(train, test)))}


@torch.no_grad()
def untrained_like(sae: Any, seed: int, acts: torch.Tensor) -> Any:
    """The floor: a fresh SAE of `sae`'s class and config, initialised under
    `torch.manual_seed(seed)` without disturbing the caller's random state, as sparse as `sae` on
    `acts`. A TopK SAE is already (k latents per token); a fresh JumpReLU SAE has threshold 0 and
    fires about half its latents, a dense random-feature map rather than an SAE, so each latent's
    threshold is set to the (1 - L0 / d_sae) quantile of its activation on `acts`, where L0 is
    `sae`'s mean L0 there: every latent then fires on the trained SAE's mean share of tokens."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = type(sae)(sae.cfg)
    fresh = fresh.to(sae.W_dec.device).eval()
    threshold = getattr(fresh, "threshold", None)
    if isinstance(threshold, torch.Tensor):
        l0 = float((sae_codes(sae, acts) != 0).sum(1).float().mean())
        level = min(max(1 - l0 / sae.cfg.d_sae, 0.0), 1.0)
        threshold.copy_(torch.quantile(sae_codes(fresh, acts), level, dim=0).to(threshold))
    return fresh


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def probe_sae(sae: Any, model: Any, hook_name: str, *, context_size: int = 128, head: int | None = None,
              n_train_tokens: int = DEFAULT_TOKENS, n_test_tokens: int = DEFAULT_TOKENS,
              ks: Sequence[int] = KS, seed: int = 0) -> dict[str, Any]:
    """The protocol of the module docstring for `sae` reading `hook_name` of `model` (a
    HookedTransformer with a fast tokenizer); returns the JSON-ready report: `concepts` (per
    concept: counts, `sae` / `floor` accuracies by k, `ceiling`, chosen latents), `mean_accuracy`,
    `mean_accuracy_by_k`, `floor` and `ceiling` (each with its `mean_accuracy`), `metric`, `ks`
    and `tokens`."""
    if not ks or any(k < 1 or k > sae.cfg.d_sae for k in ks):
        raise ValueError(f"ks={list(ks)} is not allowed; use integers between 1 and d_sae={sae.cfg.d_sae}")
    ks = sorted(ks)
    context_size = min(context_size, int(model.cfg.n_ctx))
    train_files = corpus_files("train")
    random.Random(seed).shuffle(train_files)
    train = probe_tokens(model, hook_name, train_files, n_train_tokens, context_size, head)
    test = probe_tokens(model, hook_name, corpus_files("heldout"), n_test_tokens, context_size, head)
    sae.eval()
    trained = sparse_probe_accuracies(sae, train, test, ks)
    floor = sparse_probe_accuracies(untrained_like(sae, seed, train.acts), train, test, ks)
    ceiling = raw_probe_accuracies(train, test)
    concepts = {
        name: {"train_positives": int(train.labels[:, c].sum()), "test_positives": int(test.labels[:, c].sum()),
               "sae": trained[name]["by_k"], "floor": floor[name]["by_k"], "ceiling": ceiling[name],
               "latents": trained[name]["latents"]}
        for c, name in enumerate(CONCEPTS)
    }
    by_k = {str(k): _mean([trained[n]["by_k"][str(k)] for n in CONCEPTS]) for k in ks}
    floor_by_k = {str(k): _mean([floor[n]["by_k"][str(k)] for n in CONCEPTS]) for k in ks}
    return {
        "metric": "balanced_accuracy",
        "ks": list(ks),
        "hook_name": hook_name,
        "tokens": {"train": len(train.labels), "test": len(test.labels), "train_files": train.files,
                   "test_files": test.files},
        "concepts": concepts,
        "mean_accuracy": by_k[str(ks[-1])],
        "mean_accuracy_by_k": by_k,
        "floor": {"mean_accuracy": floor_by_k[str(ks[-1])], "mean_accuracy_by_k": floor_by_k},
        "ceiling": {"mean_accuracy": _mean(list(ceiling.values()))},
    }


def format_probe_table(result: dict[str, Any]) -> str:
    """Per-concept balanced accuracies (SAE at each k, floor and ceiling at the largest k), then
    the means."""
    ks = [str(k) for k in result["ks"]]
    top = ks[-1]

    def cell(value: float | None) -> str:
        return f"{value:6.3f}" if value is not None else "     -"

    head = f"{'concept':<12} {'pos(test)':>9} " + " ".join(f"{'top-' + k:>6}" for k in ks) + \
        f" {'floor':>6} {'raw':>6}"
    lines = [f"balanced accuracy on {result['tokens']['test']} held-out tokens "
             f"({result['tokens']['test_files']} files); floor: untrained SAE, top-{top}; raw: all d_in", head]
    for name, row in result["concepts"].items():
        lines.append(f"{name:<12} {row['test_positives']:>9} " + " ".join(cell(row["sae"][k]) for k in ks)
                     + f" {cell(row['floor'][top])} {cell(row['ceiling'])}")
    lines.append(f"{'mean':<12} {'':>9} " + " ".join(cell(result["mean_accuracy_by_k"][k]) for k in ks)
                 + f" {cell(result['floor']['mean_accuracy'])} {cell(result['ceiling']['mean_accuracy'])}")
    return "\n".join(lines)


def probe_export(sae_dir: str | Path, model: Any = None, *, n_train_tokens: int = DEFAULT_TOKENS,
                 n_test_tokens: int = DEFAULT_TOKENS, ks: Sequence[int] = KS, seed: int = 0,
                 device: str = "cpu") -> dict[str, Any]:
    """`probe_sae` on the SAE folder `sae_dir` (a plugin export, checkpoint or SAELens built-in:
    `loading.load_sae`), reading the hook, head index and context size from its cfg.json
    metadata. `model`: a HookedTransformer, a name (`embedded` or a TransformerLens name), or None
    for the metadata's `model_name`. Adds `sae_dir` and `model` to the report."""
    sae = load_sae(sae_dir, device=device)
    meta = sae.cfg.metadata
    if not meta.hook_name:
        raise UsageError(f"{Path(sae_dir) / 'cfg.json'} names no hook (metadata.hook_name): cannot read activations")
    name = model if isinstance(model, str) else meta.model_name
    if model is None or isinstance(model, str):
        if not name:
            raise UsageError(f"{Path(sae_dir) / 'cfg.json'} names no model (metadata.model_name); pass --model")
        model = load_lm(name, device=device)
    if not getattr(model.tokenizer, "is_fast", False):
        raise UsageError(f"model {name!r} has no fast tokenizer: labels need its character offsets")
    result = probe_sae(sae, model, meta.hook_name, context_size=int(meta.context_size or 128),
                       head=meta.hook_head_index, n_train_tokens=n_train_tokens, n_test_tokens=n_test_tokens,
                       ks=ks, seed=seed)
    return {"sae_dir": str(sae_dir), "model": name, "architecture": sae.cfg.architecture(), **result}
