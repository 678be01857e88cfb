"""The package layout: no import cycles, and the public names still import from the top level."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
import torch

import sae_lens_allocation

PACKAGE = "sae_lens_allocation"
ROOT = Path(sae_lens_allocation.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """module -> package modules it imports, at module level or inside functions alike (a lazy
    import is still a dependency). `from pkg import name` counts as importing `pkg.name` when that
    is a module, else `pkg` itself (whose __init__ runs)."""
    paths = sorted(ROOT.rglob("*.py"))
    modules = {_module_name(p): p for p in paths}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, node, path.name == "__init__.py")
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    for alias in node.names
                ]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target.startswith(PACKAGE) and target != name:
                    deps.add(target)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_inside_the_package():
    graph = import_graph()
    # The root package imports (registers) everything, so only it and the entry points may
    # import it; a submodule importing the root is a cycle through __init__.
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_cycle_finder_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_graph_counts_lazy_and_root_imports():
    graph = import_graph()
    # A function-level import (cli imports the demo lazily) is an edge.
    assert "sae_lens_allocation.demo" in graph["sae_lens_allocation.cli"]
    assert "sae_lens_allocation.saes.batch_allocation" in graph[PACKAGE]


# Floors, bottom up: a module may import its own floor or lower ones, never a higher one.
FLOORS = [
    # pure allocation kernels and the shared leaves (no SAELens in allocation/)
    {"allocation", "registration", "validation", "tokens", "saelens_compat"},
    {"loading", "embedded"},
    {"saes"},
    {"training"},
    {"yaml_config", PACKAGE},
    {"analysis"},
    {"demo"},
    {"cli", "__main__"},
]


def floor_of(module: str) -> int:
    part = module.split(".")[1] if "." in module else module
    return next(i for i, names in enumerate(FLOORS) if part in names)


def test_no_module_imports_a_higher_floor():
    """saes/ (what an SAE computes) never imports training/ (the glue on top), analysis/ or the
    CLI; allocation/ (pure kernels) imports nothing above itself."""
    graph = import_graph()
    upward = [f"{m} -> {d}" for m, deps in graph.items() for d in deps
              if d != PACKAGE and m != PACKAGE and floor_of(d) > floor_of(m)]
    assert upward == []


def test_floor_check_sees_an_upward_import():
    assert floor_of(f"{PACKAGE}.training.runner") > floor_of(f"{PACKAGE}.saes.mutual_choice")
    assert floor_of(f"{PACKAGE}.analysis.compare") > floor_of(f"{PACKAGE}.allocation.rules")


def test_allocation_kernels_know_nothing_of_sae_lens():
    for path in (ROOT / "allocation").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            assert not any(n == "sae_lens" or n.startswith("sae_lens.") for n in names), path.name


def test_layout_groups_the_modules():
    graph = import_graph()
    saes = {m.rsplit(".", 1)[1] for m in graph if m.startswith(f"{PACKAGE}.saes.")}
    assert saes == {
        "batch_allocation", "mutual_choice", "feature_choice", "gradient_topk", "topk_aux",
        "aux_losses", "zipf", "calibration", "rule_gap", "batch_group", "finite_loss", "sparse_codes",
        "latent_shards",
    }
    assert not any(m.startswith(f"{PACKAGE}.training.") and m.rsplit(".", 1)[1] in {"losses", "calibration"}
                   for m in graph)


REGISTRIES = {"ARCHITECTURES", "AUX_LOSSES"}


@pytest.mark.parametrize("name", sorted(set(sae_lens_allocation.__all__) - REGISTRIES))
def test_public_names_are_the_package_classes_and_functions_they_name(name):
    """`from sae_lens_allocation import X` gives the class or function X defined in a package
    module (after a move, the same object as at its new home), not some other object."""
    public = getattr(importlib.import_module(PACKAGE), name)
    assert callable(public) and public.__name__ == name
    assert public.__module__.startswith(f"{PACKAGE}.")
    assert getattr(importlib.import_module(public.__module__), name) is public


def test_public_registries_name_the_plugin_architectures_and_aux_losses():
    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

    from sae_lens_allocation.saes import aux_losses

    assert sae_lens_allocation.ARCHITECTURES == (
        "mutual_choice", "feature_choice", "gradient_topk", "topk_aux")
    for arch in sae_lens_allocation.ARCHITECTURES:
        sae_cls, cfg_cls = SAE_TRAINING_CLASS_REGISTRY[arch]
        assert getattr(sae_lens_allocation, sae_cls.__name__) is sae_cls
        assert getattr(sae_lens_allocation, cfg_cls.__name__) is cfg_cls
    assert sae_lens_allocation.AUX_LOSSES is aux_losses.AUX_LOSSES
    assert {"none", "aux_k", "aux_zipf"} <= set(sae_lens_allocation.AUX_LOSSES)


PREVIOUS_LAYOUT = Path(__file__).parent / "data" / "previous-layout"


@pytest.mark.parametrize("arch", ["mutual_choice", "feature_choice"])
def test_files_written_by_the_previous_flat_layout_still_load(arch):
    """Checkpoints and exports hold no class paths (cfg.json names the architecture, the weights
    are safetensors), so folders written before the move load unchanged."""
    from sae_lens import SAE
    from safetensors.torch import load_file

    from sae_lens_allocation import load_sae

    checkpoint = PREVIOUS_LAYOUT / arch / "checkpoint"
    sae = load_sae(checkpoint)
    assert sae.cfg.architecture() == arch
    assert type(sae).__module__ == f"{PACKAGE}.saes.{arch}"
    saved = load_file(checkpoint / "sae_weights.safetensors")
    state = sae.state_dict()
    assert set(saved) <= set(state)
    for key, value in saved.items():
        assert torch.equal(state[key], value), key

    export = load_sae(PREVIOUS_LAYOUT / arch / "export")
    assert isinstance(export, SAE) and export.cfg.architecture() == "jumprelu"
    previous = load_file(PREVIOUS_LAYOUT / arch / "export" / "sae_weights.safetensors")
    assert torch.equal(export.threshold, previous["threshold"])


def test_only_the_entry_points_import_the_console_script():
    """`sae_lens_allocation_cli` parses the command line above the package: the package imports
    it nowhere but in `python -m sae_lens_allocation` (__main__)."""
    importers = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] == "sae_lens_allocation_cli" for n in names):
                importers.append(path.relative_to(ROOT).as_posix())
    assert importers == ["__main__.py"]
