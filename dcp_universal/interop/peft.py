"""PEFT, in one place: its LoRA layers as an adapter kind, its factors inside other
tools' DCP checkpoints, its adapter directories (``adapter_model.safetensors`` and
``adapter_config.json``) as an input format, and :func:`export_peft`.

PEFT is never imported here: its classes are recognised by name, so this module costs
nothing where PEFT is not installed.

* **The kind** (:class:`PeftLoRAKind`): LoRA on Linear (and transformers' Conv1D, with
  ``fan_in_fan_out``) and Embedding. The scale is the layer's own ``scaling`` (so
  rsLoRA's ``alpha / sqrt(r)`` is honoured); adapters merged into the base
  (``merge_adapter``) or disabled add nothing; DoRA and other variants are refused.
* **Factors in a plain DCP of a PEFT model** (:func:`peft_factors`, the factor rule
  registered with :mod:`dcp_universal.sources.dcp`): read as they are into a target with
  the same adapters, otherwise merged into the base weight on load with the scale from
  the ``adapter_config.json`` PEFT writes beside them.
* **An adapter directory** as a source (:class:`PeftAdapterFormat`): loading it into a
  LoRA model sets the adapters from the files and keeps the base.
* **Export** (:func:`export_peft`) from any LoRA step, PEFT-made or the library's own
  ``LoRALinear`` / ``LoRAEmbedding``: the manifest records every update as
  ``scale * L @ R`` with ``L`` lined up with the base weight's rows, and PEFT's layouts
  are fixed functions of ``L`` and ``R``:

  * Linear, weight ``(out, in)``: ``lora_A.weight = R`` ``(r, in)``, ``lora_B.weight = L``;
  * Conv1D (``fan_in_fan_out``), weight ``(in, out)``: ``lora_A.weight = L.T``,
    ``lora_B.weight = R.T``;
  * Embedding, weight ``(num, dim)``: ``lora_embedding_A = L.T`` ``(r, num)``,
    ``lora_embedding_B = R.T`` ``(dim, r)``.

  The scale goes into the config as ``lora_alpha = scale * r`` (``use_rslora`` off), with
  ``rank_pattern`` / ``alpha_pattern`` for modules whose rank or scale differ from the
  most common one. What PEFT cannot represent is refused: more than one update on a
  module, or trained weights outside the adapters (a step whose ``adapters/`` also holds
  unfrozen base parameters).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import re
from typing import Iterable, cast

import torch
import torch.nn as nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from dcp_universal import adapters
from dcp_universal.storage import dcp_io, steps
from dcp_universal.sources import foreign
from dcp_universal.format import manifest
from dcp_universal.adapters import Term, merge
from dcp_universal.sources.dcp import register_factor_rule
from dcp_universal.errors import (CheckpointError, CheckpointMismatchError,
                                  ExportExistsError, UnsupportedAdapterError)
from dcp_universal.model import bnb
from dcp_universal.model.names import canonical_module_names
from dcp_universal.model.plan import LoadReport, Staged
from dcp_universal.interop.safetensors import safetensors_torch
from dcp_universal.sources import Format, Source, Want, register_format
from dcp_universal.storage import Storage, join, normalize, parent, storage_for
from dcp_universal.model.view import ModelView, local_block

__all__ = ["PeftLoRAKind", "PeftFactors", "peft_factors", "read_peft_config", "peft_scale",
           "peft_transposed", "merge_terms", "PeftAdapterFormat", "export_peft",
           "stage_adapter", "ADAPTER_WEIGHTS", "ADAPTER_CONFIG"]

logger = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."


# ---- the adapter kind -------------------------------------------------------------------

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


# ---- PEFT LoRA factors in another tool's DCP checkpoint ---------------------------------

_LINEAR = re.compile(r"^(?P<site>.+)\.lora_(?P<f>A|B)\.(?P<adapter>[^.]+)\.weight$")
_EMBEDDING = re.compile(r"^(?P<site>.+)\.lora_embedding_(?P<f>A|B)\.(?P<adapter>[^.]+)$")
_VARIANT = re.compile(r"\.lora_magnitude_vector\.")  # DoRA


@dataclasses.dataclass
class PeftFactors:
    """One PEFT LoRA adapter at one module, as found in a checkpoint (canonical keys)."""

    site: str
    adapter: str
    a: str
    b: str
    embedding: bool

    @property
    def keys(self) -> tuple[str, str]:
        return (self.a, self.b)


def peft_factors(keys: Iterable[str]) -> list[PeftFactors]:
    """The PEFT LoRA factor pairs among canonical ``keys``.

    Raises:
        UnsupportedAdapterError: DoRA's magnitude vector: its update is not
            ``scale * B @ A``.
    """
    found: dict[tuple[str, str, bool], dict[str, str]] = {}
    for k in keys:
        if _VARIANT.search(k):
            raise UnsupportedAdapterError(
                f"checkpoint key {k!r} belongs to a PEFT LoRA variant (DoRA or similar) whose "
                "update is not W + scale * B @ A; merge it with PEFT's merge_and_unload() "
                "and save the merged model")
        for pattern, emb in ((_LINEAR, False), (_EMBEDDING, True)):
            m = pattern.match(k)
            if m:
                found.setdefault((m["site"], m["adapter"], emb), {})[m["f"]] = k
    out = []
    for (site, adapter, emb), f in sorted(found.items()):
        if set(f) != {"A", "B"}:
            raise CheckpointMismatchError(
                f"checkpoint holds PEFT LoRA factor {sorted(f.values())} of {site!r} without "
                "its pair: the checkpoint is incomplete")
        out.append(PeftFactors(site, adapter, f["A"], f["B"], emb))
    return out


def read_peft_config(store: Storage, model_dir: str) -> tuple[dict, str] | None:
    """PEFT's ``adapter_config.json`` in ``model_dir`` or its parent, with its path."""
    for d in (model_dir, parent(model_dir)):
        path = join(d, ADAPTER_CONFIG)
        if store.exists(path):
            try:
                return json.loads(store.read_bytes(path)), path
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointMismatchError(f"{path} is not valid JSON ({e})") from None
    return None


