"""Writing one step and committing it.

Atomicity policy: a step is committed by its ``manifest.json``, written by rank 0 after
every rank finished writing every item; until then the directory is debris, which
``steps()`` never lists and the next save removes. The manifest is written whole or not
at all (:meth:`dcp_universal.storage.Storage.write_atomic`).

:func:`convert` writes a checkpoint of any input format (:mod:`dcp_universal.sources`)
as a committed step.

A :class:`StepWriter` is used by every rank, in this order::

    writer = StepWriter(store, root, step, fence=lease)
    writer.prepare(overwrite=..., bases=...)   # collective (rank 0 acts, all agree)
    writer.write(item, fn, group)              # collective as fn is; once per item
    writer.commit(manifest, group)             # collective (gather, rank 0 commits)

``group`` is the save's process group (an asynchronous save's own, on its background
thread; ``None``: the default group).
"""

from __future__ import annotations

import logging
from typing import Callable, cast

import torch

from dcp_universal import _comm, sources
from dcp_universal.storage import dcp_io, steps
from dcp_universal.format import manifest, records
from dcp_universal.training import migrate
from dcp_universal.training.base_store import BaseStore
from dcp_universal.training.lease import Lease
from dcp_universal.training.roots import check_root
from dcp_universal.errors import (CheckpointError, CheckpointIOError, IntegrityError,
                                  NotACheckpointError, StepAlreadyExistsError)
from dcp_universal.storage.integrity import check_files
from dcp_universal.format.manifest import FileRecord, Manifest, TrainingState
from dcp_universal.storage import Storage, join, normalize, storage_for

__all__ = ["StepWriter", "convert", "refuse_committed"]

logger = logging.getLogger(__name__)


def refuse_committed(store: Storage, step: int, path: str) -> None:
    """Raise :class:`StepAlreadyExistsError` if step ``step`` is committed at ``path``
    (a save without ``overwrite``)."""
    if store.exists(join(path, manifest.MANIFEST)):
        raise StepAlreadyExistsError(
            f"step {step} is already committed at {path}; pass overwrite=True to replace "
            "it, or save under another step number")


class StepWriter:
    """Writes the items of step ``step`` under ``root`` and commits it.

    Attributes:
        path: the step directory.
        files: this rank's file records so far, relative to the step directory.
        items: the item directories written.
    """

    def __init__(self, store: Storage, root: str, step: int, *, fence: Lease | None = None,
                 alone: bool = False) -> None:
        self.store = store
        self.root = root
        self.step = step
        self.fence = fence  # the lease whose holder alone commits and removes here
        self.alone = alone  # this process writes the step by itself: nothing collective
        self.path = manifest.step_path(root, step)
        self.files: dict[str, FileRecord] = {}
        self.items: dict[str, bool] = {}

    def prepare(self, *, overwrite: bool, bases: BaseStore, lease=None) -> None:
        """Collective (``on_rank0``): take or renew the root's writer ``lease``; refuse a
        committed step unless ``overwrite``; remove the step's old directory, debris of
        crashed saves and unfinished bases (only under the lease: never another job's).

        Raises:
            RootBusyError: another live job writes the root (on every rank).
            StepAlreadyExistsError: on every rank.
        """
        if self.alone:
            self._prepare(overwrite, bases, lease)
        else:
            _comm.on_rank0(self._prepare, overwrite, bases, lease)

    def _prepare(self, overwrite: bool, bases: BaseStore, lease) -> None:
        check_root(self.store, self.root)
        if lease is not None:
            lease.acquire()
        if not overwrite:
            refuse_committed(self.store, self.step, self.path)
        # an overwritten step, then debris (each fenced: only while this job holds the root)
        for path in [self.path] + [manifest.step_path(self.root, s) for s in
                                   steps.list_steps(self.store, self.root, committed=False)]:
            steps.remove_step(self.store, path, fence=self.fence)
        bases.remove_unfinished(self.fence)

    def write(self, item: str, fn: Callable[[str, object], dict[str, FileRecord]],
              group=None) -> None:
        """Write ``item`` (e.g. ``model``) with ``fn(item_dir, group)``, which returns the
        records of the files this rank wrote. Collective exactly as ``fn`` is."""
        written = fn(join(self.path, item), group)
        self.files.update({f"{item}/{name}": rec for name, rec in written.items()})
        self.items[item] = True

    def commit(self, m: Manifest, group=None) -> None:
        """Collective on ``group``: gather every rank's file records (one
        ``all_gather_object``), then rank 0 writes the manifest (``on_rank0``). Every
        rank returns once the step is committed, or raises :class:`CheckpointIOError` if
        the commit failed."""
        m.items = {**self.items, **m.items}
        if self.alone:
            m.files = dict(self.files)
            self._commit(m)
        else:
            m.files = dcp_io.gather_records(self.files, group=group)
            _comm.on_rank0(self._commit, m, group=group)

    def _commit(self, m: Manifest) -> None:
        # Never commit a step that lost a file between its write and now (another job's
        # cleanup, a deleted bucket recreated empty): every file the manifest lists must
        # be there with its size. One listing, local and remote alike.
        try:
            check_files(self.store, self.path, m.files)
            if m.base:
                check_files(self.store, cast(str, manifest.base_path(self.path, m)),
                            m.base_files or {})
        except IntegrityError as e:
            raise CheckpointIOError(
                f"step {self.step} was written, but before its commit a file it wrote was "
                f"gone or changed ({e}); it is not committed -> is another job writing to "
                f"{self.root}? The next save removes this step's debris") from e
        if self.fence is not None:
            m.writer = self.fence.token
        data = m.to_json().encode()
        if len(data) > records.MAX_MANIFEST_BYTES:  # a load would refuse it as damage
            raise CheckpointIOError(
                f"step {self.step}'s manifest would be {len(data)} bytes, more than the "
                f"{records.MAX_MANIFEST_BYTES} a load reads; it is not committed -> write "
                "fewer, larger files (fewer ranks per node, or DCP's thread_count=1)")
        if not self.alone:
            _comm.claim_commit()  # unless another rank gave up waiting for this one
        try:  # only while this job holds the root (see training.lease)
            self.store.fenced_write(join(self.path, manifest.MANIFEST), data, self.fence)
        except OSError as e:
            raise CheckpointIOError(
                f"step {self.step} was written but its commit failed ({type(e).__name__}: "
                f"{e}); it is not committed and the next save removes it") from e


