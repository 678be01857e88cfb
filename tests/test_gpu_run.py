"""The device command, rehearsed on this CPU (issue 31): benchmarks/gpu_run.sh with
GPU_CHECK_DEVICE=cpu, on a python that has only what the GPU image has (torch, numpy,
transformers, pandas, pyarrow, safetensors and their requirements, linked from this environment)
plus the bundle installed with --no-index --no-deps. Nothing else of this environment is on the
path, so a package missing from the bundle fails here as it would on the device.

The bundle is this environment's variant of `make gpu-bundle`, in <venv>/gpu-bundle-local: `make
test` downloads it with the environment (about 40 MB from PyPI; an installed environment cannot
be packed back into wheels), so these tests stay offline; this package's wheel is rebuilt from
the working tree on every run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bundle_pins  # noqa: E402
from packaging.requirements import Requirement  # noqa: E402

BUNDLE = Path(sys.prefix) / "gpu-bundle-local"
# The sections that need the bundle's packages, at their smallest; the embedded training is
# left to tests/test_device.py (in process), it adds most of a minute here. The gradient store
# too: with the training-only stack's versions (datasets 5.2, pyarrow 26) in this rehearsal's
# python, `Dataset.from_dict` fails to hash its table (dill cannot pickle pyarrow's
# MonthDayNano), while the same versions in a full environment work; not yet understood, and
# the device run may meet it in its last section (docs/performance.md).
SECTIONS = "preflight,exactness,kernels,syncs"


def _make(*args: str) -> None:
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    subprocess.run(["make", "-s", *args, f"BUNDLE={BUNDLE}", f"BUNDLE_VENV={sys.prefix}",
                    f"BUNDLE_PY={python}"], cwd=ROOT, check=True, capture_output=True)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    pins = tmp_path_factory.mktemp("pins")
    bundle_pins.main(["--pure", str(pins / "pure.txt"), "--binary", str(pins / "binary.txt")])
    current = all((BUNDLE / name).is_file() and (BUNDLE / name).read_text() == (pins / name).read_text()
                  for name in ("pure.txt", "binary.txt"))
    if not current:
        pytest.fail(f"{BUNDLE} is missing or was built for other versions: `make test` (or "
                    f"`make gpu-bundle BUNDLE={BUNDLE} BUNDLE_VENV={sys.prefix}`) downloads it")
    _make("gpu-bundle-wheel")
    return BUNDLE


@pytest.fixture(scope="module")
def image_python(tmp_path_factory) -> Path:
    """A `python` that sees the stdlib and the image's distributions only (-S: no site-packages)."""
    root = tmp_path_factory.mktemp("image")
    site = root / "site"
    site.mkdir()
    image = bundle_pins.closure([Requirement(name) for name in bundle_pins.IMAGE])
    for dist in image.values():
        for top in {Path(str(f)).parts[0] for f in dist.files or []} - {".."}:
            source = Path(str(dist.locate_file(top)))
            if source.exists() and not (site / top).exists():
                (site / top).symlink_to(source)
    python = root / "python"
    python.write_text(f'#!/bin/sh\nPYTHONPATH="{site}${{PYTHONPATH:+:$PYTHONPATH}}" '
                      f'exec {sys.executable} -S "$@"\n')
    python.chmod(0o755)
    return python


def _env(image_python: Path, bundle: Path, out: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "PYTHON": str(image_python), "GPU_BUNDLE": str(bundle), "OUT": str(out),
            "GPU_CHECK_DEVICE": "cpu", **extra}


@pytest.mark.slow
def test_the_rehearsal_writes_its_report_into_out(bundle, image_python, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(
        ["bash", "benchmarks/gpu_run.sh"], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env=_env(image_python, bundle, out, GPU_CHECK_DEADLINE_S="240",
                 GPU_CHECK_ARGS=f"--sections {SECTIONS}"),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["finished"] and report["failed"] == 0
    assert list(report["sections"]) == SECTIONS.split(",")
    packages = report["sections"]["preflight"][1]
    # Imported from the bundle's target, not from this environment or the working tree.
    assert "site-packages" not in packages["sae_lens_allocation_file"]
    assert not packages["sae_lens_allocation_file"].startswith(str(ROOT))
    exactness = report["sections"]["exactness"]
    assert len(exactness) == 11 and all(row["codes_equal"] for row in exactness)
    assert {row["row"] for row in report["sections"]["kernels"]} == {"N 256 float32", "N 256 bfloat16"}
    assert "## exactness" in (out / "gpu_check.md").read_text()


@pytest.mark.slow
def test_a_killed_run_keeps_its_finished_rows(bundle, image_python, tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen(
        ["bash", "benchmarks/gpu_run.sh"], cwd=ROOT, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True,
        env=_env(image_python, bundle, out, GPU_CHECK_ARGS=f"--sections {SECTIONS}"),
    )
    report_file, rows = out / "gpu_check.json", 0
    deadline = time.monotonic() + 180
    try:
        while rows < 3 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
            if report_file.exists():
                rows = sum(len(r) for r in json.loads(report_file.read_text())["sections"].values())
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert rows >= 3
    report = json.loads(report_file.read_text())
    assert not report["finished"]
    assert [row["row"] for row in report["sections"]["preflight"]] == ["machine", "packages"]
    assert "not finished" in (out / "gpu_check.md").read_text()


@pytest.mark.slow
def test_an_import_failure_exits_non_zero_with_one_line(bundle, image_python, tmp_path):
    only_the_package = tmp_path / "bundle"
    only_the_package.mkdir()
    for wheel in bundle.glob("sae_lens_allocation-*.whl"):
        (only_the_package / wheel.name).symlink_to(wheel)
    out = tmp_path / "out"
    done = subprocess.run(["bash", "benchmarks/gpu_run.sh"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=_env(image_python, only_the_package, out))
    assert done.returncode == 3
    assert done.stdout.count("\n") == 1
    assert done.stdout.startswith("gpu_run: preflight failed: ModuleNotFoundError")
    assert not (out / "gpu_check.json").exists()
