"""Operations: the thread-local state that resolves ``group=None`` (see
:mod:`dcp_universal._comm`), the guards of an asynchronous save's background thread,
the package's gloo groups, and :func:`operation` with its progress board, timeouts and
the claim of a commit."""

from __future__ import annotations

import contextlib
import datetime
import gc
import itertools
import json
import math
import threading
import time
from typing import Iterator

import torch.distributed as dist

from dcp_universal import _torch_compat
from dcp_universal._held import Held
from dcp_universal.errors import CheckpointError, CheckpointTimeoutError

__all__ = ["DEFAULT_TIMEOUT_S", "is_distributed", "rank", "world_size", "writes_only",
           "check_group", "on_caller_thread", "new_gloo_group", "check_timeout", "progress",
           "resolve_group", "operation", "claim_commit", "gc_paused"]

#: Default ``timeout`` of every collective operation, in seconds (see README, "Timeouts").
DEFAULT_TIMEOUT_S = 600.0

_thread = threading.local()


@contextlib.contextmanager
def writes_only(group) -> Iterator[None]:
    """This thread runs only a save's writes and commit, whose collectives are on
    ``group`` (an asynchronous save's background thread)."""
    _thread.writes_on = (group,)
    try:
        yield
    finally:
        del _thread.writes_on


def check_group(group, what: str) -> None:
    """Raise if ``what`` (a collective on ``group``) must not run on this thread."""
    writes_on = getattr(_thread, "writes_on", None)
    if writes_on is not None and group is not writes_on[0]:
        raise RuntimeError(
            f"{what} on {'the default group' if group is None else 'another group'} from the "
            "background thread of an asynchronous save, which runs only the writes and the "
            "commit on its own group: this is a bug in dcp_universal (or in an item's write) "
            "-> report it; blocking saves (blocking=True) are not affected")


def on_caller_thread(what: str) -> None:
    """Raise if this is a background save thread: ``what`` reads the model (gathers,
    ``full_tensor()``), which only the snapshot on the caller's thread may do."""
    if getattr(_thread, "writes_on", None) is not None:
        raise RuntimeError(
            f"{what} from the background thread of an asynchronous save, which must only "
            "write the snapshot: this is a bug in dcp_universal (or in an item's write, "
            "which must read what its save() snapshotted) -> report it")


def new_gloo_group(timeout: float = DEFAULT_TIMEOUT_S):
    """Collective (default group): a new gloo group of every rank whose collectives time
    out after ``timeout`` seconds, or ``None`` without a process group. gloo runs on CPU
    tensors whatever the default backend is, as DCP's background saves require."""
    if not is_distributed():
        return None
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout))
    _groups[id(group)] = _Group(f"g{next(_made)}", timeout)
    return group


def check_timeout(timeout, what: str = "timeout") -> float:
    """``timeout`` as seconds (``None``: the default); ValueError unless a positive number."""
    if timeout is None:
        return DEFAULT_TIMEOUT_S
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (
            math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"{what}={timeout!r}: expected a positive number of seconds "
                         f"(default {DEFAULT_TIMEOUT_S:g})")
    return float(timeout)


class _Group:
    """What the package knows of one of its gloo groups (same on every rank)."""

    def __init__(self, tag: str, timeout: float) -> None:
        self.tag = tag
        self.timeout = timeout
        self.ops = 0  # operations begun on it: the same count on every rank


_groups: dict[int, _Group] = {}  # id(process group) -> _Group
_made = itertools.count()
_caller_groups: dict[tuple, object] = {}  # (id(default group), timeout) -> process group


