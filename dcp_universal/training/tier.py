"""Tiers: where a manager's saves commit and where its loads look first.

:class:`Tier` is the protocol the manager talks to; :class:`RootTier` is the root
itself, :class:`LocalTier` a local directory in front of it (a RAM or a peer tier would
be one more implementation, and the manager would not change).

A local tier in front of remote storage: steps commit to a local directory first and
are uploaded in the background (``CheckpointManager(root, local_dir=...)``).

A save writes and commits the step under ``local_dir`` exactly as under any root (the
training loop waits for a local save only); then :meth:`LocalTier.upload`, on a thread of
its own with a gloo group of its own, copies it to the remote root:

    every rank, agreed:  verify and upload the files it wrote (``__<rank>_*`` names;
                         shared files: rank 0), retrying each ``retries`` times
    rank 0, told:        the base's ``files.json`` when the base was new, then the
                         step's ``manifest.json``, last (the remote commit), then the
                         remote root's retention

So a remote step is committed only once every file is there (a kill at any point leaves
the remote root with its last committed step and some debris, which the next upload of
that step replaces), and an upload that keeps failing raises on every rank (the step
stays committed locally, and local retention keeps it).

Loads take the newest step committed in either tier; a step whose local copy is
committed and whole on every rank is read locally (every byte checked, as every load),
otherwise from the remote root. Local steps newer than the remote root's newest (a job
killed before their upload finished) are uploaded by the next job, before its first
save's.

Uploads are collective on the upload thread's group: every rank submits the same
uploads in the same order, which every save and load call keeps (they are collective).
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import os
import re
import time
from typing import Any, Callable, cast

from dcp_universal import _comm
from dcp_universal.errors import (CheckpointError, CheckpointIOError, IntegrityError,
                                  ManifestError, NotACheckpointError, StepAlreadyExistsError,
                                  UnsafeCheckpointError)
from dcp_universal.format import manifest
from dcp_universal.format.manifest import Manifest
from dcp_universal.model.plan import LoadReport
from dcp_universal.storage import Storage, join, normalize, steps, storage_for
from dcp_universal.storage.integrity import check_files
from dcp_universal.storage.local import LocalStorage
from dcp_universal.training import retention
from dcp_universal.training.commit import refuse_committed
from dcp_universal.training.lease import Lease

__all__ = ["Tier", "RootTier", "LocalTier", "local_tier", "owner"]

#: reads one step into the job from ``(store, root)``: the manager's load
Read = Callable[[Storage, str], LoadReport]

logger = logging.getLogger(__name__)

_RANK_FILE = re.compile(r"^__(\d+)_")


def owner(rel: str, world: int) -> int:
    """The rank that uploads the file ``rel``: DCP names a rank's data files
    ``__<rank>_<n>.distcp`` (and their sums files follow); a job of another world size
    (uploading what an earlier job left) maps rank ``r`` to ``r % world``; shared files
    (``.metadata``, ...) are rank 0's."""
    m = _RANK_FILE.match(rel.rsplit("/", 1)[-1])
    return int(m.group(1)) % world if m else 0


