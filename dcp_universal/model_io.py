"""save_model / load_model: the universal model format over DCP.

A model directory is a plain DCP checkpoint whose keys are canonical names and whose
adapted weights hold ``W + scale * B @ A``. With ``merge="sharded"`` the merge happens in
:class:`_MergingSavePlanner.resolve_data`, one write item at a time, on the rank that
writes that item; only the small adapter factors are gathered beforehand.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.planner import WriteItem
from torch.distributed.tensor import DTensor

from dcp_universal import adapters, storage
from dcp_universal.errors import CheckpointError
from dcp_universal.names import canonical_module_names, canonical_names
from dcp_universal.plan import LoadReport, TensorInfo, plan_load

__all__ = ["save_model", "load_model", "ModelView", "MERGE_MODES"]

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

    @classmethod
    def of(cls, model: nn.Module) -> "ModelView":
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
        return cls(tensors, adapter_tensors, sites, structural)


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _is_distributed() else 0


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


class _Writer(FileSystemWriter):
    """FileSystemWriter that gives every merged item its own file.

    DCP keeps every tensor of a file alive until the file is closed; plain tensors are
    views of the model's parameters and cost nothing, but merged tensors are new, so one
    file per merged item bounds the extra memory to about one local shard.
    """

    def __init__(self, path: str, merged_keys: set[str], **kwargs) -> None:
        super().__init__(path, **kwargs)
        self._merged_keys = merged_keys

    def write_data(self, plan, planner):
        merged = [i for i in plan.items if i.index.fqn in self._merged_keys]
        rest = [i for i in plan.items if i.index.fqn not in self._merged_keys]
        buckets = [[i] for i in merged]
        if rest:
            buckets.insert(0, rest)
        files: queue.Queue = queue.Queue()
        for n, bucket in enumerate(buckets):
            name = f"{plan.storage_data.prefix}{n}{DEFAULT_SUFFIX}"
            files.put((self.fs.concat_path(self.path, name), name, bucket))
        return self._write_data(planner, files)


def save_model(model: nn.Module, path: str, *, merge: str = "sharded") -> None:
    """Write ``model`` as one universal model DCP directory at ``path``.

    Collective: call on every rank of the process group (or in a single process with no
    group). Keys are canonical; every LoRA update is merged into its base weight.

    Args:
        model: plain, DDP, FSDP2, compiled, activation-checkpointed or PEFT model.
        path: the directory to write.
        merge: ``"sharded"`` merges on each rank's own shards (default);
            ``"rank0"`` gathers the full state to rank 0's CPU, merges and writes there.
    """
    if merge not in MERGE_MODES:
        raise ValueError(f"merge={merge!r}: expected one of {MERGE_MODES}")
    start = time.perf_counter()
    view = ModelView.of(model)
    if merge == "sharded":
        _save_sharded(view, path)
    else:
        _save_rank0(view, path)
    if _rank() == 0:
        logger.info("saved model (%d tensors, %d adapters merged %s) to %s in %.2f s",
                    len(view.tensors), len(view.sites), merge, path, time.perf_counter() - start)


def _save_sharded(view: ModelView, path: str) -> None:
    factors = {s.weight_key: adapters.gather_factors(s, view.tensors[s.weight_key])
               for s in view.sites}
    dcp.save(view.tensors, storage_writer=_Writer(path, set(factors)),
             planner=_MergingSavePlanner(factors), no_dist=not _is_distributed())


@torch.no_grad()
def _save_rank0(view: ModelView, path: str) -> None:
    rank = _rank()
    full = {}
    for key, t in view.tensors.items():
        f = t.full_tensor() if isinstance(t, DTensor) else t
        if rank == 0:
            full[key] = f.detach().cpu()
    merged = {}
    for site in view.sites:
        factors = adapters.gather_factors(site, torch.empty(0))
        if rank == 0:
            w = full[site.weight_key]
            merged[site.weight_key] = adapters.merge_block(w, (0, 0), factors)
    error = None
    if rank == 0:
        full.update(merged)
        try:
            dcp.save(full, storage_writer=FileSystemWriter(path), no_dist=True)
        except Exception as e:  # re-raised on every rank below, so no rank hangs
            error = e
    if _is_distributed():
        box = [repr(error) if error is not None else None]
        dist.broadcast_object_list(box, src=0)
        if error is None and box[0] is not None:
            raise CheckpointError(f"rank 0 failed to write {path}: {box[0]}")
    if error is not None:
        raise error


def _checkpoint_info(model_dir: str) -> dict[str, TensorInfo]:
    meta = FileSystemReader(model_dir).read_metadata()
    return {k: TensorInfo(tuple(m.size), m.properties.dtype)
            for k, m in meta.state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)}


def load_model(model: nn.Module, path: str, *, strict: bool = True) -> LoadReport:
    """Load a universal model directory (or a step directory's ``model/``) into ``model``.

    Works for any configuration: plain / DDP / FSDP2 on any world size, with or without
    adapters of any rank, and in a single process with no process group. Every key is
    planned first; with ``strict=True`` a mismatch raises
    :class:`~dcp_universal.CheckpointMismatchError` before the model is written.

    Adapter parameters with no counterpart in the checkpoint are reset so the update is
    zero: the loaded model computes the checkpoint's function.
    """
    start = time.perf_counter()
    model_dir = storage.resolve_model_dir(path)
    view = ModelView.of(model)
    info = lambda d: {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in d.items()}
    plan = plan_load(_checkpoint_info(model_dir), info(view.tensors),
                     adapters=info(view.adapter_tensors), structural_names=view.structural,
                     strict=strict, source=model_dir)
    targets = {**view.tensors, **view.adapter_tensors}
    to_read = {ck: targets[tk] for ck, tk in plan.reads.items()}
    if to_read:
        dcp.load(to_read, storage_reader=FileSystemReader(model_dir),
                 no_dist=not _is_distributed())
    fresh = set(plan.report.fresh)
    for site in view.sites:
        if any(f"{site.name}.{n}" in fresh for n in site.adapter_params()):
            site.kind.reset(site.module)
    if _rank() == 0:
        logger.info("loaded %s in %.2f s\n%s", model_dir, time.perf_counter() - start,
                    plan.report.summary())
    return plan.report
