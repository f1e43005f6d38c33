"""Canonical parameter names: the names a plain, unwrapped, unadapted model has.

A state-dict key is mapped by walking the module tree along the key's parts; an edge
from a wrapper module to the module it wraps contributes nothing to the name. Walking
the tree (rather than deleting substrings) means a user module that happens to be called
``module`` or ``model`` keeps its name unless it really is a DDP or PEFT wrapper's child.
Below an adapted module, its adapter kind maps the rest of the key
(:meth:`~dcp_universal.adapters.AdapterKind.canonical_key`).

A PEFT ``modules_to_save`` wrapper holds two copies of its module: the active adapter's
trained copy, named as the module itself (``head.weight``), and the frozen original that
``disable_adapter()`` computes with, named with an explicit ``original_module`` part
(``head.original_module.weight``, :data:`ORIGINAL`): a name that cannot collide with the
trained copy's, and that a plain model never has (:func:`stored_originals`).
"""

from __future__ import annotations

from typing import Any, Callable, cast

import torch.nn as nn

from dcp_universal import _torch_compat, adapters

__all__ = ["Namer", "ORIGINAL", "canonical_names", "canonical_module_names",
           "canonical_parameters", "stored_originals"]

#: the part of a canonical name that marks a PEFT ``modules_to_save`` frozen original
ORIGINAL = "original_module"


def _type_named(*qualnames: str) -> Callable[[nn.Module], bool]:
    # Matched by qualified class name so optional packages (peft) are never imported
    # just to recognise their wrappers.
    by_type: dict[type, bool] = {}  # a class's answer never changes

    def match(module: nn.Module) -> bool:
        cls = type(module)
        if cls not in by_type:
            by_type[cls] = any(
                f"{c.__module__}.{c.__qualname__}" in qualnames or c.__qualname__ in qualnames
                for c in cls.__mro__)
        return by_type[cls]

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


_is_modules_to_save = _type_named("peft.utils.other.ModulesToSaveWrapper")


def _visible_branch(wrapper: nn.Module) -> tuple[str, ...]:
    """The path below a PEFT ``ModulesToSaveWrapper`` that the model computes with: the
    active adapter's trainable copy, or the frozen original when adapters are off."""
    w: Any = wrapper  # peft's attributes, which torch's Module stubs type as Tensor | Module
    active = [] if w.disable_adapters else list(w.active_adapters)
    if active and active[0] in w.modules_to_save:
        return ("modules_to_save", active[0])
    return (ORIGINAL,)


def _walk(model: nn.Module, fqn: str, memo: dict | None) -> str | None:
    """The canonical name of one state-dict key, parameter or module name of ``model``.

    Below a PEFT ``modules_to_save`` wrapper the branch the model computes with is named
    as the module; the frozen original, when it is not that branch, keeps its
    :data:`ORIGINAL` part; an inactive adapter's copy gives ``None`` (no name: not saved,
    not loaded). ``memo`` (shared by the names of one model) remembers the walk's state
    after each prefix, so names that share a prefix walk it once."""
    parts = fqn.split(".") if fqn else []
    module: nn.Module | None = model
    kept: list[str] = []
    i = 0
    if memo is not None:
        for j in range(len(parts) - 1, 0, -1):  # resume after the longest prefix walked
            hit = memo.get(tuple(parts[:j]))
            if hit is not None:
                module, kept, i = hit[0], list(hit[1]), j
                break
    while i < len(parts):
        if memo is not None and i:
            memo[tuple(parts[:i])] = (module, tuple(kept))
        part = parts[i]
        # Some wrappers (activation checkpointing, FSDP1) already drop their own infix
        # from state-dict keys: step through them without consuming a part.
        while module is not None and _child(module, part) is None and _wrapped(module) is not None:
            module = _wrapped(module)
        kind = adapters.kind_of(module) if module is not None else None
        if kind is not None:  # the adapter's kind names everything below it
            rest = kind.canonical_key(cast(nn.Module, module), ".".join(parts[i:]))
            kept.extend(rest.split(".") if rest else [])
            break
        if module is not None and _is_modules_to_save(module) and \
                part in ("modules_to_save", ORIGINAL):
            branch = _visible_branch(module)
            if tuple(parts[i:i + len(branch)]) == branch:
                module = module.get_submodule(".".join(branch))
                i += len(branch)
            elif part == ORIGINAL:  # the frozen original beside the trained copy
                kept.append(ORIGINAL)
                module = module.get_submodule(ORIGINAL)
                i += 1
            else:
                return None
            continue
        child = _child(module, part) if module is not None else None
        if child is not None and _is_wrapper_edge(cast(nn.Module, module), part):
            module = child
            i += 1
            continue
        kept.append(part)
        module = child
        i += 1
    return ".".join(kept)