class Tier:
    """Where a manager's saves write and commit, and where its loads read first.

    Attributes:
        store / root: where a save writes and commits.
        lease: the writer lease a save takes (``root``'s).
        leases: every lease the tier holds (released at ``close``).
        retainer: retention of ``root`` after each save's commit.

    Collective methods are called by every rank in the same order (the manager's
    ``save`` and ``load`` are collective); the others by one process.
    """

    store: Storage
    root: str
    lease: Lease
    leases: list[Lease]
    retainer: retention.Retainer

    def steps(self) -> list[int]:
        """The committed steps a load can read, ascending (not collective)."""
        raise NotImplementedError

    def where(self, step: int) -> tuple[Storage, str]:
        """``(store, root)`` of the copy of committed ``step`` a reader takes first."""
        raise NotImplementedError

    def manifest(self, step: int) -> Manifest:
        store, root = self.where(step)
        return steps.read_manifest(store, manifest.step_path(root, step))

    def find(self, step: int | None) -> tuple[int, Any] | None:
        """Rank 0: the step to load (``None``: the newest whose manifest reads) and what
        :meth:`read` needs to know about it, or None when there is none.

        Raises:
            NotACheckpointError: ``step`` is not committed.
        """
        picked = self._pick(step, self.steps(), self.root)
        return None if picked is None else (picked, None)

    def _pick(self, step: int | None, found: list[int], root: str) -> int | None:
        """``step`` if it is in ``found`` (committed steps under ``root``), the newest of
        them whose manifest reads when None, or None when there is none."""
        if step is None:
            return steps.newest_readable(found, self.manifest)
        if step not in found:
            raise NotACheckpointError(f"step={step} is not a committed step under "
                                      f"{root}; committed: {found}")
        return step

    def read(self, step: int, found: Any, load: Read) -> LoadReport:
        """Collective: ``load`` the step from the copy to read (``found``: what
        :meth:`find` told every rank)."""
        return load(self.store, self.root)

    def before_save(self, step: int, overwrite: bool
                    ) -> list[tuple[int, concurrent.futures.Future]]:
        """Collective, before a save of ``step`` writes anything; returns background
        work it started (step, future)."""
        return []

    def after_commit(self, step: int, m: Manifest, overwrite: bool
                     ) -> concurrent.futures.Future | None:
        """After the save's commit (every rank): background work that makes the step
        durable, whose result is the step's durable path; None: it is durable."""
        return None

    def after_load(self) -> list[tuple[int, concurrent.futures.Future]]:
        """Collective, after a load; returns background work it started."""
        return []

    def unsettled(self, step: int) -> str:
        """What a failed save of ``step`` nobody waited for means (said at exit)."""
        return f"the asynchronous save of step {step} under {self.root} failed and is not committed"

    def close(self) -> None:
        """Stop background work (after the manager waited for it)."""


class RootTier(Tier):
    """The root itself: saves commit there, loads read there."""

    def __init__(self, store: Storage, root: str, lease: Lease,
                 retainer: retention.Retainer) -> None:
        self.store, self.root, self.lease, self.retainer = store, root, lease, retainer
        self.leases = [lease]

    def steps(self) -> list[int]:
        return steps.list_steps(self.store, self.root)

    def where(self, step: int) -> tuple[Storage, str]:
        return self.store, self.root


def check_apart(local: LocalStorage, local_root: str, store: Storage, root: str) -> None:
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


def local_tier(local_dir: Any, keep_last_local: Any, root: RootTier, *,
               timeout: float) -> "LocalTier":
    """The local tier ``local_dir`` in front of the root tier ``root``; its retention
    keeps ``keep_last_local`` newest steps (None: the root's policies), never one not
    yet uploaded. Validates both arguments (ValueError)."""
    if not isinstance(local_dir, str) or not local_dir:
        raise ValueError(f"local_dir={local_dir!r}: expected a local directory (str)"
                         + (" for keep_last_local" if local_dir is None else ""))
    local_root = normalize(local_dir)
    local = storage_for(local_root)
    if not isinstance(local, LocalStorage):
        raise ValueError(f"local_dir={local_dir!r}: expected a local directory, not a URL "
                         "(the local tier is the node's own disk)")
    check_apart(local, local_root, root.store, root.root)
    if keep_last_local is not None:
        retention.check_count("keep_last_local", keep_last_local,
                              " (or None: the root's own retention policies)")
        policies: list[retention.RetentionPolicy] = [retention.KeepLast(keep_last_local)]
    else:
        policies = root.retainer.policies
    # a save takes the local tier's lease only; uploads take the root's (so an
    # unreachable remote never holds up a local commit)
    return LocalTier(local, local_root, root.store, root.root, fence=root.lease,
                     lease=Lease(local, local_root, ttl=root.lease.ttl), policies=policies,
                     retain_remote=functools.partial(root.retainer.after_commit,
                                                     f"an upload to {root.root}",
                                                     "the next upload"),
                     timeout=timeout)


