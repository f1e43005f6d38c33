"""Step items: what a committed step holds, one class each.

An item owns one directory of the step (its ``name``, also its key in the manifest's
``items``): how it is written (:meth:`Item.save`), what a load checks before reading
anything (:meth:`Item.check`), how it is read (:meth:`Item.stage`, returning the same
:class:`~dcp_universal.model.plan.Staged` shape as every part of a load: its report and its
commit), and what it records in the manifest (through the context's manifest). The
manager runs its items in order, the same on every rank:

    save, every rank:  item.save(ctx) for each item      (reads model and state now)
                       the returned writes, in that order (after every item's save)
    load, every rank:  item.check(ctx) for each item     (before any read)
                       item.stage(ctx) for each item     (reads, installs nothing)
                       every commit, in that order

The library's items are :class:`AdaptersItem` (LoRA runs: the frozen base, once per
content, and ``adapters/``), :class:`ModelItem` (``model/``: the merged model) and
:class:`OptimizerItem` (``optimizer/``: optimizer state by canonical name, and the
training state: RNG and ``extra`` objects). A run adds its own with
``CheckpointManager(root, items=[...])``; a reader that does not know an item keeps it in
the manifest and says so in the load report. A new item is one class::

    >>> class Ema(Item):
    ...     name = "ema"
    ...     def __init__(self, ema_model): self.ema = ema_model
    ...     def save(self, ctx):
    ...         state = ctx.snapshot(dict(self.ema.state_dict()), "ema")
    ...         return lambda path, group: dcp_io.save_state(ctx.store, state, path,
    ...                                                      group=group)
    ...     def stage(self, ctx):
    ...         ...  # read join(ctx.path, "ema") into buffers; commit copies them
    >>> CheckpointManager(root, items=[Ema(ema_model)])
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable

import torch

from dcp_universal import _comm
from dcp_universal.storage import dcp_io
from dcp_universal.training import optim_io, training_state
from dcp_universal.training.base_store import BaseStore
from dcp_universal.errors import CheckpointError
from dcp_universal.storage.integrity import check_files
from dcp_universal.model_io.load import stage_model
from dcp_universal.format.manifest import (ADAPTERS_DIR, MODEL_DIR, OPTIMIZER_DIR, FileRecord,
                                           Manifest)
from dcp_universal.model.plan import LoadReport, Staged
from dcp_universal.model_io.save import model_writer
from dcp_universal.storage import Storage, join
from dcp_universal.model.view import ModelView

__all__ = ["Item", "SaveContext", "LoadContext", "Write", "AdaptersItem", "ModelItem",
           "OptimizerItem", "BUILTIN"]

#: ``write(item_dir, group)`` -> the records of the files this rank wrote (collective on
#: ``group``: the save's, passed explicitly; an asynchronous save's background thread
#: runs the writes and nothing else)
Write = Callable[[str, Any], dict[str, FileRecord]]


@dataclasses.dataclass(kw_only=True)
class SaveContext:
    """What an item's save sees.

    Attributes:
        view: the model, through canonical names.
        optimizer / extra: as given to ``save``.
        store: the root's storage.
        manifest: the step's manifest, filled by the items (written at the commit).
        merge: how merged weights are written ("sharded" or "rank0").
        merged: also write a merged ``model/`` (LoRA runs).
        bases: the root's frozen-base store.
        snapshotter: an asynchronous save's ``Snapshotter.copy`` (``None``: a blocking save).
    """

    view: ModelView
    optimizer: torch.optim.Optimizer | None
    extra: dict
    store: Storage
    manifest: Manifest
    merge: str
    merged: bool
    bases: BaseStore
    snapshotter: Callable[[Any, str], Any] | None = None

    def snapshot(self, obj: Any, slot: str) -> Any:
        """What a write may read after ``save`` returned: a copy of ``obj`` for an
        asynchronous save (``slot`` names its buffers), ``obj`` itself otherwise."""
        return obj if self.snapshotter is None else self.snapshotter(obj, slot)


@dataclasses.dataclass(kw_only=True)
class LoadContext:
    """What an item's load sees: the arguments of ``CheckpointManager.load`` and the
    committed step (``path``, its ``manifest``)."""

    view: ModelView
    optimizer: torch.optim.Optimizer | None
    extra: dict
    path: str
    manifest: Manifest
    store: Storage
    strict: bool
    verify: bool | None
    hyperparams: str
    skip_per_rank: set[str]
    trusted: bool = False

    @property
    def training(self) -> bool:
        """Whether training state was asked for (an optimizer or ``extra`` given)."""
        return self.optimizer is not None or bool(self.extra)


class Item(abc.ABC):
    """One directory of a step. Subclasses set :attr:`name` and implement :meth:`save`;
    :meth:`check` and :meth:`stage` default to nothing."""

    #: the directory under the step, and the item's key in the manifest's ``items``
    name: str = "abstract"

    @abc.abstractmethod
    def save(self, ctx: SaveContext) -> Write | None:
        """Collective (default group, the caller's thread). Read what the item writes now
        (through ``ctx.snapshot``), record what the manifest should say, and return the
        write (``None``: nothing this step), which may read only that snapshot."""

    def check(self, ctx: LoadContext) -> None:
        """Raise before anything is read if the load cannot do what it was asked."""

    def stage(self, ctx: LoadContext) -> Staged | None:
        """Collective. Plan and read the item; install nothing (``None``: not loaded)."""
        return None


class AdaptersItem(Item):
    """LoRA runs: the frozen base (``base-<fingerprint>/`` beside the steps, written once
    per content) and ``adapters/`` (every tensor that is not frozen base weight). Loaded
    with the model (:class:`ModelItem`), which composes base and adapters."""

    name = ADAPTERS_DIR

    def save(self, ctx: SaveContext) -> Write | None:
        if not ctx.view.sites:
            return None
        m = ctx.manifest
        m.adapters = ctx.view.adapters_record()
        m.base, m.base_files = ctx.bases.save(ctx.view)
        m.quantized = ctx.view.quantization()  # 4-bit weights: the base holds them packed
        m.raise_version()
        trainable = ctx.snapshot(ctx.view.trainable_tensors(), "adapters")
        return lambda path, group: dcp_io.save_state(ctx.store, trainable, path, group=group)


class ModelItem(Item):
    """``model/``: the universal model (canonical names, adapters merged). Written by
    runs without adapters, and by LoRA runs when a merged copy is asked for; every load
    reads the model (from ``model/``, or the base and adapters)."""

    name = MODEL_DIR

    def save(self, ctx: SaveContext) -> Write | None:
        if ctx.view.sites and not ctx.merged:
            return None
        return model_writer(ctx.view, ctx.merge, ctx.store, snapshot=ctx.snapshotter)

    def stage(self, ctx: LoadContext) -> Staged:
        return stage_model(ctx.view, ctx.path, strict=ctx.strict, verify=ctx.verify,
                           stage=True, store=ctx.store, step_manifest=ctx.manifest,
                           trusted=ctx.trusted)


class OptimizerItem(Item):
    """``optimizer/``: the optimizer's state by canonical name
    (:mod:`~dcp_universal.training.optim_io`) and the training state
    (:mod:`~dcp_universal.training.training_state`). The directory exists in every step; the
    manifest's ``items.optimizer`` says whether it holds optimizer state."""

    name = OPTIMIZER_DIR

    def save(self, ctx: SaveContext) -> Write:
        state, ctx.manifest.training_state = training_state.collect(ctx.extra)
        if ctx.optimizer is not None:
            state.update(optim_io.optimizer_state(ctx.view, ctx.optimizer))
        state = ctx.snapshot(state, "optimizer")
        ctx.manifest.items[self.name] = ctx.optimizer is not None
        return lambda path, group: dcp_io.save_state(ctx.store, state, path, group=group)

    def check(self, ctx: LoadContext) -> None:
        m = ctx.manifest
        if ctx.optimizer is not None and not m.has(self.name) and m.archived:
            # its optimizer state existed and retention removed it: resuming from it would
            # quietly restart the moments while a newer, whole step may be the one meant
            raise CheckpointError(
                f"step {m.step} was archived by retention (keep_every): its optimizer state "
                "was removed -> resume from a step kept whole (mgr.steps()), or load this "
                "one with optimizer=None and start the optimizer fresh yourself")
        if ctx.training:
            training_state.check_restorable(m, ctx.extra, ctx.skip_per_rank)
            check_files(ctx.store, ctx.path, m.files, checksums=ctx.verify,
                        prefixes=(f"{self.name}/",))

    def stage(self, ctx: LoadContext) -> Staged | None:
        opt_dir = join(ctx.path, self.name)
        parts = []
        with_state = ctx.optimizer is not None and ctx.manifest.has(self.name)
        with_training = ctx.training and bool(ctx.manifest.files_under(self.name))
        # read and checked once for the directory's two or three reads (each parse of a
        # large optimizer's metadata costs about as much as its read from a warm cache)
        metadata = (_comm.agreed(dcp_io.read_metadata, ctx.store, opt_dir, trusted=ctx.trusted)
                    if with_state or with_training else None)
        # the directory's byte items (the optimizer's param groups, the training state)
        # in one read, before its tensors
        blobs: dict | None = None
        if metadata is not None:
            blobs = {}
            if with_state and optim_io.META_KEY in metadata.state_dict_metadata:
                blobs[optim_io.META_KEY] = b""
            if with_training:
                blobs.update(training_state.requested(ctx.manifest, ctx.extra,
                                                      ctx.skip_per_rank)[0])
            if blobs:
                dcp_io.load_state(ctx.store, blobs, opt_dir, trusted=ctx.trusted,
                                  metadata=metadata)
        if ctx.optimizer is not None and not with_state:
            parts.append(_fresh_optimizer(ctx))
        elif ctx.optimizer is not None:
            assert metadata is not None and blobs is not None  # read above (with_state)
            parts.append(optim_io.stage_optimizer(
                ctx.view, ctx.optimizer, opt_dir, hyperparams=ctx.hyperparams, store=ctx.store,
                metadata=metadata, meta_blob=blobs.get(optim_io.META_KEY),
                trusted=ctx.trusted))
        if ctx.training and not with_training:
            # a converted step has no optimizer/ at all (check() refused any extra asked)
            report = LoadReport(notes=[f"step {ctx.manifest.step} holds no training state "
                                       "(converted from another format): the RNG is left "
                                       "as it is"])
            parts.append(Staged(report, lambda: None))
        elif with_training:
            assert blobs is not None  # read above
            parts.append(training_state.stage(ctx.manifest, opt_dir, ctx.extra,
                                              ctx.skip_per_rank, blobs, trusted=ctx.trusted))
        return Staged.combine(parts) if parts else None


def _fresh_optimizer(ctx: LoadContext) -> Staged:
    """A step saved without optimizer state (a model-only save, a converted checkpoint):
    the optimizer is left as it is, fresh, and the report says so."""
    assert ctx.optimizer is not None  # its caller checked
    names = ctx.view.optimizer_param_names(ctx.optimizer)
    report = LoadReport()
    report.optimizer_fresh.extend(sorted(
        {names[id(p)] for g in ctx.optimizer.param_groups for p in g["params"]}))
    report.notes.append(
        f"step {ctx.manifest.step} holds no optimizer state (saved without an optimizer, "
        f"or converted from another format): the model is loaded and the optimizer starts "
        f"fresh ({len(report.optimizer_fresh)} parameters)")
    return Staged(report, lambda: None)


#: the library's items, in the order they are written and read
BUILTIN: tuple[Item, ...] = (AdaptersItem(), ModelItem(), OptimizerItem())
