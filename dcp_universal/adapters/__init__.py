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
from typing import Any, Callable, cast

import torch
import torch.nn as nn

from dcp_universal._registry import Registry
from dcp_universal.errors import UnsupportedAdapterError

__all__ = ["AdapterKind", "Term", "SPLITS", "expert_pieces", "Magnitude", "Site", "register", "registered", "kind_of",
           "find_sites", "adapter_config", "is_conv1d", "LAYOUTS", "BASE_KEEPING_INITS",
           "base_changing_inits"]

#: the base-weight layouts an adapter kind may declare (:meth:`AdapterKind.layout`);
#: ``parameter``: an adapter on a parameter other than a layer's ``.weight`` (PEFT's
#: ``target_parameters``, e.g. a mixture of experts' fused ``gate_up_proj``)
LAYOUTS = ("linear", "conv1d", "embedding", "parameter")


@dataclasses.dataclass(frozen=True)
class Term:
    """One low-rank update ``scale * L @ R``: ``L`` is ``left`` (``left.T`` when
    ``left_transposed``), shaped ``(base rows, r)``; ``R`` is ``right`` (``right.T`` when
    ``right_transposed``), shaped ``(r, base columns)``. ``left`` and ``right`` are
    parameters of the adapted module.

    On a 3-D parameter of ``experts`` stacked matrices (a mixture of experts' fused
    ``(E, rows, columns)`` weight), expert ``e`` gets ``scale * L_e @ R_e``: each factor
    is split into ``E`` pieces as its ``*_split`` says (:data:`SPLITS`), and each piece
    is transposed where the term says so.
    """

    left: torch.Tensor
    right: torch.Tensor
    scale: float
    left_transposed: bool = False
    right_transposed: bool = False
    experts: int = 0
    left_split: str = ""
    right_split: str = ""


#: how a factor of an expert term holds its ``E`` pieces: ``rows``: ``(E * r, n)``, expert
#: ``e`` the rows ``e*r:(e+1)*r`` (PEFT's ``lora_A``); ``cols_strided``: ``(n, r * E)``,
#: expert ``e`` the columns ``e::E`` (PEFT's ``lora_B``); ``stacked``: ``(E, a, b)``
SPLITS = ("rows", "cols_strided", "stacked")


