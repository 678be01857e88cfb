"""Device safety without a GPU.

- The static-shape allocation path (what runs on every device but the CPU) is exact: forced on
  CPU tensors and compared with the plain references of test_allocation.py, its candidate path,
  its dense fallback, ties, all-zero rows, N < m and 3-D inputs.
- Every architecture runs on fake device tensors (FakeTensorMode: no data, and any CPU/device mix
  raises FakeTensorDeviceMismatchError): training forward with its aux loss, backward, eval
  encoding, calibration, the export fold, and a whole SAELens training step with Adam. The fake
  device is `cuda` on a CUDA build of torch. A CPU-only build has no CUDA device guard, and
  fake `cuda` tensors then fail in every Python binding that sets one (`x[i]`, `x[i] = v`,
  `copy_`, `bool`/`int`/`item`) and abort the process when autograd records them; there the
  fake device is `meta`, which FakeTensorMode mix-checks against the CPU in the same way.
- Host synchronisations per training step are counted by construction (HostSyncCounter in
  benchmarks/gpu_check.py): on fake tensors every other data-dependent op raises.
- `compile_sae: true` (SAELens wraps `training_forward_pass` in `torch.compile`) compiles once:
  dynamo's frame counter does not grow over steps with changing dead-latent counts.
- benchmarks/gpu_check.py runs end to end on CPU at reduced sizes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

from sae_lens_allocation.allocation import (
    budget,
    cpu,
    feature_choice,
    mutual_choice,
    static,
    uniform_capacities,
    zipf_capacities,
)

import gpu_check
import support
import test_allocation
from gpu_check import HostSyncCounter
from test_allocation import (
    batches,
    capacities_for,
    check_feature_choice,
    check_mutual_choice,
    fc_tie_rule,
    mc_tie_rule,
)

PLUGIN_ARCHITECTURES = ["mutual_choice", "feature_choice", "gradient_topk", "topk_aux"]
# Host synchronisations of a steady-state training step, host-to-device copies included
# (docs/performance.md, "Host synchronisations"): SAELens' trainer's firing update (a boolean
# index) and aux-k dead count in every row; the allocation's completeness flag; Feature Choice
# Zipf's Mutual Choice rank statistic has its own flag; aux_zipf reads both slot sizes at once.
SYNCS_PER_STEP = {
    "topk": ["host read", "boolean indexing"],
    "topk_aux": ["host read", "boolean indexing"],
    "gradient_topk": ["copy to host", "boolean indexing"],
    "mutual_choice": ["host read", "host read", "boolean indexing"],
    "feature_choice": ["host read", "host read", "boolean indexing"],
    "feature_choice_zipf": ["host read", "host read", "host read", "boolean indexing"],
}
# Fake `cuda` needs a CUDA build (see the module docstring); `meta` mix-checks the same way.
FAKE_DEVICE = "cuda" if torch.cuda._is_compiled() else "meta"


@pytest.fixture
def static_path(monkeypatch):
    """Force the static-shape path on CPU tensors; returns the host flags it reads, in order."""
    flags: list[bool] = []
    read = static._host_bool

    def counted(flag: torch.Tensor) -> bool:
        flags.append(read(flag))
        return flags[-1]

    monkeypatch.setattr(static, "_static_shapes", lambda device: True)
    monkeypatch.setattr(static, "_host_bool", counted)
    return flags


# --- the static path is exact --------------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_static_mutual_choice_matches_the_references(data, static_path):
    x = data.draw(batches())
    k = data.draw(st.one_of(st.floats(0, x.shape[-1] + 2), st.integers(0, x.shape[-1])))
    check_mutual_choice(x, k)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_static_feature_choice_matches_the_references(data, static_path):
    x = data.draw(batches())
    check_feature_choice(x, capacities_for(x, data.draw))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_static_mutual_choice_candidate_path_is_exact_with_one_sync(dtype, static_path):
    x = torch.randn(2, 128, 512, generator=torch.Generator().manual_seed(1)).to(dtype)
    result = mutual_choice(x, 16)
    assert static_path == [True]
    codes, cutoff = mc_tie_rule(x, 16)
    assert torch.equal(result.codes, codes) and torch.equal(result.cutoff, cutoff)


def test_static_mutual_choice_with_ties_is_exact_with_one_sync(static_path):
    x = torch.randint(-20, 60, (300, 400), generator=torch.Generator().manual_seed(2)).float()
    result = mutual_choice(x, 7.5)
    assert static_path == [True]
    assert torch.equal(result.codes, mc_tie_rule(x, 7.5)[0])
    assert int((result.codes != 0).sum()) == budget(300, 7.5)


@pytest.mark.parametrize("capacity", ["uniform", "zipf"])
def test_static_feature_choice_candidate_path_is_exact_with_one_sync(capacity, static_path):
    generator = torch.Generator().manual_seed(3)
    x = torch.randint(-30, 30, (320, 400), generator=generator).float()
    if capacity == "uniform":
        caps = uniform_capacities(320, 400, 6, generator)
    else:
        ranks = torch.randperm(400, generator=generator) + 1
        caps = zipf_capacities(320, 6, ranks, 1.0, generator)
    result = feature_choice(x, caps)
    assert static_path == [True]
    codes, cutoff = fc_tie_rule(x, caps)
    assert torch.equal(result.codes, codes) and torch.equal(result.cutoff, cutoff)


def test_static_mutual_choice_sample_miss_falls_back_exactly(static_path):
    # Large values exactly where the sampler looks (test_allocation.py's construction): the
    # bound lies above all but 65536 entries, fewer than M, so the flag says "incomplete".
    n, f = 1024, 1024
    draws = torch.randint(0, n * f, (cpu._MC_SAMPLE,), generator=torch.Generator().manual_seed(cpu._SEED))
    x = torch.rand(n * f, generator=torch.Generator().manual_seed(3))
    x[draws] += 10
    x = x.reshape(n, f)
    result = mutual_choice(x, 128)
    assert static_path == [False]
    assert torch.equal(result.codes, mc_tie_rule(x, 128)[0])


def test_static_massive_ties_overflow_the_buffer_and_fall_back_exactly(static_path):
    x = torch.full((512, 256), 3.0)
    assert torch.equal(mutual_choice(x, 4).codes, mc_tie_rule(x, 4)[0])
    caps = torch.full((256,), 3, dtype=torch.long)
    assert torch.equal(feature_choice(x, caps).codes, fc_tie_rule(x, caps)[0])
    assert static_path == [False, False]


def test_static_small_inputs_take_the_dense_path_with_no_sync(static_path):
    x = torch.randn(3, 10, 40, generator=torch.Generator().manual_seed(4))
    assert torch.equal(mutual_choice(x, 5).codes, mc_tie_rule(x, 5)[0])
    caps = uniform_capacities(30, 40, 5)
    assert torch.equal(feature_choice(x, caps).codes, fc_tie_rule(x, caps)[0])
    assert static_path == []


@pytest.mark.parametrize("shape", [(7, 13), (3, 90, 400)])
def test_static_gradients_equal_the_references(shape, static_path):
    test_allocation.test_gradients_equal_the_references(shape, torch.float32)


# --- fake device: kernels, every architecture, host syncs ---------------------------------------


@pytest.mark.parametrize("complete", [True, False])
def test_kernels_on_a_fake_device_read_the_host_once(complete):
    """On a device, one host read per call (the completeness flag); the dense fallback adds
    none; small inputs none at all. The results stay on the device."""

    def answer(tensor: torch.Tensor) -> bool | int:
        if tensor.dtype == torch.bool:  # the device flag; host flags are input checks
            return complete and tensor.device.type != "cpu"
        return 1

    with _fake_mode(), HostSyncCounter(answer) as counter:
        big = torch.randn(256, 512, device=FAKE_DEVICE)
        caps = uniform_capacities(256, 512, 8)
        for result in (mutual_choice(big, 8), feature_choice(big, caps)):
            assert result.codes.device.type == FAKE_DEVICE
            assert result.cutoff.device.type == FAKE_DEVICE
        assert counter.events == ["host read", "host read"]
        counter.events.clear()
        small = torch.randn(16, 64, device=FAKE_DEVICE)
        mutual_choice(small, 4)
        feature_choice(small, uniform_capacities(16, 64, 4))
        assert counter.events == []


def _fake_mode() -> FakeTensorMode:
    # Real tensors met inside (`torch.tensor(..., device="meta")` is not faked) become fake;
    # device mixing is still checked.
    return FakeTensorMode(allow_non_fake_inputs=True)


@pytest.mark.parametrize("arch", PLUGIN_ARCHITECTURES)
def test_every_architecture_runs_on_a_fake_device(arch):
    """Training forward with the aux loss, backward, eval encoding, calibration and the export
    fold on fake device tensors: any CPU tensor meeting a device one raises
    FakeTensorDeviceMismatchError."""
    from sae_lens.saes.sae import TrainStepInput

    with _fake_mode(), HostSyncCounter():
        sae = support.plugin_sae(arch, d_in=32, d_sae=512, k=8, device=FAKE_DEVICE, aux_loss="aux_zipf")
        width = 64 if arch == "gradient_topk" else 32
        x = torch.randn(256, width, device=FAKE_DEVICE)
        step = TrainStepInput(
            sae_in=x, coefficients={}, n_training_steps=0, is_logging_step=False,
            dead_neuron_mask=torch.rand(512, device=FAKE_DEVICE) > 0.5,
        )
        output = sae.training_forward_pass(step)
        assert output.loss.device.type == FAKE_DEVICE
        assert output.feature_acts.shape == (256, 512)
        assert set(output.losses) == {"mse_loss", "auxiliary_reconstruction_loss"}
        output.loss.backward()
        assert sae.W_enc.grad.device.type == FAKE_DEVICE
        for value in output.metrics.values():  # lazy metrics must stay on the device
            assert (value() if callable(value) else value).device.type == FAKE_DEVICE
        with torch.no_grad():
            # Calibration groups rows by document (`torch.unique`, data-dependent sizes) and
            # reads the finiteness flag; fake tensors cannot size that, so it runs on real
            # tensors in test_calibration.py and test_batch_allocation_saes.py.
            sae.eval()
            assert sae.encode(x[:, :32]).device.type == FAKE_DEVICE
            sae.fold_activation_norm_scaling_factor(2.0)
            state = sae.state_dict()
            sae.process_state_dict_for_saving_inference(state)
            assert all(tensor.device.type == FAKE_DEVICE for tensor in state.values())


@pytest.mark.parametrize("label", list(SYNCS_PER_STEP))
def test_steady_state_training_step_has_the_documented_host_syncs(label):
    """A full SAELens training step (forward, backward, clip, Adam) on fake device tensors
    completes, so nothing else reads device data or copies to it, with the documented events:
    Mutual and Feature Choice at most SAELens topk's count plus 1, Feature Choice Zipf plus 2."""
    _, arch, extra = next(row for row in gpu_check.STEP_ROWS if row[0] == label)
    events = gpu_check.structural_syncs(arch, extra, dict(gpu_check.SMALL), FAKE_DEVICE)
    assert sorted(events) == sorted(SYNCS_PER_STEP[label])
    topk = len(SYNCS_PER_STEP["topk"])
    assert len(SYNCS_PER_STEP["mutual_choice"]) <= topk + 1
    assert len(SYNCS_PER_STEP["feature_choice"]) <= topk + 1
    assert len(SYNCS_PER_STEP["feature_choice_zipf"]) <= topk + 2


