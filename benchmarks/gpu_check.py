"""One device check: kernels, training steps, host syncs, gradient store, embedded training.

On one GPU with no model hub (`make gpu-check`, under 8 minutes at full size), it measures:

1. kernels: `mutual_choice` against SAELens' BatchTopK operator (relu, one `torch.topk` over the
   flattened batch, scatter) and `feature_choice` against `torch.topk` down the batch, fp32 and
   bf16, N 4096 x F 24576, k 32; medians of interleaved repeats, kept values checked equal;
2. training steps: SAELens' `SAETrainer.step` of every plugin architecture and of SAELens `topk`
   and `batchtopk` (d_in 768, d_sae 24576, k 32, 4096 tokens), fp32 and bf16 autocast, eager and
   `torch.compile` (as `compile_sae: true` does); medians, ratio to `topk` in the same setting;
3. host syncs per training step: counted at the ATen level on a fake device (`HostSyncCounter`,
   the structural count) and, on CUDA, as CUDA's sync debug mode reports them;
4. the gradient store against SAELens' ActivationsStore, GPT-2 small shapes, random weights;
5. a short Mutual Choice training on the embedded model, its calibrated export and its eval.

It writes `<out>/gpu_check.json` and `<out>/gpu_check.md`. `--device cpu --small` runs the same
sections at reduced sizes (the test suite does, to keep the script working without a GPU).
Sections past `--budget-s` are skipped and say so.

    python benchmarks/gpu_check.py --out benchmarks/results
    python benchmarks/gpu_check.py --device cpu --small --out /tmp/gpu-check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
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
    ("gradient_topk", "gradient_topk", {}),
]
# Compiling costs about a minute per row on a GPU: the plugin's allocation SAEs and the baseline.
COMPILED_ROWS = ("topk", "mutual_choice", "feature_choice")

FULL = dict(n=4096, d_in=768, d_sae=24576, k=32, repeats=7, store="gpt2", store_batches=6,
            train_tokens=1_000_000, eval_batches=8)
# A moderate CPU shape: compiled against eager steps without a GPU (`--sizes moderate`).
MODERATE = dict(n=1024, d_in=256, d_sae=4096, k=16, repeats=5, store="tiny", store_batches=2,
                train_tokens=16384, eval_batches=2)
SMALL = dict(n=256, d_in=32, d_sae=512, k=8, repeats=1, store="tiny", store_batches=1,
             train_tokens=4096, eval_batches=1)


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
    device data (nonzero, masked_select, unique, bincount, boolean indexing, equal) and a copy
    from a device to the host. Tensors on the CPU are not counted.

    Under FakeTensorMode nothing has a value; a host read then returns `answer(tensor)` (default
    `default_answer`), and the size-from-data ops raise in FakeTensorMode itself, so a run that
    completes there has exactly `len(events)` synchronisations by construction."""

    def __init__(self, answer: Callable[[torch.Tensor], Any] | None = default_answer) -> None:
        super().__init__()
        self.answer = answer
        self.events: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        on_device = bool(tensors) and tensors[0].device.type != "cpu"
        if func is aten._local_scalar_dense.default:
            if on_device:
                self.events.append("host read")
            if self.answer is not None and isinstance(args[0], FakeTensor):
                return self.answer(args[0])
        elif func in _SIZE_FROM_DATA and on_device:
            self.events.append(str(func.overloadpacket.__name__))
        elif func in _INDEXING and on_device:
            indices = args[1] if len(args) > 1 else ()
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ()):
                self.events.append("boolean indexing")
        elif func is aten._to_copy.default and on_device:
            if torch.device(kwargs.get("device") or tensors[0].device).type == "cpu":
                self.events.append("copy to host")
        elif func is aten.copy_.default and len(tensors) == 2:
            if tensors[0].device.type == "cpu" and tensors[1].device.type != "cpu":
                self.events.append("copy to host")
        return func(*args, **kwargs)


