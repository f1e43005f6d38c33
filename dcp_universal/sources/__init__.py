"""Sources: the model a checkpoint holds, whatever its format, and the registry of
formats that open one.

A *format* is a class that says whether a path is its kind (:meth:`Format.detect`)
and opens it (:meth:`Format.open`) into a :class:`Source`. Formats are asked in
registration order (:func:`register_format`), and ``load_model``, ``export_hf``,
``inspect`` and ``convert`` all go through :func:`open_source`, so a path that one of
them reads is read the same way by all. The package registers: a legacy
``torch.save`` file (:mod:`~dcp_universal.interop.legacy`), a committed step
(:mod:`.step`), a DCP directory, this library's or another tool's (:mod:`.dcp`), an
Accelerate ``save_state`` directory (:mod:`~dcp_universal.interop.accelerate`), a PEFT
adapter directory (:mod:`~dcp_universal.interop.peft`) and a Hugging Face safetensors
directory (:mod:`~dcp_universal.interop.safetensors`). A new format is one module::

    >>> class NpzFormat(Format):
    ...     name = "npz"
    ...     def detect(self, store, path): return path.endswith(".npz") and store.is_file(path)
    ...     def open(self, store, path, want):
    ...         tensors = {k: torch.from_numpy(v) for k, v in np.load(path).items()}
    ...         return Source.in_memory(path, tensors)
    >>> register_format(NpzFormat(), before="dcp")

A :class:`Source` maps canonical keys to where their bytes are (an :class:`Entry` in a
:class:`Dir`) and may add adapter updates after reading (a LoRA step without a merged
``model/``: base plus adapters, composed on load). It is immutable: a reader that wants
fewer keys or shared names gets a new one (:meth:`Source.without`,
:meth:`Source.sharing`).
"""

from __future__ import annotations

import abc
import dataclasses
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from dcp_universal.storage import dcp_io
from dcp_universal.adapters import merge
from dcp_universal._registry import Registry
from dcp_universal.errors import NotACheckpointError
from dcp_universal.format.manifest import AdapterUpdate, Manifest
from dcp_universal.storage.mapped import Copies
from dcp_universal.model.plan import Staged, TensorInfo
from dcp_universal.storage import Storage
from dcp_universal.model.view import ModelView, local_block

__all__ = ["Dir", "DcpDir", "MemoryDir", "Entry", "Source", "Want", "Format",
           "register_format", "unregister_format", "registered_formats", "detect",
           "open_source", "dir_entries"]


# ---- where tensors are ------------------------------------------------------------------

class Dir(abc.ABC):
    """A set of stored tensors and the way to read them: a DCP directory, another
    format's directory, or tensors already in memory."""

    if TYPE_CHECKING:  # a field of the subclasses, or a property (DcpDir)
        @property
        def desc(self) -> str:
            """For messages."""

    @property
    @abc.abstractmethod
    def copies_can_wait(self) -> bool:
        """Whether every byte can be located and checked before any is copied (memory,
        or memory-mapped files), so copies may wait for a load's commit."""

    @abc.abstractmethod
    def load(self, state: dict[str, torch.Tensor], *, single_process: bool,
             copies: Copies) -> None:
        """Fill ``state`` (stored key -> tensor, DTensor or plain: each rank fills the
        block it holds). Collective under a process group unless ``single_process``."""


@dataclasses.dataclass(frozen=True, eq=False)
class DcpDir(Dir):
    """A directory read through DCP: the storage's reader, or ``reader_of``'s (another
    format's, such as Hugging Face safetensors)."""

    store: Storage
    path: str
    metadata: Metadata | None = None
    reader_of: dcp_io.ReaderOf | None = None
    trusted: bool = False

    @property
    def desc(self) -> str:
        return self.path

    @property
    def copies_can_wait(self) -> bool:
        return self.store.maps_files

    def load(self, state, *, single_process, copies) -> None:
        metadata = self.metadata if self.reader_of is None else None
        dcp_io.load_state(self.store, state, self.path, single_process=single_process,
                          copies=copies, metadata=metadata, reader_of=self.reader_of,
                          trusted=self.trusted)


