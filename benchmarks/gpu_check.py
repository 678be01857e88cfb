"""One device check, in order of value, every row saved to `<out>` as soon as it finishes.

On one GPU with no network (`bash benchmarks/gpu_run.sh`, docs/performance.md), within
`--deadline-s` (checked before every section and row; what did not start is marked skipped):

1. preflight: versions, GPU name, TF32 settings; the package and SAELens must import;
2. exactness: the device kernels against the CPU path on the same data (random fp32 and bf16,
   ties, a sampled-bound miss, buffer overflow, gradients);
3. kernels: `mutual_choice` against SAELens' BatchTopK operator (relu, one `torch.topk` over the
   flattened batch, scatter), `feature_choice` against `torch.topk` down the batch and, fairer on
   a GPU, along rows of a contiguous transpose; fp32 and bf16, N 4096 and 16384 x F 24576, k 32;
   medians of interleaved repeats (CUDA events on a GPU), also as multiples of one `z.clone()`;
4. training steps: SAELens' `SAETrainer.step` of every plugin architecture and of SAELens `topk`
   and `batchtopk` (d_in 768, d_sae 24576, k 32, 4096 tokens), eager, fp32 and bf16 autocast;
   medians, ratio to `topk` in the same setting, peak memory of one step on a GPU;
5. host syncs per training step: counted at the ATen level on a fake device (`HostSyncCounter`,
   the structural count) and, on CUDA, as CUDA's sync debug mode reports them;
6. compiled: `torch.compile` of `--compiled` rows (as `compile_sae: true` does) against eager,
   only while `--compile-min-s` seconds are left (compiling costs about a minute a row);
7. a short Mutual Choice training on the embedded model, its calibrated export and its eval;
8. the gradient store against SAELens' ActivationsStore, GPT-2 small shapes, random weights.

It writes `<out>/gpu_check.json` and `<out>/gpu_check.md` after every row and exits non-zero if
any row failed. `--device cpu --sizes small` runs the same sections at reduced sizes.

    python benchmarks/gpu_check.py --out benchmarks/results
    python benchmarks/gpu_check.py --device cpu --sizes small --out /tmp/gpu-check
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

aten = torch.ops.aten

# (row label, architecture, extra SAE config). Mutual/Feature Choice use aux_k, the loss of topk.
STEP_ROWS: list[tuple[str, str, dict[str, Any]]] = [
    ("topk", "topk", {}),
    ("batchtopk", "batchtopk", {}),
    ("topk_aux", "topk_aux", {}),
    ("mutual_choice", "mutual_choice", {"aux_loss": "aux_k"}),
    ("feature_choice", "feature_choice", {"aux_loss": "aux_k"}),
    ("feature_choice_zipf", "feature_choice", {"aux_loss": "aux_k", "capacity": "zipf"}),
    ("gradient_topk", "gradient_topk", {}),
]
# The sparse step (docs/performance.md), timed beside those rows but left out of the sync count:
# its entry counts are data-dependent by design. SAELens' own sparse TopK has no CPU kernel (`view`
# of a SparseCPU tensor), so its row runs on CUDA only.
SPARSE_STEP_ROWS: list[tuple[str, str, dict[str, Any]]] = [
    ("mutual_choice_sparse", "mutual_choice", {"aux_loss": "aux_k", "use_sparse_activations": True}),
    ("topk_sparse", "topk", {"use_sparse_activations": True}),
]
# Compiling costs about a minute per row on a GPU: one row by default.
COMPILED_ROWS = ("mutual_choice",)

# kernel_ns: batch sizes of the kernel timings (F = d_sae).
FULL = dict(n=4096, d_in=768, d_sae=24576, k=32, repeats=7, kernel_ns=(4096, 16384), store="gpt2",
            store_batches=6, train_tokens=1_000_000, eval_batches=8)
# A moderate CPU shape: compiled against eager steps without a GPU (`--sizes moderate`).
MODERATE = dict(n=1024, d_in=256, d_sae=4096, k=16, repeats=5, kernel_ns=(1024,), store="tiny",
                store_batches=2, train_tokens=16384, eval_batches=2)
SMALL = dict(n=256, d_in=32, d_sae=512, k=8, repeats=1, kernel_ns=(256,), store="tiny",
             store_batches=1, train_tokens=4096, eval_batches=1)


# --- host synchronisations ---------------------------------------------------------------------

# Ops whose output size depends on device data: the host must wait for the device to know it.
_SIZE_FROM_DATA = {
    aten.nonzero.default, aten.masked_select.default, aten._unique.default,
    aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
    aten.bincount.default, aten.repeat_interleave.Tensor, aten.equal.default,
}
_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
             aten._index_put_impl_.default}


def default_answer(tensor: torch.Tensor) -> bool | int | float:
    """Stand-in value of a fake tensor read on the host: device flags true (a complete candidate
    set, a finite loss), host flags false (no invalid input), counts 1, floats 1.0."""
    if tensor.dtype == torch.bool:
        return tensor.device.type != "cpu"
    if tensor.is_floating_point():
        return 1.0
    return 1


class HostSyncCounter(TorchDispatchMode):
    """Records every ATen call that makes the host wait for a device: reading a device value
    (`item`, `bool`, `int`: aten._local_scalar_dense), an op whose output size depends on
    device data (nonzero, masked_select, unique, bincount, boolean indexing, equal), a copy
    from a device to the host, and a copy from host memory to a device (from pageable memory it
    blocks the host as well). Non-blocking copies are not counted: the plugin makes them from or
    to pinned memory on CUDA (`allocation.transfer`), where they are queued like kernels.
    Tensors on the CPU are not counted.

    Under FakeTensorMode nothing has a value; a host read then returns `answer(tensor)` (default
    `default_answer`), and the size-from-data ops raise in FakeTensorMode itself, so a run that
    completes there has exactly `len(events)` synchronisations by construction."""

    def __init__(self, answer: Callable[[torch.Tensor], Any] | None = default_answer) -> None:
        super().__init__()
        self.answer = answer
        self.events: list[str] = []
        # file:line of the innermost frame outside torch, one per event.
        self.where: list[str] = []

    def _record(self, event: str) -> None:
        self.events.append(event)
        frames = [f for f in traceback.extract_stack()[:-2] if "/torch/" not in f.filename]
        frame = frames[-1] if frames else None
        self.where.append(f"{Path(frame.filename).name}:{frame.lineno}" if frame else "?")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        on_device = bool(tensors) and tensors[0].device.type != "cpu"
        if func is aten._local_scalar_dense.default:
            if on_device:
                self._record("host read")
            if self.answer is not None and isinstance(args[0], FakeTensor):
                return self.answer(args[0])
        elif func in _SIZE_FROM_DATA and on_device:
            self._record(str(func.overloadpacket.__name__))
        elif func in _INDEXING and on_device:
            indices = args[1] if len(args) > 1 else ()
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ()):
                self._record("boolean indexing")
        elif func is aten._to_copy.default and tensors:
            target = torch.device(kwargs.get("device") or tensors[0].device).type
            if on_device and target == "cpu" and not kwargs.get("non_blocking"):
                self._record("copy to host")
            elif not on_device and target != "cpu" and not kwargs.get("non_blocking"):
                # From pageable host memory a copy to the device blocks the host too; the
                # plugin's non-blocking copies come from pinned memory on CUDA.
                self._record("copy to device")
        elif func is aten.copy_.default and len(tensors) == 2:
            if tensors[0].device.type == "cpu" and tensors[1].device.type != "cpu" and not (
                len(args) > 2 and args[2]
            ):
                self._record("copy to host")
            elif tensors[0].device.type != "cpu" and tensors[1].device.type == "cpu" and not (
                len(args) > 2 and args[2]
            ):
                self._record("copy to device")
        return func(*args, **kwargs)


# --- shared helpers -----------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _interleaved_medians(
    fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int, warmup: int = 1,
    events: bool = False,
) -> dict[str, float]:
    """Median seconds of each function; every repeat runs all of them in turn, so drift in the
    machine's load hits them alike. `events` on CUDA: timed by CUDA events, the device's own
    time without the host's launch gaps between repeats."""
    events = events and device.type == "cuda"
    times: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(warmup + repeats):
        for name, fn in fns.items():
            _sync(device)
            if events:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                fn()
                end.record()
                end.synchronize()
                seconds = begin.elapsed_time(end) / 1000
            else:
                start = time.perf_counter()
                fn()
                _sync(device)
                seconds = time.perf_counter() - start
            if rep >= warmup:
                times[name].append(seconds)
    return {name: statistics.median(values) for name, values in times.items()}


