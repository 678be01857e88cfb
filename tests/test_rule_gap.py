"""The export's EV against its training rule's, and the metadata flag when the export beats the
training rule by more than 0.02 (saes/rule_gap.py, docs/architectures.md#acceptance-bounds)."""

import pytest
import torch

from sae_lens_allocation.allocation.global_merge import SINGLE_PROCESS
from sae_lens_allocation.saes.rule_gap import RULE_GAP_FLAG, rule_gap

import support

D_IN, D_SAE, BATCH = 16, 64, 128


def _ev(x, x_hat):
    return float(1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def _gap(acts, training_rule, batch_tokens=BATCH, k=1.0):
    theta = torch.zeros(acts.shape[1])
    return rule_gap(acts, lambda x: x, lambda c: c, theta, training_rule, k, batch_tokens, seed=0)


def _top(z, budget):
    """Mutual Choice of one batch: its floor(budget N) largest relu(z)."""
    c = z.relu().flatten()
    keep = torch.zeros_like(c)
    keep[c.topk(int(budget * z.shape[0])).indices] = 1
    return (c * keep).view_as(z)


def test_rule_gap_flags_an_export_that_beats_its_training_rule_at_matched_l0():
    acts = torch.randn(3 * BATCH + 5, D_IN)  # 5 rows short of a fourth batch: left out
    order = torch.randperm(acts.shape[0], generator=torch.Generator().manual_seed(0))
    x = acts[order[: 3 * BATCH]]
    export_l0 = float((x > 0).sum()) / x.shape[0]  # theta = 0: every positive entry, about 8

    same = _gap(acts, lambda z, b: z.relu(), k=4.0)
    assert same["batches"] == 3 and same["ev_gap"] == same["matched_ev_gap"] == 0.0
    assert same["export_ev"] == pytest.approx(_ev(x, x.relu()), abs=1e-6)
    assert same["export_l0"] == same["training_rule_l0"] == pytest.approx(export_l0)
    assert same["trained_and_deployed_under_different_rules"] is False

    # A global top at budget 4: worse than the export, but only because it fires half as much;
    # at the matched budget (k 4 x export L0 / 4) it keeps nearly every positive entry (a batch
    # with more than the mean loses its smallest ones).
    top = _gap(acts, _top, k=4.0)
    assert top["training_rule_l0"] == pytest.approx(4.0)
    assert top["ev_gap"] > RULE_GAP_FLAG
    assert top["matched_budget"] == pytest.approx(export_l0)
    assert top["matched_training_rule_l0"] == pytest.approx(export_l0, rel=0.02)
    assert 0 <= top["matched_ev_gap"] < 0.002
    assert top["trained_and_deployed_under_different_rules"] is False

    # A rule that keeps only each row's largest code, whatever its budget: worse at any L0.
    def top1(z, b):
        c = z.relu()
        return c * (c == c.max(dim=1, keepdim=True).values)

    worse = _gap(acts, top1, k=1.0)
    expected = _ev(x, torch.cat([top1(b, 1.0) for b in x.split(BATCH)]))
    assert worse["matched_training_rule_ev"] == pytest.approx(expected, abs=1e-6)
    assert worse["matched_ev_gap"] > RULE_GAP_FLAG
    assert worse["trained_and_deployed_under_different_rules"] is True


def test_rule_gap_falls_back_to_the_plain_gap_where_the_matched_budget_is_refused():
    def refuses_other_budgets(z, b):
        if b != 1.0:
            raise ValueError("budget too small")
        return z.relu() * (z == z.max(dim=1, keepdim=True).values)

    gap = _gap(torch.randn(BATCH, D_IN), refuses_other_budgets, k=1.0)
    assert gap["matched_refused"] == "budget too small" and "matched_ev_gap" not in gap
    assert gap["trained_and_deployed_under_different_rules"] is (gap["ev_gap"] > RULE_GAP_FLAG) is True


def test_rule_gap_without_a_whole_batch_compares_nothing():
    acts = torch.randn(BATCH - 1, D_IN)
    for batch_tokens in (BATCH, 0):  # fewer rows than a batch; batch size unknown
        gap = _gap(acts, lambda z, b: z, batch_tokens)
        assert gap["batches"] == 0 and "ev_gap" not in gap
        assert gap["trained_and_deployed_under_different_rules"] is None


class _NoCollectives:
    """A batch group of one latent shard (its latent-group methods the identities of one
    process) whose every data-group use fails: calibration must not need the other data ranks."""

    def __getattr__(self, name):
        if name in ("shards", "shard", "sum_latents", "gather_latents", "local_latents", "gather_latent_lists"):
            return getattr(SINGLE_PROCESS, name)
        raise AssertionError(f"calibration used the batch group ({name})")


@pytest.mark.parametrize("arch,fields", [
    ("mutual_choice", {}), ("feature_choice", {}), ("feature_choice", {"capacity": "zipf"}),
    ("mutual_choice", {"min_tokens_per_latent": 1}),
])
def test_calibration_records_the_training_rule_gap_at_the_training_batch_size(arch, fields):
    sae = support.plugin_sae(arch, d_in=D_IN, d_sae=D_SAE, k=4, b_enc_std=0.1, **fields)
    rows = torch.randn(8 * BATCH, D_IN)
    # Before any training step the batch size is unknown: nothing compared.
    sae.calibrate_thresholds(rows)
    assert sae.cfg.metadata.calibration["trained_and_deployed_under_different_rules"] is None
    sae.train()
    for step in range(3):
        support.training_step(sae, torch.randn(BATCH, D_IN), step=step)
    assert int(sae.training_batch_tokens) == BATCH
    generator = getattr(sae, "_generator", None)
    state = None if generator is None else generator.get_state()
    group, sae.batch_group = sae.batch_group, _NoCollectives()
    try:
        sae.calibrate_thresholds(rows)
    finally:
        sae.batch_group = group
    meta = sae.cfg.metadata.calibration
    gap = meta["rule_gap"]
    assert gap["batch_tokens"] == BATCH and gap["batches"] == 8
    assert meta["trained_and_deployed_under_different_rules"] is (gap["matched_ev_gap"] > RULE_GAP_FLAG)
    # The batch rule keeps floor(k N) entries of every batch, relu'd: L0 at most k; at the
    # matched budget its L0 is the export's, up to the rounding of the budget and relu.
    assert 0 < gap["training_rule_l0"] <= 4.0
    assert gap["matched_training_rule_l0"] == pytest.approx(gap["export_l0"], rel=0.05)
    assert sae.cfg.k == 4
    # The export's side is the eval-mode encoder on the same rows.
    order = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(0))
    sae.eval()
    with torch.no_grad():
        x = rows[order]
        assert gap["export_ev"] == pytest.approx(_ev(x, sae(x)), abs=1e-5)
    if state is not None:  # the capacities' rounding draws are put back
        assert torch.equal(generator.get_state(), state)


def test_rule_gap_compares_at_most_rule_gap_rows(monkeypatch):
    from sae_lens_allocation.saes import rule_gap as module

    monkeypatch.setattr(module, "RULE_GAP_ROWS", 2 * BATCH)
    acts = torch.randn(5 * BATCH, D_IN)
    assert _gap(acts, lambda z, b: z.relu())["batches"] == 2
    # A training batch larger than the cap: one whole batch.
    assert _gap(acts, lambda z, b: z.relu(), batch_tokens=3 * BATCH)["batches"] == 1
