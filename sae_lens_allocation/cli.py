"""Command-line tool `sae-lens-allocation` (also `python -m sae_lens_allocation`).

Every user error (missing file, bad YAML, unknown architecture or key, invalid field value) is
one line on stderr and exit code 2, with no traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

PROG = "sae-lens-allocation"


class UsageError(Exception):
    """A problem with the user's input, reported as one line and exit code 2."""


def _cmd_train(args: argparse.Namespace) -> int:
    from sae_lens_allocation.runner import train
    from sae_lens_allocation.yaml_config import load_runner_config

    cfg = load_runner_config(args.config, args.set)
    train(cfg)
    if cfg.output_path is not None:
        print(f"exported SAE: {Path(cfg.output_path).resolve()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import sae_lens_allocation  # noqa: F401  (registers the plugin architectures)
    from sae_lens_allocation.yaml_config import ConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UsageError, ConfigError, FileNotFoundError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
