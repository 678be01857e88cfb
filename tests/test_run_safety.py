"""The Python API on SAELens' own inputs (a model without a tokenizer, SAELens' default
dataset_path with an override dataset), provenance in every export, and runs that cannot lose
or replace finished work: output paths checked before training, a lock per output folder,
resume refusing a changed SAE and recording allowed changes (issue 30)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from datasets import Dataset
from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig
from transformer_lens import HookedTransformer, HookedTransformerConfig

import sae_lens_allocation
from sae_lens_allocation.saes.mutual_choice import MutualChoiceTrainingSAEConfig
from sae_lens_allocation.saes.topk_aux import TopKAuxTrainingSAEConfig
from sae_lens_allocation.training.output_lock import RunLock, lock_path
from sae_lens_allocation.validation import UsageError

CTX = 32


def bare_model() -> HookedTransformer:
    """A HookedTransformer built from a config: no tokenizer."""
    return HookedTransformer(HookedTransformerConfig(
        n_layers=1, d_model=32, n_ctx=CTX, d_head=8, n_heads=4, d_vocab=256, act_fn="gelu",
        normalization_type="LN", seed=0, device="cpu"))


def token_rows(n: int = 96) -> Dataset:
    return Dataset.from_dict({"tokens": [[(7 * i + 3 * j) % 256 for j in range(CTX)] for i in range(n)]})


def defaults_cfg(tmp_path: Path, sae, **fields) -> LanguageModelSAERunnerConfig:
    """SAELens' defaults except what this model and a short run need (dataset_path stays '')."""
    base = dict(hook_name="blocks.0.hook_resid_post", context_size=CTX, training_tokens=4 * 512,
                train_batch_size_tokens=512, n_batches_in_buffer=32, store_batch_size_prompts=8,
                device="cpu", output_path=str(tmp_path / "out"),
                checkpoint_path=str(tmp_path / "ck"), logger=LoggingConfig(log_to_wandb=False))
    base.update(fields)
    return LanguageModelSAERunnerConfig(sae=sae, **base)


def metadata(folder: Path) -> dict:
    return json.loads((folder / "cfg.json").read_text())["metadata"]


def test_train_takes_a_tokenizerless_model_and_the_default_dataset_path(tmp_path):
    cfg = defaults_cfg(tmp_path, MutualChoiceTrainingSAEConfig(d_in=32, d_sae=64, k=4))
    assert cfg.dataset_path == ""
    sae_lens_allocation.train(cfg, override_model=bare_model(), override_dataset=token_rows())
    meta = metadata(tmp_path / "out")
    training = meta["training"]
    assert training["special_tokens"] == {"ids": [], "source": "none"}
    assert training["training_tokens_seen"] == 4 * 512
    assert training["world_size"] == 1 and training["data_parallel"] is None
    assert training["seed"] == cfg.seed and training["resumes"] == []
    assert meta["sae_lens_allocation_version"] and meta["sae_lens_version"]


def test_train_multi_takes_a_tokenizerless_model_with_listed_special_tokens(tmp_path):
    from sae_lens.multi_sae_training_runner import MultiSAETrainingRunnerConfig

    cfg = MultiSAETrainingRunnerConfig(
        saes={"mc": MutualChoiceTrainingSAEConfig(d_in=32, d_sae=64, k=4),
              "topk": TopKAuxTrainingSAEConfig(d_in=32, d_sae=64, k=4)},
        hook_names="blocks.0.hook_resid_post", context_size=CTX, training_tokens=4 * 512,
        train_batch_size_tokens=512, n_batches_in_buffer=32, store_batch_size_prompts=8,
        device="cpu", exclude_special_tokens=[0], output_path=str(tmp_path / "out"),
        checkpoint_path=str(tmp_path / "ck"), logger=LoggingConfig(log_to_wandb=False))
    sae_lens_allocation.train_multi(cfg, override_model=bare_model(), override_dataset=token_rows())
    for name in ("mc", "topk"):
        training = metadata(tmp_path / "out" / name)["training"]
        assert training["special_tokens"] == {"ids": [0], "source": "config"}
        assert training["world_size"] == 1 and training["training_tokens_seen"] == 4 * 512


def test_default_dataset_path_without_a_dataset_and_true_special_tokens_without_a_tokenizer(tmp_path):
    cfg = defaults_cfg(tmp_path, TopKAuxTrainingSAEConfig(d_in=32, d_sae=64, k=4))
    with pytest.raises(UsageError, match="dataset_path='' is not allowed"):
        sae_lens_allocation.train(cfg, override_model=bare_model())
    cfg = defaults_cfg(tmp_path, TopKAuxTrainingSAEConfig(d_in=32, d_sae=64, k=4),
                       exclude_special_tokens=True)
    with pytest.raises(UsageError, match="exclude_special_tokens=True is not allowed"):
        sae_lens_allocation.train(cfg, override_model=bare_model(), override_dataset=token_rows())


@pytest.mark.parametrize("field", ["output_path", "checkpoint_path"])
def test_an_existing_file_as_output_is_refused_before_anything_loads(tmp_path, field):
    (tmp_path / "taken").write_text("finished work")
    cfg = defaults_cfg(tmp_path, TopKAuxTrainingSAEConfig(d_in=32, d_sae=64, k=4),
                       **{field: str(tmp_path / "taken")})
    # SAELens appends a run id to checkpoint_path: the file is then its parent.
    with pytest.raises(UsageError, match=f"{field}=.*(it is an existing file|taken is a file)"):
        sae_lens_allocation.build_runner(cfg, override_model=None, override_dataset=token_rows())
    assert (tmp_path / "taken").read_text() == "finished work"


