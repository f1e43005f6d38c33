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
The lease is released by ``close()`` and at interpreter exit. The file is written whole
(temp + rename locally, one PUT on an object store) and read back after writing, so of
two jobs racing for a free root one wins and the other is refused.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
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

    def _write(self) -> None:
        self.store.makedirs(self.root)
        self.store.write_atomic(self.path, json.dumps({
            "owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
            "started": _started(os.getpid()), "renewed_unix": time.time(),
            "ttl_s": self.ttl}).encode())

    def acquire(self) -> None:
        """Take or renew the lease; raise :class:`RootBusyError` if another live job
        holds it."""
        held = self._read()
        if held is not None and held.get("owner") != self.owner:
            age = time.time() - float(held.get("renewed_unix", 0))
            if age < float(held.get("ttl_s", self.ttl)) and not _gone(held):
                raise RootBusyError(
                    f"{self.root} is being written by another job (host "
                    f"{held.get('host')!r}, pid {held.get('pid')}, lease renewed {age:.0f} s "
                    "ago): two writers would delete each other's files -> save to another "
                    "root, or stop that job; if it is dead, its lease expires "
                    f"{max(0.0, float(held.get('ttl_s', self.ttl)) - age):.0f} s from now "
                    f"(or remove {self.path})")
            logger.warning("taking over the writer lease of %s from a job not seen for "
                           "%.0f s (host %s, pid %s)", self.root, age, held.get("host"),
                           held.get("pid"))
        self._write()
        again = self._read()
        if again is None or again.get("owner") != self.owner:
            raise RootBusyError(f"{self.root}: another job took the writer lease at the same "
                                "moment -> save to another root, or stop that job")
        if not self._held:
            self._held = True
            self._start_renewing()
            atexit.register(self.release)

    def _start_renewing(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, daemon=True,
                                        name="dcp-universal-lease")
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                held = self._read()
                if held is not None and held.get("owner") != self.owner:
                    logger.error("the writer lease of %s was taken by another job (host %s); "
                                 "this job's next save will be refused", self.root,
                                 held.get("host"))
                    return
                self._write()
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
