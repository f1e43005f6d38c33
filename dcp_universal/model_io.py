"""save_model / load_model: the universal model format over DCP.

A model directory is a plain DCP checkpoint whose keys are canonical names and whose
adapted weights hold ``W + scale * B @ A``. With ``merge="sharded"`` the merge happens in
:class:`_MergingSavePlanner.resolve_data`, one write item at a time, on the rank that
writes that item; only the small adapter factors are gathered beforehand.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.planner import WriteItem
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from dcp_universal import _comm, adapters, legacy, storage
from dcp_universal.errors import CheckpointError
from dcp_universal.names import canonical_module_names, canonical_names, canonical_parameters
from dcp_universal.plan import LoadReport, TensorInfo, plan_load

__all__ = ["save_model", "load_model", "ModelView", "MERGE_MODES", "fingerprint", "save_tensors", "reshard"]

logger = logging.getLogger(__name__)

MERGE_MODES = ("sharded", "rank0")


@dataclasses.dataclass
class ModelView:
    """A model seen through canonical names.

    Attributes:
        tensors: canonical key -> tensor (DTensor under FSDP2) for everything that is
            not an adapter's own parameter; adapted base weights appear under their
            plain name (``x.weight``).
        adapter_tensors: canonical key -> tensor for adapter parameters (``x.lora_A``).
        sites: adapted modules, sorted by name.
        structural: canonical key -> name with the adapter infix (``x.base_layer.weight``).
    """

    tensors: dict[str, torch.Tensor]
    adapter_tensors: dict[str, torch.Tensor]
    sites: list[adapters.Site]
    structural: dict[str, str]
    frozen: set[str]
    param_keys: dict[int, str]  # id(parameter) -> canonical key

    @classmethod
    def of(cls, model: nn.Module) -> "ModelView":
        reshard(model)
        sd = model.state_dict()
        names = canonical_names(model, sd.keys())
        sites = adapters.find_sites(model, canonical_module_names(model))
        adapter_keys, structural = set(), {}
        for site in sites:
            adapter_keys.update(f"{site.name}.{n}" for n in site.adapter_params())
            for pname, _ in site.base.named_parameters():
                structural[f"{site.name}.{pname}"] = f"{site.name}.{site.kind.base_attr}.{pname}"
        tensors, adapter_tensors = {}, {}
        for key, value in sd.items():
            name = names[key]
            (adapter_tensors if name in adapter_keys else tensors)[name] = value
        params = canonical_parameters(model)
        param_keys = {id(p): n for n, p in params.items()}
        frozen = {n for n, p in params.items() if not p.requires_grad and n not in adapter_keys}
        return cls(tensors, adapter_tensors, sites, structural, frozen, param_keys)

    def adapter_manifest(self) -> dict:
        """The manifest's description of the adapters: enough to merge them from disk."""
        def term(t: adapters.Term) -> dict:
            return {"left": self.param_keys[id(t.left)], "right": self.param_keys[id(t.right)],
                    "scale": t.scale, "left_t": t.left_transposed, "right_t": t.right_transposed}

        return {**adapters.adapter_config(self.sites),
                "sites": {s.name: [term(t) for t in s.terms()] for s in self.sites}}


def reshard(model: nn.Module) -> None:
    """Put FSDP2 modules back in their sharded state.

    After a forward (e.g. an eval) FSDP2's root keeps its parameters unsharded, and
    ``named_parameters()`` then yields other objects than the ones the optimizer holds.
    """
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


class _MergingSavePlanner(DefaultSavePlanner):
    """Writes ``W + updates`` for adapted weights, computed per write item.

    ``state_dict`` holds the base weights themselves (same shape, dtype and placement as
    the merged result), so DCP plans, dedups and load-balances exactly as for a plain
    model; only the bytes of the adapted items differ.
    """

    def __init__(self, factors: dict[str, list[adapters.Factors]]) -> None:
        super().__init__()
        self._factors = factors

    def resolve_data(self, write_item: WriteItem):
        factors = self._factors.get(write_item.index.fqn)
        if factors is None:
            return super().resolve_data(write_item)
        block = self.lookup_object(write_item.index)
        return adapters.merge_block(block, write_item.tensor_data.chunk.offsets, factors)


