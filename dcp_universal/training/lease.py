"""One writer per root: a lease in ``<root>/writer.lease``, renewed while its job lives,
and a fence that stops a writer the moment it lost it.

Two jobs writing one root would delete each other's unfinished files and steps. So a
job that writes (saves, prunes) first takes the root's lease: a small JSON file naming
its owner and this acquisition (a random token), rewritten every ``ttl / 4`` seconds by
a daemon thread of rank 0 (each renewal changes its bytes: a counter). Readers (loads)
need no lease. The owner is the process: every manager of one process shares its lease.

Who is alive is judged without comparing clocks across hosts. Another job's lease is
abandoned when its bytes have not changed for ``ttl`` seconds *as seen by this process's
monotonic clock*: the manager watches the lease from its construction, and a save that
finds a lease it has not yet watched for ``ttl`` waits until it changes (its job is
alive: refused) or not (taken over). The wall-clock time in the file is for people
only. On this host a lease whose process is gone (pid free, or reused by a process
started later) is taken over at once, and one whose process lives is refused at once.

Races. A free root is taken by creating the file only if it does not exist
(:meth:`~dcp_universal.storage.Storage.create_new`: a hard link locally, a conditional
PUT on S3); of two jobs racing for it exactly one wins, and a loser that then finds the
lease gone again tries again. An abandoned lease is taken over by creating
``writer.lease.taken-<key>`` the same way first (``key`` names that acquisition), so of
two jobs taking over one dead holder exactly one wins. The winner reads the lease again
after creating the marker and backs off (removing it) if the bytes changed meanwhile: a
holder that renewed just after the last look is not taken over. So a marker is needed
only while its takeover is under way, and the holder removes the markers of earlier
acquisitions (and its own at release): a root that a job released holds no lease files.

Fencing. A writer that was paused (SIGSTOP, a long GC pause, a stalled NFS) past the ttl
may wake up after another job took over, in the middle of a save. Every commit and
every deletion it makes is fenced by its acquisition:

* on a local disk, by its fence directory ``writer.fence-<token>/``: a manifest is
  written there and renamed out of it, and a step or base is removed by renaming it
  into it (then deleted). Taking a lease over renames the old holder's fence directory
  away *first*, so each of the old holder's renames fails however long it was paused
  between its last check and the rename: the compare-and-set is the file system's;
* on object stores, which have no rename, the lease is read and compared right before
  each commit and deletion (:meth:`Lease.check`): a writer paused for ``ttl`` between
  that read and its PUT, a few milliseconds apart, is not stopped.

A writer that lost its lease raises :class:`~dcp_universal.RootBusyError` (on every
rank: the commit and retention run on rank 0 and tell the others) and commits and
removes nothing more; what it wrote is uncommitted debris the holder removes.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, NoReturn, cast

from dcp_universal.errors import RootBusyError
from dcp_universal.storage import Storage, join

__all__ = ["Lease", "LEASE_FILE", "FENCE_PREFIX"]

logger = logging.getLogger(__name__)

LEASE_FILE = "writer.lease"
FENCE_PREFIX = "writer.fence-"  # + the acquisition's token: the holder's fence directory
_FENCED_PREFIX = "writer.fenced-"  # a fence directory taken away from its holder
_OWNER = uuid.uuid4().hex  # this process
_RACES = 8  # a free root lost to a racer that released it again at once: look again


def _started(pid: int) -> str | None:
    """The process's start time (Linux ``/proc``), which tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


def _local_process(held: dict | None) -> bool | None:
    """Whether the holder's process lives, when it ran on this host: True (alive),
    False (its pid is free, or now belongs to a process started later), None (another
    host, or it cannot be told)."""
    if not held or held.get("host") != socket.gethostname():
        return None
    try:
        pid = int(cast(Any, held.get("pid")))  # none recorded: TypeError, below
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (TypeError, ValueError, OverflowError):
        return None
    started = _started(pid)
    if started is None or held.get("started") is None:
        return True
    return held.get("started") == started


def _parse(raw: bytes | None) -> dict | None:
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