# --- shared helpers -----------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _interleaved_medians(
    fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int, warmup: int = 1
) -> dict[str, float]:
    """Median seconds of each function; every repeat runs all of them in turn, so drift in the
    machine's load hits them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(warmup + repeats):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            if rep >= warmup:
                times[name].append(time.perf_counter() - start)
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
    return info


# --- 1. kernels ---------------------------------------------------------------------------------


def _batchtopk(z: torch.Tensor, k: float) -> torch.Tensor:
    from sae_lens.saes.batchtopk_sae import BatchTopK

    return BatchTopK(k)(z)


def _topk_down_the_batch(z: torch.Tensor, caps: torch.Tensor) -> torch.Tensor:
    """Feature Choice with `torch.topk` down the batch, then relu."""
    values, indices = torch.topk(z, int(caps.max()), dim=0)
    keep = torch.arange(values.shape[0], device=z.device)[:, None] < caps[None, :]
    return torch.zeros_like(z).scatter(0, indices, values.relu() * keep)


def _same_kept_values(a: torch.Tensor, b: torch.Tensor, per_latent: bool) -> bool:
    """Same multiset of kept values, over the batch (Mutual Choice) or per latent column (Feature
    Choice): among entries tied at the cut-off the two may keep different ones."""
    if per_latent:
        return bool(torch.equal(a.t().sort(dim=1).values, b.t().sort(dim=1).values))
    return bool(torch.equal(a.flatten().sort().values, b.flatten().sort().values))


def check_kernels(args: argparse.Namespace, sizes: dict[str, Any]) -> list[dict[str, Any]]:
    from sae_lens_allocation.allocation import feature_choice, mutual_choice, uniform_capacities

    device = torch.device(args.device)
    n, f, k = sizes["n"], sizes["d_sae"], sizes["k"]
    rows = []
    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        z = torch.randn(n, f, generator=generator).to(device=device, dtype=dtype)
        host_caps = uniform_capacities(n, f, k, torch.Generator().manual_seed(1))
        caps = host_caps.to(device)
        # z is bound as a default: ruff (F821) misreads a closure over a name deleted below.
        medians = _interleaved_medians(
            {
                "batchtopk": lambda z=z: _batchtopk(z, k),
                "mutual_choice": lambda z=z: mutual_choice(z, k).codes,
                "topk_down_the_batch": lambda z=z: _topk_down_the_batch(z, caps),
                "feature_choice": lambda z=z: feature_choice(z, host_caps).codes,
            },
            device,
            sizes["repeats"],
        )
        rows.append({
            "dtype": str(dtype).removeprefix("torch."), "n": n, "d_sae": f, "k": k,
            **{f"{name}_ms": 1000 * seconds for name, seconds in medians.items()},
            "mutual_choice_speedup": medians["batchtopk"] / medians["mutual_choice"],
            "feature_choice_speedup": medians["topk_down_the_batch"] / medians["feature_choice"],
            "mutual_choice_exact": _same_kept_values(
                mutual_choice(z, k).codes, _batchtopk(z, k), per_latent=False
            ),
            "feature_choice_exact": _same_kept_values(
                feature_choice(z, host_caps).codes, _topk_down_the_batch(z, caps), per_latent=True
            ),
        })
        del z
    return rows


# --- 2. training steps --------------------------------------------------------------------------


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


def check_steps(
    args: argparse.Namespace, sizes: dict[str, Any], deadline: float
) -> list[dict[str, Any]]:
    device = torch.device(args.device)
    rows = []
    autocasts = (False, True) if args.autocast else (False,)
    settings = [(autocast, compiled) for compiled in (False, True) for autocast in autocasts]
    eager: dict[tuple[str, bool], float] = {}
    for autocast, compiled in settings:
        compiled_rows = args.compiled.split(",")
        labels = [label for label, _, _ in STEP_ROWS if not compiled or label in compiled_rows]
        setting = {"autocast": autocast, "compile": compiled}
        if time.perf_counter() > deadline:
            rows.extend({**setting, "architecture": label, "skipped": "time budget"} for label in labels)
            continue
        generator = torch.Generator().manual_seed(0)
        trainers, batches = {}, {}
        for label, arch, extra in STEP_ROWS:
            if label not in labels:
                continue
            trainer = build_trainer(arch, extra, args.device, sizes, autocast)
            if compiled:
                sae = trainer.sae
                sae.training_forward_pass = torch.compile(
                    sae.training_forward_pass, backend=args.compile_backend
                )
            trainers[label] = trainer
            batches[label] = _step_input(arch, sizes, args.device, generator)
        fns = {label: (lambda t=t, b=batches[label]: _step(t, b)) for label, t in trainers.items()}
        # Compiled rows compile in their first steps; two warm-up steps also pass any recompile.
        medians = _interleaved_medians(fns, device, sizes["repeats"], warmup=2 if compiled else 1)
        base = medians.get("topk")
        for label in labels:
            if not compiled:
                eager[label, autocast] = medians[label]
            rows.append({
                **setting, "architecture": label, "median_ms": 1000 * medians[label],
                "ratio_to_topk": medians[label] / base if base else None,
                "ratio_to_eager": medians[label] / eager[label, autocast] if compiled else None,
            })
        del trainers, batches, fns
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# --- 3. host syncs ------------------------------------------------------------------------------


def structural_syncs(
    arch: str, extra: dict[str, Any], sizes: dict[str, Any], device: str = "meta"
) -> list[str]:
    """Host synchronisations of one training step (the second; the first may initialise state),
    counted on fake device tensors: no data, every size-from-data op raises. `meta` by default:
    on a CPU-only torch build fake `cuda` tensors cannot go through autograd."""
    with FakeTensorMode(allow_non_fake_inputs=True), HostSyncCounter() as counter:
        trainer = build_trainer(arch, extra, device, sizes, autocast=False)
        generator = torch.Generator().manual_seed(0)
        _step(trainer, _step_input(arch, sizes, device, generator))
        counter.events.clear()
        _step(trainer, _step_input(arch, sizes, device, generator))
    return counter.events


def cuda_syncs(arch: str, extra: dict[str, Any], sizes: dict[str, Any], device: str) -> int:
    """Synchronisations of one training step as CUDA's sync debug mode reports them."""
    trainer = build_trainer(arch, extra, device, sizes, autocast=False)
    generator = torch.Generator().manual_seed(0)
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


