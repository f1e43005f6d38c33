"""bitsandbytes 4-bit layers (QLoRA bases), in one place.

A QLoRA model (``from_pretrained(..., quantization_config=BitsAndBytesConfig(
load_in_4bit=True))`` then ``get_peft_model``) holds each base Linear as bitsandbytes'
``Linear4bit``: its ``weight`` is packed bytes (uint8 ``(numel / 2, 1)``, two 4-bit codes
a byte) and its quantization state (``absmax``, ``quant_map``, with double quantization
``nested_absmax`` and ``nested_quant_map``, and the non-tensor fields packed into a
JSON blob, ``quant_state.bitsandbytes__nf4``) lives beside it. The library sees such a
weight two ways:

* **stored**, for the frozen base of a LoRA step: the packed bytes under the weight's
  canonical name and the state under ``<name>.<suffix>``, the keys bitsandbytes and
  transformers write (:meth:`Live4bit.stored`). An exact resume rebuilds the weight from
  them with ``Params4bit.from_prequantized`` (:func:`rebuild`), never by copying into a
  live ``QuantState``: part of the state (the blob's ``nested_offset``, a cloned
  ``nested_quant_map``) never reaches it that way.
* **dequantized**, for everything universal (``save_model``, a step's merged ``model/``,
  exports, loads into a model that is not 4-bit): ``dequantize_4bit`` of the bytes, in
  the layer's compute dtype (:meth:`Live4bit.dequantized`, :func:`dequantize`). The merge
  code sees this float weight as the base, so a LoRA update merges into it like into
  any other.

Layers are recognised by class name, so nothing here imports bitsandbytes unless a
model or a checkpoint holds 4-bit weights. 8-bit layers (``Linear8bitLt``) are refused.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from dcp_universal._torch_compat import local_block
from dcp_universal.errors import CheckpointError, UnsupportedAdapterError
from dcp_universal.format.manifest import Quantization

__all__ = ["Quantization", "Live4bit", "is_4bit", "is_8bit", "refuse_unsupported",
           "live_weights", "stored_keys",
           "dequantize", "rebuild", "STATE_BLOB"]

#: the stored key suffix of the packed non-tensor fields, followed by the quant type
STATE_BLOB = "quant_state.bitsandbytes__"
_STATS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def _bnb_class(module: nn.Module, name: str) -> bool:
    return any(c.__name__ == name and c.__module__.startswith("bitsandbytes")
               for c in type(module).__mro__)


def is_4bit(module: nn.Module) -> bool:
    """True for bitsandbytes' ``Linear4bit`` (not PEFT's wrapper of the same name)."""
    return _bnb_class(module, "Linear4bit")


def is_8bit(module: nn.Module) -> bool:
    return _bnb_class(module, "Linear8bitLt")


def _bitsandbytes(what: str):
    try:
        import bitsandbytes
    except ImportError:
        raise CheckpointError(f"{what} needs bitsandbytes, which is not installed -> pip "
                              "install bitsandbytes") from None
    return bitsandbytes


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclasses.dataclass
class Live4bit:
    """A 4-bit weight of a live model.

    Attributes:
        module: the ``Linear4bit``.
        packed: its weight as the state dict holds it (a ``Params4bit``; under FSDP2 a
            uint8 DTensor sharded over the packed bytes).
        stats: the quantization state, stored suffix -> tensor (``absmax``, ...,
            ``quant_state.bitsandbytes__nf4``): the layer's own ``quant_state``, which
            FSDP2's state dict leaves out.
        quantization: what the state says, for records and comparisons.
    """

    module: nn.Module
    packed: torch.Tensor
    stats: dict[str, torch.Tensor]
    quantization: Quantization

    def stored(self, key: str) -> dict[str, torch.Tensor]:
        """The stored keys of the weight named ``key``: bytes and state."""
        return {key: self.packed, **{f"{key}.{s}": t for s, t in self.stats.items()}}

    @torch.no_grad()
    def dequantized(self) -> torch.Tensor:
        """The weight in its compute dtype, whole, on every rank (collective when the
        bytes are sharded: one ``full_tensor()``; a 4-bit block may straddle shards)."""
        bnb = _bitsandbytes("dequantizing a 4-bit weight")
        packed = self.packed.full_tensor() if isinstance(self.packed, DTensor) else self.packed
        out = bnb.functional.dequantize_4bit(packed.data, _quant_state(self.module))
        return out.to(getattr(torch, self.quantization.compute_dtype))


def _quant_state(module: nn.Module):
    """The state the layer computes with: its weight's (FSDP2's sharded weight has
    none; the layer keeps it, as bitsandbytes' own forward reads it)."""
    return getattr(module.weight, "quant_state", None) or module.quant_state