def _machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": str(device), "torch": torch.__version__, "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }
    if hasattr(os, "getloadavg"):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    # TF32 changes fp32 matmul results and speed on a GPU: the steps' figures depend on it.
    info["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    info["tf32_cudnn"] = torch.backends.cudnn.allow_tf32
    info["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    return info


# --- the report, saved after every row ----------------------------------------------------------


def _error(error: BaseException) -> str:
    """The exception and the innermost frame that raised it: one line to read in the report."""
    frames = traceback.extract_tb(error.__traceback__)
    where = f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(error).__name__}: {error}{where}".replace("\n", " ")


class Run:
    """Sections of rows with a global deadline. The JSON and Markdown are rewritten (atomically)
    after every row, so a time-out, a kill or a crash leaves every finished row in `out`."""

    def __init__(self, out: Path, deadline_s: float, header: dict[str, Any]) -> None:
        self.out = out
        self.start = time.perf_counter()
        self.deadline = self.start + deadline_s
        self.report: dict[str, Any] = {**header, "deadline_s": deadline_s, "sections": {},
                                       "failed": 0, "seconds": 0.0, "finished": False}
        out.mkdir(parents=True, exist_ok=True)

    def seconds_left(self) -> float:
        return self.deadline - time.perf_counter()

    def _rows(self, section: str) -> list[dict[str, Any]]:
        return self.report["sections"].setdefault(section, [])

    def skip(self, section: str, label: str, why: str) -> None:
        self._rows(section).append({"row": label, "skipped": why})
        self.save()

    def row(self, section: str, label: str, fn: Callable[[], Any]) -> None:
        """Runs one row unless the deadline has passed; its result (a dict, or a list of dicts)
        or its error is recorded, then everything is saved."""
        if self.seconds_left() <= 0:
            self.skip(section, label, "deadline")
            return
        print(f"[gpu_check] {section}: {label}", flush=True)
        start = time.perf_counter()
        try:
            result = fn()
        except Exception as error:  # one failing row must not hide the others' figures
            result = {"error": _error(error)}
        lines = result if isinstance(result, list) else [result]
        seconds = time.perf_counter() - start
        self._rows(section).extend({"row": label, **line, "seconds": seconds} for line in lines)
        self.report["failed"] += sum("error" in line for line in lines)
        self.save()

    def save(self) -> None:
        self.report["seconds"] = time.perf_counter() - self.start
        for name, text in (("gpu_check.json", json.dumps(self.report, indent=2, default=str)),
                           ("gpu_check.md", markdown(self.report))):
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, self.out / name)


