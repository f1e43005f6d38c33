"""save_model: the universal model format over DCP.

A model directory is a plain DCP checkpoint whose keys are canonical names and whose
adapted weights hold the merged update (``W + scale * B @ A``; DoRA's rescaled), with a small JSON file beside
(:data:`~dcp_universal.format.manifest.MODEL_INFO`: the model's tie groups). With
``merge="sharded"`` the merge happens in :class:`_MergingSavePlanner.resolve_data`, one
write item at a time, on the rank that writes that item; only the small adapter factors
are gathered beforehand.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.planner import WriteItem
from torch.distributed.tensor import DTensor

from dcp_universal import _comm
from dcp_universal.storage import dcp_io
from dcp_universal.adapters import merge
from dcp_universal.format import manifest
from dcp_universal.format.manifest import FileRecord
from dcp_universal.storage import Storage, join, normalize, storage_for
from dcp_universal.model.view import ModelView

__all__ = ["save_model", "write_model", "model_writer", "MERGE_MODES", "check_merge"]

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

    def __init__(self, factors: dict[str, merge.Merge]) -> None:
        super().__init__()
        self._factors = factors

    def resolve_data(self, write_item: WriteItem):
        factors = self._factors.get(write_item.index.fqn)
        if factors is None:
            return super().resolve_data(write_item)
        block = self.lookup_object(write_item.index)
        assert write_item.tensor_data is not None  # factors are of tensor items
        return merge.merge_block(block, write_item.tensor_data.chunk.offsets, factors)


def save_model(model: nn.Module, path: str, *, merge: str = "sharded",
               storage_options: dict | None = None,
               timeout: float = _comm.DEFAULT_TIMEOUT_S) -> None:
    """Write ``model`` as one universal model DCP directory at ``path``.

    Collective: call on every rank of the process group (or in a single process with no
    group). Keys are canonical; every LoRA update is merged into its base weight.

    Args:
        model: plain, DDP, FSDP2, compiled, activation-checkpointed or PEFT model.
        path: the directory to write (local, ``file://`` or an fsspec URL).
        merge: ``"sharded"`` merges on each rank's own shards (default);
            ``"rank0"`` gathers the full state to rank 0's CPU, merges and writes there.
        storage_options: fsspec options when ``path`` is a URL (``s3://...``).
        timeout: the longest any rank waits for the others (seconds); then every
            waiting rank raises :class:`~dcp_universal.CheckpointTimeoutError`.
    """
    check_merge(merge)
    timeout = _comm.check_timeout(timeout)
    path = normalize(path)
    with _comm.operation(f"save_model to {path}", timeout):
        view, store = ModelView.of(model), storage_for(path, storage_options)
        # what DCP's metadata cannot hold (tie groups), written before DCP's .metadata
        _comm.on_rank0(_write_info, store, path, view)
        written = write_model(view, path, merge, store)
        # then every rank's file records (sizes, checksums): loads check what they read
        _comm.on_rank0(_write_info, store, path, view, dcp_io.gather_records(written))


def _write_info(store: Storage, path: str, view: ModelView,
                files: dict[str, FileRecord] | None = None) -> None:
    store.makedirs(path)
    store.write_atomic(join(path, manifest.MODEL_INFO),
                       manifest.model_info_to_json(view.ties, files))


def write_model(view: ModelView, path: str, merge: str, store: Storage, *,
                checksums: bool = True) -> dict[str, FileRecord]:
    """save_model of an already built view; returns the records of this rank's files.
    Collective: :func:`model_writer`, then its write (default group)."""
    return model_writer(view, merge, store, checksums=checksums)(path, None)


def model_writer(view: ModelView, mode: str, store: Storage, *, checksums: bool = True,
                 snapshot: Callable[[Any, str], Any] | None = None
                 ) -> Callable[[str, object], dict[str, FileRecord]]:
    """A model save in two parts: what reads the model happens now, and the write is
    returned (``write(path, group)`` -> the records of this rank's files).

    ``snapshot`` (an asynchronous save's :meth:`~dcp_universal.training.snapshot.Snapshotter.copy`)
    copies what the write will read, so the model may change before it runs.

    Collective, every rank, now (default group): ``mode="sharded"``: one factor gather;
    ``"rank0"``: one ``full_tensor()`` per tensor, one factor gather. At ``write``, on
    its ``group``: ``"sharded"``: one ``dcp.save``; ``"rank0"``: rank 0 writes alone and
    tells every rank how it went (``_comm.on_rank0``).
    """
    keep = snapshot if snapshot is not None else (lambda obj, slot: obj)
    if mode == "sharded":
        gathered = merge.prepare(view.sites, [view.tensors[s.weight_key] for s in view.sites])
        factors = keep({s.weight_key: f for s, f in zip(view.sites, gathered)}, "model.factors")
        tensors = keep(view.tensors, "model")

        def write(path: str, group) -> dict[str, FileRecord]:
            return dcp_io.save_state(store, tensors, path, planner=_MergingSavePlanner(factors),
                                     own_file_keys=set(factors), checksums=checksums,
                                     group=group)
    else:
        full = keep(_full_merged(view), "model")

        def write(path: str, group) -> dict[str, FileRecord]:
            files = _comm.on_rank0(dcp_io.save_state, store, full, path, checksums=checksums,
                                   single_process=True, group=group)
            return files if _comm.rank() == 0 else {}

    def timed(path: str, group) -> dict[str, FileRecord]:
        start = time.perf_counter()
        files = write(path, group)
        if _comm.rank() == 0:
            logger.info("saved model (%d tensors, %d adapters merged %s) to %s in %.2f s",
                        len(view.tensors), len(view.sites), mode, path,
                        time.perf_counter() - start)
        return files

    return timed


@torch.no_grad()
def _full_merged(view: ModelView) -> dict[str, torch.Tensor]:
    """Rank 0: every tensor whole, adapters merged; other ranks: ``{}`` (collective)."""
    _comm.on_caller_thread("gathering the model to rank 0")
    rank = _comm.rank()
    full = {}
    for key, t in view.tensors.items():
        f = t.full_tensor() if isinstance(t, DTensor) else t
        if rank == 0:
            full[key] = f.detach().cpu()
    gathered = merge.gather_factors(view.sites, [torch.empty(0)] * len(view.sites))
    if rank == 0:
        bases = [full[site.weight_key] for site in view.sites]
        merge.add_norms(gathered, bases, collective=False)
        for site, m, base in zip(view.sites, gathered, bases):
            full[site.weight_key] = merge.merge_block(base, (0,) * base.dim(), m)
    return full