def _pattern_value(patterns: dict | None, site: str, default):
    # PEFT matches rank_pattern / alpha_pattern keys as a suffix of the module name
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", site):
            return value
    return default


def peft_scale(config: dict, site: str, rank: int, where: str) -> float:
    """The scale PEFT uses for ``site``'s update under ``config``."""
    if config.get("peft_type", "LORA") != "LORA":
        raise UnsupportedAdapterError(f"{where}: peft_type {config.get('peft_type')!r} is not "
                                      "LoRA; only LoRA factors can be merged")
    r = int(_pattern_value(config.get("rank_pattern"), site, config.get("r", 8)))
    alpha = float(_pattern_value(config.get("alpha_pattern"), site, config.get("lora_alpha", 8)))
    if r != rank:
        raise CheckpointMismatchError(
            f"{where} gives rank {r} for {site!r}, but the checkpoint's factors have rank "
            f"{rank}: the config belongs to another adapter")
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def peft_transposed(a_shape, b_shape, base_shape, base_module, fan_in_fan_out: bool,
                    where: str) -> bool:
    """Whether a PEFT ``lora_A`` ``(r, x)`` / ``lora_B`` ``(y, r)`` pair updates its base
    transposed: ``(B @ A).T`` on a Conv1D base ``(in, out)``, ``B @ A`` on a Linear
    ``(out, in)``.

    The target's base module decides, as PEFT decides per layer (a saved config's
    ``fan_in_fan_out`` does not: PEFT turns it off when it meets GPT-2's Linear head, after
    the Conv1D layers took it on). Without the module, the shapes decide, and for a
    square weight the config's ``fan_in_fan_out``.

    Raises:
        CheckpointMismatchError: the base does not fit the factors that way.
    """
    linear, conv1d = (b_shape[0], a_shape[1]), (a_shape[1], b_shape[0])
    base = tuple(base_shape)
    if base_module is not None:
        transposed = adapters.is_conv1d(base_module)
    elif linear == conv1d:
        transposed = bool(fan_in_fan_out)
    else:
        transposed = base == conv1d
    if base != (conv1d if transposed else linear):
        raise CheckpointMismatchError(
            f"base weight {base} does not fit LoRA factors A {tuple(a_shape)} and B "
            f"{tuple(b_shape)} {'transposed (Conv1D)' if transposed else ''} ({where})")
    return transposed


