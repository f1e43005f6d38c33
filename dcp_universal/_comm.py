"""The few collectives the library needs, each a no-op without a process group.

Every function here that talks to other ranks is collective: every rank calls it, in
the same order relative to the package's other collectives.

They run on the default process group, or on the group a thread chose with
:func:`using` (the background thread of an asynchronous save uses a gloo group of its
own, so its collectives never interleave with the training loop's on the default one).
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

__all__ = ["is_distributed", "rank", "world_size", "barrier", "on_rank0", "all_true",
           "all_gather_object", "using", "group", "new_gloo_group"]

T = TypeVar("T")

_thread = threading.local()


@contextlib.contextmanager
def using(pg) -> Iterator[None]:
    """This thread's collectives (here and in ``dcp.save`` / ``dcp.load`` through
    :mod:`dcp_universal.dcp_io`) run on ``pg`` inside the block (``None``: the default
    group). ``pg`` must hold every rank, in the default group's order."""
    before = getattr(_thread, "group", None)
    _thread.group = pg
    try:
        yield
    finally:
        _thread.group = before


def group():
    """The process group this thread's collectives use (``None``: the default one)."""
    return getattr(_thread, "group", None)


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


def barrier() -> None:
    """Collective: returns once every rank has called it."""
    if is_distributed():
        dist.barrier(group=group())


def all_true(flag: bool) -> bool:
    """Collective: True on every rank iff ``flag`` is true on every rank."""
    if not is_distributed():
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group())
    return bool(t.item())


def all_gather_object(obj: Any) -> list[Any]:
    """Collective: every rank's ``obj``, by rank (``[obj]`` without a process group)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj, group=group())
    return out


def on_rank0(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn(*args, **kwargs)`` on rank 0 only; every rank returns its result or
    raises its exception.

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
    result, error, told = None, None, None
    if rank() == 0:
        try:
            result = fn(*args, **kwargs)
        except Exception as e:
            error = e
            told = _portable(e, traceback.format_exc())
    if not is_distributed():
        if error is not None:
            raise error
        return result
    box = [(result if error is None else None, told)]
    dist.broadcast_object_list(box, src=0, group=group())
    if error is not None:
        raise error
    result, told = box[0]
    if told is not None:
        raise _rebuild(told)
    return result


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


def _rebuild(told: tuple) -> Exception:
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
    note = "raised on rank 0:\n" + trace.rstrip()
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    else:  # Python 3.10: no notes; keep the traceback text in the message
        exc.args = (f"{message}\n{note}",)
    return exc
