"""Train the embedded language model and its tokenizer from the stdlib corpus.

    python -m sae_lens_allocation.embedded.train_model --out sae_lens_allocation/embedded/assets

Steps (all seeded by `--seed`):
1. a byte-level BPE tokenizer (`--vocab-size`, special token `<|endoftext|>` as BOS/EOS/PAD) is
   trained on the train split of `corpus.py`;
2. a HookedTransformer (`--n-layers`, `--d-model`, `--n-ctx`) is trained with AdamW (fp32
   weights, bf16 autocast unless `--no-bf16-autocast`, gradient norm clipped at 1) on rows
   `[BOS] + n_ctx - 1` tokens cut at uniformly random offsets of the train token stream; the
   learning rate warms up linearly for `--warmup-steps`, then follows a cosine down to 10%;
3. the weights are rounded to the shipped dtype, and the train loss, the held-out loss (every row of
   `corpus_dataset(tok, "heldout", n_ctx)`) and the unigram entropy of the train stream are
   recorded in `model.json` next to `model.safetensors` and the tokenizer files.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from sae_lens_allocation.embedded.corpus import corpus_dataset, corpus_files, read_source, token_stream
from sae_lens_allocation.embedded.model import (
    BOS_TOKEN,
    MODEL_RECORD_FILE,
    MODEL_WEIGHTS_FILE,
    WEIGHTS_DTYPE,
    load_tokenizer_from,
    mean_token_loss,
    new_hooked_transformer,
    tokens_sha256,
)

CHECK_ROWS = 16  # rows of the held-out check the tests recompute exactly


def train_tokenizer(vocab_size: int, out: Path) -> Any:
    """Byte-level BPE on the train split (GPT-2 pre-tokenisation), saved to `out`, reloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((read_source(p) for p in corpus_files("train")), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=BOS_TOKEN,
        pad_token=BOS_TOKEN,
        add_bos_token=True,
    )
    fast.save_pretrained(out)
    return load_tokenizer_from(out)


def model_config(args: argparse.Namespace, d_vocab: int) -> dict[str, Any]:
    """The HookedTransformerConfig fields of the embedded model."""
    return {
        "model_name": "embedded",
        "n_layers": args.n_layers,
        "d_model": args.d_model,
        "n_ctx": args.n_ctx,
        "d_head": args.d_head,
        "n_heads": args.d_model // args.d_head,
        "d_mlp": 4 * args.d_model,
        "d_vocab": d_vocab,
        "act_fn": "gelu",
        "normalization_type": "LN",
        "positional_embedding_type": "standard",
        "default_prepend_bos": True,
        "seed": args.seed,
    }


def unigram_entropy(stream: torch.Tensor, d_vocab: int) -> float:
    """H = -sum_t p(t) log p(t) over the stream's token frequencies (nats): the loss of the best
    context-free predictor, the baseline a trained model must beat."""
    p = torch.bincount(stream, minlength=d_vocab).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum())


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up to `lr`, then cosine from `lr` to 0.1 * `lr` at the last step."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def sample_rows(stream: torch.Tensor, batch: int, n_ctx: int, bos: int, gen: torch.Generator) -> torch.Tensor:
    """`batch` rows `[BOS] + n_ctx - 1` stream tokens at uniform random offsets."""
    starts = torch.randint(0, len(stream) - (n_ctx - 1), (batch,), generator=gen)
    body = torch.stack([stream[s : s + n_ctx - 1] for s in starts.tolist()])
    return torch.cat([torch.full((batch, 1), bos, dtype=torch.long), body], dim=1)


