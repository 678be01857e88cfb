"""Does the export reconstruct as its training rule does? (project definition, issue 35,
docs/architectures.md#acceptance-bounds)

On the calibration rows, shuffled (seed `calibration_seed`, as the training stream mixes documents)
and cut into whole batches of the training batch size N_train (the first RULE_GAP_ROWS rows, or
one batch where N_train is larger), compare

    EV_export  = 1 - sum ||x - dec(relu(z) [z > theta])||^2 / sum ||x - mean x||^2
    EV_train(b) = the same with the training rule's codes of each batch alone at budget b

at matched L0: b = k L0_export / L0_train(k), one proportional step from the training rule's own
L0 at k to the export's (the batch rules keep floor(b N) entries, fewer where relu zeroes some, so
their L0 scales with b). The export's L0 on its own calibration rows is in-sample (below k where
the cross-fitted level a < 1), so the plain gap EV_export - EV_train(k) understates what the rule
change gains; the matched gap does not. An export with matched gap > RULE_GAP_FLAG is recorded as
trained and deployed under different rules: its thresholds give latents a freedom (firing on more
tokens of one batch, fewer of another) that the training rule never had.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

# EV by which the export may beat its training rule before it is flagged (issue 35).
RULE_GAP_FLAG = 0.02
# Rows compared, at most (whole batches): each batch costs two runs of the training rule, the
# larger part of calibration at GPT-2 widths on a CPU (docs/performance.md#calibration).
RULE_GAP_ROWS = 16384


@torch.no_grad()
def rule_gap(
    acts: torch.Tensor,
    hidden_pre: Callable[[torch.Tensor], torch.Tensor],
    decode: Callable[[torch.Tensor], torch.Tensor],
    threshold: torch.Tensor,
    training_rule: Callable[[torch.Tensor, float], torch.Tensor],
    k: float,
    batch_tokens: int,
    seed: int,
) -> dict[str, Any]:
    """EVs and mean L0s of the export and of the training rule at budget k and at the matched
    budget (module docstring), on whole batches of `batch_tokens` rows of `acts` [N, d_in] in a
    seeded random order (at most max(RULE_GAP_ROWS, batch_tokens) rows).

    `hidden_pre` maps rows to z, `decode` codes to reconstructions, `training_rule(z, b)` z of one
    batch to its codes at budget b. Without a whole batch (N < N_train, or N_train unknown: 0)
    nothing is compared and the flag is None."""
    n_batches = min(acts.shape[0], max(RULE_GAP_ROWS, batch_tokens)) // batch_tokens if batch_tokens > 0 else 0
    out: dict[str, Any] = {"batch_tokens": batch_tokens, "batches": n_batches}
    if n_batches == 0:
        return {**out, "trained_and_deployed_under_different_rules": None}
    order = torch.randperm(acts.shape[0], generator=torch.Generator().manual_seed(seed))
    x_all = acts[order[: n_batches * batch_tokens].to(acts.device)]
    mean = x_all.float().mean(0)
    total = float((x_all.float() - mean).pow(2).sum())
    theta = threshold.to(x_all.dtype)

    def sweep(budgets: list[float | None]) -> list[tuple[float, float]]:
        """(EV, mean L0) per rule, z computed once per batch: the export (None) or the training
        rule at that budget."""
        sse, fired = [0.0] * len(budgets), [0.0] * len(budgets)
        for x in x_all.split(batch_tokens):
            z = hidden_pre(x)
            for i, budget in enumerate(budgets):
                codes = z.relu() * (z > theta) if budget is None else training_rule(z, budget)
                sse[i] += float((decode(codes).float() - x.float()).pow(2).sum())
                fired[i] += float((codes != 0).sum())
        return [(1.0 - e / total, f / (n_batches * batch_tokens)) for e, f in zip(sse, fired)]

    (export_ev, export_l0), (training_ev, training_l0) = sweep([None, k])
    stats = {**out, "export_ev": export_ev, "export_l0": export_l0, "training_rule_ev": training_ev,
             "training_rule_l0": training_l0, "ev_gap": export_ev - training_ev}
    matched_budget = k * export_l0 / training_l0 if training_l0 > 0 else k
    try:
        (matched_ev, matched_l0), = sweep([matched_budget])
    except ValueError as refused:
        # A budget the rule cannot run (Feature Choice below floor(b N) = d_sae): the plain gap.
        return {**stats, "matched_budget": matched_budget, "matched_refused": str(refused),
                "trained_and_deployed_under_different_rules": stats["ev_gap"] > RULE_GAP_FLAG}
    gap = export_ev - matched_ev
    return {
        **stats,
        "matched_budget": matched_budget,
        "matched_training_rule_ev": matched_ev,
        "matched_training_rule_l0": matched_l0,
        "matched_ev_gap": gap,
        "trained_and_deployed_under_different_rules": gap > RULE_GAP_FLAG,
    }
