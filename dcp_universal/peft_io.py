"""PEFT LoRA adapters (``adapter_model.safetensors`` and ``adapter_config.json``), both
ways: :func:`export_peft` writes one from a LoRA step, for
``PeftModel.from_pretrained(base, out)``; :func:`stage_adapter` loads one into a LoRA
model (adapters <- the files, base as it is), for ``load_model(model, adapter_dir)``.

Works from any LoRA step, whether its adapters were PEFT's or the library's own
``LoRALinear`` / ``LoRAEmbedding``: the manifest records every update as
``scale * L @ R`` with ``L`` lined up with the base weight's rows, and PEFT's layouts are
fixed functions of ``L`` and ``R``:

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
import json
import re

import torch

from dcp_universal import dcp_io, foreign, manifest
from dcp_universal.errors import CheckpointError, CheckpointMismatchError, UnsupportedAdapterError
from dcp_universal.safetensors_reader import safetensors_torch
from dcp_universal.plan import LoadReport
from dcp_universal.storage import Storage, join, normalize
from dcp_universal.view import ModelView, local_block

__all__ = ["export_peft", "is_adapter_dir", "stage_adapter", "ADAPTER_WEIGHTS",
           "ADAPTER_CONFIG"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = foreign.ADAPTER_CONFIG
_PREFIX = "base_model.model."


def _layout(term: manifest.AdapterTerm) -> str:
    """``linear``, ``conv1d`` or ``embedding``, from the factor names the kinds use."""
    if re.search(r"\.lora_B(\.[^.]+\.weight)?$", term.left):
        return "linear"  # own LoRALinear (x.lora_B) or PEFT Linear (x.lora_B.<a>.weight)
    if term.left.endswith(".lora_A") or ".lora_embedding_A." in term.left:
        return "embedding"  # own LoRAEmbedding (x.lora_A first) or PEFT Embedding
    if re.search(r"\.lora_A\.[^.]+\.weight$", term.left):
        return "conv1d"  # PEFT on a Conv1D base: (B @ A).T
    raise UnsupportedAdapterError(
        f"adapter factor {term.left!r} is of a kind PEFT's LoRA format cannot hold; "
        "export the merged model with export_hf instead")


def export_peft(src: str, out: str, *, storage_options: dict | None = None) -> str:
    """Write the adapters of the LoRA step ``src`` as a PEFT LoRA adapter in ``out``.

    Not collective: call it in one process. Returns ``out``.

    Raises:
        CheckpointError: ``src`` is not a LoRA step, or it trained weights that PEFT's
            adapter format cannot hold.
        UnsupportedAdapterError: a module with several updates, or an unknown kind.
    """
    save = safetensors_torch("export_peft").save
    store = Storage(storage_options)
    src, out = normalize(src), normalize(out)
    m = manifest.read_manifest(store, src)
    if m.adapters is None:
        raise CheckpointError(f"{src} is not a LoRA step (its manifest records no adapters); "
                              "export_peft needs the adapters of a LoRA run")
    adapters_dir = join(src, manifest.ADAPTERS_DIR)
    meta = dcp_io.read_metadata(store, adapters_dir).state_dict_metadata
    factor_keys = m.adapters.factor_keys()
    trained = sorted(k for k in meta if k not in factor_keys)
    if trained:
        raise CheckpointError(
            f"{src} also trained {len(trained)} weights outside the adapters (e.g. "
            f"{trained[:3]}), which a PEFT LoRA adapter cannot hold; export the merged model "
            "with export_hf, or train with only the adapters unfrozen")
    full = {k: torch.empty(tuple(meta[k].size), dtype=meta[k].properties.dtype)
            for k in sorted(factor_keys)}
    dcp_io.load_state(store, full, adapters_dir, single_process=True)

    tensors, ranks, scales, layouts = {}, {}, {}, {}
    for site, terms in sorted(m.adapters.sites.items()):
        if len(terms) != 1:
            raise UnsupportedAdapterError(
                f"{site!r} carries {len(terms)} active updates; a PEFT adapter holds one per "
                "module: export each adapter separately, or export_hf the merged model")
        t = terms[0]
        left = full[t.left].T if t.left_t else full[t.left]      # L: (rows, r)
        right = full[t.right].T if t.right_t else full[t.right]  # R: (r, cols)
        layout = layouts[site] = _layout(t)
        if layout == "linear":
            a, b, names = right, left, ("lora_A.weight", "lora_B.weight")
        else:
            a, b = left.T, right.T
            names = (("lora_embedding_A", "lora_embedding_B") if layout == "embedding"
                     else ("lora_A.weight", "lora_B.weight"))
        tensors[f"{_PREFIX}{site}.{names[0]}"] = a.contiguous()
        tensors[f"{_PREFIX}{site}.{names[1]}"] = b.contiguous()
        ranks[site] = int(a.shape[0])
        scales[site] = t.scale
    config = _config(ranks, scales, layouts)
    store.makedirs(out)
    store.write_atomic(join(out, ADAPTER_WEIGHTS), save(tensors, metadata={"format": "pt"}))
    store.write_atomic(join(out, ADAPTER_CONFIG), json.dumps(config, indent=2).encode())
    return out


def _config(ranks: dict[str, int], scales: dict[str, float], layouts: dict[str, str]) -> dict:
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    alphas = {site: scales[site] * ranks[site] for site in ranks}
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    # PEFT reads pattern keys as regexes matched at the end of the module name
    return {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(ranks),
        "use_rslora": False,
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
    :func:`foreign.peft_transposed`, decided by the site's base module)."""
    p = f"{_PREFIX}{site.name}."
    if f"{p}lora_embedding_A" in tensors:
        return tensors[f"{p}lora_embedding_A"].T, tensors[f"{p}lora_embedding_B"].T
    a, b = tensors[f"{p}lora_A.weight"], tensors[f"{p}lora_B.weight"]
    if foreign.peft_transposed(a.shape, b.shape, base_shape, site.base, fan_in_fan_out, where):
        return a.T, b.T  # (in, out) base: (B @ A).T
    return b, a


def stage_adapter(view: ModelView, path: str, store: Storage, *, strict: bool):
    """Plan and read a PEFT adapter directory into ``view``'s adapters; returns
    ``(report, commit)``. The base weights are not touched.

    Every target adapter whose module the file adapts takes the file's update exactly,
    rescaled to the target's own scale (``scale_t * L_t @ R_t == scale * L @ R``); other
    target adapters are reset (fresh). Not collective: every rank reads the (small) file
    whole and keeps the block of each factor that it holds.

    Raises:
        CheckpointMismatchError: the file adapts a module the model has no adapter on, or
            the ranks differ (nothing is touched).
    """
    load = safetensors_torch("loading a PEFT adapter").load

    config, where = foreign.read_peft_config(store, path)  # is_adapter_dir: it is there
    tensors = load(store.read_bytes(join(path, ADAPTER_WEIGHTS)))
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
        scale = foreign.peft_scale(config, name, left.shape[1], where)
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
            block, offsets = local_block(view.adapter_tensors.get(key, view.tensors.get(key)))
            block.copy_(full[tuple(slice(o, o + n) for o, n in zip(offsets, block.shape))])
        for site in fresh_sites:
            site.kind.reset(site.module)

    return report, commit
