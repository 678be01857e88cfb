"""The canary for SAELens internals: every private SAELens name the plugin relies on still exists
in the installed sae-lens, every copied body still matches an upstream version it was compared
with, and no module but `saelens_compat` names a private SAELens attribute or method."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib
import inspect
import re
import textwrap
from pathlib import Path

import pytest
import sae_lens
import torch
from sae_lens.multi_sae_training_runner import MultiSAETrainingRunnerConfig
from sae_lens.training.activations_store import ActivationsStore

import sae_lens_allocation
from sae_lens_allocation import saelens_compat as compat

PACKAGE = Path(sae_lens_allocation.__file__).parent


@pytest.mark.parametrize(("owner", "name"), compat.PRIVATE_NAMES,
                         ids=[f"{o.__name__}.{n}" for o, n in compat.PRIVATE_NAMES])
def test_every_private_name_exists_in_the_installed_sae_lens(owner, name):
    assert hasattr(owner, name), (
        f"sae-lens {sae_lens.__version__} has no {owner.__module__}.{owner.__name__}.{name}: "
        "saelens_compat must follow the new API"
    )


@pytest.mark.parametrize("name", compat.PRIVATE_STORE_ATTRIBUTES)
def test_every_private_store_attribute_is_still_set_by_sae_lens(name):
    assert f"self.{name} =" in inspect.getsource(ActivationsStore), (
        f"sae-lens {sae_lens.__version__}'s ActivationsStore no longer sets {name}"
    )


def test_derived_multi_runner_fields_are_fields_of_the_config():
    fields = {f.name for f in dataclasses.fields(MultiSAETrainingRunnerConfig)}
    assert set(compat.MULTI_RUNNER_DERIVED_FIELDS) <= fields


def upstream_hash(qualified: str) -> str:
    module, path = qualified.split(":")
    obj = importlib.import_module(module)
    for part in path.split("."):
        obj = getattr(obj, part)
    return hashlib.sha256(textwrap.dedent(inspect.getsource(obj)).encode()).hexdigest()


@pytest.mark.parametrize("qualified", sorted(compat.COPIED_BODIES))
def test_every_copied_body_matches_an_upstream_version_it_was_compared_with(qualified):
    known = compat.COPIED_BODIES[qualified]
    assert upstream_hash(qualified) in known, (
        f"{qualified} changed in sae-lens {sae_lens.__version__} (known: versions "
        f"{'; '.join(known.values())}): compare saelens_compat's copy with it, then add its hash"
    )


def test_the_canary_sees_a_changed_body():
    assert upstream_hash("sae_lens.training.mixing_buffer:mixing_buffer") != hashlib.sha256(b"").hexdigest()


def sae_lens_private_names() -> set[str]:
    """Names starting with one underscore (not dunders) defined on sae_lens' classes, minus those
    torch.nn.Module defines (overriding e.g. `_load_from_state_dict` is torch's documented way)."""
    names: set[str] = set()
    for module_name in ("sae_lens.training.activations_store", "sae_lens.llm_sae_training_runner",
                        "sae_lens.multi_sae_training_runner", "sae_lens.training.sae_trainer",
                        "sae_lens.training.multi_sae_trainer", "sae_lens.cache_activations_runner",
                        "sae_lens.saes.sae", "sae_lens.saes.topk_sae", "sae_lens.config"):
        module = importlib.import_module(module_name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__.startswith("sae_lens"):
                names |= {n for n in vars(cls) if n.startswith("_") and not n.startswith("__")}
                names |= {n for n in getattr(cls, "__annotations__", {}) if n.startswith("_")}
                if dataclasses.is_dataclass(cls):
                    names |= {f.name for f in dataclasses.fields(cls) if f.name.startswith("_")}
        names |= {n for n in vars(module) if n.startswith("_") and not n.startswith("__")}
    return names - set(dir(torch.nn.Module))


def private_uses(path: Path, private: set[str]) -> set[str]:
    """Private SAELens names a module uses as an attribute, a method it defines, or a string."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr in private:
            found.add(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in private:
            found.add(node.name)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in private:
            found.add(node.value)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sae_lens"):
            found |= {a.name for a in node.names if a.name in private}
    return found


def test_only_saelens_compat_names_private_sae_lens_names():
    private = sae_lens_private_names()
    offenders = {
        str(path.relative_to(PACKAGE)): sorted(found)
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "saelens_compat.py" and (found := private_uses(path, private))
    }
    assert offenders == {}
    assert private_uses(PACKAGE / "saelens_compat.py", private) >= {
        name for _, name in compat.PRIVATE_NAMES
    }


def test_the_private_name_check_sees_a_use(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f(store):\n    return store._iterate_tokenized_sequences()\n")
    assert private_uses(module, sae_lens_private_names()) == {"_iterate_tokenized_sequences"}


@pytest.mark.parametrize(("steps", "interval"), [(1, 1), (8, 1), (199, 1), (200, 2), (5_000, 50),
                                                 (10_000, 100), (10**6, 100)])
def test_the_progress_bar_moves_about_a_hundred_times_on_short_runs(steps, interval):
    assert compat.progress_interval(steps) == interval


def test_a_short_run_shows_progress_before_step_100(tmp_path, capsys):
    """SAELens updates its bar every 100 steps, so an 8-step run sat at 0% to the end; the
    plugin's trainer updates it every step here."""
    from sae_lens_allocation.training.runner import train

    import support

    cfg = support.runner_cfg_dict("topk_aux", tmp_path, sae_k=8)
    train(cfg, override_model=support.tiny_model(), override_dataset=support.tiny_dataset())
    err = capsys.readouterr().err
    steps = sorted({int(n) for n in re.findall(r"(\d+)\| mse_loss", err)})
    assert steps == list(range(1, 9)), err[-2000:]