def save_model(model: nn.Module, path: str, *, merge: str = "sharded",
               storage_options: dict | None = None) -> None:
    """Write ``model`` as one universal model DCP directory at ``path``.

    Collective: call on every rank of the process group (or in a single process with no
    group). Keys are canonical; every LoRA update is merged into its base weight.

    Args:
        model: plain, DDP, FSDP2, compiled, activation-checkpointed or PEFT model.
        path: the directory to write.
        merge: ``"sharded"`` merges on each rank's own shards (default);
            ``"rank0"`` gathers the full state to rank 0's CPU, merges and writes there.
        storage_options: fsspec options when ``path`` is a URL (``s3://...``).
    """
    _save_model(model, path, merge, storage.Storage(storage_options, checksums=False))


def _save_model(model: nn.Module, path: str, merge: str, store: storage.Storage) -> dict:
    """save_model; returns ``{file: (size, crc32)}`` of the files this rank wrote."""
    if merge not in MERGE_MODES:
        raise ValueError(f"merge={merge!r}: expected one of {MERGE_MODES}")
    start = time.perf_counter()
    view = ModelView.of(model)
    save = _save_sharded if merge == "sharded" else _save_rank0
    files = save(view, path, store)
    if _comm.rank() == 0:
        logger.info("saved model (%d tensors, %d adapters merged %s) to %s in %.2f s",
                    len(view.tensors), len(view.sites), merge, path, time.perf_counter() - start)
    return files


def _save_sharded(view: ModelView, path: str, store: storage.Storage) -> dict:
    gathered = adapters.gather_factors(view.sites, [view.tensors[s.weight_key] for s in view.sites])
    factors = {s.weight_key: f for s, f in zip(view.sites, gathered)}
    return store.save_state(view.tensors, path, planner=_MergingSavePlanner(factors),
                            own_file_keys=set(factors))


@torch.no_grad()
def _save_rank0(view: ModelView, path: str, store: storage.Storage) -> dict:
    rank = _comm.rank()
    full = {}
    for key, t in view.tensors.items():
        f = t.full_tensor() if isinstance(t, DTensor) else t
        if rank == 0:
            full[key] = f.detach().cpu()
    merged = {}
    gathered = adapters.gather_factors(view.sites, [torch.empty(0)] * len(view.sites))
    for site, factors in zip(view.sites, gathered):
        if rank == 0:
            w = full[site.weight_key]
            merged[site.weight_key] = adapters.merge_block(w, (0, 0), factors)
    error, files = None, {}
    if rank == 0:
        full.update(merged)
        try:
            files = store.save_state(full, path, single_process=True)
        except Exception as e:  # re-raised on every rank below, so no rank hangs
            error = e
    told = _comm.agree(repr(error) if error is not None else None)
    if error is not None:
        raise error
    if told is not None:
        raise CheckpointError(f"rank 0 failed to write {path}: {told}")
    return files


def fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """A content hash of ``tensors`` (collective under a process group).

    Each rank hashes the bytes it holds; sharded tensors fold in their placement, so the
    same weights sharded another way hash differently (a resharded resume writes its base
    once more) while replicated and single-process weights hash alike.
    """
    h = hashlib.sha256()
    sharded = False
    for key in sorted(tensors):
        t = tensors[key]
        if isinstance(t, DTensor):
            sharded = True
            h.update(repr((t.placements, t.device_mesh.shape)).encode())
            t = t.to_local()
        h.update(f"{key}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy())
    digests = [h.hexdigest()]
    if _comm.is_distributed() and sharded:
        digests = [None] * dist.get_world_size()
        dist.all_gather_object(digests, h.hexdigest())
    return hashlib.sha256("".join(digests).encode()).hexdigest()[:16]


def save_tensors(tensors: dict[str, torch.Tensor], path: str, store: storage.Storage) -> dict:
    """Plain DCP save of canonical tensors (collective); this rank's ``{file: (size, crc32)}``."""
    return store.save_state(tensors, path)


def _checkpoint_info(dcp_dir: str, store: storage.Storage) -> dict[str, TensorInfo]:
    meta = store.read_metadata(dcp_dir)
    return {k: TensorInfo(tuple(m.size), m.properties.dtype)
            for k, m in meta.state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)}


def _infos(tensors: dict[str, torch.Tensor]) -> dict[str, TensorInfo]:
    return {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in tensors.items()}


