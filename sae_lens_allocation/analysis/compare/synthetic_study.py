"""The synthetic source of a comparison (sae_lens.synthetic): seeded sample streams, training one
run at a time with convergence probes, and evaluation with MCC and per-latent F1 (and feature
absorption, analysis/absorption.py, where the synthetic model has a hierarchy)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from sae_lens_allocation.analysis import row_metrics as rm
from sae_lens_allocation.analysis.absorption import synthetic_absorption
from sae_lens_allocation.analysis.compare.config import Run, make_run, run_config
from sae_lens_allocation.analysis.compare.heldout import (
    load_export,
    run_gap,
    tensor_sha256,
    trained_run,
    training_rule_stats,
    underused_share,
)


def synthetic_batches(model: Any, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Batch i drawn under its own seed `seed * 1_000_003 + i`: the stream does not depend on
    how many random numbers the SAE draws in between."""
    i = 0
    while True:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1_000_003 + i)
            x = model.feature_dict(model.activation_generator(batch_size))
        yield x
        i += 1


class SyntheticStudy:
    """Held-out samples of a synthetic comparison, and training and evaluation of its runs."""

    # Runs share nothing while training, so each is trained, evaluated and stored on its own.
    lockstep = False

    def __init__(self, cfg: dict[str, Any], out: Path) -> None:
        from sae_lens.synthetic import SyntheticModel

        self.cfg, self.out, ev = cfg, out, cfg["eval"]
        self.first = run_config(cfg, make_run(cfg, cfg["architectures"][0], cfg["seeds"][0], None, None), out)
        self.model = SyntheticModel(self.first.synthetic_model)
        # Streams are seeded s * 1_000_003 + i (training: s, calibration: s + 1); this seed is
        # above every s + 1, so no run trains or calibrates on these samples.
        self.heldout_seed = max(cfg["seeds"]) + 7919
        bs = self.first.batch_size
        self.x = self._samples(self.heldout_seed, ev["samples"])
        self.x_density = self._samples(self.heldout_seed + 1, ev["density_samples"])
        self.data = {"heldout_sha256": tensor_sha256(self.x), "heldout_samples": int(self.x.shape[0]),
                     "density_samples": int(self.x_density.shape[0]),
                     "train_first_batch_sha256": {s: tensor_sha256(next(synthetic_batches(self.model, bs, s)))
                                                  for s in cfg["seeds"]},
                     "true_l0": float(self.model.activation_generator.firing_probabilities.sum()),
                     "synthetic_model": {"num_features": self.model.cfg.num_features,
                                         "hidden_dim": self.model.cfg.hidden_dim}}

    @staticmethod
    def _blocks(x: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples as rows of `size` samples (the last partial block dropped), all kept."""
        n = (x.shape[0] // size) * size
        blocks = x[:n].reshape(-1, size, x.shape[-1])
        return blocks, torch.ones(blocks.shape[:2], dtype=torch.bool)

    def _samples(self, seed: int, n: int) -> torch.Tensor:
        bs = self.first.batch_size
        return torch.cat([b for b, _ in zip(synthetic_batches(self.model, bs, seed), range(math.ceil(n / bs)))])[:n]

    def train(self, runs: list[Run]) -> dict[str, dict[str, Any]]:
        import dataclasses

        from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY
        from sae_lens.training.sae_trainer import SAETrainer
        from safetensors.torch import save_file

        n_points = self.cfg["eval"]["convergence_points"]
        probe_x = self.x[: self.cfg["eval"]["probe_rows"]]
        trained = {}
        for run in runs:
            rcfg = run_config(self.cfg, run, self.out)
            rcfg.sae.d_in = self.model.cfg.hidden_dim
            print(f"[compare] training {run.label} ({rcfg.training_samples:,} samples)", flush=True)
            torch.manual_seed(run.seed)
            sae = SAE_TRAINING_CLASS_REGISTRY[run.architecture][0](rcfg.sae)
            if hasattr(sae, "set_calibration_source"):
                sae.set_calibration_source(synthetic_batches(self.model, rcfg.batch_size, run.seed + 1))
            points: list[dict[str, float]] = []

            def probe(checkpoint_path: Path | None, sae: Any = sae, arch: str = run.architecture,
                      bs: int = rcfg.batch_size) -> None:
                points.append(training_rule_stats(sae, probe_x, bs, arch))

            tcfg = dataclasses.replace(rcfg.to_sae_trainer_config(), n_checkpoints=n_points - 1, checkpoint_path=None)
            trainer = SAETrainer(cfg=tcfg, sae=sae, save_checkpoint_fn=probe,
                                 data_provider=synthetic_batches(self.model, rcfg.batch_size, run.seed))
            start = time.perf_counter()
            training_sae = trainer.fit()
            seconds = time.perf_counter() - start
            points.append(training_rule_stats(training_sae, probe_x, rcfg.batch_size, run.architecture))
            sae_dir = Path(rcfg.output_path)
            sae_dir.mkdir(parents=True, exist_ok=True)
            training_sae.save_inference_model(str(sae_dir))
            save_file({"sparsity": trainer.log_feature_sparsity}, str(sae_dir / "sparsity.safetensors"))
            trained[run.label] = trained_run(training_sae, seconds, rcfg.training_samples, 1, sae_dir,
                                                rcfg.batch_size, points, n_points)
        return trained

    def evaluate(self, run: Run, trained: dict[str, Any]) -> dict[str, Any]:
        from sae_lens.synthetic import eval_sae_on_synthetic_data

        ev = self.cfg["eval"]
        export, reconstruct = load_export(trained["sae_dir"], self.first.device)
        sums = rm.activation_sums(reconstruct, *self._blocks(self.x, ev["block_samples"]), 64)
        density = rm.activation_sums(reconstruct, *self._blocks(self.x_density, 4096), 16)
        n_density = float(density["rows"]["n"].sum())
        shares = underused_share(density["fired"], n_density, ev["underused_tau"], ev["fit_fraction"])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.heldout_seed)
            synth = eval_sae_on_synthetic_data(export, self.model.feature_dict, self.model.activation_generator,
                                               num_samples=ev["samples"], batch_size=self.first.batch_size)
        scalars = {"mcc": synth.mcc, "f1": synth.classification.f1_score,
                   "precision": synth.classification.precision, "recall": synth.classification.recall}
        if self.model.hierarchy is not None:
            # Samples from the held-out seed: no run trains or calibrates on them.
            absorbed = synthetic_absorption(export, self.model, n_samples=ev["absorption_samples"],
                                            seed=self.heldout_seed)
            scalars.update(absorption=absorbed.mean_absorption, main_silent=absorbed.mean_main_silent,
                           absorption_parents=absorbed.parents_scored)
        return {
            "rows": {"export": sums["rows"]}, "l0_tokens": sums["l0_tokens"], "selection_rows": ev["selection_rows"],
            "density": rm.density_stats(density["fired"], n_density),
            "underused_share": shares["underused_share"], "gap": run_gap(run, trained, export, self.x),
            "export_architecture": export.cfg.architecture(), "d_sae": export.cfg.d_sae,
            "scalars": scalars,
        }
