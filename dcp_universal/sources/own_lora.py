"""The library's own LoRA layout in files it did not write: ``model.state_dict()`` of a
model with :mod:`dcp_universal.lora` layers, saved by ``torch.save``, ``dcp.save`` or
safetensors.

Such a file holds each adapted layer's base as ``x.base_layer.weight`` (canonically
``x.weight``) beside its factors: ``x.lora_A.weight`` ``(r, in)`` and ``x.lora_B.weight``
``(out, r)`` for a Linear (the factors are ``nn.Linear`` modules), ``x.lora_A``
``(num, r)`` and ``x.lora_B`` ``(r, dim)`` for an Embedding. The rank is the factors'
shape; alpha is in no such file, except where the writer put ``lora_alpha`` beside the
state dict (a nanoGPT-style dict's ``model_args`` or ``config``, read by
:mod:`dcp_universal.interop.legacy` as for its ``main_weight`` layout, and handed over
as ``Source.meta[ALPHA]``).

A target layer with the same adapter (the library's own, of the same rank, and of the
same alpha where the file records one) takes the factors as they are. Any other target
gets the update merged into the base weight while loading, ``W + alpha / r * B @ A``
(Embedding: ``A @ B``), which needs alpha: where the file records none such a load is
refused before anything is read.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, cast

from dcp_universal.errors import CheckpointMismatchError
from dcp_universal.format.manifest import AdapterTerm, AdapterUpdate
from dcp_universal.model.plan import TensorInfo
from dcp_universal.model.view import ModelView
from dcp_universal.sources import Source
from dcp_universal.storage import Storage

__all__ = ["ALPHA", "OWN_KIND", "OwnFactors", "own_factors", "read_own_factors", "factor_rule"]

#: ``Source.meta`` key: the LoRA alpha a file records beside its state dict, if any
ALPHA = "lora_alpha"

#: the adapter kind of the library's own layers (``dcp_universal.lora.LoRAKind.name``;
#: lora is a facade, which no folder imports)
OWN_KIND = "dcp_universal.lora"

# (suffix of lora_A's key, of lora_B's key, embedding): the factors are nn.Linear
# modules in LoRALinear, bare parameters in LoRAEmbedding
_LAYOUTS = ((".lora_A.weight", ".lora_B.weight", False), (".lora_A", ".lora_B", True))


@dataclasses.dataclass(frozen=True)
class OwnFactors:
    """One layer's factors in the file: canonical keys of ``A`` and ``B``, the layer's
    rank, and whether it is an Embedding (``delta = A @ B``; Linear: ``B @ A``)."""

    site: str
    a: str
    b: str
    rank: int
    embedding: bool

    def term(self, alpha: float) -> AdapterTerm:
        """The update ``alpha / r * left @ right``, ``left`` lined up with the weight's rows."""
        left, right = (self.a, self.b) if self.embedding else (self.b, self.a)
        return AdapterTerm(left=left, right=right, scale=alpha / self.rank)


def _rank(a: tuple, b: tuple, w: tuple, embedding: bool) -> int | None:
    """The rank of factors shaped ``a`` and ``b`` on a base shaped ``w``; ``None`` when
    they do not fit the layout."""
    if not len(a) == len(b) == len(w) == 2:
        return None
    if embedding:  # A (num, r), B (r, dim), W (num, dim)
        fits = a[0] == w[0] and b[1] == w[1] and a[1] == b[0]
        return a[1] if fits else None
    fits = b[0] == w[0] and a[1] == w[1] and b[1] == a[0]  # A (r, in), B (out, r), W (out, in)
    return a[0] if fits else None


def own_factors(keys: Mapping[str, TensorInfo], model_keys: set[str]) -> list[OwnFactors]:
    """The layers whose factors ``keys`` (canonical) hold in the own layout: ``lora_A``
    and ``lora_B`` keys beside a base ``weight``, none of them a tensor of the target's
    own (``model_keys``: a model may name a plain module ``lora_A``). Bare ``x.lora_A`` /
    ``x.lora_B`` are an Embedding's only where their shapes fit one: they are also
    LoRALinear's canonical names, which a target with those adapters reads as they are.

    Raises:
        CheckpointMismatchError: a Linear's factors do not fit its base weight.
    """
    out = []
    for a in sorted(keys):
        for a_suffix, b_suffix, embedding in _LAYOUTS:
            if not a.endswith(a_suffix) or a in model_keys:
                continue
            site = a[: -len(a_suffix)]
            b, w = site + b_suffix, site + ".weight"
            if b not in keys or w not in keys or b in model_keys:
                continue
            rank = _rank(keys[a].shape, keys[b].shape, keys[w].shape, embedding)
            if rank is None and embedding:
                continue  # LoRALinear's canonical names: the target's as they are, or none
            if rank is None:
                raise CheckpointMismatchError(
                    f"{site!r}: base weight {keys[w].shape}, {a!r} {keys[a].shape} and {b!r} "
                    f"{keys[b].shape} are named as the library's own LoRA Linear but do "
                    "not fit it (expected A (r, in), B (out, r)); nothing was loaded -> "
                    "check that the file is the model's state_dict()")
            out.append(OwnFactors(site, a, b, rank, embedding))
    return out


