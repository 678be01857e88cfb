"""Mutual Choice and Feature Choice SAEs: validation, training through the stock SAELens runner,
the calibrated jumprelu export, eval mode, folding, resume."""

import functools
import json
from pathlib import Path

import pytest
import torch
from sae_lens import SAE, LanguageModelSAETrainingRunner
from safetensors.torch import load_file

import sae_lens_allocation
from sae_lens_allocation import FeatureChoiceTrainingSAEConfig, MutualChoiceTrainingSAEConfig, calibrate
from sae_lens_allocation.training.runner import build_runner

import support

ARCHS = ["mutual_choice", "feature_choice"]
D_IN, D_SAE = support.D_MODEL, 128


_sae = functools.partial(support.plugin_sae, d_in=D_IN, d_sae=D_SAE, k=4)


def _explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return float(1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


@pytest.mark.parametrize(
    "cls,kwargs,field",
    [
        (MutualChoiceTrainingSAEConfig, {"k": 0}, "k"),
        (MutualChoiceTrainingSAEConfig, {"k": -2.0}, "k"),
        (MutualChoiceTrainingSAEConfig, {"k": D_SAE}, "k"),
        (MutualChoiceTrainingSAEConfig, {"k": float("nan")}, "k"),
        (MutualChoiceTrainingSAEConfig, {"aux_loss": "nope"}, "aux_loss"),
        (MutualChoiceTrainingSAEConfig, {"calibration_tokens": 0}, "calibration_tokens"),
        (MutualChoiceTrainingSAEConfig, {"normalize_activations": "layer_norm"}, "normalize_activations"),
        (FeatureChoiceTrainingSAEConfig, {"capacity": "banana"}, "capacity"),
        (FeatureChoiceTrainingSAEConfig, {"zipf_exponent": 0.0}, "zipf_exponent"),
    ],
)
def test_bad_config_values_raise_naming_the_field(cls, kwargs, field):
    with pytest.raises(ValueError, match=field):
        cls(d_in=D_IN, d_sae=D_SAE, **kwargs)


def test_feature_choice_batch_too_small_names_train_batch_size_tokens():
    cfg = FeatureChoiceTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4)
    with pytest.raises(ValueError, match="train_batch_size_tokens"):
        cfg.check_batch_tokens(16)
    sae = _sae("feature_choice")
    with pytest.raises(ValueError, match="train_batch_size_tokens"):
        sae.encode(torch.randn(16, D_IN))