def merge_terms(f: PeftFactors, base_shape: tuple[int, ...], a_shape, b_shape,
                config: dict, where: str, base_module=None) -> manifest.AdapterTerm:
    """The term ``scale * L @ R`` of ``f`` on a base weight of ``base_shape`` (held by the
    target's ``base_module``, when it has one)."""
    scale = peft_scale(config, f.site, a_shape[0], where)  # A is (r, ...) in both layouts
    # an embedding (A: (r, num), B: (dim, r)) and a Conv1D base both take (B @ A).T
    if f.embedding or peft_transposed(a_shape, b_shape, base_shape, base_module,
                                      config.get("fan_in_fan_out", False), f"{f.site!r}, {where}"):
        return manifest.AdapterTerm(left=f.a, right=f.b, scale=scale, left_t=True, right_t=True)
    return manifest.AdapterTerm(left=f.b, right=f.a, scale=scale)


@register_factor_rule
def merge_foreign_factors(store: Storage, source: Source, view: ModelView) -> Source:
    """The factor rule for PEFT: factors left as keys where the target has the same
    adapter (read exactly), otherwise turned into deltas merged into the base weight on
    load, with the scale from PEFT's ``adapter_config.json`` beside the checkpoint."""
    found = peft_factors(source.entries)
    keys = source.keys
    to_merge = [f for f in found if not all(
        k in view.adapter_tensors and tuple(view.adapter_tensors[k].shape) == keys[k].shape
        for k in f.keys)]
    if not to_merge:
        return source
    names = sorted({f.adapter for f in to_merge})
    config = read_peft_config(store, source.desc)
    if config is None or len(names) > 1:
        why = (f"adapters {names} (which one was active is not recorded)" if len(names) > 1 else
               f"no {ADAPTER_CONFIG} beside it to give their scale (lora_alpha / r)")
        raise CheckpointMismatchError(
            f"checkpoint {source.desc} holds PEFT LoRA factors for {len(to_merge)} modules "
            f"(e.g. {to_merge[0].a!r}) that the model has no identical adapter for, and "
            f"{why}; nothing was loaded -> load it into a PEFT model with the same LoraConfig, "
            f"or put the adapter's {ADAPTER_CONFIG} (as PEFT's save_pretrained "
            "writes it) into the checkpoint directory")
    cfg, where = config
    modules = {name: m for m, name in canonical_module_names(view.model).items()}
    entries, factors = dict(source.entries), dict(source.factors)
    deltas = dict(source.deltas)
    for f in to_merge:
        weight = f"{f.site}.weight"
        if weight not in entries:
            raise CheckpointMismatchError(
                f"checkpoint {source.desc} holds PEFT LoRA factors of {f.site!r} but no base "
                f"weight {weight!r}: it is incomplete")
        factors[f.a], factors[f.b] = entries.pop(f.a), entries.pop(f.b)
        deltas[weight] = deltas.get(weight, manifest.AdapterUpdate(())).add(merge_terms(
            f, keys[weight].shape, keys[f.a].shape, keys[f.b].shape, cfg, where,
            base_module=_base_module(modules.get(f.site))))
    return source.replace(
        entries=entries, factors=factors, deltas=deltas,
        notes=(*source.notes, f"merged {len(to_merge)} PEFT LoRA adapters ({names[0]!r}, "
                              f"scale from {where}) into their base weights while loading"))


