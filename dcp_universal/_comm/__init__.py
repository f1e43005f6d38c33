"""The few collectives the library needs, each a no-op without a process group.

Every function here that talks to other ranks is collective: every rank calls it, in
the same order relative to the package's other collectives, on the same ``group``.

The group is an argument, and ``group=None`` is resolved per thread
(:func:`resolve_group`): inside an :func:`operation` on this thread it is that
operation's group, else the default group (what the training loop uses). The state is
thread-local, so the background thread of an asynchronous save, which runs its writes
and commit in an operation on a gloo group of its own, never sees the caller's. That
thread marks itself (:func:`writes_only`), and any collective there on another group,
or any gather of the model (:func:`on_caller_thread`), raises instead of interleaving
with the training loop's collectives.

Timeouts. Every collective operation of the package (a save, a load, an export) runs in
:func:`operation`, which resolves ``group=None`` to a gloo group of its own whose
collectives time out after the operation's ``timeout`` (the default group's timeout is
the job's, 30 minutes with gloo and often more with NCCL). Each rank posts its progress
(how many collectives of the operation it has reached, and what it was doing) to the
default group's store; a rank whose collective times out, or whose peer closed the
connection, reads that board and raises :class:`~dcp_universal.errors.CheckpointTimeoutError`
naming the ranks it waited for. The commit of a step is claimed in the store
(:func:`claim_commit`) against a rank that gave up (:func:`_give_up`), atomically, so a
stalled rank 0 that wakes up commits nothing once another rank said nothing was
committed.

The package is split by job: :mod:`.operations` (thread-local state, guards, groups,
:func:`operation` and its progress board), :mod:`.transport` (an exception sent to the
other ranks); the collectives are here.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from dcp_universal._comm.operations import (DEFAULT_TIMEOUT_S, _known, _thread, check_group,
                                            check_timeout, claim_commit, is_distributed,
                                            new_gloo_group, on_caller_thread, operation,
                                            progress, rank, resolve_group, world_size,
                                            writes_only)
from dcp_universal._comm.transport import attempt as _attempt, rebuild as _rebuild

__all__ = ["is_distributed", "rank", "world_size", "on_rank0", "agreed", "all_true",
           "all_gather_object", "new_gloo_group", "writes_only", "check_group",
           "on_caller_thread", "operation", "resolve_group", "check_timeout", "claim_commit",
           "progress", "DEFAULT_TIMEOUT_S"]

T = TypeVar("T")


def all_true(flag: bool, *, group=None) -> bool:
    """Collective: True on every rank iff ``flag`` is true on every rank."""
    group = resolve_group(group)
    check_group(group, "all_true")
    if not is_distributed():
        return flag
    progress("waiting to agree")
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return bool(t.item())


def all_gather_object(obj: Any, *, group=None) -> list[Any]:
    """Collective: every rank's ``obj``, by rank (``[obj]`` without a process group)."""
    group = resolve_group(group)
    check_group(group, "all_gather_object")
    if not is_distributed():
        return [obj]
    progress("waiting in a gather")
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
    check_group(_known(group), f"on_rank0({getattr(fn, '__name__', fn)})")
    if rank() == 0:
        op = getattr(_thread, "op", None)
        if op is not None:
            op.post_progress(f"running {getattr(fn, '__name__', 'a step')} on rank 0", advance=False)
    result: Any
    result, error, told = _attempt(fn, args, kwargs) if rank() == 0 else (None, None, None)
    if not is_distributed():
        if error is not None:
            raise error
        return result
    group = resolve_group(group)  # after fn: the operation's group is made at its first use
    progress(f"waiting for rank 0 ({getattr(fn, '__name__', 'a step')})")
    box = [(result if error is None else None, told)]
    try:
        dist.broadcast_object_list(box, src=0, group=group)
    except Exception:
        if error is not None:  # rank 0's own failure says more than the broadcast's
            raise error from None
        raise
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
    check_group(_known(group), f"agreed({getattr(fn, '__name__', fn)})")
    result, error, told = _attempt(fn, args, kwargs)
    group = resolve_group(group)
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
