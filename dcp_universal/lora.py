"""The library's own LoRA layers.

``LoRALinear`` computes ``base(x) + scale * x @ A.T @ B.T`` with ``A: (rank, in)`` and
``B: (out, rank)`` (the weights of its ``lora_A`` / ``lora_B`` Linear modules, which a
tensor-parallel plan can name); its merged weight is ``W + scale * B @ A``.

``LoRAEmbedding`` computes ``base(x) + scale * A[x] @ B`` with ``A: (num_embeddings,
rank)`` and ``B: (rank, embedding_dim)``; its merged weight is ``W + scale * A @ B``.
Both layouts put the factor whose rows line up with the base weight's rows first, so
under FSDP2 (which shards dim 0) a rank merges its own rows without gathering it.

``B`` starts at zero, so a freshly adapted model computes the same function as before.
The base layer lives at ``.base_layer`` (the same infix PEFT uses), which
:mod:`dcp_universal.model.names` removes from canonical names.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from dcp_universal import adapters
from dcp_universal.model.names import canonical_module_names

__all__ = ["LoRALinear", "LoRAEmbedding", "apply_lora", "LoRAKind"]


class _LoRALayer(nn.Module):
    """A frozen base layer plus a trainable rank-``rank`` update of scale ``alpha / rank``."""

    def __init__(self, base_layer: nn.Module, *, rank: int, alpha: float) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.base_layer = base_layer
        self.rank = rank
        self.alpha = float(alpha)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


class LoRALinear(_LoRALayer):
    """A frozen ``nn.Linear`` plus a trainable rank-``rank`` update.

    The factors are ``nn.Linear`` modules, as PEFT's are, so a tensor-parallel plan can
    name them: under a ``ColwiseParallel`` base, ``lora_B`` is ``ColwiseParallel`` and
    ``lora_A`` stays replicated; under a ``RowwiseParallel`` base, ``lora_A`` is
    ``RowwiseParallel`` and ``lora_B`` stays replicated. Their canonical names are
    ``<layer>.lora_A`` and ``<layer>.lora_B`` (the ``.weight`` dropped), as before.
    """

    def __init__(self, base_layer: nn.Linear, *, rank: int, alpha: float) -> None:
        super().__init__(base_layer, rank=rank, alpha=alpha)
        out_f, in_f = base_layer.weight.shape
        like = dict(dtype=base_layer.weight.dtype, device=base_layer.weight.device)
        self.lora_A = nn.Linear(in_f, rank, bias=False, **like)
        self.lora_B = nn.Linear(rank, out_f, bias=False, **like)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.scale


class LoRAEmbedding(_LoRALayer):
    """A frozen ``nn.Embedding`` plus a trainable rank-``rank`` update."""

    def __init__(self, base_layer: nn.Embedding, *, rank: int, alpha: float) -> None:
        super().__init__(base_layer, rank=rank, alpha=alpha)
        num, dim = base_layer.weight.shape
        w = base_layer.weight
        self.lora_A = nn.Parameter(torch.empty((num, rank), dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros((rank, dim), dtype=w.dtype, device=w.device))
        nn.init.normal_(self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + F.embedding(x, self.lora_A) @ self.lora_B * self.scale


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def apply_lora(model: nn.Module, *, rank: int, alpha: float, targets: list[str]) -> nn.Module:
    """Replace ``nn.Linear`` / ``nn.Embedding`` modules named by ``targets`` with LoRA layers.

    A module matches a target when its canonical name equals it or ends with
    ``"." + target`` (``"q"`` matches ``blocks.0.attn.q``). Replacement is in place; the
    replaced base layers are frozen, every other parameter keeps its ``requires_grad``.
    Call it before wrapping the model in FSDP2 / DDP / ``torch.compile``.

    Raises:
        ValueError: a target matches no Linear or Embedding, or a matched module is
            already adapted.
    """
    if not targets:
        raise ValueError("apply_lora needs at least one target name, e.g. targets=['q', 'v']")
    names = canonical_module_names(model)
    hits = {t: 0 for t in targets}
    replacements = []
    for parent in list(model.modules()):
        if isinstance(parent, (LoRALinear, LoRAEmbedding)):
            continue
        for attr, child in parent.named_children():
            if type(child) not in (nn.Linear, nn.Embedding):
                continue
            name = names[child]
            matched = [t for t in targets if _matches(name, t)]
            if not matched:
                continue
            for t in matched:
                hits[t] += 1
            replacements.append((parent, attr, child))
    missing = [t for t, n in hits.items() if n == 0]
    if missing:
        candidates = sorted(n for m, n in names.items() if type(m) in (nn.Linear, nn.Embedding))
        raise ValueError(
            f"apply_lora targets {missing} match no nn.Linear or nn.Embedding; "
            f"candidate names are {candidates[:20]}{' ...' if len(candidates) > 20 else ''}"
        )
    for parent, attr, child in replacements:
        child.requires_grad_(False)
        # replacements hold nn.Linear and nn.Embedding children only
        cls: Callable[..., nn.Module] = (LoRALinear if isinstance(child, nn.Linear)
                                         else LoRAEmbedding)
        setattr(parent, attr, cls(child, rank=rank, alpha=alpha))
    return model


class LoRAKind(adapters.AdapterKind):
    """The adapter kind of :class:`LoRALinear` and :class:`LoRAEmbedding`.

    Both put the factor whose rows line up with the base rows on the left (Linear:
    ``B @ A``; Embedding: ``A @ B``), so under FSDP2 each rank merges its own rows
    without gathering that factor.
    """

    name = "dcp_universal.lora"

    def matches(self, module):
        return isinstance(module, (LoRALinear, LoRAEmbedding))

    def terms(self, module):
        if isinstance(module, LoRALinear):
            return [adapters.Term(left=module.lora_B.weight, right=module.lora_A.weight,
                                  scale=module.scale)]
        return [adapters.Term(left=module.lora_A, right=module.lora_B, scale=module.scale)]

    def reset(self, module):
        with torch.no_grad():
            (module.lora_B.weight if isinstance(module, LoRALinear) else module.lora_B).zero_()

    def canonical_key(self, module, local_key):
        # LoRALinear's factor modules: "lora_A.weight" is canonically "lora_A"
        if isinstance(module, LoRALinear) and local_key in ("lora_A.weight", "lora_B.weight"):
            return local_key[: -len(".weight")]
        return super().canonical_key(module, local_key)

    def config(self, module):
        return {"rank": module.rank, "alpha": module.alpha}


adapters.register(LoRAKind())