@pytest.mark.parametrize("arch", ARCHS)
def test_eval_mode_equals_export_and_folding_is_exact(arch, tmp_path):
    torch.manual_seed(0)
    sae = _sae(arch)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(D_SAE, 1) + 0.5)  # unequal decoder norms exercise the fold
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    x = torch.randn(512, D_IN)
    calibrate(sae, x)
    sae.eval()
    sae.save_inference_model(tmp_path)
    exported = SAE.load_from_disk(tmp_path)
    assert exported.cfg.architecture() == "jumprelu"
    probe = torch.randn(2, 7, D_IN)  # 3-D, as evals and HookedSAETransformer feed it
    torch.testing.assert_close(exported.encode(probe), sae.encode(probe), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(exported(probe), sae(probe), rtol=1e-4, atol=1e-5)
    assert set(load_file(tmp_path / "sae_weights.safetensors")) == {
        "W_enc", "b_enc", "W_dec", "b_dec", "threshold"
    }


@pytest.mark.parametrize("arch", ARCHS)
def test_activation_scaling_fold_keeps_outputs(arch):
    torch.manual_seed(1)
    sae = _sae(arch)
    x = torch.randn(256, D_IN) * 7.0
    s = 0.25
    calibrate(sae, x * s)
    sae.eval()
    expected = sae(x * s) / s
    sae.fold_activation_norm_scaling_factor(s)
    torch.testing.assert_close(sae(x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_non_finite_loss_stops_training(arch):
    sae = _sae(arch)
    x = torch.randn(64, D_IN)
    x[3, 2] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        support.training_step(sae, x, step=7)


@pytest.mark.parametrize("arch", ARCHS)
def test_off_the_cpu_a_non_finite_loss_stops_the_next_save(arch, tmp_path, monkeypatch):
    """On an accelerator the step does not read the loss back (a host sync per step); the first
    bad step is kept on the device and the next save, checkpoint or export, raises before
    writing anything."""
    from sae_lens.saes.sae import TrainStepInput

    from sae_lens_allocation.saes import finite_loss

    monkeypatch.setattr(finite_loss, "reads_are_free", lambda device: False)
    sae = _sae(arch)
    for n_step in (5, 6, 7):
        x = torch.randn(64, D_IN)
        if n_step >= 6:
            x[3, 2] = float("nan")
        sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=None,
                                                 n_training_steps=n_step, is_logging_step=False))
    with pytest.raises(FloatingPointError, match="non-finite loss .* at step 6"):
        sae.save_model(tmp_path / "checkpoint")
    assert not (tmp_path / "checkpoint" / "sae_weights.safetensors").exists()


def _train(arch, tmp_path, **overrides):
    cfg = support.runner_cfg(arch, tmp_path, **overrides)
    runner = LanguageModelSAETrainingRunner(
        cfg, override_model=support.tiny_model(), override_dataset=support.tiny_dataset(512)
    )
    return runner, runner.run()


def _heldout_acts(n_rows=96, seed=123):
    model = support.tiny_model()
    tokens = torch.tensor(support.tiny_dataset(n_rows, seed=seed)["tokens"])
    _, cache = model.run_with_cache(tokens, names_filter=support.HOOK_NAME)
    return cache[support.HOOK_NAME].reshape(-1, support.D_MODEL)


GRID = [("mutual_choice", {}), ("feature_choice", {"sae_capacity": "uniform"}),
        ("feature_choice", {"sae_capacity": "zipf"})]


@pytest.mark.slow
@pytest.mark.parametrize("arch,extra", GRID, ids=["mc", "fc-uniform", "fc-zipf"])
def test_reduced_grid_export_keeps_the_budget_and_the_reconstruction(arch, extra, tmp_path):
    """The acceptance bounds (docs/architectures.md#acceptance-bounds) on a reduced grid: train() with calibration rows
    training never reads; on held-out rows the export's mean L0 is within 5% of k and its EV at
    least that of the training-mode SAE less 0.01 at matched L0 (the batch rule, training batch
    size, same rows, its budget set to the export's L0). The full grid on the embedded model is
    benchmarks/calibration_grid.py."""
    k = 8
    cfg = support.runner_cfg(arch, tmp_path, training_tokens=60 * 256, sae_k=k,
                             sae_calibration_tokens=4096, **extra)
    sae = sae_lens_allocation.train(cfg, override_model=support.tiny_model(),
                                    override_dataset=support.tiny_dataset(1024))
    out = Path(tmp_path / "output")
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu"
    assert cfg["metadata"]["training_architecture"] == arch
    assert cfg["metadata"]["calibration"]["tokens"] == 4096
    assert cfg["metadata"]["calibration"]["overlaps_training"] is False

    exported = SAE.load_from_disk(out)
    x = _heldout_acts()[:2816]  # whole training batches of 256
    with torch.no_grad():
        codes = exported.encode(x)
        ev_export = _explained_variance(x, exported.decode(codes))
        l0 = float((codes != 0).sum(-1).float().mean())
        sae.train()
        sae.cfg.k = l0
        ev_train = _explained_variance(x, torch.cat([sae(batch) for batch in x.split(256)]))
        sae.cfg.k = k
    print(f"{arch}: export L0 {l0:.3f} (k={k}), EV export {ev_export:.4f} vs training {ev_train:.4f} at L0 {l0:.3f}")
    assert abs(l0 - k) <= 0.05 * k
    assert ev_export >= ev_train - 0.01
    assert isinstance(cfg["metadata"]["calibration"]["trained_and_deployed_under_different_rules"], bool)


@pytest.mark.slow
def test_stock_runner_export_reproduces_training_allocation(tmp_path):
    k = 8
    _, sae = _train("feature_choice", tmp_path, training_tokens=60 * 256, sae_k=k,
                    sae_calibration_tokens=4096)
    meta = json.loads((tmp_path / "output" / "cfg.json").read_text())["metadata"]["calibration"]
    assert meta["overlaps_training"] is True  # stock runner: the training-row reservoir
    x = _heldout_acts()
    l0 = float((SAE.load_from_disk(tmp_path / "output").encode(x) != 0).sum(-1).float().mean())
    assert abs(l0 - k) <= 0.05 * k


@pytest.mark.slow
def test_feature_choice_has_no_dead_latents_and_mc_l0_varies(tmp_path):
    runner, sae = _train("feature_choice", tmp_path / "fc", training_tokens=20 * 256)
    assert int(sae.cfg.metadata.num_dead_features) == 0
    _, mc = _train("mutual_choice", tmp_path / "mc", training_tokens=20 * 256)
    mc.train()
    metrics = support.training_step(mc, _heldout_acts(16), logging=True).metrics
    assert float(metrics["l0_per_token_std"]()) > 0
    assert float(metrics["l0_per_token_max"]()) > float(metrics["l0_per_token_min"]())


def test_resume_from_checkpoint_continues_training(tmp_path):
    runner, _ = _train(
        "mutual_choice", tmp_path / "a", training_tokens=8 * 256, n_checkpoints=1,
        checkpoint_path=str(tmp_path / "ckpt"),
    )
    ckpts = sorted(p for p in (tmp_path / "ckpt").iterdir() if (p / "trainer_state.pt").exists())
    assert ckpts, "the run wrote no checkpoint"
    ckpt = ckpts[0]
    assert json.loads((ckpt / "cfg.json").read_text())["architecture"] == "mutual_choice"
    resumed_runner, resumed = _train(
        "mutual_choice", tmp_path / "b", training_tokens=8 * 256, resume_from_checkpoint=str(ckpt),
        checkpoint_path=str(tmp_path / "ckpt2"),
    )
    state = torch.load(ckpt / "trainer_state.pt")
    assert state["n_training_samples"] < 8 * 256
    loaded = sae_lens_allocation.load_sae(ckpt)
    assert not torch.equal(loaded.W_enc, resumed.W_enc)
    assert (tmp_path / "b" / "output" / "cfg.json").exists()


def _unique_rows_dataset(n_rows: int):
    """Pretokenized rows that are all different, so row identity is content identity."""
    from datasets import Dataset

    ids = support.tiny_tokenizer()(support._corpus_text())["input_ids"]
    ctx = support.CONTEXT_SIZE
    rows = [ids[i * (ctx - 1):(i + 1) * (ctx - 1)] for i in range(n_rows)]
    bos = support.tiny_tokenizer().bos_token_id
    return Dataset.from_dict({"tokens": [[bos, *r] for r in rows]})


@pytest.mark.parametrize("arch", ARCHS)
def test_plugin_train_calibrates_on_rows_training_never_reads(arch, tmp_path):
    dataset = _unique_rows_dataset(400)
    cfg = support.runner_cfg(arch, tmp_path, training_tokens=4 * 256, sae_calibration_tokens=1024)
    runner = sae_lens_allocation.build_runner(cfg, override_model=support.tiny_model(),
                                              override_dataset=dataset)
    store = runner.activations_store
    assert store.n_dataset_processed == 0  # the training stream is untouched
    runner.run()
    meta = json.loads((tmp_path / "output" / "cfg.json").read_text())["metadata"]["calibration"]
    assert meta["source"] == "the dataset's last rows"
    # 1024 non-BOS tokens of 31 per row: 34 rows, taken in store batches of 8 prompts.
    assert meta["sequences"] == 40
    assert meta["tokens"] == 1024 and meta["special_tokens_excluded"] is True
    first = meta["first_dataset_row"]
    assert meta["dataset_rows"] == 400 and first >= 400 - 2 * 40
    assert torch.equal(runner.calibration_tokens.tokens,
                       torch.tensor(dataset[first:first + 40]["tokens"]))
    # The trainer read rows [0, n_dataset_processed), never as far as the reserved ones.
    assert 0 < store.n_dataset_processed < first
    assert meta["overlaps_training"] is False
    assert meta["folds"] == 5 and meta["documents"] == 34
    assert "out_of_fold_l0" in meta and meta["target_l0"] == pytest.approx(32.0)


def test_plugin_train_records_overlap_when_training_reaches_the_reserved_rows(tmp_path):
    dataset = _unique_rows_dataset(60)
    cfg = support.runner_cfg("mutual_choice", tmp_path, training_tokens=8 * 256,
                             sae_calibration_tokens=512, n_batches_in_buffer=8)
    sae_lens_allocation.train(cfg, override_model=support.tiny_model(), override_dataset=dataset)
    meta = json.loads((tmp_path / "output" / "cfg.json").read_text())["metadata"]["calibration"]
    assert meta["source"] == "the dataset's last rows"
    assert meta["overlaps_training"] is True


def test_streaming_dataset_reserves_its_first_rows(tmp_path):
    rows = _unique_rows_dataset(400)
    dataset_rows = rows[:24]["tokens"]
    dataset = rows.to_iterable_dataset()
    cfg = support.runner_cfg("mutual_choice", tmp_path, training_tokens=4 * 256,
                             sae_calibration_tokens=512)
    runner = sae_lens_allocation.build_runner(cfg, override_model=support.tiny_model(),
                                              override_dataset=dataset)
    reserved_end = runner.activations_store.n_dataset_processed
    # 512 non-BOS tokens of 31 per row: 17 rows, in batches of 8; the stream starts after them.
    assert torch.equal(runner.calibration_tokens.tokens, torch.tensor(dataset_rows))
    runner.run()
    meta = json.loads((tmp_path / "output" / "cfg.json").read_text())["metadata"]["calibration"]
    assert meta["source"] == "dataset rows reserved before training" and meta["sequences"] == 24
    assert meta["dataset_samples_read_before_training"] == reserved_end
    assert meta["overlaps_training"] is None


def test_embedded_training_rows_mix_documents_in_a_seeded_order():
    """SAELens mixes only within its buffer, so the row order is what spreads a training batch
    over documents: the training rows are the stream's rows, permuted by the run's seed."""
    from sae_lens_allocation.embedded import corpus_dataset, load_embedded_model
    from sae_lens_allocation.training.sources import embedded_training_rows

    model = load_embedded_model()
    stream = torch.tensor(corpus_dataset(model, "train", context_size=64, n_rows=200, seed=3)["tokens"])
    rows = torch.tensor(embedded_training_rows(model, 64, 200 * 64, seed=3)["tokens"])
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, stream.tolist()))
    position = {tuple(r): i for i, r in enumerate(stream.tolist())}
    first_rows = [position[tuple(r)] for r in rows[:16].tolist()]
    assert max(first_rows) - min(first_rows) > 100  # the first batch spans the stream, not 16 neighbours
    assert torch.equal(rows, torch.tensor(embedded_training_rows(model, 64, 200 * 64, seed=3)["tokens"]))