def expert_pieces(t: torch.Tensor, experts: int, split: str, transposed: bool) -> torch.Tensor:
    """The ``(E, a, b)`` view of an expert term's factor ``t`` (each piece transposed
    when ``transposed``)."""
    if split == "rows":
        out = t.reshape(experts, t.shape[0] // experts, t.shape[1])
    elif split == "cols_strided":
        out = t.reshape(t.shape[0], t.shape[1] // experts, experts).permute(2, 0, 1)
    elif split == "stacked":
        out = t
    else:
        raise ValueError(f"expert factor split {split!r}: expected one of {SPLITS}")
    return out.transpose(1, 2) if transposed else out


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

    def param(self, module: nn.Module) -> str:
        """The base parameter the update adds to (default ``"weight"``), a parameter of
        :meth:`base_module`."""
        return "weight"

    def base_module(self, module: nn.Module) -> nn.Module:
        """The module holding the adapted parameter: the base layer, or, where adapters
        nest (PEFT wraps a module once per targeted parameter), the innermost one."""
        base = getattr(module, self.base_attr(module))
        inner = kind_of(base)
        return inner.base_module(base) if inner is not None else base

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
        if self.param(module) != "weight":
            return "parameter"
        base = self.base_module(module)
        if isinstance(base, nn.Embedding):
            return "embedding"
        return "conv1d" if is_conv1d(base) else "linear"

    def canonical_key(self, module: nn.Module, local_key: str) -> str:
        """The canonical name of a key below ``module`` (``"base_layer.weight"`` ->
        ``"weight"``; adapter parameters keep their own names). Returns ``""`` for the
        base layer itself, which shares the adapted module's name.

        Where the base layer is itself an adapter (nested PEFT wrappers, one per targeted
        parameter of a module), the base's parameters lose every infix and the inner
        adapter's own parameters keep theirs (``base_layer.lora_A.default.weight``), so
        the two adapters' factors never share a name."""
        attr = self.base_attr(module)
        if local_key == attr:
            return ""
        if not local_key.startswith(attr + "."):
            return local_key
        rest = local_key[len(attr) + 1:]
        base = getattr(module, attr, None)
        inner = kind_of(base) if isinstance(base, nn.Module) else None
        if inner is None:
            return rest
        name = inner.canonical_key(cast(nn.Module, base), rest)  # inner: base is a module
        return local_key if name == rest else name


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
    """An adapted parameter, resolved: where it is and what to add to it.

    ``name`` identifies the site: the canonical module name for a layer's ``.weight``
    (``blocks.0.attn.q``), the canonical parameter key otherwise
    (``layers.0.mlp.experts.gate_up_proj``: one module may carry several sites).
    """

    name: str
    module: nn.Module
    kind: AdapterKind
    module_name: str = ""  # canonical module name; defaults to ``name``
    adapter_keys: dict[str, nn.Parameter] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.module_name = self.module_name or self.name

    @property
    def base(self) -> nn.Module:
        """The module holding the adapted parameter."""
        return self.kind.base_module(self.module)

    @property
    def param(self) -> str:
        return self.kind.param(self.module)

    @property
    def weight_key(self) -> str:
        """The canonical key of the adapted parameter."""
        return f"{self.module_name}.{self.param}"

    def terms(self) -> list[Term]:
        return self.kind.terms(self.module)

    def magnitude(self) -> Magnitude | None:
        return self.kind.magnitude(self.module)

    def update_tensors(self) -> list[torch.Tensor]:
        """Every tensor of the active update: each term's factors, then the magnitude."""
        m = self.magnitude()
        return [f for t in self.terms() for f in (t.left, t.right)] + ([m.vector] if m else [])

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """The adapter's own parameters (everything outside the base layer) by canonical
        key (set by :func:`find_sites`)."""
        return dict(self.adapter_keys)

    def structural_names(self) -> dict[str, str]:
        """Canonical base parameter key -> the same key with the base infix kept."""
        attr = self.kind.base_attr(self.module)
        if self.param != "weight":
            return {self.weight_key: f"{self.module_name}.{attr}.{self.param}"}
        return {f"{self.module_name}.{p}": f"{self.module_name}.{attr}.{p}"
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


def find_sites(model: nn.Module, name_of: Callable[[str], str | None]) -> list[Site]:
    """Every adapter in ``model``, sorted by site name (a collective-safe order).
    ``name_of`` gives the canonical name of a module or parameter path of ``model``.

    Raises:
        UnsupportedAdapterError: a prompt-learning PEFT adapter (prefix, prompt or
            p-tuning): its virtual tokens are not weights of the model, so no save of the
            model's weights could hold what it computes.
        ValueError: two adapters claim one parameter.
    """
    _refuse_prompt_learning(model)
    sites: dict[str, Site] = {}
    seen: set[int] = set()
    for fqn, module in model.named_modules(remove_duplicate=False):
        kind = kind_of(module) if id(module) not in seen else None
        module_name = name_of(fqn) if kind is not None else None
        if module_name is None:
            continue
        seen.add(id(module))  # a module reached by several paths is one site
        assert kind is not None  # module_name is set only with a kind
        param = kind.param(module)
        name = module_name if param == "weight" else f"{module_name}.{param}"
        if name in sites:
            raise ValueError(f"two adapters on {name!r}: one adapter per parameter")
        prefix = kind.base_attr(module) + "."
        keys = {name_of(f"{fqn}.{n}" if fqn else n): p
                for n, p in module.named_parameters() if not n.startswith(prefix)}
        keys.pop(None, None)
        site = Site(name=name, module=module, kind=kind, module_name=module_name,
                    adapter_keys=cast("dict[str, nn.Parameter]", keys))  # None popped
        site.terms()  # unsupported variants raise here, before anything is written
        sites[name] = site
    return [sites[n] for n in sorted(sites)]


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
