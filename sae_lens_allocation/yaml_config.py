"""SAELens runner configs from YAML, with `--set key=value` overrides and strict key checks.

SAELens' `LanguageModelSAERunnerConfig.from_dict` silently drops unknown `sae` keys; a typo in a
field name would then train with the default. Here every key is checked against the dataclass it
belongs to, every runner field's type and range before SAELens sees it
(`validation.check_runner_fields`), and every problem is one `ConfigError` line.

Numbers follow YAML 1.2: `1e-3` and `3e-4` are floats (PyYAML's YAML 1.1 resolver reads a float
without a dot as a string, which SAELens then divides). YAML 1.1's `500_000` stays an integer.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml
from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig
from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

from sae_lens_allocation.loading import unknown_architecture_message
from sae_lens_allocation.validation import (
    UsageError,
    check_bool_fields,
    check_runner_fields,
    one_line,
    reject_unknown_keys,
)


class ConfigError(UsageError):
    """A config file or override that cannot be used; the message is one line for the user."""


class _Yaml12NumbersLoader(yaml.SafeLoader):
    """PyYAML's safe loader plus YAML 1.2 core-schema floats: `1e-3`, `+3E4`, `5.`, `.5e1`."""


_YAML12_FLOAT = re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)[eE][-+]?[0-9]+$")
_Yaml12NumbersLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", _YAML12_FLOAT, list("-+.0123456789")
)


