"""Training state beside the optimizer in ``optimizer/``: RNG, ``extra`` objects, and
the rule for per-rank state.

On disk (keys of the ``optimizer/`` DCP directory, values bytes: ``torch.save``
archives, read back as plain data only, :mod:`dcp_universal.format.state`)::

    train/extra/<name>       state_dict() of an extra object equal on every rank
    train/rank-<r>/<name>    per-rank state: "rng", and extras that differ across ranks

Per-rank state cannot follow a change of world size by itself: such a load raises
:class:`~dcp_universal.errors.PerRankStateError` before anything is read, unless the
name is skipped or the object defines ``load_resharded_state_dicts(states)``.
"""

from __future__ import annotations

import pickle
import random
from typing import Any, Iterable

import torch

from dcp_universal import _comm
from dcp_universal.errors import CheckpointMismatchError, PerRankStateError
from dcp_universal.format import state as state_blobs
from dcp_universal.format.manifest import Manifest, TrainingState
from dcp_universal.model.plan import LoadReport, Staged

__all__ = ["check_extra", "collect", "check_restorable", "stage"]

_EXTRA = "train/extra/"
_RANK = "train/rank-"
RNG = "rng"


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _state_of(obj) -> Any:
    return dict(obj) if isinstance(obj, dict) else obj.state_dict()


def _load_into(obj, state) -> None:
    if isinstance(obj, dict):
        obj.clear()
        obj.update(state)
    else:
        obj.load_state_dict(state)


def check_extra(extra: dict | None) -> dict:
    """``extra`` validated: names are non-empty strings without ``/``, values are dicts
    or have ``state_dict()`` / ``load_state_dict()``."""
    extra = dict(extra or {})
    for name, obj in extra.items():
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"extra name {name!r}: expected a non-empty string without '/'")
        if not isinstance(obj, dict) and not (hasattr(obj, "state_dict")
                                              and hasattr(obj, "load_state_dict")):
            raise TypeError(f"extra[{name!r}] is a {type(obj).__name__}: expected a dict or an "
                            "object with state_dict() and load_state_dict()")
    return extra


def collect(extra: dict) -> tuple[dict[str, Any], TrainingState]:
    """The training state to save, as DCP entries, and its manifest record.

    Collective under a process group: one ``all_gather_object`` per extra object (to tell
    state equal on every rank from per-rank state), in sorted name order.
    """
    rank = _comm.rank()
    state: dict[str, Any] = {f"{_RANK}{rank}/{RNG}": state_blobs.dumps(_rng_state())}
    per_rank = [RNG]
    for name, obj in sorted(extra.items()):
        value = _state_of(obj)
        try:
            same, error = pickle.dumps(value), None  # equal on every rank: saved once
        except Exception as e:  # told to every rank by the gather below: no rank waits
            same, error = None, f"{type(e).__name__}: {e}"
        gathered = _comm.all_gather_object((same, error))
        failed = [(r, err) for r, (_, err) in enumerate(gathered) if err is not None]
        if failed:
            raise TypeError(
                f"extra[{name!r}].state_dict() cannot be saved on rank(s) "
                f"{[r for r, _ in failed]} ({failed[0][1]}): it must be picklable data "
                "(numbers, strings, containers, tensors) -> drop what cannot be pickled "
                "(locks, open files, generators) from its state_dict()")
        if all(b == same for b, _ in gathered):
            state[f"{_EXTRA}{name}"] = state_blobs.dumps(value)
        else:
            state[f"{_RANK}{rank}/{name}"] = state_blobs.dumps(value)
            per_rank.append(name)
    return state, TrainingState(extra=sorted(extra), per_rank=per_rank)