# --- 1. preflight -------------------------------------------------------------------------------


def check_preflight(run: Run, args: argparse.Namespace) -> None:
    run.row("preflight", "machine", lambda: _machine(torch.device(args.device)))

    def packages() -> dict[str, Any]:
        from importlib import metadata

        import sae_lens  # noqa: F401

        import sae_lens_allocation

        versions: dict[str, Any] = {"sae_lens_allocation_file": sae_lens_allocation.__file__}
        for name in ("sae-lens-allocation", "sae-lens", "transformer-lens", "transformers",
                     "datasets", "numpy", "safetensors"):
            try:
                versions[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                versions[name] = "absent"
        return versions

    run.row("preflight", "packages", packages)


# --- 2. exactness on the device -----------------------------------------------------------------


@contextlib.contextmanager
def _device_path(device: torch.device) -> Iterator[None]:
    """The kernels' device path. On a CPU (the rehearsal) it is forced, so that the comparison
    with the CPU path is not one of a path with itself."""
    from sae_lens_allocation.allocation import static

    if device.type != "cpu":
        yield
        return
    original = static._static_shapes
    static._static_shapes = lambda _device: True
    try:
        yield
    finally:
        static._static_shapes = original


def _compare(device: torch.device, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor],
             grad: bool = False) -> dict[str, Any]:
    """`fn` on the device against `fn` on the CPU path, same input: codes (and input gradients
    against random weights) equal bit for bit, the project's tie rule included."""
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).to(x.dtype)
    results = []
    for where in (device, torch.device("cpu")):
        leaf = x.to(where).requires_grad_(grad)
        with _device_path(device) if where == device else contextlib.nullcontext():
            codes = fn(leaf)
            if grad:
                (codes * weights.to(where)).sum().backward()
        results.append((codes.detach().cpu(), leaf.grad.cpu() if grad else None))
    (dev_codes, dev_grad), (cpu_codes, cpu_grad) = results
    row: dict[str, Any] = {"shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch."),
                           "kept": int(cpu_codes.count_nonzero()),
                           "codes_equal": bool(torch.equal(dev_codes, cpu_codes))}
    if grad:
        row["grads_equal"] = bool(torch.equal(dev_grad, cpu_grad))
    if not all(v for k, v in row.items() if k.endswith("_equal")):
        raise AssertionError(f"device and CPU path differ: {row}")
    return row


