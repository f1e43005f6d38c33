"""Export of any LoRA step as a PEFT adapter directory (:func:`export_peft`); see
:mod:`dcp_universal.interop.peft` for the layouts."""

from __future__ import annotations

import collections
import json
import logging
import re
from typing import cast

import torch
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from dcp_universal.storage import dcp_io, steps
from dcp_universal.format import manifest
from dcp_universal.errors import CheckpointError, ExportExistsError, UnsupportedAdapterError
from dcp_universal.interop.safetensors import import_safetensors
from dcp_universal.storage import join, normalize, storage_for
from dcp_universal.interop.peft.factors import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, LINEAR_FACTOR,
                                                PREFIX, PeftFactors, peft_factors)

__all__ = ["export_peft"]

logger = logging.getLogger(__name__)

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
    save = import_safetensors("export_peft").save
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

    tensors = {f"{PREFIX}{k}": full[k].contiguous() for k in trained}
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
                tensors[PREFIX + _file_key(key, src)] = full[key].contiguous()
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
        tensors[f"{PREFIX}{site}.{names[0]}"] = a.contiguous()
        tensors[f"{PREFIX}{site}.{names[1]}"] = b.contiguous()
        if site in m.adapters.magnitudes:  # DoRA: PEFT's file drops the ".<adapter>.weight"
            tensors[f"{PREFIX}{site}.lora_magnitude_vector"] = \
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
    m = LINEAR_FACTOR.match(key)
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
        tensors[f"{PREFIX}{f.site}.{suffix[0]}"] = a.contiguous()
        tensors[f"{PREFIX}{f.site}.{suffix[1]}"] = b.contiguous()
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