def test_embedded_calibration_rows_come_from_files_training_never_read():
    from sae_lens_allocation.embedded import load_embedded_model
    from sae_lens_allocation.embedded.splits import embedded_calibration_tokens
    from sae_lens_allocation.training.sources import embedded_training_rows

    model = load_embedded_model()
    bos = model.tokenizer.bos_token_id
    train = embedded_training_rows(model, 64, 40 * 64, seed=3)
    found = embedded_calibration_tokens(model, train, 64, 1500, training_seed=3, sample_seed=0,
                                        keep_special=False)
    assert found is not None
    tokens, documents, info = found
    assert info["overlaps_training"] is False
    assert int((tokens != bos).sum()) >= 1500 > int((tokens[:-1] != bos).sum())
    assert documents.unique().numel() > 3  # several documents, not one run of rows
    # No 24-token window of a calibration row occurs anywhere in the training stream.
    stream = torch.tensor(train["tokens"])[:, 1:].reshape(-1).tolist()
    seen = {tuple(stream[i:i + 24]) for i in range(len(stream) - 23)}
    for row in tokens[:, 1:].tolist():
        assert not any(tuple(row[i:i + 24]) in seen for i in range(len(row) - 23))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 5])
def test_train_reserves_embedded_rows_training_never_reads_for_any_seed(seed, tmp_path):
    """The unseen files follow the run's file order (its `seed`), whatever `calibration_seed`.
    Training reads half the corpus, so rows from files in another order overlap it: 54 of 96
    rows shared a 48-token window with the training stream when the file order ignored the run's
    seed. Distinct files can share a licence text, so one or two rows may still match."""
    cfg = support.runner_cfg_dict("mutual_choice", tmp_path, model_name="embedded",
                                  dataset_path="embedded", context_size=64,
                                  training_tokens=1_200_000, seed=seed, sae_d_in=128,
                                  sae_calibration_tokens=6000, sae_calibration_seed=0)
    cfg.pop("is_dataset_tokenized")
    runner = build_runner(cfg)
    reserved = runner.calibration_tokens
    assert reserved.info()["overlaps_training"] is False
    training = torch.as_tensor(runner.activations_store.dataset[:]["tokens"])
    assert reserved.tokens.shape[0] > 90
    assert support.rows_sharing_a_window(reserved.tokens, [training]) <= 2


