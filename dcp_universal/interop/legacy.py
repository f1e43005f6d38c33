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

Any of them may hold the library's own LoRA layers' state dict instead
(``x.base_layer.weight``, ``x.lora_A.weight``, ...): those factors go to the target's
same adapters as they are, or are merged with the same ``lora_alpha``
(:mod:`dcp_universal.sources.own_lora`).
"""

from __future__ import annotations

import dataclasses
import pickle
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from dcp_universal.sources import foreign, own_lora
from dcp_universal.errors import (CheckpointError, CheckpointMismatchError, IntegrityError,
                                  NotACheckpointError, UnsafeCheckpointError,
                                  UnsupportedAdapterError)
from dcp_universal.format.torch_formats import check_torch_archive, is_zip
from dcp_universal.model.plan import LoadReport, Staged
from dcp_universal.model.view import ModelView, local_block
from dcp_universal.sources import Format, Source, Want, register_format
from dcp_universal.storage import Storage

__all__ = ["LegacyCheckpoint", "MainWeightLoRA", "LegacyFormat", "is_legacy_file",
           "read_legacy", "load_file", "stage_legacy_optimizer"]

_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
_MODEL_KEYS = ("model", "model_state_dict", "state_dict")
@dataclasses.dataclass
class LegacyCheckpoint:
    path: str
    model: dict[str, torch.Tensor]  # canonical names, LoRA merged
    optimizer: dict | None
    meta: dict[str, Any]  # everything else: model_args, iter_num, config, ...
    merged: list[str]  # canonical keys that had a LoRA update merged in
    # the unmerged form: frozen weights (main_weight under the layer's own name) and
    # the LoRA factors of each merged layer, for a target with the same adapters
    base: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    factors: dict[str, "MainWeightLoRA"] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class MainWeightLoRA:
    """One layer's adapter in the ``main_weight`` layout: ``delta = alpha / r * B @ A``
    (Linear: ``A (r, in)``, ``B (out, r)``) or ``alpha / r * A @ B.T`` (Embedding:
    ``A (num, r)``, ``B (dim, r)``)."""

    a: torch.Tensor
    b: torch.Tensor
    rank: int
    scale: float
    embedding: bool


def is_legacy_file(store: Storage, path: str) -> bool:
    return path.endswith(_SUFFIXES) and store.is_file(path)


def _load(store: Storage, path: str) -> Any:
    try:
        with store.open_read(path) as f:
            _check_archive(f, store.size(path), path)
            f.seek(0)
            return torch.load(f, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise NotACheckpointError(f"checkpoint file {path} does not exist") from None
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"{path} holds objects outside torch.load's safe set ({str(e).splitlines()[0]}); "
            "it may not be a checkpoint. If you trust the file, re-save its tensors with "
            "torch.save(state_dict) and load that") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise IntegrityError(f"{path} is not a readable torch.save file ({e}); it may be "
                             "truncated or damaged") from None


def load_file(store: Storage, path: str) -> Any:
    """One ``torch.save`` file (an ``optimizer.state_dict()``, a scheduler's), read as
    plain data (``weights_only``) after its archive is checked."""
    return _load(store, path)


def _check_archive(f, size: int, path: str) -> None:
    """Refuse a file ``torch.load`` would read past its own bytes: not a zip archive
    (torch < 1.6's format allocates every storage as declared before reading it), or an
    archive :func:`check_torch_archive` refuses (compressed records, storages larger
    than their records, a pickle asking for more than it holds)."""
    def read(pos: int, n: int) -> bytes:
        f.seek(pos)
        return f.read(n)

    if not is_zip(read(0, 4)):
        raise IntegrityError(
            f"{path} is not a torch.save zip archive (the format of torch >= 1.6): an older "
            "file's storages are allocated as it declares before they are read -> re-save "
            "it with a current torch (torch.save(torch.load(path)), only if you trust it)")
    check_torch_archive(read, 0, size, path)


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


def _merge_main_weight_lora(sd: dict[str, torch.Tensor], alpha: float | None, path: str):
    """``(merged state dict, merged keys, base state dict, factors)`` of a state dict in
    the ``main_weight`` layout."""
    out, merged, factors = {}, [], {}
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
    base = dict(out)  # every weight as the file holds it, before the merge below
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
            r, delta, emb = a.shape[0], b.double() @ a.double(), False  # Linear
        elif a.shape[0] == w.shape[0] and b.shape == (w.shape[1], a.shape[1]):
            r, delta, emb = a.shape[1], a.double() @ b.double().T, True  # Embedding
        else:
            raise UnsupportedAdapterError(
                f"{path}: cannot merge {stem}: main_weight {tuple(w.shape)}, lora_A "
                f"{tuple(a.shape)}, lora_B {tuple(b.shape)} fit neither the Linear nor the "
                "Embedding LoRA layout")
        out[f"{stem}.weight"] = (w.double() + (alpha / r) * delta).to(w.dtype)
        merged.append(f"{stem}.weight")
        factors[stem] = MainWeightLoRA(a, b, r, alpha / r, emb)
    return out, merged, base, factors


def read_legacy(store: Storage, path: str) -> LegacyCheckpoint:
    """Read a legacy ``torch.save`` checkpoint into canonical, merged form (CPU)."""
    model_path, opt_path = _pair(store, path)
    blob = _load(store, model_path)
    if not isinstance(blob, dict):
        raise NotACheckpointError(f"{model_path} holds a {type(blob).__name__}, not a checkpoint dict")
    key = next((k for k in _MODEL_KEYS if isinstance(blob.get(k), dict)), None)
    if key is not None:
        sd, meta = blob[key], {k: v for k, v in blob.items() if k != key}
    elif blob and all(isinstance(v, torch.Tensor) for v in blob.values()):
        sd, meta = blob, {}
    else:
        raise NotACheckpointError(
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
            raise CheckpointMismatchError(f"{model_path}: keys {k!r} and another both mean {name!r}")
        canonical[name] = v
    model, merged, base, factors = _merge_main_weight_lora(canonical, _find_alpha(meta),
                                                           model_path)
    return LegacyCheckpoint(model_path, model, optimizer, meta, merged, base, factors)


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
        step = next((ck.meta[k] for k in ("iter_num", "global_step", "step") if k in ck.meta),
                    None)
        meta = {"step": step, "optimizer": ck.optimizer, own_lora.ALPHA: _find_alpha(ck.meta),
                "legacy": {"source": ck.path, "merged_lora": ck.merged,
                           "meta": _jsonable({k: v for k, v in ck.meta.items()
                                              if k != "optimizer"})}}
        exact = _into_own_adapters(ck, want.target) if want.target is not None else None
        if exact is not None:
            tensors, layout = exact
            note = (f"read legacy file {ck.path}; restored its main_weight-layout LoRA of "
                    f"{len(ck.factors)} layers into the model's adapters exactly")
            return Source.in_memory(ck.path, tensors, notes=(note,),
                                    meta={**meta, "layout": layout})
        note = f"read legacy file {ck.path}" + (
            f"; merged main_weight-layout LoRA into {len(ck.merged)} weights" if ck.merged else "")
        source = Source.in_memory(ck.path, ck.model, notes=(note,), meta=meta)
        # the state dict of the library's own layers: factors to the target, or merged
        return source if want.target is None else own_lora.read_own_factors(source, want.target)


def _into_own_adapters(ck: LegacyCheckpoint, view) -> tuple[dict, dict] | None:
    """The file's tensors for a target whose adapters are the library's own LoRA layers on
    exactly the file's LoRA layers, each of the same rank: base weights as they are and
    the factors in the layers' orientation, rescaled to the target's scale.
    ``(tensors, layout)``: layout maps each factor key to ``(transposed, ratio)`` (how
    its optimizer state relates to the file's). ``None``: no such target (merged)."""
    sites = {s.name: s for s in view.sites}
    if not ck.factors or set(sites) != set(ck.factors) or any(
            s.kind.name != own_lora.OWN_KIND for s in sites.values()):
        return None
    tensors, layout = dict(ck.base), {}
    for stem, f in ck.factors.items():
        module = sites[stem].module
        is_embedding = isinstance(module.base_layer, torch.nn.Embedding)
        if module.rank != f.rank or is_embedding != f.embedding:
            return None
        ratio = f.scale / module.scale
        b = f.b.T if f.embedding else f.b  # own Embedding: B (r, dim); Linear as the file
        tensors[f"{stem}.lora_A"] = f.a
        tensors[f"{stem}.lora_B"] = (b * ratio).contiguous() if ratio != 1.0 else b.contiguous()
        layout[f"{stem}.lora_A"] = (False, 1.0)
        layout[f"{stem}.lora_B"] = (f.embedding, ratio)
    return tensors, layout


register_format(LegacyFormat(), before="step")


# ---- a legacy optimizer state: saved by position, mapped onto a target optimizer ----------

def _saved_groups(saved: Any, desc: str) -> list[dict]:
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if not isinstance(groups, list) or not isinstance(saved.get("state"), dict) or not all(
            isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
        raise CheckpointMismatchError(
            f"{desc}: its optimizer entry is not an optimizer.state_dict() (expected "
            "{'state': {...}, 'param_groups': [{'params': [...], ...}]}); load the model "
            "alone (no optimizer) or re-save the optimizer's state_dict()")
    return groups


def _local(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``value`` (shaped like the whole ``param``) as ``param`` holds it: its own block of
    a DTensor, without a collective (every rank read the whole file)."""
    if not isinstance(param, DTensor):
        return value
    block, offsets = local_block(param)
    part = value[tuple(slice(o, o + n) for o, n in zip(offsets, block.shape))]
    return DTensor.from_local(part.to(block.device), param.device_mesh, param.placements,
                              shape=param.shape, stride=param.stride(), run_check=False)


def stage_legacy_optimizer(view: ModelView, optimizer: torch.optim.Optimizer, saved: Any, *,
                           fresh: set[str], layout: dict, hyperparams: str,
                           desc: str) -> Staged:
    """The optimizer state of a legacy file (an ``optimizer.state_dict()``: state keyed
    by parameter ids), mapped onto ``optimizer``'s parameters: by the ``param_names``
    torch records when the optimizer was built from named parameters, else by position
    across the param groups (empty groups hold no position: ``[392, 0]`` saved fits
    ``[392]``). Every state tensor must have its parameter's shape (``layout``: a factor
    stored transposed, or rescaled, in the file; a rescaled one starts fresh); any
    ambiguity or mismatch raises :class:`CheckpointMismatchError` naming the first
    parameter that does not fit, before anything changes. ``fresh``: parameters the
    model load initialised (their saved state is not theirs). Not collective."""
    groups = _saved_groups(saved, desc)
    names = view.optimizer_param_names(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    ids = [i for g in groups for i in g["params"]]
    sizes = ([len(g["params"]) for g in groups], [len(g["params"]) for g in optimizer.param_groups])
    saved_names = None
    if groups and all(isinstance(g.get("param_names"), list) for g in groups):
        saved_names = [foreign.canonical_key(n) or n for g in groups for n in g["param_names"]]
    if saved_names is not None:
        by_name = dict(zip(saved_names, ids))
        # the file names parameters as its model did: canonical, or this model's own
        # names made canonical by the string rules (own LoRA: "q.lora_A.weight")
        aliases = {id(p): {names[id(p)], foreign.canonical_key(raw) or raw}
                   for raw, p in view.model.named_parameters(remove_duplicate=False)
                   if id(p) in names}
        pairs = [(p, next((by_name[a] for a in sorted(aliases.get(id(p), {names[id(p)]}))
                           if a in by_name), None)) for p in params]
        how = "matched by the parameter names the file records"
        unmatched = [names[id(p)] for p, sid in pairs if sid is None]
        if unmatched:
            raise CheckpointMismatchError(
                f"{desc}: its optimizer has no state for {unmatched[0]!r} (of {len(unmatched)} "
                f"parameters the optimizer holds that the file does not name, e.g. "
                f"{unmatched[:3]}) -> build the optimizer from the parameters the saved run "
                "trained, or load the model alone (no optimizer)")
    else:
        if len(ids) != len(params):
            first = names[id(params[len(ids)])] if len(params) > len(ids) else \
                f"saved parameter id {ids[len(params)]} (position {len(params)})"
            raise CheckpointMismatchError(
                f"{desc}: its optimizer holds state for {len(ids)} parameters (param groups of "
                f"{sizes[0]}), the optimizer given holds {len(params)} ({sizes[1]}); the file "
                "records no parameter names, so they are matched by position and cannot be "
                f"here (the first without a counterpart: {first}) -> build the optimizer as "
                "the saved run did: its trainable parameters, in model order (LoRA: "
                "[p for p in model.parameters() if p.requires_grad]), or load the model alone")
        pairs = list(zip(params, ids))
        how = ("matched by position across the param groups (the file records no parameter "
               "names)")
    state, report = {}, LoadReport()
    for pos, (p, sid) in enumerate(pairs):
        name = names[id(p)]
        transposed, ratio = layout.get(name, (False, 1.0))
        entry = saved["state"].get(sid)
        if not isinstance(entry, dict) or not entry or name in fresh:
            # no state saved, or the model load initialised the parameter (another LoRA
            # rank): whatever was saved at this position is not its state
            report.optimizer_fresh.append(name)
            continue
        values = {}
        for key, v in entry.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                v = v.T if transposed else v
                if tuple(v.shape) != tuple(p.shape):
                    raise CheckpointMismatchError(
                        f"{desc}: the optimizer state of saved parameter id {sid} ({key} "
                        f"{tuple(v.shape)}) does not fit {name!r} {tuple(p.shape)}, the "
                        f"parameter it maps to (position {pos}) -> "
                        "build the optimizer from the same parameters in the same order as "
                        "the saved run (its trainable ones, in model order), or load the "
                        "model alone")
                values[key] = v
            else:
                values[key] = v
        if ratio != 1.0:  # a factor rescaled to the target's alpha: its moments are not
            report.optimizer_fresh.append(name)
            continue
        state[pos] = values
        report.optimizer_restored.append(name)
    dropped = sorted(set(saved["state"]) - {sid for _, sid in pairs})
    report.optimizer_dropped.extend(f"saved parameter id {i}" for i in dropped)
    by_size = [g for g in groups if g["params"]]
    current = [g for g in optimizer.param_groups]
    restore = hyperparams == "checkpoint" and saved_names is None and \
        [len(g["params"]) for g in by_size] == [len(g["params"]) for g in current]
    report.notes.append(
        f"optimizer state from {desc}: {how}; saved param groups of {sizes[0]} parameters, "
        f"the optimizer's of {sizes[1]}; " + (
            "hyperparameters restored from the file's non-empty groups" if restore
            else "the optimizer's own groups and hyperparameters stand"))

    def commit() -> None:
        out_groups, pos = [], 0
        for i, g in enumerate(current):
            keep = {k: v for k, v in (by_size[i] if restore else g).items()
                    if k not in ("params", "param_names")}
            if "param_names" in g:
                keep["param_names"] = g["param_names"]
            out_groups.append({**keep, "params": list(range(pos, pos + len(g["params"])))})
            pos += len(g["params"])
        local = {i: {k: _local(v, params[i]) if isinstance(v, torch.Tensor) and v.dim() > 0
                     else v for k, v in values.items()} for i, values in state.items()}
        optimizer.load_state_dict({"state": local, "param_groups": out_groups})

    return Staged(report, commit)