def _is_plain(model: nn.Module) -> bool:
    """No wrapper, adapter or ``modules_to_save`` anywhere: every name is canonical as
    it is (checked by class, once per module; the walk costs far more)."""
    return not any(any(is_wrapper(m) for is_wrapper, _ in _WRAPPER_EDGES)
                   or _is_modules_to_save(m) or adapters.kind_of(m) is not None
                   for m in model.modules())


class Namer:
    """Canonical names of one model, for many names at once: whether the model is plain
    is decided once, and walks share their prefixes. Build it when the model is as it
    will be loaded or saved (a later wrapper or adapter is not seen)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._memo: dict | None = None if _is_plain(model) else {}

    def name(self, fqn: str) -> str | None:
        return fqn if self._memo is None else _walk(self.model, fqn, self._memo)

    def names(self, keys) -> dict[str, str]:
        """See :func:`canonical_names`."""
        if self._memo is None:
            return {key: key for key in keys}
        out: dict[str, str] = {}
        seen: dict[str, str] = {}
        for key in keys:
            name = self.name(key)
            if name is None:
                continue
            if name in seen:
                raise ValueError(
                    f"state-dict keys {seen[name]!r} and {key!r} both map to canonical name "
                    f"{name!r}; the model's wrapper layout is ambiguous"
                )
            seen[name] = key
            out[key] = name
        return out

    def module_names(self) -> dict[nn.Module, str]:
        """See :func:`canonical_module_names`."""
        out: dict[nn.Module, str] = {}
        for fqn, module in self.model.named_modules(remove_duplicate=False):
            name = self.name(fqn)
            if name is not None:
                out.setdefault(module, name)
        return out

    def originals(self, keys) -> dict[str, str]:
        """The PEFT ``modules_to_save`` frozen originals among state-dict ``keys`` (of
        wrappers that compute with their trained copy): canonical name -> the name of the
        same tensor in the plain module (``head.original_module.weight`` ->
        ``head.weight``), the value a checkpoint without originals holds for it."""
        if self._memo is None:
            return {}
        wrappers = {self.name(fqn) for fqn, m in self.model.named_modules()
                    if _is_modules_to_save(m) and _visible_branch(m) != (ORIGINAL,)}
        out: dict[str, str] = {}
        for key in keys:
            name = self.name(key)
            value = _without_original(name, lambda module: module in wrappers) \
                if name is not None else None
            if value is not None:
                out[cast(str, name)] = value  # a value needs a name
        return out

    def parameters(self) -> dict[str, nn.Parameter]:
        """See :func:`canonical_parameters`."""
        params = dict(self.model.named_parameters())
        names = self.names(params.keys())
        return {names[n]: p for n, p in params.items() if n in names}


def _without_original(name: str, is_wrapper: Callable[[str], bool]) -> str | None:
    """``name`` without its :data:`ORIGINAL` part, the first one that follows a module
    for which ``is_wrapper(module name)``; ``None`` if it has no such part."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part == ORIGINAL and is_wrapper(".".join(parts[:i])):
            return ".".join(parts[:i] + parts[i + 1:])
    return None


def stored_originals(keys) -> dict[str, str]:
    """The PEFT ``modules_to_save`` originals among a checkpoint's canonical ``keys``,
    each -> the key of its module's value (``head.original_module.weight`` ->
    ``head.weight``). Known by name: a key with an :data:`ORIGINAL` part whose name
    without it is among ``keys`` too (the trained copy, saved beside it)."""
    keys = set(keys)
    out: dict[str, str] = {}
    for key in keys:
        value = _without_original(key, lambda module: True)
        if value is not None and value in keys:
            out[key] = value
    return out


def canonical_names(model: nn.Module, keys) -> dict[str, str]:
    """Map each state-dict key of ``model`` to its canonical name (an inactive PEFT
    adapter's ``modules_to_save`` copy, which has none, see :func:`_walk`, is left out).

    Raises:
        ValueError: two keys map to one canonical name (a model whose wrapper layout
            this module does not understand); silently merging them would lose one.
    """
    return Namer(model).names(keys)


def canonical_module_names(model: nn.Module) -> dict[nn.Module, str]:
    """Canonical name of every module that has one (see :func:`_walk`), by identity."""
    return Namer(model).module_names()


def canonical_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter of ``model`` under its canonical name (FSDP2 models: call after
    ``view.reshard`` so these are the objects an optimizer holds)."""
    return Namer(model).parameters()
