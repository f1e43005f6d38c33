"""Exception classes. Every library error subclasses :class:`CheckpointError`."""

from __future__ import annotations

__all__ = ["CheckpointError", "CheckpointMismatchError", "UnsupportedAdapterError"]


class CheckpointError(Exception):
    """Base class of every error raised by dcp_universal."""


class CheckpointMismatchError(CheckpointError, ValueError):
    """The checkpoint does not fit the target model (keys or shapes differ).

    Raised before any tensor of the model is written, so the model is untouched.
    """


class UnsupportedAdapterError(CheckpointError, TypeError):
    """A module carries an adapter variant this library cannot merge (DoRA, LoHa, ...).

    It is raised rather than skipped: skipping would write base weights that silently
    lack the adapter's update.
    """