@dataclasses.dataclass(frozen=True, eq=False)
class MemoryDir(Dir):
    """Whole tensors already in memory (a legacy file, a PEFT adapter's factors)."""

    desc: str
    tensors: Mapping[str, torch.Tensor]

    @property
    def copies_can_wait(self) -> bool:
        return True

    @torch.no_grad()
    def load(self, state, *, single_process, copies) -> None:
        for key, t in state.items():  # each rank copies the block its shard holds
            block, offsets = local_block(t)
            copies.take(key, block, self.tensors[key][
                tuple(slice(o, o + n) for o, n in zip(offsets, block.shape))])


def dir_entries(d: DcpDir) -> tuple[dict[str, TensorInfo], list[str], Metadata]:
    """``(tensor key -> info, non-tensor keys, metadata)`` of a directory DCP reads."""
    meta = dcp_io.read_metadata(d.store, d.path, reader_of=d.reader_of, trusted=d.trusted)
    tensors, other = {}, []
    for k, m in meta.state_dict_metadata.items():
        if isinstance(m, TensorStorageMetadata):
            tensors[k] = TensorInfo(tuple(m.size), m.properties.dtype)
        else:
            other.append(k)
    return tensors, other, meta


# ---- the source -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Entry:
    """One stored tensor: its shape and dtype, its directory, its key there."""

    info: TensorInfo
    dir: Dir
    raw: str


