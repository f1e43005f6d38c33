"""The few collectives the library needs, each a no-op without a process group.

Every function here that talks to other ranks is collective: every rank calls it, in
the same order relative to the package's other collectives, on the same ``group``.

The group is an argument, never ambient state: ``None`` is the default group (what the
training loop, saves' snapshots and loads use); the background thread of an
asynchronous save runs its writes and commit on a gloo group of its own, passed down
explicitly. That thread marks itself (:func:`writes_only`), and any collective there on
another group, or any gather of the model (:func:`on_caller_thread`), raises instead of
interleaving with the training loop's collectives.
"""

from __future__ import annotations

import contextlib
import importlib
import pickle
import threading
import traceback
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "rank", "world_size", "barrier", "on_rank0", "agreed", "all_true",
           "all_gather_object", "new_gloo_group", "writes_only", "check_group",
           "on_caller_thread"]

T = TypeVar("T")

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


def new_gloo_group():
    """Collective (default group): a new gloo group of every rank, or ``None`` without a
    process group. gloo runs on CPU tensors whatever the default backend is, as DCP's
    background saves require."""
    if not is_distributed():
        return None
    return dist.new_group(backend="gloo")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier(*, group=None) -> None:
    """Collective: returns once every rank has called it."""
    check_group(group, "barrier")
    if is_distributed():
        dist.barrier(group=group)


def all_true(flag: bool, *, group=None) -> bool:
    """Collective: True on every rank iff ``flag`` is true on every rank."""
    check_group(group, "all_true")
    if not is_distributed():
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return bool(t.item())


def all_gather_object(obj: Any, *, group=None) -> list[Any]:
    """Collective: every rank's ``obj``, by rank (``[obj]`` without a process group)."""
    check_group(group, "all_gather_object")
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj, group=group)
    return out


def on_rank0(fn: Callable[..., T], *args: Any, group=None, **kwargs: Any) -> T:
    """Run ``fn(*args, **kwargs)`` on rank 0 only; every rank returns its result or
    raises its exception (told over ``group``).

    Collective. Call order, every rank:

    1. rank 0 runs ``fn``; the other ranks do not;
    2. every rank takes part in one broadcast of rank 0's outcome;
    3. rank 0 returns the result or re-raises its own exception (traceback intact);
       the other ranks return the same result, or raise an exception of the same class
       with rank 0's message and, as a note, rank 0's traceback text.

    So every rank takes the same branch after a "rank 0 acts, all agree" step (commit a
    manifest, check a step, prune), and none is left waiting in a later collective when
    rank 0 failed. ``fn``'s result must be picklable.
    """
    check_group(group, f"on_rank0({getattr(fn, '__name__', fn)})")
    result, error, told = _attempt(fn, args, kwargs) if rank() == 0 else (None, None, None)
    if not is_distributed():
        if error is not None:
            raise error
        return result
    box = [(result if error is None else None, told)]
    dist.broadcast_object_list(box, src=0, group=group)
    if error is not None:
        raise error
    result, told = box[0]
    if told is not None:
        raise _rebuild(told)
    return result


def agreed(fn: Callable[..., T], *args: Any, group=None, **kwargs: Any) -> T:
    """Run ``fn(*args, **kwargs)`` on every rank and agree on the outcome before anyone
    goes on: if it raised on any rank, every rank raises (its own exception, or the
    first failing rank's class and message, prefixed with that rank).

    Collective: one ``all_gather_object``. Wrap in it whatever can fail on one rank
    only (a file read, a pickle) before the next collective, so no rank waits for the
    process group's timeout while another has already given up.
    """
    check_group(group, f"agreed({getattr(fn, '__name__', fn)})")
    result, error, told = _attempt(fn, args, kwargs)
    if not is_distributed():
        if error is not None:
            raise error
        return result
    outcomes = all_gather_object(told, group=group)
    failed = [(r, t) for r, t in enumerate(outcomes) if t is not None]
    if error is not None:
        raise error
    if failed:
        r, (blob, module, qualname, message, trace) = failed[0]
        raise _rebuild((None, module, qualname, f"rank {r}: {message}", trace), r)
    return result


def _attempt(fn, args, kwargs) -> tuple:
    """``(result, exception, what other ranks need to raise it)`` of one call."""
    try:
        return fn(*args, **kwargs), None, None
    except Exception as e:
        return None, e, _portable(e, traceback.format_exc())


def _portable(e: Exception, trace: str) -> tuple:
    """What other ranks need to raise ``e`` again: the exception itself when it pickles,
    and always its class, message and traceback text."""
    try:
        blob = pickle.dumps(e)
        pickle.loads(blob)
    except Exception:
        blob = None
    cls = type(e)
    return blob, cls.__module__, cls.__qualname__, str(e), trace


def _rebuild(told: tuple, rank: int = 0) -> Exception:
    blob, module, qualname, message, trace = told
    exc = None
    if blob is not None:
        exc = pickle.loads(blob)
    else:
        try:
            cls = importlib.import_module(module)
            for part in qualname.split("."):
                cls = getattr(cls, part)
            try:
                exc = cls(message)
            except Exception:  # a constructor wanting more than the message: skip it
                exc = cls.__new__(cls, message)
        except Exception:
            exc = RuntimeError(f"{module}.{qualname}: {message}")
    note = f"raised on rank {rank}:\n" + trace.rstrip()
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    else:  # Python 3.10: no notes; keep the traceback text in the message
        exc.args = (f"{message}\n{note}",)
    return exc
