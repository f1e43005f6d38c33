"""Retention: which committed steps to keep, archive or delete, and carrying it out.

A policy is a small object (:class:`RetentionPolicy`: ``keep`` and ``archive``, each
given every committed step's manifest); policies compose as a list, as orbax's
preservation policies do: ``CheckpointManager(root, retention=[KeepLast(3),
KeepEvery(1000), MyPolicy()])``, where ``keep_last=`` / ``keep_every=`` / ``keep_best=``
are shortcuts for the built-in ones. A step that any policy keeps whole is kept whole;
one that is only archived keeps its model (``model/``, or ``adapters/`` plus its base)
and loses ``optimizer/``; every other step is deleted. The newest committed step is
always kept whole. With no policy every step is kept.

A :class:`Retainer` runs a root's policies: it reads the manifests, decides
(:func:`decide`) and applies (:func:`apply`), with its own thread for deferred removals.

Deletion is ordered so that a kill at any point leaves only debris, never a step that
claims files it no longer has: a step loses its manifest before its files, an archived
step gets its rewritten manifest before ``optimizer/`` goes (and a later prune removes an
``optimizer/`` such a kill left behind), and a base loses its ``files.json`` (which marks
it complete) before its data. Bases are removed when no remaining committed step names
them, with or without a policy.

:func:`apply` may defer the removal of the data (``defer``): the manager's saves do, so
that deleting gigabytes does not hold the training loop. The marks that decide (a
removed manifest or ``files.json``, an archived manifest) are always written at once, so
``steps()`` sees the decision when ``apply`` returns; what is left until the deferred
removal runs is debris, which a kill leaves as well and the next save removes.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
from typing import Any, Callable, Iterable

from dcp_universal.errors import CheckpointError, RootBusyError
from dcp_universal.format import manifest
from dcp_universal.format.manifest import Manifest
from dcp_universal.storage import Storage, join, steps as step_dirs

__all__ = ["RetentionPolicy", "KeepLast", "KeepEvery", "KeepBest", "KeepSteps", "Decision",
           "decide", "apply", "Retainer", "check_count", "check_policies"]

logger = logging.getLogger(__name__)


def check_count(name: str, value: Any, note: str = "") -> None:
    """Raise ValueError unless ``value`` is a positive whole number (``bool`` is not);
    ``note`` ends the message, e.g. what ``None`` would mean where it is allowed."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}: expected a positive whole number{note}")


class RetentionPolicy:
    """One retention rule. Each method is given every committed step's manifest (step ->
    :class:`~dcp_universal.format.manifest.Manifest`: its ``metrics``, ``step``, items,
    ...) and returns step numbers; the default keeps and archives nothing. A policy of
    your own subclasses it and overrides either."""

    def keep(self, manifests: dict[int, Manifest]) -> set[int]:
        """The steps this policy keeps whole."""
        return set()

    def archive(self, manifests: dict[int, Manifest]) -> set[int]:
        """The steps this policy keeps as models only (their optimizer state removed)."""
        return set()


def check_policies(policies: Any) -> list[RetentionPolicy]:
    """``policies`` as a list, each a :class:`RetentionPolicy`; else ValueError."""
    if isinstance(policies, RetentionPolicy) or not isinstance(policies, (list, tuple)):
        raise ValueError(f"retention={policies!r}: expected a list of RetentionPolicy "
                         "objects, e.g. [KeepLast(3), KeepEvery(1000)]")
    for p in policies:
        if not isinstance(p, RetentionPolicy):
            raise ValueError(f"retention: {p!r} is not a RetentionPolicy (subclass "
                             "dcp_universal.RetentionPolicy and override keep or archive)")
    return list(policies)


@dataclasses.dataclass(frozen=True)
class KeepLast(RetentionPolicy):
    """Keep the ``n`` newest committed steps whole."""

    n: int

    def __post_init__(self) -> None:
        check_count("keep_last", self.n, " (the newest step is always kept)")

    def keep(self, manifests: dict[int, Manifest]) -> set[int]:
        return set(sorted(manifests)[-self.n:])


@dataclasses.dataclass(frozen=True)
class KeepEvery(RetentionPolicy):
    """Archive every step divisible by ``k``: its model stays, its optimizer goes
    (an archival policy: old steps keep their model, lose their optimizer)."""

    k: int

    def __post_init__(self) -> None:
        check_count("keep_every", self.k)

    def archive(self, manifests: dict[int, Manifest]) -> set[int]:
        return {s for s in manifests if s % self.k == 0}


