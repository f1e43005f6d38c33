"""save_model / load_model: the universal model format over DCP.

A model directory is a plain DCP checkpoint whose keys are canonical names and whose
adapted weights hold ``W + scale * B @ A``. With ``merge="sharded"`` the merge happens in
:class:`_MergingSavePlanner.resolve_data`, one write item at a time, on the rank that
writes that item; only the small adapter factors are gathered beforehand.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable

import torch
import torch.nn as nn
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import WriteItem
from torch.distributed.tensor import DTensor

from dcp_universal import _comm, adapters, dcp_io, foreign, legacy, manifest, merge, peft_io
from dcp_universal.errors import CheckpointError, CheckpointMismatchError, NotACheckpointError
from dcp_universal.integrity import check_files
from dcp_universal.manifest import FileRecord, Manifest
from dcp_universal.mapped import Copies
from dcp_universal.staging import dtensor_like, host_empty
from dcp_universal.names import canonical_module_names
from dcp_universal.plan import LoadReport, TensorInfo, plan_load
from dcp_universal.storage import Storage, is_remote, join, normalize
from dcp_universal.view import ModelView, local_block

__all__ = ["save_model", "load_model", "write_model", "model_writer", "stage_model", "StagedLoad",
           "MERGE_MODES", "check_merge", "resolve_model_dir", "Source", "merged_source",
           "read_source"]

logger = logging.getLogger(__name__)

MERGE_MODES = ("sharded", "rank0")


def check_merge(merge: str) -> None:
    if merge not in MERGE_MODES:
        raise ValueError(f"merge={merge!r}: expected one of {MERGE_MODES}")


class _MergingSavePlanner(DefaultSavePlanner):
    """Writes ``W + updates`` for adapted weights, computed per write item.

    ``state_dict`` holds the base weights themselves (same shape, dtype and placement as
    the merged result), so DCP plans, dedups and load-balances exactly as for a plain
    model; only the bytes of the adapted items differ.
    """

    def __init__(self, factors: dict[str, list[merge.Factors]]) -> None:
        super().__init__()
        self._factors = factors

    def resolve_data(self, write_item: WriteItem):
        factors = self._factors.get(write_item.index.fqn)
        if factors is None:
            return super().resolve_data(write_item)
        block = self.lookup_object(write_item.index)
        return merge.merge_block(block, write_item.tensor_data.chunk.offsets, factors)


def save_model(model: nn.Module, path: str, *, merge: str = "sharded",
               storage_options: dict | None = None) -> None:
    """Write ``model`` as one universal model DCP directory at ``path``.

    Collective: call on every rank of the process group (or in a single process with no
    group). Keys are canonical; every LoRA update is merged into its base weight.

    Args:
        model: plain, DDP, FSDP2, compiled, activation-checkpointed or PEFT model.
        path: the directory to write (local, ``file://`` or an fsspec URL).
        merge: ``"sharded"`` merges on each rank's own shards (default);
            ``"rank0"`` gathers the full state to rank 0's CPU, merges and writes there.
        storage_options: fsspec options when ``path`` is a URL (``s3://...``).
    """
    check_merge(merge)
    # a bare model directory has no manifest to record checksums in
    write_model(ModelView.of(model), normalize(path), merge, Storage(storage_options),
                checksums=False)


def write_model(view: ModelView, path: str, merge: str, store: Storage, *,
                checksums: bool = True) -> dict[str, FileRecord]:
    """save_model of an already built view; returns the records of this rank's files.
    Collective: :func:`model_writer`, then its write."""
    return model_writer(view, merge, store, checksums=checksums)(path)


def model_writer(view: ModelView, mode: str, store: Storage, *, checksums: bool = True,
                 stage: Callable[[object, str], object] | None = None
                 ) -> Callable[[str], dict[str, FileRecord]]:
    """A model save in two parts: what reads the model happens now, and the write is
    returned (``write(path)`` -> the records of this rank's files).

    ``stage`` (an asynchronous save's :meth:`~dcp_universal.staging.Stager.stage`)
    copies what the write will read, so the model may change before it runs.

    Collective, every rank, now: ``mode="sharded"``: one factor gather;
    ``"rank0"``: one ``full_tensor()`` per tensor, one factor gather. At ``write``:
    ``"sharded"``: one ``dcp.save``; ``"rank0"``: rank 0 writes alone and tells every
    rank how it went (``_comm.on_rank0``).
    """
    keep = stage if stage is not None else (lambda obj, slot: obj)
    if mode == "sharded":
        gathered = merge.gather_factors(view.sites, [view.tensors[s.weight_key] for s in view.sites])
        factors = keep({s.weight_key: f for s, f in zip(view.sites, gathered)}, "model.factors")
        tensors = keep(view.tensors, "model")

        def write(path: str) -> dict[str, FileRecord]:
            return dcp_io.save_state(store, tensors, path, planner=_MergingSavePlanner(factors),
                                     own_file_keys=set(factors), checksums=checksums)
    else:
        full = keep(_full_merged(view), "model")

        def write(path: str) -> dict[str, FileRecord]:
            files = _comm.on_rank0(dcp_io.save_state, store, full, path, checksums=checksums,
                                   single_process=True)
            return files if _comm.rank() == 0 else {}

    def timed(path: str) -> dict[str, FileRecord]:
        start = time.perf_counter()
        files = write(path)
        if _comm.rank() == 0:
            logger.info("saved model (%d tensors, %d adapters merged %s) to %s in %.2f s",
                        len(view.tensors), len(view.sites), mode, path,
                        time.perf_counter() - start)
        return files

    return timed


@torch.no_grad()
def _full_merged(view: ModelView) -> dict[str, torch.Tensor]:
    """Rank 0: every tensor whole, adapters merged; other ranks: ``{}`` (collective)."""
    rank = _comm.rank()
    full = {}
    for key, t in view.tensors.items():
        f = t.full_tensor() if isinstance(t, DTensor) else t
        if rank == 0:
            full[key] = f.detach().cpu()
    gathered = merge.gather_factors(view.sites, [torch.empty(0)] * len(view.sites))
    if rank == 0:
        for site, factors in zip(view.sites, gathered):
            full[site.weight_key] = merge.merge_block(full[site.weight_key], (0, 0), factors)
    return full


def _checkpoint_info(store: Storage, dcp_dir: str, seen: dict | None = None
                     ) -> dict[str, TensorInfo]:
    return _checkpoint_entries(store, dcp_dir, seen=seen)[0]


def _checkpoint_entries(store: Storage, dcp_dir: str, *, hf: bool = False,
                        seen: dict | None = None) -> tuple[dict[str, TensorInfo], list[str]]:
    """(tensor key -> info, non-tensor keys) of a DCP directory (or, ``hf``, a Hugging
    Face safetensors directory), from its metadata, which is added to ``seen`` (dir ->
    metadata) so the read need not parse it again."""
    meta = dcp_io.read_metadata(store, dcp_dir, hf=hf)
    if seen is not None and not hf:
        seen[dcp_dir] = meta
    tensors, other = {}, []
    for k, m in meta.state_dict_metadata.items():
        if isinstance(m, TensorStorageMetadata):
            tensors[k] = TensorInfo(tuple(m.size), m.properties.dtype)
        else:
            other.append(k)
    return tensors, other


def _infos(tensors: dict[str, torch.Tensor]) -> dict[str, TensorInfo]:
    return {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in tensors.items()}


@dataclasses.dataclass
class Source:
    """A checkpoint's model, as the loader sees it.

    Attributes:
        desc: the path, for messages.
        keys: canonical key -> info of every tensor the checkpoint offers.
        dir_of: canonical key -> the DCP directory holding it.
        deltas: weight key -> adapter terms to add after reading it (a LoRA step with
            no merged ``model/``: base plus adapters, composed on load).
        factors: canonical key -> info of the adapter factors ``deltas`` use.
        factor_dir: where those factors live.
        restored_base: the base a LoRA step was restored from exactly (same adapters).
        raw_of: canonical key -> its key in the DCP directory, where they differ (a
            checkpoint written by another tool).
        notes: what the report should say about the source.
        ties: a step's tie groups at save (empty for other sources).
        hf: the directory is Hugging Face safetensors, not DCP.
        metadata: DCP directory -> its metadata, as read while planning.
    """

    desc: str
    keys: dict[str, TensorInfo]
    dir_of: dict[str, str]
    deltas: dict[str, list[manifest.AdapterTerm]] = dataclasses.field(default_factory=dict)
    factors: dict[str, TensorInfo] = dataclasses.field(default_factory=dict)
    factor_dir: str | None = None
    memory: dict[str, torch.Tensor] | None = None  # a legacy file's tensors, already read
    restored_base: str | None = None
    raw_of: dict[str, str] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    ties: list[list[str]] = dataclasses.field(default_factory=list)
    hf: bool = False
    metadata: dict[str, Metadata] = dataclasses.field(default_factory=dict)

    def raw(self, key: str) -> str:
        return self.raw_of.get(key, key)


def _dir_source(store: Storage, model_dir: str, view: ModelView | None,
                prefix: str | None, *, hf: bool = False) -> Source:
    """A model DCP directory: this library's (canonical keys) or another tool's, or a
    Hugging Face safetensors directory (``hf``). With no target (``view`` None: an
    export) the keys are taken as they are."""
    seen: dict[str, Metadata] = {}
    infos, other = _checkpoint_entries(store, model_dir, hf=hf, seen=seen)
    if view is None:
        return Source(model_dir, infos, dict.fromkeys(infos, model_dir), hf=hf, metadata=seen)
    res = foreign.resolve(infos, other, set(view.tensors), prefix=prefix, desc=model_dir)
    keys = {name: infos[raw] for name, raw in res.raw_of.items()}
    source = Source(model_dir, keys, dict.fromkeys(keys, model_dir),
                    raw_of={k: r for k, r in res.raw_of.items() if k != r}, notes=res.notes,
                    hf=hf, metadata=seen)
    if hf:
        source.notes.insert(0, f"read Hugging Face safetensors {model_dir}")
    _foreign_factors(store, source, view)
    return source


def _foreign_factors(store: Storage, source: Source, view: ModelView) -> None:
    """PEFT LoRA factors in a plain DCP save of a PEFT model: left as keys where the
    target has the same adapter (read exactly), otherwise turned into deltas merged into
    the base weight on load, with the scale from PEFT's ``adapter_config.json``."""
    found = foreign.peft_factors(source.keys)
    to_merge = [f for f in found if not all(
        k in view.adapter_tensors and tuple(view.adapter_tensors[k].shape) == source.keys[k].shape
        for k in f.keys)]
    if not to_merge:
        return
    names = sorted({f.adapter for f in to_merge})
    config = foreign.read_peft_config(store, source.desc)
    if config is None or len(names) > 1:
        why = (f"adapters {names} (which one was active is not recorded)" if len(names) > 1 else
               f"no {foreign.ADAPTER_CONFIG} beside it to give their scale (lora_alpha / r)")
        raise CheckpointMismatchError(
            f"checkpoint {source.desc} holds PEFT LoRA factors for {len(to_merge)} modules "
            f"(e.g. {to_merge[0].a!r}) that the model has no identical adapter for, and "
            f"{why}; nothing was loaded -> load it into a PEFT model with the same LoraConfig, "
            f"or put the adapter's {foreign.ADAPTER_CONFIG} (as PEFT's save_pretrained "
            "writes it) into the checkpoint directory")
    config, where = config
    modules = {name: m for m, name in canonical_module_names(view.model).items()}
    for f in to_merge:
        weight = f"{f.site}.weight"
        if weight not in source.keys:
            raise CheckpointMismatchError(
                f"checkpoint {source.desc} holds PEFT LoRA factors of {f.site!r} but no base "
                f"weight {weight!r}: it is incomplete")
        a, b = source.keys.pop(f.a), source.keys.pop(f.b)
        source.factors.update({f.a: a, f.b: b})
        source.deltas.setdefault(weight, []).append(foreign.merge_terms(
            f, source.keys[weight].shape, a.shape, b.shape, config, where,
            base_module=_base_module(modules.get(f.site))))
    source.factor_dir = source.desc
    source.notes.append(f"merged {len(to_merge)} PEFT LoRA adapters ({names[0]!r}, scale from "
                        f"{where}) into their base weights while loading")


def _base_module(module: nn.Module | None) -> nn.Module | None:
    """The layer holding the weight: an adapted module's base layer, else itself."""
    kind = adapters.kind_of(module) if module is not None else None
    return getattr(module, kind.base_attr(module)) if kind is not None else module


def resolve_model_dir(store: Storage, path: str) -> str:
    """``path`` itself if it is a model DCP directory, else its ``model/`` child."""
    if store.exists(join(path, manifest.METADATA_FILE)):
        return path
    inner = join(path, manifest.MODEL_DIR)
    if store.exists(join(inner, manifest.METADATA_FILE)):
        return inner
    if not store.exists(path):
        raise NotACheckpointError(f"checkpoint path {path} does not exist")
    raise NotACheckpointError(
        f"{path} is not a model checkpoint: expected a DCP directory (with "
        f"{manifest.METADATA_FILE}) or a step directory with {manifest.MODEL_DIR}/"
        f"{manifest.METADATA_FILE}; pass the directory that save_model() or "
        "CheckpointManager.save() wrote")


def _model_dir(store: Storage, path: str) -> tuple[str, bool]:
    """``(directory, is Hugging Face safetensors)`` of a path that is not a step: a DCP
    model directory (or a step-like ``model/`` child) first, then an HF directory
    (``model.safetensors``, or shards with ``model.safetensors.index.json``)."""
    try:
        return resolve_model_dir(store, path), False
    except NotACheckpointError:
        if any(store.exists(join(path, f)) for f in (manifest.HF_INDEX, manifest.HF_SINGLE)):
            return path, True
        raise


def merged_source(store: Storage, path: str, *, verify: bool = False) -> Source:
    """The merged model that a model directory, a step or a legacy file holds, for
    readers with no target model (exports): a LoRA step without ``model/`` is composed
    from its base and adapters."""
    return _source(path, None, store, verify, None)


def _source(path: str, view: ModelView | None, store: Storage, verify: bool,
            m: Manifest | None, prefix: str | None = None) -> Source:
    """Pick what to read: a legacy file, a model directory (DCP or HF safetensors), or a
    step's pieces (``m``: the step's manifest when the caller has already read it)."""
    if legacy.is_legacy_file(path):
        ck = legacy.read_legacy(path)
        keys = _infos(ck.model)
        note = f"read legacy file {ck.path}" + (
            f"; merged seed-layout LoRA into {len(ck.merged)} weights" if ck.merged else "")
        _no_prefix(prefix, path, "a legacy torch.save file")
        return Source(ck.path, keys, dict.fromkeys(keys, ck.path), memory=ck.model, notes=[note])
    if m is None:
        if not store.exists(join(path, manifest.MANIFEST)):
            model_dir, hf = _model_dir(store, path)
            return _dir_source(store, model_dir, view, prefix, hf=hf)
        m = manifest.read_manifest(store, path)
    _no_prefix(prefix, path, "a dcp_universal step, whose keys are canonical")
    source = _step_source(path, view, store, verify, m)
    source.ties = [list(g) for g in m.ties]
    return source


def _step_source(path: str, view: ModelView | None, store: Storage, verify: bool,
                 m: Manifest) -> Source:
    """A committed step's pieces. A LoRA step (``adapters/`` plus a shared base) restores
    exactly into a model with the same adapters; any other target gets merged weights:
    ``model/`` when the step has it, otherwise base plus adapters composed on load."""

    def checked(*items: str) -> None:  # sizes always, checksums when asked
        check_files(store, path, m.files, checksums=verify,
                    prefixes=tuple(f"{i}/" for i in items))

    if m.adapters is None:
        checked(manifest.MODEL_DIR)
        return _dir_source(store, join(path, manifest.MODEL_DIR), view, None)
    base_path = manifest.base_path(path, m)
    adapters_path = join(path, manifest.ADAPTERS_DIR)
    seen: dict[str, Metadata] = {}
    base_keys = _checkpoint_info(store, base_path, seen)
    step_keys = _checkpoint_info(store, adapters_path, seen)
    sites = m.adapters.sites
    factor_keys = m.adapters.factor_keys()
    same_adapters = view is not None and (
        {s.name for s in view.sites} == set(sites)
        and set(view.adapter_tensors) == factor_keys
        and all(tuple(view.adapter_tensors[k].shape) == step_keys[k].shape for k in factor_keys))
    check_files(store, base_path, m.base_files or {}, checksums=verify)
    if same_adapters:
        checked(manifest.ADAPTERS_DIR)
        keys = {**base_keys, **step_keys}
        return Source(path, keys, {**dict.fromkeys(base_keys, base_path),
                                    **dict.fromkeys(step_keys, adapters_path)},
                       notes=[f"restored base ({m.base}) and adapters exactly"],
                       restored_base=m.base, metadata=seen)
    if m.has(manifest.MODEL_DIR):
        checked(manifest.MODEL_DIR)
        return _dir_source(store, join(path, manifest.MODEL_DIR), view, None)
    checked(manifest.ADAPTERS_DIR)
    plain = {k: v for k, v in step_keys.items() if k not in factor_keys}
    return Source(
        path, {**base_keys, **plain},
        {**dict.fromkeys(base_keys, base_path), **dict.fromkeys(plain, adapters_path)},
        deltas={f"{name}.weight": terms for name, terms in sites.items()},
        factors={k: step_keys[k] for k in factor_keys}, factor_dir=adapters_path,
        notes=[f"merged {len(sites)} adapters into base {m.base} while loading"], metadata=seen)


def _no_prefix(prefix: str | None, path: str, what: str) -> None:
    if prefix:
        raise ValueError(f"prefix={prefix!r}: {path} is {what}; prefix= picks the model's "
                         "subtree in a DCP checkpoint written by another tool")


def read_source(source: Source, into: dict[str, torch.Tensor], store: Storage, *,
                single_process: bool = False, later: Copies | None = None) -> None:
    """Read checkpoint keys into ``into`` (checkpoint key -> tensor, DTensor or plain;
    each rank fills the block it holds) and add the adapter deltas a composed source has.

    ``later``: the copies of the checkpoint keys in ``later.keys`` wait in ``later`` for
    its ``run()`` (the load's commit) instead of being made now; only for a source that
    is in memory or in local files (:func:`_prepared_in_full`), and not for keys with
    deltas.

    Collective under a process group (unless ``single_process``: this rank reads alone):
    one ``dcp.load`` per directory, in sorted order on every rank, then one for the
    factors when there are deltas.
    """
    later = later if later is not None else Copies()
    if source.memory is not None:
        _copy_from_memory(source.memory, into, later)
    else:
        by_dir: dict[str, dict[str, torch.Tensor]] = {}
        waits: dict[str, set[str]] = {}
        again = []  # a key read for two names (one stored tensor of a tied pair)
        for ck, t in into.items():
            wanted = by_dir.setdefault(source.dir_of[ck], {})
            if source.raw(ck) in wanted:
                again.append((t, wanted[source.raw(ck)]))
            else:
                wanted[source.raw(ck)] = t
                if ck in later.keys:
                    waits.setdefault(source.dir_of[ck], set()).add(source.raw(ck))
        for d in sorted(by_dir):  # same order on every rank: each dcp.load is collective
            dcp_io.load_state(store, by_dir[d], d, single_process=single_process,
                              hf=source.hf, copies=Copies(waits.get(d, ()), later.pending),
                              metadata=source.metadata.get(d))
        with torch.no_grad():
            for t, first in again:
                local_block(t)[0].copy_(local_block(first)[0])
    _apply_deltas(source, into, store, single_process)


def _prepared_in_full(source: Source) -> bool:
    """Whether every byte of ``source`` can be located and checked before any is copied:
    it is in memory, or in local files (memory-mapped, :mod:`dcp_universal.mapped`)."""
    return source.memory is not None or not any(map(is_remote, set(source.dir_of.values())))


@torch.no_grad()
def _copy_from_memory(memory, into, later: Copies) -> None:
    """Each rank copies the block of every full tensor that its shard holds."""
    for ck, t in into.items():
        block, offsets = local_block(t)
        later.take(ck, block,
                   memory[ck][tuple(slice(o, o + n) for o, n in zip(offsets, block.shape))])


@torch.no_grad()
def _apply_deltas(source: Source, into: dict[str, torch.Tensor], store: Storage,
                  single_process: bool) -> None:
    deltas = {k: terms for k, terms in source.deltas.items() if k in into}
    if not deltas:
        return
    needed = sorted({k for terms in deltas.values() for t in terms for k in (t.left, t.right)})
    full = {k: torch.empty(source.factors[k].shape, dtype=source.factors[k].dtype) for k in needed}
    dcp_io.load_state(store, {source.raw(k): t for k, t in full.items()}, source.factor_dir,
                      single_process=single_process, metadata=source.metadata.get(source.factor_dir))
    for key, terms in deltas.items():
        factors = [merge.Factors(
            left=full[t.left].T if t.left_t else full[t.left],
            right=full[t.right].T if t.right_t else full[t.right],
            scale=t.scale, left_is_local=False) for t in terms]
        block, offsets = local_block(into[key])
        block.copy_(merge.merge_block(block, offsets, factors))


def _share_tied(source: Source, view: ModelView) -> None:
    """A checkpoint that stores a tied pair once (transformers omits ``lm_head.weight``
    of a tied model) serves every name of the target's tie group."""
    for group in view.ties:
        present = [k for k in group if k in source.keys]
        if not present or len(present) == len(group):
            continue
        for k in group:
            if k not in source.keys:
                source.keys[k] = source.keys[present[0]]
                source.dir_of[k] = source.dir_of[present[0]]
                source.raw_of[k] = source.raw(present[0])
                if source.memory is not None:
                    source.memory[k] = source.memory[present[0]]
        source.notes.append(f"tied: the checkpoint stores {present[0]} once; it serves "
                            f"{', '.join(k for k in group if k != present[0])} too")


def _host_buffer(t: torch.Tensor) -> torch.Tensor:
    """A staging buffer for ``t`` in host memory, never the device's (a job training at
    70% of its GPU memory must still be able to resume): a DTensor gets a DTensor over a
    host copy of its local shard."""
    if isinstance(t, DTensor):
        local = t.to_local()
        return dtensor_like(host_empty(local.shape, local.dtype), t)
    return host_empty(t.shape, t.dtype)


def _check_materialized(view: ModelView) -> None:
    meta = [k for k, t in {**view.tensors, **view.adapter_tensors}.items()
            if local_block(t)[0].is_meta]
    if meta:
        raise CheckpointError(
            f"the model has {len(meta)} tensors on the meta device (e.g. {meta[:4]}): there is "
            "no memory to load into -> materialise it first, e.g. model.to_empty(device=...), "
            "then load; buffers that no checkpoint holds (non-persistent ones such as rotary "
            "inv_freq) must then be initialised by the model's own code")


@torch.no_grad()
def _check_ties(ties: list[tuple[str, ...]], buffers: dict[str, torch.Tensor], desc: str) -> None:
    """Raise unless the checkpoint's values for every tie group are equal (collective when
    ``ties`` is not empty: one ``all_gather_object``; ``ties`` are the same on every rank).

    They differ when an adapter was merged into one of the tied names: a tied target
    holds one tensor and cannot compute that model.
    """
    if not ties:
        return
    diffs = []
    for group in ties:
        first = local_block(buffers[group[0]])[0].float()
        d = max((float((local_block(buffers[k])[0].float() - first).abs().max())
                 if first.numel() else 0.0) for k in group[1:])
        diffs.append(d)
    everywhere = [max(ds) for ds in zip(*_comm.all_gather_object(diffs))]
    bad = [(g, d) for g, d in zip(ties, everywhere) if d != 0.0]
    if bad:
        pairs = "; ".join(f"{' and '.join(repr(k) for k in g)} differ by up to {d:.4g}"
                          for g, d in bad)
        raise CheckpointMismatchError(
            f"checkpoint {desc} does not match the model (nothing was loaded): the model ties "
            f"{' and '.join(repr(k) for k in bad[0][0])} into one tensor, but the checkpoint "
            f"holds different values for them ({pairs}), as when an adapter was merged into "
            "one of them -> untie them in the target (e.g. transformers' "
            "tie_word_embeddings=False) and load again")


def load_model(model: nn.Module, path: str, *, strict: bool = True,
               prefix: str | None = None, storage_options: dict | None = None,
               verify: bool = False, stage: bool = True) -> LoadReport:
    """Load a model directory, or a committed step directory, into ``model``.

    Works for any configuration: plain / DDP / FSDP2 on any world size, with or without
    adapters of any rank, and in a single process with no process group. Every key is
    planned first; with ``strict=True`` a mismatch raises
    :class:`~dcp_universal.CheckpointMismatchError` before the model is written. Only
    model data is read, never ``optimizer/``.

    Collective under a process group (every rank, same ``path``).

    Adapter parameters with no counterpart in the checkpoint are reset so the update is
    zero: the loaded model computes the checkpoint's function.

    ``path`` may also be a legacy ``torch.save`` file (see :mod:`dcp_universal.legacy`)
    or a URL (``s3://...``, with ``storage_options``; ``file://`` works too). For a step
    directory the sizes of the files read are checked against the manifest, and with
    ``verify=True`` their CRC-32 too.

    With ``stage=True`` (default) nothing lands in the model before every read
    succeeded, so a failure halfway (on any rank) leaves the model untouched. Local files
    need no staging memory for that: they are memory-mapped, every tensor is located and
    checked first, and the copies (one per tensor, from the page cache) wait for the
    commit (:mod:`dcp_universal.mapped`). Remote files are read into staging buffers in
    host memory (never the device's). ``stage=False`` reads remote files in place (no
    extra memory, no such guarantee).

    A DCP checkpoint written by another tool loads too (see :mod:`dcp_universal.foreign`):
    its keys are made canonical, the model's subtree of a nested layout is found (or
    given as ``prefix``, e.g. ``"app.model."``), other state saved beside the model
    (optimizer, LR scheduler, data loader, ...) is listed in the report's notes and not
    read, and a PEFT model's LoRA factors are merged unless the target has the same
    adapters.

    Tied weights: a target that ties two names (``lm_head.weight`` and the token
    embedding) takes them only when the checkpoint's values are equal, and keeps the tie;
    otherwise :class:`~dcp_universal.CheckpointMismatchError`, model untouched.
    """
    staged = stage_model(ModelView.of(model), normalize(path), strict=strict, verify=verify,
                         stage=stage, store=Storage(storage_options), prefix=prefix)
    staged.commit()
    return staged.report


@dataclasses.dataclass
class StagedLoad:
    """A model load that has been planned and read, not yet installed.

    Attributes:
        report: what the load does, key by key.
        commit: writes the staged data into the model (nothing before it does, when
            staged).
        restored_base: the LoRA base restored exactly (same adapters), if any.
    """

    report: LoadReport
    commit: Callable[[], None]
    restored_base: str | None


def stage_model(view: ModelView, path: str, *, strict: bool, verify: bool, stage: bool,
                store: Storage, step_manifest: Manifest | None = None,
                prefix: str | None = None) -> StagedLoad:
    """Plan and read a model load (collective: one ``dcp.load`` per directory read, in
    sorted order on every rank). ``step_manifest``: ``path`` is a committed step whose
    manifest the caller has read (so it is not read twice)."""
    start = time.perf_counter()
    _check_materialized(view)
    if step_manifest is None and peft_io.is_adapter_dir(store, path):
        _no_prefix(prefix, path, "a PEFT adapter directory")
        report, commit = peft_io.stage_adapter(view, path, store, strict=strict)
        return StagedLoad(report, commit, None)
    source = _source(path, view, store, verify, step_manifest, prefix)
    _share_tied(source, view)
    plan = plan_load(source.keys, _infos(view.tensors), adapters=_infos(view.adapter_tensors),
                     structural_names=view.structural, strict=strict, source=source.desc)
    targets = {**view.tensors, **view.adapter_tensors}
    read = set(plan.reads.values())
    ties = [tuple(k for k in g if k in read) for g in view.ties]
    ties = [g for g in ties if len(g) > 1]
    # Staging keeps the model untouched until every read succeeded. A source prepared in
    # full needs none: its copies wait (views of memory maps) for the commit. Tied keys
    # are always staged (compared before one of them is installed), and so are keys that
    # get an adapter delta, when staging.
    held = {k for g in ties for k in g}
    if stage:
        held |= {tk for ck, tk in plan.reads.items() if ck in source.deltas}
    waits = stage and _prepared_in_full(source)
    staged = read if stage and not waits else held
    buffers = {tk: _host_buffer(targets[tk]) if tk in staged else targets[tk] for tk in read}
    later = Copies({ck for ck, tk in plan.reads.items() if tk not in staged} if waits else ())
    read_source(source, {ck: buffers[tk] for ck, tk in plan.reads.items()}, store, later=later)
    _check_ties(ties, buffers, source.desc)
    plan.report.notes.extend(source.notes)
    if view.non_persistent:
        plan.report.notes.append(
            f"non-persistent buffers, in no checkpoint, kept as the model set them: "
            f"{', '.join(view.non_persistent[:6])}"
            + (f", ... (+{len(view.non_persistent) - 6})" if len(view.non_persistent) > 6 else ""))
    plan.report.notes.extend(f"tied: {' = '.join(g)} (equal in the checkpoint; loaded once, "
                             "tie kept)" for g in ties)
    installed = staged - {k for g in ties for k in g[1:]}  # one copy per shared tensor

    @torch.no_grad()
    def commit() -> None:
        later.run()
        for tk in sorted(installed):
            local_block(targets[tk])[0].copy_(local_block(buffers[tk])[0])
        fresh = set(plan.report.fresh)
        for site in view.sites:
            if any(f"{site.name}.{n}" in fresh for n in site.adapter_params()):
                site.kind.reset(site.module)
        if _comm.rank() == 0:
            logger.info("loaded %s in %.2f s\n%s", source.desc, time.perf_counter() - start,
                        plan.report.summary())

    return StagedLoad(plan.report, commit, source.restored_base)
