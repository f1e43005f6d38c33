"""A model seen through canonical names: built once per save or load and passed to
every part that needs it (model, adapters, optimizer, frozen base)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from dcp_universal import adapters
from dcp_universal._torch_compat import local_block
from dcp_universal.errors import CheckpointMismatchError
from dcp_universal.format.manifest import AdapterMagnitude, AdapterTerm, Adapters, Mesh
from dcp_universal.model import bnb
from dcp_universal.model.names import Namer

__all__ = ["ModelView", "reshard", "local_block"]


def reshard(model: nn.Module) -> None:
    """Put FSDP2 modules back in their sharded state.

    After a forward (e.g. an eval) FSDP2's root keeps its parameters unsharded, and
    ``named_parameters()`` then yields other objects than the ones the optimizer holds.
    """
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _ties(namer: Namer, tensors: dict[str, torch.Tensor]) -> list[tuple[str, ...]]:
    """Canonical keys sharing one parameter or buffer, found by identity of the module
    attributes (``state_dict()`` returns a fresh tensor object per key, and under FSDP2
    the local shards of unrelated empty tensors may share an address)."""
    model = namer.model
    named = [*model.named_parameters(remove_duplicate=False),
             *model.named_buffers(remove_duplicate=False)]
    by_id: dict[int, list[str]] = {}
    for fqn, t in named:
        by_id.setdefault(id(t), []).append(fqn)
    groups = []
    for fqns in by_id.values():  # only shared tensors need names
        names = tensors.keys() & {namer.name(f) for f in fqns} if len(fqns) > 1 else ()
        if len(names) > 1:
            groups.append(tuple(sorted(names)))
    return sorted(groups)


def _own_originals(namer: Namer, originals: dict[str, str]) -> dict[str, str]:
    """The PEFT ``modules_to_save`` originals (``namer.originals``) that are tensors of
    their own. One bound to a tensor that has another name (PEFT keeps a tied head's
    original as the token embedding itself) is that name's: saved and loaded once,
    under it (two loads into one tensor could disagree)."""
    model = namer.model
    by_id: dict[int, set] = {}
    for fqn, t in [*model.named_parameters(remove_duplicate=False),
                   *model.named_buffers(remove_duplicate=False)]:
        by_id.setdefault(id(t), set()).add(namer.name(fqn))
    shared = {n for names in by_id.values() if names - originals.keys() - {None}
              for n in names}
    return {k: v for k, v in originals.items() if k not in shared}


def _non_persistent(namer: Namer, sd: dict) -> list[str]:
    names = {namer.name(n) for n, _ in namer.model.named_buffers() if n not in sd}
    return sorted(n for n in names if n is not None)


@dataclasses.dataclass
class ModelView:
    """A model seen through canonical names.

    Attributes:
        model: the model itself.
        tensors: canonical key -> tensor (DTensor under FSDP2) for everything that is
            not an adapter's own parameter; adapted base weights appear under their
            plain name (``x.weight``).
        adapter_tensors: canonical key -> tensor for adapter parameters (``x.lora_A``).
        sites: adapted modules, sorted by name.
        structural: canonical key -> name with the adapter infix (``x.base_layer.weight``).
        frozen: canonical keys of frozen (``requires_grad=False``) non-adapter parameters.
        params: canonical key -> parameter (the objects an optimizer holds).
        param_keys: ``id(parameter)`` -> canonical key.
        ties: groups of canonical keys in ``tensors`` that name one shared tensor (a
            token embedding tied to the output head), each group sorted; groups sorted.
        non_persistent: canonical names of buffers outside the state dict (rotary
            ``inv_freq``): no checkpoint holds them, the model's own code sets them.
        originals: canonical key (``head.original_module.weight``) -> tensor of each
            PEFT ``modules_to_save`` frozen original (what ``disable_adapter()``
            computes with). Not in ``tensors``: the model computes with the trained
            copy, so merged writes (``model/``, exports) leave them out; they are
            frozen (in ``frozen``), so a LoRA step keeps them with its base.
        original_of: original key -> the key of its module's value (``head.weight``),
            which fills it from a checkpoint that stores no originals.
        quantized: canonical key -> each 4-bit weight (bitsandbytes ``Linear4bit``,
            :mod:`~dcp_universal.model.bnb`). ``tensors`` holds it dequantized (what
            merges, ``model/`` and exports see); the frozen base holds its packed bytes
            and quantization state (:meth:`frozen_tensors`).
    """

    model: nn.Module
    tensors: dict[str, torch.Tensor]
    adapter_tensors: dict[str, torch.Tensor]
    sites: list[adapters.Site]
    structural: dict[str, str]
    frozen: set[str]
    params: dict[str, nn.Parameter]
    param_keys: dict[int, str]
    ties: list[tuple[str, ...]]
    non_persistent: list[str]
    originals: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    original_of: dict[str, str] = dataclasses.field(default_factory=dict)
    quantized: dict[str, bnb.Live4bit] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, model: nn.Module) -> "ModelView":
        bnb.refuse_unsupported(model)  # before state_dict(), which changes a repacked one
        reshard(model)
        sd = model.state_dict()
        namer = Namer(model)
        names = namer.names(sd.keys())
        # 4-bit weights: their state is stored with the base, never as plain tensors
        quantized, state_keys = bnb.live_weights(model, names)
        sites = adapters.find_sites(model, namer.name)
        adapter_keys: set[str] = set()
        structural: dict = {}
        for site in sites:
            adapter_keys.update(site.adapter_params())
            structural.update(site.structural_names())
        every_original = namer.originals(sd.keys())
        original_of = _own_originals(namer, every_original)
        tensors: dict[str, Any] = {}
        adapter_tensors: dict[str, Any] = {}
        originals: dict[str, Any] = {}
        for key, value in sd.items():
            name = names.get(key)
            if name is None or key in state_keys or (
                    name in every_original and name not in original_of):
                continue  # an inactive adapter's copy; an original saved under its tie
            if name in quantized:
                value = quantized[name].dequantized()
            (originals if name in original_of else
             adapter_tensors if name in adapter_keys else tensors)[name] = value
        params = namer.parameters()
        frozen = {n for n, p in params.items() if not p.requires_grad and n not in adapter_keys
                  and (n in tensors or n in originals)}
        frozen.update(originals)  # buffers too: the original never changes
        ties = _ties(namer, tensors)
        # named_parameters() lists a tied parameter once: its other names are frozen too
        frozen.update(k for g in ties if frozen.intersection(g) for k in g)
        return cls(model, tensors, adapter_tensors, sites, structural, frozen, params,
                   {id(p): n for n, p in params.items()}, ties, _non_persistent(namer, sd),
                   originals, original_of, quantized)

    def optimizer_param_names(self, optimizer: torch.optim.Optimizer) -> dict[int, str]:
        """``id(parameter) -> canonical name`` for the parameters ``optimizer`` holds
        (and the model's others).

        Raises:
            CheckpointError: the optimizer holds tensors that are not this model's
                parameters (built before wrapping, or from another model).
        """
        unknown = [p for g in optimizer.param_groups for p in g["params"]
                   if id(p) not in self.param_keys]
        if unknown:
            raise CheckpointMismatchError(
                f"the optimizer holds {len(unknown)} tensors that are not parameters of the "
                "model passed with it; build the optimizer from this model's parameters "
                "(after wrapping)")
        return self.param_keys

    def tie_of(self, key: str) -> tuple[str, ...]:
        """The tie group holding ``key``, or ``(key,)``."""
        for group in self.ties:
            if key in group:
                return group
        return (key,)

    def frozen_tensors(self) -> dict[str, torch.Tensor]:
        """Everything a LoRA run's shared base holds: the frozen weights and the PEFT
        ``modules_to_save`` originals."""
        every = {**self.tensors, **self.originals}
        out = {}
        for k in sorted(self.frozen):
            out.update(self.quantized[k].stored(k) if k in self.quantized else {k: every[k]})
        return out

    def quantization(self) -> dict[str, bnb.Quantization]:
        """How each 4-bit weight is quantized, by canonical key (the manifest's record)."""
        return {k: q.quantization for k, q in sorted(self.quantized.items())}

    def trainable_tensors(self) -> dict[str, torch.Tensor]:
        """Everything a LoRA step's ``adapters/`` holds: all but the frozen base."""
        return {**{k: v for k, v in self.tensors.items() if k not in self.frozen},
                **self.adapter_tensors}

    def adapters_record(self) -> Adapters:
        """The manifest's description of the adapters: enough to merge them from disk."""
        def term(t: adapters.Term) -> AdapterTerm:
            return AdapterTerm(left=self.param_keys[id(t.left)], right=self.param_keys[id(t.right)],
                               scale=t.scale, left_t=t.left_transposed, right_t=t.right_transposed,
                               experts=t.experts, left_split=t.left_split,
                               right_split=t.right_split)

        config = adapters.adapter_config(self.sites)
        inits = adapters.base_changing_inits(self.model)
        for s in self.sites:  # a PEFT adapter whose initialisation changed the base
            used = sorted({inits[a] for a in getattr(s.module, "active_adapters", ())
                           if a in inits})
            if used:
                config["modules"][s.name] = {**config["modules"][s.name],
                                             "init_lora_weights": used[0]}
        sites = {s.name: [term(t) for t in s.terms()] for s in self.sites}
        magnitudes = {s.name: AdapterMagnitude(self.param_keys[id(m.vector)], m.axis)
                      for s in self.sites if (m := s.magnitude()) is not None}
        record = Adapters(kinds=config["kinds"], modules=config["modules"], sites=sites,
                          layouts=config["layouts"], buffers=self.trainable_buffers(),
                          magnitudes=magnitudes)
        record.idle = sorted(set(self.adapter_tensors) - record.factor_keys())
        return record

    def trainable_buffers(self) -> list[str]:
        """Buffers among :meth:`trainable_tensors` (state, not trained parameters); a
        name tied to a parameter is a parameter."""
        params = set(self.params)
        params.update(k for g in self.ties if params.intersection(g) for k in g)
        return sorted(k for k in self.tensors if k not in self.frozen and k not in params)

    def active_factor_keys(self) -> set[str]:
        """Canonical keys of the factors (and magnitudes) of every update the model adds
        now (active, enabled, unmerged adapters)."""
        return {self.param_keys[id(f)] for s in self.sites for f in s.update_tensors()}

    def mesh(self) -> Mesh | None:
        for t in self.tensors.values():
            if isinstance(t, DTensor):
                return Mesh(shape=list(t.device_mesh.shape), placements=[str(p) for p in t.placements])
        return None

    def dtypes(self) -> list[str]:
        return sorted({str(t.dtype) for t in self.tensors.values()})
