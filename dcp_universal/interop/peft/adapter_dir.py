"""A PEFT adapter directory (``adapter_model.safetensors`` + ``adapter_config.json``)
as an input format (:class:`PeftAdapterFormat`): loading it into a LoRA model sets the
adapters from the files and keeps the base."""

from __future__ import annotations

from typing import cast

import torch

from dcp_universal.sources import foreign
from dcp_universal.format import manifest
from dcp_universal.errors import CheckpointMismatchError, UnsupportedAdapterError
from dcp_universal.model.plan import LoadReport, Staged
from dcp_universal.interop.safetensors import import_safetensors
from dcp_universal.sources import Format, Source, Want, register_format
from dcp_universal.storage import Storage, join
from dcp_universal.model.view import ModelView, local_block
from dcp_universal.interop.peft.factors import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, PREFIX,
                                                peft_scale, peft_transposed, read_peft_config)

__all__ = ["is_adapter_dir", "PeftAdapterFormat", "stage_adapter"]

def is_adapter_dir(store: Storage, path: str) -> bool:
    return (store.exists(join(path, ADAPTER_CONFIG)) and store.exists(join(path, ADAPTER_WEIGHTS))
            and not store.exists(join(path, manifest.METADATA_FILE)))


def _factors_from_files(tensors: dict[str, torch.Tensor], site, base_shape,
                  fan_in_fan_out: bool, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, R)`` of ``site``'s update in PEFT's files (the orientation as in
    :func:`peft_transposed`, decided by the site's base module)."""
    p = f"{PREFIX}{site.name}."
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
        load = import_safetensors("loading a PEFT adapter").load
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
    in_file = sorted({k[len(PREFIX):].rsplit(".lora_", 1)[0] for k in tensors
                      if k.startswith(PREFIX) and ".lora_" in k})
    # PEFT also saves base weights it had to (an embedding with a resized vocabulary):
    # they load into the base, as PeftModel.from_pretrained does
    base_values = {}
    strays = []
    for k in tensors:
        if k.startswith(PREFIX) and ".lora_" in k:
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
        left, right = _factors_from_files(tensors, site, base_shape,
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
