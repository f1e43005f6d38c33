"""Export a LoRA step as a PEFT adapter: ``adapter_model.safetensors`` and
``adapter_config.json``, which ``PeftModel.from_pretrained(base, out)`` loads.

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

from dcp_universal import dcp_io, manifest
from dcp_universal.errors import CheckpointError, UnsupportedAdapterError
from dcp_universal.storage import Storage, join, normalize

__all__ = ["export_peft", "ADAPTER_WEIGHTS", "ADAPTER_CONFIG"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
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
    try:
        from safetensors.torch import save
    except ImportError:
        raise CheckpointError("export_peft writes safetensors, which is not installed: "
                              "pip install 'dcp-universal[hf]'") from None
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
