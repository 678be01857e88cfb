"""`sae-lens-allocation compare CONFIG.yaml`: several architectures trained on the same data over
several seeds, evaluated on the same held-out data, with intervals and verdicts against a
baseline (report.md, results.json, rows.pt, PNG plots).

Config (YAML mapping; every key checked, errors are one-line `ConfigError`s):

    source: language_model | synthetic
    output_dir: runs/compare          # report.md, results.json, rows.pt, plots, one SAE folder per run
    seeds: [42, 43, 44]               # every arm at its best lr and the main k, once per seed
    threads: 2                        # torch.set_num_threads
    base: {...}                       # language_model: a SAELens runner config without
                                      # sae.architecture (model_name defaults to the embedded
                                      # model and its corpus); synthetic: SyntheticSAERunnerConfig
                                      # fields (synthetic_model, training_samples, batch_size, ...)
    architectures:                    # the arms: any registered training architecture, with overrides
      - {name: mc-aux_zipf, architecture: mutual_choice, sae: {aux_loss: aux_zipf}, runner: {}}
    baseline: topk                    # the arm every other arm is compared with (default: the
                                      # arm named topk, else the first)
    contrasts: [{arm: g-beta1, against: g-beta0}]   # further paired comparisons
    lr_values: [3.0e-4, 1.0e-3, 3.0e-3]   # optional lr sweep on seeds[0] at the main k; every arm
                                      # is then reported at its best lr
    k_values: [8, 32]                 # optional k sweep on seeds[0] at each arm's best lr
    length_check: 2                   # optional: every arm again on seeds[0] at its best lr with
                                      # this many times the training (tokens or samples, and
                                      # lr_decay_steps); do the verdicts survive longer training?
    lockstep: true                    # language_model: arms that share seed and lr train in one
                                      # multi-SAE run (one LM pass per batch)
    eval: {...}                       # see config._EVAL_DEFAULTS

Protocol (docs/results.md "Protocol"): (1) the lr sweep, one seed, main k; the best lr of an arm
has the lowest held-out CE with the SAE spliced in (language model) or the highest explained
variance (synthetic); (2) every arm at its best lr and the main k for every seed (the sweep's
run at seeds[0] is reused); (3) the k sweep on seeds[0]; (4) the length check on seeds[0].
Main-k results are reported as mean +- sd over seeds with paired intervals against the baseline
(statistics.py) and a verdict per metric; convergence is checked on every main run: the training
rule's held-out EV and dead share at the last two of `eval.convergence_points` evenly spaced
evaluations must move less than their sd over seeds. Under a schedule that decays the lr to 0
that check measures the anneal, so the length check asks the question the verdicts need: with
D_1 and D_f the differences arm - against on seeds[0] at the main length and at `length_check`
times it, is the main verdict unchanged when its difference and interval move by D_f - D_1
(`statistics.shifted_verdict`)?

Same data: every run of a seed reads the same rows in the same order. Language model: each run is
a SAELens multi-SAE run (training/multi_runner.py) seeded with its seed, so an arm trained in
lockstep with others equals the arm trained alone (tested); on the embedded corpus the runner
builds each seed's training rows as a single run would (files in the seed's order), so exports
calibrate on files that seed never trains on; other datasets are read as given. The synthetic
stream draws batch i of seed s from its own seed `s * 1_000_003 + i`. Held-out rows are the
same for every run: all rows of the embedded model's held-out split (or `eval.heldout_rows`
rows), or `eval.samples` synthetic samples from a seed no run trains or calibrates on.

Metrics: analysis/row_metrics.py (EV, CE with the SAE, CE recovered, KL, L0; special tokens
excluded), the export's dead share over `eval.density_samples` tokens (all held-out tokens, then
on the embedded corpus rows of train-split files neither training nor calibration of that seed
read; other language-model sources: the held-out tokens; synthetic: fresh samples) with the
log10-density histogram, the underused share (p_j < tau * p_hat_j under the
Zipf fit of losses.fit_zipf, dead included), the exported-vs-training gap, steering
(analysis/steering.py), MCC and per-latent F1 (synthetic, sae_lens.synthetic), training tokens/s.
gradient_topk arms are evaluated twice: the plain-TopK export, and gradient selection on the
held-out text (teacher forcing: g = d(sum next-token CE)/dx on the clean text).
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
