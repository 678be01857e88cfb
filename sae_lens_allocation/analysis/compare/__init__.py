"""`sae-lens-allocation compare CONFIG.yaml`: several architectures trained on the same data over
several seeds, evaluated on the same held-out data, with intervals and verdicts against a
baseline (report.md, results.json, rows.pt, PNG plots).

Config (YAML mapping; every key checked, errors are one-line `ConfigError`s):

    source: language_model | synthetic
    output_dir: runs/compare          # report.md, results.json, rows.pt, plots, one SAE folder per run
    seeds: [42, 43, 44, 45, 46]       # every arm at its best lr and the main k, once per seed
    margin_seeds: [142, 143, 144, 145]  # optional: the baseline again at its best lr on these seeds
                                      # (none of them in seeds): the margins of the verdicts;
                                      # without them every verdict is "inconclusive"
    primary_metric: ce_with_sae       # the primary claim of every contrast (default: ce_with_sae,
                                      # synthetic: explained_variance); the other metrics are secondary
    threads: 2                        # torch.set_num_threads
    base: {...}                       # language_model: a SAELens runner config without
                                      # sae.architecture (model_name defaults to the embedded
                                      # model and its corpus); synthetic: SyntheticSAERunnerConfig
                                      # fields (synthetic_model, training_samples, batch_size, ...)
    architectures:                    # the arms: any registered training architecture, with overrides
      - {name: mc-aux_zipf, architecture: mutual_choice, sae: {aux_loss: aux_zipf}, runner: {}}
    baseline: topk                    # the arm every other arm is compared with (default: the
                                      # arm named topk, else the first)
    contrasts: [{arm: g-beta1, against: g-beta0, primary: kl}]   # further paired comparisons
                                      # (primary optional, default primary_metric)
    lr_values: [3.0e-4, 1.0e-3, 3.0e-3]   # optional lr sweep on the first selection_seeds seeds at
                                      # the main k; every arm is then reported at its best lr
    selection_seeds: 2                # seeds the lr is chosen on (default 2, or 1 with one seed)
    k_values: [8, 32]                 # optional: every arm at these k on every seed at its best lr
    frontier_k: [8, 32]               # optional: the baseline at these k on every seed (with its
                                      # own k at least 3 values): claims at matched sparsity,
                                      # <metric>_at_matched_l0 (frontier.py)
    length_check: 2                   # optional: every arm again on every seed at its best lr with
                                      # this many times the training (tokens or samples, and
                                      # lr_decay_steps); do the verdicts survive longer training?
    hierarchies:                      # synthetic, optional: absorption; the main and margin runs
      - {name: flat, total_root_nodes: 16, branching_factor: 4, max_depth: 1}   # train again on
                                      # base.synthetic_model with each (HierarchyConfig fields)
    settings:                         # synthetic, optional: priors that differ (settings.py); the
      - {name: wide, d_sae: 1024}     # main and margin runs train again with each one's
                                      # synthetic_model fields and/or d_sae; claims <metric>@<name>
    lockstep: true                    # language_model: arms that share seed and lr train in one
                                      # multi-SAE run (one LM pass per batch)
    eval: {...}                       # see config._EVAL_DEFAULTS

Protocol (docs/results.md "Protocol"): (1) the lr sweep on the first `selection_seeds` seeds at
the main k; the best lr of an arm has the lowest mean selection-row CE with the SAE spliced in
(language model) or the highest mean selection EV (synthetic), and an arm whose best lr is an end
point of the grid is named in the report; (2) every arm at its best lr and the main k for every
seed (the sweep's runs are reused); (3) the k sweep: every arm at each of `k_values` on every
seed; (4) the baseline on the margin seeds at its best lr, and at each of `frontier_k` on every
seed (the k sweep's runs where the k values coincide); (5) the length check on every seed. Main-k
results are reported as mean +- sd over seeds, and per contrast and claim metric
(config.CLAIM_METRICS) as the paired difference over seeds with its t interval, the margin measured
on the margin seeds and a verdict (claims.py, statistics.py); one primary metric per contrast,
Benjamini-Hochberg over the primary claims. The anneal diagnostic: the training rule's held-out EV
and dead share at the last two of `eval.convergence_points` evenly spaced evaluations (no pass or
fail). The length check: every claim again on the runs trained `length_check` times longer, with
the same margin; a verdict is stable when it is the same.

Resuming: every finished run is stored in the output folder under a hash of its resolved config
and data (store.py); a comparison reuses them, so an interrupted or extended one trains only the
missing runs, and a finished folder rebuilds its report without training.

Same data: every run of a seed reads the same rows in the same order. Language model: each run is
a SAELens multi-SAE run (training/multi_runner.py) seeded with its seed, so an arm trained in
lockstep with others equals the arm trained alone (tested); on the embedded corpus the runner
builds each seed's training rows as a single run would (files in the seed's order), so exports
calibrate on files that seed never trains on; other datasets are read as given. The synthetic
stream draws batch i of seed s from its own seed `s * 1_000_003 + i`. Held-out rows are the
same for every run: all rows of the embedded model's held-out split (or `eval.heldout_rows`
rows), or `eval.samples` synthetic samples from a seed no run trains or calibrates on.

Metrics: analysis/row_metrics.py (EV, CE with the SAE, CE recovered, KL, L0; special tokens
excluded), the export's dead share over `eval.density_samples` tokens (all held-out tokens, then on
the embedded corpus rows of train-split files neither training nor calibration of that seed read;
other language-model sources: the held-out tokens; synthetic: fresh samples) with the log10-density
histogram and the shares below densities 1e-6 and 1e-5, the underused share (p_j < tau * p_hat_j
under the Zipf fit of losses.fit_zipf, dead included; a diagnostic without a verdict), the
exported-vs-training gap, steering (analysis/steering.py; a diagnostic without a verdict, with
random unit directions at the same alpha and the latents at 0.5 and 2 alpha), MCC and per-latent F1
(synthetic, sae_lens.synthetic), training tokens/s; feature quality (feature_quality.py):
absorption per hierarchy (`absorption_<name>`, a claim paired by seed), sparse probing
(`sparse_probe_accuracy`, a claim; floor and ceiling once) and stability across each arm's seeds
(described, no verdict); per synthetic setting (settings.py) EV, MCC, F1 and dead share
(`<metric>@<name>`, claims paired by seed). gradient_topk arms are evaluated twice: the
plain-TopK export, and gradient selection on the held-out text (teacher forcing: g = d(sum
next-token CE)/dx on the clean text).
"""

from sae_lens_allocation.analysis.compare.config import check_compare_config
from sae_lens_allocation.analysis.compare.heldout import (
    heldout_stats,
    training_gap,
    training_rule_stats,
    underused_share,
)
from sae_lens_allocation.analysis.compare.lm_study import lm_activations
from sae_lens_allocation.analysis.compare.protocol import run_compare, run_compare_command

__all__ = [
    "check_compare_config",
    "heldout_stats",
    "lm_activations",
    "run_compare",
    "run_compare_command",
    "training_gap",
    "training_rule_stats",
    "underused_share",
]
