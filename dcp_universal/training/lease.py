"""One writer per root: a lease in ``<root>/writer.lease``, renewed while its job lives.

Two jobs writing one root would delete each other's unfinished files (each save
removes debris it takes for a crashed save's). So a job that writes (saves, prunes)
first takes the root's lease: a small JSON file naming its owner, renewed every
``ttl / 4`` seconds by a daemon thread of rank 0. Another job finding a live lease is
refused with the owner's host and pid; a lease not renewed for ``ttl`` seconds (its job
crashed or was killed) is taken over. Readers (loads) need no lease.

The owner is the process (every manager of one process shares its lease). A lease whose
process is gone is taken over at once when it is on this host (a job restarted by
torchrun on the same node resumes without waiting); from another host, after ``ttl``.
The lease is released by ``close()`` and at interpreter exit.

Races. A free root is taken by creating the file only if it does not exist
(:meth:`~dcp_universal.storage.Storage.create_new`: a hard link locally, a conditional
PUT on S3), so of two jobs racing for it exactly one wins. An abandoned lease is taken
over by creating ``writer.lease.taken-<key>`` the same way first (``key`` names that
holder's acquisition), so of two jobs taking over the same dead holder exactly one wins;
the holder, if it was only slow, sees the marker before its next renewal and stops
renewing, and its next save is refused. The winner then rewrites ``writer.lease``.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import hashlib
import socket
import threading
import time
import uuid

from dcp_universal.errors import RootBusyError
from dcp_universal.storage import Storage, join

__all__ = ["Lease", "LEASE_FILE"]

logger = logging.getLogger(__name__)

LEASE_FILE = "writer.lease"
_OWNER = uuid.uuid4().hex  # this process


def _started(pid: int) -> str | None:
    """The process's start time (Linux ``/proc``), which tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


def _gone(held: dict) -> bool:
    """The holder's process is known dead: it ran on this host and its pid is free, or
    now belongs to a process started later."""
    if held.get("host") != socket.gethostname():
        return False
    try:
        pid = int(held.get("pid"))
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, TypeError, ValueError, OverflowError):
        return False
    started = _started(pid)
    return started is not None and held.get("started") not in (None, started)


class Lease:
    """The writer lease of ``root`` for this job (rank 0 only; not collective).

    Args:
        ttl: seconds without renewal after which a lease counts as abandoned.
    """

    def __init__(self, store: Storage, root: str, *, ttl: float) -> None:
        self.store, self.root, self.ttl = store, root, float(ttl)
        self.path = join(root, LEASE_FILE)
        self.owner = _OWNER
        self._acquired: str | None = None  # this holder's acquisition (kept by renewals)
        self._held = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict | None:
        try:
            data = json.loads(self.store.read_bytes(self.path))
            return data if isinstance(data, dict) else None
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):  # torn or foreign: treat as abandoned
            return None

    def _content(self) -> bytes:
        return json.dumps({
            "owner": self.owner, "acquired": self._acquired, "host": socket.gethostname(),
            "pid": os.getpid(), "started": _started(os.getpid()), "renewed_unix": time.time(),
            "ttl_s": self.ttl}).encode()

    def _marker(self, held: dict) -> str:
        """The file whose creation takes over the acquisition ``held``."""
        # a lease without "acquired" (an older writer's): that very renewal
        which = held.get("acquired") or f"{held.get('pid')}/{held.get('renewed_unix')}"
        key = hashlib.sha256(f"{held.get('owner')}/{which}".encode())
        return f"{self.path}.taken-{key.hexdigest()[:16]}"

    def _busy(self, held: dict | None, why: str = "") -> RootBusyError:
        held = held or {}
        age = time.time() - float(held.get("renewed_unix", 0) or 0)
        ttl = float(held.get("ttl_s", self.ttl) or self.ttl)
        return RootBusyError(
            f"{self.root} is being written by another job (host {held.get('host')!r}, pid "
            f"{held.get('pid')}, lease renewed {age:.0f} s ago{why}): two writers would "
            "delete each other's files -> save to another root, or stop that job; if it is "
            f"dead, its lease expires {max(0.0, ttl - age):.0f} s from now (or remove "
            f"{self.path})")

    def acquire(self) -> None:
        """Take or renew the lease; raise :class:`RootBusyError` if another live job
        holds it."""
        held = self._read()
        if held is not None and held.get("owner") == self.owner:  # this process's
            self._acquired = held.get("acquired")
            if self.store.exists(self._marker(held)):
                raise self._busy(None, "; this job's lease was taken over after it was not "
                                 "renewed for its ttl")
            self.store.write_atomic(self.path, self._content())
        elif held is None:
            self._acquired = uuid.uuid4().hex
            self.store.makedirs(self.root)
            if not self.store.create_new(self.path, self._content()):
                raise self._busy(self._read(), "; it took the lease at the same moment")
        else:
            age = time.time() - float(held.get("renewed_unix", 0) or 0)
            if age < float(held.get("ttl_s", self.ttl) or self.ttl) and not _gone(held):
                raise self._busy(held)
            self._acquired = uuid.uuid4().hex
            if not self.store.create_new(self._marker(held), self._content()):
                raise self._busy(self._read(), "; it took over the abandoned lease at the "
                                 "same moment")
            logger.warning("took over the writer lease of %s from a job not seen for %.0f s "
                           "(host %s, pid %s)", self.root, age, held.get("host"),
                           held.get("pid"))
            self.store.write_atomic(self.path, self._content())
        self._clear_debris()
        if not self._held:
            self._held = True
            self._start_renewing()
            atexit.register(self.release)

    def _clear_debris(self) -> None:
        """Holding the lease: remove temporary lease files of killed writers (on disk)."""
        prefix = LEASE_FILE + "."
        for name in self.store.listdir(self.root):
            if name.startswith(prefix) and name.endswith(".tmp"):
                self.store.remove_file(join(self.root, name))

    def _start_renewing(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, daemon=True,
                                        name="dcp-universal-lease")
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                held = self._read()
                if held is None or held.get("owner") != self.owner \
                        or self.store.exists(self._marker(held)):
                    logger.error("the writer lease of %s was released or taken by another job "
                                 "(%s); this job's next save takes it again or is refused",
                                 self.root, "none" if held is None else held.get("host"))
                    return
                self.store.write_atomic(self.path, self._content())
            except Exception as e:  # a flaky store: the next round tries again
                logger.warning("renewing the writer lease of %s failed: %s", self.root, e)

    def release(self) -> None:
        """Stop renewing and remove the lease if it is still this job's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._held:
            self._held = False
            try:
                held = self._read()
                if held is not None and held.get("owner") == self.owner:
                    self.store.remove_file(self.path)
            except Exception as e:  # the store is gone (exit): the lease expires by itself
                logger.warning("could not remove the writer lease %s (%s: %s); it expires "
                               "%.0f s after its last renewal", self.path, type(e).__name__,
                               e, self.ttl)
