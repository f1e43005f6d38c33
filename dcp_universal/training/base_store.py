"""The frozen-base store of LoRA runs: ``<root>/base-<fingerprint>/``, written once per
content and shared by every step whose frozen weights hash the same.

A base is complete once its ``files.json`` (every rank's file records) exists; it is
written last. An incomplete base, left by a crash, is removed by the next save.
"""

from __future__ import annotations

import hashlib

import torch
from torch.distributed.tensor import DTensor

from dcp_universal import _comm, _torch_compat
from dcp_universal.storage import dcp_io, steps
from dcp_universal.format import manifest
from dcp_universal.errors import CheckpointIOError
from dcp_universal.format.manifest import FileRecord
from dcp_universal.storage import Storage, join
from dcp_universal.model.view import ModelView

__all__ = ["BaseStore", "fingerprint"]


def fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """A content hash of ``tensors``.

    Collective when any tensor is a DTensor under a process group (one
    ``all_gather_object``); local otherwise. Each rank hashes the bytes it holds;
    sharded tensors fold in their placement, so the same weights sharded another way hash
    differently (a resharded resume writes its base once more) while replicated and
    single-process weights hash alike.
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
        data = t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
        h.update(data)  # type: ignore[arg-type]  # an ndarray is a buffer; numpy's stubs lag
    digests = _comm.all_gather_object(h.hexdigest()) if sharded else [h.hexdigest()]
    return hashlib.sha256("".join(digests).encode()).hexdigest()[:16]


def _signature(tensors: dict[str, torch.Tensor]) -> tuple | None:
    """Identifies the frozen tensors' current contents without reading them: the same
    storage with an unchanged version counter (bumped by every in-place write, and shared
    by the detached views ``state_dict()`` returns) holds the same bytes. None when a
    version counter is unavailable: the contents are then unknown."""
    out = []
    for key, t in tensors.items():
        local = t.to_local() if isinstance(t, DTensor) else t
        version = _torch_compat.version_counter(local)
        if version is None:
            return None
        out.append((key, local.untyped_storage().data_ptr(), local.storage_offset(), version))
    return tuple(out)


class BaseStore:
    """Frozen bases under ``root``.

    Args:
        store: the root's storage.
        root: the checkpoint root.
    """

    def __init__(self, store: Storage, root: str) -> None:
        self.store = store
        self.root = root
        self._cache: tuple[tuple, str] | None = None  # (signature, fingerprint)

    def path(self, name: str) -> str:
        return join(self.root, name)

    def save(self, view: ModelView) -> tuple[str, dict[str, FileRecord]]:
        """Write the view's frozen weights unless a complete base with the same content
        exists; returns the base's directory name and its file records.

        Collective. Call order, every rank: agree on a cache hit (one ``all_reduce``);
        on a miss, :func:`fingerprint`; rank 0 reads ``files.json`` (``on_rank0``); if
        absent: one ``dcp.save``, one gather of file records, rank 0 writes
        ``files.json`` (``on_rank0``).
        """
        frozen = view.frozen_tensors()
        signature = _signature(frozen)
        hit = signature is not None and self._cache is not None and self._cache[0] == signature
        fp = (self._cache[1] if _comm.all_true(hit) and self._cache is not None
              else fingerprint(frozen))
        name = manifest.base_name(fp)
        path = self.path(name)
        records = _comm.on_rank0(steps.read_base_files, self.store, path)
        if records is None:
            records = dcp_io.gather_records(dcp_io.save_state(self.store, frozen, path))
            _comm.on_rank0(self._complete, path, records)
        self._cache = (signature, fp) if signature is not None else None
        return name, records

    def _complete(self, path: str, records: dict[str, FileRecord]) -> None:
        try:
            steps.write_base_files(self.store, path, records)
        except OSError as e:
            raise CheckpointIOError(f"writing {join(path, manifest.BASE_FILES)} failed: "
                                    f"{type(e).__name__}: {e}; nothing was committed") from e

    def remember(self, view: ModelView, name: str) -> None:
        """A load restored ``view``'s frozen weights from base ``name``: the next save
        reuses it without hashing (not collective)."""
        signature = _signature(view.frozen_tensors())
        fp = manifest.base_fingerprint(name)
        self._cache = (signature, fp) if signature is not None else None

    def remove_unfinished(self, fence=None) -> None:
        """Remove bases a crash left without ``files.json`` (rank 0 only; while
        ``fence``, the root's lease, holds)."""
        for name in steps.list_bases(self.store, self.root):
            path = self.path(name)
            if not self.store.exists(join(path, manifest.BASE_FILES)):
                steps.remove_step(self.store, path, None, fence)