def _base_module(module: nn.Module | None) -> nn.Module | None:
    """The layer holding the weight: an adapted module's base layer, else itself."""
    kind = adapters.kind_of(module) if module is not None else None
    # a kind: module is not None
    return getattr(module, kind.base_attr(cast(nn.Module, module))) if kind is not None else module



# ---- export ----------------------------------------------------------------------------

def _layout_by_names(term: manifest.AdapterTerm) -> str:
    """The layout of a step written before manifests recorded it (``Adapters.layouts``),
    from the factor names of the two kinds that existed then."""
    if re.search(r"\.lora_B(\.[^.]+\.weight)?$", term.left):
        return "linear"  # own LoRALinear (x.lora_B) or PEFT Linear (x.lora_B.<a>.weight)
    if term.left.endswith(".lora_A") or ".lora_embedding_A." in term.left:
        return "embedding"  # own LoRAEmbedding (x.lora_A first) or PEFT Embedding
    if re.search(r"\.lora_A\.[^.]+\.weight$", term.left):
        return "conv1d"  # PEFT on a Conv1D base: (B @ A).T
    raise UnsupportedAdapterError(
        f"adapter factor {term.left!r}: the step records no layout for it (written before "
        "layouts were recorded, by a kind this version cannot place); export the merged "
        "model with export_hf instead")


