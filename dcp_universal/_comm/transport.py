"""Error transport: what one rank sends the others so they raise its exception (its
class, message and traceback text; the exception itself when it pickles)."""

from __future__ import annotations

import importlib
import pickle
import traceback
from typing import Any

__all__ = ["attempt", "rebuild"]


def attempt(fn, args, kwargs) -> tuple:
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


def rebuild(told: tuple, rank: int = 0) -> Exception:
    blob, module, qualname, message, trace = told
    exc = None
    if blob is not None:
        exc = pickle.loads(blob)
    else:
        try:
            cls: Any = importlib.import_module(module)
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
