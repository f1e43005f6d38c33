"""A local tier in front of remote storage: steps commit to a local directory first and
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
import re
import time
from typing import Callable, cast

from dcp_universal import _comm
from dcp_universal.errors import (CheckpointError, CheckpointIOError, ManifestError,
                                  NotACheckpointError, StepAlreadyExistsError,
                                  UnsafeCheckpointError)
from dcp_universal.format import manifest
from dcp_universal.format.manifest import Manifest
from dcp_universal.storage import Storage, join, steps
from dcp_universal.storage.integrity import check_files
from dcp_universal.storage.local import LocalStorage

__all__ = ["LocalTier", "owner"]

logger = logging.getLogger(__name__)

_RANK_FILE = re.compile(r"^__(\d+)_")


def owner(rel: str, world: int) -> int:
    """The rank that uploads the file ``rel``: DCP names a rank's data files
    ``__<rank>_<n>.distcp`` (and their sums files follow); a job of another world size
    (uploading what an earlier job left) maps rank ``r`` to ``r % world``; shared files
    (``.metadata``, ...) are rank 0's."""
    m = _RANK_FILE.match(rel.rsplit("/", 1)[-1])
    return int(m.group(1)) % world if m else 0


class LocalTier:
    """The local directory in front of a remote root, and the uploads between them.

    Args:
        local / local_root: the local tier's storage and directory (a root of its own).
        remote / remote_root: the remote root (the source of truth).
        retain_remote: ``retain_remote()`` applies retention to the remote root (rank 0,
            after each remote commit).
        retries / backoff: each file's upload is tried ``1 + retries`` times, waiting
            ``backoff * 2**attempt`` seconds between tries.
        timeout: the upload thread's gloo group's timeout.
    """

    def __init__(self, local: LocalStorage, local_root: str, remote: Storage, remote_root: str, *,
                 retain_remote: Callable[[], None], retries: int = 3, backoff: float = 1.0,
                 timeout: float = _comm.DEFAULT_TIMEOUT_S, fence=None) -> None:
        self.local, self.local_root = local, local_root
        self.remote, self.remote_root = remote, remote_root
        self._retain_remote = retain_remote
        self.retries, self.backoff, self.timeout = retries, backoff, timeout
        self.fence = fence  # the remote root's writer lease: commits and removals there
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