def export_peft(src: str, out: str, *, storage_options: dict | None = None,
                trusted: bool = False, overwrite: bool = False) -> str:
    """Write the adapters of the LoRA step ``src`` as a PEFT LoRA adapter in ``out``.

    Not collective: call it in one process. Returns ``out``.

    Weights the run trained outside the adapters (a classification head, norms left
    trainable) are written as PEFT writes ``modules_to_save``: under their own names,
    their modules listed in the config's ``modules_to_save``. The adapter that was
    active when the step was saved is written to ``out`` itself, so that
    ``PeftModel.from_pretrained(base, out)`` computes the saved model; each PEFT adapter
    that was not active is written to ``out/<its name>/``, as PEFT's ``save_pretrained``
    writes a non-default adapter (``load_adapter(out + "/b", adapter_name="b")``).

    Raises:
        CheckpointError: ``src`` is not a LoRA step, or no adapter was active in it.
        UnsupportedAdapterError: a module with several updates, or an unknown kind.
    """
    save = safetensors_torch("export_peft").save
    src, out = normalize(src), normalize(out)
    store, out_store = storage_for(src, storage_options), storage_for(out, storage_options)
    m = steps.read_manifest(store, src)
    if m.adapters is None:
        raise CheckpointError(f"{src} is not a LoRA step (its manifest records no adapters); "
                              "export_peft needs the adapters of a LoRA run")
    adapters_dir = join(src, manifest.ADAPTERS_DIR)
    # the entries of adapters/ are tensors
    meta = cast("dict[str, TensorStorageMetadata]",
                dcp_io.read_metadata(store, adapters_dir, trusted=trusted).state_dict_metadata)
    factor_keys, idle = m.adapters.factor_keys(), set(m.adapters.idle)
    rebased = sorted({c["init_lora_weights"] for c in m.adapters.modules.values()
                      if isinstance(c, dict) and "init_lora_weights" in c})
    if rebased:
        raise CheckpointError(
            f"{src}: the adapters were initialised with init_lora_weights={rebased[0]!r}, which "
            "changed the base weights: the trained factors complete the residual base this "
            "step holds, not the original model, so PeftModel.from_pretrained(original base) "
            "would compute another function -> export the merged model with export_hf, or "
            "convert with PEFT's save_pretrained(path_initial_model_for_weight_conversion=...)")
    if not factor_keys:
        raise CheckpointError(
            f"{src} holds adapters, but none was active when it was saved (disabled, or "
            "merged into the base): its model is the base alone -> export_hf it")
    # trained weights outside the adapters go where PEFT keeps them: modules_to_save,
    # each module whole (its buffers too); a buffer of a module with no trained weight
    # (BART's final_logits_bias) is the base model's own state, not the run's
    trained = sorted(k for k in meta if k not in factor_keys and k not in idle)
    buffers = set(m.adapters.buffers)
    saved = {k.rsplit(".", 1)[0] for k in trained if k not in buffers and "." in k}
    left_out = [k for k in trained if k in buffers and k.rsplit(".", 1)[0] not in saved]
    trained = [k for k in trained if k not in left_out]
    inactive = _inactive_adapters(m.adapters, idle)
    full = {k: torch.empty(tuple(meta[k].size), dtype=meta[k].properties.dtype)
            for k in sorted(factor_keys | set(trained) | {k for f in inactive for k in f.keys})}
    dcp_io.load_state(store, full, adapters_dir, single_process=True, trusted=trusted)
    if left_out:
        logger.info("export_peft of %s: buffers of modules without trained weights left out "
                    "(the base model holds them): %s", src, left_out[:6])

    tensors = {f"{_PREFIX}{k}": full[k].contiguous() for k in trained}
    ranks, scales, layouts = {}, {}, {}
    for site, terms in sorted(m.adapters.sites.items()):
        if not terms:  # an idle site: nothing of it is active
            continue
        if len(terms) != 1:
            raise UnsupportedAdapterError(
                f"{site!r} carries {len(terms)} active updates; a PEFT adapter holds one per "
                "module: export each adapter separately, or export_hf the merged model")
        t = terms[0]
        layout = layouts[site] = m.adapters.layouts.get(site) or _layout_by_names(t)
        if layout == "parameter":  # PEFT's own factors: its key less the adapter's name
            for key in (t.left, t.right):
                tensors[_PREFIX + _file_key(key, src)] = full[key].contiguous()
            ranks[site], scales[site] = _param_rank(t, full), t.scale
            continue
        left = full[t.left].T if t.left_t else full[t.left]      # L: (rows, r)
        right = full[t.right].T if t.right_t else full[t.right]  # R: (r, cols)
        if layout == "linear":
            a, b, names = right, left, ("lora_A.weight", "lora_B.weight")
        else:
            a, b = left.T, right.T
            names = (("lora_embedding_A", "lora_embedding_B") if layout == "embedding"
                     else ("lora_A.weight", "lora_B.weight"))
        tensors[f"{_PREFIX}{site}.{names[0]}"] = a.contiguous()
        tensors[f"{_PREFIX}{site}.{names[1]}"] = b.contiguous()
        if site in m.adapters.magnitudes:  # DoRA: PEFT's file drops the ".<adapter>.weight"
            tensors[f"{_PREFIX}{site}.lora_magnitude_vector"] = \
                full[m.adapters.magnitudes[site].key].contiguous()
        ranks[site] = int(a.shape[0])
        scales[site] = t.scale
    dora = sorted(m.adapters.magnitudes)
    if dora and len(dora) != len(ranks):
        plain = sorted(set(ranks) - set(dora))
        raise UnsupportedAdapterError(
            f"{src}: DoRA on {dora[:3]} but plain LoRA on {plain[:3]}; a PEFT adapter is DoRA "
            "everywhere or nowhere (use_dora is one setting) -> export_hf the merged model")
    config = _config(ranks, scales, layouts, use_dora=bool(dora))
    if trained:
        config["modules_to_save"] = sorted({k.rsplit(".", 1)[0] for k in trained})
    written = {out: (tensors, config)}
    for name, factors in sorted(_by_adapter(inactive).items()):
        written[join(out, name)] = _peft_adapter(m.adapters, name, factors, full, src)
    earlier = [join(d, n) for d in written for n in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
               if out_store.exists(join(d, n))]
    if earlier and not overwrite:
        raise ExportExistsError(f"{out} already holds an adapter ({', '.join(earlier)}) -> pass "
                                "overwrite=True (CLI: --overwrite) to replace it, or export to "
                                "an empty directory")
    for path in sorted(earlier, key=lambda p: not p.endswith(ADAPTER_CONFIG)):
        out_store.remove_file(path)  # configs first: without one a directory is no adapter
    # the inactive adapters first and each config last: a killed export is never taken
    # for an adapter, and out itself is one only when everything is in place
    for d, (ts, cfg) in sorted(written.items(), key=lambda kv: kv[0] == out):
        out_store.makedirs(d)
        out_store.write_atomic(join(d, ADAPTER_WEIGHTS), save(ts, metadata={"format": "pt"}))
        out_store.write_atomic(join(d, ADAPTER_CONFIG), json.dumps(cfg, indent=2).encode())
    if inactive:
        logger.info("export_peft of %s: the active adapter in %s, inactive ones in %s", src,
                    out, ", ".join(d for d in written if d != out))
    return out