def refuse_unsupported(model: nn.Module) -> None:
    """Raise for quantized layers no checkpoint can hold exactly. Call it before the
    model's ``state_dict()``, which undoes a CPU repack in place, lossily.

    Raises:
        UnsupportedAdapterError: an 8-bit layer (``Linear8bitLt``).
        CheckpointError: a 4-bit weight repacked by bitsandbytes' CPU inference path.
    """
    for fqn, module in model.named_modules():
        if is_8bit(module):
            raise UnsupportedAdapterError(
                f"{fqn!r} is a bitsandbytes 8-bit layer (Linear8bitLt): dcp_universal stores "
                "4-bit bases (QLoRA) but not 8-bit ones -> merge the adapters with PEFT's "
                "merge_and_unload() and save the model loaded without quantization, or "
                "quantize the base in 4 bits (load_in_4bit=True)")
        if is_4bit(module) and getattr(_quant_state(module), "packing_format_for_cpu", False):
            raise CheckpointError(
                f"the 4-bit weight of {fqn!r} was repacked in place by bitsandbytes' CPU "
                "inference path (AVX512-BF16: an eval-mode forward without grad), which "
                "rewrites its bytes and quantization state, and a state_dict() of it only "
                "approximately undoes that; no checkpoint of it restores the model it was -> "
                "set support_avx512bf16_for_cpu = False on every Linear4bit (or keep the "
                "model in train mode) before any such forward, and rebuild the model")


def live_weights(model: nn.Module, names: dict[str, str]) -> tuple[dict[str, Live4bit], set[str]]:
    """The model's 4-bit weights by canonical name, and the state-dict keys of their
    quantization state (which the caller leaves out of the plain tensors).

    ``names``: state-dict key -> canonical name, as the caller computed them.
    """
    out: dict[str, Live4bit] = {}
    state_keys: set[str] = set()
    for fqn, module in model.named_modules():
        key = names.get(f"{fqn}.weight") if is_4bit(module) else None
        if key is None:
            continue
        state = _quant_state(module)
        stats = state.as_dict(packed=True)
        state_keys.update(f"{fqn}.weight.{s}" for s in stats)
        compute = module.compute_dtype if module.compute_dtype is not None else state.dtype
        out[key] = Live4bit(module, module.weight, stats, Quantization(
            quant_type=state.quant_type, blocksize=int(state.blocksize),
            double_quant=bool(state.nested), compute_dtype=_dtype_name(compute),
            dtype=_dtype_name(state.dtype), shape=tuple(int(n) for n in state.shape)))
    return out, state_keys


def stored_keys(keys, weight: str) -> list[str]:
    """The keys among ``keys`` holding the stored quantization state of ``weight``."""
    prefix = f"{weight}."
    return sorted(k for k in keys if k.startswith(prefix) and (
        k[len(prefix):] in _STATS or k[len(prefix):].startswith(STATE_BLOB)))


@torch.no_grad()
def dequantize(packed: torch.Tensor, stats: dict[str, torch.Tensor],
               q: Quantization) -> torch.Tensor:
    """A stored 4-bit weight (``stats``: its state by stored suffix) in its compute
    dtype."""
    bnb = _bitsandbytes("reading a 4-bit weight")
    state = bnb.functional.QuantState.from_dict(dict(stats), device=packed.device)
    out = bnb.functional.dequantize_4bit(packed, state)
    return out.to(getattr(torch, q.compute_dtype)).reshape(q.shape)


@torch.no_grad()
def rebuild(live: Live4bit, packed: torch.Tensor, stats: dict[str, torch.Tensor]) -> None:
    """Install stored bytes and state in ``live``'s layer, exactly as saved.

    ``Params4bit.from_prequantized`` builds a fresh ``QuantState`` (and sets the layer's
    ``quant_state``). Without FSDP the result replaces the layer's weight; under FSDP2,
    which owns the sharded parameter, its local bytes are copied into the shard and the
    layer keeps the new state (FSDP2's forward takes it from the layer).
    """
    bnb = _bitsandbytes("restoring a 4-bit weight")
    module = live.module
    current = module.weight
    local = current.to_local() if isinstance(current, DTensor) else current
    rebuilt = bnb.nn.Params4bit.from_prequantized(
        data=packed, quantized_stats=dict(stats), requires_grad=False, device=local.device,
        module=module)
    if isinstance(current, DTensor):
        block, offsets = local_block(current)
        block.copy_(rebuilt.data[offsets[0]:offsets[0] + block.shape[0]])
    else:
        module.weight = rebuilt
