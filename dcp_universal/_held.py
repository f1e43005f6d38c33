"""A process-wide setting held at one value while anyone is inside (:class:`Held`)."""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator

__all__ = ["Held"]


class Held:
    """``with setting.held():`` keeps a process-wide setting at ``value`` inside.

    Nested and concurrent users (an asynchronous save beside a blocking one, two threads'
    operations) share the hold: the first one in saves what it found and sets ``value``,
    the last one out puts the saved setting back.

    Args:
        get: reads the setting.
        put: sets it.
        value: what it is held at.
    """

    def __init__(self, get: Callable[[], Any], put: Callable[[Any], None], value: Any) -> None:
        self._get, self._put, self._value = get, put, value
        self._lock = threading.Lock()
        self._users = 0
        self._found: Any = None

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        with self._lock:
            if self._users == 0:
                self._found = self._get()
                self._put(self._value)
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    self._put(self._found)