def _file_key(key: str, src: str) -> str:
    """The key of a PEFT factor in an adapter file (``x.lora_A.default.weight`` ->
    ``x.lora_A.weight``)."""
    m = _LINEAR.match(key)
    if m is None:
        raise UnsupportedAdapterError(f"{src}: adapter factor {key!r} is no PEFT LoRA factor; "
                                      "export_hf the merged model")
    return f"{m['site']}.lora_{m['f']}.weight"


def _param_rank(t: manifest.AdapterTerm, full: dict[str, torch.Tensor]) -> int:
    """The LoRA rank of a term on a parameter: ``A`` is ``(r * E, in)``."""
    a = full[t.right] if t.right_split in ("", "rows") and not t.right_t else full[t.left]
    return int(a.shape[0]) // max(t.experts, 1)


def _inactive_adapters(adapters: manifest.Adapters, idle: set[str]) -> list[PeftFactors]:
    """The PEFT adapters among a step's idle tensors (inactive when it was saved)."""
    found = peft_factors(idle)
    unknown = idle - {k for f in found for k in f.keys}
    if unknown:
        raise UnsupportedAdapterError(
            f"the step holds inactive adapter tensors that are no PEFT LoRA factors "
            f"({sorted(unknown)[:4]}): export_peft cannot write them -> export_hf the merged "
            "model")
    return found


def _by_adapter(factors: list[PeftFactors]) -> dict[str, list[PeftFactors]]:
    out: dict[str, list[PeftFactors]] = {}
    for f in factors:
        out.setdefault(f.adapter, []).append(f)
    return out


def _peft_adapter(adapters: manifest.Adapters, name: str, factors: list[PeftFactors],
                  full: dict[str, torch.Tensor], src: str) -> tuple[dict, dict]:
    """The files of the inactive PEFT adapter ``name``: its factors under PEFT's names
    without the adapter name, and its config (rank and scale as its modules recorded)."""
    tensors, ranks, scales, layouts = {}, {}, {}, {}
    for f in factors:
        a, b = full[f.a], full[f.b]
        suffix = (("lora_embedding_A", "lora_embedding_B") if f.embedding
                  else ("lora_A.weight", "lora_B.weight"))
        tensors[f"{_PREFIX}{f.site}.{suffix[0]}"] = a.contiguous()
        tensors[f"{_PREFIX}{f.site}.{suffix[1]}"] = b.contiguous()
        scaling = (adapters.modules.get(f.site) or {}).get("scaling", {})
        if name not in scaling:
            raise CheckpointError(f"{src}: the scale of inactive adapter {name!r} at {f.site!r} "
                                  "is not recorded -> export_hf the merged model")
        ranks[f.site], scales[f.site] = int(a.shape[0]), float(scaling[name])
        layouts[f.site] = adapters.layouts.get(f.site) or ("embedding" if f.embedding else "linear")
    return tensors, _config(ranks, scales, layouts)