@dataclasses.dataclass(frozen=True)
class KeepBest(RetentionPolicy):
    """Keep the ``n`` steps with the best ``metric`` (recorded by ``save(metrics=...)``)
    whole; steps without the metric never count as best."""

    n: int
    metric: str
    mode: str = "min"

    def __post_init__(self) -> None:
        check_count("keep_best", self.n)
        if self.mode not in ("min", "max"):
            raise ValueError(f"best_mode={self.mode!r}: expected 'min' or 'max'")

    def keep(self, manifests: dict[int, Manifest]) -> set[int]:
        # NaN (a diverged step) ranks nowhere: it never displaces a real best
        scored = [(m.metrics[self.metric], s) for s, m in manifests.items()
                  if self.metric in m.metrics and not math.isnan(m.metrics[self.metric])]
        scored.sort(reverse=self.mode == "max")
        return {s for _, s in scored[: self.n]}


class KeepSteps(RetentionPolicy):
    """Keeps the given steps (a local tier's steps not yet uploaded)."""

    def __init__(self, steps) -> None:
        self.steps = set(steps)

    def keep(self, manifests: dict[int, Manifest]) -> set[int]:
        return self.steps & set(manifests)


@dataclasses.dataclass
class Decision:
    keep: list[int]  # kept whole
    archive: list[int]  # to archive now (lose optimizer/)
    delete: list[int]
    delete_bases: list[str]
    archived: list[int] = dataclasses.field(default_factory=list)  # archived before
    #: steps whose manifest cannot be read: kept (and their bases), never ranked
    unreadable: dict[int, str] = dataclasses.field(default_factory=dict)


def decide(policies: list[RetentionPolicy], manifests: dict[int, Manifest], bases: list[str], *,
           unreadable: dict[int, str] | None = None) -> Decision:
    """What ``policies`` do to committed steps ``manifests`` (step -> manifest).

    ``unreadable``: committed steps whose manifest could not be read (step -> why): they
    are kept and reported, and every base is kept while any exists (which one such a
    step uses is unknown); the other steps are decided as usual.
    """
    unreadable = dict(unreadable or {})
    steps = sorted(manifests)
    if not steps:
        return Decision([], [], [], [], unreadable=unreadable)
    archived: set[int]
    keep, archived = ({steps[-1]}, set()) if policies else (set(steps), set())
    for p in policies:  # a user policy's answer: only the steps there are
        keep |= set(p.keep(manifests)) & set(steps)
        archived |= set(p.archive(manifests)) & set(steps)
    archived -= keep
    remaining = keep | archived
    delete = [s for s in steps if s not in remaining]
    to_archive = sorted(s for s in archived if manifests[s].has(manifest.OPTIMIZER_DIR))
    before = sorted(s for s in remaining if manifests[s].archived)
    used = {manifests[s].base for s in remaining}
    delete_bases = [] if unreadable else [b for b in bases if b not in used]
    return Decision(sorted(keep - set(before)), to_archive, delete, delete_bases, before,
                    unreadable)


def _archived(m: Manifest) -> Manifest:
    """``m`` as an archived step's manifest: no optimizer state, no ``optimizer/`` files."""
    opt = manifest.OPTIMIZER_DIR
    return dataclasses.replace(
        m, items={**m.items, opt: False}, archived=True,
        files={k: v for k, v in m.files.items() if k not in m.files_under(opt)})


