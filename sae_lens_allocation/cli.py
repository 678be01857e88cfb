"""Command-line tool `sae-lens-allocation` (also `python -m sae_lens_allocation`).

Exit codes: 0 success; 2 a user mistake (missing or broken file, bad YAML, unknown architecture
or key, invalid field, flag or data), printed as one line on stderr with no traceback; 130 / 143
training stopped by SIGINT / SIGTERM after writing a checkpoint (one line says where); 1 a bug,
with its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

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
    from sae_lens_allocation.training.runner import train
    from sae_lens_allocation.yaml_config import load_runner_config

    cfg = load_runner_config(args.config, args.set)
    train(cfg)
    if cfg.output_path is not None:
        print(f"exported SAE: {Path(cfg.output_path).resolve()}")
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

    run_demo(args.out, args.set)
    return 0


def _cmd_dashboard(args: argparse.Namespace) -> int:
    from sae_lens_allocation.analysis.dashboard import run_dashboard_command

    return run_dashboard_command(args)


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
    train.add_argument("config", help="SAELens runner config YAML (sae.architecture is a plain string)")
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set training_tokens=100000 --set sae.k=16",
    )
    train.set_defaults(func=_cmd_train)

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

    from sae_lens_allocation.analysis.dashboard import add_dashboard_arguments

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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (see the module docstring)."""
    import sae_lens_allocation  # noqa: F401  (registers the plugin architectures)
    from sae_lens_allocation.training.resume import TrainingInterrupted

    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except (UsageError, FileNotFoundError) as err:
        print(f"{PROG}: error: {one_line(str(err))}", file=sys.stderr)
        return 2
    except TrainingInterrupted as stop:
        print(f"{PROG}: {one_line(str(stop))}", file=sys.stderr)
        return stop.exit_code


if __name__ == "__main__":
    sys.exit(main())
