"""Optimizer state by canonical parameter name, so it survives rewrapping, resharding
and adapter changes.

On disk (inside a step's ``optimizer/`` DCP directory)::

    state/<canonical param>/<name>   tensors shaped like the parameter (sharded like it
                                     under FSDP2) or 0-dim (Adam's ``step``)
    optim/meta                       bytes: param groups with canonical names, and
                                     non-tensor per-parameter state

Loading transfers state parameter by parameter: restored where the target optimizer
holds a trainable parameter of the same canonical name and shape, fresh otherwise
(the optimizer initialises it on its first step); saved state with no such target is
dropped. All three land in the :class:`~dcp_universal.LoadReport`.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Any, Callable, cast

import torch
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from dcp_universal.format import state as state_blobs
from dcp_universal.storage import dcp_io
from dcp_universal.errors import CheckpointError
from dcp_universal.model.plan import LoadReport, Staged, TensorInfo
from dcp_universal.storage import Storage
from dcp_universal.model.view import ModelView

__all__ = ["optimizer_state", "stage_optimizer", "stage_saved", "SavedState",
           "converted_state", "META_KEY", "HYPERPARAM_SOURCES", "check_hyperparams"]

logger = logging.getLogger(__name__)

META_KEY = "optim/meta"
_STATE = "state/"
HYPERPARAM_SOURCES = ("checkpoint", "current")


def check_hyperparams(hyperparams: str) -> None:
    if hyperparams not in HYPERPARAM_SOURCES:
        raise ValueError(f"hyperparams={hyperparams!r}: expected one of {HYPERPARAM_SOURCES}")


def _warn_frozen(optimizer, names: dict[int, str]) -> None:
    frozen = [names[id(p)] for g in optimizer.param_groups for p in g["params"] if not p.requires_grad]
    if frozen:
        total = sum(len(g["params"]) for g in optimizer.param_groups)
        warnings.warn(
            f"the optimizer was given {total} parameters of which {len(frozen)} are frozen "
            f"(requires_grad=False), e.g. {frozen[:5]}; build it from "
            "[p for p in model.parameters() if p.requires_grad]", stacklevel=3)


def optimizer_state(view: ModelView, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A flat DCP state dict of ``optimizer`` keyed by canonical parameter names."""
    names = view.optimizer_param_names(optimizer)
    _warn_frozen(optimizer, names)
    out: dict[str, Any] = {}
    scalars: dict[str, dict[str, Any]] = {}
    groups = []
    for group in optimizer.param_groups:
        groups.append({**{k: v for k, v in group.items() if k != "params"},
                       "params": [names[id(p)] for p in group["params"]]})
        for p in group["params"]:
            name = names[id(p)]
            for key, value in optimizer.state.get(p, {}).items():
                if not isinstance(value, torch.Tensor):
                    scalars.setdefault(name, {})[key] = value
                elif value.dim() == 0 or tuple(value.shape) == tuple(p.shape):
                    out[f"{_STATE}{name}/{key}"] = value
                else:
                    raise CheckpointError(
                        f"optimizer state {key!r} of {name!r} has shape {tuple(value.shape)}, "
                        f"neither 0-dim nor the parameter's {tuple(p.shape)}: it cannot be "
                        "resharded by name; dcp_universal supports element-wise optimizers "
                        "(SGD, Adam, AdamW, ...)")
    out[META_KEY] = state_blobs.dumps({"param_groups": groups, "scalars": scalars,
                                       "ties": [list(g) for g in view.ties]})
    return out


@dataclasses.dataclass(frozen=True)
class SavedState:
    """Optimizer state saved by canonical parameter name, not read yet.

    Attributes:
        meta: ``param_groups`` (canonical names; empty: not recorded), ``scalars``
            (non-tensor state by name) and ``ties``.
        entries: canonical name -> state key -> ``(stored key, shape and dtype)``.
        read: ``read(state)`` fills stored key -> tensor (collective as ``dcp.load``).
    """

    meta: dict
    entries: dict[str, dict[str, tuple[str, TensorInfo]]]
    read: Callable[[dict[str, torch.Tensor]], None]


def _read_meta(opt_dir: str, store: Storage, trusted: bool, metadata: Metadata,
               meta_blob: bytes | None) -> SavedState:
    md = metadata.state_dict_metadata
    if META_KEY not in md or meta_blob is None:
        raise CheckpointError(f"{opt_dir} holds no optimizer state ({META_KEY} missing)")
    entries: dict[str, dict[str, tuple[str, TensorInfo]]] = {}
    for key, m in md.items():
        if key.startswith(_STATE):
            name, _, state_key = key[len(_STATE):].rpartition("/")
            t = cast(TensorStorageMetadata, m)  # optimizer state entries are tensors
            entries.setdefault(name, {})[state_key] = (
                key, TensorInfo(tuple(t.size), t.properties.dtype))
    meta = state_blobs.loads(meta_blob, f"optimizer metadata of {opt_dir}", trusted=trusted)
    return SavedState(meta, entries, lambda state: dcp_io.load_state(
        store, state, opt_dir, trusted=trusted, metadata=metadata))


