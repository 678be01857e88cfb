"""Throughput of GradientActivationsStore against SAELens' ActivationsStore, same model and hook.

Both stores read the same pretokenized rows and serve training batches through SAELens'
`mixing_buffer`; the plain store runs the model under no_grad up to the hook layer, the gradient
store runs it to the logits and back-propagates to the hook. Printed:

  tokens/s of each store (training rows served per second after the first buffer fill) and
  the ratio gradient / plain;
  the gradient store's time per LLM batch, measured in the store run, split into the producer
  (`get_raw_llm_batch`) and buffering (SAELens' mixing buffer: concatenation, shuffle,
  special-token filtering); the producer time is split into forward (to the logits and the
  summed cross-entropy) and backward (to the hook) in the ratio of the two timed alone on the
  same token batch (token fetch and the row concatenation, a few percent, go in with them).

The model has random weights (no model hub): `--preset gpt2` has GPT-2 small's shapes
(12 layers, d_model 768, vocab 50257) with the hook at blocks.7.hook_resid_pre, the g-SAE paper's
setting; `--preset tiny` is the test model's shape.

    python benchmarks/gradient_store.py --preset gpt2
    python benchmarks/gradient_store.py --preset tiny
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from sae_lens.training.activations_store import ActivationsStore  # noqa: E402
from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: E402

from sae_lens_allocation.training.gradients import (  # noqa: E402
    GradientActivationsStore,
    activation_gradients,
    loss_at_hook,
)

PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": dict(
        model=dict(
            n_layers=12, d_model=768, d_head=64, n_heads=12, d_mlp=3072, d_vocab=50257,
            n_ctx=1024, act_fn="gelu_new", normalization_type="LN",
        ),
        hook_name="blocks.7.hook_resid_pre",
        context_size=128,
        prompts=4,
    ),
    "tiny": dict(
        model=dict(
            n_layers=2, d_model=32, d_head=8, n_heads=4, d_mlp=128, d_vocab=512, n_ctx=32,
            act_fn="gelu", normalization_type="LN",
        ),
        hook_name="blocks.0.hook_resid_post",
        context_size=32,
        prompts=8,
    ),
}


class TimedStore:
    """Mixin timing the per-batch producer (`get_raw_llm_batch`) of a store."""

    producer_seconds: float = 0.0
    producer_calls: int = 0

    def get_raw_llm_batch(self, raise_on_epoch_end: bool = False):
        start = time.perf_counter()
        out = super().get_raw_llm_batch(raise_on_epoch_end)  # type: ignore[misc]
        self.producer_seconds += time.perf_counter() - start
        self.producer_calls += 1
        return out


class TimedPlainStore(TimedStore, ActivationsStore):
    pass


class TimedGradientStore(TimedStore, GradientActivationsStore):
    pass


def make_store(cls: type, model: Any, dataset: Dataset, preset: dict[str, Any], args: Any) -> Any:
    context = preset["context_size"]
    prompts = args.prompts or preset["prompts"]
    return cls(
        model=model, dataset=dataset, streaming=False, hook_name=preset["hook_name"],
        hook_head_index=None, context_size=context, d_in=model.cfg.d_model,
        n_batches_in_buffer=args.buffer_batches * prompts, total_training_tokens=10**9,
        store_batch_size_prompts=prompts, train_batch_size_tokens=prompts * context,
        prepend_bos=False, normalize_activations="none", device=torch.device("cpu"),
        dtype="float32",
    )


def serve(store: Any, n_batches: int) -> tuple[float, float, float, int]:
    """Serve one batch (fills the buffer), then time `n_batches` more. Returns (tokens/s,
    seconds, producer seconds, producer calls), the last three over the timed window."""
    next(store)
    producer_before, calls_before = store.producer_seconds, store.producer_calls
    start = time.perf_counter()
    n_rows = sum(next(store).shape[0] for _ in range(n_batches))
    elapsed = time.perf_counter() - start
    producer_seconds = store.producer_seconds - producer_before
    return n_rows / elapsed, elapsed, producer_seconds, store.producer_calls - calls_before


def median_seconds(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpt2")
    parser.add_argument("--prompts", type=int, default=0, help="prompts per LLM batch (0: preset)")
    parser.add_argument("--buffer-batches", type=int, default=2,
                        help="LLM batches the shuffle buffer holds")
    parser.add_argument("--batches", type=int, default=6, help="training batches timed per store")
    parser.add_argument(
        "--repeats", type=int, default=3, help="repeats of the forward/backward timing"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]

    cfg = HookedTransformerConfig(**preset["model"], seed=0, device="cpu")
    model = HookedTransformer(cfg)
    model.eval()
    context, prompts = preset["context_size"], args.prompts or preset["prompts"]
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, cfg.d_vocab, (prompts * (4 * args.batches + 16), context), generator=g)
    dataset = Dataset.from_dict({"tokens": rows.tolist()})

    plain_store = make_store(TimedPlainStore, model, dataset, preset, args)
    plain_tps, _, _, _ = serve(plain_store, args.batches)
    grad_tps, grad_seconds, producer_s, producer_calls = serve(
        make_store(TimedGradientStore, model, dataset, preset, args), args.batches
    )

    tokens = rows[:prompts]
    hook = preset["hook_name"]
    forward = median_seconds(lambda: loss_at_hook(model, tokens, hook), args.repeats)
    both = median_seconds(lambda: activation_gradients(model, tokens, hook), args.repeats)
    backward = both - forward
    per_batch = grad_seconds / producer_calls
    producer = producer_s / producer_calls
    buffering = per_batch - producer

    print(f"preset {args.preset}: hook {hook}, LLM batch {prompts} x {context} tokens, "
          f"{args.threads} CPU thread(s), torch {torch.__version__}")
    print(f"plain ActivationsStore      {plain_tps:10.0f} tokens/s")
    print(f"GradientActivationsStore    {grad_tps:10.0f} tokens/s")
    print(f"ratio gradient / plain      {grad_tps / plain_tps:10.3f}  "
          f"(gradient store is {plain_tps / grad_tps:.2f}x slower)")
    print(f"gradient store time per LLM batch: {per_batch * 1e3:.1f} ms "
          f"(forward {forward * 1e3:.1f} ms, backward {backward * 1e3:.1f} ms timed alone)")
    for name, seconds in (
        ("forward to logits + CE", producer * forward / both),
        ("backward to the hook", producer * backward / both),
        ("buffering (mix/shuffle)", buffering),
    ):
        print(f"  {name:26s} {seconds * 1e3:9.1f} ms  {100 * seconds / per_batch:5.1f}%")


if __name__ == "__main__":
    main()
