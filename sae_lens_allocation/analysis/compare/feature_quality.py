"""Feature quality in a comparison beyond reconstruction: stability across seeds (both sources,
analysis/stability.py) and the hierarchies on which synthetic absorption is measured
(analysis/absorption.py).

Stability is a property of a set of seeds, not of one run: per arm, over every unordered pair of
its main seeds' exports (n seeds give n(n-1)/2 pairs),

    matched_share(arm) = mean over pairs (a, b) of matched_share(W_dec(a), W_dec(b))

with its min and max over the pairs, beside the same figure for random decoders of the same
shape. No paired t verdict is attached to it. The figures of two arms on the same seed pair can be
matched, but the n(n-1)/2 pairs share seeds, so their differences are not independent and a t
interval over them would claim n(n-1)/2 - 1 degrees of freedom it does not have; disjoint pairs
are independent but give floor(n/2) differences (2 for 5 seeds, an interval with 1 degree of
freedom). The mean, min and max over the pairs are reported as a description."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from sae_lens_allocation.analysis.stability import MATCH_THRESHOLD, random_baseline, seed_stability

Record = dict[str, Any]


def _decoder(sae_dir: str) -> Any:
    from safetensors.torch import load_file

    return load_file(str(Path(sae_dir) / "sae_weights.safetensors"))["W_dec"]


def arm_stability(records: dict[str, Record], main: dict[str, list[str]],
                  threshold: float = MATCH_THRESHOLD) -> dict[str, Any]:
    """Per arm `stability.seed_stability` of its main runs' exported decoders (module docstring),
    and `random`: `stability.random_baseline` of the first arm's shape; {} with fewer than 2 seeds."""
    if len(next(iter(main.values()))) < 2:
        return {}
    arms = {arm: seed_stability([_decoder(records[x]["sae_dir"]) for x in labels], threshold)
            for arm, labels in main.items()}
    w = _decoder(records[next(iter(main.values()))[0]]["sae_dir"])
    chance = random_baseline(w.shape[0], w.shape[0], w.shape[1], threshold)
    return {"threshold": threshold, "arms": arms,
            "random": {"matched_share": chance.matched_share, "mean_max_cosine": chance.mean_max_cosine}}


def hierarchy_config(cfg: dict[str, Any], hierarchy: dict[str, Any]) -> dict[str, Any]:
    """The comparison config whose synthetic model has `hierarchy` (a `sae_lens.synthetic`
    HierarchyConfig mapping, `name` aside): same arms, seeds and eval, its own output folder."""
    out = copy.deepcopy(cfg)
    out["base"]["synthetic_model"]["hierarchy"] = {k: v for k, v in hierarchy.items() if k != "name"}
    return out


class SparseProbes:
    """Sparse probing in a language-model comparison (analysis/probing.py on the embedded corpus'
    Python concepts): the probe tokens, read once, `n_tokens` from train-split files shuffled by
    `seed` and `n_tokens` from held-out files; per run `accuracy(export)` = mean over the scorable
    concepts of the balanced accuracy of the logistic probe on the run's top-`PROBE_K` latents. The
    floor (the same probes on `probing.untrained_like` of an untrained `floor_sae`, the baseline's
    training class and config) and the ceiling (the probe on all d_in activations) do not depend on
    the run: `reference` holds them once."""

    PROBE_K = 5

    def __init__(self, model: Any, hook_name: str, context_size: int, n_tokens: int, seed: int,
                 floor_sae: Any) -> None:
        import random

        from sae_lens_allocation.analysis import probing
        from sae_lens_allocation.embedded.corpus import corpus_files

        context_size = min(context_size, int(model.cfg.n_ctx))
        train_files = corpus_files("train")
        random.Random(seed).shuffle(train_files)
        self.train = probing.probe_tokens(model, hook_name, train_files, n_tokens, context_size)
        self.test = probing.probe_tokens(model, hook_name, corpus_files("heldout"), n_tokens, context_size)
        ceiling = [v for v in probing.raw_probe_accuracies(self.train, self.test).values() if v is not None]
        self.reference = {
            "k": self.PROBE_K, "metric": "balanced_accuracy",
            "tokens": {"train": len(self.train.labels), "test": len(self.test.labels),
                       "train_files": self.train.files, "test_files": self.test.files},
            "floor": self.accuracy(probing.untrained_like(floor_sae, seed, self.train.acts)),
            "ceiling": sum(ceiling) / len(ceiling) if ceiling else None,
        }

    def accuracy(self, sae: Any) -> float | None:
        from sae_lens_allocation.analysis import probing

        scores = [c["by_k"][str(self.PROBE_K)] for c in
                  probing.sparse_probe_accuracies(sae, self.train, self.test, (self.PROBE_K,)).values()]
        kept = [s for s in scores if s is not None]
        return sum(kept) / len(kept) if kept else None
