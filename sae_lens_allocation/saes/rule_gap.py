"""Does the export reconstruct as its training rule does? (project definition, issue 35,
docs/architectures.md#acceptance-bounds)

On the calibration rows, shuffled (seed `calibration_seed`, as the training stream mixes documents)
and cut into whole batches of the training batch size N_train, compare

    EV_export = 1 - sum ||x - dec(relu(z) [z > theta])||^2 / sum ||x - mean x||^2
    EV_train  = 1 - sum ||x - dec(allocate_N_train(z))||^2 / sum ||x - mean x||^2

(the batch rule run on each batch alone, in this process, as in training). An export with
EV_export - EV_train > RULE_GAP_FLAG is recorded as trained and deployed under different rules:
its thresholds give latents a freedom (firing on more tokens of one batch, fewer of another) that
the training rule never had, so what was trained is not what is deployed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

# EV by which the export may beat its training rule before it is flagged (issue 35).
RULE_GAP_FLAG = 0.02


@torch.no_grad()
def rule_gap(
    acts: torch.Tensor,
    hidden_pre: Callable[[torch.Tensor], torch.Tensor],
    decode: Callable[[torch.Tensor], torch.Tensor],
    threshold: torch.Tensor,
    training_rule: Callable[[torch.Tensor], torch.Tensor],
    batch_tokens: int,
    seed: int,
) -> dict[str, Any]:
    """The EVs and mean L0s of the export and the training rule (module docstring) on the whole
    batches of `batch_tokens` rows of `acts` [N, d_in] in a seeded random order.

    `hidden_pre` maps rows to z, `decode` codes to reconstructions, `training_rule` z of one batch
    to its codes. Without a whole batch (N < N_train, or N_train unknown: 0) nothing is compared
    and the flag is None."""
    n_batches = acts.shape[0] // batch_tokens if batch_tokens > 0 else 0
    out: dict[str, Any] = {"batch_tokens": batch_tokens, "batches": n_batches}
    if n_batches == 0:
        return {**out, "trained_and_deployed_under_different_rules": None}
    order = torch.randperm(acts.shape[0], generator=torch.Generator().manual_seed(seed))
    x_all = acts[order[: n_batches * batch_tokens].to(acts.device)]
    mean = x_all.float().mean(0)
    total, sse = 0.0, {"export": 0.0, "training": 0.0}
    fired = {"export": 0.0, "training": 0.0}
    for x in x_all.split(batch_tokens):
        z = hidden_pre(x)
        codes = {
            "export": z.relu() * (z > threshold.to(z.dtype)),
            "training": training_rule(z),
        }
        for name, c in codes.items():
            sse[name] += float((decode(c).float() - x.float()).pow(2).sum())
            fired[name] += float((c != 0).sum())
        total += float((x.float() - mean).pow(2).sum())
    n = n_batches * batch_tokens
    ev = {name: 1.0 - v / total for name, v in sse.items()}
    gap = ev["export"] - ev["training"]
    return {
        **out,
        "export_ev": ev["export"],
        "training_rule_ev": ev["training"],
        "export_l0": fired["export"] / n,
        "training_rule_l0": fired["training"] / n,
        "ev_gap": gap,
        "trained_and_deployed_under_different_rules": gap > RULE_GAP_FLAG,
    }
