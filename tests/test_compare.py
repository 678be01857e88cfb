"""`compare`: miniature end-to-end comparisons (tiny LM and tiny synthetic model) with seeds, lr
and k sweeps, intervals, verdicts, convergence and steering; config errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from sae_lens_allocation.analysis import row_metrics as rm
from sae_lens_allocation.analysis import statistics as stats
from sae_lens_allocation.analysis.compare import (
    check_compare_config,
    frontier,
    run_compare,
    training_gap,
    training_rule_stats,
    underused_share,
)
from sae_lens_allocation.analysis.compare.report import write_report
from sae_lens_allocation.analysis.statistics import BETTER, EQUIVALENT, INCONCLUSIVE, WORSE
from sae_lens_allocation.yaml_config import ConfigError

import support

CONFIGS = Path(__file__).parent.parent / "configs"
VERDICTS = {BETTER, WORSE, EQUIVALENT, INCONCLUSIVE}


def _lm_config(tmp_path: Path) -> dict:
    base = support.runner_cfg_dict("topk", tmp_path, training_tokens=8 * 256, sae_k=4)
    base["sae"].pop("architecture")
    for key in ("output_path", "checkpoint_path", "seed"):
        base.pop(key)
    return {
        "source": "language_model",
        "seeds": [3, 4],
        "threads": 1,
        "base": base,
        "architectures": [
            {"architecture": "topk"},
            {"name": "mc-aux_zipf", "architecture": "mutual_choice",
             "sae": {"aux_loss": "aux_zipf", "calibration_tokens": 512}},
            {"name": "fc-zipf", "architecture": "feature_choice",
             "sae": {"capacity": "zipf", "calibration_tokens": 512}},
            {"name": "g-beta1", "architecture": "gradient_topk", "sae": {"aux_loss": "aux_k"}},
            {"name": "g-beta0", "architecture": "gradient_topk", "sae": {"beta": 0, "aux_loss": "aux_k"}},
        ],
        "contrasts": [{"arm": "g-beta1", "against": "g-beta0"}],
        "margin_seeds": [7, 8],
        "lr_values": [1e-3, 3e-3],
        "k_values": [2],
        "eval": {"heldout_rows": 16, "batch_rows": 4, "selection_rows": 4, "steering_latents": 4,
                 "steering_contexts": 2, "probe_rows": 512, "sparse_probe_tokens": 2048},
    }


@pytest.mark.slow
def test_language_model_comparison_end_to_end(tmp_path, tiny_model):
    result = run_compare(_lm_config(tmp_path), output_dir=tmp_path / "cmp", override_model=tiny_model,
                         override_dataset=support.tiny_dataset(256), override_heldout=support.tiny_dataset(64, seed=9))
    out = tmp_path / "cmp"
    saved = json.loads((out / "results.json").read_text())
    arms = ["topk", "mc-aux_zipf", "fc-zipf", "g-beta1", "g-beta0"]
    assert list(saved["summary"]["arms"]) == arms
    # 2 lrs x 5 arms on the two selection seeds (the main runs among them), k = 2 at the best lr
    # on both seeds, topk on the two margin seeds
    assert len(saved["runs"]) == 2 * 5 * 2 + 5 * 2 + 2
    assert saved["selection"]["seeds"] == [3, 4] and saved["lr_at_edge"] == []
    for arm in arms:
        assert saved["best_lr"][arm] in (1e-3, 3e-3)
        best = min(result["lr_sweep"][arm].values())  # lowest CE with the SAE spliced in
        assert result["lr_sweep"][arm][result["best_lr"][arm]] == best
        for lr, score in result["lr_sweep"][arm].items():  # the mean over the two selection seeds
            per_seed = [saved["runs"][f"{arm}@lr={lr:g},k=4,seed={s}"]["selection"]["ce_with_sae"] for s in (3, 4)]
            assert score == pytest.approx(sum(per_seed) / 2)
        labels = saved["main"][arm]
        assert [saved["runs"][x]["seed"] for x in labels] == [3, 4]
        assert {saved["runs"][x]["lr"] for x in labels} == {saved["best_lr"][arm]}
        s = saved["summary"]["arms"][arm]
        ev = s["metrics"]["explained_variance"]
        assert ev["n"] == 2 and ev["low"] <= ev["mean"] <= ev["high"]
        assert set(s["anneal"]) == {"explained_variance", "dead_share"}
        assert set(saved["k_sweep"][arm]) == {"2", "4"}
        assert [saved["runs"][x]["seed"] for x in saved["k_sweep"][arm]["2"]] == [3, 4]
        assert saved["k_sweep"][arm]["4"] == labels
        for x in labels:
            run = saved["runs"][x]
            tokens = [p["tokens"] for p in run["convergence"]]
            assert tokens == sorted(tokens) and tokens[-1] == 8 * 256 and len(tokens) == 4
            assert run["density"]["tokens"] == result["data"]["heldout_tokens"]
            assert 0 <= run["metrics"]["dead_share"] <= run["metrics"]["underused_share"] <= 1
            assert run["metrics"]["steering"] >= 0 and run["metrics"]["steering_x2"] >= 0
            assert run["metrics"]["steering_over_random"] == pytest.approx(
                run["metrics"]["steering"] / saved["data"]["steering_random"])
            assert math.isfinite(run["metrics"]["steering_specificity"])
    # beta = 0 with aux_k is SAELens TopK on the same data: the control equals the baseline exactly
    topk, g0 = (saved["summary"]["arms"][a]["metrics"] for a in ("topk", "g-beta0"))
    for m in ("explained_variance", "ce_with_sae", "dead_share"):
        assert topk[m]["mean"] == pytest.approx(g0[m]["mean"], abs=1e-6)
    g1 = saved["summary"]["arms"]["g-beta1"]["metrics"]
    assert "ce_with_sae_gradient_selection" in g1 and "ce_with_sae_gradient_selection" not in topk
    contrasts = {(c["arm"], c["against"]): c["metrics"] for c in saved["summary"]["contrasts"]}
    assert set(contrasts) == {(a, "topk") for a in arms[1:]} | {("g-beta1", "g-beta0")}
    for rows in contrasts.values():
        for m in rows:
            assert m["verdict"] in VERDICTS
            assert m["low"] <= m["high"]
    g0_vs_topk = {m["metric"]: m for m in contrasts[("g-beta0", "topk")]}
    assert g0_vs_topk["ce_with_sae"]["diff"] == pytest.approx(0, abs=1e-9)
    # every seed gives D = 0, so the interval [0, 0] lies inside the measured margin
    assert g0_vs_topk["ce_with_sae"]["margin"] > 0
    assert g0_vs_topk["ce_with_sae"]["verdict"] == EQUIVALENT
    # Sparse probing: a per-run claim metric; its floor and ceiling once per comparison.
    probing = saved["probing"]
    assert probing["k"] == 5 and probing["tokens"]["train"] == probing["tokens"]["test"] == 2048
    assert 0 <= probing["floor"] <= 1 and 0 <= probing["ceiling"] <= 1
    for arm in arms:
        accuracy = saved["summary"]["arms"][arm]["metrics"]["sparse_probe_accuracy"]
        assert accuracy["n"] == 2 and 0 <= accuracy["mean"] <= 1
    for rows in contrasts.values():
        probe = next(m for m in rows if m["metric"] == "sparse_probe_accuracy")
        assert probe["role"] == "secondary" and probe["n_seeds"] == 2 and probe["better"] == 1
    # Stability: per arm over the one pair of seeds, no claim.
    stability = saved["summary"]["stability"]
    assert set(stability["arms"]) == set(arms) and stability["arms"]["topk"]["pairs"] == 1
    assert all("matched_share" not in m["metric"] for rows in contrasts.values() for m in rows)
    report = (out / "report.md").read_text()
    assert "specificity (nats)" in report and math.isfinite(saved["data"]["steering_specificity_random"])
    assert "**Sparse probing**" in report and f"{probing['ceiling']:.3f}" in report
    assert "**Stability across seeds**" in report and "no t verdict" in report
    for section in ("Main results", "## Verdicts", "## Margins", "Anneal diagnostic", "## Steering",
                    "gradient selection", "Learning-rate sweep", "k sweep"):
        assert section in report
    for plot in ("l0_histogram.png", "log_density.png", "metrics_vs_l0.png"):
        assert (out / plot).stat().st_size > 0
    rows = torch.load(out / "rows.pt")
    assert set(rows) == set(saved["runs"])
    # the lr is chosen on the first 4 held-out rows; every reported figure is over the other 12
    for arm in arms:
        chosen = []
        for label in saved["main"][arm]:
            sums = rows[label]["rows"]["export"]
            chosen.append(float(rm.ce_with_sae({k: sums[k][:4].double().sum(0) for k in ("ce_sae", "n_pred")})))
        assert result["lr_sweep"][arm][result["best_lr"][arm]] == pytest.approx(sum(chosen) / 2)
        assert saved["runs"][label]["metrics"]["ce_with_sae"] == pytest.approx(
            float(rm.ce_with_sae({k: sums[k][4:].double().sum(0) for k in ("ce_sae", "n_pred")})))
        assert sums["sse"].shape[0] == 16
    # The report renders the same from the saved results.json (lr keys are strings there).
    (tmp_path / "again").mkdir()
    again = write_report(saved, tmp_path / "again", None).read_text()
    assert again.split("## Learning-rate sweep")[1] == report.split("## Learning-rate sweep")[1]


def _embedded_config() -> dict:
    return {
        "source": "language_model", "seeds": [1, 2], "margin_seeds": [5, 6], "threads": 1,
        "base": {"model_name": "embedded", "hook_name": "blocks.1.hook_resid_pre", "dataset_path": "embedded",
                 "is_dataset_tokenized": True, "streaming": False, "context_size": 64,
                 "sae": {"d_in": 128, "d_sae": 64, "k": 4}, "training_tokens": 4096,
                 "train_batch_size_tokens": 512, "store_batch_size_prompts": 8, "n_batches_in_buffer": 8,
                 "lr": 1e-3, "device": "cpu", "n_eval_batches": 1, "eval_batch_size_prompts": 4, "verbose": False},
        "architectures": [{"architecture": "topk"},
                          {"name": "mc", "architecture": "mutual_choice", "sae": {"calibration_tokens": 1024}}],
        "eval": {"heldout_rows": 24, "ce_rows": 4, "batch_rows": 8, "steering_latents": 2,
                 "steering_contexts": 1, "probe_rows": 1024, "density_samples": 8000, "sparse_probe_tokens": 2048},
        "length_check": 2,
    }


@pytest.mark.slow
def test_embedded_comparison_trains_each_seed_on_its_rows_and_counts_dead_latents_beyond_heldout(tmp_path):
    """Each seed's runner builds its own embedded rows, so Mutual Choice calibrates on files that
    seed never trains on (as `train()` does), and the dead share counts every held-out token plus
    train-split rows neither training nor calibration read, up to eval.density_samples."""
    result = run_compare(_embedded_config(), output_dir=tmp_path / "emb")
    data = result["data"]
    assert set(data["density"]) == {1, 2, 5, 6}  # the margin seeds' dead shares read their own files too
    assert data["train_dataset_sha256"][1] != data["train_dataset_sha256"][2]
    assert data["density"][1]["tokens_sha256"] != data["density"][2]["tokens_sha256"]
    for run in (result["runs"][label] for labels in result["main"].values() for label in labels):
        extra = data["density"][run["seed"]]["tokens"]
        assert run["density"]["tokens"] == data["heldout_tokens"] + extra >= 8000
        assert 0 <= run["metrics"]["dead_share"] <= run["metrics"]["underused_share"] <= 1
    report = (tmp_path / "emb" / "report.md").read_text()
    assert "Dead share, seed 1:" in report and "Training rows per seed: seed 1" in report
    # The length check: both arms again on every seed with twice the tokens and the lr decay;
    # the dead share skips the files the longer run read.
    check = result["length_check"]
    assert check["factor"] == 2 and check["seeds"] == [1, 2] and set(check["runs"]) == {"topk", "mc"}
    longer = {arm: [result["runs"][label] for label in labels] for arm, labels in check["runs"].items()}
    for arm, runs in longer.items():
        for seed, run, label in zip((1, 2), runs, result["main"][arm]):
            assert run["seed"] == seed and run["convergence"][-1]["tokens"] == 2 * 4096
            assert result["runs"][label]["convergence"][-1]["tokens"] == 4096
            assert run["density"]["tokens"] == data["heldout_tokens"] + data["length_check_density"][seed]["tokens"]
            assert run["density"]["tokens"] >= 8000
    ((c),) = check["contrasts"]
    assert (c["arm"], c["against"]) == ("mc", "topk")
    ev = next(m for m in c["metrics"] if m["metric"] == "explained_variance")
    long = [a["metrics"]["explained_variance"] - b["metrics"]["explained_variance"]
            for a, b in zip(longer["mc"], longer["topk"])]
    assert ev["long"]["diff"] == pytest.approx(sum(long) / 2, abs=1e-9)
    main = next(m for m in result["summary"]["contrasts"][0]["metrics"] if m["metric"] == "explained_variance")
    assert ev["verdict"] == main["verdict"] and ev["long"]["margin"] == main["margin"]  # EV is secondary here
    assert ev["stable"] == (ev["long_verdict"] == ev["verdict"])
    assert "## Length check" in report and "Dead share, seed 2 (length check):" in report
    assert [result["runs"][r]["density"]["tokens"] >= 8000 for r in result["summary"]["margins"]["runs"]] == [True] * 2
    exports = sorted((tmp_path / "emb" / "saes").glob("mc*/cfg.json"))
    assert len(exports) == 4  # 2 seeds x (main + length check)
    for cfg_file in exports:
        calibration = json.loads(cfg_file.read_text())["metadata"]["calibration"]
        assert calibration["source"] == "embedded train split, files training never read"
        assert calibration["overlaps_training"] is False


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 5])
def test_density_rows_are_files_neither_training_nor_calibration_read(seed):
    """Training reads half the train split; the density rows come after the calibration pool in
    the seed's file order. Distinct files can share a licence text, so one or two rows may still
    share a 48-token window with the others."""
    from sae_lens_allocation.embedded import load_embedded_model
    from sae_lens_allocation.embedded.splits import embedded_calibration_tokens, embedded_density_tokens
    from sae_lens_allocation.training.sources import embedded_training_rows

    model = load_embedded_model()
    training = embedded_training_rows(model, 64, 1_200_000, seed)
    calibration = embedded_calibration_tokens(model, training, 64, 6000, seed, 0, False)
    density, info = embedded_density_tokens(model, training, 64, seed, 6000, 20_000)
    assert info["tokens"] >= 20_000 and info["calibration_pool_documents"] > 0
    assert density.shape[1] == 64 and (density[:, 0] == model.tokenizer.bos_token_id).all()
    assert density.shape[0] > 300
    assert support.rows_sharing_a_window(density, [torch.as_tensor(training[:]["tokens"]), calibration[0]]) <= 2


def test_synthetic_comparison_with_seeds_and_k_sweep(tmp_path):
    cfg = {
        "source": "synthetic",
        "seeds": [0, 1, 2],
        "threads": 1,
        "base": {
            "synthetic_model": {"num_features": 32, "hidden_dim": 16, "seed": 0, "firing_probability": {
                "generator_name": "zipfian", "exponent": 1.0, "max_prob": 0.3, "min_prob": 0.01}},
            "training_samples": 8 * 256, "batch_size": 256, "lr": 3e-3, "device": "cpu",
            "dead_feature_window": 4, "feature_sampling_window": 4,
            "sae": {"d_in": 16, "d_sae": 32, "k": 2},
        },
        "architectures": [
            {"architecture": "topk"},
            {"name": "fc-uniform", "architecture": "feature_choice",
             "sae": {"capacity": "uniform", "calibration_tokens": 512}},
        ],
        "k_values": [4],
        "length_check": 1.5,
        "margin_seeds": [10, 11, 12],
        "frontier_k": [1, 4],
        "eval": {"samples": 2048, "block_samples": 64, "density_samples": 4096, "probe_rows": 512},
    }
    result = run_compare(cfg, output_dir=tmp_path / "syn")
    # 2 arms x 3 seeds, the k sweep on every seed, the length check on every seed, 3 margin runs,
    # topk at k = 1 on the seeds (its k = 4 runs are the k sweep's)
    assert len(result["runs"]) == 2 * 3 + 2 * 3 + 2 * 3 + 3 + 3
    assert [result["runs"][x]["seed"] for x in result["k_sweep"]["fc-uniform"]["4"]] == [0, 1, 2]
    assert [[result["runs"][x]["k"] for x in labels] for labels in result["frontier"]] == [[1, 2, 4]] * 3
    for labels in result["length_check"]["runs"].values():
        for label in labels:
            assert label.endswith(",x1.5") and result["runs"][label]["convergence"][-1]["tokens"] == 3 * 1024
    arms = result["summary"]["arms"]
    assert arms["topk"]["metrics"]["mcc"]["n"] == 3
    assert arms["topk"]["metrics"]["l0"]["mean"] == pytest.approx(2.0)
    (c,) = result["summary"]["contrasts"]
    metrics = {m["metric"] for m in c["metrics"]}
    assert {"explained_variance", "dead_share", "mcc", "f1"} <= metrics and "ce_with_sae" not in metrics
    assert "underused_share" not in metrics and {"dead_share_below_1e-06", "dead_share_below_1e-05"} <= metrics
    ev = next(m for m in c["metrics"] if m["metric"] == "explained_variance")
    assert ev["n_seeds"] == 3 and ev["role"] == "primary" and 0 <= ev["p_adjusted"] <= 1
    assert all(m["role"] == "secondary" for m in c["metrics"] if m is not ev)
    # the margins come from topk on the margin seeds alone, none of which a contrast uses
    margins = result["summary"]["margins"]
    assert margins["seeds"] == [10, 11, 12] and [result["runs"][r]["seed"] for r in margins["runs"]] == [10, 11, 12]
    control = [result["runs"][r]["metrics"]["explained_variance"] for r in margins["runs"]]
    assert ev["margin"] == pytest.approx(stats.margin(control, 3))
    expected = stats.verdict(ev["diff"], ev["low"], ev["high"], 1, ev["margin"])
    assert ev["verdict"] == (INCONCLUSIVE if expected in (BETTER, WORSE) and ev["p_adjusted"] >= 0.05 else expected)
    for run in result["runs"].values():
        assert run["density"]["tokens"] == 4096
    claimed = {m["metric"] for m in c["metrics"] if m["metric"].endswith("_at_matched_l0")}
    assert claimed | set(c["off_frontier"]) == {"explained_variance_at_matched_l0", "mcc_at_matched_l0"}
    assert not claimed & set(c["off_frontier"])
    matched = next(m for m in c["metrics"] if m["metric"] == "explained_variance_at_matched_l0")
    for s, label in enumerate(result["main"]["fc-uniform"]):
        run = result["runs"][label]["metrics"]
        pts = frontier.points([result["runs"][x] for x in result["frontier"][s]], "explained_variance")
        assert matched["matched"]["control"][s] == pytest.approx(frontier.interpolate(pts, math.log(run["l0"])))
    assert matched["diff"] == pytest.approx(sum(matched["matched"]["arm"]) / 3 - sum(matched["matched"]["control"]) / 3)
    report = (tmp_path / "syn" / "report.md").read_text()
    assert "## Matched sparsity" in report
    assert "MCC" in report and "margin seeds 10, 11, 12" in report and "converged" not in report


def test_frontier_interpolates_in_log_l0_and_inverts():
    runs = [{"metrics": {"l0": l0, "explained_variance": ev}} for l0, ev in ((4, 0.8), (1, 0.5), (2, 0.7))]
    pts = frontier.points(runs, "explained_variance")
    assert [round(math.exp(x)) for x, _ in pts] == [1, 2, 4]
    # halfway between L0 2 and 4 in log L0 is sqrt(8)
    assert frontier.interpolate(pts, math.log(math.sqrt(8))) == pytest.approx(0.75)
    assert frontier.l0_to_match(pts, 0.75) == pytest.approx(math.sqrt(8))
    assert frontier.l0_to_match(pts, 0.6) == pytest.approx(math.sqrt(2))
    assert frontier.interpolate(pts, math.log(8)) is None and frontier.l0_to_match(pts, 0.9) is None
    arm = [{"metrics": {"l0": 2.0, "explained_variance": 0.75}}, {"metrics": {"l0": 8.0, "explained_variance": 0.9}}]
    assert frontier.matched_values(arm[:1], [runs], "explained_variance")["control"] == [0.7]
    assert frontier.matched_values(arm, [runs, runs], "explained_variance") is None  # L0 8 is off the frontier


def test_training_rule_probe_leaves_a_feature_choice_sae_unchanged():
    from sae_lens_allocation.saes.feature_choice import FeatureChoiceTrainingSAE, FeatureChoiceTrainingSAEConfig

    torch.manual_seed(0)
    sae = FeatureChoiceTrainingSAE(FeatureChoiceTrainingSAEConfig(d_in=8, d_sae=16, k=2, capacity="zipf"))
    sae.train()
    x = torch.randn(256, 8)
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    rng, gen = torch.get_rng_state(), sae._generator.get_state()
    stats = training_rule_stats(sae, x, 64, "feature_choice")
    assert 0 <= stats["dead_share"] <= 1 and stats["explained_variance"] <= 1
    assert sae.training
    assert torch.equal(torch.get_rng_state(), rng) and torch.equal(sae._generator.get_state(), gen)
    for k, v in sae.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_underused_share_counts_dead_latents_and_latents_far_below_the_zipf_fit():
    fired = 1e6 / torch.arange(1, 101, dtype=torch.float64)  # exact Zipf counts, s = 1
    fired[98] *= 0.1   # rank 99 fires at a tenth of its fitted density: underused
    fired[97] *= 0.6   # rank 98 at 0.6 of it: above tau = 0.5, not underused
    fired[99] = 0      # dead
    shares = underused_share(fired, 1e7, tau=0.5, fit_fraction=0.5)
    assert shares["dead_share"] == pytest.approx(0.01)
    assert shares["underused_share"] == pytest.approx(0.02)
    assert shares["zipf_s"] == pytest.approx(1.0, abs=1e-4)


def test_training_gap_compares_export_and_batch_rule_on_the_same_whole_batches():
    from sae_lens_allocation.saes.mutual_choice import MutualChoiceTrainingSAE, MutualChoiceTrainingSAEConfig

    torch.manual_seed(0)
    sae = MutualChoiceTrainingSAE(MutualChoiceTrainingSAEConfig(d_in=8, d_sae=16, k=2))
    x = torch.randn(300, 8)
    # an "export" whose rule is the batch rule itself, applied to the same batches: no gap
    export = MutualChoiceTrainingSAE(MutualChoiceTrainingSAEConfig(d_in=8, d_sae=16, k=2))
    export.load_state_dict(sae.state_dict())
    export.encode = lambda z: sae.encode_with_hidden_pre(z)[0]
    gap = training_gap(export, sae, x, 64)
    x_hat = torch.cat([sae.decode(sae.encode_with_hidden_pre(c)[0]) for c in x[:256].split(64)])
    direct = 1 - float((x_hat - x[:256]).pow(2).sum() / (x[:256] - x[:256].mean(0)).pow(2).sum())
    assert gap["training_explained_variance"] == pytest.approx(direct, rel=1e-4)
    assert gap["rows"] == 256  # whole batches only; the 44-row remainder is left out of both
    assert gap["export_minus_training_ev"] == pytest.approx(0, abs=1e-12)
    assert gap["training_l0"] == pytest.approx(2.0)
    assert sae.training
    assert training_gap(export, sae, x[:63], 64) is None


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(sourse="x"), "unknown compare config key sourse"),
        (lambda c: c.update(seed=1), "seeds"),
        (lambda c: c.update(seeds=[1, 1]), "seeds"),
        (lambda c: c["architectures"].append({"architecture": "nope"}), "nope"),
        (lambda c: c["architectures"][0].setdefault("sae", {}).update(kk=1), "unknown config key sae.kk"),
        (lambda c: c.update(k_values=[0]), "k_values"),
        (lambda c: c.update(lr_values=[]), "lr_values"),
        (lambda c: c.update(baseline="nope"), "baseline"),
        (lambda c: c.update(contrasts=[{"arm": "topk", "against": "topk"}]), "contrasts"),
        (lambda c: c["eval"].update(bootstrap=1000), "unknown compare config key eval.bootstrap"),
        (lambda c: c.update(margin_seeds=[3, 9]), "margin_seeds"),
        (lambda c: c.update(margin_seeds=[9]), "margin_seeds"),
        (lambda c: c.update(primary_metric="steering"), "primary_metric"),
        (lambda c: c.update(primary_metric="mcc"), "primary_metric"),
        (lambda c: c.update(primary_metric="kl_at_matched_l0"), "primary_metric"),
        (lambda c: c.update(frontier_k=[4, 8]), "at least 3 distinct k values"),
        (lambda c: c["eval"].update(selection_rows=256), "eval.selection_rows=256 is not allowed"),
        (lambda c: c.update(contrasts=[{"arm": "g-beta1", "against": "g-beta0", "primary": "underused_share"}]),
         "contrasts"),
        (lambda c: c["eval"].update(steering_scale=-1), "eval.steering_scale"),
        (lambda c: c["architectures"].append({"architecture": "topk"}), "used twice"),
        (lambda c: c.update(selection_seeds=3), "selection_seeds=3 is not allowed"),
        (lambda c: c.update(selection_seeds=0), "selection_seeds=0 is not allowed"),
        (lambda c: c.update(length_check=1), "length_check=1 is not allowed"),
        (lambda c: c.update(length_check="2x"), "length_check='2x' is not allowed"),
        (lambda c: c.update(hierarchies=[{"name": "h", "max_depth": 1}]), "hierarchies is not allowed with source"),
        (lambda c: c["eval"].update(sparse_probe_tokens=-1), "eval.sparse_probe_tokens=-1 is not allowed"),
    ],
)
def test_config_errors_are_one_line(tmp_path, edit, message):
    cfg = _lm_config(tmp_path)
    edit(cfg)
    with pytest.raises(ConfigError, match=message) as err:
        check_compare_config(cfg)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("hierarchies", "message"), [
    ([{"name": "h", "max_depht": 1}], "hierarchies\\[0\\] \\(h\\):.*max_depht"),
    ([{"name": "h", "total_root_nodes": 0}], "total_root_nodes must be positive"),
    ([{"name": "h"}, {"name": "h"}], "hierarchies\\[1\\].name='h' is not allowed"),
    ([{"max_depth": 1}], "hierarchies\\[0\\].name=None is not allowed"),
])
def test_hierarchy_errors_are_one_line(hierarchies, message):
    cfg = {**_resume_config(), "hierarchies": hierarchies}
    with pytest.raises(ConfigError, match=message) as err:
        check_compare_config(cfg)
    assert "\n" not in str(err.value)


def test_gradient_topk_is_refused_on_synthetic_data(tmp_path):
    cfg = {"source": "synthetic", "base": {"synthetic_model": {"num_features": 8, "hidden_dim": 4},
                                          "sae": {"d_in": 4, "d_sae": 8, "k": 2}},
           "architectures": [{"architecture": "gradient_topk"}]}
    with pytest.raises(ConfigError, match="gradient"):
        check_compare_config(cfg)


@pytest.mark.parametrize("name", ["compare-embedded.yaml", "compare-synthetic.yaml", "compare-gpt2-small.yaml"])
def test_shipped_configs_build(name):
    from sae_lens_allocation.yaml_config import read_yaml

    cfg = check_compare_config(read_yaml(CONFIGS / name))
    archs = {a["architecture"] for a in cfg["architectures"]}
    assert {"topk", "batchtopk", "mutual_choice", "feature_choice"} <= archs
    assert ("gradient_topk" in archs) == (cfg["source"] == "language_model")
    assert len(cfg["seeds"]) >= 5 and len(cfg["margin_seeds"]) >= 4 and len(cfg["lr_values"]) >= 4
    assert len({*cfg["frontier_k"], cfg["base"]["sae"]["k"]}) >= 3 and cfg["eval"]["selection_rows"] > 0
    assert cfg["eval"]["sparse_probe_tokens"] > 0 if cfg["source"] == "language_model" else len(cfg["hierarchies"]) >= 2
    if cfg["source"] == "synthetic":  # settings that break the Zipf, magnitude, independence and width priors
        wider = [s for s in cfg["settings"] if s.get("d_sae", 0) > cfg["base"]["sae"]["d_sae"]]
        assert len(cfg["settings"]) >= 2 and wider
    if cfg["source"] == "language_model":
        betas = {a["sae"].get("beta", 1.0) for a in cfg["architectures"] if a["architecture"] == "gradient_topk"}
        assert 0 in betas and len(betas) >= 2


def test_shipped_hierarchies_can_show_absorption():
    """Absorption needs parents that usually come with a child: in the shipped hierarchies every
    parent has a descendant present on at least 20% of its samples, with the main model's true L0
    (compensated marginals), so a rule that merges parent into child has something to merge."""
    from sae_lens.synthetic import SyntheticModel, SyntheticModelConfig

    from sae_lens_allocation.analysis.absorption import hierarchy_families
    from sae_lens_allocation.analysis.compare.feature_quality import hierarchy_config
    from sae_lens_allocation.yaml_config import read_yaml

    cfg = check_compare_config(read_yaml(CONFIGS / "compare-synthetic.yaml"))

    def sample(model_cfg: dict) -> tuple[SyntheticModel, torch.Tensor]:
        model = SyntheticModel(SyntheticModelConfig.from_dict(model_cfg))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            _, features = model.sample_with_features(20_000)
        return model, features.to_dense() > 0

    _, plain = sample(cfg["base"]["synthetic_model"])
    for hierarchy in cfg["hierarchies"]:
        model, fired = sample(hierarchy_config(cfg, hierarchy)["base"]["synthetic_model"])
        assert float(fired.sum(1).float().mean()) == pytest.approx(float(plain.sum(1).float().mean()), rel=0.05)
        for family in hierarchy_families(model.hierarchy):
            parent = fired[:, family.parent]
            with_child = (parent & fired[:, list(family.descendants)].any(1)).sum() / parent.sum()
            assert with_child >= 0.2, (hierarchy["name"], family.parent, float(with_child))


def _resume_config() -> dict:
    return {
        "source": "synthetic", "seeds": [0, 1, 2, 3, 4], "margin_seeds": [10, 11], "threads": 1,
        "base": {
            "synthetic_model": {"num_features": 16, "hidden_dim": 8, "seed": 0, "firing_probability": {
                "generator_name": "zipfian", "exponent": 1.0, "max_prob": 0.3, "min_prob": 0.01}},
            "training_samples": 4 * 128, "batch_size": 128, "lr": 3e-3, "device": "cpu",
            "dead_feature_window": 2, "feature_sampling_window": 2, "sae": {"d_in": 8, "d_sae": 16, "k": 2},
        },
        "architectures": [{"architecture": "topk"}, {"architecture": "batchtopk"}],
        "hierarchies": [{"name": "flat", "total_root_nodes": 2, "branching_factor": 3, "max_depth": 1},
                        {"name": "deep", "total_root_nodes": 1, "branching_factor": 2, "max_depth": 2}],
        "eval": {"samples": 512, "block_samples": 64, "density_samples": 1024, "probe_rows": 256,
                 "absorption_samples": 2048},
    }


def test_synthetic_comparison_claims_absorption_on_hierarchies_and_reports_stability(tmp_path):
    """Absorption per hierarchy is the hierarchy run's own absorption (analysis/absorption.py on its
    export and the hierarchical model, from the held-out seed), paired by seed in a secondary claim;
    stability is `seed_stability` of each arm's main exports, described without a claim."""
    from sae_lens.synthetic import SyntheticModel, SyntheticModelConfig
    from safetensors.torch import load_file

    from sae_lens_allocation.analysis.absorption import synthetic_absorption
    from sae_lens_allocation.analysis.stability import seed_stability
    from sae_lens_allocation.loading import load_sae

    cfg = _resume_config()
    cfg.update(seeds=[0, 1, 2], margin_seeds=None)
    result = run_compare(cfg, output_dir=tmp_path / "h")
    model_cfg = {**cfg["base"]["synthetic_model"], "hierarchy": {k: v for k, v in cfg["hierarchies"][0].items()
                                                                 if k != "name"}}
    model = SyntheticModel(SyntheticModelConfig.from_dict(model_cfg))
    folder = Path(result["hierarchies"]["flat"]["folder"])
    label = result["main"]["batchtopk"][1]
    export = load_sae(next((folder / "saes").glob("batchtopk_lr*seed1")), device="cpu")
    expected = synthetic_absorption(export, model, n_samples=2048, seed=2 + 7919)
    assert expected.parents_scored > 0
    assert result["runs"][label]["metrics"]["absorption_flat"] == pytest.approx(expected.mean_absorption)
    (c,) = result["summary"]["contrasts"]
    rows = {m["metric"]: m for m in c["metrics"]}
    for name in ("flat", "deep"):
        row = rows[f"absorption_{name}"]
        arm = [result["runs"][x]["metrics"][f"absorption_{name}"] for x in result["main"]["batchtopk"]]
        control = [result["runs"][x]["metrics"][f"absorption_{name}"] for x in result["main"]["topk"]]
        assert row["role"] == "secondary" and row["better"] == -1 and row["n_seeds"] == 3
        assert row["diff"] == pytest.approx(sum(a - b for a, b in zip(arm, control)) / 3)
        assert row["verdict"] == INCONCLUSIVE  # no margin seeds
    stability = result["summary"]["stability"]
    decoders = [load_file(str(Path(result["runs"][x]["sae_dir"]) / "sae_weights.safetensors"))["W_dec"]
                for x in result["main"]["topk"]]
    assert stability["arms"]["topk"] == pytest.approx(seed_stability(decoders))
    assert stability["arms"]["topk"]["pairs"] == 3 and 0 <= stability["random"]["matched_share"] <= 1
    report = (tmp_path / "h" / "report.md").read_text()
    assert "**Absorption on hierarchy `flat`**" in report and "**Absorption on hierarchy `deep`**" in report
    assert "| batchtopk | topk | absorption_deep | secondary |" in report