class Lease:
    """The writer lease of ``root`` for this job (rank 0 only; not collective).

    Args:
        ttl: seconds a lease's bytes must stay unchanged, as watched by this process,
            before it counts as abandoned; the holder rewrites it every ``ttl / 4``.
    """

    def __init__(self, store: Storage, root: str, *, ttl: float) -> None:
        self.store, self.root, self.ttl = store, root, float(ttl)
        self.path = join(root, LEASE_FILE)
        self.owner = _OWNER
        self._acquired: str | None = None  # this holder's acquisition token
        self._renewals = 0
        self._held = False
        self._seen: tuple[bytes | None, float] | None = None  # (bytes, monotonic first seen)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- what the lease says ------------------------------------------------------------

    @property
    def token(self) -> str | None:
        """This acquisition's fencing token (recorded in the manifests it commits)."""
        return self._acquired

    @property
    def fence_dir(self) -> str:
        return join(self.root, f"{FENCE_PREFIX}{self._acquired}")

    def _raw(self) -> bytes | None:
        try:
            return self.store.read_bytes(self.path)
        except FileNotFoundError:
            return None

    def observe(self) -> None:
        """Start watching the lease (best effort): a later :meth:`acquire` counts the
        time it stayed unchanged from now."""
        try:
            self._note(self._raw())
        except Exception as e:  # the store is unreachable now: the save will say so
            logger.debug("could not read %s: %s", self.path, e)

    def _note(self, raw: bytes | None) -> float:
        """Seconds ``raw`` has been the lease's bytes as seen here (0 when new)."""
        now = time.monotonic()
        if self._seen is None or self._seen[0] != raw:
            self._seen = (raw, now)
        return now - self._seen[1]

    def _content(self) -> bytes:
        self._renewals += 1
        return json.dumps({
            "owner": self.owner, "acquired": self._acquired, "host": socket.gethostname(),
            "pid": os.getpid(), "started": _started(os.getpid()), "renewals": self._renewals,
            "renewed_unix": time.time(), "ttl_s": self.ttl}).encode()

    def _marker(self, held: dict | None, raw: bytes | None = None) -> str:
        """The file whose creation takes over the acquisition ``held`` (or, for a lease
        that cannot be read, those very bytes)."""
        if held is None:
            key = hashlib.sha256(raw or b"")
        else:  # a lease without "acquired" (an older writer's): that very renewal
            which = held.get("acquired") or f"{held.get('pid')}/{held.get('renewed_unix')}"
            key = hashlib.sha256(f"{held.get('owner')}/{which}".encode())
        return f"{self.path}.taken-{key.hexdigest()[:16]}"

    def _holder(self, held: dict | None, raw: bytes | None) -> str:
        if raw is None:
            return "nobody holds it"
        if held is None:
            return f"its holder cannot be read ({self.path} is not a lease: {raw[:60]!r})"
        which = f", acquisition {str(held['acquired'])[:12]}" if held.get("acquired") else ""
        return f"held by host {held.get('host')!r}, pid {held.get('pid')}{which}"

    def _busy(self, held: dict | None, raw: bytes | None, why: str) -> RootBusyError:
        return RootBusyError(
            f"{self.root} is being written by another job ({self._holder(held, raw)}; {why}): "
            "two writers would delete each other's files -> save to another root, or stop "
            f"that job; if it is dead, its lease is taken over once it has stayed unchanged "
            f"for lease_ttl={self.ttl:g} s as watched by the next job (or remove {self.path})")

    # ---- taking it ----------------------------------------------------------------------

    def acquire(self) -> None:
        """Take or renew the lease; raise :class:`RootBusyError` if another live job
        holds it. May wait up to ``ttl`` seconds watching a lease not yet watched that
        long (see the module docstring)."""
        for _ in range(_RACES):
            raw = self._raw()
            held = _parse(raw)
            if raw is None:
                if self._create():
                    break
                continue  # another job took the free root: look at its lease
            if held is not None and held.get("owner") == self.owner:  # this process's
                self._acquired = held.get("acquired")
                self._renew(f"renewing the writer lease of {self.root}")
                break
            alive = _local_process(held)
            if alive:
                raise self._busy(held, raw, "its process is running on this host")
            if alive is None:
                now = self._watch(raw)
                if now != raw:
                    if now is None:
                        continue  # released while watched: a free root
                    raise self._busy(_parse(now), now, "its lease was renewed while this "
                                     "job watched it")
            if self._take_over(held, raw):
                break
            raise self._busy(*self._read_both(), "it took over the abandoned lease at the "
                             "same moment")
        else:
            raise self._busy(*self._read_both(), f"the lease changed hands {_RACES} times "
                             "while this job tried to take it")
        self._clear_debris()
        if not self._held:
            self._held = True
            self._start_renewing()
            atexit.register(self.release)

    def _read_both(self) -> tuple[dict | None, bytes | None]:
        raw = self._raw()
        return _parse(raw), raw

    def _watch(self, raw: bytes) -> bytes | None:
        """Wait until ``raw`` has stayed the lease's bytes for ``ttl`` seconds as seen
        here (returns ``raw``), or until they change (returns the new bytes)."""
        poll = max(0.02, min(self.ttl / 8, 2.0))
        idle = self._note(raw)
        if idle < self.ttl:
            logger.info("%s holds a lease not seen before; watching it for up to %.0f s "
                        "(lease_ttl) to tell whether its job is alive", self.path,
                        self.ttl - idle)
        while idle < self.ttl:
            time.sleep(min(poll, self.ttl - idle))
            now = self._raw()
            if now != raw:
                self._note(now)
                return now
            idle = self._note(raw)
        return raw

    def _create(self) -> bool:
        """Take a free root: the fence directory first, then the lease, created only
        if absent."""
        self._acquired = uuid.uuid4().hex
        self.store.makedirs(self.root)
        self.store.makedirs(self.fence_dir)
        if self.store.create_new(self.path, self._content()):
            return True
        self.store.remove_tree(self.fence_dir)
        return False

    def _take_over(self, held: dict | None, raw: bytes) -> bool:
        self._acquired = uuid.uuid4().hex
        marker = self._marker(held, raw)
        if not self.store.create_new(marker, self._content()):
            return False
        if self._raw() != raw:  # renewed after the last look, or taken over and cleared
            self.store.remove_file(marker)  # a live holder must not read it as lost
            return False
        # fence the old holder off before anything else: its renames fail from now on
        old = (held or {}).get("acquired")
        if isinstance(old, str) and old and "/" not in old:
            fenced = f"{_FENCED_PREFIX}{old}-{uuid.uuid4().hex[:8]}"
            self.store.rename_dir(join(self.root, f"{FENCE_PREFIX}{old}"),
                                  join(self.root, fenced))
        logger.warning("took over the writer lease of %s from a job whose lease did not "
                       "change for %.0f s (%s)", self.root, self.ttl, self._holder(held, raw))
        self.store.makedirs(self.fence_dir)
        self.store.write_atomic(self.path, self._content())
        return True

    # ---- holding it ---------------------------------------------------------------------

    def check(self, what: str) -> None:
        """Raise :class:`RootBusyError` unless this acquisition still holds the lease
        (read now), naming ``what`` was refused."""
        raw = self._raw()
        held = _parse(raw)
        if held is None or held.get("owner") != self.owner \
                or held.get("acquired") != self._acquired \
                or self.store.exists(self._marker(held)):
            self.lost(what, held, raw)

    def lost(self, what: str, held: dict | None = None, raw: bytes | None = None) -> NoReturn:
        """Raise the error of a writer that lost its lease before ``what``."""
        if raw is None and held is None:
            try:
                held, raw = self._read_both()
            except Exception:  # the store cannot tell: say so
                raw = b"(unreadable)"
        raise RootBusyError(
            f"this job no longer holds the writer lease of {self.root} (it was not renewed "
            f"for lease_ttl={self.ttl:g} s, e.g. the process was paused, and another job "
            f"took it over; now {self._holder(held, raw)}): refused {what}. Nothing was "
            "committed or removed after the lease was lost -> stop this job; the root "
            "belongs to the other one")

    def _renew(self, what: str) -> None:
        if self.store.renames and not self.store.exists(self.fence_dir):
            self.lost(what)
        self.store.fenced_write(self.path, self._content(), self)

    def _clear_debris(self) -> None:
        """Holding the lease: remove temporary lease files of killed writers, takeover
        markers of acquisitions that are over, and their fence directories (their holders
        are fenced). The marker that would take over this acquisition stays: it tells
        :meth:`check` that another job is taking the root."""
        mine = f"{FENCE_PREFIX}{self._acquired}"
        against_me = self._marker({"owner": self.owner, "acquired": self._acquired})
        for name in self.store.listdir(self.root):
            path = join(self.root, name)
            if name.startswith(LEASE_FILE + ".") and name.endswith(".tmp"):
                self.store.remove_file(path)
            elif name.startswith(LEASE_FILE + ".taken-") and path != against_me:
                # a racer that looked at the old lease re-reads it after creating one
                self.store.remove_file(path)
            elif (name.startswith(FENCE_PREFIX) and name != mine) \
                    or name.startswith(_FENCED_PREFIX):
                self.store.remove_tree(join(self.root, name))

    def _start_renewing(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, daemon=True,
                                        name="dcp-universal-lease")
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self._renew("renewing the writer lease")
            except RootBusyError as e:
                logger.error("%s; this job's next save is refused", e)
                return
            except Exception as e:  # a flaky store: the next round tries again
                logger.warning("renewing the writer lease of %s failed: %s", self.root, e)

    def release(self) -> None:
        """Stop renewing; remove the lease and the fence if they are still this job's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._held:
            self._held = False
            try:
                held = _parse(self._raw())
                if held is not None and held.get("owner") == self.owner \
                        and held.get("acquired") == self._acquired:
                    self._clear_debris()
                    self.store.remove_file(self.path)
                    self.store.remove_tree(self.fence_dir)
            except Exception as e:  # the store is gone (exit): the lease expires by itself
                logger.warning("could not remove the writer lease %s (%s: %s); the next "
                               "job takes it over once it stayed unchanged for %.0f s",
                               self.path, type(e).__name__, e, self.ttl)