class _Op:
    """One collective operation on this thread: its group and its progress board."""

    def __init__(self, what: str, group=None, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.what, self.timeout = what, timeout
        self.marks = 0
        self._pg = None
        if group is not None:
            self._begin(group)

    @property
    def pg(self):
        """The operation's group, made (collective, default group) at its first use:
        every rank's first collective of the operation."""
        if self._pg is None:
            key = (id(dist.group.WORLD), self.timeout)
            if key not in _caller_groups:
                _caller_groups[key] = new_gloo_group(self.timeout)
            self._begin(_caller_groups[key])
        return self._pg

    def _begin(self, pg) -> None:
        info = _groups.get(id(pg))
        if info is None:
            info = _groups[id(pg)] = _Group(f"x{next(_made)}", DEFAULT_TIMEOUT_S)
        info.ops += 1
        self._pg, self.info, self.seq, self.timeout = pg, info, info.ops, info.timeout
        store = _torch_compat.default_store()
        self.store = None if store is None else dist.PrefixStore(
            f"dcp_universal/{info.tag}/", store)
        self.post_progress(f"began the {self.what}")

    def post_progress(self, label: str, advance: bool = True) -> None:
        """Post this rank's progress: ``label`` is what it does now; ``advance``: it
        passed one more point that every rank passes (a collective, a write's end)."""
        if self._pg is None:  # nothing collective yet: nobody waits for this rank
            return
        self.marks += int(advance)
        if self.store is not None:
            try:
                self.store.set(f"board/{rank()}",
                               json.dumps([self.seq, self.marks, time.time(), label]))
            except Exception:  # the board only explains a timeout; never fail for it
                pass

    def board(self) -> dict[int, list]:
        """Every other rank's last post: ``{rank: [op, marks, time, label]}``."""
        out: dict[int, list] = {}
        if self._pg is None or self.store is None:
            return out
        for r in range(world_size()):
            if r == rank():
                continue
            try:
                if self.store.check([f"board/{r}"]):
                    out[r] = json.loads(self.store.get(f"board/{r}"))
            except Exception:
                pass
        return out

    def fate(self, desired: str) -> str:
        """Set this operation's fate to ``desired`` unless it is set already (atomic in
        the store); returns the fate. Without a store: ``desired``."""
        if self._pg is None or self.store is None:
            return desired
        try:
            return self.store.compare_set(f"fate/{self.seq}", "", desired).decode()
        except Exception:
            return desired


def progress(label: str) -> None:
    """Post this rank's progress in the current operation (nothing outside one)."""
    op = getattr(_thread, "op", None)
    if op is not None:
        op.post_progress(label)


def resolve_group(group):
    """``group``, or for ``None`` the current operation's group (else the default one)."""
    if group is None:
        op = getattr(_thread, "op", None)
        if op is not None:
            return op.pg
    return group


def _known(group):
    """What :func:`resolve_group` would return, without making a group: ``None`` for
    an operation whose group is not made yet (its thread is a caller's, never marked
    :func:`writes_only`)."""
    op = getattr(_thread, "op", None)
    if group is None and op is not None and op._pg is not None:
        return op._pg
    return group


@contextlib.contextmanager
def operation(what: str, timeout: float | None = None, *, group=None) -> Iterator[None]:
    """Run one collective operation of the package (``what``: "save of step 5") on this
    thread.

    Collective (every rank, same ``what`` and ``timeout``). The first operation with a
    given ``timeout`` makes its gloo group (:func:`new_gloo_group`, on the default
    group, at the operation's first collective); ``group`` passes one made already (an
    asynchronous save's). Inside, every
    ``group=None`` of this module (and of ``dcp_io``) means the operation's group. An
    operation inside another one is part of it (the outer group and timeout). A
    collective that times out or loses its peer raises
    :class:`~dcp_universal.errors.CheckpointTimeoutError` naming the ranks waited for.
    """
    outer = getattr(_thread, "op", None)
    # the caller's thread (a background save's writes are not paused: they may run long)
    paused = gc_paused() if getattr(_thread, "writes_on", None) is None else contextlib.nullcontext()
    if outer is not None or not is_distributed():
        with paused:
            yield
        return
    op = _thread.op = _Op(what, group, check_timeout(timeout))
    try:
        with paused:
            yield
    except CheckpointTimeoutError:
        raise
    except Exception as e:
        if _lost_peer(e) is None:
            raise
        raise _give_up(op, e) from e
    finally:
        del _thread.op


_GC = Held(gc.isenabled, lambda on: gc.enable() if on else gc.disable(), False)


def gc_paused() -> contextlib.AbstractContextManager[None]:
    """Python's cyclic garbage collector does not run while inside (nested and
    concurrent users share the pause; the last one out restores what the first found).

    A load or save allocates many small objects (DCP's metadata and plans), enough to
    trigger a full collection now and then, and a full collection walks every object
    of the process: 0.15 s measured here in the middle of a 0.4 s load, on one rank
    while the others waited for it at the next collective. Garbage made meanwhile is
    collected by the next collection after the operation (torchtitan pauses the
    collector for the whole training loop, for the same reason).
    """
    return _GC.held()


# what gloo says when a collective waited too long or its peer is gone
_PEER_LOST = ("timed out waiting", "connection closed by peer", "connection reset by peer",
              "broken pipe", "pair closure", "socket timeout")


def _lost_peer(e: BaseException | None) -> BaseException | None:
    """The collective failure (a gloo timeout or a closed connection) behind ``e``."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if (isinstance(e, RuntimeError) and not isinstance(e, CheckpointError)
                and any(p in str(e).lower() for p in _PEER_LOST)):
            return e
        e = e.__cause__ or e.__context__
    return None


def _give_up(op: _Op, e: BaseException) -> CheckpointTimeoutError:
    """This rank stops waiting in ``op``: mark the operation failed (so a stalled rank 0
    commits nothing when it wakes up) and describe whom it waited for."""
    cause = _lost_peer(e)
    fate = op.fate(f"abandoned by rank {rank()}")
    me = (op.seq, op.marks)
    board = op.board()
    now = time.time()
    behind = sorted(r for r in range(world_size())
                    if r != rank() and (r not in board or tuple(board[r][:2]) < me))

    def seen(r: int) -> str:
        if r not in board:
            return f"rank {r} (no progress posted)"
        seq, _, t, label = board[r]
        where = label if seq == op.seq else f"an earlier operation ({label})"
        return f"rank {r} (last seen {now - t:.0f} s ago: {where})"

    if behind:
        head = (f"{op.what}: rank {rank()} waited longer than timeout={op.timeout:g} s for "
                f"rank(s) {behind} and gave up: " + "; ".join(seen(r) for r in behind))
    else:
        ahead = sorted(board)
        head = (f"{op.what}: rank {rank()} fell behind, and the other ranks stopped waiting "
                f"for it (timeout={op.timeout:g} s; "
                + "; ".join(seen(r) for r in ahead) + ")")
    if fate.startswith("commit"):
        told = (f"Rank 0 had begun committing when this rank gave up: the {op.what} is "
                "committed if rank 0 finished it (check the latest step)")
    else:
        told = "Nothing was committed, and a rank that wakes up later commits nothing either"
    return CheckpointTimeoutError(
        f"{head}. {told}. The collective said: {str(cause).splitlines()[0][:200]}. This "
        "job's checkpoint connections are closed now -> restart the job (torchrun "
        "restarts it) and look at the rank(s) named; if the storage is only slow, pass a "
        "larger timeout=")


def claim_commit() -> None:
    """Rank 0, right before it commits the current operation's result: claim the commit
    in the store, or raise CheckpointTimeoutError if another rank has given up."""
    op = getattr(_thread, "op", None)
    if op is None:
        return
    fate = op.fate("commit")
    if fate != "commit":
        raise CheckpointTimeoutError(
            f"{op.what}: not committed: {fate} (it waited longer than timeout="
            f"{op.timeout:g} s for this rank, which stalled) -> restart the job")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1

