"""Clean stops and exact resume (training/resume.py) on the tiny offline model.

A run stopped by SIGTERM (handled in-process) or killed with SIGKILL (a real child process), then
resumed from its checkpoint, ends with exactly the weights and buffers of the uninterrupted run
with the same seed; a checkpoint or export whose writer died is refused by load_sae, eval and
dashboard.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_lens_allocation.training.resume import (
    RESUME_STATE_FILENAME,
    ResumableActivationsStore,
    TrainingInterrupted,
)
from sae_lens_allocation.training.runner import build_runner
from sae_lens_allocation_cli import main

import support

ARCHS = {
    "mutual_choice": {"sae_k": 4, "sae_calibration_tokens": 512},
    "feature_choice": {"sae_k": 4, "sae_calibration_tokens": 512},
    "topk_aux": {"sae_k": 4},
    "gradient_topk": {"sae_k": 4},
    "topk": {"sae_k": 4},  # SAELens' own TopK, through the same runner
}
STEPS = 12
STOP_AFTER = 5  # steps completed when the signal arrives
TESTS = Path(__file__).parent


def _cfg(arch, folder, **overrides):
    return support.runner_cfg(arch, folder, training_tokens=STEPS * 256, n_checkpoints=2,
                              **ARCHS[arch], **overrides)


def _train(arch, folder, **overrides):
    runner = build_runner(_cfg(arch, folder, **overrides), override_model=support.tiny_model(),
                          override_dataset=support.tiny_dataset())
    return runner, runner.run()


def _signal_at_step(runner, signum, step):
    """Send `signum` to this process when the trainer asks for the batch of step `step` + 1."""
    store = runner.activations_store
    calls = {"n": 0}

    class SignallingStore(type(store)):
        def __next__(self):
            if self.stop_check is not None:
                calls["n"] += 1
                if calls["n"] == step + 1:
                    os.kill(os.getpid(), signum)
            return super().__next__()

    store.__class__ = SignallingStore


def _assert_same_sae(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def _assert_same_export(a: Path, b: Path):
    wa, wb = load_file(a / "sae_weights.safetensors"), load_file(b / "sae_weights.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run of each architecture, trained once."""
    runs = {}

    def get(arch):
        if arch not in runs:
            folder = tmp_path_factory.mktemp(f"reference-{arch}")
            runs[arch] = (folder, _train(arch, folder)[1])
        return runs[arch]

    return get


@pytest.mark.parametrize("arch", list(ARCHS))
def test_sigterm_checkpoint_then_resume_equals_uninterrupted(arch, reference, tmp_path):
    ref_folder, ref_sae = reference(arch)
    runner = build_runner(_cfg(arch, tmp_path / "stopped"), override_model=support.tiny_model(),
                          override_dataset=support.tiny_dataset())
    _signal_at_step(runner, signal.SIGTERM, STOP_AFTER)
    with pytest.raises(TrainingInterrupted) as stop:
        runner.run()
    assert stop.value.exit_code == 143
    checkpoint = stop.value.checkpoint
    assert checkpoint == tmp_path / "stopped" / "checkpoints" / str(STOP_AFTER * 256)
    assert f"after step {STOP_AFTER}" in str(stop.value)
    for name in ("cfg.json", "sae_weights.safetensors", "trainer_state.pt", RESUME_STATE_FILENAME,
                 "activations_store_state.safetensors", "resume_store_state.pt"):
        assert (checkpoint / name).is_file(), name
    assert not (tmp_path / "stopped" / "output").exists()  # no export of a half-trained SAE
    assert not (tmp_path / "stopped" / "checkpoints" / ".incomplete").exists()
    # The handlers are restored once the run is over.
    assert signal.getsignal(signal.SIGTERM) is not runner.stop

    _, resumed = _train(arch, tmp_path / "resumed", resume_from_checkpoint=str(checkpoint))
    _assert_same_sae(resumed, ref_sae)
    _assert_same_export(tmp_path / "resumed" / "output", ref_folder / "output")


