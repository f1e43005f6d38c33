"""Exception classes. Every library error subclasses :class:`CheckpointError`."""

from __future__ import annotations

__all__ = ["CheckpointError", "CheckpointMismatchError", "UnsupportedAdapterError",
           "NotACheckpointError", "ManifestError", "FormatVersionError", "IntegrityError",
           "DamagedManifestError", "CheckpointIOError", "StepAlreadyExistsError", "ExportExistsError",
           "PerRankStateError",
           "UnsafeCheckpointError", "RootBusyError", "NotARootError"]


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


class NotACheckpointError(CheckpointError, FileNotFoundError):
    """The path holds no checkpoint (missing, empty, or something else)."""


class ManifestError(CheckpointError):
    """A step's ``manifest.json`` is unreadable: truncated, garbage, or not an object."""


class FormatVersionError(ManifestError):
    """The checkpoint was written by a newer dcp_universal format than this one reads."""


class IntegrityError(CheckpointError):
    """A data file is missing, truncated, or fails its checksum."""


class DamagedManifestError(ManifestError, IntegrityError):
    """A step's ``manifest.json`` is not valid JSON, or fails its own checksum: its
    bytes changed after the commit."""


class CheckpointIOError(CheckpointError, OSError):
    """Reading or writing a checkpoint's data failed on at least one rank (every rank
    raises it). Nothing was committed (save) or installed into the model (load)."""


class StepAlreadyExistsError(CheckpointError, ValueError):
    """``save(step)`` found that step already committed (pass ``overwrite=True``)."""


class ExportExistsError(CheckpointError, FileExistsError):
    """``export_hf`` / ``export_peft`` found an earlier export in the output directory:
    writing over it could mix two exports (pass ``overwrite=True``)."""


class PerRankStateError(CheckpointError):
    """Per-rank training state cannot follow a change of world size (see
    ``CheckpointManager.load``'s ``skip_per_rank``). Raised before anything is read."""


class UnsafeCheckpointError(CheckpointError):
    """The checkpoint asks for something this library does not do for a file it cannot
    trust: a path that leaves its root or directory, or state that only runs as code
    (``trusted=True`` reads such state where that is possible)."""


class RootBusyError(CheckpointError):
    """Another live job holds the root's writer lease: two jobs writing one root would
    delete each other's unfinished files (see ``dcp_universal.training.lease``)."""


class NotARootError(CheckpointError, ValueError):
    """The path given as a checkpoint root is a file, a committed step directory, a DCP
    directory or a folder of another tool's checkpoints: refused on save and load, with
    the path that was meant (see ``dcp_universal.training.roots``)."""


class CheckpointTimeoutError(CheckpointError, TimeoutError):
    """A rank waited longer than the operation's ``timeout`` for the others (one stalled
    or stopped), or found that another rank had given up waiting for it. The message
    names the rank(s) waited for and says whether anything was committed. The job's
    checkpoint group is closed afterwards: restart the job."""
