"""Adapter registry: which modules carry a low-rank update and how to merge it.

Every adapter kind is one :class:`AdapterKind` in ``_KINDS``; adding a kind touches this
module only. A kind turns a module into a :class:`Site`: the base weight plus a list of
terms, each ``scale * left @ right`` with ``left`` shaped ``(base_rows, r)`` and ``right``
shaped ``(r, base_cols)``. The merged weight is ``W + sum(terms)``.

Two merge paths share :func:`merge_block`:

* sharded: :func:`gather_factors` (collective, every rank, same order) gathers the small
  ``right`` factors, and ``left`` only when its rows do not already line up with the
  rank's base rows; then each rank merges the block of ``W`` it holds.
* rank 0: the same call with the full base weight, offsets ``(0, 0)``.

Example, a kind for a hypothetical ``MyAdapter`` layer::

    >>> class _Mine(AdapterKind):
    ...     name = "mine"
    ...     def matches(self, m): return isinstance(m, MyAdapter)
    ...     def terms(self, m): return [Term(left=m.up, right=m.down, scale=m.s)]
    ...     def reset(self, m): m.up.data.zero_()
    >>> _KINDS.append(_Mine())
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from dcp_universal.errors import UnsupportedAdapterError

__all__ = ["AdapterKind", "Term", "Site", "kind_of", "base_attr", "find_sites",
           "gather_factors", "merge_block", "adapter_config"]


@dataclasses.dataclass(frozen=True)
class Term:
    """One low-rank update ``scale * left @ right`` (``.T`` applied where flagged)."""

    left: torch.Tensor
    right: torch.Tensor
    scale: float
    left_transposed: bool = False
    right_transposed: bool = False


@dataclasses.dataclass
class Site:
    """An adapted module, resolved: where its base weight is and what to add to it."""

    name: str  # canonical module name, e.g. "blocks.0.attn.q"
    module: nn.Module
    kind: "AdapterKind"

    @property
    def base(self) -> nn.Module:
        return getattr(self.module, self.kind.base_attr)

    @property
    def weight_key(self) -> str:
        return f"{self.name}.weight"

    def terms(self) -> list[Term]:
        return self.kind.terms(self.module)

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """The adapter's own parameters (everything outside the base layer), by local name."""
        prefix = self.kind.base_attr + "."
        return {n: p for n, p in self.module.named_parameters() if not n.startswith(prefix)}