def check_syncs(args: argparse.Namespace, sizes: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    # The structural count does not depend on sizes beyond the path taken (>= 65536 entries).
    fake_sizes = {**sizes, "n": max(sizes["n"], 256), "d_sae": max(sizes["d_sae"], 1024)}
    for label, arch, extra in STEP_ROWS:
        row: dict[str, Any] = {"architecture": label}
        try:
            events = structural_syncs(arch, extra, fake_sizes)
            row.update(structural=len(events), events=events)
        except RuntimeError as error:  # e.g. SAELens batchtopk enters autocast("meta")
            row.update(structural="n/a", events=f"{type(error).__name__}: {error}")
        if torch.device(args.device).type == "cuda":
            row["cuda_debug_mode"] = cuda_syncs(arch, extra, sizes, args.device)
        rows.append(row)
    return rows


# --- 4. gradient store --------------------------------------------------------------------------


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


# --- 5. embedded training -----------------------------------------------------------------------


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
    return str(value)


def _table(rows: list[dict[str, Any]], columns: list[str]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    return lines


def markdown(report: dict[str, Any]) -> str:
    machine = report["machine"]
    lines = [f"# gpu_check on {machine.get('gpu', machine['device'])}", "",
             f"torch {machine['torch']}, sizes: {report['sizes']}, load average at the start "
             f"{machine.get('load_average')}, total {report['seconds']:.0f} s.", ""]
    sections = report["sections"]
    if "kernels" in sections:
        lines += ["## Kernels (median ms; speed-up = reference / kernel)", ""]
        lines += _table(sections["kernels"], [
            "dtype", "batchtopk_ms", "mutual_choice_ms", "mutual_choice_speedup",
            "topk_down_the_batch_ms", "feature_choice_ms", "feature_choice_speedup",
            "mutual_choice_exact", "feature_choice_exact"]) + [""]
    if "steps" in sections:
        lines += ["## Training step (median ms; ratio to topk in the same setting)", ""]
        lines += _table(sections["steps"], [
            "architecture", "autocast", "compile", "median_ms", "ratio_to_topk",
            "ratio_to_eager", "skipped"]) + [""]
    if "syncs" in sections:
        lines += ["## Host synchronisations per training step", ""]
        lines += _table(sections["syncs"], [
            "architecture", "structural", "cuda_debug_mode", "events"]) + [""]
    if "store" in sections:
        lines += ["## Gradient store (random weights)", ""]
        lines += _table([sections["store"]], [
            "preset", "hook", "plain_tokens_per_s", "gradient_tokens_per_s",
            "ratio_gradient_to_plain"]) + [""]
    if "embedded" in sections:
        emb = sections["embedded"]
        lines += ["## Embedded-model training, export and eval", "",
                  f"{emb['architecture']} on {emb['trained_on']}, {emb['training_tokens']} tokens "
                  f"in {emb['train_seconds']:.1f} s ({emb['tokens_per_s']:.0f} tokens/s); export "
                  f"`{emb['export_architecture']}`; eval {emb['eval_seconds']:.1f} s: "
                  f"{emb['summary']}", ""]
    for name, error in report.get("errors", {}).items():
        lines += [f"**{name} failed**: `{error}`", ""]
    return "\n".join(lines)


SECTIONS = ("kernels", "steps", "syncs", "store", "embedded")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="reduced sizes (CPU, tests)")
    parser.add_argument("--sizes", choices=("full", "moderate", "small"), default=None,
                        help="size preset (default full; --small means small)")
    parser.add_argument("--no-autocast", dest="autocast", action="store_false",
                        help="time the steps in fp32 only")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--compile-backend", default="inductor", help="what compile_sae uses")
    parser.add_argument("--compiled", default=",".join(COMPILED_ROWS),
                        help="step rows also timed under torch.compile (comma-separated)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="skip the steps still to run past this many seconds")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    args.small = args.small or args.sizes == "small"
    sizes = {"full": FULL, "moderate": MODERATE, "small": SMALL}[
        args.sizes or ("small" if args.small else "full")
    ]
    device = torch.device(args.device)
    start = time.perf_counter()
    deadline = start + args.budget_s
    report: dict[str, Any] = {"machine": _machine(device), "sizes": sizes, "sections": {},
                              "errors": {}}
    checks: dict[str, Callable[[], Any]] = {
        "kernels": lambda: check_kernels(args, sizes),
        "steps": lambda: check_steps(args, sizes, deadline),
        "syncs": lambda: check_syncs(args, sizes),
        "store": lambda: check_store(args, sizes),
        "embedded": lambda: check_embedded(args, sizes),
    }
    for name in args.sections.split(","):
        section_start = time.perf_counter()
        print(f"[gpu_check] {name}", flush=True)
        try:
            report["sections"][name] = checks[name]()
        except Exception as error:  # a failing section must not hide the others' figures
            report["errors"][name] = f"{type(error).__name__}: {error}"
        report.setdefault("section_seconds", {})[name] = time.perf_counter() - section_start
    report["seconds"] = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report), flush=True)
    return report


if __name__ == "__main__":
    main()
