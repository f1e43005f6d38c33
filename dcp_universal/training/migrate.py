"""Migrations: what another tool's checkpoint holds beside its model, carried where it
maps and named where it does not.

``convert`` and ``mgr.load(..., init_from=...)`` take the model of a foreign checkpoint
through :mod:`dcp_universal.sources` (the model alone, found as a load finds it). This
module finds the rest (:func:`find`) and carries it:

* optimizer state keyed by parameter FQN (``get_optimizer_state_dict``, as torchtitan's
  ``optimizer`` and a plain ``dcp.save({"model", "optim"})`` hold it): by canonical name
  onto the target optimizer (:func:`~dcp_universal.training.optim_io.stage_saved`), or
  written into a converted step's ``optimizer/`` (no optimizer is needed to name it);
* optimizer state keyed by position (a ``torch.save`` file's, Accelerate's
  ``optimizer.bin``): onto a live optimizer only, with the legacy checks
  (:func:`~dcp_universal.interop.legacy.stage_legacy_optimizer`); ``convert`` cannot
  name its parameters and says so;
* an LR scheduler's state (Accelerate's ``scheduler.bin``, torchtitan's ``lr_scheduler``
  entries, read as plain data) into the one LR scheduler the caller passes in ``extra``;
* the step number: the source's record (a legacy file's ``iter_num``, torchtitan's
  ``train_state.step``) and its directory's name (torchtitan's ``step-<N>``,
  Accelerate's ``checkpoint_<N>``); two that disagree are not guessed between.

Everything else (RNG states, data loader state, param-group hyperparameters of another
tool's optimizer, unknown entries) is named in :attr:`Carried.left`, which the load
report's notes and ``convert``'s warning list.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, cast

import torch
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from dcp_universal import _comm
from dcp_universal.errors import CheckpointMismatchError
from dcp_universal.interop import legacy
from dcp_universal.interop.accelerate import FSDP_OPTIMIZER_DIR as FSDP_OPTIMIZER
from dcp_universal.model.plan import LoadReport, Staged, TensorInfo
from dcp_universal.model.view import ModelView
from dcp_universal.sources import DcpDir
from dcp_universal.sources.foreign import Beside
from dcp_universal.storage import Storage, dcp_io
from dcp_universal.training import optim_io

__all__ = ["Carried", "find", "stage", "converted_optimizer", "SCHEDULER_NAMES"]

#: directory names that number a step: torchtitan's ``step-1000``, Accelerate's
#: ``checkpoint_7`` (ProjectConfiguration(automatic_checkpoint_naming=True))
_STEP_DIR = re.compile(r"^(?:step-|checkpoint_)(\d+)$")
#: ``extra`` names that take a source's LR scheduler state (or any LRScheduler object)
SCHEDULER_NAMES = ("lr_scheduler", "scheduler")


@dataclasses.dataclass
class Carried:
    """What a foreign checkpoint holds beside its model, and where.

    Attributes:
        desc: the source's path, for messages.
        step: the step number the source records, or None.
        step_from: where it was found (for notes), or why none was taken.
        conflict: two records of the step that disagree (then ``step`` is None).
        by_name: optimizer state keyed by parameter FQN: its directory and keys.
        by_position: reads an ``optimizer.state_dict()`` keyed by position.
        scheduler: reads an LR scheduler's ``state_dict()``.
        scheduler_at: where the source keeps it (``scheduler.bin``), for messages.
        left: what is not carried, named.
    """

    desc: str
    step: int | None = None
    step_from: str | None = None
    conflict: str | None = None
    by_name: tuple[DcpDir, Beside] | None = None
    by_position: Callable[[], Any] | None = None
    scheduler: Callable[[], Any] | None = None
    scheduler_at: str = "scheduler.bin"
    left: list[str] = dataclasses.field(default_factory=list)

    def left_note(self) -> str | None:
        if not self.left:
            return None
        return f"not carried from {self.desc} (left behind): {', '.join(self.left)}"


def _dir_step(path: str) -> int | None:
    m = _STEP_DIR.match(path.rstrip("/").rsplit("/", 1)[-1])
    return int(m.group(1)) if m else None


def find(store: Storage, path: str, meta, *, trusted: bool = False) -> Carried:
    """What the source at ``path`` (opened, its ``meta``) holds beside its model.
    Reads one 0-dim tensor at most (a DCP checkpoint's ``train_state.step``); every
    rank may call it (nothing collective)."""
    out = Carried(desc=path)
    records: list[tuple[int, str]] = []
    if meta.get("step") is not None:  # a legacy file's iter_num / global_step / step
        records.append((int(meta["step"]), "the file's iter_num / global_step"))
    beside: Beside | None = meta.get("beside")
    d: DcpDir | None = meta.get("dir")
    if beside is not None and d is not None:
        if beside.optimizer:
            out.by_name = (d, beside)
        if beside.step_key is not None:
            records.append((_read_step(d, beside.step_key, trusted), beside.step_key))
        if beside.scheduler:
            entries = beside.scheduler
            out.scheduler = lambda: _read_entries(d, entries, trusted)
            out.scheduler_at = str(beside.scheduler_at)
        out.left += beside.left
    if meta.get("optimizer") is not None:  # a legacy file's optimizer.state_dict()
        saved = meta["optimizer"]
        out.by_position = lambda: saved
    accel = meta.get("accelerate")
    if accel is not None:
        if accel.get("optimizer_by_name") is not None:  # FSDP's optimizer_0/
            out.by_name = accel["optimizer_by_name"]
            out.left += [f"{FSDP_OPTIMIZER}/{g}" for g in out.by_name[1].left]
        elif accel["optimizer"]:
            out.by_position = lambda: legacy.load_file(store, accel["optimizer"])
        if accel["scheduler"]:
            out.scheduler = lambda: legacy.load_file(store, accel["scheduler"])
        out.left += [f"{name}{_what(name)}" for name in accel["left"]]
    named = _dir_step(path)
    if named is not None:
        records.append((named, f"the directory name {path.rstrip('/').rsplit('/', 1)[-1]}"))
    if len({s for s, _ in records}) > 1:
        out.conflict = "; ".join(f"{s} ({how})" for s, how in records)
    elif records:
        out.step, out.step_from = records[0][0], " and ".join(how for _, how in records)
    return out


def _what(name: str) -> str:
    if name.startswith("random_states"):
        return " (RNG states)"
    if name.startswith(("sampler", "dl_state_dict")):
        return " (data loader state)"
    return ""


def _read_step(d: DcpDir, key: str, trusted: bool) -> int:
    meta = d.metadata if d.metadata is not None else dcp_io.read_metadata(d.store, d.path)
    m = cast(TensorStorageMetadata, meta.state_dict_metadata[key])  # a tensor entry
    box = {key: torch.empty(tuple(m.size), dtype=m.properties.dtype)}
    dcp_io.load_state(d.store, box, d.path, single_process=True, trusted=trusted)
    return int(box[key].item())


def _read_entries(d: DcpDir, entries: dict[str, str], trusted: bool) -> dict[str, Any]:
    """Byte entries of a DCP directory (plain data unless ``trusted``), by their keys in
    ``entries`` (key -> stored key). This process reads alone."""
    box: dict[str, Any] = {raw: None for raw in entries.values()}
    dcp_io.load_state(d.store, box, d.path, single_process=True, trusted=trusted)
    return {key: box[raw] for key, raw in entries.items()}


def _saved_by_name(d: DcpDir, beside: Beside, trusted: bool, *,
                   single_process: bool = False) -> optim_io.SavedState:
    # optimizer state entries are tensors
    md = cast("dict[str, TensorStorageMetadata]",
              (d.metadata or dcp_io.read_metadata(d.store, d.path)).state_dict_metadata)
    entries = {name: {key: (raw, TensorInfo(tuple(md[raw].size), md[raw].properties.dtype))
                      for key, raw in state.items()}
               for name, state in beside.optimizer.items()}
    return optim_io.SavedState(
        {"param_groups": [], "scalars": {}, "ties": []}, entries,
        lambda state: dcp_io.load_state(d.store, state, d.path, trusted=trusted,
                                        single_process=single_process))


def converted_optimizer(carried: Carried, *, trusted: bool = False) -> dict[str, Any] | None:
    """The ``optimizer/`` state dict of a converted step: the source's optimizer state by
    FQN, read whole in this process. None: there is none, or only by position (which
    needs the live optimizer to name its parameters). Not collective."""
    if carried.by_name is None:
        return None
    d, beside = carried.by_name
    saved = _saved_by_name(d, beside, trusted, single_process=True)
    full = {raw: torch.empty(info.shape, dtype=info.dtype)
            for entry in saved.entries.values() for raw, info in entry.values()}
    saved.read(full)
    return optim_io.converted_state({name: {key: full[raw] for key, (raw, _) in entry.items()}
                                     for name, entry in saved.entries.items()})


def _schedulers(extra: dict) -> list[str]:
    return sorted(n for n, obj in extra.items() if n in SCHEDULER_NAMES
                  or isinstance(obj, torch.optim.lr_scheduler.LRScheduler))


def stage(view: ModelView, optimizer, extra: dict, carried: Carried, *, fresh: set[str],
          layout: dict, hyperparams: str, trusted: bool = False) -> Staged:
    """Map what ``carried`` holds onto ``optimizer`` and the LR scheduler in ``extra``;
    the report names what was carried and what was not. Collective (one ``dcp.load``)
    for optimizer state by name; every rank agrees on the rest before anything changes.

    Raises:
        CheckpointMismatchError: the positional state does not fit (legacy checks), the
            scheduler's param groups differ, or two schedulers could take the state.
    """
    parts: list[Staged] = []
    carried_what: list[str] = []
    if optimizer is not None and carried.by_name is not None:
        d, beside = carried.by_name
        part = optim_io.stage_saved(view, optimizer, _saved_by_name(d, beside, trusted),
                                    hyperparams=hyperparams)
        part.report.notes.append(
            f"optimizer state carried from {beside.optimizer_at}state by parameter name "
            f"({len(part.report.optimizer_restored)} restored)")
        parts.append(part)
        carried_what.append("its optimizer state")
    elif optimizer is not None and carried.by_position is not None:
        saved = carried.by_position
        parts.append(_comm.agreed(lambda: legacy.stage_legacy_optimizer(
            view, optimizer, saved(), fresh=fresh, layout=layout, hyperparams=hyperparams,
            desc=carried.desc)))
        carried_what.append("its optimizer state (by position)")
    elif carried.by_name is not None or carried.by_position is not None:
        parts.append(Staged(LoadReport(notes=[
            f"{carried.desc} holds optimizer state; no optimizer was given, so none was "
            "carried"]), lambda: None))
    names = _schedulers(extra)
    if carried.scheduler is not None and names:
        parts.append(_comm.agreed(lambda: _stage_scheduler(extra, names, carried)))
        carried_what.append(f"its LR scheduler into extra[{names[0]!r}]")
    elif carried.scheduler is not None:
        carried.left.append(f"{carried.scheduler_at} (LR scheduler: pass it in "
                            "extra={'lr_scheduler': scheduler} to carry it)")
    rest = sorted(set(extra) - set(names[:1] if carried.scheduler is not None else []))
    report = LoadReport(step=carried.step)
    if carried.step is not None:
        report.notes.append(f"step {carried.step} taken from {carried.step_from}")
    elif carried.conflict:
        report.notes.append(f"the step number is ambiguous ({carried.conflict}): none taken")
    if rest:
        report.notes.append(f"extra{rest} left as they are: {carried.desc} holds no state "
                            "this library maps onto them")
    report.notes.extend(filter(None, [carried.left_note()]))
    report.notes.append("carried: " + (", ".join(carried_what) or "the model alone"))
    parts.append(Staged(report, lambda: None))
    return Staged.combine(parts)


def _stage_scheduler(extra: dict, names: list[str], carried: Carried) -> Staged:
    if len(names) > 1:
        raise CheckpointMismatchError(
            f"{carried.desc} holds one LR scheduler, and extra has {len(names)} that could "
            f"take it ({names}) -> pass only the scheduler to restore under "
            f"extra={{'lr_scheduler': ...}}")
    target = extra[names[0]]
    assert carried.scheduler is not None  # its caller checked
    state = carried.scheduler()
    saved = state.get("base_lrs") if isinstance(state, dict) else None
    mine = getattr(target, "base_lrs", None)
    if saved is None or (mine is not None and len(saved) != len(mine)):
        raise CheckpointMismatchError(
            f"{carried.desc}: {carried.scheduler_at} is for {len(saved or [])} param groups "
            f"(base_lrs), extra[{names[0]!r}] schedules {len(mine or [])} -> build the "
            "scheduler over an optimizer with the saved run's param groups, or leave it "
            "out of extra (it starts fresh)")
    return Staged(LoadReport(notes=[f"LR scheduler state carried into extra[{names[0]!r}] "
                                    f"(last_epoch {state.get('last_epoch')})"]),
                  lambda: target.load_state_dict(state))