def test_sigint_exit_code_is_130(tmp_path):
    runner = build_runner(_cfg("topk_aux", tmp_path), override_model=support.tiny_model(),
                          override_dataset=support.tiny_dataset())
    _signal_at_step(runner, signal.SIGINT, 2)
    with pytest.raises(TrainingInterrupted) as stop:
        runner.run()
    assert stop.value.exit_code == 130 and "SIGINT" in str(stop.value)


def test_cli_prints_one_line_and_exits_with_the_signal_code(monkeypatch, capsys, tmp_path):
    import sae_lens_allocation.training.runner as runner_module

    def stopped(cfg):
        raise TrainingInterrupted(signal.SIGTERM, "stopped by SIGTERM after step 3; checkpoint "
                                  f"written to {tmp_path}", checkpoint=tmp_path)

    monkeypatch.setattr(runner_module, "train", stopped)
    code = main(["train", str(TESTS.parent / "configs" / "embedded-mutual-choice.yaml")])
    err = capsys.readouterr().err
    assert code == 143
    assert err.count("\n") == 1 and "checkpoint written to" in err and "Traceback" not in err


_WORKER = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {tests!r})
    import support
    from sae_lens_allocation.training import resume
    from sae_lens_allocation.training.runner import build_runner

    mode, block_at = sys.argv[1], int(sys.argv[2])
    cfg = support.runner_cfg({arch!r}, {folder!r}, training_tokens={tokens}, n_checkpoints=2,
                             **{extra!r})
    runner = build_runner(cfg, override_model=support.tiny_model(),
                          override_dataset=support.tiny_dataset())
    if mode == "mid-step":
        # Block when asking for the batch of step block_at + 1, after the first checkpoint.
        store, calls = runner.activations_store, {{"n": 0}}

        class Blocking(type(store)):
            def __next__(self):
                if self.stop_check is not None:
                    calls["n"] += 1
                    if calls["n"] == block_at + 1:
                        print("blocked", flush=True)
                        time.sleep(600)
                return super().__next__()

        store.__class__ = Blocking
    else:
        # Block while a checkpoint is being written: the trainer's files are in place, the
        # resume state and the rename are not.
        original = resume.ResumableTrainingRunner.save_checkpoint

        class Blocking(type(runner)):
            def save_checkpoint(self, checkpoint_path):
                if checkpoint_path is not None:
                    print("blocked", flush=True)
                    time.sleep(600)
                return original(self, checkpoint_path)

        runner.__class__ = Blocking
    runner.run()