def _settings_config() -> dict:
    """Two arms, 3 seeds, 2 margin seeds and one setting: 12 features firing at a constant 0.1 under
    a dictionary of 32 latents (the main model: 16 Zipf features, 16 latents)."""
    cfg = _resume_config()
    cfg.update(seeds=[0, 1, 2], hierarchies=None, settings=[{
        "name": "wide", "d_sae": 32,
        "synthetic_model": {"num_features": 12, "firing_probability": {"generator_name": "constant",
                                                                       "probability": 0.1}}}])
    return cfg


def test_synthetic_settings_claim_on_their_own_model_and_resume(tmp_path, monkeypatch):
    """A setting's claims `<metric>@<name>` are the setting runs' metrics (its own synthetic model
    and d_sae), paired by seed, with margins from the control's margin seeds on the setting; a
    second call on the finished folder trains nothing and gives the same claims."""
    from sae_lens_allocation.analysis.compare.settings import SETTING_METRICS
    from sae_lens_allocation.analysis.compare.synthetic_study import SyntheticStudy

    result = run_compare(_settings_config(), output_dir=tmp_path / "s")
    setting = result["settings"]["wide"]
    assert setting["data"]["synthetic_model"]["num_features"] == 12
    assert result["data"]["synthetic_model"]["num_features"] == 16
    assert setting["data"]["true_l0"] == pytest.approx(12 * 0.1)
    assert result["data"]["true_l0"] != pytest.approx(1.2)
    twins = list(setting["metrics"])  # main runs arm by arm in seed order, then the margin runs
    labels = [*result["main"]["topk"], *result["main"]["batchtopk"], *result["summary"]["margins"]["runs"]]
    assert len(twins) == len(labels) == 8
    for label, twin in zip(labels, twins):
        for metric, _ in SETTING_METRICS:
            assert result["runs"][label]["metrics"][f"{metric}@wide"] == setting["metrics"][twin][metric]
    folder = Path(setting["folder"])
    stored = [json.loads(p.read_text())["record"] for p in (folder / "records").glob("*.json")]
    assert stored and {r["d_sae"] for r in stored} == {32}
    assert {r["d_sae"] for r in result["runs"].values()} == {16}
    (c,) = result["summary"]["contrasts"]
    rows = {m["metric"]: m for m in c["metrics"]}
    for metric, better in SETTING_METRICS:
        row = rows[f"{metric}@wide"]
        arm = [result["runs"][x]["metrics"][f"{metric}@wide"] for x in result["main"]["batchtopk"]]
        control = [result["runs"][x]["metrics"][f"{metric}@wide"] for x in result["main"]["topk"]]
        margin = result["summary"]["margins"]["metrics"][f"{metric}@wide"]
        assert margin["values"] == [result["runs"][x]["metrics"][f"{metric}@wide"]
                                    for x in result["summary"]["margins"]["runs"]]
        assert row["role"] == "secondary" and row["better"] == better and row["margin"] == margin["margin"]
        assert row["diff"] == pytest.approx(sum(a - b for a, b in zip(arm, control)) / 3)
        assert row["verdict"] in VERDICTS
    report = (tmp_path / "s" / "report.md").read_text()
    assert "**Setting `wide`**" in report and "| topk | a fixed count of k latents on every sample |" in report
    assert "| batchtopk | topk | mcc@wide | secondary |" in report
    assert "Breaks: Zipf firing (constant firing probabilities)" in report
    assert "d_sae = number of true features (here 32 latents for 12 features)" in report
    trained: list[str] = []
    train = SyntheticStudy.train
    monkeypatch.setattr(SyntheticStudy, "train", lambda self, runs: trained.extend(r.label for r in runs)
                        or train(self, runs))
    again = run_compare(_settings_config(), output_dir=tmp_path / "s")
    assert trained == [] and again["summary"]["contrasts"] == result["summary"]["contrasts"]
    assert again["summary"]["margins"] == result["summary"]["margins"]


