"""Named entries, asked in order, a name taken once: the registries of adapter kinds
(:mod:`dcp_universal.adapters`) and of input formats (:mod:`dcp_universal.sources`).

Other extension points need no order or names and stay plain: storage backends are a
dict by URL scheme (:func:`dcp_universal.storage.register_backend`), factor rules a list
(:func:`dcp_universal.sources.dcp.register_factor_rule`), and step items the tuple each
manager is given (``CheckpointManager(items=...)``)."""

from __future__ import annotations

from typing import Generic, Iterator, Protocol, TypeVar

__all__ = ["Registry"]



class _Named(Protocol):
    @property
    def name(self) -> str: ...


T = TypeVar("T", bound=_Named)


class Registry(Generic[T]):
    """Entries with a ``name`` attribute, in the order they are asked.

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
            if existing.name == entry.name:
                if type(existing) is type(entry):
                    return existing
                raise ValueError(f"{self.what} named {entry.name!r} is already registered "
                                 f"({type(existing).__qualname__}); give yours another name")
        names = [e.name for e in self._entries]
        self._entries.insert(names.index(before) if before in names else len(names), entry)
        return entry

    def remove(self, entry: T) -> None:
        self._entries.remove(entry)

    def named(self, name: str) -> T:
        for entry in self._entries:
            if entry.name == name:
                return entry
        raise KeyError(f"no {self.what} named {name!r}; registered: {self.names()}")

    def names(self) -> list[str]:
        return [e.name for e in self._entries]

    def __iter__(self) -> Iterator[T]:
        return iter(list(self._entries))

    def __contains__(self, name: str) -> bool:
        return name in self.names()
