"""Local loads' read-ahead: the byte ranges a load will read, faulted into memory in file
order on a thread of their own while the load plans and copies, each block checked as
it arrives (:class:`ReadAhead`).

Measured on this project's machine (2 gloo ranks, 452 MB of state, cold page cache,
paired rounds): a resume's ``mgr.load`` took 0.30 s with it against 0.41 s through the
maps alone; warm, the same. Used by :class:`~dcp_universal.storage.mapped.MappedReader`
(the ranges of its plan, from the moment the plan is known) and by
:func:`~dcp_universal.storage.steps.read_ahead_own` (a rank's own files, from the start
of a load at the saved world size).
"""

from __future__ import annotations

import functools
import mmap
import os
import threading
from typing import Callable

from dcp_universal.storage.checksums import ALGO, checksum_fn

__all__ = ["read_ahead", "ReadAhead", "in_memory", "READ_AHEAD_BYTES", "READ_AHEAD_GAP",
           "READ_AHEAD"]

#: a load's byte ranges are read ahead in file order, in reads of this size
READ_AHEAD_BYTES = 8 << 20
#: ranges of one file closer than this are read as one (the gap too: no seek between)
READ_AHEAD_GAP = 1 << 20
#: False: loads read through their maps alone (benchmarks compare both)
READ_AHEAD = True


def read_ahead(path: str, name: str, spans: list[tuple[int, int]], check=None, *,
               files=None,
               progress: Callable[[int], None] | None = None,
               stopped: Callable[[], bool] = lambda: False) -> None:
    """Fault the byte ranges ``spans`` (``(start, end)``) of the file ``path`` (``name``
    in its directory) into memory, in file order, checking each block against ``check``
    (the directory's :class:`BlockCheck`) as it comes in.

    A load touches its records in its own order, and a cold map read so faults its pages
    in a few at a time, out of order. Here the pages come in in file order (the kernel
    reads ahead of sequential faults), on the map the load copies from (``files``: its
    ``MappedFiles``), by the checksum pass the load needs anyway (blocks checked here
    are not checked again); without ``check`` the same pass runs, its result unused
    (about 15 GB/s per core). No bytes are copied. ``progress(pos)``:
    every range ending at or before ``pos`` is in. A file shorter than the ranges stops
    the pass; with ``check``, the block it cut is refused as truncated
    (:class:`IntegrityError`), otherwise the mapped read that follows finds it.
    """
    rec = check.record(name) if check is not None else None
    block = rec.block if rec is not None else None
    if block is not None and block > READ_AHEAD_BYTES:
        check = block = None  # (a crafted record) its blocks are checked on the map
    if check is not None:  # whole blocks, less those checked already (by an earlier pass)
        spans = [piece for a, b in spans for piece in check.unchecked(name, a, b)]
    runs: list[list[int]] = []
    for a, b in sorted(spans):
        if runs and a <= runs[-1][1] + READ_AHEAD_GAP:
            runs[-1][1] = max(runs[-1][1], b)
        elif b > a:
            runs.append([a, b])
    if not runs:
        return
    mm = files.get(path)[0] if files is not None else _map(path)
    view, touch = memoryview(mm), checksum_fn(ALGO)
    for a, b in runs:
        pos = a
        while pos < b and not stopped():
            end = min(b, pos + READ_AHEAD_BYTES)
            if block is not None and end < b:
                end -= (end - a) % block  # whole blocks
            if end > len(view):  # the file ends early
                if check is not None:
                    check.check(name, view, 0, pos, b)  # refuses the block it cut
                return
            if check is not None:
                check.check(name, view, 0, pos, end)
            else:
                touch(view[pos:end], 0)
            pos = end
            if progress is not None:
                progress(pos)


def in_memory(path: str, spans: list[tuple[int, int]]) -> bool:
    """Whether the page cache holds the first, middle and last byte of ``spans`` of the
    file ``path`` (probed with ``RWF_NOWAIT`` reads, which never wait for the disk): a
    file written or read a moment ago, for which a read-ahead would only repeat work.
    ``False`` where the probe is not supported."""
    points = sorted({p for a, b in spans if b > a for p in (a, (a + b) // 2, b - 1)})
    if not points or not hasattr(os, "RWF_NOWAIT"):
        return False
    probe = [p for i, p in enumerate(points) if i in (0, len(points) // 2, len(points) - 1)]
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False  # the load's own read says what is wrong
    try:
        one = bytearray(1)
        return all(os.preadv(fd, [one], p, os.RWF_NOWAIT) == 1 for p in probe)
    except OSError:  # EAGAIN: not in memory; or the flag is not supported here
        return False
    finally:
        os.close(fd)


class ReadAhead:
    """:func:`read_ahead` of several files on a thread of its own, while the load goes
    on: ``wait(key, end)`` returns once the bytes of file ``key`` before ``end`` are
    read and checked (raising whatever the reading raised).

    ``files``: ``{key: (path, name, spans, check)}`` (``name``: the file's in its
    directory, whose ``check`` it is), read in key order, through ``maps`` (the load's
    own, so its page tables are filled once) or maps of its own; those in memory
    already (:func:`in_memory`) are left to the load (``wait`` returns at once). The
    thread reads at most what it was given and stops early at :meth:`cancel`;
    :meth:`finish` joins it. As a context manager: cancelled at the exit, and finished
    (its error raised) unless the body raised.
    """

    def __init__(self, files: dict[str, tuple[str, str, list[tuple[int, int]], object]],
                 maps=None) -> None:
        # a file in memory already is read by the load itself, as without read-ahead
        files = {k: f for k, f in files.items() if READ_AHEAD and not in_memory(f[0], f[2])}
        self._files, self._maps = files, maps
        self._pos: dict[str, int] = {}
        self._done: set[str] = set()
        self._error: BaseException | None = None
        self._finished = self._stop = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="dcp-universal-read-ahead",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for key in sorted(self._files):
                path, name, spans, check = self._files[key]
                read_ahead(path, name, spans, check, files=self._maps,
                           progress=functools.partial(self._advance, key),
                           stopped=lambda: self._stop)
                with self._cond:
                    self._done.add(key)
                    self._cond.notify_all()
        except BaseException as e:  # raised on the load's thread, at its next wait
            self._error = e
        finally:
            with self._cond:
                self._finished = True
                self._cond.notify_all()

    def _advance(self, name: str, pos: int) -> None:
        with self._cond:
            self._pos[name] = pos
            self._cond.notify_all()

    def wait(self, name: str, end: int) -> None:
        if name not in self._files:
            return
        with self._cond:
            self._cond.wait_for(lambda: self._finished or name in self._done
                                or self._pos.get(name, -1) >= end)
        if self._error is not None:
            raise self._error

    def cancel(self) -> None:
        self._stop = True

    def __enter__(self) -> "ReadAhead":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.cancel()
        if exc_type is None:
            self.finish()

    def finish(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error


def _map(path: str):
    """A read-only map of ``path`` (``b""`` for an empty file)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
