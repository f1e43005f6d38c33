"""CheckpointManager: numbered steps under one root.

The manager coordinates; it holds no policy of its own. Each job has a module:

* its settings, checked at construction, and the requests ``save`` and ``load`` pass
  down: :mod:`~dcp_universal.training.options`;
* where saves commit and loads read first, the root itself or a local tier in front of
  it: a tier (:mod:`~dcp_universal.training.tier`, a protocol);
* saves in flight (asynchronous writes, uploads, their handles):
  :mod:`~dcp_universal.training.saving`, with snapshots from
  :mod:`~dcp_universal.training.snapshot`;
* writing and committing a step: :mod:`~dcp_universal.training.commit`, its items
  (model, adapters, optimizer, training state): :mod:`~dcp_universal.training.items`;
* retention, as composable policies and their executor:
  :mod:`~dcp_universal.training.retention`;
* a job's first start (``init_from``): :mod:`~dcp_universal.training.first_start`;
* checking a step's files: :func:`dcp_universal.storage.steps.verify_step`.

Data goes down: the manager calls these parts and none calls back into it.

Concurrency contract: not thread-safe; multi-process safe (every rank of one job calls
``save`` / ``load`` together); one job writes a root at a time (enforced: a writer
lease, :mod:`~dcp_universal.training.lease`), while any number of readers load
committed steps. At most one asynchronous save's write is in flight: ``save`` and
``load`` first wait for it; ``prune``, ``wait`` and ``close`` also wait for uploads (a
local tier) and for retention's removals.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from dcp_universal import _comm
from dcp_universal.errors import NotACheckpointError
from dcp_universal.format import manifest
from dcp_universal.format.manifest import MODEL_DIR, OPTIMIZER_DIR, Manifest
from dcp_universal.model.plan import LoadReport, Staged
from dcp_universal.model.view import ModelView
from dcp_universal.storage import Storage, normalize, steps, storage_for
from dcp_universal.training import optim_io, training_state
from dcp_universal.training.base_store import BaseStore
from dcp_universal.training.commit import StepWriter
from dcp_universal.training.first_start import first_start
from dcp_universal.training.items import BUILTIN, Item, LoadContext, SaveContext
from dcp_universal.training.lease import Lease
from dcp_universal.training.options import LoadRequest, ManagerOptions, SaveRequest
from dcp_universal.training.retention import Decision, Retainer, RetentionPolicy
from dcp_universal.training.roots import check_root
from dcp_universal.training.saving import SaveHandle, Saves
from dcp_universal.training.snapshot import Snapshotter
from dcp_universal.training.tier import RootTier, Tier, local_tier

__all__ = ["CheckpointManager", "SaveHandle"]

logger = logging.getLogger(__name__)


def _check_step(step) -> int:
    manifest.step_name(step)  # ValueError unless 0 <= step <= MAX_STEP
    return step


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

    Retention: ``keep_last``, ``keep_every`` and ``keep_best`` (ranked by ``best_metric``
    of ``save(metrics=...)``, ``best_mode`` "min" or "max") are shortcuts for the built-in
    policies; ``retention`` adds any :class:`~dcp_universal.RetentionPolicy` (your own
    included). They compose; with none every step is kept. ``merge`` / ``merged_every``:
    see :class:`~dcp_universal.training.options.ManagerOptions`.
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
                 retention: list[RetentionPolicy] | None = None,
                 items: Iterable[Item] = (), trusted: bool = False,
                 lease_ttl: float = 120.0, timeout: float = _comm.DEFAULT_TIMEOUT_S,
                 local_dir: str | None = None, keep_last_local: int | None = None) -> None:
        self.root = normalize(root)
        self.options = ManagerOptions(
            keep_last=keep_last, keep_every=keep_every, keep_best=keep_best,
            best_metric=best_metric, best_mode=best_mode,
            retention=retention if retention is not None else [], merge=merge,
            merged_every=merged_every, storage_options=storage_options, items=tuple(items),
            trusted=trusted, lease_ttl=lease_ttl, timeout=timeout, local_dir=local_dir,
            keep_last_local=keep_last_local)
        self.timeout, self.trusted = self.options.timeout, self.options.trusted
        self._items = (*BUILTIN, *self.options.items)
        self._store = storage_for(self.root, storage_options)
        self._lease = Lease(self._store, self.root, ttl=self.options.lease_ttl)
        self._retainer = Retainer(self._store, self.root, self.options.policies(),
                                  fence=self._lease)
        root_tier = RootTier(self._store, self.root, self._lease, self._retainer)
        # where saves write and commit: the root, or a local tier in front of it
        self._tier: Tier = (local_tier(local_dir, keep_last_local, root_tier,
                                       timeout=self.timeout)
                            if self.options.tiered else root_tier)
        self._bases = BaseStore(self._tier.store, self._tier.root)
        self._saves = Saves(self.timeout, self._tier.unsettled)
        self._snapshots = Snapshotter()
        if _comm.rank() == 0:  # start watching the leases: a save judges them by it
            for lease in self._tier.leases:
                lease.observe()

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

    def wait(self) -> None:
        """Block until every save in flight is committed (with a local tier: durable on
        the remote root, every upload finished); raise the first error no handle's
        ``result()`` raised already. Not collective."""
        self._tier.retainer.settle()
        self._saves.wait()

    def close(self) -> None:
        """:meth:`wait`, then stop the background threads and free the staging buffers.
        The manager still saves (blocking or not) after it; its background gloo group is
        kept for that (freed with the default group at ``destroy_process_group``)."""
        try:
            self.wait()
        finally:
            self._saves.close()
            self._tier.close()
            self._tier.retainer.close()
            self._retainer.close()  # the same one without a local tier: closing is idempotent
            self._snapshots = Snapshotter()
            for lease in self._tier.leases:
                lease.release()

    # ---- listing ----------------------------------------------------------------------

    def steps(self) -> list[int]:
        """Committed steps, ascending (read by the caller alone, not collective); with a
        local tier, those committed in either tier."""
        return self._tier.steps()

    def latest_step(self) -> int | None:
        """The newest committed step whose manifest reads (a newer one that cannot be
        read is logged and skipped; when none can, its error is raised)."""
        return steps.newest_readable(self.steps(), self.manifest)

    def step_path(self, step: int) -> str:
        return manifest.step_path(self.root, step)

    def manifest(self, step: int) -> Manifest:
        """Committed ``step``'s manifest (with a local tier: the copy a load reads first)."""
        return self._tier.manifest(step)

    def latest_remote(self) -> int | None:
        """The newest step committed at the root itself (with a local tier: durable)."""
        remote = self.remote_steps()
        return remote[-1] if remote else None

    def remote_steps(self) -> list[int]:
        """Steps committed at the root itself (with a local tier: durable), ascending."""
        return steps.list_steps(self._store, self.root)

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
        req = SaveRequest(step=step, model=model, optimizer=optimizer, extra=extra,
                          merged=bool(merged), overwrite=overwrite, metrics=metrics)
        self._saves.settle_write()
        with _comm.operation(f"save of step {step}", self.timeout):
            return self._save(req, blocking)

    def _save(self, req: SaveRequest, blocking: bool) -> str | SaveHandle:
        start = time.perf_counter()
        for step, future in self._tier.before_save(req.step, req.overwrite):
            self._saves.track(step, future)
        if blocking:
            path, upload = self._stage(req, None)(start, None)
            if upload is not None:
                self._saves.track(req.step, upload)
            return path
        self._saves.start_background()
        self._snapshots.begin()
        finish = self._stage(req, self._snapshots.copy)
        self._snapshots.end()
        stall = time.perf_counter() - start
        if _comm.rank() == 0:
            logger.info("staged step %d (%.1f MB) in %.3f s; writing in the background",
                        req.step, self._snapshots.nbytes / 1e6, stall)
        return self._saves.write_in_background(req.step, functools.partial(finish, start),
                                               stall)

    def _stage(self, req: SaveRequest, snapshot) -> Callable[[float, Any], tuple]:
        """Everything of a save that reads model, optimizer and ``extra`` (collective on
        the caller's group: prepare, then every item's save: the base, factor gathers,
        training state), with what the writes will read copied by ``snapshot``
        (``None``: read in place, for a blocking save). Returns the writes and the
        commit, ``finish(start, group) -> (path, upload)``: collective on ``group``, the
        default one (``None``) for a blocking save, the background thread's own for an
        asynchronous one, which runs nothing else (``_comm.writes_only``); ``upload``:
        the tier's future that makes the step durable, or None."""
        tier = self._tier
        view = ModelView.of(req.model)
        tier.retainer.settle()  # the last retention's removals (rank 0): before any debris
        writer = StepWriter(tier.store, tier.root, req.step, fence=tier.lease)
        writer.prepare(overwrite=req.overwrite, bases=self._bases, lease=tier.lease)
        m = Manifest(step=req.step, world_size=_comm.world_size(), mesh=view.mesh(),
                     merge=self.options.merge, dtypes=view.dtypes(), items={},
                     metrics=req.metrics, ties=[list(g) for g in view.ties])
        ctx = SaveContext(view=view, optimizer=req.optimizer, extra=req.extra, store=tier.store,
                          manifest=m, merge=self.options.merge, merged=req.merged,
                          bases=self._bases, snapshotter=snapshot)
        writes = [(item.name, w) for item in self._items if (w := item.save(ctx)) is not None]
        del ctx

        def finish(start: float, group) -> tuple:
            while writes:  # each write's data is freed once written
                item, write = writes.pop(0)
                writer.write(item, write, group)
                del write
            writer.commit(m, group)
            _comm.on_rank0(self._retain, req.step, group=group)
            if _comm.rank() == 0:
                size = sum(f.size for f in m.files.values())
                logger.info("saved step %d (%.1f MB) in %.2f s", req.step, size / 1e6,
                            time.perf_counter() - start)
            return writer.path, tier.after_commit(req.step, m, req.overwrite)

        return finish

    def _retain(self, step: int) -> None:
        """Retention where the save committed, after its commit (rank 0); removals of
        data run on the retainer's thread."""
        self._tier.retainer.after_commit(f"step {step}", "the next save", defer=True)

    def prune(self, *, dry_run: bool = False) -> Decision:
        """Apply the root's retention policies now (``save`` does after every commit).

        Not collective: call it on one process only. Returns what was (or, with
        ``dry_run``, would be) done.
        """
        self.wait()
        check_root(self._store, self.root)
        if not dry_run:
            self._lease.acquire()  # a pruner writes too: never beside another job
        return self._retainer.run(dry_run=dry_run)

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
        skip = set(skip_per_rank)
        if not all(isinstance(s, str) for s in skip):
            raise ValueError(f"skip_per_rank={sorted(map(repr, skip))}: expected names (str)")
        if step is not None:
            _check_step(step)
        if init_from is not None and not isinstance(init_from, str):
            raise ValueError(f"init_from={init_from!r}: expected a path or URL (str)")
        req = LoadRequest(model=model, optimizer=optimizer, extra=extra, strict=strict,
                          hyperparams=hyperparams, skip_per_rank=skip, verify=verify)
        self._saves.settle_write()
        with _comm.operation("load" if step is None else f"load of step {step}", self.timeout):
            picked = _comm.on_rank0(self._pick, step)
            if picked is None:
                options = (self.options.storage_options if init_storage_options is None
                           else init_storage_options)
                return first_start(self.root, req, init_from, options, trusted=self.trusted)
            step, found = picked
            report = self._tier.read(step, found, functools.partial(self._load, req, step))
            for later, future in self._tier.after_load():
                self._saves.track(later, future)
            if init_from is not None:
                report.notes.append(f"resumed step {step}; init_from={init_from} not read")
            report.step = step
            return report

    def _pick(self, step: int | None) -> tuple[int, Any] | None:
        """Rank 0: the step to load and where (the tier says), or None."""
        check_root(self._store, self.root)
        return self._tier.find(step)

    def _load(self, req: LoadRequest, step: int, store: Storage, root: str) -> LoadReport:
        """Collective: read step ``step`` from ``root`` of ``store``, every item staged
        first, installed only once every read succeeded."""
        path = manifest.step_path(root, step)
        verify = req.verify

        def prepare() -> LoadContext:  # per-rank reads and checks, agreed on below
            m = steps.read_manifest(store, path)
            checked = store if verify is False else steps.verified_store(store, path, m)
            ctx = LoadContext(view=ModelView.of(req.model), optimizer=req.optimizer,
                              extra=req.extra, path=path, manifest=m, store=checked,
                              strict=req.strict, verify=verify, hyperparams=req.hyperparams,
                              skip_per_rank=req.skip_per_rank, trusted=self.trusted)
            for item in self._items:
                item.check(ctx)
            return ctx

        ctx = _comm.agreed(prepare)
        m = ctx.manifest
        # this rank's own files (same world size) are read from now on, beside the planning
        ahead = steps.read_ahead_own(ctx.store, path, m, [MODEL_DIR] + (
            [OPTIMIZER_DIR] if ctx.training else []), _comm.rank(), _comm.world_size())
        try:
            # Read everything first, install after: a failure halfway leaves the job
            # untouched.
            staged = Staged.combine([s for item in self._items
                                     if (s := item.stage(ctx)) is not None])
        finally:
            if ahead is not None:
                ahead.cancel()
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
        store, root = self._tier.where(step)  # with a local tier: the copy a load reads first
        return steps.verify_step(store, manifest.step_path(root, step), progress=progress)
