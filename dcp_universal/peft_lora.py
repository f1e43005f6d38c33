"""The adapter kind of HF PEFT's LoRA layers (``peft.tuners.lora``: Linear, Embedding).

PEFT is never imported here: its layers are recognised by class name, so this module
costs nothing where PEFT is not installed.
"""

from __future__ import annotations

import torch

from dcp_universal import adapters
from dcp_universal.adapters import Term
from dcp_universal.errors import UnsupportedAdapterError

__all__ = ["PeftLoRAKind"]

_TUNER_LAYER: dict[type, bool] = {}


class PeftLoRAKind(adapters.AdapterKind):
    """HF PEFT LoRA on Linear and Embedding. The scale is the layer's own ``scaling``
    (so rsLoRA's ``alpha / sqrt(r)`` is honoured); adapters already merged into the base
    (``merge_adapter``) or disabled add nothing."""

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
        if not qual.startswith("peft.tuners.lora.") or cls.__name__ not in ("Linear", "Embedding"):
            raise UnsupportedAdapterError(
                f"{qual} is not supported: dcp_universal merges PEFT LoRA Linear and Embedding "
                "layers only; merge this adapter with PEFT's merge_and_unload() before saving"
            )
        return cls.__name__

    def _active(self, module) -> list[str]:
        if module.disable_adapters:
            return []
        return [a for a in module.active_adapters
                if a not in module.merged_adapters
                and (a in module.lora_A or a in module.lora_embedding_A)]

    def terms(self, module):
        kind = self._check(module)
        out = []
        for a in self._active(module):
            if module.use_dora.get(a, False) or getattr(module, "lora_variant", {}).get(a):
                raise UnsupportedAdapterError(
                    f"PEFT adapter {a!r} on {type(module).__name__} uses a LoRA variant (DoRA or "
                    "similar) whose update is not W + scale * B @ A; merge it with PEFT's "
                    "merge_and_unload() before saving"
                )
            if kind == "Linear" and module.fan_in_fan_out:
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

    def reset(self, module):
        kind = self._check(module)
        with torch.no_grad():
            for a in self._active(module):
                if kind == "Linear":
                    module.lora_B[a].weight.zero_()
                else:
                    module.lora_embedding_A[a].zero_()

    def config(self, module):
        out = {"rank": dict(module.r), "alpha": dict(module.lora_alpha),
               "scaling": {k: float(v) for k, v in module.scaling.items()}}
        if getattr(module, "fan_in_fan_out", False):
            out["fan_in_fan_out"] = True
        return out



adapters.register(PeftLoRAKind())
