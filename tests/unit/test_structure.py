"""The package's shape: no import cycle, private torch APIs in one module, and a public
surface that exports what users catch and call."""

from __future__ import annotations

import ast
import os

import pytest

import dcp_universal

PKG_DIR = os.path.dirname(dcp_universal.__file__)
PKG = "dcp_universal"


def _modules() -> dict[str, str]:
    return {name[:-3]: os.path.join(PKG_DIR, name)
            for name in sorted(os.listdir(PKG_DIR)) if name.endswith(".py")}


def import_graph() -> dict[str, set[str]]:
    """Module -> package modules it imports, at any depth (module level or inside a
    function: both run, so both can close a cycle). ``__init__`` is the package root."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == PKG:  # from dcp_universal import x: a module, or the root
                    targets = [f"{PKG}.{a.name}" if a.name in mods else PKG for a in node.names]
                else:
                    targets = [node.module]
            for t in targets:
                if t == PKG:
                    graph[mod].add("__init__")
                elif t.startswith(PKG + "."):
                    graph[mod].add(t.split(".")[1])
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_cycle_finder_finds_a_cycle_hidden_in_a_function_import():
    # the shape the package had before: names -> adapters -> lora -> names
    assert find_cycle({"names": {"adapters"}, "adapters": {"lora"}, "lora": {"names"},
                       "cli": {"names"}}) == ["adapters", "lora", "names", "adapters"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_package_has_no_import_cycle():
    graph = import_graph()
    assert "__init__" in graph and graph["__init__"], "the package root imports its modules"
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def _private_torch_uses(path: str) -> list[str]:
    with open(path) as f:
        tree = ast.parse(f.read())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("torch"):
            if any(p.startswith("_") for p in node.module.split(".")):
                found.append(f"from {node.module} import ...")
            found += [f"import {a.name} from {node.module}" for a in node.names
                      if a.name.startswith("_")]
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names
                      if a.name.startswith("torch") and any(p.startswith("_") for p in a.name.split("."))]
        if isinstance(node, ast.Attribute) and node.attr in (
                "_version", "_write_data", "_modules", "_local_tensor", "_fsspec_filesystem"):
            found.append(f".{node.attr}")
    return found


def test_private_torch_apis_live_in_one_module():
    offenders = {mod: uses for mod, path in _modules().items()
                 if mod != "_torch_compat" and (uses := _private_torch_uses(path))}
    assert not offenders, offenders
    assert _private_torch_uses(os.path.join(PKG_DIR, "_torch_compat.py"))  # the checker sees them


def test_public_surface_exports_errors_apply_lora_and_version():
    from importlib.metadata import version

    from dcp_universal import errors

    error_classes = {n for n in errors.__all__}
    assert error_classes <= set(dcp_universal.__all__)
    for name in dcp_universal.__all__:
        assert hasattr(dcp_universal, name), name
    assert dcp_universal.apply_lora is dcp_universal.lora.apply_lora
    assert dcp_universal.__version__ == version("dcp-universal")
    assert issubclass(dcp_universal.StepAlreadyExistsError, dcp_universal.CheckpointError)
    assert issubclass(dcp_universal.PerRankStateError, dcp_universal.CheckpointError)


def test_design_public_names_are_importable():
    from dcp_universal import (CheckpointError, CheckpointManager, CheckpointMismatchError,  # noqa: F401
                               LoadReport, load_model, save_model)
    from dcp_universal.lora import LoRAEmbedding, LoRALinear, apply_lora  # noqa: F401


def test_registering_a_second_kind_under_a_taken_name_is_refused():
    from dcp_universal import adapters

    class Impostor(adapters.AdapterKind):
        name = "dcp_universal.lora"

    with pytest.raises(ValueError, match="already registered"):
        adapters.register(Impostor())
    assert [k.name for k in adapters.registered()].count("dcp_universal.lora") == 1