def check_restorable(m: Manifest, extra: dict, skip: set[str]) -> None:
    """Raise before anything is read if the load cannot restore what it was asked to."""
    missing = sorted(n for n in extra if n not in m.training_state.extra)
    if missing:
        raise CheckpointMismatchError(
            f"extra{missing} {'is' if len(missing) == 1 else 'are'} not in step {m.step}; it "
            f"holds {m.training_state.extra}. Nothing was loaded.")
    if m.world_size == _comm.world_size():
        return
    # the RNG has no meaning across world sizes: each rank keeps its own (a report note)
    stuck = [name for name in m.training_state.per_rank
             if name not in skip and name in extra
             and not hasattr(extra.get(name), "load_resharded_state_dicts")]
    if stuck:
        raise PerRankStateError(
            f"step {m.step} was saved by {m.world_size} ranks and is loaded by "
            f"{_comm.world_size()}; its per-rank state {stuck} has no resharding rule. Pass "
            f"skip_per_rank={stuck!r} to keep this job's current values, or give the "
            "object a load_resharded_state_dicts(states) method. Nothing was loaded.")


def requested(m: Manifest, extra: dict, skip: Iterable[str]) -> tuple[dict[str, Any],
                                                                     LoadReport, bool]:
    """``(wanted, report, rng)``: the byte items of the optimizer directory a load of
    ``extra`` reads (key -> ``b""``, to be filled), the report's notes on what is kept or
    resharded, and whether this rank's RNG state is among them."""
    skip = set(skip)
    per_rank = set(m.training_state.per_rank)
    saved_world = m.world_size
    same_world = saved_world == _comm.world_size()
    rank = _comm.rank()
    wanted: dict[str, Any] = {}
    report = LoadReport()
    for name in sorted(extra):
        if name not in per_rank:
            wanted[f"{_EXTRA}{name}"] = b""
        elif same_world:
            wanted[f"{_RANK}{rank}/{name}"] = b""
        elif name in skip:
            report.notes.append(f"per-rank state {name!r} kept as is (world size "
                                f"{saved_world} -> {_comm.world_size()})")
        else:  # resharding rule: every saved rank's state
            wanted.update({f"{_RANK}{r}/{name}": b"" for r in range(saved_world)})
            report.notes.append(f"per-rank state {name!r} resharded from {saved_world} ranks")
    rng = same_world and RNG in per_rank  # a converted step's optimizer/ holds no RNG
    if rng:
        wanted[f"{_RANK}{rank}/{RNG}"] = b""
    elif RNG not in per_rank:
        report.notes.append(f"step {m.step} holds no RNG state (converted from another "
                            "format): the RNG is left as it is")
    else:
        report.notes.append(f"RNG state kept as is (world size {saved_world} -> "
                            f"{_comm.world_size()})")
    return wanted, report, rng


def stage(m: Manifest, opt_dir: str, extra: dict, skip: Iterable[str],
          blobs: dict[str, Any], *, trusted: bool = False) -> Staged:
    """Decode the training state of ``opt_dir`` (plain data only unless ``trusted``:
    :mod:`dcp_universal.format.state`); the returned commit installs it. ``blobs``: the
    :func:`requested` items, read by the caller with the directory's other byte items.

    Collective: one ``all_gather_object``, every rank.
    """
    skip = set(skip)
    wanted, report, rng = requested(m, extra, skip)
    per_rank = set(m.training_state.per_rank)
    saved_world = m.world_size
    same_world = saved_world == _comm.world_size()
    rank = _comm.rank()
    wanted = {k: blobs[k] for k in wanted}
    # decoded before the commit, and agreed on: a blob refused on one rank fails all
    values = _comm.agreed(lambda: {
        k: state_blobs.loads(v, f"training state {k!r} of {opt_dir}", trusted=trusted)
        for k, v in wanted.items()})

    def commit() -> None:
        for name, obj in sorted(extra.items()):
            if name not in per_rank:
                _load_into(obj, values[f"{_EXTRA}{name}"])
            elif same_world:
                _load_into(obj, values[f"{_RANK}{rank}/{name}"])
            elif name not in skip:
                obj.load_resharded_state_dicts(
                    [values[f"{_RANK}{r}/{name}"] for r in range(saved_world)])
        if rng:
            _set_rng_state(values[f"{_RANK}{rank}/{RNG}"])

    return Staged(report, commit)