def test_the_sync_counter_sees_a_blocking_copy_to_the_device():
    with FakeTensorMode(allow_non_fake_inputs=True), gpu_check.HostSyncCounter() as counter:
        torch.ones(3).to(FAKE_DEVICE)
        torch.ones(3).to(FAKE_DEVICE, non_blocking=True)
    assert counter.events == ["copy to device"]


# --- compile_sae ------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", PLUGIN_ARCHITECTURES)
def test_compiled_training_step_does_not_recompile(arch):
    """`compile_sae: true` wraps `sae.training_forward_pass` in `torch.compile` (inductor;
    here the eager backend, since recompiles are decided by dynamo's guards whatever the
    backend). After a few steps with different dead-latent counts no step compiles again."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    trainer = gpu_check.build_trainer(arch, {}, "cpu", dict(gpu_check.SMALL), autocast=False)
    sae = trainer.sae
    sae.training_forward_pass = torch.compile(sae.training_forward_pass, backend="eager")
    width = 64 if arch == "gradient_topk" else 32
    generator = torch.Generator().manual_seed(0)
    window = trainer.cfg.dead_feature_window

    def step(n_dead: int) -> None:
        # n_dead latents past the dead window: the aux loss sees a different count each step.
        trainer.n_forward_passes_since_fired.zero_()
        trainer.n_forward_passes_since_fired[:n_dead] = window + 1
        gpu_check._step(trainer, torch.randn(256, width, generator=generator))

    for n_dead in (0, 3, 40, 7):
        step(n_dead)
    compiled = counters["frames"]["total"]
    assert compiled > 0
    for n_dead in (5, 0, 90, 11, 2):
        step(n_dead)
    assert counters["frames"]["total"] == compiled
    torch._dynamo.reset()


# --- the GPU check script ---------------------------------------------------------------------


@pytest.mark.slow
def test_gpu_check_runs_end_to_end_on_cpu(tmp_path):
    report = gpu_check.main([
        "--device", "cpu", "--sizes", "small", "--compile-backend", "eager",
        "--compiled", "topk,mutual_choice", "--compile-min-s", "0", "--out", str(tmp_path),
    ])
    assert report["failed"] == 0 and report["finished"]
    assert list(report["sections"]) == list(gpu_check.SECTIONS)
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["sections"] == json.loads(json.dumps(report["sections"], default=str))
    assert "## steps" in (tmp_path / "gpu_check.md").read_text()
    kernels = report["sections"]["kernels"]
    assert [row["dtype"] for row in kernels] == ["float32", "bfloat16"]
    assert all(row["mutual_choice_exact"] and row["feature_choice_exact"] for row in kernels)
    steps = report["sections"]["steps"] + report["sections"]["compiled"]
    assert {(row["architecture"], row["autocast"], row["compile"]) for row in steps} >= {
        ("mutual_choice", False, True), ("mutual_choice", False, False), ("mutual_choice", True, False)
    }
    syncs = {row["architecture"]: row for row in report["sections"]["syncs"]}
    for label, events in SYNCS_PER_STEP.items():
        assert sorted(syncs[label]["events"]) == sorted(events)
    (embedded,) = report["sections"]["embedded"]
    assert embedded["export_architecture"] == "jumprelu" and embedded["summary"]["l0"] > 0
    assert report["sections"]["store"][0]["gradient_tokens_per_s"] > 0


def test_gpu_check_records_a_failing_row_and_goes_on(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("broken kernel")

    monkeypatch.setattr(gpu_check, "kernel_row", broken)
    report = gpu_check.main(["--device", "cpu", "--sizes", "small", "--sections",
                             "kernels,preflight", "--out", str(tmp_path)])
    assert report["failed"] == 2
    assert report["sections"]["kernels"][0]["error"].startswith("ValueError: broken kernel")
    assert [row["row"] for row in report["sections"]["preflight"]] == ["machine", "packages"]


def test_gpu_check_starts_nothing_past_its_deadline(tmp_path):
    report = gpu_check.main(["--device", "cpu", "--sizes", "small", "--deadline-s", "0",
                             "--sections", "kernels,steps", "--out", str(tmp_path)])
    assert report["sections"] == {"kernels": [{"row": "all", "skipped": "deadline"}],
                                  "steps": [{"row": "all", "skipped": "deadline"}]}


@settings(max_examples=200, deadline=None)
@given(dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
       bound=st.floats(allow_nan=True, allow_infinity=True, width=32),
       seed=st.integers(0, 2**16))
def test_one_comparison_selects_what_two_did(dtype, bound, seed):
    """The static Mutual Choice candidates `z > _just_below(b)` are exactly `z >= b and z > 0`,
    subnormals, zeros, infinities and NaN included."""
    from sae_lens_allocation.allocation.static import _just_below

    g = torch.Generator().manual_seed(seed)
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), bound])
    z = torch.cat([torch.randn(200, generator=g) * 10.0 ** torch.randint(-45, 5, (200,), generator=g),
                   special]).to(dtype)
    small = torch.finfo(dtype).smallest_normal
    z = torch.cat([z, torch.tensor([small / 2, small / 1024, small], dtype=dtype)])
    b = torch.tensor(bound).to(dtype)
    assert torch.equal(z > _just_below(b), (z >= b) & (z > 0))