@pytest.mark.parametrize("arch", ARCHS)
def test_eval_keeps_the_exports_thresholds(arch, tmp_path):
    runner, sae = _train(arch, tmp_path, training_tokens=8 * 256, sae_calibration_tokens=1024)
    exported = SAE.load_from_disk(tmp_path / "output")
    stored = sae.threshold.clone()
    sae.train()
    sae.eval()
    assert torch.equal(sae.threshold, stored)
    torch.testing.assert_close(exported.threshold, stored)
    # Recalibrating is explicit and says what it used.
    sae.calibrate_thresholds(_heldout_acts(40), documents=None)
    assert sae.cfg.metadata.calibration["source"] == "user"
    assert not torch.equal(sae.threshold, stored)


@pytest.mark.parametrize("arch", ARCHS)
def test_eval_before_calibration_warns_and_uses_the_running_estimate(arch):
    sae = _sae(arch)
    with torch.no_grad():
        sae.threshold.fill_(0.25)
    with pytest.warns(UserWarning, match="running estimate"):
        sae.eval()
    x = torch.randn(16, D_IN)
    codes, z = sae.encode_with_hidden_pre(x)
    torch.testing.assert_close(sae.encode(x), z.relu() * (z > 0.25))
    torch.testing.assert_close(codes, z.relu() * (z > 0.25))


@pytest.mark.parametrize("arch", ARCHS)
def test_nan_calibration_data_is_refused(arch):
    sae = _sae(arch)
    before = sae.threshold.clone()
    x = torch.randn(1000, D_IN)
    x[::100] = float("nan")  # 1% of the rows
    with pytest.raises(ValueError, match="10 of 1000 rows with NaN or Inf"):
        calibrate(sae, x)
    assert torch.equal(sae.threshold, before) and not bool(sae.calibrated)


def test_train_refuses_a_batch_too_small_for_feature_choice(tmp_path):
    cfg = support.runner_cfg("feature_choice", tmp_path, train_batch_size_tokens=16, sae_k=4)
    with pytest.raises(ValueError, match="train_batch_size_tokens=16"):
        sae_lens_allocation.train(cfg, override_model=support.tiny_model(),
                                  override_dataset=support.tiny_dataset())
