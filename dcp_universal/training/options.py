"""``CheckpointManager``'s settings, each checked when the manager is built (before the
first byte is read or written), and the small requests its ``save`` and ``load`` pass
down."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, cast

import torch
import torch.nn as nn

from dcp_universal import _comm
from dcp_universal.format import manifest
from dcp_universal.model_io.save import check_merge
from dcp_universal.training.retention import (KeepBest, KeepEvery, KeepLast, RetentionPolicy,
                                              check_count, check_policies)
from dcp_universal.training.items import BUILTIN, Item

__all__ = ["ManagerOptions", "SaveRequest", "LoadRequest", "check_items"]


@dataclasses.dataclass(kw_only=True)
class ManagerOptions:
    """CheckpointManager's settings.

    Attributes:
        keep_last: keep this many newest committed steps whole.
        keep_every: archive steps divisible by this: they keep their model and lose
            their optimizer state (steps no policy keeps are deleted).
        keep_best: keep this many steps with the best ``best_metric`` whole.
        best_metric / best_mode: the ``save(metrics=...)`` key ranking ``keep_best``, and
            whether lower ("min") or higher ("max") is better.
        retention: more retention policies (:class:`~dcp_universal.RetentionPolicy`),
            composed with the three above. With no policy every step is kept.
            Retention runs after a commit and never removes the newest step or a base a
            remaining step uses.
        merge: how merged ``model/`` directories are written: "sharded" or "rank0".
        merged_every: in LoRA runs, also write the merged ``model/`` every this many
            steps (None: only when ``save(..., merged=True)``). Runs without adapters
            always write ``model/``.
        storage_options: fsspec options for remote roots (e.g. ``endpoint_url``).
        items, trusted, lease_ttl, timeout, local_dir, keep_last_local: see
            :class:`~dcp_universal.CheckpointManager`.
    """

    keep_last: int | None = None
    keep_every: int | None = None
    keep_best: int | None = None
    best_metric: str | None = None
    best_mode: str = "min"
    retention: list[RetentionPolicy] = dataclasses.field(default_factory=list)
    merge: str = "sharded"
    merged_every: int | None = None
    storage_options: dict | None = None
    items: tuple[Item, ...] = ()
    trusted: bool = False
    lease_ttl: float = 120.0
    timeout: float = _comm.DEFAULT_TIMEOUT_S
    local_dir: str | None = None
    keep_last_local: int | None = None

    def __post_init__(self) -> None:
        for name in ("keep_last", "keep_every", "keep_best", "merged_every"):
            value = getattr(self, name)
            if value is not None:
                check_count(name, value, " (or None to turn it off)")
        if self.keep_best is not None and not self.best_metric:
            raise ValueError("keep_best needs best_metric, the save(metrics=...) key to rank by")
        if self.best_metric is not None and not isinstance(self.best_metric, str):
            raise ValueError(f"best_metric={self.best_metric!r}: expected a metric name (str)")
        if self.storage_options is not None and not isinstance(self.storage_options, dict):
            raise ValueError(f"storage_options={self.storage_options!r}: expected a dict of "
                             "fsspec options, e.g. {'endpoint_url': ...}")
        self.retention = check_policies(self.retention)
        self.policies()  # validates the rest
        check_merge(self.merge)
        self.items = check_items(self.items)
        if not isinstance(self.trusted, bool):
            raise ValueError(f"trusted={self.trusted!r}: expected True or False")
        if isinstance(self.lease_ttl, bool) or not isinstance(self.lease_ttl, (int, float)) \
                or not self.lease_ttl > 0:
            raise ValueError(f"lease_ttl={self.lease_ttl!r}: expected seconds (> 0)")
        self.timeout = _comm.check_timeout(self.timeout)

    @property
    def tiered(self) -> bool:
        """A local tier in front of the root was asked for."""
        return self.local_dir is not None or self.keep_last_local is not None

    def policies(self) -> list[RetentionPolicy]:
        """The root's retention policies: the shortcuts' and ``retention``'s."""
        out: list[RetentionPolicy] = []
        if self.keep_last is not None:
            out.append(KeepLast(self.keep_last))
        if self.keep_every is not None:
            out.append(KeepEvery(self.keep_every))
        if self.keep_best is not None:
            # __post_init__: keep_best needs best_metric
            out.append(KeepBest(self.keep_best, cast(str, self.best_metric),
                                          self.best_mode))
        return out + list(self.retention)


def check_items(items: Iterable[Item]) -> tuple[Item, ...]:
    """A run's own step items, each an :class:`Item` with a directory name of its own."""
    items = tuple(items)
    taken = {i.name for i in BUILTIN}
    for item in items:
        if not isinstance(item, Item):
            raise TypeError(f"items: {item!r} is not a dcp_universal.training.items.Item")
        name = item.name
        if not isinstance(name, str) or not name or "/" in name or name.startswith(".") \
                or name == manifest.MANIFEST:
            raise ValueError(f"items: {type(item).__name__}.name={name!r}: expected a directory "
                             "name (no '/', not hidden, not manifest.json)")
        if name in taken:
            raise ValueError(f"items: two items named {name!r} (the library's own are "
                             f"{sorted(i.name for i in BUILTIN)})")
        taken.add(name)
    return items


@dataclasses.dataclass
class SaveRequest:
    """One ``save`` call's arguments, checked."""

    step: int
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    extra: dict[str, Any]
    merged: bool
    overwrite: bool
    metrics: dict[str, float]


@dataclasses.dataclass
class LoadRequest:
    """One ``load`` call's arguments, checked (the step is picked later)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    extra: dict[str, Any]
    strict: bool
    hyperparams: str
    skip_per_rank: set[str]
    verify: bool | None
