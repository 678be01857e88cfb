"""One language-model pass for many SAEs: the multi runner, multi-hook gradients and the gradient
cache, against their one-at-a-time counterparts and SAELens' built-ins, in one run.

Printed (medians over --repeats, wall clock, embedded model, same data and seed throughout):

  1. training wall time of one multi run (4 SAEs: mutual_choice and topk_aux at H0,
     feature_choice and gradient_topk at H1) vs the 4 single runs of the same configs, and the
     same ratio for SAELens' built-in `topk` (4 SAEs, stock MultiSAETrainingRunner vs 4 stock
     LanguageModelSAETrainingRunner runs); runner construction included, model loading not;
  2. LM gradient pass for 2 hooks: one forward + one backward to the lower hook
     (`multi_hook_activation_gradients`) vs `activation_gradients` once per hook; SAELens'
     `run_with_cache` at both hooks (no gradient) for scale;
  3. training tokens/s of gradient_topk from the gradient cache vs live (gradient store), and of
     SAELens' `topk` live (stock store); the cache build time is printed separately.

    python benchmarks/multi_runner.py                   # sized for a shared 2-core CPU
    python benchmarks/multi_runner.py --training-tokens 65536 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import sae_lens_allocation  # noqa: E402,F401  (registers the architectures)
from sae_lens_allocation.training.gradient_cache import build_cache  # noqa: E402
from sae_lens_allocation.training.gradients import (  # noqa: E402
    activation_gradients,
    multi_hook_activation_gradients,
)
from sae_lens_allocation.training.multi_runner import build_multi_runner  # noqa: E402
from sae_lens_allocation.training.runner import build_runner  # noqa: E402
from sae_lens_allocation.training.sources import embedded_tokens, load_lm  # noqa: E402

H0, H1 = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"
ARMS = {"mc": ("mutual_choice", H0), "tka": ("topk_aux", H0),
        "fc": ("feature_choice", H1), "g": ("gradient_topk", H1)}


def median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def sae_section(arch: str, args: argparse.Namespace) -> dict[str, Any]:
    sae = {"architecture": arch, "d_in": 128, "d_sae": args.d_sae, "k": args.k}
    if arch in ("mutual_choice", "feature_choice"):
        sae["calibration_tokens"] = args.batch_tokens
    return sae


def runner_fields(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    return {
        "model_name": "embedded", "dataset_path": "embedded", "streaming": False,
        "context_size": args.context, "training_tokens": args.training_tokens,
        "train_batch_size_tokens": args.batch_tokens, "store_batch_size_prompts": args.prompts,
        "n_batches_in_buffer": 2 * args.batch_tokens // args.context, "seed": 0, "lr": 1e-3,
        "dead_feature_window": 50, "feature_sampling_window": 50, "checkpoint_path": None,
        "device": "cpu", "logger": {"log_to_wandb": False}, "output_path": str(out),
    }


def single_cfg(args: argparse.Namespace, out: Path, name: str, arch: str, hook: str, **extra: Any):
    return {**runner_fields(args, out / name), "sae": sae_section(arch, args), "hook_name": hook,
            "is_dataset_tokenized": True, **extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--training-tokens", type=int, default=16384)
    parser.add_argument("--batch-tokens", type=int, default=1024)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=16, help="prompts per LM batch")
    parser.add_argument("--d-sae", type=int, default=512)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner
    from sae_lens.multi_sae_training_runner import MultiSAETrainingRunner

    from sae_lens_allocation.training.multi_runner import multi_runner_config_from_dict

    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} torch thread(s); "
          f"load average at start {os.getloadavg()}")
    model = load_lm("embedded")
    extra_rows = 8 * args.batch_tokens + args.training_tokens  # stream refills + calibration
    dataset = embedded_tokens(model, "train", args.context, args.training_tokens + extra_rows, 0)
    work = Path(tempfile.mkdtemp(prefix="bench-multi-"))
    print(f"embedded model, context {args.context}, {args.training_tokens} training tokens in "
          f"batches of {args.batch_tokens}, d_sae {args.d_sae}, k {args.k}, "
          f"{args.prompts} prompts per LM batch; median of {args.repeats}")

    # 1. one multi run vs the 4 single runs
    multi = {**runner_fields(args, work / "multi"),
             "saes": {n: sae_section(a, args) for n, (a, _) in ARMS.items()},
             "hook_names": {n: h for n, (_, h) in ARMS.items()}}
    t_multi, _ = median_time(lambda: build_multi_runner(multi, model, dataset).run(), args.repeats)

    def singles() -> None:
        for name, (arch, hook) in ARMS.items():
            build_runner(single_cfg(args, work / "single", name, arch, hook),
                         override_model=model, override_dataset=dataset).run()

    t_singles, _ = median_time(singles, args.repeats)

    def stock_multi() -> None:
        cfg = multi_runner_config_from_dict({
            **runner_fields(args, work / "stock-multi"),
            "saes": {n: sae_section("topk", args) for n in ARMS},
            "hook_names": {n: h for n, (_, h) in ARMS.items()}})
        MultiSAETrainingRunner(cfg, override_dataset=dataset, override_model=model).run()

    def stock_singles() -> None:
        for name, (_, hook) in ARMS.items():
            d = single_cfg(args, work / "stock-single", name, "topk", hook)
            LanguageModelSAETrainingRunner(LanguageModelSAERunnerConfig.from_dict(d),
                                           override_dataset=dataset, override_model=model).run()

    t_stock_multi, _ = median_time(stock_multi, args.repeats)
    t_stock_singles, _ = median_time(stock_singles, args.repeats)
    print("\n1. training wall time, 4 SAEs at 2 hooks (s)")
    print(f"   plugin (mc, topk_aux @H0; fc, gradient_topk @H1): multi {t_multi:.2f}  "
          f"4 singles {t_singles:.2f}  singles/multi {t_singles / t_multi:.2f}x")
    print(f"   SAELens topk x4 (stock runners):                  multi {t_stock_multi:.2f}  "
          f"4 singles {t_stock_singles:.2f}  singles/multi {t_stock_singles / t_stock_multi:.2f}x")

    # 2. one backward for 2 hooks vs two
    column = "tokens" if "tokens" in dataset.column_names else "input_ids"
    tokens = torch.as_tensor(dataset[: args.prompts][column])
    reps = 5 * args.repeats
    t_one, _ = median_time(lambda: multi_hook_activation_gradients(model, tokens, [H0, H1]), reps)
    t_two, _ = median_time(lambda: [activation_gradients(model, tokens, h) for h in (H0, H1)], reps)
    with torch.no_grad():
        t_cache, _ = median_time(lambda: model.run_with_cache(tokens, names_filter=[H0, H1]), reps)
    print(f"\n2. LM pass with gradients at {H0} and {H1}, {tokens.numel()} tokens (ms, median of {reps})")
    print(f"   one forward + one backward: {1e3 * t_one:.1f}   one per hook: {1e3 * t_two:.1f}   "
          f"per-hook/one {t_two / t_one:.2f}x   (SAELens run_with_cache, no gradient: "
          f"{1e3 * t_cache:.1f}; one/run_with_cache {t_one / t_cache:.2f}x)")

    # 3. gradient_topk from the cache vs live
    cache_dir = work / "cache"
    cache_tokens = args.training_tokens + 4 * args.batch_tokens
    start = time.perf_counter()
    build_cache({"model_name": "embedded", "dataset_path": "embedded", "hook_name": H1, "d_in": 128,
                 "context_size": args.context, "training_tokens": cache_tokens,
                 "model_batch_size": args.prompts, "shuffle": False, "device": "cpu",
                 "buffer_size_gb": cache_tokens * 128 * 4 / 1e9,
                 "new_cached_activations_path": str(cache_dir)},
                override_model=model, override_dataset=dataset)
    t_build = time.perf_counter() - start

    def train(cfg: dict[str, Any]) -> None:
        build_runner(cfg, override_model=model, override_dataset=dataset).run()

    g = sae_section("gradient_topk", args)
    live_cfg = single_cfg(args, work / "g-live", "g", "gradient_topk", H1)
    cached_cfg = single_cfg(args, work / "g-cached", "g", "gradient_topk", H1,
                            use_cached_activations=True, cached_activations_path=str(cache_dir))
    topk_cfg = single_cfg(args, work / "topk-live", "topk", "topk", H1)
    assert live_cfg["sae"] == cached_cfg["sae"] == g
    t_live, _ = median_time(lambda: train(live_cfg), args.repeats)
    t_cached, _ = median_time(lambda: train(cached_cfg), args.repeats)
    t_topk, _ = median_time(lambda: train(topk_cfg), args.repeats)
    n = args.training_tokens
    print(f"\n3. training tokens/s at {H1} (runner construction included)")
    print(f"   gradient_topk from the cache {n / t_cached:,.0f}   live {n / t_live:,.0f}   "
          f"cache/live {t_live / t_cached:.2f}x   (SAELens topk live: {n / t_topk:,.0f}; "
          f"cached gradient_topk/topk {t_topk / t_cached:.2f}x)")
    print(f"   cache build: {t_build:.2f} s for {cache_tokens} tokens with gradients")
    print(f"\nload average at end {os.getloadavg()}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
