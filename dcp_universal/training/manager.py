"""CheckpointManager: numbered steps under one root.

The manager coordinates; each part has a module of its own: the step layout and
manifest (:mod:`~dcp_universal.format.manifest`), writing and committing a step
(:mod:`~dcp_universal.training.commit`), the shared frozen base of LoRA runs
(:mod:`~dcp_universal.training.base_store`), RNG and ``extra`` state
(:mod:`~dcp_universal.training.training_state`), the model and the optimizer
(:mod:`~dcp_universal.model_io`, :mod:`~dcp_universal.training.optim_io`) and retention
(:mod:`~dcp_universal.training.retention`). Public methods validate every argument before the
first byte is read or written, then call those parts.

Concurrency contract: not thread-safe; multi-process safe (every rank of one job calls
``save`` / ``load`` together); one job writes a root at a time (enforced: a writer
lease, :mod:`~dcp_universal.training.lease`), while any number of readers load
committed steps. At most one asynchronous save's write is in flight: ``save`` and
``load`` first wait for it; ``prune``, ``wait`` and ``close`` also wait for uploads (a
local tier, :mod:`~dcp_universal.training.tier`) and for retention's removals.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import dataclasses
import logging
import os
import sys
import time
from typing import Any, Callable, Iterable, cast

import torch
import torch.nn as nn

from dcp_universal import _comm
from dcp_universal.format import manifest
from dcp_universal.training import migrate, optim_io, retention, training_state
from dcp_universal.storage import steps
from dcp_universal.training.base_store import BaseStore
from dcp_universal.training.commit import StepWriter, refuse_committed
from dcp_universal.errors import (CheckpointError, CheckpointIOError, IntegrityError,
                                  NotACheckpointError, RootBusyError)
from dcp_universal.storage.integrity import check_files
from dcp_universal.training.items import BUILTIN, Item, LoadContext, SaveContext
from dcp_universal.training.lease import Lease
from dcp_universal.training.roots import check_root
from dcp_universal.format.manifest import Manifest
from dcp_universal.model.plan import LoadReport, Staged
from dcp_universal.model_io.load import stage_model
from dcp_universal.model_io.save import check_merge
from dcp_universal.training.snapshot import Snapshotter
from dcp_universal.storage import LocalStorage, join, normalize, storage_for
from dcp_universal.training.tier import LocalTier
from dcp_universal.model.view import ModelView

__all__ = ["CheckpointManager", "SaveHandle"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(kw_only=True)
class _Options:
    """CheckpointManager's settings.

    Attributes:
        keep_last: keep this many newest committed steps whole.
        keep_every: archive steps divisible by this: they keep their model and lose
            their optimizer state (steps no policy keeps are deleted).
        keep_best: keep this many steps with the best ``best_metric`` whole.
        best_metric / best_mode: the ``save(metrics=...)`` key ranking ``keep_best``, and
            whether lower ("min") or higher ("max") is better.
        With no policy every step is kept. Retention runs after a commit and never
        removes the newest step or a base a remaining step uses.
        merge: how merged ``model/`` directories are written: "sharded" or "rank0".
        merged_every: in LoRA runs, also write the merged ``model/`` every this many
            steps (None: only when ``save(..., merged=True)``). Runs without adapters
            always write ``model/``.
        storage_options: fsspec options for remote roots (e.g. ``endpoint_url``).
    """

    keep_last: int | None = None
    keep_every: int | None = None
    keep_best: int | None = None
    best_metric: str | None = None
    best_mode: str = "min"
    merge: str = "sharded"
    merged_every: int | None = None
    storage_options: dict | None = None

    def __post_init__(self) -> None:
        for name in ("keep_last", "keep_every", "keep_best", "merged_every"):
            value = getattr(self, name)
            if value is not None:
                retention.check_count(name, value, " (or None to turn it off)")
        if self.keep_best is not None and not self.best_metric:
            raise ValueError("keep_best needs best_metric, the save(metrics=...) key to rank by")
        if self.best_metric is not None and not isinstance(self.best_metric, str):
            raise ValueError(f"best_metric={self.best_metric!r}: expected a metric name (str)")
        if self.storage_options is not None and not isinstance(self.storage_options, dict):
            raise ValueError(f"storage_options={self.storage_options!r}: expected a dict of "
                             "fsspec options, e.g. {'endpoint_url': ...}")
        self.policies()  # validates the rest
        check_merge(self.merge)

    def policies(self) -> list:
        out: list = []
        if self.keep_last is not None:
            out.append(retention.KeepLast(self.keep_last))
        if self.keep_every is not None:
            out.append(retention.KeepEvery(self.keep_every))
        if self.keep_best is not None:
            # __post_init__: keep_best needs best_metric
            out.append(retention.KeepBest(self.keep_best, cast(str, self.best_metric),
                                          self.best_mode))
        return out


def _check_items(items: Iterable[Item]) -> tuple[Item, ...]:
    items = tuple(items)
    taken = {i.name for i in BUILTIN}
    for item in items:
        if not isinstance(item, Item):
            raise TypeError(f"items: {item!r} is not a dcp_universal.training.items.Item")
        name = item.name
        if not isinstance(name, str) or not name or "/" in name or name.startswith(".") \
                or name == manifest.MANIFEST:
            raise ValueError(f"items: {type(item).__name__}.name={name!r}: expected a directory "
                             "name (no '/', not hidden, not manifest.json)")
        if name in taken:
            raise ValueError(f"items: two items named {name!r} (the library's own are "
                             f"{sorted(i.name for i in BUILTIN)})")
        taken.add(name)
    return items


def _check_apart(local: LocalStorage, local_root: str, store, root: str) -> None:
    """Refuse a local tier that is the root, inside it or around it, symbolic links
    followed: an upload would copy a step onto itself, or into its own source."""
    if not isinstance(store, LocalStorage):
        return  # a remote root
    mine = os.path.realpath(local.os_path(local_root))
    theirs = os.path.realpath(store.os_path(root))
    if mine == theirs:
        how = "is the root itself"
    elif mine.startswith(theirs.rstrip(os.sep) + os.sep):
        how = "is inside the root"
    elif theirs.startswith(mine.rstrip(os.sep) + os.sep):
        how = "contains the root"
    else:
        return
    raise ValueError(f"local_dir={local_root!r} {how} ({mine}, root {theirs}, symbolic links "
                     "followed): uploads would copy steps onto themselves -> give the local "
                     "tier a directory of its own, apart from the root")


def _check_step(step) -> int:
    manifest.step_name(step)  # ValueError unless 0 <= step <= MAX_STEP
    return step


def _then_upload(write: concurrent.futures.Future) -> concurrent.futures.Future:
    """The future of a save whose write returns ``(path, upload)``: the path once
    written and committed, or (with a local tier) the upload's remote path once durable."""
    out: concurrent.futures.Future = concurrent.futures.Future()

    def settle(f: concurrent.futures.Future) -> None:
        if f.exception() is not None:
            out.set_exception(f.exception())
        else:
            out.set_result(f.result())

    def written(f: concurrent.futures.Future) -> None:
        if f.exception() is not None:
            out.set_exception(f.exception())
            return
        path, upload = f.result()
        if upload is None:
            out.set_result(path)
        else:
            upload.add_done_callback(settle)

    write.add_done_callback(written)
    return out