class AdapterKind:
    """How to recognise and merge one family of adapter layers."""

    name = "abstract"
    base_attr = "base_layer"

    def matches(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def terms(self, module: nn.Module) -> list[Term]:
        """The active updates; raises UnsupportedAdapterError for variants it cannot merge."""
        raise NotImplementedError

    def reset(self, module: nn.Module) -> None:
        """Make the update zero (fresh adapters), keeping the random factor."""
        raise NotImplementedError

    def config(self, module: nn.Module) -> dict[str, Any]:
        return {}


class _OwnLoRA(AdapterKind):
    name = "dcp_universal.lora"

    def matches(self, module):
        from dcp_universal.lora import LoRAEmbedding, LoRALinear

        return isinstance(module, (LoRALinear, LoRAEmbedding))

    def terms(self, module):
        from dcp_universal.lora import LoRALinear

        if isinstance(module, LoRALinear):
            return [Term(left=module.lora_B, right=module.lora_A, scale=module.scale)]
        return [Term(left=module.lora_A, right=module.lora_B, scale=module.scale)]

    def reset(self, module):
        with torch.no_grad():
            module.lora_B.zero_()

    def config(self, module):
        return {"rank": module.rank, "alpha": module.alpha}


class _PeftLoRA(AdapterKind):
    """HF PEFT LoRA on Linear and Embedding. The scale is the layer's own ``scaling``
    (so rsLoRA's ``alpha / sqrt(r)`` is honoured); adapters already merged into the base
    (``merge_adapter``) or disabled add nothing."""

    name = "peft.lora"

    def matches(self, module):
        return any(c.__module__.startswith("peft.tuners") and c.__name__ == "BaseTunerLayer"
                   for c in type(module).__mro__)

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
            if kind == "Linear":
                if module.fan_in_fan_out:
                    raise UnsupportedAdapterError(
                        "PEFT LoRA with fan_in_fan_out=True (Conv1D bases) is not supported")
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
        return {"rank": dict(module.r), "alpha": dict(module.lora_alpha),
                "scaling": {k: float(v) for k, v in module.scaling.items()}}


_KINDS: list[AdapterKind] = [_OwnLoRA(), _PeftLoRA()]


def kind_of(module: nn.Module) -> AdapterKind | None:
    for kind in _KINDS:
        if kind.matches(module):
            return kind
    return None


def base_attr(module: nn.Module) -> str | None:
    """The attribute holding ``module``'s base layer, if ``module`` is an adapter."""
    kind = kind_of(module)
    return kind.base_attr if kind is not None else None


def find_sites(model: nn.Module, module_names: dict[nn.Module, str]) -> list[Site]:
    """Every adapter in ``model``, sorted by canonical name (a collective-safe order)."""
    sites = []
    for module, name in module_names.items():
        kind = kind_of(module)
        if kind is not None:
            site = Site(name=name, module=module, kind=kind)
            site.terms()  # unsupported variants raise here, before anything is written
            sites.append(site)
    return sorted(sites, key=lambda s: s.name)


# ---- merging -----------------------------------------------------------------------

def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _rows_line_up(left: torch.Tensor, base: torch.Tensor) -> bool:
    """True when ``left``'s local shard holds exactly the rows of ``base``'s local shard."""
    if not (isinstance(left, DTensor) and isinstance(base, DTensor)):
        return False
    row_sharded_only = all(isinstance(p, (Shard, Replicate)) and (not isinstance(p, Shard) or p.dim == 0)
                           for p in base.placements)
    return (row_sharded_only and left.placements == base.placements
            and left.device_mesh == base.device_mesh and left.shape[0] == base.shape[0])


@dataclasses.dataclass
class Factors:
    """A term's factors, ready for local merging: ``left`` is either the rank's own rows
    (``left_is_local``) or the full matrix; ``right`` is always full."""

    left: torch.Tensor
    right: torch.Tensor
    scale: float
    left_is_local: bool


@torch.no_grad()
def gather_factors(sites: list[Site], bases: list[torch.Tensor]) -> list[list[Factors]]:
    """The factors of every site's terms, ready for :func:`merge_block`.

    Collective: call on every rank with the same sites in the same order. All factors that
    need gathering are gathered in one exchange, not one collective per factor.
    """
    plans = []  # per site, per term: (term, left is local)
    wanted: list[torch.Tensor] = []
    for site, base in zip(sites, bases):
        terms = []
        for term in site.terms():
            local = not term.left_transposed and _rows_line_up(term.left, base)
            terms.append((term, local))
            if not local:
                wanted.append(term.left)
            wanted.append(term.right)
        plans.append(terms)
    full = iter(_gather_all(wanted))
    out = []
    for terms in plans:
        factors = []
        for term, local in terms:
            left = term.left.to_local() if local else next(full)
            right = next(full)
            factors.append(Factors(left.T if term.left_transposed else left,
                                   right.T if term.right_transposed else right,
                                   term.scale, local))
        out.append(factors)
    return out


def _gather_all(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Full copies of ``tensors``. Dim-0 sharded DTensors on a 1-D mesh travel in one
    all_gather_object per mesh; any other placement falls back to ``full_tensor()``."""
    out: list[torch.Tensor | None] = [None] * len(tensors)
    by_mesh: dict = {}
    for i, t in enumerate(tensors):
        if not isinstance(t, DTensor):
            out[i] = t.detach()
        elif t.device_mesh.ndim == 1 and t.placements == (Shard(0),):
            by_mesh.setdefault(t.device_mesh, []).append(i)
        else:
            out[i] = t.full_tensor()
    for mesh, idx in by_mesh.items():
        group = mesh.get_group()
        pieces = [None] * dist.get_world_size(group)
        dist.all_gather_object(pieces, [tensors[i].to_local().detach().cpu() for i in idx], group=group)
        for n, i in enumerate(idx):
            full = torch.cat([p[n] for p in pieces], dim=0)
            out[i] = full.to(tensors[i].to_local().device)
    return out


@torch.no_grad()
def merge_block(block: torch.Tensor, offsets, factors: list[Factors]) -> torch.Tensor:
    """``block`` of the base weight at ``offsets`` plus the same block of every update.

    Computed in float32 and returned in ``block``'s dtype, as a new tensor.
    """
    r0, c0 = offsets
    nr, nc = block.shape
    out = block.to(torch.float32)  # no copy for float32 blocks: the first addmm makes one
    for n, f in enumerate(factors):
        left = (f.left if f.left_is_local else f.left[r0:r0 + nr]).to(torch.float32)
        right = f.right[:, c0:c0 + nc].to(torch.float32)
        if n == 0 and out.data_ptr() == block.data_ptr():
            out = torch.addmm(out, left, right, alpha=f.scale)
        else:
            out.addmm_(left, right, alpha=f.scale)
    return out.to(block.dtype) if factors else block.clone()


def adapter_config(sites: list[Site]) -> dict[str, Any]:
    """What the manifest records about the adapters: kinds, per-module config, targets."""
    return {
        "kinds": sorted({s.kind.name for s in sites}),
        "modules": {s.name: s.kind.config(s.module) for s in sites},
    }