def check_exactness(run: Run, args: argparse.Namespace, sizes: dict[str, Any]) -> None:
    from sae_lens_allocation.allocation import cpu, feature_choice, mutual_choice, uniform_capacities

    device = torch.device(args.device)
    n, f, k = sizes["n"], sizes["d_sae"], sizes["k"]
    caps = uniform_capacities(n, f, k, torch.Generator().manual_seed(1))
    normal = torch.randn(n, f, generator=torch.Generator().manual_seed(0))
    ties = torch.randint(-20, 60, (n, f), generator=torch.Generator().manual_seed(2)).float()
    # The sampler's own draws made large: the bound then lies above all but 65536 entries, fewer
    # than M, so the sampled path misses and the fallback must run (tests/test_device.py's case).
    draws = torch.randint(0, 1024 * 1024, (cpu._MC_SAMPLE,),
                          generator=torch.Generator().manual_seed(cpu._SEED))
    miss = torch.rand(1024 * 1024, generator=torch.Generator().manual_seed(3))
    miss[draws] += 10
    constant = torch.full((n, f), 3.0)  # every entry tied: the candidate buffer overflows
    constant_caps = torch.full((f,), 3, dtype=torch.long)
    cases: list[tuple[str, torch.Tensor, Callable[[torch.Tensor], torch.Tensor], bool]] = []
    for name, x in (("fp32", normal), ("bf16", normal.bfloat16()), ("ties", ties)):
        cases.append((f"mutual_choice {name}", x, lambda t: mutual_choice(t, k).codes, False))
        cases.append((f"feature_choice {name}", x, lambda t: feature_choice(t, caps).codes, False))
    cases += [
        ("mutual_choice sample miss", miss.reshape(1024, 1024),
         lambda t: mutual_choice(t, 128).codes, False),
        ("mutual_choice overflow", constant, lambda t: mutual_choice(t, 4).codes, False),
        ("feature_choice overflow", constant, lambda t: feature_choice(t, constant_caps).codes, False),
        ("mutual_choice gradients", normal, lambda t: mutual_choice(t, k).codes, True),
        ("feature_choice gradients", normal, lambda t: feature_choice(t, caps).codes, True),
    ]
    for label, x, fn, grad in cases:
        run.row("exactness", label, lambda x=x, fn=fn, grad=grad: _compare(device, x, fn, grad))


# --- 3. kernels ---------------------------------------------------------------------------------


def _batchtopk(z: torch.Tensor, k: float) -> torch.Tensor:
    from sae_lens.saes.batchtopk_sae import BatchTopK

    return BatchTopK(k)(z)


def _topk_down_the_batch(z: torch.Tensor, caps: torch.Tensor) -> torch.Tensor:
    """Feature Choice with `torch.topk` down the batch, then relu."""
    values, indices = torch.topk(z, int(caps.max()), dim=0)
    keep = torch.arange(values.shape[0], device=z.device)[:, None] < caps[None, :]
    return torch.zeros_like(z).scatter(0, indices, values.relu() * keep)


def _topk_along_rows(zt: torch.Tensor, caps: torch.Tensor) -> torch.Tensor:
    """The same selection on `zt`, the contiguous F x N transpose (made outside the timing):
    `torch.topk` along the last, contiguous dimension, its fastest case on a GPU."""
    values, indices = torch.topk(zt, int(caps.max()), dim=1)
    keep = torch.arange(values.shape[1], device=zt.device)[None, :] < caps[:, None]
    return torch.zeros_like(zt).scatter(1, indices, values.relu() * keep)


def _same_kept_values(a: torch.Tensor, b: torch.Tensor, per_latent: bool) -> bool:
    """Same multiset of kept values, over the batch (Mutual Choice) or per latent column (Feature
    Choice): among entries tied at the cut-off the two may keep different ones."""
    if per_latent:
        return bool(torch.equal(a.t().sort(dim=1).values, b.t().sort(dim=1).values))
    return bool(torch.equal(a.flatten().sort().values, b.flatten().sort().values))


