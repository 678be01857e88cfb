"""Command-line tool `sae-lens-allocation` (also `python -m sae_lens_allocation`).

Exit codes: 0 success; 2 a user mistake (missing or broken file, bad YAML, unknown architecture
or key, invalid field, flag or data), printed as one line on stderr with no traceback; 130 / 143
training stopped by SIGINT / SIGTERM after writing a checkpoint (one line says where); 1 a bug,
with its traceback, or, as one line, a failure outside the user's input: `fetch-assets` could not
download or verify d3, or a data-parallel `train` lost another rank (docs/cli.md).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from sae_lens_allocation.validation import UsageError, one_line

PROG = "sae-lens-allocation"


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (its default prints the usage block first)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed; use an integer >= 1")
    return value


def _cmd_train(args: argparse.Namespace) -> int:
    from sae_lens_allocation.training import distributed
    from sae_lens_allocation.training.runner import train
    from sae_lens_allocation.yaml_config import load_runner_config, read_yaml

    if "saes" in read_yaml(args.config):
        if distributed.launched_by_torchrun():
            # Checked on every rank before anything trains: otherwise each rank would train all
            # the SAEs alone and write the same output paths.
            raise UsageError(
                "a multi-SAE config (saes:) cannot be trained under torchrun: data parallel trains "
                "one SAE (sae:) per run; train this config in one process"
            )
        return _cmd_train_multi(args)
    cfg = load_runner_config(args.config, args.set)
    if not distributed.launched_by_torchrun():
        train(cfg)
    else:
        # `torchrun --nproc-per-node W -m sae_lens_allocation train ...`: data parallel
        # (docs/distributed.md); rank 0 writes the export.
        try:
            distributed.train_data_parallel(cfg)
        except distributed.DataParallelError as err:
            print(f"{PROG}: error: {err}", file=sys.stderr)
            return 1
        if distributed.process_rank() != 0:
            return 0
    if cfg.output_path is not None:
        print(f"exported SAE: {Path(cfg.output_path).resolve()}")
    return 0


def _cmd_train_multi(args: argparse.Namespace) -> int:
    from sae_lens_allocation.training.multi_runner import export_dirs, train_multi
    from sae_lens_allocation.yaml_config import load_train_config

    cfg = load_train_config(args.config, args.set)
    train_multi(cfg)
    for name, path in export_dirs(cfg).items():
        print(f"exported SAE {name}: {path.resolve()}")
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    from sae_lens_allocation.training.gradient_cache import build_cache, cache_config_from_dict
    from sae_lens_allocation.yaml_config import ConfigError, apply_overrides, read_yaml

    try:
        cfg, gradients = cache_config_from_dict(apply_overrides(read_yaml(args.config), args.set))
    except (ValueError, TypeError) as err:
        raise ConfigError(one_line(err)) from None
    dataset = build_cache(cfg, gradients=gradients)
    print(f"cached {len(dataset)} sequences of {cfg.context_size} tokens "
          f"({'activations and gradients' if gradients else 'activations'}): "
          f"{Path(str(cfg.new_cached_activations_path)).resolve()}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    from sae_lens_allocation.analysis.evaluation import check_eval_arguments, evaluate_sae, format_table

    sae_dir = Path(args.sae_dir)
    out = Path(args.out) if args.out else sae_dir / "eval.json"
    check_eval_arguments(sae_dir, out)
    result = evaluate_sae(sae_dir, model=args.model, n_batches=args.n_batches,
                          batch_size_prompts=args.batch_size_prompts, device=args.device)
    out.write_text(json.dumps(result, indent=2))
    print(format_table(result))
    print(f"evaluation written to {out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from sae_lens_allocation.demo import run_demo

    run_demo(args.out, args.set, fetch_d3=True)
    return 0


def add_dashboard_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `dashboard` command's arguments (matching `make_dashboard`) to `parser`."""
    from sae_lens_allocation.analysis.dashboard import (
        DEFAULT_MINIBATCH_SIZE_FEATURES,
        DEFAULT_MINIBATCH_SIZE_TOKENS,
        DEFAULT_N_TOKENS,
        DEFAULT_OUT,
    )

    parser.add_argument("sae_dir", help="exported SAE folder (or a SAELens SAE folder)")
    parser.add_argument(
        "--model",
        default="embedded",
        help="'embedded' (default: the shipped model) or a TransformerLens model name",
    )
    parser.add_argument(
        "--features",
        type=int,
        nargs="+",
        metavar="J",
        help="latents to show (default: the most active, a random sample and the rarest)",
    )
    parser.add_argument("--n-tokens", type=_positive_int, default=DEFAULT_N_TOKENS,
                        help="tokens to compute on (default %(default)s)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="output folder (default %(default)s)")
    parser.add_argument(
        "--dataset",
        help="save_to_disk folder or dataset name with tokens/input_ids or text "
        "(default: the local corpus' held-out split)",
    )
    parser.add_argument("--context-size", type=_positive_int, help="tokens per row (default: the SAE's, else 128)")
    parser.add_argument(
        "--minibatch-size-tokens",
        type=_positive_int,
        default=DEFAULT_MINIBATCH_SIZE_TOKENS,
        help="token rows per forward pass (default %(default)s)",
    )
    parser.add_argument(
        "--minibatch-size-features",
        type=_positive_int,
        default=DEFAULT_MINIBATCH_SIZE_FEATURES,
        help="features per sae-dashboard pass (default %(default)s)",
    )
    parser.add_argument("--no-neuronpedia", action="store_true", help="do not write the Neuronpedia JSON")
    parser.add_argument("--seed", type=int, default=0, help="seed for the token rows and the random features")
    parser.add_argument("--device", default="cpu", help="torch device (default %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress messages")
    return parser


def _cmd_dashboard(args: argparse.Namespace) -> int:
    """Run `make_dashboard` and print the written paths. User errors (missing folder, wrong
    architecture, model or features, the `dashboard` extra not installed) raise `UsageError` or
    `FileNotFoundError` for `main` to report; the SAE and `--features` are checked before the
    model loads."""
    from sae_lens_allocation.analysis.dashboard import make_dashboard

    result = make_dashboard(
        args.sae_dir,
        model=args.model,
        features=args.features,
        n_tokens=args.n_tokens,
        out=args.out,
        dataset=args.dataset,
        minibatch_size_tokens=args.minibatch_size_tokens,
        minibatch_size_features=args.minibatch_size_features,
        context_size=args.context_size,
        neuronpedia=not args.no_neuronpedia,
        progress=not args.quiet,
        seed=args.seed,
        device=args.device,
    )
    print(f"dashboard: {result.html.resolve()}")
    if result.neuronpedia is not None:
        print(f"neuronpedia json: {result.neuronpedia.resolve()}")
    return 0


# ---- init and fetch-assets: what a pip install needs beside the package code ----------------

CONFIGS_DIR = Path(__file__).parent / "configs"


def packaged_configs() -> list[str]:
    """Names of the configs shipped in `sae_lens_allocation/configs/` (file names without .yaml)."""
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))