def train(args: argparse.Namespace) -> dict[str, Any]:
    from safetensors.torch import save_file
    from transformer_lens import HookedTransformerConfig

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    tokenizer = train_tokenizer(args.vocab_size, out)
    stream = torch.tensor(token_stream(tokenizer, "train"), dtype=torch.long)
    cfg_fields = model_config(args, len(tokenizer))
    print(f"tokenizer: {len(tokenizer)} tokens; train stream {len(stream)} tokens "
          f"({time.perf_counter() - t0:.0f}s)", flush=True)

    model = new_hooked_transformer(HookedTransformerConfig(**cfg_fields, device="cpu"), tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(args.seed)
    recent: list[float] = []
    t_train = time.perf_counter()
    model.train()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        tokens = sample_rows(stream, args.batch_size, args.n_ctx, tokenizer.bos_token_id, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16_autocast):
            loss = model(tokens, return_type="loss")
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss.item()} at step {step}; lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        recent = (recent + [loss.item()])[-args.log_every :]
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            rate = (step + 1) * args.batch_size * args.n_ctx / (time.perf_counter() - t_train)
            print(f"step {step + 1}/{args.steps} loss {sum(recent) / len(recent):.3f} "
                  f"lr {lr_at(step, args):.2e} {rate:.0f} tok/s", flush=True)
    train_seconds = time.perf_counter() - t_train

    # Record the losses of the weights as shipped (rounded to WEIGHTS_DTYPE).
    weights = {name: p.detach().to(WEIGHTS_DTYPE).contiguous() for name, p in model.named_parameters()}
    model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)
    model.eval()
    heldout = torch.tensor(corpus_dataset(tokenizer, "heldout", args.n_ctx)["tokens"])
    check = torch.tensor(corpus_dataset(tokenizer, "heldout", args.n_ctx, n_rows=CHECK_ROWS)["tokens"])
    train_eval = torch.tensor(corpus_dataset(tokenizer, "train", args.n_ctx, n_rows=len(heldout))["tokens"])
    save_file(weights, str(out / MODEL_WEIGHTS_FILE))
    record = {
        "config": cfg_fields,
        "training": {
            "command": "python -m sae_lens_allocation.embedded.train_model " + " ".join(args.argv),
            "seed": args.seed,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "warmup_steps": args.warmup_steps,
            "weight_decay": args.weight_decay,
            "threads": args.threads,
            "bf16_autocast": args.bf16_autocast,
            "tokens_seen": args.steps * args.batch_size * args.n_ctx,
            "train_stream_tokens": len(stream),
            "train_files": len(corpus_files("train")),
            "heldout_files": len(corpus_files("heldout")),
            "train_seconds": round(train_seconds, 1),
            "wall_seconds": round(time.perf_counter() - t0, 1),
            "python_version": platform.python_version(),
            "torch_version": torch.__version__,
            "weights_dtype": str(WEIGHTS_DTYPE).removeprefix("torch."),
        },
        "losses": {
            "final_train_loss_running": round(sum(recent) / len(recent), 4),
            "train_loss": round(mean_token_loss(model, train_eval), 4),
            "heldout_loss": round(mean_token_loss(model, heldout), 4),
            "heldout_tokens": heldout.numel(),
            "heldout_check_loss": round(mean_token_loss(model, check), 4),
            "heldout_check_rows": CHECK_ROWS,
            "heldout_check_tokens_sha256": tokens_sha256(check),
            "unigram_entropy": round(unigram_entropy(stream, len(tokenizer)), 4),
            "uniform_loss": round(math.log(len(tokenizer)), 4),
        },
    }
    (out / MODEL_RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["losses"], indent=2), flush=True)
    return record


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the tokenizer, weights and model.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--d-head", type=int, default=32)
    p.add_argument("--n-ctx", type=int, default=128)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.01)
    # One thread: on a shared 2-core box two threads spin at OpenMP barriers (measured 6x slower
    # per step under load); with the box to itself, --threads 2 is faster.
    p.add_argument("--threads", type=int, default=1)
    # bf16 matmuls (weights and optimizer stay fp32) halve the CPU time of a step.
    p.add_argument("--bf16-autocast", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--log-every", type=int, default=50)
    args = p.parse_args(argv)
    for name in ("vocab_size", "n_layers", "d_model", "d_head", "n_ctx", "steps", "batch_size", "threads", "log_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} is not allowed; use an int >= 1")
    if args.d_model % args.d_head:
        raise ValueError(f"--d-head={args.d_head} is not allowed; it must divide --d-model={args.d_model}")
    if args.n_ctx < 2:
        raise ValueError(f"--n-ctx={args.n_ctx} is not allowed; use an int >= 2")
    if not args.lr > 0:
        raise ValueError(f"--lr={args.lr} is not allowed; use a positive float")
    args.argv = list(argv)
    return args


def main(argv: Sequence[str] | None = None) -> None:
    train(parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
