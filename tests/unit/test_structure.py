"""The package's shape: no import cycle, private torch APIs in one module, and a public
surface that exports what users catch and call."""

from __future__ import annotations

import ast
import os

import pytest

import dcp_universal

PKG_DIR = os.path.dirname(dcp_universal.__file__)
PKG = "dcp_universal"

# The folders, lowest first: a module may import its own folder, lower folders and the
# root's foundations, never a higher folder. The root holds foundations (imported by
# every folder, importing none) and facades (the public entry points, imported by none).
LAYERS = ["format", "storage", "adapters", "model", "sources", "model_io", "interop",
          "training", "cli"]
FOUNDATIONS = {"errors", "_version", "_torch_compat", "_comm", "_comm.operations", "_held",
               "_comm.transport", "_registry", "_paths"}
FACADES = {"__init__", "lora"}


def _modules() -> dict[str, str]:
    """Dotted module name (``storage.mapped``; a folder's ``__init__`` is the folder's
    name, the root's is ``__init__``) -> file."""
    out = {}
    for dirpath, _, files in os.walk(PKG_DIR):
        rel = os.path.relpath(dirpath, PKG_DIR)
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            parts = [] if rel == "." else rel.split(os.sep)
            stem = name[:-3]
            if stem != "__init__":
                parts.append(stem)
            out[".".join(parts) or "__init__"] = os.path.join(dirpath, name)
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> package modules it imports, at any depth (module level or inside a
    function: both run, so both can close a cycle). ``__init__`` is the package root."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}

    def resolve(dotted: str) -> str | None:
        while dotted and dotted not in mods:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    for mod, path in mods.items():
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                base = node.module
                targets = [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                if t == PKG or t.startswith(PKG + "."):
                    found = resolve(t[len(PKG) + 1:]) if t != PKG else None
                    graph[mod].add(found or "__init__")
            graph[mod].discard(mod)
    return graph


def _folder(mod: str) -> str | None:
    head = mod.split(".")[0]
    return head if head in LAYERS else None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import that breaks the layering, as ``"a -> b"``."""
    bad = []
    for mod, deps in sorted(graph.items()):
        for dep in sorted(deps):
            if dep in FACADES and mod not in FACADES:
                bad.append(f"{mod} -> {dep} (a facade)")
            elif mod in FOUNDATIONS and dep not in FOUNDATIONS:
                bad.append(f"{mod} -> {dep} (a foundation imports only foundations)")
            elif _folder(mod) and _folder(dep) and \
                    LAYERS.index(_folder(dep)) > LAYERS.index(_folder(mod)):
                bad.append(f"{mod} -> {dep} (upward)")
    return bad


def test_every_module_is_in_a_layer():
    for mod in _modules():
        assert mod in FOUNDATIONS | FACADES or _folder(mod), mod


def test_no_folder_imports_a_higher_one():
    assert upward_imports(import_graph()) == []
    # the checker sees an upward import, a facade import and a foundation's
    assert upward_imports({"storage.mapped": {"training.manager"}, "model.view": {"lora"},
                           "_comm": {"storage"}}) == [
        "_comm -> storage (a foundation imports only foundations)",
        "model.view -> lora (a facade)", "storage.mapped -> training.manager (upward)"]


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
    assert issubclass(dcp_universal.UnsafeCheckpointError, dcp_universal.CheckpointError)


def test_design_public_names_are_importable():
    from dcp_universal import (CheckpointError, CheckpointManager, CheckpointMismatchError,
                               LoadReport, load_model, save_model)
    from dcp_universal.lora import LoRAEmbedding, LoRALinear, apply_lora  # noqa: F401


def test_registering_a_second_kind_under_a_taken_name_is_refused():
    from dcp_universal import adapters

    class Impostor(adapters.AdapterKind):
        name = "dcp_universal.lora"

    with pytest.raises(ValueError, match="already registered"):
        adapters.register(Impostor())
    assert [k.name for k in adapters.registered()].count("dcp_universal.lora") == 1


def _module_sizes() -> dict[str, int]:
    import runpy

    script = os.path.join(os.path.dirname(PKG_DIR), "launch", "module_sizes.py")
    return runpy.run_path(script)["sizes"]()


def test_modules_stay_small_and_the_readme_names_the_large_ones():
    sizes = _module_sizes()
    assert sizes["dcp_universal/training/manager.py"] < 500  # a coordinator
    assert max(sizes.values()) <= 800, max(sizes.items(), key=lambda kv: kv[1])
    with open(os.path.join(os.path.dirname(PKG_DIR), "README.md")) as f:
        readme = f.read()
    table = readme[readme.index("Module sizes ("):readme.index("Extension points, each")]
    listed = {line.split("`")[1] for line in table.splitlines() if line.startswith("| `")}
    assert listed == {path for path, n in sizes.items() if n > 400}, \
        "update the README's module-size table: .venv/bin/python launch/module_sizes.py"