def _config(ranks: dict[str, int], scales: dict[str, float], layouts: dict[str, str],
            use_dora: bool = False) -> dict:
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    alphas = {site: scales[site] * ranks[site] for site in ranks}
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    params = sorted(s for s in ranks if layouts.get(s) == "parameter")
    modules = sorted(s for s in ranks if layouts.get(s) != "parameter")
    # PEFT reads pattern keys as regexes matched at the end of the module name (of
    # "module.parameter" for target_parameters)
    return {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": modules if modules or not params else None,
        **({"target_parameters": params} if params else {}),
        "use_rslora": False,
        "use_dora": use_dora,
        "fan_in_fan_out": any(v == "conv1d" for v in layouts.values()),
        "rank_pattern": {re.escape(s): n for s, n in ranks.items() if n != r},
        "alpha_pattern": {re.escape(s): a for s, a in alphas.items() if a != alpha},
        "lora_dropout": 0.0,
        "bias": "none",
        "modules_to_save": None,
        "inference_mode": True,
        "init_lora_weights": True,
        "task_type": None,
        "base_model_name_or_path": None,
    }


# ---- loading an adapter directory ------------------------------------------------------

def is_adapter_dir(store: Storage, path: str) -> bool:
    return (store.exists(join(path, ADAPTER_CONFIG)) and store.exists(join(path, ADAPTER_WEIGHTS))
            and not store.exists(join(path, manifest.METADATA_FILE)))


