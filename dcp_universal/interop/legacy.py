"""Legacy ``torch.save`` checkpoints (nanoGPT and similar), read directly (no conversion step).

Recognised files:

* nanoGPT-style ``ckpt.pt``: ``{"model", "optimizer", "model_args", "iter_num",
  "best_val_loss", "config"}``, keys possibly under ``_orig_mod.`` and with the
  LoRA layout (``x.main_weight.weight``, ``x.lora_A.weight``, ``x.lora_B.weight``);
* ``{"model_state_dict": ...}`` / ``{"state_dict": ...}`` dicts, or a bare state dict;
* separated ``NAME-model.pt`` / ``NAME-optimizer.pt`` pairs (either file may be named).

The model comes out under canonical names with LoRA merged: ``W + alpha / r * B @ A`` for
Linear layers (``A: (r, in)``, ``B: (out, r)``) and ``W + alpha / r * A @ B.T`` for
Embeddings (``A: (num, r)``, ``B: (dim, r)``); ``alpha`` is read from the file's
``model_args`` / ``config`` (``lora_alpha``).
"""

from __future__ import annotations

import dataclasses
import pickle
from typing import Any

import torch

from dcp_universal.sources import foreign
from dcp_universal.errors import CheckpointError
from dcp_universal.sources import Format, Source, Want, register_format
from dcp_universal.storage import Storage

__all__ = ["LegacyCheckpoint", "LegacyFormat", "is_legacy_file", "read_legacy"]

_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
_MODEL_KEYS = ("model", "model_state_dict", "state_dict")
@dataclasses.dataclass
class LegacyCheckpoint:
    path: str
    model: dict[str, torch.Tensor]  # canonical names, LoRA merged
    optimizer: dict | None
    meta: dict[str, Any]  # everything else: model_args, iter_num, config, ...
    merged: list[str]  # canonical keys that had a LoRA update merged in


def is_legacy_file(store: Storage, path: str) -> bool:
    return path.endswith(_SUFFIXES) and store.is_file(path)


def _load(store: Storage, path: str) -> Any:
    try:
        with store.open_read(path) as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} does not exist") from None
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} holds objects outside torch.load's safe set ({str(e).splitlines()[0]}); "
            "it may not be a checkpoint. If you trust the file, re-save its tensors with "
            "torch.save(state_dict) and load that") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable torch.save file ({e}); it may be "
                              "truncated or damaged") from None


def _pair(store: Storage, path: str) -> tuple[str, str | None]:
    for suffix in _SUFFIXES:
        for part in ("-model", "-optimizer"):
            if path.endswith(part + suffix):
                stem = path[: -len(part + suffix)]
                opt = f"{stem}-optimizer{suffix}"
                return f"{stem}-model{suffix}", opt if store.exists(opt) else None
    return path, None


def _find_alpha(meta: dict[str, Any]) -> float | None:
    for holder in (meta, meta.get("model_args"), meta.get("config")):
        if isinstance(holder, dict) and "lora_alpha" in holder:
            return float(holder["lora_alpha"])
    return None


