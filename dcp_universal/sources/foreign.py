"""DCP checkpoints written by other tools: their keys, made canonical.

A model directory written by this library already has canonical keys. Other tools write
other layouts, and this module maps them onto the target's canonical names before the
load is planned:

* wrapper infixes in the keys (``_orig_mod.``, a DDP ``module.`` root, FSDP1's and
  activation checkpointing's infixes, PEFT's ``base_model.model.`` root, ``.base_layer``
  and ``modules_to_save.<adapter>``), removed by string rules: with no module tree to walk,
  these are applied only when the keys as they are do not already cover the target;
* nested layouts (the DCP tutorial's ``{"app": {"model": ..., "optim": ...}}``, or a
  ``{"model": ...}`` dict): the prefix under which every model key is present, found or
  given;
* the other state saved beside the model (torchtitan's ``optimizer``, ``lr_scheduler``,
  ``dataloader`` and ``train_state``; a tutorial's ``app.optim``; any non-tensor entry),
  which a model load does not read and does not count as a mismatch;
* adapter factors of other tools (a PEFT model's ``x.lora_A.<adapter>.weight``) are
  handled by factor rules (:func:`dcp_universal.sources.dcp.register_factor_rule`; PEFT's
  is in :mod:`dcp_universal.interop.peft`).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

from dcp_universal import _torch_compat
from dcp_universal.errors import CheckpointMismatchError

__all__ = ["canonical_key", "Resolution", "resolve", "OTHER_STATE_NAMES", "Beside",
           "beside_model", "optimizer_only"]

# infixes of wrappers that are never a user's module name (compile, activation
# checkpointing, FSDP1): the attributes names.py walks through
_WRAPPER_PARTS = {attr for _, attr in _torch_compat.WRAPPER_CLASSES}

#: top-level names under which training tools save state other than the model
#: (torchtitan, the DCP tutorial, common hand-written loops)
OTHER_STATE_NAMES = frozenset({
    "optimizer", "optimizers", "optim", "lr_scheduler", "lr_schedulers", "scheduler",
    "dataloader", "data_loader", "train_state", "trainer", "rng", "rng_state", "extra",
    "step", "epoch"})


def canonical_key(key: str) -> str | None:
    """A foreign key's canonical name by string rules; ``None`` for a PEFT
    ``modules_to_save`` frozen original, which the trained model does not compute with."""
    parts = [p for p in key.split(".") if p not in _WRAPPER_PARTS]
    if parts[:1] == ["module"]:
        parts = parts[1:]
    if parts[:2] == ["base_model", "model"]:
        parts = parts[2:]
    out: list[str] = []
    i = 0
    while i < len(parts):
        if parts[i] == "original_module":
            return None
        if parts[i] == "modules_to_save":
            i += 2  # and the adapter name
            continue
        if parts[i] != "base_layer":
            out.append(parts[i])
        i += 1
    return ".".join(out)


@dataclasses.dataclass
class Resolution:
    """How a checkpoint's keys map onto canonical names.

    Attributes:
        raw_of: canonical key -> the key in the checkpoint.
        other: checkpoint keys that are not the model's (other state, not read).
        hidden: PEFT ``modules_to_save`` originals (not read).
        prefix: the prefix the model keys sit under (``""`` at the top level).
        notes: what the report should say about the choice.
    """

    raw_of: dict[str, str]
    other: list[str]
    hidden: list[str]
    prefix: str
    notes: list[str]


def _canonical_under(keys: list[str], prefix: str, canonical: bool):
    """(canonical -> raw, hidden) for the keys under ``prefix``."""
    out: dict[str, str] = {}
    hidden = []
    for k in keys:
        if not k.startswith(prefix):
            continue
        rest = k[len(prefix):]
        name = canonical_key(rest) if canonical else rest
        if name is None:
            hidden.append(k)
            continue
        if name in out:
            raise CheckpointMismatchError(
                f"checkpoint keys {out[name]!r} and {k!r} both stand for {name!r} (a PEFT "
                "model with several modules_to_save adapters, or two wrappers' copies); "
                "load it into the model that wrote it, or pass prefix= to pick one subtree")
        out[name] = k
    return out, hidden


def _candidate_prefixes(keys: list[str], target: set[str]) -> set[str]:
    """Every prefix under which some key, made canonical, is a target key."""
    out = set()
    for k in keys:
        parts = k.split(".")
        for i in range(1, len(parts)):
            if canonical_key(".".join(parts[i:])) in target:
                out.add(".".join(parts[:i]) + ".")
    return out


def _top(key: str, prefix: str) -> str:
    """The part of ``key`` that names the state it belongs to: the prefix's parts it
    shares plus one (``app.optim`` beside ``app.model.``)."""
    parts, pparts = key.split("."), prefix.split(".")[:-1]
    n = 0
    while n < len(pparts) and n < len(parts) and parts[n] == pparts[n]:
        n += 1
    return ".".join(parts[:n + 1])


def _given_prefix(keys: list[str], prefix: str, desc: str, instead: str) -> str:
    """``prefix`` as a key prefix (ending in a dot); a checkpoint with no tensor under it
    is refused, listing its top-level names (``instead``: the caller's other way)."""
    prefix = prefix if prefix == "" or prefix.endswith(".") else prefix + "."
    if not any(k.startswith(prefix) for k in keys):
        tops = sorted({k.split(".")[0] for k in keys})
        raise CheckpointMismatchError(
            f"checkpoint {desc} has no tensor under prefix {prefix!r} (nothing was read); "
            f"its top-level names are {tops[:12]} -> pass one of them as prefix, or "
            f"{instead}")
    return prefix


def _other_state_note(other: list[str], level: str, what: str) -> str | None:
    """One note for the state beside the model, grouped by where it lives."""
    if not other:
        return None
    groups: dict[str, int] = {}
    for k in other:
        groups[_top(k, level)] = groups.get(_top(k, level), 0) + 1
    shown = ", ".join(f"{g} ({n} keys)" if n > 1 else g for g, n in sorted(groups.items()))
    return f"other state in the checkpoint, {what}: {shown}"


def resolve(tensor_keys: Iterable[str], other_keys: Iterable[str], target: set[str],
            *, prefix: str | None, desc: str) -> Resolution:
    """Map ``tensor_keys`` onto canonical names for a target whose model keys (adapters
    aside) are ``target``.

    Keys as they are come first: a checkpoint written by this library, or by a tool
    that saves ``model.state_dict()`` unwrapped, loads exactly as before. Otherwise the
    string rules of :func:`canonical_key` are tried under every prefix, and the shortest
    prefix under which every target key is present wins.

    Args:
        other_keys: non-tensor keys (always other state).
        prefix: given by the caller (``load_model(prefix=...)``): only keys under it are
            the model's.
    """
    keys = sorted(tensor_keys)
    notes = []
    if prefix is not None:
        prefix = _given_prefix(keys, prefix, desc, "prefix=None to let the loader find it")
        raw_of, hidden = _canonical_under(keys, prefix, canonical=True)
        if prefix:
            notes.append(f"model keys read under prefix {prefix!r} (given)")
    else:
        raw_of, hidden = _canonical_under(keys, "", canonical=False)
        prefix = ""
        if not target <= raw_of.keys():
            best = (len(target & raw_of.keys()), raw_of, hidden, "")
            for p in sorted(_candidate_prefixes(keys, target) | {""}, key=lambda p: (len(p), p)):
                try:
                    m, h = _canonical_under(keys, p, canonical=True)
                except CheckpointMismatchError:  # ambiguous under p: not a candidate
                    continue
                covered = len(target & m.keys())
                if covered > best[0]:
                    best = (covered, m, h, p)
                if covered == len(target):
                    break
            covered, raw_of, hidden, prefix = best
            if prefix:
                found = ("every model key is present under it" if covered == len(target) else
                         f"{covered} of {len(target)} model keys are present under it")
                notes.append(f"model keys read under prefix {prefix!r} (found: {found})")
    tops = {t.split(".")[0] for t in target}
    other = sorted(k for k in keys if not k.startswith(prefix))
    for name, k in list(raw_of.items()):
        if name not in target and name.split(".")[0] in OTHER_STATE_NAMES - tops:
            other.append(k)
            del raw_of[name]
    other = sorted(other) + sorted(other_keys)
    notes += filter(None, [_other_state_note(other, prefix, "not read by a model load")])
    if hidden:
        notes.append(f"{len(hidden)} PEFT modules_to_save originals not read (the trained "
                     "copies are the model's weights)")
    return Resolution(raw_of, other, hidden, prefix, notes)


def _children(keys: list[str], prefix: str) -> set[str]:
    return {k[len(prefix):].split(".")[0] for k in keys if k.startswith(prefix)}


def _beside_other_state(keys: list[str]) -> tuple[str, str] | None:
    """``(level, model prefix)`` when the checkpoint keeps other state (an optimizer,
    a scheduler, ...) beside its model: ``level`` is where the other state's names are
    (torchtitan: ``""``; ``{"app": {"model", "optim"}}``: ``"app."``), the model is the
    rest of that level, or its single ``model`` subtree. None when there is no such
    state (every key is the model's)."""
    level = ""
    while True:
        children = _children(keys, level)
        if children & OTHER_STATE_NAMES:
            rest = children - OTHER_STATE_NAMES
            return level, (f"{level}model." if rest == {"model"} else level)
        if len(children) != 1:
            return None
        level += children.pop() + "."
        if not any(k.startswith(level) for k in keys):  # a single leaf key
            return None


def model_only(tensor_keys: Iterable[str], other_keys: Iterable[str], *, prefix: str | None,
               desc: str) -> Resolution | None:
    """The model's keys, canonical, when no target says which they are (an export):
    under ``prefix`` when given, else beside other state found as :func:`resolve` lists
    it (:func:`_beside_other_state`). None: every key is the model's, as it is."""
    keys = sorted(tensor_keys)
    notes = []
    if prefix is not None:
        prefix = _given_prefix(keys, prefix, desc,
                               "none to let the model be found beside other state")
        level, mine = prefix, [k for k in keys if k.startswith(prefix)]
        if prefix:
            notes.append(f"model keys read under prefix {prefix!r} (given)")
    else:
        found = _beside_other_state(keys)
        if found is None:
            return None
        level, prefix = found
        mine = [k for k in keys if k.startswith(prefix)
                and k[len(level):].split(".")[0] not in OTHER_STATE_NAMES]
        if prefix:
            notes.append(f"model keys read under prefix {prefix!r} (found beside other state)")
    raw_of, hidden = _canonical_under(mine, prefix, canonical=True)
    taken = set(raw_of.values()) | set(hidden)
    other = sorted(k for k in keys if k not in taken) + sorted(other_keys)
    notes += filter(None, [_other_state_note(other, level, "not the model's")])
    if hidden:
        notes.append(f"{len(hidden)} PEFT modules_to_save originals left out (the trained "
                     "copies are the model's weights)")
    return Resolution(raw_of, other, hidden, prefix, notes)


#: top-level names of the optimizer's state as ``get_optimizer_state_dict`` writes it
#: (``<name>.state.<param FQN>.<state key>``): torchtitan's, the DCP tutorial's, ...
_OPTIMIZER_NAMES = ("optimizer", "optim", "optimizers")
#: where tools keep an LR scheduler's state (torchtitan's ``LRSchedulersContainer``
#: saves its first scheduler's ``state_dict()`` as ``lr_scheduler``)
_SCHEDULER_NAMES = ("lr_scheduler", "scheduler")
#: where tools keep the training step beside the model (torchtitan's ``TrainState``)
_STEP_KEYS = ("train_state.step", "step")


@dataclasses.dataclass
class Beside:
    """What another tool's DCP checkpoint keeps beside its model, as far as it maps.

    Attributes:
        optimizer: canonical parameter name -> state key (``exp_avg``) -> stored key, for
            optimizer state keyed by parameter FQN (``get_optimizer_state_dict``, flat or
            nested); empty when there is none.
        optimizer_at: the stored prefix of that state (``"optim."``), for messages.
        step_key: the stored key of the training step (``train_state.step``), or None.
        left: what is not carried, grouped (``"dataloader (2 keys)"``), for notes.
        scheduler: an LR scheduler's ``state_dict()`` key -> stored key (torchtitan's
            ``lr_scheduler.last_epoch``, ...), empty when there is none.
        scheduler_at: the stored prefix of that state (``"lr_scheduler"``), for messages.
    """

    optimizer: dict[str, dict[str, str]]
    optimizer_at: str | None
    step_key: str | None
    left: list[str]
    scheduler: dict[str, str] = dataclasses.field(default_factory=dict)
    scheduler_at: str | None = None


def beside_model(tensor_keys: Iterable[str], other_keys: Iterable[str]) -> Beside:
    """The state beside the model in a checkpoint whose model :func:`model_only` finds
    beside other state (:func:`_beside_other_state`): the optimizer's state by canonical
    parameter name, the step's key, and the rest, named."""
    tensors, others = sorted(tensor_keys), sorted(other_keys)
    found = _beside_other_state(sorted(tensors + others))
    if found is None:
        return Beside({}, None, None, [])
    level, prefix = found
    optimizer, at = _optimizer_state(tensors, level)
    step_key = next((f"{level}{k}" for k in _STEP_KEYS if f"{level}{k}" in tensors), None)
    scheduler: dict[str, str] = {}
    scheduler_at = None
    for name in _SCHEDULER_NAMES:  # one LRScheduler.state_dict(), flattened by DCP
        head = f"{level}{name}."
        entries = {k[len(head):]: k for k in others if k.startswith(head)}
        if "last_epoch" in entries and all("." not in key for key in entries):
            scheduler, scheduler_at = entries, f"{level}{name}"
            break
    taken = ({raw for state in optimizer.values() for raw in state.values()} | {step_key}
             | set(scheduler.values()))

    def is_model(k: str) -> bool:
        return k.startswith(prefix) and k[len(level):].split(".")[0] not in OTHER_STATE_NAMES

    groups: dict[str, int] = {}
    for k in tensors + others:
        if k in taken or is_model(k):
            continue
        parts = k[len(level):].split(".")
        deep = parts[0] in _OPTIMIZER_NAMES or parts[0] == "train_state"
        group = level + ".".join(parts[:2 if deep and len(parts) > 1 else 1])
        groups[group] = groups.get(group, 0) + 1
    return Beside(optimizer, at, step_key, _grouped(groups), scheduler, scheduler_at)


def _optimizer_state(tensors: list[str], level: str) -> tuple[dict[str, dict[str, str]],
                                                               str | None]:
    """Optimizer state keyed by parameter FQN under ``level``: canonical parameter name ->
    state key -> stored key, and the stored prefix (None: none found)."""
    optimizer: dict[str, dict[str, str]] = {}
    for name in _OPTIMIZER_NAMES:
        head = f"{level}{name}.state."
        for k in tensors:
            fqn, _, key = k[len(head):].rpartition(".") if k.startswith(head) else ("", "", "")
            canonical = canonical_key(fqn) if fqn else None
            if canonical:
                optimizer.setdefault(canonical, {})[key] = k
        if optimizer:
            return optimizer, f"{level}{name}."
    return {}, None


def _grouped(groups: dict[str, int]) -> list[str]:
    return [f"{g} ({n} keys)" if n > 1 else g for g, n in sorted(groups.items())]


def optimizer_only(tensor_keys: Iterable[str], other_keys: Iterable[str]) -> Beside:
    """A DCP directory that holds an optimizer's state alone, keyed by parameter FQN
    (Accelerate's ``optimizer_0/``: ``{"optimizer": get_optimizer_state_dict(...)}``):
    its state by canonical parameter name; the rest (param groups) named."""
    tensors, others = sorted(tensor_keys), sorted(other_keys)
    optimizer, at = _optimizer_state(tensors, "")
    taken = {raw for state in optimizer.values() for raw in state.values()}
    groups: dict[str, int] = {}
    for k in tensors + others:
        if k not in taken:
            group = ".".join(k.split(".")[:2])
            groups[group] = groups.get(group, 0) + 1
    return Beside(optimizer, at, None, _grouped(groups))