def test_a_locked_output_folder_is_refused_and_a_dead_owners_lock_taken_over(tmp_path):
    cfg = defaults_cfg(tmp_path, TopKAuxTrainingSAEConfig(d_in=32, d_sae=64, k=4))
    with RunLock([("output_path", cfg.output_path)]):
        with pytest.raises(UsageError, match="output_path=.* is in use by another run"):
            sae_lens_allocation.train(cfg, override_model=bare_model(), override_dataset=token_rows())
    assert not (tmp_path / "out").exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    import socket

    lock_path(cfg.output_path).write_text(f"{dead} {socket.gethostname()}")
    sae_lens_allocation.train(cfg, override_model=bare_model(), override_dataset=token_rows())
    assert (tmp_path / "out" / "cfg.json").is_file()
    assert not lock_path(cfg.output_path).exists()


def _train_to(tmp_path: Path, name: str, **fields):
    cfg = defaults_cfg(tmp_path / name, TopKAuxTrainingSAEConfig(d_in=32, d_sae=64, k=4),
                       n_checkpoints=1, **fields)
    sae_lens_allocation.train(cfg, override_model=bare_model(), override_dataset=token_rows())
    return cfg


def test_resume_refuses_a_changed_sae_and_records_allowed_changes(tmp_path):
    first = _train_to(tmp_path, "a")
    checkpoint = sorted(p for p in Path(first.checkpoint_path).iterdir() if p.name[0] != ".")[0]
    for sae, fields, match in (
        (TopKAuxTrainingSAEConfig(d_in=32, d_sae=64, k=8), {}, "sae.k=8 is not allowed"),
        (TopKAuxTrainingSAEConfig(d_in=32, d_sae=64, k=4), {"lr": 1e-3}, "lr=0.001 is not allowed"),
        (TopKAuxTrainingSAEConfig(d_in=32, d_sae=64, k=4), {"training_tokens": 512},
         "training_tokens=512 is not allowed"),
    ):
        cfg = defaults_cfg(tmp_path / "b", sae, resume_from_checkpoint=str(checkpoint), **fields)
        with pytest.raises(UsageError, match=match):
            sae_lens_allocation.build_runner(cfg, override_model=bare_model(),
                                             override_dataset=token_rows())
    resumed = _train_to(tmp_path, "c", resume_from_checkpoint=str(checkpoint),
                        training_tokens=6 * 512)
    training = metadata(Path(resumed.output_path))["training"]
    assert training["training_tokens_seen"] == 6 * 512
    (resume,) = training["resumes"]
    assert resume["checkpoint"] == str(checkpoint)
    assert resume["changed"]["training_tokens"] == {"was": 4 * 512, "now": 6 * 512}
    runner_cfg = json.loads((Path(resumed.output_path) / "runner_cfg.json").read_text())
    assert runner_cfg["training_tokens"] == training["training_tokens_seen"]


_RACER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from datasets import IterableDataset
    sys.path.insert(0, {tests!r})
    import sae_lens_allocation
    from sae_lens_allocation.saes.topk_aux import TopKAuxTrainingSAEConfig
    from sae_lens_allocation.validation import UsageError, one_line
    from test_run_safety import bare_model, defaults_cfg
    go = Path({go!r})
    def rows():
        for i in range(10**6):
            if i == 40:
                while not go.exists():
                    time.sleep(0.05)
            yield {{"tokens": [(7 * i + 3 * j) % 256 for j in range(32)]}}
    cfg = defaults_cfg(Path({folder!r}), TopKAuxTrainingSAEConfig(d_in=32, d_sae=64, k=4),
                       seed=int(sys.argv[1]), training_tokens=8 * 512)
    try:
        sae_lens_allocation.train(cfg, override_model=bare_model(),
                                  override_dataset=IterableDataset.from_generator(rows))
    except UsageError as err:
        print(one_line(err), file=sys.stderr)
        sys.exit(2)
""")


def test_two_runs_into_one_folder_started_together_one_trains_the_other_is_refused(tmp_path):
    go = tmp_path / "go"
    script = _RACER.format(tests=str(Path(__file__).parent), go=str(go), folder=str(tmp_path))
    racers = {seed: subprocess.Popen([sys.executable, "-c", script, str(seed)], text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
              for seed in (1, 2)}
    deadline = time.monotonic() + 600
    while all(p.poll() is None for p in racers.values()):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    (loser,) = [s for s, p in racers.items() if p.poll() is not None]
    (winner,) = [s for s in racers if s != loser]
    _, err = racers[loser].communicate()
    assert racers[loser].returncode == 2, err
    assert err.strip().splitlines()[-1].count("is in use by another run") == 1
    assert not (tmp_path / "out").exists()  # the refused run wrote nothing
    go.touch()
    _, err = racers[winner].communicate(timeout=600)
    assert racers[winner].returncode == 0, err
    assert metadata(tmp_path / "out")["training"]["seed"] == winner
    assert not lock_path(tmp_path / "out").exists() and not lock_path(tmp_path / "ck").exists()