def _merge_seed_lora(sd: dict[str, torch.Tensor], alpha: float | None, path: str):
    out, merged = {}, []
    stems = {k[: -len(".main_weight.weight")] for k in sd if k.endswith(".main_weight.weight")}
    for key, value in sd.items():
        stem = next((s for s in stems if key.startswith(s + ".")), None)
        if stem is None:
            out[key] = value
            continue
        rest = key[len(stem) + 1:]
        if rest.startswith("main_weight."):
            out[f"{stem}.{rest[len('main_weight.'):]}"] = value
        elif not rest.startswith(("lora_A.", "lora_B.")):
            out[key] = value
    for stem in sorted(stems):
        w = sd[f"{stem}.main_weight.weight"]
        a, b = sd.get(f"{stem}.lora_A.weight"), sd.get(f"{stem}.lora_B.weight")
        if a is None or b is None or a.numel() == 0:
            continue  # rank 0: a plain layer in LoRA clothing
        if alpha is None:
            raise CheckpointError(
                f"{path} holds LoRA weights ({stem}.lora_A/lora_B) but no lora_alpha in its "
                "model_args or config; the merge scale alpha / r is unknown")
        if b.shape == (w.shape[0], a.shape[0]) and a.shape[1] == w.shape[1]:
            r, delta = a.shape[0], b.double() @ a.double()  # Linear: A (r, in), B (out, r)
        elif a.shape[0] == w.shape[0] and b.shape == (w.shape[1], a.shape[1]):
            r, delta = a.shape[1], a.double() @ b.double().T  # Embedding: A (num, r), B (dim, r)
        else:
            raise CheckpointError(
                f"{path}: cannot merge {stem}: main_weight {tuple(w.shape)}, lora_A "
                f"{tuple(a.shape)}, lora_B {tuple(b.shape)} fit neither the Linear nor the "
                "Embedding LoRA layout")
        out[f"{stem}.weight"] = (w.double() + (alpha / r) * delta).to(w.dtype)
        merged.append(f"{stem}.weight")
    return out, merged


def read_legacy(store: Storage, path: str) -> LegacyCheckpoint:
    """Read a legacy ``torch.save`` checkpoint into canonical, merged form (CPU)."""
    model_path, opt_path = _pair(store, path)
    blob = _load(store, model_path)
    if not isinstance(blob, dict):
        raise CheckpointError(f"{model_path} holds a {type(blob).__name__}, not a checkpoint dict")
    key = next((k for k in _MODEL_KEYS if isinstance(blob.get(k), dict)), None)
    if key is not None:
        sd, meta = blob[key], {k: v for k, v in blob.items() if k != key}
    elif blob and all(isinstance(v, torch.Tensor) for v in blob.values()):
        sd, meta = blob, {}
    else:
        raise CheckpointError(
            f"{model_path} has no model state: expected one of {list(_MODEL_KEYS)} or a bare "
            f"state dict; found keys {sorted(blob)[:10]}")
    optimizer = meta.pop("optimizer", None) or meta.pop("optimizer_state_dict", None)
    if opt_path is not None:
        opt_blob = _load(store, opt_path)
        states = opt_blob.get("optimizer_states") or [opt_blob.get("optimizer")
                                                      or opt_blob.get("optimizer_state_dict")]
        optimizer = states[0] if states else None
        meta.update({k: v for k, v in opt_blob.items()
                     if k not in ("optimizer_states", "optimizer", "optimizer_state_dict")})
    canonical: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        name = foreign.canonical_key(k)  # the same string rules as other tools' DCP keys
        if name is None:  # a PEFT modules_to_save original: not the trained model's
            continue
        if name in canonical:
            raise CheckpointError(f"{model_path}: keys {k!r} and another both mean {name!r}")
        canonical[name] = v
    model, merged = _merge_seed_lora(canonical, _find_alpha(meta), model_path)
    return LegacyCheckpoint(model_path, model, optimizer, meta, merged)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return repr(value)


class LegacyFormat(Format):
    """A legacy ``torch.save`` file, read whole into memory."""

    name = "legacy"
    looks_like = f"a torch.save file ({', '.join(_SUFFIXES)})"

    def detect(self, store: Storage, path: str) -> bool:
        return is_legacy_file(store, path)

    def open(self, store: Storage, path: str, want: Want) -> Source:
        ck = read_legacy(store, path)
        note = f"read legacy file {ck.path}" + (
            f"; merged main_weight-layout LoRA into {len(ck.merged)} weights" if ck.merged else "")
        step = next((ck.meta[k] for k in ("iter_num", "global_step", "step") if k in ck.meta),
                    None)
        return Source.in_memory(ck.path, ck.model, notes=(note,), meta={
            "step": step,
            "legacy": {"source": ck.path, "merged_lora": ck.merged,
                       "meta": _jsonable({k: v for k, v in ck.meta.items() if k != "optimizer"})}})


register_format(LegacyFormat(), before="step")