def load_yaml(text: str) -> Any:
    """`yaml.safe_load` with YAML 1.2 numbers (see the module docstring)."""
    return yaml.load(text, Loader=_Yaml12NumbersLoader)  # safe: the loader subclasses SafeLoader


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.yaml"))
        inside = f" (it holds {', '.join(found)})" if found else ""
        raise ConfigError(f"{path} is a folder; give the config file (a .yaml){inside}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = load_yaml(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = one_line(getattr(err, "problem", None) or err)
        raise ConfigError(f"invalid YAML in {path}{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of runner config fields, got {type(data).__name__}")
    return data


def apply_overrides(cfg: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`key=value` or `sae.key=value`; the value is parsed as YAML with YAML 1.2 numbers
    (`k=16`, `lr=1e-3`, `x=null`)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value or sae.key=value")
        try:
            value = load_yaml(raw) if raw else ""
        except yaml.YAMLError as err:
            problem = one_line(getattr(err, "problem", None) or err)
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({problem})") from None
        target = cfg
        parts = key.split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"override {key!r}: {part!r} is not a section")
        target[parts[-1]] = value
    return cfg


def check_keys(cfg: dict[str, Any]) -> None:
    """Every key must be a field of the class that will receive it."""
    sae = cfg.get("sae")
    if "architectures" in cfg and sae is None:
        raise ConfigError("this is a compare config (it has 'architectures:'), not a train config: run it with "
                          "`sae-lens-allocation compare CONFIG`")
    if not isinstance(sae, dict) or "architecture" not in sae:
        raise ConfigError("the config needs an 'sae' section with an 'architecture' string")
    arch = sae["architecture"]
    if arch not in SAE_TRAINING_CLASS_REGISTRY:
        raise ConfigError(unknown_architecture_message(str(arch), "sae.architecture"))
    reject_unknown_keys(cfg, _field_names(LanguageModelSAERunnerConfig), note="for the runner config",
                        error=ConfigError)
    reject_unknown_keys(sae, _field_names(SAE_TRAINING_CLASS_REGISTRY[arch][1]) | {"architecture"},
                        prefix="sae.", note=f"(architecture {arch})", error=ConfigError)
    _check_bools(cfg, LanguageModelSAERunnerConfig)
    _check_bools(sae, SAE_TRAINING_CLASS_REGISTRY[arch][1], "sae.")
    if isinstance(cfg.get("logger"), dict):
        reject_unknown_keys(cfg["logger"], _field_names(LoggingConfig), prefix="logger.", error=ConfigError)
        _check_bools(cfg["logger"], LoggingConfig, "logger.")


def _check_bools(mapping: dict[str, Any], cls: type, prefix: str = "") -> None:
    try:
        check_bool_fields(mapping, cls, prefix)
    except UsageError as err:
        raise ConfigError(str(err)) from None


def runner_config_from_dict(cfg: dict[str, Any]) -> LanguageModelSAERunnerConfig[Any]:
    """`LanguageModelSAERunnerConfig.from_dict` after strict key checks. A missing `logger`
    section means no wandb logging (the offline default)."""
    cfg = dict(cfg)
    cfg.setdefault("logger", {"log_to_wandb": False})
    check_keys(cfg)
    try:
        check_runner_fields(cfg)
        return LanguageModelSAERunnerConfig.from_dict(cfg)
    except (ValueError, TypeError) as err:
        raise ConfigError(one_line(err)) from None


def load_runner_config(
    path: str | Path, overrides: list[str] | None = None
) -> LanguageModelSAERunnerConfig[Any]:
    """Read a SAELens runner YAML with a plain `sae.architecture` string, apply overrides."""
    return runner_config_from_dict(apply_overrides(read_yaml(path), overrides or []))


def check_multi_keys(cfg: dict[str, Any]) -> None:
    """The `saes:` form (SAELens' `MultiSAETrainingRunnerConfig`): every runner key a field of
    that config, every `saes.<name>` a mapping with a registered `architecture` and only fields
    of its config class, `logger` keys of `LoggingConfig`."""
    from sae_lens.multi_sae_training_runner import MultiSAETrainingRunnerConfig

    from sae_lens_allocation.training.multi_runner import multi_runner_fields

    if "sae" in cfg:
        raise ConfigError("a config has either 'sae' (one SAE) or 'saes' (several SAEs from one "
                          "LM pass), not both")
    saes = cfg.get("saes")
    if not isinstance(saes, dict) or not saes:
        raise ConfigError("'saes' must map SAE names to SAE sections, each with an 'architecture'")
    reject_unknown_keys(cfg, multi_runner_fields(), note="for the multi-SAE runner config", error=ConfigError)
    _check_bools(cfg, MultiSAETrainingRunnerConfig)
    if isinstance(cfg.get("logger"), dict):
        reject_unknown_keys(cfg["logger"], _field_names(LoggingConfig), prefix="logger.", error=ConfigError)
        _check_bools(cfg["logger"], LoggingConfig, "logger.")
    for name, sae in saes.items():
        if not isinstance(sae, dict) or "architecture" not in sae:
            raise ConfigError(f"saes.{name} must be a mapping with an 'architecture' string")
        arch = sae["architecture"]
        if arch not in SAE_TRAINING_CLASS_REGISTRY:
            raise ConfigError(unknown_architecture_message(str(arch), f"saes.{name}.architecture"))
        reject_unknown_keys(sae, _field_names(SAE_TRAINING_CLASS_REGISTRY[arch][1]) | {"architecture"},
                            prefix=f"saes.{name}.", note=f"(architecture {arch})", error=ConfigError)
        _check_bools(sae, SAE_TRAINING_CLASS_REGISTRY[arch][1], f"saes.{name}.")


def multi_runner_config_from_dict(cfg: dict[str, Any]) -> Any:
    """A `MultiSAETrainingRunnerConfig` from the `saes:` form after strict key checks; a missing
    `logger` section means no wandb logging."""
    from sae_lens_allocation.training import multi_runner

    check_multi_keys(cfg)
    try:
        return multi_runner.multi_runner_config_from_dict(cfg)
    except (ValueError, TypeError) as err:
        raise ConfigError(one_line(err)) from None


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> Any:
    """A runner config from YAML: `LanguageModelSAERunnerConfig` for the `sae:` form,
    `MultiSAETrainingRunnerConfig` for the `saes:` form (`--set saes.NAME.k=16` overrides one)."""
    data = read_yaml(path)
    if isinstance(data.get("saes"), dict) and data["saes"] and "sae" not in data:
        for item in overrides or []:
            key, _, value = item.partition("=")
            if key == "sae" or key.startswith("sae."):
                field = key[len("sae."):] or "FIELD"
                names = ", ".join(map(str, data["saes"]))
                raise ConfigError(f"--set {item}: this config trains several SAEs (saes: {names}); set one SAE's "
                                  f"field with --set saes.<name>.{field}=..., e.g. --set "
                                  f"saes.{next(iter(data['saes']))}.{field}={value}")
    cfg = apply_overrides(data, overrides or [])
    if "saes" in cfg:
        return multi_runner_config_from_dict(cfg)
    return runner_config_from_dict(cfg)
