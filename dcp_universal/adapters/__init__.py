"""Adapter kinds: a public protocol and its registry.

An *adapter kind* describes one family of layers that add a low-rank update to a base
weight (the library's own :class:`~dcp_universal.lora.LoRALinear`, HF PEFT's LoRA
layers, ...). A kind answers five questions, and the rest of the library asks instead
of guessing from names:

* which modules it recognises (:meth:`AdapterKind.matches`);
* where the base layer is, hence the base parameter names
  (:meth:`AdapterKind.base_attr`: ``x.base_layer.weight`` is the base's ``x.weight``);
* the factors and the scale of each active update (:meth:`AdapterKind.terms`);
* the update as a function of the factors: every term is ``scale * L @ R`` with ``L``
  and ``R`` the factors, each transposed where the term says so, and a kind may rescale
  the sum (:meth:`AdapterKind.magnitude`: DoRA's ``m / ||W + sum(terms)||``, per row or
  per column). :func:`dcp_universal.adapters.merge.merge_block` computes the merged
  weight on any block of ``W``, and is the one function the sharded merge, the rank-0
  merge and the composed load all call; the norms a rescale needs are the one collective
  step before it (:func:`dcp_universal.adapters.merge.prepare`);
* how its state-dict keys map to canonical names (:meth:`AdapterKind.canonical_key`).

The library's own LoRA (:mod:`dcp_universal.lora`) and PEFT LoRA
(:mod:`dcp_universal.interop.peft`) are registered kinds; a new kind is one module that
calls :func:`register`::

    >>> class MyAdapterKind(AdapterKind):
    ...     name = "mine"
    ...     def matches(self, m): return isinstance(m, MyAdapter)
    ...     def terms(self, m): return [Term(left=m.up, right=m.down, scale=m.s)]
    ...     def reset(self, m): torch.nn.init.zeros_(m.up)
    >>> register(MyAdapterKind())
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn as nn

from dcp_universal._registry import Registry
from dcp_universal.errors import UnsupportedAdapterError

__all__ = ["AdapterKind", "Term", "Magnitude", "Site", "register", "registered", "kind_of",
           "find_sites", "adapter_config", "is_conv1d", "LAYOUTS", "BASE_KEEPING_INITS",
           "base_changing_inits"]

#: the base-weight layouts an adapter kind may declare (:meth:`AdapterKind.layout`)
LAYOUTS = ("linear", "conv1d", "embedding")


@dataclasses.dataclass(frozen=True)
class Term:
    """One low-rank update ``scale * L @ R``: ``L`` is ``left`` (``left.T`` when
    ``left_transposed``), shaped ``(base rows, r)``; ``R`` is ``right`` (``right.T`` when
    ``right_transposed``), shaped ``(r, base columns)``. ``left`` and ``right`` are
    parameters of the adapted module."""

    left: torch.Tensor
    right: torch.Tensor
    scale: float
    left_transposed: bool = False
    right_transposed: bool = False


@dataclasses.dataclass(frozen=True)
class Magnitude:
    """A rescale of the updated weight, as DoRA's: ``W' = (m / ||V||) * V`` with
    ``V = W + sum(terms)``. ``vector`` (``m``) holds one value per row of ``W``
    (``axis=0``) or per column (``axis=1``); ``||V||`` is the L2 norm of that row or
    column, taken over the other axis. ``vector`` is a parameter of the adapted module."""

    vector: torch.Tensor
    axis: int


class AdapterKind:
    """How to recognise, merge and name one family of adapter layers.

    Subclass it, set :attr:`name`, implement :meth:`matches`, :meth:`terms` and
    :meth:`reset`; override the others where the defaults do not fit.
    """

    #: stable identifier, recorded in manifests
    name: str = "abstract"

    def matches(self, module: nn.Module) -> bool:
        """True if ``module`` is an adapted layer of this kind."""
        raise NotImplementedError

    def base_attr(self, module: nn.Module) -> str:
        """The attribute of ``module`` holding the base layer; its parameters are the
        base parameters, named canonically without this infix."""
        return "base_layer"

    def terms(self, module: nn.Module) -> list[Term]:
        """The active updates. Raises
        :class:`~dcp_universal.errors.UnsupportedAdapterError` for variants whose
        update is not a sum of such terms (it is never skipped)."""
        raise NotImplementedError

    def magnitude(self, module: nn.Module) -> Magnitude | None:
        """The rescale of the updated weight, or ``None`` (plain LoRA: the default)."""
        return None

    def reset(self, module: nn.Module) -> None:
        """Make every update zero (fresh adapters), keeping the random factor; a kind
        with a :meth:`magnitude` sets it to the norms of the base weight it holds now
        (collective when the base is sharded across the norm's axis)."""
        raise NotImplementedError

    def config(self, module: nn.Module) -> dict[str, Any]:
        """What the manifest records about this module's adapter (rank, alpha, ...)."""
        return {}

    def layout(self, module: nn.Module) -> str:
        """How the base weight is laid out, which fixes how other tools' adapter formats
        store the factors (PEFT's ``lora_A`` / ``lora_B`` / ``lora_embedding_*``):
        ``"linear"`` (weight ``(out, in)``), ``"conv1d"`` (``(in, out)``, transformers'
        ``Conv1D``) or ``"embedding"`` (``(num, dim)``). Recorded in the manifest; by
        default read off the base layer's type."""
        base = getattr(module, self.base_attr(module))
        if isinstance(base, nn.Embedding):
            return "embedding"
        return "conv1d" if is_conv1d(base) else "linear"

    def canonical_key(self, module: nn.Module, local_key: str) -> str:
        """The canonical name of a key below ``module`` (``"base_layer.weight"`` ->
        ``"weight"``; adapter parameters keep their own names). Returns ``""`` for the
        base layer itself, which shares the adapted module's name."""
        attr = self.base_attr(module)
        if local_key == attr:
            return ""
        return local_key[len(attr) + 1:] if local_key.startswith(attr + ".") else local_key


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (GPT-2's weight layout ``(in, out)``), matched by
    class name so transformers is never imported here."""
    return any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers")
               for c in type(module).__mro__)


_KINDS: Registry[AdapterKind] = Registry("an adapter kind")


def register(kind: AdapterKind) -> AdapterKind:
    """Add ``kind`` to the registry (kinds are asked in registration order).

    Raises:
        ValueError: another kind is registered under the same name.
    """
    return _KINDS.add(kind)


def registered() -> list[AdapterKind]:
    return list(_KINDS)


def kind_of(module: nn.Module) -> AdapterKind | None:
    for kind in _KINDS:
        if kind.matches(module):
            return kind
    return None


@dataclasses.dataclass
class Site:
    """An adapted module, resolved: where its base weight is and what to add to it."""

    name: str  # canonical module name, e.g. "blocks.0.attn.q"
    module: nn.Module
    kind: AdapterKind

    @property
    def base(self) -> nn.Module:
        return getattr(self.module, self.kind.base_attr(self.module))

    @property
    def weight_key(self) -> str:
        return f"{self.name}.weight"

    def terms(self) -> list[Term]:
        return self.kind.terms(self.module)

    def magnitude(self) -> Magnitude | None:
        return self.kind.magnitude(self.module)

    def update_tensors(self) -> list[torch.Tensor]:
        """Every tensor of the active update: each term's factors, then the magnitude."""
        m = self.magnitude()
        return [f for t in self.terms() for f in (t.left, t.right)] + ([m.vector] if m else [])

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """The adapter's own parameters (everything outside the base layer), by their
        canonical local names (the kind's :meth:`AdapterKind.canonical_key`)."""
        prefix = self.kind.base_attr(self.module) + "."
        return {self.kind.canonical_key(self.module, n): p
                for n, p in self.module.named_parameters() if not n.startswith(prefix)}

    def structural_names(self) -> dict[str, str]:
        """Canonical base parameter key -> the same key with the base infix kept."""
        attr = self.kind.base_attr(self.module)
        return {f"{self.name}.{p}": f"{self.name}.{attr}.{p}"
                for p, _ in self.base.named_parameters()}


def _refuse_prompt_learning(model: nn.Module) -> None:
    configs = getattr(model, "peft_config", None)  # a PeftModel's adapters, by name
    if not isinstance(configs, dict):
        return
    for name, cfg in sorted(configs.items()):
        if getattr(cfg, "is_prompt_learning", False):
            kind = getattr(getattr(cfg, "peft_type", None), "value", cfg.__class__.__name__)
            raise UnsupportedAdapterError(
                f"PEFT adapter {name!r} is {kind} (prompt learning): its virtual tokens live "
                "outside the model's weights, so a checkpoint of the weights would load as the "
                "untuned base -> save it with PEFT's save_pretrained(), or tune with LoRA")


#: PEFT initialisations known to keep the base weights as they are (the update starts at
#: zero, or is random on top of the untouched base). Any other one (PiSSA, OLoRA, CorDA,
#: LoftQ, LoRA-GA, ASTRA, ... and every one added after this list) is taken as changing
#: the base: the trained factors then complete the residual base the model holds, not
#: the original one. An allow-list, so a new initialisation is never exported as plain
#: LoRA by mistake.
BASE_KEEPING_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica", "nora")


def base_changing_inits(model: nn.Module) -> dict[str, str]:
    """Adapter name -> its PEFT ``init_lora_weights`` where that is not known to keep the
    base (:data:`BASE_KEEPING_INITS`)."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        return {}
    out = {}
    for name, cfg in configs.items():
        init = getattr(cfg, "init_lora_weights", True)
        known = any(init is k for k in (True, False)) or (
            isinstance(init, str) and init.lower() in BASE_KEEPING_INITS)
        if not known:
            out[name] = str(init)
    return out


def find_sites(model: nn.Module, module_names: dict[nn.Module, str]) -> list[Site]:
    """Every adapter in ``model``, sorted by canonical name (a collective-safe order).

    Raises:
        UnsupportedAdapterError: a prompt-learning PEFT adapter (prefix, prompt or
            p-tuning): its virtual tokens are not weights of the model, so no save of the
            model's weights could hold what it computes.
    """
    _refuse_prompt_learning(model)
    sites = []
    for module, name in module_names.items():
        kind = kind_of(module)
        if kind is not None:
            site = Site(name=name, module=module, kind=kind)
            site.terms()  # unsupported variants raise here, before anything is written
            sites.append(site)
    return sorted(sites, key=lambda s: s.name)


def adapter_config(sites: list[Site]) -> dict[str, Any]:
    """What the manifest records about the adapters: kinds, per-module config and base
    layouts."""
    layouts = {s.name: s.kind.layout(s.module) for s in sites}
    bad = {n: v for n, v in layouts.items() if v not in LAYOUTS}
    if bad:
        raise ValueError(f"adapter kinds declared layouts {bad}; expected one of {LAYOUTS}")
    return {
        "kinds": sorted({s.kind.name for s in sites}),
        "modules": {s.name: s.kind.config(s.module) for s in sites},
        "layouts": layouts,
    }