def _frozen(d: Mapping | None) -> Mapping:
    return MappingProxyType(dict(d or {}))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Source:
    """The model a checkpoint holds, under canonical names.

    Attributes:
        desc: the path, for messages.
        entries: canonical key -> where its tensor is.
        deltas: weight key -> the adapter update merged into it after it is read
            (``factors`` holds the update's tensors).
        factors: canonical key -> where an adapter factor of ``deltas`` is.
        notes: what a load report should say about the source.
        ties: groups of names that were one tensor at save (a step's manifest, a model
            directory's record); ``meta["ties_recorded"]`` says the source records
            them (an empty ``ties`` is then known, not unknown).
        meta: what the format knows beyond tensors (``restored_base``: the LoRA base a
            step restores exactly; ``other_keys``: non-tensor entries; a legacy file's
            metadata; ...).
        loader: for a format that loads other than by the generic plan (a PEFT adapter
            directory: adapters from the file, base kept): ``loader(view, strict=...)``
            returns the load's :class:`~dcp_universal.model.plan.Staged`.
    """

    desc: str
    entries: Mapping[str, Entry]
    deltas: Mapping[str, AdapterUpdate] = dataclasses.field(default_factory=dict)
    factors: Mapping[str, Entry] = dataclasses.field(default_factory=dict)
    notes: tuple[str, ...] = ()
    ties: tuple[tuple[str, ...], ...] = ()
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    loader: Callable[..., Staged] | None = None

    def __post_init__(self) -> None:
        for name in ("entries", "deltas", "factors", "meta"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))

    @classmethod
    def in_directory(cls, desc: str, d: Dir, keys: Mapping[str, TensorInfo],
                     raw_of: Mapping[str, str] | None = None, **fields) -> "Source":
        """Every key of ``keys`` in ``d`` (under ``raw_of[key]`` where that differs)."""
        raw_of = raw_of or {}
        return cls(desc=desc, entries={k: Entry(i, d, raw_of.get(k, k)) for k, i in keys.items()},
                   **fields)

    @classmethod
    def in_memory(cls, desc: str, tensors: Mapping[str, torch.Tensor], **fields) -> "Source":
        """Whole tensors in memory, under their canonical names."""
        keys = {k: TensorInfo(tuple(t.shape), t.dtype) for k, t in tensors.items()}
        return cls.in_directory(desc, MemoryDir(desc, dict(tensors)), keys, **fields)

    @property
    def keys(self) -> dict[str, TensorInfo]:
        """Canonical key -> shape and dtype of every tensor the source offers."""
        return {k: e.info for k, e in self.entries.items()}

    @property
    def copies_can_wait(self) -> bool:
        return all(e.dir.copies_can_wait
                   for e in (*self.entries.values(), *self.factors.values()))

    def replace(self, **fields) -> "Source":
        return dataclasses.replace(self, **fields)

    def without(self, keys) -> "Source":
        """The source without ``keys`` (an export that writes a tied name once)."""
        drop = set(keys)
        return self.replace(entries={k: e for k, e in self.entries.items() if k not in drop})

    def sharing(self, groups) -> "Source":
        """A source that stores one name of a tie group (transformers omits a tied
        model's ``lm_head.weight``) serves every name of the group."""
        entries, notes = dict(self.entries), list(self.notes)
        for group in groups:
            present = [k for k in group if k in entries]
            if not present or len(present) == len(group):
                continue
            for k in group:
                entries.setdefault(k, entries[present[0]])
            notes.append(f"tied: the checkpoint stores {present[0]} once; it serves "
                         f"{', '.join(k for k in group if k != present[0])} too")
        return self.replace(entries=entries, notes=tuple(notes))

    def filling_originals(self, original_of: Mapping[str, str]) -> "Source":
        """A source that stores no PEFT ``modules_to_save`` original (a Hugging Face
        directory, a merged model, a step written before originals were stored) serves
        each from its module's value (``original_of``: original key -> that key), as
        PEFT made it when it wrapped the model: for a pretrained model's directory that
        is the pretrained module itself."""
        entries, deltas = dict(self.entries), dict(self.deltas)
        filled = []
        for key, value in sorted(original_of.items()):
            if key in entries or value not in entries:
                continue
            entries[key] = entries[value]
            if value in deltas:
                deltas[key] = deltas[value]
            filled.append(key)
        if not filled:
            return self
        note = (f"{len(filled)} PEFT modules_to_save originals ({filled[0]}"
                f"{', ...' if len(filled) > 1 else ''}) filled from their modules' values: "
                "the checkpoint stores no originals, so disable_adapter() computes with "
                "the module as loaded")
        return self.replace(entries=entries, deltas=deltas, notes=(*self.notes, note))

    def read(self, into: dict[str, torch.Tensor], *, single_process: bool = False,
             later: Copies | None = None) -> None:
        """Read canonical keys into ``into`` (each rank fills the block it holds), then
        add the adapter deltas.

        ``later``: the copies of the keys in ``later.keys`` wait in ``later`` for its
        ``run()`` (the load's commit) instead of being made now; only for a source
        :attr:`copies_can_wait`, and not for keys with deltas.

        Collective under a process group (unless ``single_process``: this rank reads
        alone): one read per directory, in the order of their descriptions on every
        rank, then one of the factors when there are deltas.
        """
        later = later if later is not None else Copies()
        by_dir: dict[Dir, dict[str, torch.Tensor]] = {}
        waits: dict[Dir, set[str]] = {}
        again = []  # a stored tensor read for two names (one tensor of a tied pair)
        for key, t in into.items():
            e = self.entries[key]
            wanted = by_dir.setdefault(e.dir, {})
            if e.raw in wanted:
                again.append((t, wanted[e.raw]))
                continue
            wanted[e.raw] = t
            if key in later.keys:
                waits.setdefault(e.dir, set()).add(e.raw)
        for d in sorted(by_dir, key=lambda d: d.desc):  # same order on every rank
            d.load(by_dir[d], single_process=single_process,
                   copies=Copies(waits.get(d, ()), later.pending))
        with torch.no_grad():
            for t, first in again:
                local_block(t)[0].copy_(local_block(first)[0])
        self._add_deltas(into, single_process)

    @torch.no_grad()
    def _add_deltas(self, into: dict[str, torch.Tensor], single_process: bool) -> None:
        """Merge every delta into the weights read (collective unless
        ``single_process``: one read of the factors, then one reduction per rescaled
        update, in the same order on every rank)."""
        deltas = {k: u for k, u in self.deltas.items() if k in into}
        if not deltas:
            return
        needed = sorted({k for u in deltas.values() for k in u.keys()})
        full = {k: torch.empty(self.factors[k].info.shape, dtype=self.factors[k].info.dtype)
                for k in needed}
        by_dir: dict[Dir, dict[str, torch.Tensor]] = {}
        for k, t in full.items():
            by_dir.setdefault(self.factors[k].dir, {})[self.factors[k].raw] = t
        for d in sorted(by_dir, key=lambda d: d.desc):
            d.load(by_dir[d], single_process=single_process, copies=Copies())
        keys = list(deltas)
        merges = [_merge_of(deltas[k], full) for k in keys]
        merge.add_norms(merges, [into[k] for k in keys], collective=not single_process)
        for key, m in zip(keys, merges):
            block, offsets = local_block(into[key])
            block.copy_(merge.merge_block(block, offsets, m))


