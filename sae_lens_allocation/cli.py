"""The commands of `sae-lens-allocation` (`sae_lens_allocation_cli` parses the command line
without importing this package, then calls `run`). Exit codes: see `sae_lens_allocation_cli`."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from sae_lens_allocation.validation import UsageError, check_device, one_line

# The console script's name (sae_lens_allocation_cli.PROG; this package never imports that module,
# which sits above it).
PROG = "sae-lens-allocation"


def _cmd_train(args: argparse.Namespace) -> int:
    from sae_lens_allocation.training import distributed
    from sae_lens_allocation.training.latent_shard_runner import train_latent_sharded
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
    # Checked here, not when a config is read: a GPU config still parses on a CPU machine.
    check_device("device", cfg.device)
    if not distributed.launched_by_torchrun():
        train(cfg)
    else:
        # `torchrun --nproc-per-node W -m sae_lens_allocation train ...`: data parallel, with
        # the latents sharded when sae.latent_shards > 1 (docs/distributed.md); rank 0 writes
        # the export.
        sharded = getattr(cfg.sae, "latent_shards", 1) != 1
        try:
            (train_latent_sharded if sharded else distributed.train_data_parallel)(cfg)
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
    check_device("device", cfg.device)
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
    check_device("device", cfg.device)
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
    check_eval_arguments(sae_dir, out, device=args.device)
    result = evaluate_sae(sae_dir, model=args.model, n_batches=args.n_batches,
                          batch_size_prompts=args.batch_size_prompts, device=args.device)
    out.write_text(json.dumps(result, indent=2))
    print(format_table(result))
    if result["no_latent_tokens"]["warning"]:
        print(f"{PROG}: {result['no_latent_tokens']['warning']}", file=sys.stderr)
    print(f"evaluation written to {out}")
    return 0


def _cmd_probe(args: argparse.Namespace) -> int:
    import json

    from sae_lens_allocation.analysis.probing import format_probe_table, probe_export

    check_device("--device", args.device)
    result = probe_export(args.sae_dir, model=args.model, n_train_tokens=args.n_train_tokens,
                          n_test_tokens=args.n_test_tokens, seed=args.seed, device=args.device)
    print(format_probe_table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"probe results written to {args.json}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from sae_lens_allocation.demo import run_demo

    run_demo(args.out, args.set, fetch_d3=True)
    return 0


def _cmd_dashboard(args: argparse.Namespace) -> int:
    """Run `make_dashboard` and print the written paths. User errors (missing folder, wrong
    architecture, model or features, the `dashboard` extra not installed) raise `UsageError` or
    `FileNotFoundError` for `main` to report; the SAE and `--features` are checked before the
    model loads."""
    from sae_lens_allocation.analysis.dashboard import make_dashboard

    check_device("--device", args.device)
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


def _cmd_fetch_assets(args: argparse.Namespace) -> int:
    from sae_lens_allocation.analysis.dashboard_assets import D3_TARBALL_URL, fetch_d3

    try:
        path = fetch_d3()
    except OSError as err:
        print(f"{PROG}: error: could not fetch d3 from {D3_TARBALL_URL}: {err}", file=sys.stderr)
        return 1
    print(f"d3 (checksum verified): {path}")
    return 0



def _cmd_compare(args: argparse.Namespace) -> int:
    from sae_lens_allocation.analysis.compare import run_compare_command

    return run_compare_command(args)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": _cmd_train,
    "cache": _cmd_cache,
    "eval": _cmd_eval,
    "probe": _cmd_probe,
    "demo": _cmd_demo,
    "dashboard": _cmd_dashboard,
    "compare": _cmd_compare,
    "fetch-assets": _cmd_fetch_assets,
}


# SAELens messages a user of this tool cannot act on, each matched on its own text (docs/cli.md,
# "Messages filtered"); every other warning and every error is shown.
# - logged by SAELens' runner when it is given a model or dataset, which this tool does for the
#   embedded model and corpus and for held-out splits:
_OVERRIDE_NOTICES = ("You just passed in a dataset which will override",
                     "You just passed in a model which will override")
# - warnings.warn'd by SAELens: its ActivationsStore compares the dataset's rows with the training
#   tokens (4995 rows of 128 tokens are "fewer samples than 500000"); its store builds a tensor
#   from a tensor (torch's copy-construct advice, about SAELens' code):
_SAELENS_WARNINGS = (r"The training dataset contains fewer samples \(", r"To copy construct from a tensor")


class _DropOverrideNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_OVERRIDE_NOTICES)


@contextlib.contextmanager
def quiet_saelens_notices() -> Iterator[None]:
    """Drop the SAELens messages above while the block runs (only those: matched by text, and
    the copy-construct advice only where SAELens' own modules cause it)."""
    saelens_logger = logging.getLogger("sae_lens")
    notices = _DropOverrideNotices()
    saelens_logger.addFilter(notices)
    try:
        with warnings.catch_warnings():
            for message in _SAELENS_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=UserWarning, module=r"sae_lens\.")
            yield
    finally:
        saelens_logger.removeFilter(notices)


def run(args: argparse.Namespace) -> int:
    """Run the parsed command `args.command`; a user mistake is one line on stderr and exit 2."""
    import sae_lens_allocation  # noqa: F401  (registers the plugin architectures)
    from sae_lens_allocation.training.resume import TrainingInterrupted

    try:
        with quiet_saelens_notices():
            return int(COMMANDS[args.command](args) or 0)
    except (UsageError, FileNotFoundError) as err:
        print(f"{PROG}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except TrainingInterrupted as stop:
        print(f"{PROG}: {one_line(stop)}", file=sys.stderr)
        return stop.exit_code