class SaveHandle:
    """An asynchronous save in flight (``save(..., blocking=False)``).

    The state was staged when ``save`` returned; the write and the commit run in the
    background. Its error, if any, is raised once: by :meth:`result`, or else by the
    manager's next ``save``, ``load``, ``prune``, ``wait`` or ``close``.
    """

    def __init__(self, step: int, future: concurrent.futures.Future, stall_s: float) -> None:
        self.step = step
        self.stall_s = stall_s  # how long ``save`` blocked the caller
        self._future = future
        self._told = False

    def done(self) -> bool:
        """Whether the save has finished (committed, or failed)."""
        return self._future.done()

    def result(self, timeout: float | None = None) -> str:
        """The committed step's directory, once committed (with ``local_dir``: the
        root's, once the upload committed it there; ``timeout`` seconds at most, else
        ``TimeoutError``); raises the save's error."""
        try:
            return self._future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(
                f"step {self.step} is still being written after {timeout} s") from None
        except BaseException:
            self._told = True
            raise

    def _settle(self) -> None:
        """Wait; raise the error unless :meth:`result` already raised it."""
        try:
            self._future.result()
        except BaseException:
            if not self._told:
                self._told = True
                raise


class CheckpointManager:
    """Numbered training checkpoints under ``root``.

    >>> mgr = CheckpointManager("runs/ckpt", keep_last=3)
    >>> mgr.save(100, model, optimizer, extra={"lr_scheduler": sched, "train": counters})
    >>> report = mgr.load(model, optimizer, extra={"lr_scheduler": sched, "train": counters})

    ``save`` and ``load`` are collective: call them on every rank, in the same order.

    Asynchronous saves stall the training loop only for the snapshot:

    >>> with CheckpointManager("runs/ckpt") as mgr:
    ...     for step in range(1, steps + 1):
    ...         train_step()
    ...         if step % 100 == 0:
    ...             mgr.save(step, model, optimizer, blocking=False)

    ``items``: a run's own step items (:mod:`dcp_universal.training.items`).
    ``trusted``: loads read pickles in the checkpoints as they are; by default they
    build plain data only (tensors, containers, numbers, numpy arrays, DCP's records)
    and anything else raises :class:`~dcp_universal.UnsafeCheckpointError`.
    ``lease_ttl``: one job writes a root at a time (:mod:`dcp_universal.training.lease`):
    a save or prune takes the root's writer lease, renewed while the job lives; another
    job is refused with :class:`~dcp_universal.RootBusyError` until the lease is
    released (``close()``, exit) or stays unchanged for this many seconds as watched by
    that job (from its manager's construction; a save may wait for the rest). A job
    that lost its lease commits and removes nothing more (``RootBusyError``). With
    ``local_dir`` a save takes the local tier's lease, its uploads the root's. Keep
    ``lease_ttl`` below ``timeout``: a save may watch a lease that long.
    ``timeout``: the longest any rank waits for the others inside a save or load
    (seconds, default 600), asynchronous saves included; then every waiting rank raises
    :class:`~dcp_universal.CheckpointTimeoutError` naming the rank(s) it waited for, and
    nothing is committed. Give every rank the same value.
    ``local_dir``: a local directory in front of ``root`` (:mod:`~dcp_universal.training.tier`):
    saves commit there and upload to ``root`` in the background; ``keep_last_local``
    keeps that many newest steps there (default: the root's policies), never one not
    yet uploaded.
    """

    def __init__(self, root: str, *, keep_last: int | None = None, merge: str = "sharded",
                 storage_options: dict | None = None, merged_every: int | None = None,
                 keep_every: int | None = None, keep_best: int | None = None,
                 best_metric: str | None = None, best_mode: str = "min",
                 items: Iterable[Item] = (), trusted: bool = False,
                 lease_ttl: float = 120.0, timeout: float = _comm.DEFAULT_TIMEOUT_S,
                 local_dir: str | None = None, keep_last_local: int | None = None) -> None:
        self.root = normalize(root)
        self.timeout = _comm.check_timeout(timeout)
        if not isinstance(trusted, bool):
            raise ValueError(f"trusted={trusted!r}: expected True or False")
        self.trusted = trusted
        if isinstance(lease_ttl, bool) or not isinstance(lease_ttl, (int, float)) \
                or not lease_ttl > 0:
            raise ValueError(f"lease_ttl={lease_ttl!r}: expected seconds (> 0)")
        self._items = (*BUILTIN, *_check_items(items))
        self.options = _Options(keep_last=keep_last, merge=merge, merged_every=merged_every,
                                storage_options=storage_options, keep_every=keep_every,
                                keep_best=keep_best, best_metric=best_metric, best_mode=best_mode)
        self._store = storage_for(self.root, storage_options)
        self._lease = Lease(self._store, self.root, ttl=lease_ttl)
        # where saves write and commit: the root, or the local tier in front of it
        self._tier: LocalTier | None = None
        # the lease a save takes (the one of the root it commits to), and every lease
        self._wstore, self._wroot = self._store, self.root
        self._wlease, self._leases = self._lease, [self._lease]
        if local_dir is not None or keep_last_local is not None:
            self._tier = self._local_tier(local_dir, keep_last_local, lease_ttl)
        self._bases = BaseStore(self._wstore, self._wroot)
        self._writing: concurrent.futures.Future | None = None  # an async save's write
        self._handles: list[SaveHandle] = []  # saves not yet settled (async, uploads)
        self._background: concurrent.futures.ThreadPoolExecutor | None = None
        self._deleter: concurrent.futures.ThreadPoolExecutor | None = None  # rank 0
        self._deleting: concurrent.futures.Future | None = None
        self._group = None  # the background thread's gloo group (collective to create)
        self._snapshots = Snapshotter()
        if _comm.rank() == 0:  # start watching the leases: a save judges them by it
            for lease in self._leases:
                lease.observe()

    def _local_tier(self, local_dir, keep_last_local, lease_ttl) -> LocalTier:
        if not isinstance(local_dir, str) or not local_dir:
            raise ValueError(f"local_dir={local_dir!r}: expected a local directory (str)"
                             + (" for keep_last_local" if local_dir is None else ""))
        local_root = normalize(local_dir)
        local = storage_for(local_root)
        if not isinstance(local, LocalStorage):
            raise ValueError(f"local_dir={local_dir!r}: expected a local directory, not a URL "
                             "(the local tier is the node's own disk)")
        _check_apart(local, local_root, self._store, self.root)
        if keep_last_local is not None:
            retention.check_count("keep_last_local", keep_last_local,
                                  " (or None: the root's own retention policies)")
        self._keep_last_local = keep_last_local
        self._wstore, self._wroot = local, local_root
        # a save takes the local tier's lease only; uploads take the root's (so an
        # unreachable remote never holds up a local commit)
        self._wlease = Lease(local, local_root, ttl=self._lease.ttl)
        self._leases = [self._lease, self._wlease]
        return LocalTier(local, local_root, self._store, self.root, fence=self._lease,
                         retain_remote=self._retain_remote, timeout=self.timeout)

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # the block's exception wins; a save's failure is only logged
            self.close()
        except Exception as e:
            logger.error("an asynchronous save failed while leaving the block: %s: %s",
                         type(e).__name__, e)

    def _at_exit(self) -> None:
        """At interpreter exit, an asynchronous save nobody waited for: the interpreter
        let it finish (its thread is joined first); a failure is printed, naming the
        step, instead of vanishing with the process."""
        for pending in list(self._handles):
            if pending._told:
                continue
            try:
                pending._future.result()
            except BaseException as e:
                what = (f"the save of step {pending.step} failed and is not durable at"
                        if self._tier is not None else
                        f"the asynchronous save of step {pending.step} under")
                if self._tier is None:
                    what += f" {self.root} failed and is not committed"
                else:
                    what += f" {self.root}"
                print(f"dcp_universal: {what} ({type(e).__name__}: {e}); call mgr.wait() or "
                      "mgr.close() before exiting to get this as an exception",
                      file=sys.stderr, flush=True)

    def wait(self) -> None:
        """Block until every save in flight is committed (with a local tier: durable on
        the remote root, every upload finished); raise the first error no handle's
        ``result()`` raised already. Not collective."""
        self._writing = None
        self._await_deletes()
        handles, self._handles = self._handles, []
        errors = []
        for h in handles:
            try:
                h._settle()
            except BaseException as e:
                errors.append(e)
        if errors:
            raise errors[0]

    def _settle_write(self) -> None:
        """Wait for the asynchronous save's local write (not for uploads), then raise
        the error of any save or upload that finished failing (once)."""
        if self._writing is not None:
            concurrent.futures.wait([self._writing])
            self._writing = None
        for h in [h for h in self._handles if h.done()]:
            self._handles.remove(h)
            h._settle()

    def close(self) -> None:
        """:meth:`wait`, then stop the background thread and free the staging buffers.
        The manager still saves (blocking or not) after it; its background gloo group is
        kept for that (freed with the default group at ``destroy_process_group``)."""
        try:
            self.wait()
        finally:
            if self._background is not None:
                self._background.shutdown(wait=True)
                self._background = None
            if self._tier is not None:
                self._tier.close()
            if self._deleter is not None:
                self._await_deletes()
                self._deleter.shutdown(wait=True)
                self._deleter = None
            self._snapshots = Snapshotter()
            for lease in self._leases:
                lease.release()

    # ---- listing ----------------------------------------------------------------------

    def steps(self) -> list[int]:
        """Committed steps, ascending (read by the caller alone, not collective); with a
        local tier, those committed in either tier."""
        remote = steps.list_steps(self._store, self.root)
        if self._tier is None:
            return remote
        return sorted(set(remote) | set(self._tier.local_steps()))

    def latest_step(self) -> int | None:
        """The newest committed step whose manifest reads (a newer one that cannot be
        read is logged and skipped; when none can, its error is raised)."""
        return steps.newest_readable(self.steps(), self.manifest)

    def step_path(self, step: int) -> str:
        return manifest.step_path(self.root, step)

    def manifest(self, step: int) -> Manifest:
        store, root = self._where(step)
        return steps.read_manifest(store, manifest.step_path(root, step))

    def _where(self, step: int) -> tuple:
        """``(store, root)`` holding committed ``step``: the local tier's when committed
        there, else the root's."""
        if self._tier is not None and self._tier.local.exists(
                join(manifest.step_path(self._tier.local_root, step), manifest.MANIFEST)):
            return self._tier.local, self._tier.local_root
        return self._store, self.root

    # ---- saving -----------------------------------------------------------------------

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
             extra: dict | None = None, merged: bool | None = None, overwrite: bool = False,
             metrics: dict[str, float] | None = None, blocking: bool = True) -> str | SaveHandle:
        """Write and commit step ``step``; returns its directory (with ``local_dir``: the
        local tier's), or with ``blocking=False`` a :class:`SaveHandle` once the state is
        staged.

        Collective. Call order, every rank: prepare the step (rank 0 removes debris, all
        agree); in LoRA runs the frozen base (once per content) and ``adapters/``; the
        merged ``model/`` when written; ``optimizer/`` with the training state; the
        commit (rank 0 writes the manifest, all agree); retention (rank 0, all agree).

        Args:
            extra: objects with ``state_dict()``/``load_state_dict()`` (or plain dicts)
                saved with the training state. Objects that differ across ranks are
                saved per rank.
            merged: LoRA runs: also write the merged ``model/`` (default: the manager's
                ``merged_every`` policy).
            overwrite: replace an already committed ``step``.
            metrics: numbers recorded in the manifest (``keep_best`` ranks by one).
            blocking: ``False``: return a :class:`SaveHandle` once the state is staged
                (a snapshot in host memory; model, optimizer and ``extra`` may change at
                once) and write and commit in a background thread, whose collectives run
                on a gloo group of their own. The commit is the same as a blocking
                save's: the manifest is written after every rank's write finished, and
                a failure on any rank commits nothing and reaches every rank. A LoRA
                run's frozen base, when it must be written (once per content), is
                written before ``save`` returns.

        Raises:
            StepAlreadyExistsError: ``step`` is committed and ``overwrite`` is False.
            CheckpointIOError: a write or the commit failed on some rank (every rank
                raises; nothing is committed).
        """
        _check_step(step)
        extra = training_state.check_extra(extra)
        try:
            metrics = {str(k): float(v) for k, v in (metrics or {}).items()}
        except (TypeError, ValueError):
            raise ValueError(f"metrics={metrics!r}: expected a dict of numbers") from None
        if merged is None:
            every = self.options.merged_every
            merged = every is not None and step % every == 0
        self._settle_write()
        with _comm.operation(f"save of step {step}", self.timeout):
            return self._save(step, model, optimizer, extra, bool(merged), overwrite, metrics,
                              blocking)

    def _save(self, step, model, optimizer, extra, merged, overwrite, metrics,
              blocking) -> str | SaveHandle:
        start = time.perf_counter()
        if self._tier is not None:
            self._recover()
            if not overwrite:
                _comm.on_rank0(self._refuse_durable, step)
        if blocking:
            path, upload = self._snapshot(step, model, optimizer, extra, merged, overwrite,
                                          metrics, None)(start, None)
            if upload is not None:
                self._handles.append(SaveHandle(step, upload, 0.0))
            return path
        if self._background is None:
            self._group = self._group or _comm.new_gloo_group(self.timeout)
            self._background = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="dcp-universal-save")
            atexit.register(self._at_exit)
        self._snapshots.begin()
        finish = self._snapshot(step, model, optimizer, extra, merged, overwrite, metrics,
                                self._snapshots.copy)
        self._snapshots.end()
        stall = time.perf_counter() - start
        if _comm.rank() == 0:
            logger.info("staged step %d (%.1f MB) in %.3f s; writing in the background", step,
                        self._snapshots.nbytes / 1e6, stall)

        def background() -> tuple[str, concurrent.futures.Future | None]:
            with _comm.writes_only(self._group), _comm.operation(
                    f"save of step {step} (in the background)", group=self._group):
                return finish(start, self._group)

        self._writing = self._background.submit(background)
        handle = SaveHandle(step, _then_upload(self._writing), stall)
        self._handles.append(handle)
        return handle

    def _recover(self) -> None:
        """Queue the uploads of local steps an earlier job left (collective, once)."""
        assert self._tier is not None  # its callers checked
        if not self._tier.started:  # uploads nobody waited for are reported at exit
            atexit.register(self._at_exit)
        self._tier.start()
        for step, future in self._tier.recover():
            self._handles.append(SaveHandle(step, future, 0.0))

    def _refuse_durable(self, step: int) -> None:
        try:
            refuse_committed(self._store, step, self.step_path(step))
        except (OSError, CheckpointIOError) as e:  # the upload checks again
            logger.warning("could not tell whether step %d is committed at %s (%s: %s); "
                           "saving it locally, its upload checks again", step, self.root,
                           type(e).__name__, e)

    def _snapshot(self, step, model, optimizer, extra, merged, overwrite, metrics,
                  snapshot) -> Callable[[float, Any],
                                        tuple[str, concurrent.futures.Future | None]]:
        """Everything of a save that reads model, optimizer and ``extra`` (collective on
        the caller's group: prepare, then every item's save: the base, factor gathers,
        training state), with what the writes will read copied by ``snapshot``
        (``None``: read in place, for a blocking save). Returns the writes and the
        commit, ``finish(start, group)``: collective on ``group``, the default one
        (``None``) for a blocking save, the background thread's own for an asynchronous
        one, which runs nothing else (``_comm.writes_only``)."""
        view = ModelView.of(model)
        self._await_deletes()  # the last retention's removals (rank 0): before any debris
        writer = StepWriter(self._wstore, self._wroot, step, fence=self._wlease)
        writer.prepare(overwrite=overwrite, bases=self._bases, lease=self._wlease)
        m = Manifest(step=step, world_size=_comm.world_size(), mesh=view.mesh(),
                     merge=self.options.merge, dtypes=view.dtypes(), items={}, metrics=metrics,
                     ties=[list(g) for g in view.ties])
        ctx = SaveContext(view=view, optimizer=optimizer, extra=extra, store=self._wstore,
                          manifest=m, merge=self.options.merge, merged=merged,
                          bases=self._bases, snapshotter=snapshot)
        writes = [(item.name, w) for item in self._items if (w := item.save(ctx)) is not None]
        del ctx

        def finish(start: float, group) -> tuple[str, concurrent.futures.Future | None]:
            while writes:  # each write's data is freed once written
                item, write = writes.pop(0)
                writer.write(item, write, group)
                del write
            writer.commit(m, group)
            _comm.on_rank0(self._retain, step, group=group)
            if _comm.rank() == 0:
                size = sum(f.size for f in m.files.values())
                logger.info("saved step %d (%.1f MB) in %.2f s", step, size / 1e6,
                            time.perf_counter() - start)
            upload = (self._tier.submit(step, m, overwrite=overwrite)
                      if self._tier is not None else None)
            return writer.path, upload

        return finish

    def _retain(self, step: int) -> None:
        try:
            if self._tier is None:
                self._prune_at(self._store, self.root, self.options.policies(),
                               dry_run=False, defer=self._defer, fence=self._lease)
            else:  # the local tier: never a step not yet durable remotely
                local = ([retention.KeepLast(self._keep_last_local)]
                         if self._keep_last_local is not None else self.options.policies())
                self._prune_at(self._tier.local, self._tier.local_root, local, dry_run=False,
                               protect=self._tier.not_durable(), defer=self._defer,
                               fence=self._wlease)
        except RootBusyError:
            raise  # lost the root: nothing was removed after that
        except Exception as e:
            raise CheckpointError(f"step {step} is committed, but retention failed "
                                  f"({type(e).__name__}: {e}); the next save retries it") from e

    def prune(self, *, dry_run: bool = False) -> retention.Decision:
        """Apply the retention policies now (``save`` does after every commit).

        Not collective: call it on one process only. Returns what was (or, with
        ``dry_run``, would be) done.
        """
        self.wait()
        check_root(self._store, self.root)
        if not dry_run:
            self._lease.acquire()  # a pruner writes too: never beside another job
        return self._prune(dry_run=dry_run)

    def _prune(self, *, dry_run: bool) -> retention.Decision:
        """Retention of the root (the remote root, with a local tier)."""
        return self._prune_at(self._store, self.root, self.options.policies(), dry_run=dry_run,
                              fence=self._lease)

    def _retain_remote(self) -> None:
        """Retention of the remote root after an upload's commit (rank 0)."""
        try:
            self._prune(dry_run=False)
        except RootBusyError:
            raise
        except Exception as e:
            raise CheckpointError(f"an upload to {self.root} is committed, but retention "
                                  f"there failed ({type(e).__name__}: {e}); the next upload "
                                  "retries it") from e

    def _defer(self, remove: Callable[[], None]) -> None:
        """Run a retention's removal of data on rank 0's deleter thread: a save returns
        once the deleted steps are uncommitted, not once their gigabytes are gone."""
        self._await_deletes()
        if self._deleter is None:
            self._deleter = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="dcp-universal-retention")
        self._deleting = self._deleter.submit(remove)

    def _await_deletes(self) -> None:
        """Wait for the deleter (rank 0); a failure leaves debris, which the next save
        removes, so it is logged, not raised."""
        deleting, self._deleting = self._deleting, None
        if deleting is None:
            return
        try:
            deleting.result()
        except Exception as e:
            logger.warning("retention left debris (%s: %s); the next save removes it",
                           type(e).__name__, e)

    def _prune_at(self, store, root: str, policies: list, *, dry_run: bool,
                  protect: Iterable[int] = (), defer=None, fence=None) -> retention.Decision:
        self._await_deletes()
        manifests, unreadable = {}, {}
        for s in steps.list_steps(store, root):
            try:
                manifests[s] = steps.read_manifest(store, manifest.step_path(root, s))
            except CheckpointError as e:  # kept and reported; the others are still pruned
                unreadable[s] = f"{type(e).__name__}: {e}"
        protect = set(protect)
        if protect and policies:  # no policy keeps every step: protecting must not delete
            policies = [*policies, retention.KeepSteps(protect)]
        decision = retention.decide(policies, manifests, steps.list_bases(store, root),
                                    unreadable=unreadable)
        for s, why in sorted(unreadable.items()):
            logger.warning("retention keeps step %d, whose manifest it cannot read (%s)", s, why)
        if not dry_run:
            retention.apply(decision, root, store, manifests, defer=defer, fence=fence)
        return decision

    # ---- loading ----------------------------------------------------------------------

    def load(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
             step: int | None = None, strict: bool = True, extra: dict | None = None,
             hyperparams: str = "checkpoint", skip_per_rank: Iterable[str] = (),
             verify: bool | None = None, init_from: str | None = None,
             init_storage_options: dict | None = None) -> LoadReport | None:
        """Load step ``step`` (default: the latest committed) into any configuration.

        A root with no committed step (a job's first start) loads nothing and returns
        ``None``, or, with ``init_from``, loads the model from that path and carries
        what maps beside it (:mod:`~dcp_universal.training.migrate`): optimizer state
        keyed by parameter FQN (torchtitan, a plain DCP ``optim``) by canonical name;
        keyed by position (a ``torch.save`` file, Accelerate's ``optimizer.bin``) with
        :func:`~dcp_universal.interop.legacy.stage_legacy_optimizer` (every shape
        checked, a mismatch refused); Accelerate's ``scheduler.bin`` into the LR
        scheduler in ``extra``; the step the source records as ``report.step``. The
        report's notes name what was left behind (RNG, data loader, ...); other
        ``extra`` objects and the RNG stay as they are. ``init_from`` is anything
        :func:`~dcp_universal.load_model` reads. Once the root holds a committed step it
        is resumed (``report.step``: its number) and ``init_from`` is not read.

        Collective. Call order, every rank: rank 0 picks the step and tells every rank
        (so a reader racing a writer loads one step everywhere); every rank reads the
        manifest and checks what it was asked for; then the model's reads, the
        optimizer's and the training state's (one ``dcp.load`` per directory, same order
        everywhere); then everything is installed.

        Args:
            optimizer: restored by canonical parameter name (see ``LoadReport``). A step
                holding no optimizer state (saved without one, or converted) leaves it
                fresh, in the report; an archived step is refused.
            extra: the same names as at save; each object gets its ``load_state_dict``.
            hyperparams: ``"checkpoint"`` or ``"current"`` (lr, betas, ... of the
                optimizer, when its param groups match the checkpoint's).
            skip_per_rank: ``extra`` names saved per rank to leave as they are when the
                world size differs from the save's. Without it such a load raises
                :class:`PerRankStateError` before touching anything. An extra object
                may instead define ``load_resharded_state_dicts(states: list)``, called
                with every saved rank's state. The RNG is always left as it is on
                another world size (a report note); ``"rng"`` here is accepted.
            verify: ``None`` (default): every byte read is checked against its block
                checksum (CRC-32C) before it is used; ``True``: also every file of the
                step read and checked whole first (steps written before block
                checksums are checked only so); ``False``: sizes only, the fast path.
                A failed check raises :class:`IntegrityError` naming the file, with
                nothing installed.
            init_from: where the model starts when the root has no committed step.
            init_storage_options: fsspec options for ``init_from`` (default: the
                manager's ``storage_options``).

        RNG state is restored (per rank) when an optimizer or ``extra`` is given. Nothing
        is installed into the model, optimizer or ``extra`` objects unless every read
        succeeded.
        """
        optim_io.check_hyperparams(hyperparams)
        extra = training_state.check_extra(extra)
        self._settle_write()
        skip = set(skip_per_rank)
        if not all(isinstance(s, str) for s in skip):
            raise ValueError(f"skip_per_rank={sorted(map(repr, skip))}: expected names (str)")
        if step is not None:
            _check_step(step)
        if init_from is not None and not isinstance(init_from, str):
            raise ValueError(f"init_from={init_from!r}: expected a path or URL (str)")
        with _comm.operation("load" if step is None else f"load of step {step}", self.timeout):
            picked = _comm.on_rank0(self._pick_step, step)
            if picked is None:
                return self._initial(model, optimizer, init_from, init_storage_options,
                                     strict, verify, hyperparams, extra)
            step, local, remote = picked
            report = self._load_tiered(model, optimizer, step, local, remote, strict, extra,
                                       hyperparams, skip, verify)
            if self._tier is not None:  # local steps a killed job did not upload
                self._recover()
            if init_from is not None:
                report.notes.append(f"resumed step {step}; init_from={init_from} not read")
            report.step = step
            return report

    def _initial(self, model, optimizer, init_from, storage_options, strict, verify,
                 hyperparams, extra) -> LoadReport | None:
        """A root without a committed step: nothing, or the model from ``init_from`` and
        what maps beside it (:mod:`~dcp_universal.training.migrate`)."""
        if init_from is None:
            if _comm.rank() == 0:
                logger.info("no committed step under %s: nothing loaded (a first start)",
                            self.root)
            return None
        path = normalize(init_from)
        options = self.options.storage_options if storage_options is None else storage_options
        store = storage_for(path, options)
        view = ModelView.of(model)
        staged = stage_model(view, path, strict=strict, verify=verify, stage=True,
                             store=store, trusted=self.trusted)
        carried = migrate.find(store, path, staged.facts.get("source_meta") or {},
                               trusted=self.trusted)
        staged = Staged.combine([staged, migrate.stage(
            view, optimizer, extra, carried, fresh=set(staged.report.fresh),
            layout=staged.facts.get("layout") or {}, hyperparams=hyperparams,
            trusted=self.trusted)])
        staged.commit()
        staged.report.notes.append(f"no committed step under {self.root}: the model starts "
                                   f"from {path}")
        return staged.report

    def _pick_step(self, step: int | None) -> tuple[int, bool, bool] | None:
        """``(step, committed locally, committed at the root)`` of the step to load
        (rank 0), or None when there is none."""
        check_root(self._store, self.root)
        if self._tier is None:
            found = self.steps()
            local, remote = [], found
        else:  # committed in either tier: each listed once
            local, remote = self._tier.local_steps(), self.remote_steps()
            found = sorted(set(local) | set(remote))
        if step is None:
            step = steps.newest_readable(found, self.manifest)
            if step is None:
                return None
        elif step not in found:
            raise NotACheckpointError(
                f"step={step} is not a committed step under {self.root}; committed: {found}")
        return step, step in local, step in remote

    def _load_tiered(self, model, optimizer, step, local, remote, strict, extra, hyperparams,
                     skip, verify) -> LoadReport:
        """Load from the local tier when its copy is committed and whole on every rank
        (then every byte read is checked as always; a failed check falls back to the
        root), else from the root."""
        args = (model, optimizer, step, strict, extra, hyperparams, skip, verify)
        if self._tier is None or not local:
            return self._load(*args, self._store, self.root)
        tier = self._tier
        if not _comm.all_true(tier.local_copy_whole(step)):
            if not remote:
                raise CheckpointError(
                    f"step {step} is committed only in the local tier, and its copy is not "
                    f"whole on every rank (node-local disks of several nodes?) and not at "
                    f"{self.root} yet -> load it on the node(s) that wrote it, or load "
                    f"step={self.latest_remote()} from the root")
            report = self._load(*args, self._store, self.root)
            report.notes.append(f"read step {step} from {self.root}: its local copy is not "
                                "whole on every rank")
            return report
        try:
            report = self._load(*args, tier.local, tier.local_root)
        except IntegrityError as e:
            if not remote:
                raise
            logger.warning("the local copy of step %d fails its check (%s); reading it from "
                           "%s", step, e, self.root)
            report = self._load(*args, self._store, self.root)
            report.notes.append(f"read step {step} from {self.root}: its local copy failed "
                                f"its check ({e})")
            return report
        report.notes.append(f"read step {step} from the local tier {tier.local_root}")
        return report

    def latest_remote(self) -> int | None:
        """The newest step committed at the root itself (with a local tier: durable)."""
        remote = self.remote_steps()
        return remote[-1] if remote else None

    def remote_steps(self) -> list[int]:
        """Steps committed at the root itself (with a local tier: durable), ascending."""
        return steps.list_steps(self._store, self.root)

    def _load(self, model, optimizer, step, strict, extra, hyperparams, skip, verify,
              store, root) -> LoadReport:
        path = manifest.step_path(root, step)
        base_store = store

        def prepare() -> LoadContext:  # per-rank reads and checks, agreed on below
            m = steps.read_manifest(base_store, path)
            store = base_store if verify is False else steps.verified_store(base_store, path, m)
            ctx = LoadContext(view=ModelView.of(model), optimizer=optimizer, extra=extra,
                              path=path, manifest=m,
                              store=store, strict=strict, verify=verify,
                              hyperparams=hyperparams, skip_per_rank=skip,
                              trusted=self.trusted)
            for item in self._items:
                item.check(ctx)
            return ctx

        ctx = _comm.agreed(prepare)
        m = ctx.manifest
        # Read everything first, install after: a failure halfway leaves the job untouched.
        staged = Staged.combine([s for item in self._items if (s := item.stage(ctx)) is not None])
        staged.commit()
        unknown = sorted(k for k in m.items if k not in {i.name for i in self._items})
        if unknown:
            staged.report.notes.append(
                f"step {step} holds items this manager does not read: {unknown} (not loaded; "
                "pass CheckpointManager(items=[...]) the items that wrote them)")
        if staged.facts.get("restored_base"):
            self._bases.remember(ctx.view, staged.facts["restored_base"])
        unchecked = [r for r in (*m.files.values(), *(m.base_files or {}).values())
                     if not r.has_blocks]
        if unchecked and verify is None:
            staged.report.notes.append(
                f"step {step} was written before block checksums: {len(unchecked)} of its "
                "files were checked by size only (verify=True checks their CRC-32)")
        return staged.report

    def verify(self, step: int | None = None, *,
               progress: Callable[[int], None] | None = None) -> dict[str, int]:
        """Check every file of ``step`` (default: latest) and of its base: size and CRC-32.

        Not collective. Returns ``{"files": n, "bytes": total}``; raises
        :class:`IntegrityError` naming the first bad file. ``progress`` is called with
        each checked file's size.
        """
        step = self.latest_step() if step is None else _check_step(step)
        if step is None:
            raise NotACheckpointError(f"no committed step under {self.root}")
        store, root = self._where(step)  # with a local tier: the copy a load reads first
        path = manifest.step_path(root, step)
        m = steps.read_manifest(store, path)
        steps.check_recorded(store, path, m)
        check_files(store, path, m.files, checksums=True, progress=progress)
        records = list(m.files.values())
        if m.base:
            check_files(store, cast(str, manifest.base_path(path, m)), m.base_files or {},
                        checksums=True, progress=progress)
            records += list((m.base_files or {}).values())
        return {"files": len(records), "bytes": sum(r.size for r in records)}