@dataclasses.dataclass
class _Source:
    """A checkpoint's model, as the loader sees it.

    Attributes:
        desc: the path, for messages.
        keys: canonical key -> info of every tensor the checkpoint offers.
        dir_of: canonical key -> the DCP directory holding it.
        deltas: weight key -> adapter terms to add after reading it (a LoRA step with
            no merged ``model/``: base plus adapters, composed on load).
        factors: canonical key -> info of the adapter factors ``deltas`` use.
        factor_dir: where those factors live.
    """

    desc: str
    keys: dict[str, TensorInfo]
    dir_of: dict[str, str]
    deltas: dict[str, list[dict]] = dataclasses.field(default_factory=dict)
    factors: dict[str, TensorInfo] = dataclasses.field(default_factory=dict)
    factor_dir: str | None = None
    note: str | None = None
    memory: dict[str, torch.Tensor] | None = None  # a legacy file's tensors, already read


def _dir_source(model_dir: str, store: storage.Storage) -> _Source:
    keys = _checkpoint_info(model_dir, store)
    return _Source(model_dir, keys, dict.fromkeys(keys, model_dir))


def _source(path: str, view: ModelView, store: storage.Storage, verify: bool) -> _Source:
    """Pick what to read: a model directory, or a step's pieces.

    A LoRA step (``adapters/`` plus a shared base) restores exactly into a model with the
    same adapters; any other target gets merged weights: ``model/`` when the step has it,
    otherwise base plus adapters composed on load.
    """
    if legacy.is_legacy_file(path):
        ck = legacy.read_legacy(path)
        keys = _infos(ck.model)
        note = f"read legacy file {ck.path}" + (
            f"; merged seed-layout LoRA into {len(ck.merged)} weights" if ck.merged else "")
        return _Source(ck.path, keys, dict.fromkeys(keys, ck.path), memory=ck.model, note=note)
    if not store.exists(storage.join(path, storage.MANIFEST)):
        return _dir_source(store.resolve_model_dir(path), store)
    manifest = store.read_manifest(path)

    def checked(*items: str) -> None:  # sizes always, checksums when asked
        store.check_files(path, manifest.get("files", {}), checksums=verify,
                          prefixes=tuple(f"{i}/" for i in items))

    lora = manifest.get("adapters")
    if not lora:
        checked(storage.MODEL_DIR)
        return _dir_source(storage.join(path, storage.MODEL_DIR), store)
    root = path.rstrip("/").rsplit("/", 1)[0]
    base_path = storage.join(root, manifest["base"])
    adapters_path = storage.join(path, storage.ADAPTERS_DIR)
    base_keys, step_keys = _checkpoint_info(base_path, store), _checkpoint_info(adapters_path, store)
    sites = lora["sites"]
    factor_keys = {t[k] for terms in sites.values() for t in terms for k in ("left", "right")}
    same_adapters = (
        {s.name for s in view.sites} == set(sites)
        and set(view.adapter_tensors) == factor_keys
        and all(tuple(view.adapter_tensors[k].shape) == step_keys[k].shape for k in factor_keys))
    store.check_files(base_path, manifest.get("base_files", {}), checksums=verify)
    if same_adapters:
        checked(storage.ADAPTERS_DIR)
        keys = {**base_keys, **step_keys}
        return _Source(path, keys, {**dict.fromkeys(base_keys, base_path),
                                    **dict.fromkeys(step_keys, adapters_path)},
                       note=f"restored base ({manifest['base']}) and adapters exactly")
    if manifest["items"].get("model"):
        checked(storage.MODEL_DIR)
        return _dir_source(storage.join(path, storage.MODEL_DIR), store)
    checked(storage.ADAPTERS_DIR)
    plain = {k: v for k, v in step_keys.items() if k not in factor_keys}
    return _Source(
        path, {**base_keys, **plain},
        {**dict.fromkeys(base_keys, base_path), **dict.fromkeys(plain, adapters_path)},
        deltas={f"{name}.weight": terms for name, terms in sites.items()},
        factors={k: step_keys[k] for k in factor_keys}, factor_dir=adapters_path,
        note=f"merged {len(sites)} adapters into base {manifest['base']} while loading")


