"""The console script `sae-lens-allocation`: arguments first, the package (and SAELens) only after.

Importing `sae_lens_allocation` registers its architectures with SAELens, so it imports SAELens,
torch and every training module (seconds). This module lives outside that package so that
`--help`, `--version`, `init` and argument mistakes answer without importing any of it: it
parses the command line with the standard library alone and imports `sae_lens_allocation.cli`
(which runs the command) only for a command that needs it. `python -m sae_lens_allocation` and
`sae_lens_allocation.cli.main` are this same `main`.

Exit codes: 0 success; 2 a user mistake (missing or broken file, bad YAML, unknown architecture
or key, invalid field, flag or data), printed as one line on stderr with no traceback; 130 / 143
training stopped by SIGINT / SIGTERM after writing a checkpoint (one line says where); 1 a bug,
with its traceback, or, as one line, a failure outside the user's input: `fetch-assets` could not
download or verify d3, or a data-parallel `train` lost another rank (docs/cli.md).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

PROG = "sae-lens-allocation"

# `dashboard` defaults (also `make_dashboard`'s, which imports them from here).
DEFAULT_N_TOKENS = 32768
DEFAULT_MINIBATCH_SIZE_TOKENS = 64
DEFAULT_MINIBATCH_SIZE_FEATURES = 64
DEFAULT_OUT = "out/dashboard"


class ArgumentError(Exception):
    """A mistake on the command line, found before the package is imported; one line."""


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (its default prints the usage block first)."""

    def error(self, message: str) -> NoReturn:
        raise ArgumentError(f"{message} (see {self.prog} --help)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed; use an integer >= 1")
    return value


def _version() -> str:
    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return f"{PROG} {version('sae-lens-allocation')} (sae-lens {version('sae-lens')})"


# ---- init: the packaged configs, read without importing the package ---------------------------


def configs_dir() -> Path:
    """`sae_lens_allocation/configs/`, located without running the package's `__init__`."""
    spec = importlib.util.find_spec("sae_lens_allocation")
    if spec is None or spec.origin is None:
        raise ArgumentError("the sae_lens_allocation package is not installed")
    return Path(spec.origin).parent / "configs"


def packaged_configs() -> list[str]:
    """Names of the configs shipped in `sae_lens_allocation/configs/` (file names without .yaml)."""
    return sorted(p.stem for p in configs_dir().glob("*.yaml"))


def config_summary(path: Path) -> str:
    """What a packaged config is for: its first line, a `# ` comment."""
    first = path.read_text(encoding="utf-8").split("\n", 1)[0]
    return first.removeprefix("#").strip()