class LocalTier(Tier):
    """The local directory in front of a remote root, and the uploads between them.

    Args:
        local / local_root: the local tier's storage and directory (a root of its own).
        remote / remote_root: the remote root (the source of truth).
        retain_remote: ``retain_remote()`` applies retention to the remote root (rank 0,
            after each remote commit).
        retries / backoff: each file's upload is tried ``1 + retries`` times, waiting
            ``backoff * 2**attempt`` seconds between tries.
        timeout: the upload thread's gloo group's timeout.
        fence: the remote root's writer lease (its uploads' commits and removals).
        lease / policies: the local directory's own lease and retention policies (the
            local steps not yet uploaded are always kept).
    """

    def __init__(self, local: LocalStorage, local_root: str, remote: Storage, remote_root: str, *,
                 retain_remote: Callable[[], None], retries: int = 3, backoff: float = 1.0,
                 timeout: float = _comm.DEFAULT_TIMEOUT_S, fence: Lease | None = None,
                 lease: Lease | None = None,
                 policies: list[retention.RetentionPolicy] | None = None) -> None:
        self.local, self.local_root = local, local_root
        self.store, self.root = local, local_root
        self.remote, self.remote_root = remote, remote_root
        self._retain_remote = retain_remote
        self.retries, self.backoff, self.timeout = retries, backoff, timeout
        self.fence = fence  # the remote root's writer lease: commits and removals there
        self.lease = lease if lease is not None else Lease(
            local, local_root, ttl=fence.ttl if fence is not None else 120.0)
        self.leases = [x for x in (fence, self.lease) if x is not None]
        self.retainer = retention.Retainer(local, local_root, policies or [], fence=self.lease,
                                           protect=self.not_durable)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._group = None
        self.durable: set[int] | None = None  # steps committed remotely (None: not listed yet)
        self.pending: dict[int, concurrent.futures.Future] = {}
        self._recovered = False

    # ---- what is where ------------------------------------------------------------------

    def remote_steps(self) -> list[int]:
        return steps.list_steps(self.remote, self.remote_root)

    def local_steps(self) -> list[int]:
        return steps.list_steps(self.local, self.local_root)

    def not_durable(self) -> set[int]:
        """Local steps not (known to be) committed remotely: local retention keeps them
        (rank 0). A remote that cannot be listed now makes every local step one."""
        if self.durable is None:
            try:
                self.durable = set(self.remote_steps())
            except (OSError, CheckpointIOError) as e:
                logger.warning("could not list %s (%s: %s): local retention keeps every "
                               "local step for now", self.remote_root, type(e).__name__, e)
                return set(self.local_steps())
        return set(self.local_steps()) - self.durable

    def local_copy_whole(self, step: int) -> bool:
        """Whether this rank sees the local copy of ``step`` committed and every file
        (and its base's) there with its recorded size (not collective)."""
        path = manifest.step_path(self.local_root, step)
        try:
            m = steps.read_manifest(self.local, path)
            check_files(self.local, path, m.files)
            if m.base:
                check_files(self.local, cast(str, manifest.base_path(path, m)), m.base_files or {})
        except (CheckpointError, OSError):
            return False
        return True

    # ---- the tier protocol --------------------------------------------------------------

    def steps(self) -> list[int]:
        """Committed in either tier, each listed once."""
        return sorted(set(self.remote_steps()) | set(self.local_steps()))

    def where(self, step: int) -> tuple[Storage, str]:
        """The local copy when committed there, else the root's."""
        if self.local.exists(join(manifest.step_path(self.local_root, step), manifest.MANIFEST)):
            return self.local, self.local_root
        return self.remote, self.remote_root

    def find(self, step: int | None) -> tuple[int, tuple[bool, bool]] | None:
        """Also whether the step is committed locally and at the root (rank 0 tells)."""
        local, remote = self.local_steps(), self.remote_steps()
        picked = self._pick(step, sorted(set(local) | set(remote)), self.remote_root)
        return None if picked is None else (picked, (picked in local, picked in remote))

    def read(self, step: int, found: tuple[bool, bool], load: Read) -> LoadReport:
        """From the local tier when its copy is committed and whole on every rank (then
        every byte read is checked as always; a failed check falls back to the root),
        else from the root."""
        local, remote = found
        if not local:
            return load(self.remote, self.remote_root)
        if not _comm.all_true(self.local_copy_whole(step)):
            if not remote:
                newest = self.remote_steps()
                raise IntegrityError(
                    f"step {step} is committed only in the local tier, and its copy is not "
                    f"whole on every rank (node-local disks of several nodes?) and not at "
                    f"{self.remote_root} yet -> load it on the node(s) that wrote it, or "
                    f"load step={newest[-1] if newest else None} from the root")
            report = load(self.remote, self.remote_root)
            report.notes.append(f"read step {step} from {self.remote_root}: its local copy "
                                "is not whole on every rank")
            return report
        try:
            report = load(self.local, self.local_root)
        except IntegrityError as e:
            if not remote:
                raise
            logger.warning("the local copy of step %d fails its check (%s); reading it from "
                           "%s", step, e, self.remote_root)
            report = load(self.remote, self.remote_root)
            report.notes.append(f"read step {step} from {self.remote_root}: its local copy "
                                f"failed its check ({e})")
            return report
        report.notes.append(f"read step {step} from the local tier {self.local_root}")
        return report

    def before_save(self, step: int, overwrite: bool
                    ) -> list[tuple[int, concurrent.futures.Future]]:
        """Uploads a killed job left are queued first; a step committed at the root is
        refused unless ``overwrite`` (its upload would refuse it later)."""
        started = self.recover()
        if not overwrite:
            _comm.on_rank0(self._refuse_durable, step)
        return started

    def _refuse_durable(self, step: int) -> None:
        path = manifest.step_path(self.remote_root, step)
        try:
            refuse_committed(self.remote, step, path)
        except (OSError, CheckpointIOError) as e:  # the upload checks again
            logger.warning("could not tell whether step %d is committed at %s (%s: %s); "
                           "saving it locally, its upload checks again", step,
                           self.remote_root, type(e).__name__, e)

    def after_commit(self, step: int, m: Manifest, overwrite: bool
                     ) -> concurrent.futures.Future | None:
        return self.submit(step, m, overwrite=overwrite)

    def after_load(self) -> list[tuple[int, concurrent.futures.Future]]:
        return self.recover()  # local steps a killed job did not upload

    def unsettled(self, step: int) -> str:
        return f"the save of step {step} failed and is not durable at {self.remote_root}"

    # ---- uploads ------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        return self._pool is not None

    def start(self) -> None:
        """Collective on the caller's thread (the upload group is made there): the
        upload thread, once."""
        if self._pool is None:
            self._group = self._group or _comm.new_gloo_group(self.timeout)
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="dcp-universal-upload")

    def submit(self, step: int, m: Manifest, *, overwrite: bool = False
               ) -> concurrent.futures.Future:
        """Queue the upload of the committed local step ``step`` (manifest ``m``); the
        future's result is the remote step path. Every rank, same order, after
        :meth:`start`. A step committed remotely meanwhile is replaced only when
        ``overwrite``."""
        assert self._pool is not None, "LocalTier.start() first"

        def run() -> str:
            with _comm.writes_only(self._group), _comm.operation(
                    f"upload of step {step}", group=self._group):
                return self.upload(step, m, self._group, overwrite=overwrite)

        future = self._pool.submit(run)
        self.pending[step] = future
        future.add_done_callback(functools.partial(self._done, step))
        return future

    def _done(self, step: int, future: concurrent.futures.Future) -> None:
        if self.pending.get(step) is future and future.exception() is None:
            del self.pending[step]
            if self.durable is not None:
                self.durable.add(step)

    def recover(self) -> list[tuple[int, concurrent.futures.Future]]:
        """Queue the uploads of local steps newer than the remote root's newest (left by
        a job killed before they were uploaded), oldest first. Collective (rank 0
        decides); once per manager."""
        if self._recovered:
            return []

        def missing() -> list[tuple[int, Manifest]] | None:
            try:
                remote = self.remote_steps()
            except (OSError, CheckpointIOError) as e:  # the next save looks again
                logger.warning("could not list %s (%s: %s): uploads of local steps an "
                               "earlier job left wait for the next save", self.remote_root,
                               type(e).__name__, e)
                return None
            newest = remote[-1] if remote else -1
            self.durable = set(remote)
            todo = []
            for s in self.local_steps():
                if s <= newest or s in self.pending:
                    continue
                try:
                    todo.append((s, steps.read_manifest(
                        self.local, manifest.step_path(self.local_root, s))))
                except (ManifestError, UnsafeCheckpointError, NotACheckpointError) as e:
                    # as loads and retention do: skipped and kept, never failing every
                    # later save and load of the job
                    logger.warning("local step %d is not uploaded: its manifest under %s "
                                   "cannot be read (%s: %s)", s, self.local_root,
                                   type(e).__name__, e)
            return todo

        self.start()
        todo = _comm.on_rank0(missing)
        if todo is None:
            return []
        self._recovered = True
        if todo and _comm.rank() == 0:
            logger.info("uploading %d local step(s) missing under %s: %s", len(todo),
                        self.remote_root, [s for s, _ in todo])
        return [(s, self.submit(s, m)) for s, m in todo]

    def upload(self, step: int, m: Manifest, group, *, overwrite: bool = False) -> str:
        """Copy the committed local step to the remote root and commit it there.
        Collective on ``group`` (see the module docstring)."""
        local_dir = manifest.step_path(self.local_root, step)
        remote_dir = manifest.step_path(self.remote_root, step)
        start = time.perf_counter()
        # rank 0 decides for every rank whether the base goes up with this step
        new_base = _comm.on_rank0(self._retried, step, f"preparing {remote_dir}",
                                  self._prepare, step, remote_dir, m, overwrite, group=group)
        dirs = [(local_dir, remote_dir, m.files)]
        if new_base:
            # new_base: the step names a base
            dirs.append((cast(str, manifest.base_path(local_dir, m)),
                         cast(str, manifest.base_path(remote_dir, m)),
                         m.base_files or {}))

        def push() -> None:
            me, world = _comm.rank(), _comm.world_size()
            for src_dir, dst_dir, records in dirs:
                mine = {rel: rec for rel, rec in records.items() if owner(rel, world) == me}
                # never upload damaged bytes: the local files are read whole and checked
                check_files(self.local, src_dir, mine, checksums=True)
                for rel in sorted(mine):
                    self._put(step, join(src_dir, rel), join(dst_dir, rel))

        _comm.agreed(push, group=group)
        _comm.on_rank0(self._commit, step, m, remote_dir, new_base, group=group)
        if _comm.rank() == 0:
            size = sum(r.size for r in m.files.values())
            logger.info("step %d is durable at %s (%.1f MB uploaded in %.2f s)", step,
                        remote_dir, size / 1e6, time.perf_counter() - start)
        return remote_dir

    def _prepare(self, step: int, remote_dir: str, m: Manifest, overwrite: bool) -> bool:
        """Take the remote root's writer lease; remove what an earlier, killed upload of
        this step left (a committed step only when ``overwrite``); returns whether the
        step's base is missing at the root (it is then uploaded with the step)."""
        if self.fence is not None:
            self.fence.acquire()
        if not overwrite and self.remote.exists(join(remote_dir, manifest.MANIFEST)):
            raise StepAlreadyExistsError(
                f"step {step} was committed at {remote_dir} by another save while this one "
                f"was written locally; it stays committed under {self.local_root} only -> "
                "save under another step number, or with overwrite=True")
        steps.remove_step(self.remote, remote_dir, fence=self.fence)
        return bool(m.base) and not self.remote.exists(
            join(cast(str, manifest.base_path(remote_dir, m)), manifest.BASE_FILES))

    def _put(self, step: int, src: str, dst: str) -> None:
        self._retried(step, f"uploading {src} to {dst}", self.remote.upload,
                      self.local.os_path(src), dst)

    def _retried(self, step: int, doing: str, fn: Callable, *args):
        """``fn(*args)``, tried ``1 + retries`` times while the store fails."""
        for attempt in range(self.retries + 1):
            try:
                return fn(*args)
            except (OSError, CheckpointIOError) as e:
                if attempt == self.retries:
                    raise CheckpointIOError(
                        f"{doing} failed {attempt + 1} times ({type(e).__name__}: {e}); step "
                        f"{step} is committed locally under {self.local_root} and not "
                        "remotely (local retention keeps it) -> check the remote store; the "
                        "next job's load or save uploads it") from e
                wait = self.backoff * 2 ** attempt
                logger.warning("%s failed (%s: %s); retrying in %.1f s", doing,
                               type(e).__name__, e, wait)
                time.sleep(wait)

    def _commit(self, step: int, m: Manifest, remote_dir: str, new_base: bool) -> None:
        try:
            if new_base:
                steps.write_base_files(self.remote, cast(str, manifest.base_path(remote_dir, m)),
                                       m.base_files or {})
            check_files(self.remote, remote_dir, m.files)  # every rank's files arrived
            # only while this job holds the remote root (the manifest stays the local
            # one, byte for byte: it names the local commit's writer)
            self.remote.fenced_write(join(remote_dir, manifest.MANIFEST),
                                     m.to_json().encode(), self.fence)
        except OSError as e:
            raise CheckpointIOError(f"committing the upload of step {step} at {remote_dir} "
                                    f"failed ({type(e).__name__}: {e}); it stays committed "
                                    "locally") from e
        self._retain_remote()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