def kernel_row(device: torch.device, n: int, f: int, k: int, dtype: torch.dtype,
               repeats: int) -> dict[str, Any]:
    from sae_lens_allocation.allocation import feature_choice, mutual_choice, uniform_capacities

    generator = torch.Generator().manual_seed(0)
    z = torch.randn(n, f, generator=generator).to(device=device, dtype=dtype)
    zt = z.t().contiguous()
    host_caps = uniform_capacities(n, f, k, torch.Generator().manual_seed(1))
    caps = host_caps.to(device)
    medians = _interleaved_medians(
        {
            # One read and one write of N x F: the floor any allocation kernel is measured against.
            "clone": lambda: z.clone(),
            "batchtopk": lambda: _batchtopk(z, k),
            "mutual_choice": lambda: mutual_choice(z, k).codes,
            "topk_down_the_batch": lambda: _topk_down_the_batch(z, caps),
            "topk_transposed": lambda: _topk_along_rows(zt, caps),
            "feature_choice": lambda: feature_choice(z, host_caps).codes,
        },
        device,
        repeats,
        events=True,
    )
    clone = medians["clone"]
    return {
        "dtype": str(dtype).removeprefix("torch."), "n": n, "d_sae": f, "k": k,
        **{f"{name}_ms": 1000 * seconds for name, seconds in medians.items()},
        **{f"{name}_clones": seconds / clone for name, seconds in medians.items() if name != "clone"},
        "mutual_choice_speedup": medians["batchtopk"] / medians["mutual_choice"],
        "feature_choice_speedup": medians["topk_down_the_batch"] / medians["feature_choice"],
        "feature_choice_speedup_transposed": medians["topk_transposed"] / medians["feature_choice"],
        "mutual_choice_exact": _same_kept_values(
            mutual_choice(z, k).codes, _batchtopk(z, k), per_latent=False
        ),
        "feature_choice_exact": _same_kept_values(
            feature_choice(z, host_caps).codes, _topk_down_the_batch(z, caps), per_latent=True
        ),
    }


def check_kernels(run: Run, args: argparse.Namespace, sizes: dict[str, Any]) -> None:
    device = torch.device(args.device)
    for n in sizes["kernel_ns"]:
        for dtype in (torch.float32, torch.bfloat16):
            label = f"N {n} {str(dtype).removeprefix('torch.')}"
            run.row("kernels", label, lambda n=n, dtype=dtype: kernel_row(
                device, n, sizes["d_sae"], sizes["k"], dtype, sizes["repeats"]))
            _free(device)


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- 4. training steps ---------------------------------------------------------------------------


