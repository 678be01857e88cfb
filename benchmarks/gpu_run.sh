#!/usr/bin/env bash
# The whole command for the GPU machine, which has no network (docs/performance.md):
#   bash benchmarks/gpu_run.sh        with the folder gpu-bundle carried (make gpu-bundle)
# It installs the bundle's wheels into a temporary target, checks that torch sees a GPU and that
# this package imports from there (else exit 2 or 3 with one line), then runs gpu_check.py under a
# deadline inside the 10 minutes one command may take, writing into $OUT, which alone comes back.
# GPU_CHECK_DEVICE=cpu rehearses the same steps on a CPU at reduced sizes (tests/test_gpu_run.py).
# Other knobs: PYTHON, GPU_BUNDLE (folder of wheels), GPU_CHECK_DEADLINE_S (hard limit of the
# check), GPU_CHECK_ARGS (more gpu_check.py arguments).
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
BUNDLE=${GPU_BUNDLE:-gpu-bundle}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
# 540 s of check + install and start-up stays inside 600 s; the check stops starting rows 40 s
# earlier, so a hard kill is the exception.
DEADLINE_S=${GPU_CHECK_DEADLINE_S:-540}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"

fail() {  # one line on stdout and in $OUT, then exit
    echo "gpu_run: $2" | tee "$OUT/gpu_run_error.txt"
    exit "$1"
}

target=$(mktemp -d)
trap 'rm -rf "$target"' EXIT
compgen -G "$BUNDLE/*.whl" >/dev/null || fail 2 "no wheels in $BUNDLE: run make gpu-bundle and carry it"
"$PYTHON" -m pip install -q --no-index --no-deps --disable-pip-version-check --target "$target" \
    "$BUNDLE"/*.whl >"$target/.pip.log" 2>&1 \
    || fail 2 "pip install of $BUNDLE failed: $(grep -v '^\s*$' "$target/.pip.log" | tail -1)"

export PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled \
    TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

# -P: never import the package from the working tree, only from the bundle.
"$PYTHON" -P - "$DEVICE" "$target" <<'PY' || exit 3
import sys
from pathlib import Path

device, target = sys.argv[1], Path(sys.argv[2])
try:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"torch {torch.__version__} sees no GPU")
    import sae_lens_allocation
    import sae_lens  # noqa: F401
except Exception as error:
    print(f"gpu_run: preflight failed: {type(error).__name__}: {error}".splitlines()[0])
    sys.exit(3)
# A wheel built before the last code change would measure old code.
installed = Path(sae_lens_allocation.__file__).parent
stale = [str(p.relative_to("sae_lens_allocation")) for p in Path("sae_lens_allocation").rglob("*.py")
         if not (installed / p.relative_to("sae_lens_allocation")).is_file()
         or (installed / p.relative_to("sae_lens_allocation")).read_bytes() != p.read_bytes()]
if stale:
    print(f"gpu_run: the bundle's wheel is stale ({len(stale)} files differ, e.g. {stale[0]}): "
          "make gpu-bundle-wheel")
    sys.exit(3)
PY

args=(--device "$DEVICE" --out "$OUT" --deadline-s "$((DEADLINE_S - 40))")
[ "$DEVICE" = cpu ] && args+=(--sizes small --compile-backend eager)
# shellcheck disable=SC2206  # GPU_CHECK_ARGS is a list of words on purpose
args+=(${GPU_CHECK_ARGS:-})
timeout --signal=TERM --kill-after=15 "$DEADLINE_S" "$PYTHON" -P benchmarks/gpu_check.py "${args[@]}"
status=$?
[ "$status" = 124 ] && echo "gpu_run: gpu_check.py passed its ${DEADLINE_S} s deadline; finished rows are in $OUT"
exit "$status"