@pytest.mark.parametrize(("edit", "message"), [
    (lambda s: s.update(name="main"), None),
    (lambda s: s.update(d_sae=0), "settings\\[0\\] \\(wide\\).d_sae=0 is not allowed"),
    (lambda s: s.update(colour="red"), "settings\\[0\\] \\(wide\\): keys \\['colour'\\] are not allowed"),
    (lambda s: s.pop("synthetic_model") and s.pop("d_sae"), "at least one of synthetic_model and d_sae"),
    (lambda s: s["synthetic_model"].update(firing_probability={"generator_name": "poisson"}),
     "settings\\[0\\] \\(wide\\).synthetic_model:.*poisson"),
    (lambda s: s["synthetic_model"].update(num_feature=3), "settings\\[0\\] \\(wide\\).synthetic_model:.*num_feature"),
    (lambda s: s["synthetic_model"].update(hierarchy={"max_depth": 1}), "hierarchies are the `hierarchies` key"),
    (lambda s: s.update(name="a b"), "settings\\[0\\].name='a b' is not allowed"),
])
def test_setting_errors_are_one_line(edit, message):
    cfg = _settings_config()
    edit(cfg["settings"][0])
    if message is None:  # a valid edit: the check passes
        assert check_compare_config(cfg)["settings"][0]["name"] == "main"
        return
    with pytest.raises(ConfigError, match=message) as err:
        check_compare_config(cfg)
    assert "\n" not in str(err.value)