def apply(decision: Decision, root: str, store: Storage,
          manifests: dict[int, Manifest], *, defer=None, fence=None) -> None:
    """Carry out ``decision``; safe to kill at any point (see the module docstring).
    ``defer``: ``defer(fn)`` runs ``fn`` (the removal of the data) later. ``fence``: the
    root's writer lease; each deletion and archive is made only while it holds
    (:mod:`dcp_universal.training.lease`), else ``RootBusyError``."""
    trees = []
    for step in decision.delete:  # uncommitted first (a link loses the link only)
        trees.append(store.detach(manifest.step_path(root, step), manifest.MANIFEST, fence))
    for step in decision.archive:
        path = manifest.step_path(root, step)
        store.fenced_write(join(path, manifest.MANIFEST),
                           _archived(manifests[step]).to_json().encode(), fence)
        trees.append(store.detach(join(path, manifest.OPTIMIZER_DIR), None, fence))
    for step in decision.archived:
        # an archive killed between its manifest and its optimizer/ left the directory
        opt = join(manifest.step_path(root, step), manifest.OPTIMIZER_DIR)
        if store.exists(opt):
            trees.append(store.detach(opt, None, fence))
    for base in decision.delete_bases:  # incomplete first
        trees.append(store.detach(join(root, base), manifest.BASE_FILES, fence))
    detached = [t for t in trees if t is not None]

    def remove() -> None:
        for path in detached:
            store.remove_tree(path)

    if defer is not None and detached:
        defer(remove)
    else:
        remove()
    if decision.delete or decision.archive or decision.delete_bases:
        logger.info("retention: deleted steps %s, archived %s, deleted bases %s",
                    decision.delete, decision.archive, decision.delete_bases)


class Retainer:
    """Runs retention ``policies`` over the root ``root`` of ``store``: reads every
    committed manifest, decides, applies (each removal fenced by ``fence``, the root's
    writer lease). ``protect()`` names steps that must stay (a local tier's not yet
    uploaded ones). Removals may be deferred to the retainer's own thread
    (:meth:`run` with ``defer``): :meth:`settle` waits for them."""

    def __init__(self, store: Storage, root: str, policies: list[RetentionPolicy], *,
                 fence=None, protect: Callable[[], Iterable[int]] | None = None) -> None:
        self.store, self.root, self.policies = store, root, list(policies)
        self.fence, self.protect = fence, protect
        self._deleter: concurrent.futures.ThreadPoolExecutor | None = None
        self._deleting: concurrent.futures.Future | None = None

    def run(self, *, dry_run: bool = False, defer: bool = False) -> Decision:
        """Decide and (unless ``dry_run``) apply; returns the decision. Steps whose
        manifest cannot be read are kept and logged, the others pruned as usual."""
        self.settle()
        manifests, unreadable = {}, {}
        for s in step_dirs.list_steps(self.store, self.root):
            try:
                manifests[s] = step_dirs.read_manifest(self.store,
                                                       manifest.step_path(self.root, s))
            except CheckpointError as e:  # kept and reported; the others are still pruned
                unreadable[s] = f"{type(e).__name__}: {e}"
        policies = self.policies
        protect = set(self.protect()) if self.protect is not None else set()
        if protect and policies:  # no policy keeps every step: protecting must not delete
            policies = [*policies, KeepSteps(protect)]
        decision = decide(policies, manifests, step_dirs.list_bases(self.store, self.root),
                          unreadable=unreadable)
        for s, why in sorted(unreadable.items()):
            logger.warning("retention keeps step %d, whose manifest it cannot read (%s)", s, why)
        if not dry_run:
            apply(decision, self.root, self.store, manifests,
                  defer=self._defer if defer else None, fence=self.fence)
        return decision

    def after_commit(self, what: str, retried_by: str, *, defer: bool = False) -> None:
        """:meth:`run` after ``what`` was committed: a failure says the commit stands and
        that ``retried_by`` retries (a lost lease is raised as it is: nothing was removed
        after it)."""
        try:
            self.run(defer=defer)
        except RootBusyError:
            raise
        except Exception as e:
            raise CheckpointError(f"{what} is committed, but retention failed "
                                  f"({type(e).__name__}: {e}); {retried_by} retries it") from e

    def _defer(self, remove: Callable[[], None]) -> None:
        """Run a removal of data on this retainer's thread: a save returns once the
        deleted steps are uncommitted, not once their gigabytes are gone."""
        self.settle()
        if self._deleter is None:
            self._deleter = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="dcp-universal-retention")
        self._deleting = self._deleter.submit(remove)

    def settle(self) -> None:
        """Wait for the deferred removal; a failure leaves debris, which the next save
        removes, so it is logged, not raised."""
        deleting, self._deleting = self._deleting, None
        if deleting is None:
            return
        try:
            deleting.result()
        except Exception as e:
            logger.warning("retention left debris (%s: %s); the next save removes it",
                           type(e).__name__, e)

    def close(self) -> None:
        self.settle()
        if self._deleter is not None:
            self._deleter.shutdown(wait=True)
            self._deleter = None