def _init(args: argparse.Namespace) -> int:
    names = packaged_configs()
    if args.name is None:
        width = max(len(name) for name in names)
        for name in names:
            print(f"{name:<{width}}  {config_summary(configs_dir() / f'{name}.yaml')}")
        return 0
    if args.name not in names:
        raise ArgumentError(f"no packaged config {args.name!r}; choose one of: {', '.join(names)}")
    target = Path(args.dir) / f"{args.name}.yaml"
    if target.exists() and not args.force:
        raise ArgumentError(f"{target} exists; pass --force to overwrite it")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text((configs_dir() / f"{args.name}.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    print(f"wrote {target}")
    return 0


# ---- the argument tree (standard library only) ------------------------------------------------


def _add_set(parser: argparse.ArgumentParser, example: str) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config field, e.g. {example}")


def _add_dashboard_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sae_dir", help="exported SAE folder (or a SAELens SAE folder)")
    parser.add_argument("--model", default="embedded",
                        help="'embedded' (default: the shipped model) or a TransformerLens model name")
    parser.add_argument("--features", type=int, nargs="+", metavar="J",
                        help="latents to show (default: the most active, a random sample and the rarest)")
    parser.add_argument("--n-tokens", type=_positive_int, default=DEFAULT_N_TOKENS,
                        help="tokens to compute on (default %(default)s)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="output folder (default %(default)s)")
    parser.add_argument("--dataset", help="save_to_disk folder or dataset name with tokens/input_ids or "
                        "text (default: the local corpus' held-out split)")
    parser.add_argument("--context-size", type=_positive_int, help="tokens per row (default: the SAE's, else 128)")
    parser.add_argument("--minibatch-size-tokens", type=_positive_int, default=DEFAULT_MINIBATCH_SIZE_TOKENS,
                        help="token rows per forward pass (default %(default)s)")
    parser.add_argument("--minibatch-size-features", type=_positive_int, default=DEFAULT_MINIBATCH_SIZE_FEATURES,
                        help="features per sae-dashboard pass (default %(default)s)")
    parser.add_argument("--no-neuronpedia", action="store_true", help="do not write the Neuronpedia JSON")
    parser.add_argument("--seed", type=int, default=0, help="seed for the token rows and the random features")
    parser.add_argument("--device", default="cpu", help="torch device (default %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress messages")


def _add_commands(sub: Any) -> None:
    train = sub.add_parser(
        "train",
        help="train an SAE from a SAELens runner config YAML",
        description="Train with SAELens' LanguageModelSAETrainingRunner. model_name: embedded "
        "selects the shipped model; any other name goes to SAELens/TransformerLens.",
    )
    train.add_argument("config", help="SAELens runner config YAML (sae.architecture is a plain "
                       "string), or a multi-SAE config with a 'saes:' mapping (docs/multi-sae.md)")
    _add_set(train, "--set training_tokens=100000 --set sae.k=16 (saes: configs: --set saes.NAME.k=16)")

    cache = sub.add_parser(
        "cache",
        help="cache activations and their LM-loss gradients for training without the model",
        description="Write SAELens' activation cache, plus the gradient column gradient_topk "
        "needs, from a CacheActivationsRunnerConfig YAML (gradients: false for a plain cache). "
        "Train from it with use_cached_activations: true, cached_activations_path: <the path>.",
    )
    cache.add_argument("config", help="CacheActivationsRunnerConfig YAML (+ gradients: true|false)")
    _add_set(cache, "--set training_tokens=100000")

    ev = sub.add_parser(
        "eval",
        help="evaluate an exported SAE (SAELens run_evals + per-token L0 distribution)",
        description="CE loss recovered, KL, explained variance and L0 from SAELens' run_evals, plus "
        "the per-token L0 distribution and the share of tokens on which no latent fires; written as "
        "JSON and printed as a short table.",
    )
    ev.add_argument("sae_dir", help="exported SAE folder (cfg.json + sae_weights.safetensors)")
    ev.add_argument("--model", default=None,
                    help="'embedded' or a TransformerLens name (default: the model it was trained on)")
    ev.add_argument("--n-batches", type=_positive_int, default=10, help="prompt batches to evaluate")
    ev.add_argument("--batch-size-prompts", type=_positive_int, default=8)
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--out", default=None, help="JSON output (default: SAE_DIR/eval.json)")

    probe = sub.add_parser(
        "probe",
        help="sparse probing of Python code concepts on held-out files (top-1/2/5 latents vs raw and untrained)",
        description="Per-token Python code concepts (keyword, name, string, comment, number, operator, "
        "docstring, def body, indentation > 1) on the stdlib corpus: logistic probes on the top-k latents "
        "chosen on train-split files, scored by balanced accuracy on held-out files, beside the same probe "
        "on the raw hook activations (ceiling) and on an untrained SAE of the same shape (floor).",
    )
    probe.add_argument("sae_dir", help="exported SAE folder (or any SAELens SAE folder the plugin loads)")
    probe.add_argument("--json", default=None, metavar="FILE", help="also write the full result as JSON")
    probe.add_argument("--model", default=None,
                       help="'embedded' or a TransformerLens name (default: the model in cfg.json's metadata)")
    probe.add_argument("--n-train-tokens", type=_positive_int, default=32768,
                       help="tokens of train-split files to choose latents and fit probes on (default %(default)s)")
    probe.add_argument("--n-test-tokens", type=_positive_int, default=32768,
                       help="tokens of held-out files to score on (default %(default)s)")
    probe.add_argument("--seed", type=int, default=0, help="file order of the train split and the untrained SAE")
    probe.add_argument("--device", default="cpu")

    demo = sub.add_parser(
        "demo", help="train, evaluate and visualise a Mutual Choice SAE on the embedded model, offline",
    )
    demo.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a field of the demo config")

    dash = sub.add_parser("dashboard", help="write an offline sae-dashboard feature dashboard for an exported SAE")
    _add_dashboard_arguments(dash)

    cmp = sub.add_parser("compare", help="train several architectures on the same data and report them side by side")
    cmp.add_argument("config", help="compare config YAML (see configs/compare-*.yaml)")
    cmp.add_argument("--out", default=None, help="output folder (default: the config's output_dir)")
    _add_set(cmp, "--set base.training_tokens=20000 --set seeds=[1,2]")

    init = sub.add_parser(
        "init",
        help="write a packaged config into the current folder (no name: list them, each with what it is for)",
        description="Copy one of the configs shipped with the package (e.g. "
        "gpt2-small-mutual-choice, embedded-mutual-choice, compare-embedded) to NAME.yaml.",
    )
    init.add_argument("name", nargs="?", help="config name; omit to list the names")
    init.add_argument("--dir", default=".", help="folder to write into (default: the current folder)")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")

    sub.add_parser(
        "fetch-assets",
        help="fetch d3 once from the npm registry into the user cache, so dashboards work offline",
        description="Downloads d3 6.7.0 from the npm registry, verifies its checksums and keeps "
        "dist/d3.min.js in $SAE_LENS_ALLOCATION_CACHE (default ~/.cache/sae-lens-allocation). "
        "Dashboards inline it; without it they link d3's CDN.",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Train, evaluate and inspect Mutual Choice, Feature Choice and Gradient TopK "
        "SAEs with SAELens.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (see the module docstring)."""
    try:
        args = build_parser().parse_args(argv)
        if args.command == "init":
            return _init(args)
    except ArgumentError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    from sae_lens_allocation.cli import run

    return run(args)