def test_settings_need_the_synthetic_source(tmp_path):
    cfg = _lm_config(tmp_path)
    cfg["settings"] = [{"name": "wide", "d_sae": 32}]
    with pytest.raises(ConfigError, match="settings is not allowed with source: language_model"):
        check_compare_config(cfg)


def _claims_part(report: str) -> str:
    return report[report.index("## Verdicts"):report.index("## Anneal diagnostic")]


@pytest.mark.slow
def test_an_interrupted_comparison_resumes_to_the_report_of_an_uninterrupted_one(tmp_path, monkeypatch):
    """5 seeds of 2 arms and 2 margin seeds; the second comparison dies after 5 evaluations and is
    run again in its folder: it trains only the runs that had not finished, and gives the same
    claims as the uninterrupted one; a third call on the finished folder trains nothing. The main
    and margin runs train again on two hierarchies for absorption (12 runs each)."""
    from sae_lens_allocation.analysis.compare.synthetic_study import SyntheticStudy

    whole = run_compare(_resume_config(), output_dir=tmp_path / "whole")
    trained: list[str] = []
    train, evaluate = SyntheticStudy.train, SyntheticStudy.evaluate

    def counting_train(self, runs):
        trained.extend(r.label for r in runs)
        return train(self, runs)

    evaluated: list[str] = []

    def failing_evaluate(self, run, done):
        if len(evaluated) == 5:  # killed at the sixth evaluation: the five before it are stored
            raise KeyboardInterrupt
        evaluated.append(run.label)
        return evaluate(self, run, done)

    monkeypatch.setattr(SyntheticStudy, "train", counting_train)
    monkeypatch.setattr(SyntheticStudy, "evaluate", failing_evaluate)
    with pytest.raises(KeyboardInterrupt):
        run_compare(_resume_config(), output_dir=tmp_path / "cut")
    assert len(trained) == 6 and len(list((tmp_path / "cut" / "records").glob("*.json"))) == 5
    monkeypatch.setattr(SyntheticStudy, "evaluate", evaluate)
    trained.clear()
    resumed = run_compare(_resume_config(), output_dir=tmp_path / "cut")
    assert len(trained) == 12 - 5 + 2 * 12
    for key in ("contrasts", "margins", "stability"):
        assert resumed["summary"][key] == whole["summary"][key]
    for arm, s in whole["summary"]["arms"].items():
        assert resumed["summary"]["arms"][arm]["metrics"] == s["metrics"]
    report = (tmp_path / "cut" / "report.md").read_text()
    assert _claims_part(report) == _claims_part((tmp_path / "whole" / "report.md").read_text())
    trained.clear()
    again = run_compare(_resume_config(), output_dir=tmp_path / "cut")
    assert trained == [] and again["summary"]["contrasts"] == whole["summary"]["contrasts"]
    # a changed config trains again: the runs are keyed by their resolved config
    changed = _resume_config()
    changed["base"]["lr"] = 1e-3
    run_compare(changed, output_dir=tmp_path / "cut")
    assert len(trained) == 3 * 12
