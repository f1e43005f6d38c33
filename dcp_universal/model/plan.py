"""Load planning: checkpoint keys x target keys -> what happens to each key.

Planning reads only checkpoint metadata (names, shapes, dtypes) and the target's tensors'
shapes; it never touches data. A strict load raises here, before the model is written.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from dcp_universal.errors import CheckpointMismatchError

__all__ = ["LoadReport", "TensorInfo", "Staged", "plan_load"]


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: Any


@dataclasses.dataclass
class LoadReport:
    """What a load did, key by key. Model keys are canonical names.

    Attributes:
        loaded: keys loaded as they are.
        remapped: checkpoint key -> target key, for keys loaded under another name
            (a plain ``x.weight`` into an adapter's ``x.base_layer.weight``).
        fresh: target keys with no checkpoint counterpart that were (re)initialised:
            adapters start with a zero update, so the function is unchanged.
        dropped: checkpoint keys with no place in the target, not read.
        missing: target keys that kept their current values (``strict=False`` only).
        mismatched: ``{key: (checkpoint shape, target shape)}`` skipped (``strict=False`` only).
        optimizer_restored / optimizer_fresh / optimizer_dropped: optimizer state by
            canonical parameter name (filled by optimizer loads).
        notes: anything else worth knowing (dtype casts, param-group decisions).
        step: the step loaded (a committed step's number), or the one a checkpoint of
            another tool records (``init_from``: torchtitan's ``step-N``, Accelerate's
            ``checkpoint_N``, a legacy file's ``iter_num``); None when it records none.
    """

    loaded: list[str] = dataclasses.field(default_factory=list)
    remapped: dict[str, str] = dataclasses.field(default_factory=dict)
    fresh: list[str] = dataclasses.field(default_factory=list)
    dropped: list[str] = dataclasses.field(default_factory=list)
    missing: list[str] = dataclasses.field(default_factory=list)
    mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = dataclasses.field(
        default_factory=dict)
    optimizer_restored: list[str] = dataclasses.field(default_factory=list)
    optimizer_fresh: list[str] = dataclasses.field(default_factory=list)
    optimizer_dropped: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    step: int | None = None

    def merge(self, other: "LoadReport") -> "LoadReport":
        """Add ``other``'s entries (another part of the same load) to this report."""
        for f in dataclasses.fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if f.name == "step":
                self.step = theirs if theirs is not None else mine
            elif isinstance(mine, dict):
                mine.update(theirs)
            else:
                mine.extend(theirs)
        return self

    def summary(self, max_keys: int = 6) -> str:
        def show(keys) -> str:
            keys = list(keys)
            head = ", ".join(keys[:max_keys])
            return head + (f", ... (+{len(keys) - max_keys})" if len(keys) > max_keys else "")

        lines = [f"loaded {len(self.loaded)} keys as is, {len(self.remapped)} remapped, "
                 f"{len(self.fresh)} fresh, {len(self.dropped)} dropped"]
        if self.remapped:
            lines.append("  remapped: " + show(f"{k} -> {v}" for k, v in self.remapped.items()))
        for label, keys in (("fresh", self.fresh), ("dropped", self.dropped),
                            ("missing (kept current values)", self.missing),
                            ("shape mismatch (skipped)", self.mismatched)):
            if keys:
                lines.append(f"  {label}: {show(keys)}")
        if self.optimizer_restored or self.optimizer_fresh or self.optimizer_dropped:
            lines.append(f"optimizer: {len(self.optimizer_restored)} restored, "
                         f"{len(self.optimizer_fresh)} fresh, {len(self.optimizer_dropped)} dropped")
            for label, keys in (("fresh", self.optimizer_fresh), ("dropped", self.optimizer_dropped)):
                if keys:
                    lines.append(f"  optimizer {label}: {show(keys)}")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Staged:
    """A part of a load (the model, the optimizer, the training state, ...) that has been
    planned and read but not installed.

    Attributes:
        report: what this part does (the load's report is every part's, merged).
        commit: installs the part; nothing before it changes the model, optimizer or
            training objects, and it does not fail for reasons a plan could have seen.
        facts: what the part learned for its caller (``restored_base``: the frozen base
            a LoRA load restored exactly).
    """

    report: LoadReport
    commit: Callable[[], None]
    facts: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def combine(cls, parts: "list[Staged]") -> "Staged":
        """One part made of ``parts``: their reports merged, their commits in order."""
        report, facts = LoadReport(), {}
        for part in parts:
            report.merge(part.report)
            facts.update(part.facts)

        def commit() -> None:
            for part in parts:
                part.commit()

        return cls(report, commit, facts)


@dataclasses.dataclass
class LoadPlan:
    report: LoadReport
    reads: dict[str, str]  # checkpoint key -> canonical target key


def plan_load(
    checkpoint: dict[str, TensorInfo],
    target: dict[str, TensorInfo],
    *,
    adapters: dict[str, TensorInfo],
    structural_names: dict[str, str],
    strict: bool,
    source: str,
) -> LoadPlan:
    """Decide the fate of every key.

    Args:
        checkpoint: canonical key -> info, from the checkpoint's metadata.
        target: canonical key -> info, for every target tensor that is not an adapter's.
        adapters: canonical key -> info of the target's adapter parameters (fresh unless
            the checkpoint holds them with the same shape; never an error).
        structural_names: canonical key -> the target's name for it with adapter infixes
            kept (``x.weight`` -> ``x.base_layer.weight``); keys absent map to themselves.
        strict: raise :class:`CheckpointMismatchError` on any non-adapter mismatch.
        source: the checkpoint path, for messages.
    """
    report = LoadReport()
    reads: dict[str, str] = {}
    missing, mismatched = [], {}
    casts: dict[tuple, list[str]] = {}  # (checkpoint dtype, model dtype) -> keys
    for key, info in target.items():
        ck = checkpoint.get(key)
        if ck is None:
            missing.append(key)
            continue
        if tuple(ck.shape) != tuple(info.shape):
            mismatched[key] = (tuple(ck.shape), tuple(info.shape))
            continue
        reads[key] = key
        name = structural_names.get(key, key)
        if name != key:
            report.remapped[key] = name
        else:
            report.loaded.append(key)
        if ck.dtype != info.dtype:
            casts.setdefault((ck.dtype, info.dtype), []).append(key)
    for (was, now), keys in casts.items():  # one line per pair of dtypes, not per key
        shown = keys[0] if len(keys) == 1 else f"{len(keys)} tensors ({keys[0]}, ...)"
        report.notes.append(f"{shown}: checkpoint {was} cast to the model's {now}")
    for key in sorted(adapters):
        ck = checkpoint.get(key)
        if ck is not None and tuple(ck.shape) == tuple(adapters[key].shape):
            reads[key] = key
            report.loaded.append(key)
        else:
            report.fresh.append(key)
    unexpected = sorted(k for k in checkpoint if k not in target and k not in adapters)
    if strict and (missing or mismatched or unexpected):
        raise CheckpointMismatchError(_describe(source, missing, mismatched, unexpected))
    if target and not any(k in target for k in reads):
        # strict=False: a load that changes nothing in the model is never what was meant
        raise CheckpointMismatchError(_describe(
            source, missing, mismatched, unexpected,
            hint="no model key matches, so strict=False would load nothing: check the path, "
                 "or pass prefix= naming the model's subtree of a nested checkpoint"))
    report.missing = missing
    report.mismatched = mismatched
    # adapter state of another rank or placement is not an error: it is dropped, and the
    # target's adapters start fresh
    report.dropped = sorted(k for k in checkpoint if k not in reads)
    return LoadPlan(report=report, reads=reads)


def _describe(source, missing, mismatched, unexpected, limit: int = 8, hint: str = "") -> str:
    lines = [f"checkpoint {source} does not match the model (nothing was loaded):"]
    for key, (ck, tg) in list(mismatched.items())[:limit]:
        lines.append(f"  {key!r}: checkpoint has {ck}, model has {tg}")
    if len(mismatched) > limit:
        lines.append(f"  ... and {len(mismatched) - limit} more shape mismatches")
    if missing:
        lines.append(f"  missing from checkpoint ({len(missing)}): {missing[:limit]}")
    if unexpected:
        lines.append(f"  in checkpoint but not in model ({len(unexpected)}): {unexpected[:limit]}")
    hint = hint or (
        "the base architecture differs; build the model with the checkpoint's "
        "dimensions (see `dcp-universal inspect`)" if mismatched else
        "the checkpoint and model have different layers; check the model config, or "
        "pass strict=False to load the keys that match")
    lines.append(f"  -> {hint}")
    return "\n".join(lines)