def convert(src: str, root: str, *, step: int | None = None,
            storage_options: dict | None = None, trusted: bool = False,
            lease_ttl: float = 120.0) -> str:
    """Write the model of ``src`` (any format :func:`~dcp_universal.sources.open_source`
    reads: a legacy ``torch.save`` file, a Hugging Face directory, another tool's DCP
    checkpoint, an Accelerate ``save_state`` directory, ...) as a committed step under
    ``root``, with what maps beside it (:mod:`~dcp_universal.training.migrate`); returns
    its path.

    Not collective (one process). The model alone goes to ``model/`` (another tool's
    optimizer, scheduler or data loader state is never taken for weights). Optimizer
    state keyed by parameter FQN (torchtitan's, a plain ``dcp.save`` of
    ``get_optimizer_state_dict``) goes to ``optimizer/`` by canonical name, without its
    param groups (a load keeps the target optimizer's hyperparameters). Optimizer state
    keyed by position (a legacy file's, Accelerate's ``optimizer.bin``) is not written:
    only the live optimizer can name its parameters (resume it with
    ``mgr.load(model, optimizer, init_from=src)``). The step number defaults to the one
    the source records (a legacy file's ``iter_num`` / ``global_step``, torchtitan's
    ``train_state.step`` and ``step-N`` directory, Accelerate's ``checkpoint_N``), else
    0. A warning names everything not carried.

    The step is written and committed as a save writes one (:class:`StepWriter`): under
    the root's writer lease (``lease_ttl``, as :class:`~dcp_universal.CheckpointManager`
    takes it), every file checked before the commit, the debris of a killed save or
    convert removed first. So a convert never writes beside a live job, which would take
    its unfinished step for debris, and a killed convert leaves only debris.

    Raises:
        CheckpointError: the source records two different step numbers and ``step`` is
            not given; the source is an adapter without base weights.
        StepAlreadyExistsError: the step is committed under ``root``.
        RootBusyError: another live job writes ``root``.
    """
    src, root = normalize(src), normalize(root)
    src_store = storage_for(src, storage_options)
    source = sources.open_source(src_store, src, sources.Want(trusted=trusted,
                                                              model_only=True))
    if source.meta.get("adapter_only"):
        raise NotACheckpointError(f"{src} is an adapter without base weights: there is no model "
                                  "to convert; load it into a model with load_model instead")
    carried = migrate.find(src_store, src, source.meta, trusted=trusted)
    if step is None:
        if carried.conflict:
            raise CheckpointError(f"{src} records two step numbers: {carried.conflict} -> "
                                  "pass step=N (CLI: --step N)")
        if carried.step is None:
            logger.warning("%s records no step number (iter_num / global_step, "
                           "train_state.step, a step-N or checkpoint_N directory): written "
                           "as step 0; pass step=N (CLI: --step N) to number it", src)
        step = int(carried.step or 0)
    if carried.by_name is None and carried.by_position is not None:
        logger.warning("%s holds optimizer state, which convert does not write: it is keyed "
                       "by position, which only its model can turn into parameter names -> "
                       "resume it with mgr.load(model, optimizer, init_from=%r)", src, src)
    if carried.scheduler is not None:
        carried.left.append(f"{carried.scheduler_at} (LR scheduler: resume with mgr.load(..., "
                            f"init_from={src!r}, extra={{'lr_scheduler': scheduler}}))")
    if carried.left:
        logger.warning("%s", carried.left_note())
    store = storage_for(root, storage_options)
    lease = Lease(store, root, ttl=lease_ttl)
    writer = StepWriter(store, root, step, fence=lease, alone=True)
    try:
        try:
            writer.prepare(overwrite=False, bases=BaseStore(store, root), lease=lease)
        except StepAlreadyExistsError:
            raise StepAlreadyExistsError(f"step {step} already exists under {root}; pass "
                                         "another step=N (CLI: --step N)") from None
        tensors = {k: torch.empty(i.shape, dtype=i.dtype)
                   for k, i in sorted(source.keys.items())}
        source.read(tensors, single_process=True)
        optimizer = migrate.converted_optimizer(carried, trusted=trusted)
        writer.write(manifest.MODEL_DIR, lambda d, _: dcp_io.save_state(
            store, tensors, d, single_process=True))
        if optimizer is not None:
            assert carried.by_name is not None  # converted_optimizer: None without it
            writer.write(manifest.OPTIMIZER_DIR, lambda d, _: dcp_io.save_state(
                store, optimizer, d, single_process=True))
            logger.info("%s: optimizer state of %d parameters carried by name into step %d",
                        src, len(carried.by_name[1].optimizer), step)
        writer.commit(Manifest(
            step=step, world_size=1, merge="rank0",
            dtypes=sorted({str(t.dtype) for t in tensors.values()}),
            items={manifest.MODEL_DIR: True, manifest.OPTIMIZER_DIR: optimizer is not None},
            legacy=source.meta.get("legacy"),
            training_state=TrainingState(extra=[], per_rank=[])))
    finally:
        lease.release()
    return writer.path