""")


def _run_and_kill_9(arch, folder, mode, block_at):
    code = _WORKER.format(tests=str(TESTS), arch=arch, folder=str(folder), tokens=STEPS * 256,
                          extra=ARCHS[arch])
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent)}
    proc = subprocess.Popen([sys.executable, "-c", code, mode, str(block_at)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout.readline().strip() == "blocked"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.stdout.close()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["feature_choice", "mutual_choice"])
def test_kill_9_then_resume_from_the_last_checkpoint_equals_uninterrupted(arch, reference, tmp_path):
    ref_folder, ref_sae = reference(arch)
    _run_and_kill_9(arch, tmp_path / "killed", "mid-step", block_at=STEPS - 2)
    checkpoints = tmp_path / "killed" / "checkpoints"
    finished = sorted((p for p in checkpoints.iterdir() if not p.name.startswith(".")),
                      key=lambda p: int(p.name))
    assert [p.name for p in finished] == ["1280", "2304"]  # n_checkpoints=2 over 12 steps of 256
    assert not (tmp_path / "killed" / "output").exists()
    _, resumed = _train(arch, tmp_path / "resumed", resume_from_checkpoint=str(finished[-1]))
    _assert_same_sae(resumed, ref_sae)
    _assert_same_export(tmp_path / "resumed" / "output", ref_folder / "output")


@pytest.mark.slow
def test_kill_9_while_writing_a_checkpoint_leaves_nothing_loadable(tmp_path, capsys):
    from sae_lens_allocation import load_sae
    from sae_lens_allocation.validation import UsageError

    _run_and_kill_9("mutual_choice", tmp_path, "in-checkpoint", block_at=0)
    checkpoints = tmp_path / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == [".incomplete"]  # nothing published
    (partial,) = (checkpoints / ".incomplete").iterdir()
    assert (partial / "sae_weights.safetensors").is_file()  # the trainer's part was written
    with pytest.raises(UsageError, match="never completed"):
        load_sae(partial)
    for argv in (["eval", str(partial)], ["dashboard", str(partial), "--out", str(tmp_path / "d")]):
        assert main(argv) == 2
        assert "never completed" in capsys.readouterr().err
    code = main(["train", str(TESTS.parent / "configs" / "embedded-mutual-choice.yaml"),
                 "--set", f"resume_from_checkpoint={partial}"])
    assert code == 2 and "never completed" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_store_replays_to_the_same_rows_after_a_restart(tmp_path):
    """The store's checkpoint alone brings a fresh store to the same next batches."""
    model, data = support.tiny_model(), support.tiny_dataset()
    cfg = _cfg("topk_aux", tmp_path)

    def fresh():
        return ResumableActivationsStore.from_config(model, cfg, override_dataset=data)

    store = fresh()
    for _ in range(7):
        next(store)
    store.save_to_checkpoint(tmp_path)
    expected = [next(store) for _ in range(6)]
    restarted = fresh()
    restarted.load_from_checkpoint(tmp_path)
    for batch in expected:
        assert torch.equal(next(restarted), batch)


def test_sigterm_during_the_export_lets_it_finish_then_stops(reference, tmp_path):
    """Mutual Choice calibrates its export after the last step: a signal then does not cut the
    export short; it is complete and equal to the uninterrupted one."""
    ref_folder, _ = reference("mutual_choice")
    runner = build_runner(_cfg("mutual_choice", tmp_path), override_model=support.tiny_model(),
                          override_dataset=support.tiny_dataset())
    state = {"sent": False}
    calibrate = runner.sae.calibrate_thresholds

    def signal_then_calibrate(*args, **kwargs):
        if not state["sent"]:
            state["sent"] = True
            os.kill(os.getpid(), signal.SIGTERM)
        return calibrate(*args, **kwargs)

    runner.sae.calibrate_thresholds = signal_then_calibrate
    with pytest.raises(TrainingInterrupted, match="after the last step; the export .* is complete") as stop:
        runner.run()
    assert state["sent"] and stop.value.exit_code == 143
    _assert_same_export(tmp_path / "output", ref_folder / "output")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_publishing_into_an_existing_export_moves_cfg_json_last(tmp_path, monkeypatch):
    """While files move in, the folder holds no cfg.json: never new weights under an old config."""
    import sae_lens_allocation.training.resume as resume

    final, new = tmp_path / "out", tmp_path / ".out.incomplete-1"
    final.mkdir()
    new.mkdir()
    for folder, tag in ((final, "old"), (new, "new")):
        for name in ("cfg.json", "sae_weights.safetensors", "runner_cfg.json"):
            (folder / name).write_text(tag)
    (final / "notes.txt").write_text("the user's")
    moved = []
    real_replace = os.replace

    def recording_replace(src, dst):
        assert not (final / "cfg.json").exists()
        moved.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(resume.os, "replace", recording_replace)
    resume.publish_folder(new, final)
    assert moved[-1] == "cfg.json" and len(moved) == 3
    assert {p.name: p.read_text() for p in final.iterdir()} == {
        "cfg.json": "new", "sae_weights.safetensors": "new", "runner_cfg.json": "new",
        "notes.txt": "the user's",
    }
    assert not new.exists()
