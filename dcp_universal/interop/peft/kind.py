"""PEFT's LoRA layers as an adapter kind (:class:`PeftLoRAKind`): LoRA on Linear (and
transformers' Conv1D, with ``fan_in_fan_out``), Embedding and MoE expert parameters
(``ParamWrapper``), DoRA, QLoRA and MiCA; PEFT is recognised by class name, never imported."""

from __future__ import annotations

import torch

from dcp_universal import adapters
from dcp_universal.adapters import Term, merge
from dcp_universal.errors import UnsupportedAdapterError
from dcp_universal.model import bnb
from dcp_universal.model.view import local_block

__all__ = ["PeftLoRAKind"]

_TUNER_LAYER: dict[type, bool] = {}
#: PEFT's LoRA layer on a bitsandbytes ``Linear4bit``
_QLORA = "peft.tuners.lora.bnb.Linear4bit"


#: PEFT LoRA variants whose forward and merge are plain LoRA's (``W + scale * B @ A``):
#: MiCA only changes the initialisation and freezes ``B``
_PLAIN_VARIANTS = ("MiCALinearVariant", "MiCAEmbeddingVariant")


class PeftLoRAKind(adapters.AdapterKind):
    """HF PEFT LoRA on Linear and Embedding. The scale is the layer's own ``scaling``
    (so rsLoRA's ``alpha / sqrt(r)`` is honoured); adapters already merged into the base
    (``merge_adapter``) or disabled add nothing.

    DoRA (``use_dora=True``) is LoRA plus a :class:`~dcp_universal.adapters.Magnitude`:
    PEFT's merge is ``(m / ||W + scale * B @ A||) * (W + scale * B @ A)``, the norm per
    output feature: per row of a Linear's ``(out, in)`` weight, per column of a Conv1D's
    ``(in, out)`` one and of an Embedding's ``(num, dim)``. One DoRA adapter per module
    (PEFT's forward with several is no single rescale)."""

    name = "peft.lora"

    def matches(self, module):
        cls = type(module)
        if cls not in _TUNER_LAYER:  # a class's answer never changes
            _TUNER_LAYER[cls] = any(c.__module__.startswith("peft.tuners")
                                    and c.__name__ == "BaseTunerLayer" for c in cls.__mro__)
        return _TUNER_LAYER[cls]

    def _check(self, module) -> str:
        cls = type(module)
        qual = f"{cls.__module__}.{cls.__qualname__}"
        if qual == _QLORA:  # LoRA on a 4-bit base: the merge sees it dequantized (model.bnb)
            return "Linear"
        if not qual.startswith("peft.tuners.lora.") or cls.__name__ not in (
                "Linear", "Embedding", "ParamWrapper"):
            raise UnsupportedAdapterError(
                f"{qual} is not supported: dcp_universal merges PEFT LoRA Linear and Embedding "
                "layers, Linear on a bitsandbytes 4-bit base (QLoRA) and LoRA on parameters "
                "(target_parameters) only; merge this adapter with PEFT's merge_and_unload() "
                "before saving"
            )
        return cls.__name__

    def param(self, module):
        return module.parameter_name if self._check(module) == "ParamWrapper" else "weight"

    def _active(self, module) -> list[str]:
        if module.disable_adapters:
            return []
        return [a for a in module.active_adapters
                if a not in module.merged_adapters
                and (a in module.lora_A or a in module.lora_embedding_A)]

    def terms(self, module):
        kind = self._check(module)
        out = []
        active = self._active(module)
        for a in active:
            self._check_variant(module, a, active)
            if getattr(module, "lora_bias", {}).get(a, False):
                raise UnsupportedAdapterError(
                    f"PEFT adapter {a!r} on {type(module).__name__} has lora_bias=True: its "
                    "lora_B bias adds to the layer's output, which a merge into W would drop; "
                    "merge it with PEFT's merge_and_unload() before saving, or train with "
                    "lora_bias=False")
            if kind == "ParamWrapper":
                out.append(self._param_term(module, a))
            elif kind == "Linear" and module.fan_in_fan_out:
                # a Conv1D base (GPT-2) stores W as (in, out): delta = (B @ A).T = A.T @ B.T
                out.append(Term(left=module.lora_A[a].weight, right=module.lora_B[a].weight,
                                scale=float(module.scaling[a]), left_transposed=True,
                                right_transposed=True))
            elif kind == "Linear":
                out.append(Term(left=module.lora_B[a].weight, right=module.lora_A[a].weight,
                                scale=float(module.scaling[a])))
            else:
                # delta = (B @ A).T = A.T @ B.T with A: (r, num), B: (dim, r)
                out.append(Term(left=module.lora_embedding_A[a], right=module.lora_embedding_B[a],
                                scale=float(module.scaling[a]), left_transposed=True,
                                right_transposed=True))
        return out

    @staticmethod
    def _param_term(module, a: str) -> Term:
        """PEFT LoRA on a parameter (``target_parameters``): on a 2-D ``(out, in)`` one,
        ``B @ A``; on a 3-D stack of ``E`` experts, expert ``e`` gets ``B[:, e::E] @
        A[e*r:(e+1)*r]`` (``A``: ``(r * E, in)``, ``B``: ``(out, r * E)``), transposed
        where the weight stores each expert as ``(in, out)`` (GPT-OSS: PEFT did not swap
        the features)."""
        lora_a, lora_b = module.lora_A[a].weight, module.lora_B[a].weight
        scale, experts = float(module.scaling[a]), int(module.num_experts)
        if experts == 1:
            return Term(left=lora_b, right=lora_a, scale=scale)
        if module._did_swap_in_out_features:  # (E, out, in): Qwen3-MoE, Mixtral
            return Term(left=lora_b, right=lora_a, scale=scale, experts=experts,
                        left_split="cols_strided", right_split="rows")
        return Term(left=lora_a, right=lora_b, scale=scale, experts=experts, left_split="rows",
                    right_split="cols_strided", left_transposed=True, right_transposed=True)

    @staticmethod
    def _dora(module, a: str) -> bool:
        return bool(getattr(module, "use_dora", {}).get(a, False))

    def _check_variant(self, module, a: str, active: list[str]) -> None:
        variant = getattr(module, "lora_variant", {}).get(a)
        name = type(variant).__name__ if variant is not None else None
        if self._dora(module, a) and name in (None, "DoraLinearVariant", "DoraEmbeddingVariant"):
            if len(active) > 1:
                raise UnsupportedAdapterError(
                    f"PEFT DoRA adapter {a!r} on {type(module).__name__} is active together "
                    f"with {[x for x in active if x != a]}: PEFT rescales each DoRA update "
                    "on its own, which no single merged weight of this form holds -> keep one "
                    "adapter active (set_adapter) when saving, or merge_and_unload() first")
            return
        if name in _PLAIN_VARIANTS and not self._dora(module, a):
            return
        if variant is not None or self._dora(module, a):
            raise UnsupportedAdapterError(
                f"PEFT adapter {a!r} on {type(module).__name__} uses the LoRA variant "
                f"{name or 'DoRA'}, whose update dcp_universal cannot merge; merge it with "
                "PEFT's merge_and_unload() before saving")

    def magnitude(self, module):
        self._check(module)
        dora = [a for a in self._active(module) if self._dora(module, a)]
        if not dora:
            return None
        if bnb.is_4bit(getattr(module, self.base_attr(module))):
            raise UnsupportedAdapterError(
                f"PEFT DoRA adapter {dora[0]!r} on a 4-bit base (QLoRA with use_dora=True) is "
                "not supported -> train plain LoRA on the 4-bit base, or merge with PEFT's "
                "merge_and_unload() before saving")
        per_column = type(module).__name__ == "Embedding" or module.fan_in_fan_out
        return adapters.Magnitude(vector=module.lora_magnitude_vector[dora[0]].weight,
                                  axis=1 if per_column else 0)

    def reset(self, module):
        kind = self._check(module)
        with torch.no_grad():
            for a in self._active(module):
                if kind != "Embedding":
                    module.lora_B[a].weight.zero_()
                else:
                    module.lora_embedding_A[a].zero_()
            magnitude = self.magnitude(module)
            if magnitude is not None:  # m = ||W||: (m / ||W||) * W is the base itself
                base = getattr(module, self.base_attr(module)).weight
                full = merge.norms(base, magnitude.axis)
                block, offsets = local_block(magnitude.vector)
                block.copy_(full[offsets[0]:offsets[0] + block.shape[0]].to(block.dtype))

    def config(self, module):
        out = {"rank": dict(module.r), "alpha": dict(module.lora_alpha),
               "scaling": {k: float(v) for k, v in module.scaling.items()}}
        if getattr(module, "fan_in_fan_out", False):
            out["fan_in_fan_out"] = True
        if type(module).__name__ == "ParamWrapper":
            out["num_experts"] = int(module.num_experts)
        return out

adapters.register(PeftLoRAKind())