def _merge_of(update: AdapterUpdate, full: dict[str, torch.Tensor]) -> merge.Merge:
    """``update`` with its tensors read whole (``full``), ready for the merge."""
    factors = [merge.factors_of(t, full[t.left], full[t.right]) for t in update.terms]
    mag = update.magnitude
    return merge.Merge(factors, full[mag.key] if mag else None, mag.axis if mag else 0)


# ---- formats ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, kw_only=True)
class Want:
    """What the caller wants of a source.

    Attributes:
        target: the model to load into; ``None``: the model as saved, merged (exports,
            ``inspect``, ``convert``).
        prefix: the model's subtree in a checkpoint written by another tool.
        verify: ``None`` (default): check every byte read against the checkpoint's
            block checksums where the format records them; ``True``: also read and
            check every file whole first; ``False``: sizes only (the fast path).
        manifest: the step's manifest, when the caller read it already.
        trusted: read pickles in the checkpoint as they are (default: plain data only,
            :class:`~dcp_universal.errors.UnsafeCheckpointError` otherwise).
        model_only: with no target, the model alone: a checkpoint that keeps other
            state beside its model (torchtitan's optimizer, ``{"app": {"model",
            "optim"}}``) gives the model's subtree, canonical, found as a load finds it
            (or under ``prefix``); exports set it.
    """

    target: ModelView | None = None
    prefix: str | None = None
    verify: bool | None = None
    manifest: Manifest | None = None
    trusted: bool = False
    model_only: bool = False


class Format(abc.ABC):
    """One input format: says whether a path is its kind, and opens it."""

    #: stable identifier (``register_format(..., before=name)``)
    name: str = "abstract"
    #: what a path of this format looks like, for messages
    looks_like: str = ""
    #: whether ``Want.prefix`` means something here (a nested layout of another tool);
    #: :func:`open_source` refuses a prefix for the other formats
    takes_prefix: bool = False

    @abc.abstractmethod
    def detect(self, store: Storage, path: str) -> bool:
        """True if ``path`` is of this format (cheap: a few existence checks)."""

    @abc.abstractmethod
    def open(self, store: Storage, path: str, want: Want) -> Source:
        """The source at ``path``; reads metadata only, never tensor data."""


_FORMATS: Registry[Format] = Registry("an input format")


def register_format(fmt: Format, *, before: str | None = None) -> Format:
    """Add ``fmt`` to the formats asked by :func:`open_source` (last, or just before the
    format named ``before``).

    Raises:
        ValueError: another format is registered under the same name.
    """
    return _FORMATS.add(fmt, before=before)


def unregister_format(fmt: Format) -> None:
    _FORMATS.remove(fmt)


def registered_formats() -> list[Format]:
    return list(_FORMATS)


def detect(store: Storage, path: str) -> Format:
    """The first registered format that recognises ``path``.

    Raises:
        NotACheckpointError: none does (naming what each looks for).
    """
    for fmt in _FORMATS:
        if fmt.detect(store, path):
            return fmt
    if not store.exists(path):
        raise NotACheckpointError(f"checkpoint path {path} does not exist")
    kinds = "; ".join(f.looks_like for f in _FORMATS if f.looks_like)
    raise NotACheckpointError(
        f"{path} is not a model checkpoint: expected {kinds}; pass the directory that "
        "save_model() or CheckpointManager.save() wrote")


def open_source(store: Storage, path: str, want: Want = Want()) -> Source:
    """The source at ``path``, opened by the format that recognises it (a committed
    step's format directly when ``want.manifest`` is given)."""
    fmt = _FORMATS.named("step") if want.manifest is not None else detect(store, path)
    if want.prefix and not fmt.takes_prefix:
        raise ValueError(f"prefix={want.prefix!r}: {path} is {fmt.looks_like}; prefix= picks "
                         "the model's subtree in a DCP checkpoint written by another tool")
    return fmt.open(store, path, want)
