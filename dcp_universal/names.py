"""Canonical parameter names: the names a plain, unwrapped, unadapted model has.

A state-dict key is mapped by walking the module tree along the key's parts; an edge
from a wrapper module to the module it wraps contributes nothing to the name. Walking
the tree (rather than deleting substrings) means a user module that happens to be called
``module`` or ``model`` keeps its name unless it really is a DDP or PEFT wrapper's child.
Below an adapted module, its adapter kind maps the rest of the key
(:meth:`~dcp_universal.adapters.AdapterKind.canonical_key`).
"""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

from dcp_universal import _torch_compat, adapters

__all__ = ["canonical_names", "canonical_module_names", "canonical_parameters"]


def _type_named(*qualnames: str) -> Callable[[nn.Module], bool]:
    # Matched by qualified class name so optional packages (peft) are never imported
    # just to recognise their wrappers.
    def match(module: nn.Module) -> bool:
        return any(
            f"{c.__module__}.{c.__qualname__}" in qualnames or c.__qualname__ in qualnames
            for c in type(module).__mro__
        )

    return match


# (is this module a wrapper?, the attribute holding the wrapped module)
_WRAPPER_EDGES: list[tuple[Callable[[nn.Module], bool], str]] = [
    (_type_named("torch.nn.parallel.distributed.DistributedDataParallel"), "module"),
    *[(_type_named(*names), attr) for names, attr in _torch_compat.WRAPPER_CLASSES],
    (_type_named("peft.peft_model.PeftModel"), "base_model"),
    (_type_named("peft.tuners.tuners_utils.BaseTuner"), "model"),
]


def _child(module: nn.Module, name: str) -> nn.Module | None:
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None


def _wrapped(module: nn.Module) -> nn.Module | None:
    for is_wrapper, attr in _WRAPPER_EDGES:
        if is_wrapper(module):
            child = _child(module, attr)
            if child is not None:
                return child
    return None


def _is_wrapper_edge(parent: nn.Module, attr: str) -> bool:
    return any(attr == a and is_wrapper(parent) for is_wrapper, a in _WRAPPER_EDGES)


def _canonical(model: nn.Module, fqn: str) -> str:
    parts = fqn.split(".") if fqn else []
    module: nn.Module | None = model
    kept: list[str] = []
    for i, part in enumerate(parts):
        # Some wrappers (activation checkpointing, FSDP1) already drop their own infix
        # from state-dict keys: step through them without consuming a part.
        while module is not None and _child(module, part) is None and _wrapped(module) is not None:
            module = _wrapped(module)
        kind = adapters.kind_of(module) if module is not None else None
        if kind is not None:  # the adapter's kind names everything below it
            rest = kind.canonical_key(module, ".".join(parts[i:]))
            kept.extend(rest.split(".") if rest else [])
            break
        child = _child(module, part) if module is not None else None
        if child is not None and _is_wrapper_edge(module, part):
            module = child
            continue
        kept.append(part)
        module = child
    return ".".join(kept)


def canonical_names(model: nn.Module, keys) -> dict[str, str]:
    """Map each state-dict key of ``model`` to its canonical name.

    Raises:
        ValueError: two keys map to one canonical name (a model whose wrapper layout
            this module does not understand); silently merging them would lose one.
    """
    out: dict[str, str] = {}
    seen: dict[str, str] = {}
    for key in keys:
        name = _canonical(model, key)
        if name in seen:
            raise ValueError(
                f"state-dict keys {seen[name]!r} and {key!r} both map to canonical name "
                f"{name!r}; the model's wrapper layout is ambiguous"
            )
        seen[name] = key
        out[key] = name
    return out


def canonical_module_names(model: nn.Module) -> dict[nn.Module, str]:
    """Canonical name of every (non-wrapper) module, by identity."""
    out: dict[nn.Module, str] = {}
    for fqn, module in model.named_modules(remove_duplicate=False):
        out.setdefault(module, _canonical(model, fqn))
    return out


def canonical_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter of ``model`` under its canonical name (FSDP2 models: call after
    ``view.reshard`` so these are the objects an optimizer holds)."""
    params = dict(model.named_parameters())
    names = canonical_names(model, params.keys())
    return {names[n]: p for n, p in params.items()}