def build_trainer(
    arch: str, extra: dict[str, Any], device: str, sizes: dict[str, Any], autocast: bool
) -> Any:
    from sae_lens import LanguageModelSAERunnerConfig, TrainingSAE, TrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    import sae_lens_allocation  # noqa: F401  (registers the plugin architectures)

    sae_cfg = TrainingSAEConfig.from_dict({
        "architecture": arch, "d_in": sizes["d_in"], "d_sae": sizes["d_sae"], "k": sizes["k"],
        "device": device, **extra,
    })
    runner_cfg = LanguageModelSAERunnerConfig(
        sae=sae_cfg, device=device, autocast=autocast, train_batch_size_tokens=sizes["n"],
        n_batches_in_buffer=max(2, 2 * sizes["n"] // 128), training_tokens=sizes["n"] * 1000,
        checkpoint_path=None, output_path=None,
    )
    sae = TrainingSAE.from_dict(sae_cfg.to_dict())  # built on cfg.device
    return SAETrainer(cfg=runner_cfg.to_sae_trainer_config(), sae=sae, data_provider=iter(()))


def _step_input(
    arch: str, sizes: dict[str, Any], device: str, generator: torch.Generator
) -> torch.Tensor:
    width = 2 * sizes["d_in"] if arch == "gradient_topk" else sizes["d_in"]
    return torch.randn(sizes["n"], width, generator=generator).to(device)


def _step(trainer: Any, batch: torch.Tensor) -> None:
    trainer.step(batch)
    trainer.n_training_steps += 1


def _peak_step_mib(trainer: Any, batch: torch.Tensor, device: torch.device) -> float | None:
    """Memory one more step allocates above what is held before it (GPU only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    held = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    _step(trainer, batch)
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - held) / 2**20


def steps_row(args: argparse.Namespace, sizes: dict[str, Any], autocast: bool) -> list[dict[str, Any]]:
    """Every architecture's eager step in one setting, interleaved; an architecture that fails
    to build or step is an error line, the others are still timed."""
    device = torch.device(args.device)
    setting = {"autocast": autocast, "compile": False}
    generator = torch.Generator().manual_seed(0)
    trainers, batches, lines = {}, {}, []
    sparse = [row for row in SPARSE_STEP_ROWS if device.type == "cuda" or row[0] != "topk_sparse"]
    for label, arch, extra in STEP_ROWS + sparse:
        try:
            trainers[label] = build_trainer(arch, extra, args.device, sizes, autocast)
            batches[label] = _step_input(arch, sizes, args.device, generator)
            _step(trainers[label], batches[label])
        except Exception as error:
            trainers.pop(label, None)
            lines.append({**setting, "architecture": label, "error": _error(error)})
    fns = {label: (lambda t=t, b=batches[label]: _step(t, b)) for label, t in trainers.items()}
    medians = _interleaved_medians(fns, device, sizes["repeats"], warmup=0)
    base = medians.get("topk")
    for label, trainer in trainers.items():
        lines.append({
            **setting, "architecture": label, "median_ms": 1000 * medians[label],
            "ratio_to_topk": medians[label] / base if base else None,
            "peak_step_mib": _peak_step_mib(trainer, batches[label], device),
        })
    del trainers, batches, fns
    _free(device)
    return lines


def check_steps(run: Run, args: argparse.Namespace, sizes: dict[str, Any]) -> None:
    for autocast in (False, True) if args.autocast else (False,):
        label = "bf16 autocast eager" if autocast else "fp32 eager"
        run.row("steps", label, lambda autocast=autocast: steps_row(args, sizes, autocast))


def compiled_row(args: argparse.Namespace, sizes: dict[str, Any], label: str) -> dict[str, Any]:
    """One architecture compiled (as `compile_sae: true` does) against itself eager, fp32."""
    device = torch.device(args.device)
    _, arch, extra = next(row for row in STEP_ROWS if row[0] == label)
    generator = torch.Generator().manual_seed(0)
    batch = _step_input(arch, sizes, args.device, generator)
    eager = build_trainer(arch, extra, args.device, sizes, autocast=False)
    compiled = build_trainer(arch, extra, args.device, sizes, autocast=False)
    compiled.sae.training_forward_pass = torch.compile(
        compiled.sae.training_forward_pass, backend=args.compile_backend
    )
    start = time.perf_counter()
    _step(compiled, batch)
    _sync(device)
    compile_seconds = time.perf_counter() - start
    # A second warm-up step also passes any recompile.
    # Bound as defaults: ruff (F821) misreads a closure over names deleted below.
    medians = _interleaved_medians({"eager": lambda eager=eager: _step(eager, batch),
                                    "compiled": lambda compiled=compiled: _step(compiled, batch)},
                                   device, sizes["repeats"], warmup=1)
    del eager, compiled
    _free(device)
    return {"architecture": label, "autocast": False, "compile": True,
            "first_step_s": compile_seconds, "eager_ms": 1000 * medians["eager"],
            "median_ms": 1000 * medians["compiled"],
            "ratio_to_eager": medians["compiled"] / medians["eager"]}


def check_compiled(run: Run, args: argparse.Namespace, sizes: dict[str, Any]) -> None:
    for label in filter(None, args.compiled.split(",")):
        if run.seconds_left() < args.compile_min_s:
            run.skip("compiled", label, f"under {args.compile_min_s:.0f} s left")
            continue
        run.row("compiled", label, lambda label=label: compiled_row(args, sizes, label))


# --- 5. host syncs ------------------------------------------------------------------------------


def structural_syncs(
    arch: str, extra: dict[str, Any], sizes: dict[str, Any], device: str = "meta"
) -> list[str]:
    """Host synchronisations of one training step at steady state (the third: the first
    initialises state, the Zipf warm-up ends after it), counted on fake device tensors: no data,
    every size-from-data op raises. `meta` by default: on a CPU-only torch build fake `cuda`
    tensors cannot go through autograd. The batches are made before counting."""
    return structural_sync_sites(arch, extra, sizes, device)[0]


def structural_sync_sites(
    arch: str, extra: dict[str, Any], sizes: dict[str, Any], device: str = "meta"
) -> tuple[list[str], list[str]]:
    """`structural_syncs` with the file:line of each event."""
    with FakeTensorMode(allow_non_fake_inputs=True), HostSyncCounter() as counter:
        trainer = build_trainer(arch, extra, device, sizes, autocast=False)
        generator = torch.Generator().manual_seed(0)
        for _ in range(3):
            batch = _step_input(arch, sizes, device, generator)
            counter.events.clear()
            counter.where.clear()
            _step(trainer, batch)
    return counter.events, counter.where


def cuda_syncs(arch: str, extra: dict[str, Any], sizes: dict[str, Any], device: str) -> int:
    """Synchronisations of one steady-state training step (the third) as CUDA's sync debug mode
    reports them."""
    trainer = build_trainer(arch, extra, device, sizes, autocast=False)
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):
        _step(trainer, _step_input(arch, sizes, device, generator))
    batch = _step_input(arch, sizes, device, generator)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            _step(trainer, batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def syncs_row(args: argparse.Namespace, sizes: dict[str, Any], label: str) -> dict[str, Any]:
    _, arch, extra = next(row for row in STEP_ROWS if row[0] == label)
    # The structural count does not depend on sizes beyond the path taken (>= 65536 entries).
    fake_sizes = {**sizes, "n": max(sizes["n"], 256), "d_sae": max(sizes["d_sae"], 1024)}
    row: dict[str, Any] = {"architecture": label}
    try:
        events, where = structural_sync_sites(arch, extra, fake_sizes)
        row.update(structural=len(events), events=events, where=where)
    except RuntimeError as error:  # e.g. SAELens batchtopk enters autocast("meta")
        row.update(structural="n/a", events=f"{type(error).__name__}: {error}")
    if torch.device(args.device).type == "cuda":
        row["cuda_debug_mode"] = cuda_syncs(arch, extra, sizes, args.device)
    return row


def check_syncs(run: Run, args: argparse.Namespace, sizes: dict[str, Any]) -> None:
    for label, _, _ in STEP_ROWS:
        run.row("syncs", label, lambda label=label: syncs_row(args, sizes, label))


# --- 8. gradient store --------------------------------------------------------------------------


def check_store(args: argparse.Namespace, sizes: dict[str, Any]) -> dict[str, Any]:
    from datasets import Dataset
    from gradient_store import PRESETS, TimedGradientStore, TimedPlainStore, serve
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    preset = PRESETS[sizes["store"]]
    cfg = HookedTransformerConfig(**preset["model"], seed=0, device=args.device)
    model = HookedTransformer(cfg)
    model.eval()
    context, prompts = preset["context_size"], preset["prompts"]
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.d_vocab, (prompts * (sizes["store_batches"] + 4) * 4, context),
                           generator=generator)
    dataset = Dataset.from_dict({"input_ids": tokens.tolist()})
    rates = {}
    for name, cls in (("plain", TimedPlainStore), ("gradient", TimedGradientStore)):
        store = cls(
            model=model, dataset=dataset, streaming=False, hook_name=preset["hook_name"],
            hook_head_index=None, context_size=context, d_in=cfg.d_model,
            n_batches_in_buffer=2 * prompts, total_training_tokens=10**9,
            store_batch_size_prompts=prompts, train_batch_size_tokens=prompts * context,
            prepend_bos=False, normalize_activations="none", device=torch.device(args.device),
            dtype="float32",
        )
        rates[name] = serve(store, sizes["store_batches"])[0]
    return {
        "preset": sizes["store"], "hook": preset["hook_name"],
        "plain_tokens_per_s": rates["plain"], "gradient_tokens_per_s": rates["gradient"],
        "ratio_gradient_to_plain": rates["gradient"] / rates["plain"],
    }


# --- 7. embedded training -----------------------------------------------------------------------


def check_embedded(args: argparse.Namespace, sizes: dict[str, Any]) -> dict[str, Any]:
    from sae_lens_allocation.analysis.evaluation import evaluate_sae
    from sae_lens_allocation.demo import DEMO_CONFIG
    from sae_lens_allocation.training.runner import train
    from sae_lens_allocation.yaml_config import load_runner_config

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        sae_dir = Path(tmp) / "sae"
        overrides = [
            f"output_path={sae_dir}", f"checkpoint_path={Path(tmp) / 'checkpoints'}",
            f"device={args.device}", f"training_tokens={sizes['train_tokens']}",
        ]
        if args.small:
            overrides += ["sae.calibration_tokens=2048", "n_eval_batches=1"]
        cfg = load_runner_config(DEMO_CONFIG, overrides)
        start = time.perf_counter()
        trained = train(cfg)
        train_seconds = time.perf_counter() - start
        start = time.perf_counter()
        result = evaluate_sae(sae_dir, n_batches=sizes["eval_batches"], device=args.device)
        eval_seconds = time.perf_counter() - start
        export_cfg = json.loads((sae_dir / "cfg.json").read_text())
    return {
        "architecture": cfg.sae.architecture(), "training_tokens": cfg.training_tokens,
        "trained_on": str(trained.W_enc.device), "export_architecture": export_cfg["architecture"],
        "train_seconds": train_seconds, "tokens_per_s": cfg.training_tokens / train_seconds,
        "eval_seconds": eval_seconds, "summary": result["summary"],
    }


# --- report -------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    if isinstance(value, (list, dict)):  # the sync events: enough to see which, not all
        text = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
        return text if len(text) <= 80 else text[:77] + "..."
    return "" if value is None else str(value).replace("|", "/")


def _table(rows: list[dict[str, Any]]) -> list[str]:
    columns = list(dict.fromkeys(key for row in rows for key in row if key != "seconds"))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return lines


def markdown(report: dict[str, Any]) -> str:
    state = "finished" if report["finished"] else "not finished (yet, or cut off)"
    lines = [f"# gpu_check on {report['device']}", "",
             f"{report['failed']} failed rows, {report['seconds']:.0f} s of "
             f"{report['deadline_s']:.0f} s, {state}; sizes {report['sizes']}.", ""]
    for name, rows in report["sections"].items():
        lines += [f"## {name}", ""] + _table(rows) + [""]
    return "\n".join(lines)


SECTIONS = ("preflight", "exactness", "kernels", "steps", "syncs", "compiled", "embedded", "store")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sizes", choices=("full", "moderate", "small"), default="full")
    parser.add_argument("--no-autocast", dest="autocast", action="store_false",
                        help="time the steps in fp32 only")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--compile-backend", default="inductor", help="what compile_sae uses")
    parser.add_argument("--compiled", default=",".join(COMPILED_ROWS),
                        help="step rows also timed under torch.compile (comma-separated)")
    parser.add_argument("--compile-min-s", type=float, default=150.0,
                        help="compile a row only with this many seconds left")
    parser.add_argument("--deadline-s", type=float, default=480.0,
                        help="start no section or row past this many seconds")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    args.small = args.sizes == "small"
    sizes = {"full": FULL, "moderate": MODERATE, "small": SMALL}[args.sizes]
    run = Run(Path(args.out), args.deadline_s, {"device": args.device, "sizes": sizes})
    checks: dict[str, Callable[[], None]] = {
        "preflight": lambda: check_preflight(run, args),
        "exactness": lambda: check_exactness(run, args, sizes),
        "kernels": lambda: check_kernels(run, args, sizes),
        "steps": lambda: check_steps(run, args, sizes),
        "syncs": lambda: check_syncs(run, args, sizes),
        "compiled": lambda: check_compiled(run, args, sizes),
        "embedded": lambda: run.row("embedded", "mutual_choice", lambda: check_embedded(args, sizes)),
        "store": lambda: run.row("store", sizes["store"], lambda: check_store(args, sizes)),
    }
    for name in args.sections.split(","):
        if run.seconds_left() <= 0:
            run.skip(name, "all", "deadline")
            continue
        try:
            checks[name]()
        except Exception as error:  # a section's set-up (its imports, its inputs) failed
            run.row(name, "set-up", lambda error=error: {"error": _error(error)})
    run.report["finished"] = True
    run.save()
    print(markdown(run.report), flush=True)
    return run.report


if __name__ == "__main__":
    report = main()
    # Non-zero when a row failed or the package never imported: no silent pass.
    packages = [r for r in report["sections"].get("preflight", []) if r["row"] == "packages"]
    sys.exit(1 if report["failed"] or not packages or "error" in packages[0] else 0)