def converted_state(state: dict[str, dict[str, torch.Tensor]]) -> dict[str, Any]:
    """A flat DCP state dict of an ``optimizer/`` directory from another tool's state
    (canonical name -> state key -> tensor, tensors only): no param groups are recorded
    (a load keeps the target's), no scalars, no ties."""
    out: dict[str, Any] = {f"{_STATE}{name}/{key}": t for name, entry in state.items()
                           for key, t in entry.items()}
    out[META_KEY] = state_blobs.dumps({"param_groups": [], "scalars": {}, "ties": []})
    return out


def stage_optimizer(view: ModelView, optimizer: torch.optim.Optimizer, opt_dir: str, *,
                    hyperparams: str, store: Storage, metadata: Metadata,
                    meta_blob: bytes | None, trusted: bool = False) -> Staged:
    """Read the saved state into new tensors; the returned commit installs it, and its
    report says what was restored, fresh and dropped.

    Collective: one ``dcp.load`` of ``opt_dir`` (its state), every rank.

    Args:
        hyperparams: ``"checkpoint"`` restores lr, betas, weight decay, ... from the
            checkpoint when the param-group structure matches; ``"current"`` keeps the
            values the optimizer was built with.
        metadata: ``opt_dir``'s DCP metadata, read (and agreed on) by the caller.
        meta_blob: its ``META_KEY`` item, read by the caller with the directory's other
            byte items in one round (``None``: the directory holds none).
    """
    check_hyperparams(hyperparams)
    return stage_saved(view, optimizer, _read_meta(opt_dir, store, trusted, metadata, meta_blob),
                       hyperparams=hyperparams)


def stage_saved(view: ModelView, optimizer: torch.optim.Optimizer, saved_state: SavedState,
                *, hyperparams: str) -> Staged:
    """:func:`stage_optimizer` of state found anywhere (a step's ``optimizer/``, another
    tool's optimizer by FQN): one ``saved_state.read`` (collective as it is)."""
    names = view.optimizer_param_names(optimizer)
    _warn_frozen(optimizer, names)
    meta, saved = saved_state.meta, saved_state.entries
    report = LoadReport()
    params = {names[id(p)]: p for g in optimizer.param_groups for p in g["params"]}
    to_read: dict[str, torch.Tensor] = {}
    restored, source_of = {}, {}
    saved_ties = [set(g) for g in meta.get("ties", [])]
    # exact names first, so a saved entry goes to the parameter of its own name when the
    # target has one; otherwise to a parameter tied to it (in the target or at save): a
    # tied parameter's state is one entry, under whichever name the saver listed first
    by_exact = sorted(params, key=lambda n: n not in saved)
    for name in by_exact:
        p = params[name]
        aliases = set(view.tie_of(name))
        aliases.update(*[g for g in saved_ties if g & aliases])
        found = [n for n in [name, *sorted(aliases - {name})]
                 if n in saved and n not in source_of]
        entries = saved.get(found[0]) if found else None
        fits = entries is not None and p.requires_grad and all(
            len(i.shape) == 0 or tuple(i.shape) == tuple(p.shape) for _, i in entries.values())
        if not fits:
            report.optimizer_fresh.append(name)
            continue
        assert entries is not None  # fits
        state = {}
        for key, (raw, info) in entries.items():
            t = (torch.empty((), dtype=info.dtype) if len(info.shape) == 0
                 else torch.empty_like(p, dtype=info.dtype))
            state[key] = to_read[raw] = t
        restored[name] = state
        source_of[found[0]] = name
    report.optimizer_dropped.extend(sorted(n for n in saved if n not in source_of))
    report.optimizer_restored.extend(restored)
    if to_read:
        saved_state.read(to_read)
    groups = _groups_rule(optimizer, names, meta["param_groups"], report, hyperparams)

    def commit() -> None:
        for name, state in restored.items():
            state.update(meta["scalars"].get(name, {}))
            optimizer.state[params[name]] = state
        for group, saved_group in groups:
            group.update({k: v for k, v in saved_group.items() if k != "params"})

    return Staged(report, commit)


def _groups_rule(optimizer, names, saved_groups, report: LoadReport,
                 hyperparams: str) -> list[tuple[dict, dict]]:
    """``(group, saved group)`` pairs whose hyperparameters the load restores (none when
    the structure differs or ``hyperparams="current"``), with the decision in ``report``."""
    current = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    if not saved_groups:  # converted from another tool: its groups were not carried
        report.notes.append("the checkpoint records no optimizer param groups (another "
                            "tool's state, carried by parameter name): the target's groups "
                            "and hyperparameters stand")
        return []
    saved = [g["params"] for g in saved_groups]
    if [set(g) for g in current] != [set(g) for g in saved]:
        report.notes.append(
            f"optimizer param groups differ (checkpoint: {len(saved)} groups of "
            f"{[len(g) for g in saved]} params; target: {len(current)} groups of "
            f"{[len(g) for g in current]}); the target's groups and hyperparameters stand")
        return []
    if hyperparams == "current":
        report.notes.append("optimizer hyperparameters kept from the current optimizer")
        return []
    report.notes.append("optimizer param groups and hyperparameters restored from the checkpoint")
    return list(zip(optimizer.param_groups, saved_groups))