def _same_adapter(f: OwnFactors, view: ModelView, keys: Mapping[str, TensorInfo],
                  alpha: float | None) -> bool:
    """Whether the target's layer ``f.site`` has the adapter the file's factors are:
    the library's own, of the same layout and shapes, and of the file's alpha when the
    file records one."""
    site = next((s for s in view.sites if s.name == f.site), None)
    if site is None or site.kind.name != OWN_KIND:
        return False
    if (site.kind.layout(site.module) == "embedding") != f.embedding:
        return False
    mine = view.adapter_tensors
    for ours, theirs in ((f"{f.site}.lora_A", f.a), (f"{f.site}.lora_B", f.b)):
        if ours not in mine or tuple(mine[ours].shape) != tuple(keys[theirs].shape):
            return False
    return alpha is None or math.isclose(site.kind.config(site.module)["alpha"], alpha)


def _alpha_unknown(desc: str, merging: list[OwnFactors]) -> CheckpointMismatchError:
    ranks = sorted({f.rank for f in merging})
    first = merging[0]
    return CheckpointMismatchError(
        f"checkpoint {desc} holds the library's own LoRA factors of {len(merging)} layers "
        f"(e.g. {first.site!r}, rank {first.rank}; ranks found: {ranks}) that the model has "
        f"no adapter of the same rank for, so they must be merged, W + alpha / r * B @ A; "
        "alpha is unknown: the file records no lora_alpha; nothing was loaded -> load it "
        f"into a model with the same adapters (apply_lora(model, rank={first.rank}, "
        "alpha=<the run's alpha>, targets=[...]), then save_model(model, dir) writes it "
        "merged for any model), or, for a torch.save file, record alpha beside the state "
        "dict: torch.save({'model': state_dict, 'model_args': {'lora_alpha': ALPHA}}, path)")


def read_own_factors(source: Source, view: ModelView) -> Source:
    """``source`` with the own layout's factors made the target's: renamed to the
    target's adapter keys where it has the same adapter, else moved to
    :attr:`Source.factors` with a delta on the base weight (``source.meta[ALPHA]`` gives
    the scale).

    Raises:
        CheckpointMismatchError: a factor must be merged and the file records no alpha,
            or the shapes fit no layout (both before anything is read).
    """
    keys = source.keys
    found = own_factors(keys, set(view.tensors))
    if not found:
        return source
    alpha = source.meta.get(ALPHA)
    keep = [f for f in found if _same_adapter(f, view, keys, alpha)]
    merging = [f for f in found if f not in keep]
    if merging and alpha is None:
        raise _alpha_unknown(source.desc, merging)
    entries, factors = dict(source.entries), dict(source.factors)
    deltas = dict(source.deltas)
    for f in keep:  # LoRALinear's factor modules: "x.lora_A.weight" is canonically "x.lora_A"
        entries[f"{f.site}.lora_A"], entries[f"{f.site}.lora_B"] = entries.pop(f.a), entries.pop(f.b)
    for f in merging:
        factors[f.a], factors[f.b] = entries.pop(f.a), entries.pop(f.b)
        weight = f"{f.site}.weight"
        # merging: alpha is known (checked above)
        deltas[weight] = deltas.get(weight, AdapterUpdate(())).add(f.term(cast(float, alpha)))
    return source.replace(entries=entries, factors=factors,
                          deltas=deltas,
                          notes=(*source.notes, *_notes(keep, merging, alpha)))


def _notes(keep: list[OwnFactors], merging: list[OwnFactors], alpha: float | None) -> list[str]:
    out = []
    if keep:
        whose = (f"lora_alpha {alpha:g}, as the model's" if alpha is not None else
                 "the file records no lora_alpha: the model's own alpha applies")
        out.append(f"restored the library's own LoRA factors of {len(keep)} layers into the "
                   f"model's adapters as they are ({whose})")
    if merging:
        out.append(f"merged the library's own LoRA factors of {len(merging)} layers into "
                   f"their base weights while loading (lora_alpha {alpha:g}, ranks "
                   f"{sorted({f.rank for f in merging})})")
    return out


def factor_rule(store: Storage, source: Source, view: ModelView) -> Source:
    """:func:`read_own_factors` as a factor rule of DCP and safetensors directories
    (:func:`dcp_universal.sources.dcp.register_factor_rule`)."""
    return read_own_factors(source, view)
