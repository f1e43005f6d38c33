"""PEFT LoRA factors inside another tool's DCP checkpoint: found by their keys
(:func:`peft_factors`), scaled by the ``adapter_config.json`` PEFT writes beside them
(:func:`read_peft_config`, :func:`peft_scale`), and merged into the base weight on load
by the factor rule registered with :mod:`dcp_universal.sources.dcp`."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Iterable, cast

import torch.nn as nn

from dcp_universal import adapters
from dcp_universal.format import manifest
from dcp_universal.sources.dcp import register_factor_rule
from dcp_universal.errors import CheckpointMismatchError, UnsupportedAdapterError
from dcp_universal.model.names import canonical_module_names
from dcp_universal.sources import Source
from dcp_universal.storage import Storage, join, parent
from dcp_universal.model.view import ModelView

__all__ = ["PeftFactors", "peft_factors", "read_peft_config", "peft_scale",
           "peft_transposed", "merge_terms", "merge_foreign_factors", "ADAPTER_WEIGHTS",
           "ADAPTER_CONFIG", "PREFIX", "LINEAR_FACTOR", "EMBEDDING_FACTOR"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
#: where PEFT keeps the base model's own names in its state dict
PREFIX = "base_model.model."

LINEAR_FACTOR = re.compile(r"^(?P<site>.+)\.lora_(?P<f>A|B)\.(?P<adapter>[^.]+)\.weight$")
EMBEDDING_FACTOR = re.compile(r"^(?P<site>.+)\.lora_embedding_(?P<f>A|B)\.(?P<adapter>[^.]+)$")
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
        for pattern, emb in ((LINEAR_FACTOR, False), (EMBEDDING_FACTOR, True)):
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
