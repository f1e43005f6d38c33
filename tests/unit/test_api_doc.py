"""docs/api.md names every public name and every argument of the public functions and
methods, so the reference cannot fall behind the code."""

from __future__ import annotations

import inspect
import os

import dcp_universal
import dcp_universal.lora as lora

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                   "docs", "api.md")


def _callables():
    yield from ((name, getattr(dcp_universal, name)) for name in dcp_universal.__all__)
    yield from ((name, getattr(lora, name)) for name in lora.__all__)
    for name in ("save", "load", "verify", "prune", "steps", "latest_step", "step_path",
                 "manifest", "wait", "close"):
        yield f"mgr.{name}", getattr(dcp_universal.CheckpointManager, name)
    yield "handle.result", dcp_universal.SaveHandle.result


def test_every_public_name_and_argument_is_documented():
    with open(DOC) as f:
        doc = f.read()
    missing = []
    for name, obj in _callables():
        if f"`{name.split('.')[-1]}" not in doc and f"{name}(" not in doc:
            missing.append(name)
        if not callable(obj) or (inspect.isclass(obj) and issubclass(obj, Exception)):
            continue
        target = obj.__init__ if inspect.isclass(obj) else obj
        try:
            params = inspect.signature(target).parameters
        except (TypeError, ValueError):
            continue
        for p in params:
            if p not in ("self", "args", "kwargs", "future", "stall_s") and f"`{p}`" not in doc \
                    and f"{p}=" not in doc and f"{p})" not in doc and f"{p}," not in doc:
                missing.append(f"{name}({p})")
    assert not missing, f"docs/api.md lacks: {missing}"