def _file_factors(tensors: dict[str, torch.Tensor], site, base_shape,
                  fan_in_fan_out: bool, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, R)`` of ``site``'s update in PEFT's files (the orientation as in
    :func:`peft_transposed`, decided by the site's base module)."""
    p = f"{_PREFIX}{site.name}."
    if f"{p}lora_embedding_A" in tensors:
        return tensors[f"{p}lora_embedding_A"].T, tensors[f"{p}lora_embedding_B"].T
    a, b = tensors[f"{p}lora_A.weight"], tensors[f"{p}lora_B.weight"]
    if peft_transposed(a.shape, b.shape, base_shape, site.base, fan_in_fan_out, where):
        return a.T, b.T  # (in, out) base: (B @ A).T
    return b, a


class PeftAdapterFormat(Format):
    """A PEFT adapter directory: its source holds the file's tensors under their own
    keys (an export refuses it: it has no base weights); loading it into a model sets
    the model's adapters (:func:`stage_adapter`)."""

    name = "peft_adapter"
    looks_like = f"a PEFT adapter directory ({ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})"

    def detect(self, store: Storage, path: str) -> bool:
        return is_adapter_dir(store, path)

    def open(self, store: Storage, path: str, want: Want) -> Source:
        load = safetensors_torch("loading a PEFT adapter").load
        # detect: it is there
        config, where = cast("tuple[dict, str]", read_peft_config(store, path))
        tensors = load(store.read_bytes(join(path, ADAPTER_WEIGHTS)))
        return Source.in_memory(
            path, tensors, meta={"adapter_only": True},
            loader=lambda view, *, strict: stage_adapter(view, path, tensors, config, where,
                                                         strict=strict))


def stage_adapter(view: ModelView, path: str, tensors: dict[str, torch.Tensor], config: dict,
                  where: str, *, strict: bool) -> Staged:
    """Plan a PEFT adapter's load (``tensors`` and ``config``, read from ``path``) into
    ``view``'s adapters. The base weights are not touched.

    Every target adapter whose module the file adapts takes the file's update exactly,
    rescaled to the target's own scale (``scale_t * L_t @ R_t == scale * L @ R``); other
    target adapters are reset (fresh). Not collective: every rank has the (small) file
    whole and keeps the block of each factor that it holds.

    Raises:
        CheckpointMismatchError: the file adapts a module the model has no adapter on, or
            the ranks differ (nothing is touched).
    """
    by_site = {s.name: s for s in view.sites}
    in_file = sorted({k[len(_PREFIX):].rsplit(".lora_", 1)[0] for k in tensors
                      if k.startswith(_PREFIX) and ".lora_" in k})
    # PEFT also saves base weights it had to (an embedding with a resized vocabulary):
    # they load into the base, as PeftModel.from_pretrained does
    base_values = {}
    strays = []
    for k in tensors:
        if k.startswith(_PREFIX) and ".lora_" in k:
            continue
        name = foreign.canonical_key(k)
        if name in view.tensors and tuple(view.tensors[name].shape) == tuple(tensors[k].shape):
            base_values[name] = tensors[k].to(view.tensors[name].dtype)
        else:
            strays.append(k)
    unknown = [s for s in in_file if s not in by_site]
    if unknown or (strays and strict):
        raise CheckpointMismatchError(
            f"PEFT adapter {path} does not match the model (nothing was loaded): it adapts "
            f"{unknown[:6] or 'the model'} (no adapter there in the model)"
            + (f" and holds other tensors {strays[:4]}" if strays else "")
            + " -> build the model with the adapter's configuration (target_modules "
            f"{config.get('target_modules')!r}, r={config.get('r')})")
    report = LoadReport()
    values: dict[str, torch.Tensor] = {}  # target adapter key -> full value
    for name in in_file:
        site = by_site[name]
        terms = site.terms()
        base_shape = view.tensors[site.weight_key].shape
        left, right = _file_factors(tensors, site, base_shape,
                                    bool(config.get("fan_in_fan_out", False)), where)
        if len(terms) != 1:
            raise UnsupportedAdapterError(f"{name!r} has {len(terms)} active adapters in the "
                                          "model; load a PEFT adapter into one")
        t = terms[0]
        scale = peft_scale(config, name, left.shape[1], where)
        left = left * (scale / t.scale)  # the target's own scale, the same update
        lkey, rkey = view.param_keys[id(t.left)], view.param_keys[id(t.right)]
        lval = left.T if t.left_transposed else left
        rval = right.T if t.right_transposed else right
        for key, val in ((lkey, lval), (rkey, rval)):
            want = tuple(view.adapter_tensors[key].shape)
            if tuple(val.shape) != want:
                raise CheckpointMismatchError(
                    f"PEFT adapter {path}: {name!r} has rank {left.shape[1]} (a factor shaped "
                    f"{tuple(val.shape)}), the model's adapter {key!r} is shaped {want} "
                    "(nothing was loaded) -> build the model's adapters with the same r")
            values[key] = val.to(view.adapter_tensors[key].dtype).contiguous()
    values.update(base_values)
    report.loaded.extend(sorted(values))
    report.fresh.extend(sorted(k for k in view.adapter_tensors if k not in values))
    report.dropped.extend(sorted(strays))
    report.notes.append(f"loaded PEFT adapter {path} into {len(in_file)} modules; the base "
                        "weights are kept as they are"
                        + (f", except {sorted(base_values)} which the adapter carries"
                           if base_values else ""))
    fresh_sites = [s for s in view.sites if s.name not in in_file]

    @torch.no_grad()
    def commit() -> None:
        for key, full in values.items():
            # values holds keys of the view only
            block, offsets = local_block(
                cast(torch.Tensor, view.adapter_tensors.get(key, view.tensors.get(key))))
            block.copy_(full[tuple(slice(o, o + n) for o, n in zip(offsets, block.shape))])
        for site in fresh_sites:
            site.kind.reset(site.module)

    return Staged(report, commit)


register_format(PeftAdapterFormat(), before="hf")