def _local_block(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    if isinstance(t, DTensor):
        _, offsets = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        return t.to_local(), tuple(offsets)
    return t, (0,) * t.dim()


@torch.no_grad()
def _copy_from_memory(memory, targets, reads) -> None:
    """Each rank copies the block of every full tensor that its shard holds."""
    for ck, tk in reads.items():
        block, offsets = _local_block(targets[tk])
        block.copy_(memory[ck][tuple(slice(o, o + n) for o, n in zip(offsets, block.shape))])


@torch.no_grad()
def _apply_deltas(source: _Source, targets: dict[str, torch.Tensor], reads: dict[str, str],
                  store: storage.Storage) -> None:
    deltas = {k: terms for k, terms in source.deltas.items() if k in reads}
    if not deltas:
        return
    needed = sorted({t[k] for terms in deltas.values() for t in terms for k in ("left", "right")})
    full = {k: torch.empty(source.factors[k].shape, dtype=source.factors[k].dtype) for k in needed}
    store.load_state(full, source.factor_dir)
    for key, terms in deltas.items():
        factors = [adapters.Factors(
            left=full[t["left"]].T if t["left_t"] else full[t["left"]],
            right=full[t["right"]].T if t["right_t"] else full[t["right"]],
            scale=t["scale"], left_is_local=False) for t in terms]
        block, offsets = _local_block(targets[reads[key]])
        block.copy_(adapters.merge_block(block, offsets, factors))


def load_model(model: nn.Module, path: str, *, strict: bool = True,
               storage_options: dict | None = None, verify: bool = False,
               stage: bool = True) -> LoadReport:
    """Load a model directory, or a committed step directory, into ``model``.

    Works for any configuration: plain / DDP / FSDP2 on any world size, with or without
    adapters of any rank, and in a single process with no process group. Every key is
    planned first; with ``strict=True`` a mismatch raises
    :class:`~dcp_universal.CheckpointMismatchError` before the model is written. Only
    model data is read, never ``optimizer/``.

    Adapter parameters with no counterpart in the checkpoint are reset so the update is
    zero: the loaded model computes the checkpoint's function.

    ``path`` may also be a legacy ``torch.save`` file (see :mod:`dcp_universal.legacy`)
    or a URL (``s3://...``, with ``storage_options``). For a step directory the sizes of
    the files read are checked against the manifest, and with ``verify=True`` their
    CRC-32 too.

    With ``stage=True`` (default) data is read into staging buffers and copied into the
    model only once every read succeeded, so an I/O failure halfway leaves the model
    untouched; ``stage=False`` reads in place and needs no extra memory.
    """
    report, commit = stage_model(model, path, strict=strict, verify=verify, stage=stage,
                                 store=storage.Storage(storage_options))
    commit()
    return report


def stage_model(model: nn.Module, path: str, *, strict: bool, verify: bool, stage: bool,
                store: storage.Storage):
    """Plan and read a model load; returns ``(report, commit)``. ``commit()`` writes the
    staged data into the model (nothing before it does, when ``stage``)."""
    start = time.perf_counter()
    view = ModelView.of(model)
    source = _source(path, view, store, verify)
    plan = plan_load(source.keys, _infos(view.tensors), adapters=_infos(view.adapter_tensors),
                     structural_names=view.structural, strict=strict, source=source.desc)
    targets = {**view.tensors, **view.adapter_tensors}
    buffers = {tk: torch.empty_like(targets[tk]) for tk in plan.reads.values()} if stage else targets
    if source.memory is not None:
        _copy_from_memory(source.memory, buffers, plan.reads)
    by_dir: dict[str, dict[str, torch.Tensor]] = {}
    for ck, tk in plan.reads.items():
        if source.memory is None:
            by_dir.setdefault(source.dir_of[ck], {})[ck] = buffers[tk]
    for d in sorted(by_dir):  # same order on every rank: each dcp.load is collective
        store.load_state(by_dir[d], d)
    _apply_deltas(source, buffers, plan.reads, store)
    if source.note:
        plan.report.notes.append(source.note)

    @torch.no_grad()
    def commit() -> None:
        if stage:
            for tk in plan.reads.values():
                _local_block(targets[tk])[0].copy_(_local_block(buffers[tk])[0])
        fresh = set(plan.report.fresh)
        for site in view.sites:
            if any(f"{site.name}.{n}" in fresh for n in site.adapter_params()):
                site.kind.reset(site.module)
        if _comm.rank() == 0:
            logger.info("loaded %s in %.2f s\n%s", source.desc, time.perf_counter() - start,
                        plan.report.summary())

    return plan.report, commit
