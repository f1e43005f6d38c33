"""Saves in flight: an asynchronous save's background write, and a handle for every save
until it settles (with a local tier: until its upload made it durable).

At most one background write is in flight: the manager waits for it (:meth:`Saves.
settle_write`) before the next save or load. Every save's error is raised once: by its
handle's ``result()``, or else by the manager's next call that settles it; one nobody
waited for is printed at interpreter exit, naming the step.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import sys
from typing import Callable

from dcp_universal import _comm

__all__ = ["SaveHandle", "Saves", "then_upload"]


class SaveHandle:
    """An asynchronous save in flight (``save(..., blocking=False)``).

    The state was staged when ``save`` returned; the write and the commit run in the
    background. Its error, if any, is raised once: by :meth:`result`, or else by the
    manager's next ``save``, ``load``, ``prune``, ``wait`` or ``close``.
    """

    def __init__(self, step: int, future: concurrent.futures.Future, stall_s: float) -> None:
        self.step = step
        self.stall_s = stall_s  # how long ``save`` blocked the caller
        self._future = future
        self._raised = False  # its error reached the caller

    def done(self) -> bool:
        """Whether the save has finished (committed, or failed)."""
        return self._future.done()

    def result(self, timeout: float | None = None) -> str:
        """The committed step's directory, once committed (with ``local_dir``: the
        root's, once the upload committed it there; ``timeout`` seconds at most, else
        ``TimeoutError``); raises the save's error."""
        try:
            return self._future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(
                f"step {self.step} is still being written after {timeout} s") from None
        except BaseException:
            self._raised = True
            raise

    def _settle(self) -> None:
        """Wait; raise the error unless :meth:`result` already raised it."""
        try:
            self._future.result()
        except BaseException:
            if not self._raised:
                self._raised = True
                raise


def then_upload(write: concurrent.futures.Future) -> concurrent.futures.Future:
    """The future of a save whose write returns ``(path, upload)``: the path once
    written and committed, or (with a local tier) the upload's remote path once durable."""
    out: concurrent.futures.Future = concurrent.futures.Future()

    def settle(f: concurrent.futures.Future) -> None:
        if f.exception() is not None:
            out.set_exception(f.exception())
        else:
            out.set_result(f.result())

    def written(f: concurrent.futures.Future) -> None:
        if f.exception() is not None:
            out.set_exception(f.exception())
            return
        path, upload = f.result()
        if upload is None:
            out.set_result(path)
        else:
            upload.add_done_callback(settle)

    write.add_done_callback(written)
    return out


class Saves:
    """The saves of one manager not yet settled, and its background writer.

    Args:
        timeout: the background thread's gloo group's timeout.
        unsettled: ``unsettled(step)`` says what a failed save nobody waited for means
            (printed at exit).
    """

    def __init__(self, timeout: float, unsettled: Callable[[int], str]) -> None:
        self.timeout = timeout
        self._unsettled = unsettled
        self._handles: list[SaveHandle] = []
        self._writing: concurrent.futures.Future | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._group = None  # the background thread's gloo group (collective to create)
        self._at_exit_registered = False

    def track(self, step: int, future: concurrent.futures.Future,
              stall_s: float = 0.0) -> SaveHandle:
        """A handle for ``future`` (a save, or an upload), settled by :meth:`wait`."""
        if not self._at_exit_registered:
            self._at_exit_registered = True
            atexit.register(self._at_exit)
        handle = SaveHandle(step, future, stall_s)
        self._handles.append(handle)
        return handle

    def start_background(self) -> None:
        """Collective (every rank, on the caller's thread): the background thread and
        its group, once."""
        if self._pool is None:
            self._group = self._group or _comm.new_gloo_group(self.timeout)
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="dcp-universal-save")

    def write_in_background(self, step: int, finish: Callable[[object], tuple],
                            stall_s: float) -> SaveHandle:
        """Run ``finish(group)`` (the writes and the commit, returning ``(path,
        upload)``) on the background thread, collective on its own group."""
        assert self._pool is not None, "start_background() first"
        group = self._group

        def background() -> tuple:
            with _comm.writes_only(group), _comm.operation(
                    f"save of step {step} (in the background)", group=group):
                return finish(group)

        self._writing = self._pool.submit(background)
        return self.track(step, then_upload(self._writing), stall_s)

    def settle_write(self) -> None:
        """Wait for the background write (not for uploads), then raise the error of any
        save or upload that finished failing (once)."""
        if self._writing is not None:
            concurrent.futures.wait([self._writing])
            self._writing = None
        for h in [h for h in self._handles if h.done()]:
            self._handles.remove(h)
            h._settle()

    def wait(self) -> None:
        """Block until every save and upload settled; raise the first error no handle's
        ``result()`` raised already."""
        self._writing = None
        handles, self._handles = self._handles, []
        errors = []
        for h in handles:
            try:
                h._settle()
            except BaseException as e:
                errors.append(e)
        if errors:
            raise errors[0]

    def close(self) -> None:
        """Stop the background thread (after :meth:`wait`); its group is kept for the
        next save (freed with the default group at ``destroy_process_group``)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _at_exit(self) -> None:
        """At interpreter exit, a save nobody waited for: the interpreter let it finish
        (its thread is joined first); a failure is printed, naming the step, instead of
        vanishing with the process."""
        for pending in list(self._handles):
            if pending._raised:
                continue
            try:
                pending._future.result()
            except BaseException as e:
                print(f"dcp_universal: {self._unsettled(pending.step)} ({type(e).__name__}: "
                      f"{e}); call mgr.wait() or mgr.close() before exiting to get this as "
                      "an exception", file=sys.stderr, flush=True)