def _cmd_init(args: argparse.Namespace) -> int:
    names = packaged_configs()
    if args.name is None:
        print("\n".join(names))
        return 0
    if args.name not in names:
        raise UsageError(f"no packaged config {args.name!r}; choose one of: {', '.join(names)}")
    target = Path(args.dir) / f"{args.name}.yaml"
    if target.exists() and not args.force:
        raise UsageError(f"{target} exists; pass --force to overwrite it")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text((CONFIGS_DIR / f"{args.name}.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    print(f"wrote {target}")
    return 0


def _cmd_fetch_assets(args: argparse.Namespace) -> int:
    from sae_lens_allocation.analysis.dashboard_assets import D3_TARBALL_URL, fetch_d3

    try:
        path = fetch_d3()
    except OSError as err:
        print(f"{PROG}: error: could not fetch d3 from {D3_TARBALL_URL}: {err}", file=sys.stderr)
        return 1
    print(f"d3 (checksum verified): {path}")
    return 0


def _add_init_and_fetch_assets(sub: Any) -> None:
    init = sub.add_parser(
        "init",
        help="write a packaged config into the current folder (no name: list them)",
        description="Copy one of the configs shipped with the package (e.g. "
        "gpt2-small-mutual-choice, embedded-mutual-choice, compare-embedded) to NAME.yaml.",
    )
    init.add_argument("name", nargs="?", help="config name; omit to list the names")
    init.add_argument("--dir", default=".", help="folder to write into (default: the current folder)")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    init.set_defaults(func=_cmd_init)
    fetch = sub.add_parser(
        "fetch-assets",
        help="fetch d3 once from the npm registry into the user cache, so dashboards work offline",
        description="Downloads d3 6.7.0 from the npm registry, verifies its checksums and keeps "
        "dist/d3.min.js in $SAE_LENS_ALLOCATION_CACHE (default ~/.cache/sae-lens-allocation). "
        "Dashboards inline it; without it they link d3's CDN.",
    )
    fetch.set_defaults(func=_cmd_fetch_assets)


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Train, evaluate and inspect Mutual Choice, Feature Choice and Gradient TopK "
        "SAEs with SAELens.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser(
        "train",
        help="train an SAE from a SAELens runner config YAML",
        description="Train with SAELens' LanguageModelSAETrainingRunner. model_name: embedded "
        "selects the shipped model; any other name goes to SAELens/TransformerLens.",
    )
    train.add_argument("config", help="SAELens runner config YAML (sae.architecture is a plain "
                       "string), or a multi-SAE config with a 'saes:' mapping (docs/multi-sae.md)")
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set training_tokens=100000 --set sae.k=16",
    )
    train.set_defaults(func=_cmd_train)

    cache = sub.add_parser(
        "cache",
        help="cache activations and their LM-loss gradients for training without the model",
        description="Write SAELens' activation cache, plus the gradient column gradient_topk "
        "needs, from a CacheActivationsRunnerConfig YAML (gradients: false for a plain cache). "
        "Train from it with use_cached_activations: true, cached_activations_path: <the path>.",
    )
    cache.add_argument("config", help="CacheActivationsRunnerConfig YAML (+ gradients: true|false)")
    cache.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a field, e.g. --set training_tokens=100000")
    cache.set_defaults(func=_cmd_cache)

    ev = sub.add_parser(
        "eval",
        help="evaluate an exported SAE (SAELens run_evals + per-token L0 distribution)",
        description="CE loss recovered, KL, explained variance and L0 from SAELens' run_evals, plus "
        "the per-token L0 distribution; written as JSON and printed as a short table.",
    )
    ev.add_argument("sae_dir", help="exported SAE folder (cfg.json + sae_weights.safetensors)")
    ev.add_argument("--model", default=None,
                    help="'embedded' or a TransformerLens name (default: the model it was trained on)")
    ev.add_argument("--n-batches", type=_positive_int, default=10, help="prompt batches to evaluate")
    ev.add_argument("--batch-size-prompts", type=_positive_int, default=8)
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--out", default=None, help="JSON output (default: SAE_DIR/eval.json)")
    ev.set_defaults(func=_cmd_eval)

    demo = sub.add_parser(
        "demo",
        help="train, evaluate and visualise a Mutual Choice SAE on the embedded model, offline",
    )
    demo.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a field of the demo config")
    demo.set_defaults(func=_cmd_demo)

    dash = sub.add_parser(
        "dashboard",
        help="write an offline sae-dashboard feature dashboard for an exported SAE",
    )
    add_dashboard_arguments(dash)
    dash.set_defaults(func=_cmd_dashboard)

    from sae_lens_allocation.analysis.compare import add_compare_arguments, run_compare_command

    cmp = sub.add_parser(
        "compare",
        help="train several architectures on the same data and report them side by side",
    )
    add_compare_arguments(cmp)
    cmp.set_defaults(func=run_compare_command)
    _add_init_and_fetch_assets(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (see the module docstring)."""
    import sae_lens_allocation  # noqa: F401  (registers the plugin architectures)
    from sae_lens_allocation.training.resume import TrainingInterrupted

    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except (UsageError, FileNotFoundError) as err:
        print(f"{PROG}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except TrainingInterrupted as stop:
        print(f"{PROG}: {one_line(stop)}", file=sys.stderr)
        return stop.exit_code


if __name__ == "__main__":
    sys.exit(main())
