"""Named entries, asked in order, a name taken once: the one shape of the package's
registries: adapter kinds (:mod:`dcp_universal.adapters`), input formats
(:mod:`dcp_universal.sources`), factor rules (:mod:`dcp_universal.sources.dcp`) and
storage backends (:mod:`dcp_universal.storage`).

An entry is named by its ``name`` attribute (a kind, a format), or, for a function (a
factor rule), by its module and qualified name. Step items are not registered: each
manager is given its own (``CheckpointManager(items=...)``)."""

from __future__ import annotations

import dataclasses
from typing import Any, Generic, Iterator, TypeVar

__all__ = ["Registry", "name_of"]


T = TypeVar("T")


def name_of(entry: Any) -> str:
    """An entry's name: its ``name``, or a function's ``module.qualname``."""
    name = getattr(entry, "name", None)
    if isinstance(name, str):
        return name
    return f"{entry.__module__}.{entry.__qualname__}"


def _same_kind(a: Any, b: Any) -> bool:
    """``b`` is ``a`` registered again (a module imported twice): the same function, or
    an object of the same class (equal to it, for a record such as a storage backend)."""
    if callable(a) and not hasattr(a, "name"):
        return name_of(a) == name_of(b)
    return type(a) is type(b) and (not dataclasses.is_dataclass(a) or a == b)


class Registry(Generic[T]):
    """Named entries (:func:`name_of`), in the order they are asked.

    Args:
        what: what an entry is, for messages ("an adapter kind").
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self._entries: list[T] = []

    def add(self, entry: T, *, before: str | None = None) -> T:
        """Add ``entry`` last, or just before the entry named ``before`` when there is
        one. Adding an entry of a registered entry's class under its name again is a
        no-op (a module imported twice); returns the registered entry.

        Raises:
            ValueError: another class is registered under the same name.
        """
        for existing in self._entries:
            if name_of(existing) == name_of(entry):
                if _same_kind(existing, entry):
                    return existing
                raise ValueError(f"{self.what} named {name_of(entry)!r} is already registered "
                                 f"({type(existing).__qualname__}); give yours another name")
        names = [name_of(e) for e in self._entries]
        self._entries.insert(names.index(before) if before in names else len(names), entry)
        return entry

    def remove(self, entry: T) -> None:
        self._entries.remove(entry)

    def named(self, name: str) -> T:
        for entry in self._entries:
            if name_of(entry) == name:
                return entry
        raise KeyError(f"no {self.what} named {name!r}; registered: {self.names()}")

    def names(self) -> list[str]:
        return [name_of(e) for e in self._entries]

    def __iter__(self) -> Iterator[T]:
        return iter(list(self._entries))

    def __contains__(self, name: str) -> bool:
        return name in self.names()
