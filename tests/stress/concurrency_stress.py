"""Concurrency stress: two writers, a pruner and a reader on one root, at the same time.

On one root (a local directory, or an ``s3://`` prefix on moto's S3 server, which this
script starts on 127.0.0.1), four single-process workers (no process group) run
together:

* writers ``A`` and ``B``: each repeatedly opens a :class:`CheckpointManager` with
  ``keep_last`` retention, saves one to ``--saves-per-session`` steps of the tiny model of
  ``tests/tiny.py`` (some of them asynchronously), closes the manager (which releases the
  root's ``writer.lease``) and pauses a little. ``A`` saves even steps, ``B`` odd ones,
  each the next of its parity above the latest committed step it saw, so the two
  writers' steps interleave and retention deletes either's. A step's weights are a
  deterministic function of (writer, step) (the model built from a seed of both), and
  its ``extra`` records ``{"writer", "step"}``. A save refused because the other side
  holds the lease raises :class:`RootBusyError` (counted as ``busy``); every save that
  returned is logged (step, writer, seed, CRC-32 of the weights; appended and fsynced
  to the worker's own log). While it still holds the lease after a save, the writer
  checks that ``writer.lease`` names its own process and that its step is committed
  (unless ``keep_last`` newer steps exist);
* a pruner: repeatedly ``CheckpointManager(root, keep_last=P).prune()`` then ``close()``,
  with ``P = --prune-keep-last`` below the writers' ``K = --keep-last``, so that its
  prunes delete steps too (a prune takes the lease: ``RootBusyError`` is counted), and
  checks, still holding the lease, that at most P steps remain;
* a reader: repeatedly loads into a fresh model, never holding a lease: the latest step
  (``mgr.load(model, extra=...)``: the step it loaded is told by the loaded ``extra``,
  and must be at least the latest step listed just before), or a random listed step
  (``mgr.load(step=...)``, or ``load_model(model, step_dir)`` as an inference node
  does), sometimes with ``verify=True``. Every load that returns must hold exactly the
  weights (``torch.equal``) and ``extra`` of its (writer, step). A load that raises a
  :class:`CheckpointError` while a step it names (or the step it was asked for) is no
  longer committed afterwards raced with retention and is counted as ``raced``; any
  other exception, or a ``CheckpointError`` for a step still committed afterwards, is
  a failure.

At the end, in this process, once every worker has exited:

1. nothing lost: the P highest of the steps whose save returned are committed (no
   retention, the writers' or the pruner's, may remove them: they were among the P
   newest of every set of steps committed while they were); at most K steps are
   committed (retention ran after the last change of the root, whoever made it); no
   committed step was never reported saved, and no step was saved twice;
2. every committed step passes ``verify()`` and loads (weights and ``extra``) equal to
   its (writer, step), whose CRC-32 matches the writer's log; every step the reader
   loaded had been reported saved;
3. no ``writer.lease`` is left once every manager was closed;
4. a fresh manager (``keep_last=K``) saves one more step and closes: then the root
   holds only committed ``step-*`` directories (the K highest), each holding only the
   files its manifest lists, no ``.tmp`` file and no lease; the new step loads equal.

Run::

    python tests/stress/concurrency_stress.py --storage both --seconds 60 --seed 1

It prints one summary line per storage::

    CONCURRENCY (local): saves A=.. B=.. busy=.. prunes=.. busy=.. reads=.. raced=.. ; committed steps loadable and equal: K/K ; lost: 0

and exits 1 on any failure (each printed above the summary). ``--rounds N`` instead of
``--seconds``: each writer completes N sessions that saved at least one step; the
pruner and the reader run until both writers are done (and at least ``--min-ops``
times each). ``tests/dist/test_concurrency.py`` runs a small configuration in CI.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import functools
import json
import logging
import os
import random
import re
import shutil
import socket
import sys
import tempfile
import time
import traceback
import zlib
from typing import Callable

_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

import multiprocessing as mp  # noqa: E402

import torch  # noqa: E402

import tiny  # noqa: E402
from dcp_universal import CheckpointError, CheckpointManager, RootBusyError, load_model  # noqa: E402
from dcp_universal.format import manifest  # noqa: E402
from dcp_universal.storage import join, storage_for  # noqa: E402
from dcp_universal.training.lease import LEASE_FILE  # noqa: E402

__all__ = ["Config", "Outcome", "run", "run_all", "main", "expected_state", "writer_of"]

WRITERS = {"A": 0, "B": 1}  # writer -> the parity of its steps
ROLES = ("A", "B", "pruner", "reader")
FINAL = "final"  # the fresh manager's save at the end
_SEED_BASE = {"A": 1_000_003, "B": 2_000_003, FINAL: 3_000_017}
_READER_SEED = 7_000_001  # a fresh model's weights: never any step's
_STEP_NAMED = re.compile(r"step-(\d{8,})|\bstep[= ](\d+)")


@dataclasses.dataclass(kw_only=True)
class Config:
    """One run on one root.

    Attributes:
        root: the checkpoint root (a local path or an ``s3://`` URL).
        storage: "local" or "s3", for the summary.
        options: fsspec ``storage_options`` (S3: ``endpoint_url`` and keys), or None.
        env: environment variables the workers set before anything else (S3 keys).
        keep_last: the writers' retention (``keep_last``), also the final manager's.
        prune_keep_last: the pruner's ``keep_last`` (at most ``keep_last``; smaller, so
            that its prunes delete steps the writers' retention kept).
        seconds: every worker runs this long after the start signal (or ``rounds``).
        rounds: each writer completes this many sessions that saved a step; the pruner
            and the reader run until both writers are done.
        saves_per_session: a writer session saves 1 to this many steps.
        async_fraction: the share of saves made with ``blocking=False``.
        pause_s: workers pause up to this long between sessions / operations.
        min_ops: the pruner and the reader do at least this many attempts.
        seed: the workers' random choices.
        timeout_s: the whole run is a failure after this long (workers are killed).
        start_method: how the workers start (``spawn`` or ``forkserver``).
    """

    root: str
    storage: str = "local"
    options: dict | None = None
    env: dict = dataclasses.field(default_factory=dict)
    keep_last: int = 3
    prune_keep_last: int = 2
    seconds: float | None = None
    rounds: int | None = None
    saves_per_session: int = 3
    async_fraction: float = 0.25
    pause_s: float = 0.03
    min_ops: int = 3
    seed: int = 0
    timeout_s: float = 300.0
    start_method: str = "spawn"


def writer_of(step: int) -> str:
    return "A" if step % 2 == WRITERS["A"] else "B"


def _seed(writer: str, step: int) -> int:
    return _SEED_BASE[writer] * 10 + step


def _model(seed: int) -> torch.nn.Module:
    return tiny.make("plain", seed=seed)


@functools.lru_cache(maxsize=64)
def expected_state(writer: str, step: int) -> dict[str, torch.Tensor]:
    """The weights ``writer`` saves as ``step``: a function of both."""
    return {k: v.detach().clone() for k, v in _model(_seed(writer, step)).state_dict().items()}


def _crc(state: dict[str, torch.Tensor]) -> int:
    crc = 0
    for k in sorted(state):
        crc = zlib.crc32(k.encode(), crc)
        crc = zlib.crc32(state[k].detach().contiguous().numpy().tobytes(), crc)
    return crc


def _differs(model: torch.nn.Module, writer: str, step: int) -> str | None:
    """Why ``model`` does not hold (writer, step)'s weights, or None."""
    got, want = model.state_dict(), expected_state(writer, step)
    if set(got) != set(want):
        return f"keys differ: {sorted(set(got) ^ set(want))}"
    bad = [k for k in want if not (got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]))]
    return f"tensors differ from ({writer}, {step})'s: {bad}" if bad else None


# ---- worker side ------------------------------------------------------------------------


class _Log:
    """One worker's event log: JSON lines, each appended and fsynced."""

    def __init__(self, path: str) -> None:
        self._f = open(path, "a")

    def write(self, **event) -> None:
        event.setdefault("t", time.time())
        self._f.write(json.dumps(event) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def fail(self, what: str, **detail) -> None:
        self.write(ev="fail", what=what, **detail)

    def close(self) -> None:
        self._f.close()


class _Clock:
    """When a worker stops: after ``seconds`` from the start signal, or (``rounds``)
    once the parent says the writers are done and ``min_ops`` attempts were made."""

    def __init__(self, cfg: Config, stop) -> None:
        self.cfg, self.stop = cfg, stop
        self.deadline = None if cfg.seconds is None else time.time() + cfg.seconds

    def over(self, ops: int = 0) -> bool:
        if self.deadline is not None:
            return time.time() >= self.deadline
        return self.stop.is_set() and ops >= self.cfg.min_ops


def _lease_holder(mgr: CheckpointManager, cfg: Config) -> dict | None:
    """The root's ``writer.lease`` as JSON (None: absent; garbled: what it holds)."""
    store = storage_for(mgr.root, cfg.options)
    try:
        raw = store.read_bytes(join(mgr.root, LEASE_FILE))
    except FileNotFoundError:
        return None
    try:
        held = json.loads(raw)
    except ValueError:
        held = None
    return held if isinstance(held, dict) else {"garbled": raw[:300].decode(errors="replace")}


def _check_lease_mine(mgr: CheckpointManager, cfg: Config, log: _Log, after: str) -> None:
    held = _lease_holder(mgr, cfg)
    if held is None or held.get("pid") != os.getpid() or held.get("host") != socket.gethostname():
        log.fail("lease", detail=f"after {after}, with this manager still open, "
                 f"{LEASE_FILE} is {held!r}, not this process's (pid {os.getpid()})")


def _next_step(above: int, parity: int) -> int:
    step = above + 1
    return step if step % 2 == parity else step + 1


def _writer(role: str, cfg: Config, log: _Log, clock: _Clock, rng: random.Random) -> None:
    parity, last, sessions = WRITERS[role], -1, 0
    while not (sessions >= cfg.rounds if cfg.rounds is not None else clock.over()):
        mgr = CheckpointManager(cfg.root, keep_last=cfg.keep_last, storage_options=cfg.options)
        saved_here, step = 0, None
        try:
            latest = mgr.latest_step()
            above = max(last, -1 if latest is None else latest)
            for i in range(rng.randint(1, cfg.saves_per_session)):
                step = _next_step(above, parity)
                seed = _seed(role, step)
                model = _model(seed)
                blocking = rng.random() >= cfg.async_fraction
                try:
                    out = mgr.save(step, model, extra={"origin": {"writer": role, "step": step}},
                                   blocking=blocking)
                    if not blocking:
                        out = out.result()
                except RootBusyError as e:
                    if i:  # this manager took the lease with its first save: it holds it
                        log.fail("save", step=step, detail=f"RootBusyError after this "
                                 f"manager's save of step {last} took the lease: {e}")
                    else:
                        log.write(ev="busy", step=step)
                    break
                except Exception as e:
                    log.fail("save", step=step, error=f"{type(e).__name__}: {e}",
                             trace=traceback.format_exc())
                    break
                log.write(ev="saved", writer=role, step=step, seed=seed,
                          crc=_crc(model.state_dict()), blocking=blocking)
                last = above = step
                saved_here += 1
                # still holding the lease: nobody else may have changed the root
                _check_lease_mine(mgr, cfg, log, f"the save of step {step}")
                steps = mgr.steps()
                if step not in steps and sum(s > step for s in steps) < cfg.keep_last:
                    log.fail("committed", step=step, detail=f"step {step} was saved, but "
                             f"steps() is {steps} (keep_last={cfg.keep_last})")
        except Exception as e:
            log.fail("session", step=step, error=f"{type(e).__name__}: {e}",
                     trace=traceback.format_exc())
        finally:
            try:
                mgr.close()
            except Exception as e:
                log.fail("close", error=f"{type(e).__name__}: {e}", trace=traceback.format_exc())
        sessions += saved_here > 0
        time.sleep(rng.uniform(0, cfg.pause_s))


def _pruner(role: str, cfg: Config, log: _Log, clock: _Clock, rng: random.Random) -> None:
    ops = 0
    while not clock.over(ops):
        ops += 1
        mgr = CheckpointManager(cfg.root, keep_last=cfg.prune_keep_last,
                                storage_options=cfg.options)
        try:
            try:
                decision = mgr.prune()
            except RootBusyError:
                log.write(ev="busy")
            else:
                log.write(ev="pruned", deleted=decision.delete)
                _check_lease_mine(mgr, cfg, log, "a prune")
                steps = mgr.steps()
                if len(steps) > cfg.prune_keep_last:
                    log.fail("prune", detail=f"after a prune, still holding the lease, steps() "
                             f"is {steps} (keep_last={cfg.prune_keep_last})")
        except Exception as e:
            log.fail("prune", error=f"{type(e).__name__}: {e}", trace=traceback.format_exc())
        finally:
            try:
                mgr.close()
            except Exception as e:
                log.fail("close", error=f"{type(e).__name__}: {e}", trace=traceback.format_exc())
        time.sleep(rng.uniform(0, 2 * cfg.pause_s))


def _steps_named(message: str) -> set[int]:
    return {int(a or b) for a, b in _STEP_NAMED.findall(message)}


def _reader(role: str, cfg: Config, log: _Log, clock: _Clock, rng: random.Random) -> None:
    ops, mgr = 0, None
    while not clock.over(ops):
        if mgr is None or rng.random() < 0.2:  # a reader never saves: it needs no lease
            mgr = CheckpointManager(cfg.root, storage_options=cfg.options)
        try:
            before = mgr.steps()
        except Exception as e:
            log.fail("list", error=f"{type(e).__name__}: {e}", trace=traceback.format_exc())
            ops += 1
            continue
        if not before:
            time.sleep(0.01)
            continue
        ops += 1
        mode = rng.choice(["latest", "latest", "step", "load_model"])
        target = None if mode == "latest" else (
            before[-1] if rng.random() < 0.5 else rng.choice(before))
        verify = rng.random() < 0.3
        model = _model(_READER_SEED + ops)
        origin: dict = {}
        try:
            if mode == "load_model":
                load_model(model, mgr.step_path(target), storage_options=cfg.options,
                           verify=verify)
            else:
                mgr.load(model, step=target, extra={"origin": origin}, verify=verify)
        except CheckpointError as e:
            message = f"{type(e).__name__}: {e}"
            asked = _steps_named(str(e)) | ({target} if target is not None else set())
            try:
                now = mgr.steps()
            except Exception:
                now = before
            gone = sorted(s for s in asked if s not in now)
            if gone:
                log.write(ev="raced", mode=mode, step=gone[-1], error=message[:300])
            else:
                log.fail("read", mode=mode, step=target, before=before, now=now,
                         detail=f"a load of {'the latest step' if target is None else target} "
                         f"raised, but no step it names is gone: {message}",
                         trace=traceback.format_exc())
            continue
        except Exception as e:
            try:
                still = target is None or target in mgr.steps()
            except Exception:
                still = None
            log.fail("read", mode=mode, step=target, error=f"{type(e).__name__}: {e}",
                     detail=f"a load raised {type(e).__name__}, not a CheckpointError"
                     + ("" if still else f" (step {target} was pruned meanwhile)"),
                     trace=traceback.format_exc())
            continue
        step = target
        if mode != "load_model":
            step = origin.get("step")
            want = {"writer": writer_of(step), "step": step} if isinstance(step, int) else None
            if origin != want or (target is not None and step != target):
                log.fail("read", mode=mode, step=target, detail=f"loaded extra {origin!r} "
                         f"is not that of step {target if target is not None else '(latest)'}")
                continue
            if target is None and step < before[-1]:
                log.fail("read", mode=mode, step=step, detail=f"load() of the latest step "
                         f"loaded {step}, older than {before[-1]} listed before it")
        why = _differs(model, writer_of(step), step)
        if why:
            log.fail("read", mode=mode, step=step, detail=f"WRONG WEIGHTS: {why}")
        else:
            log.write(ev="read", mode=mode, step=step, verify=verify)
        time.sleep(rng.uniform(0, cfg.pause_s / 3))


class _TorchFallbackNoise(logging.Filter):
    """DCP's loader logs a traceback (root logger, WARNING) when a directory's
    ``.metadata`` is gone, before it raises: a read racing retention, which the reader
    classifies itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("Global metadata is not found",
                                               "Rank local metadata is not found"))


def _worker(role: str, jobs: list) -> None:
    """Run ``role`` in each job ``(cfg, logpath, go, stop)`` in turn: one interpreter
    start (torch's import: seconds) serves every storage of a run."""
    logging.getLogger().addFilter(_TorchFallbackNoise())
    torch.set_num_threads(1)
    expected_state("A", 0)  # imports done before the first start
    for cfg, logpath, go, stop in jobs:
        os.environ.update(cfg.env)
        log = _Log(logpath)
        try:
            rng = random.Random(f"{cfg.seed}-{role}")
            log.write(ev="ready", pid=os.getpid())
            if not go.wait(cfg.timeout_s + 600):
                raise TimeoutError("no start signal")
            clock = _Clock(cfg, stop)
            work = _reader if role == "reader" else _pruner if role == "pruner" else _writer
            work(role, cfg, log, clock, rng)
            log.write(ev="done")
        except BaseException as e:
            log.fail("worker", error=f"{type(e).__name__}: {e}", trace=traceback.format_exc())
        finally:
            log.close()


# ---- the parent -------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    """What one run did and found.

    Attributes:
        counts: saves per writer, busy refusals, prunes, reads, raced reads, ...
        committed: steps committed at the end (before the final save).
        equal: how many of them verified and loaded equal.
        lost: steps retention should have kept that are gone.
        failures: every failure, in words.
        summary: the one-line summary.
    """

    storage: str
    counts: dict
    committed: list
    equal: int
    lost: list
    failures: list
    seconds: float
    summary: str = ""

    @property
    def ok(self) -> bool:
        return not self.failures


def _context(start_method: str):
    """``spawn`` (the default): every worker is a fresh interpreter. ``forkserver``
    forks every worker from one server that imported torch and dcp_universal once."""
    ctx = mp.get_context(start_method)
    if start_method == "forkserver":
        ctx.set_forkserver_preload(["torch", "dcp_universal"])
    return ctx


def _read_logs(logdir: str) -> dict[str, list[dict]]:
    out = {}
    for role in ROLES:
        path = os.path.join(logdir, f"{role}.jsonl")
        events = []
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    try:
                        events.append(json.loads(line))
                    except ValueError:
                        events.append({"ev": "fail", "what": "log", "detail": f"torn line {line!r}"})
        out[role] = events
    return out


class _Workers:
    """The four worker processes, started once for a list of jobs (one per root)."""

    def __init__(self, cfgs: list[Config], logdirs: list[str]) -> None:
        self.ctx = _context(cfgs[0].start_method)
        self.events = [(self.ctx.Event(), self.ctx.Event()) for _ in cfgs]
        self.logdirs = logdirs
        jobs = {role: [(cfg, os.path.join(d, f"{role}.jsonl"), go, stop)
                       for cfg, d, (go, stop) in zip(cfgs, logdirs, self.events)]
                for role in ROLES}
        self.procs = {role: self.ctx.Process(target=_worker, args=(role, jobs[role]),
                                             name=f"concurrency-{role}", daemon=True)
                      for role in ROLES}
        self.launched = time.monotonic()
        for p in self.procs.values():
            p.start()

    def _wait(self, i: int, roles, event: str, deadline: float) -> list[str]:
        """Wait until each of ``roles`` logged ``event`` (or failed as a worker) in job
        ``i``; returns the roles that did not."""
        while True:
            logs = _read_logs(self.logdirs[i])
            left = [r for r in roles if not any(
                e.get("ev") == event or (e.get("ev") == "fail" and e.get("what") == "worker")
                for e in logs[r])]
            dead = [r for r in left if not self.procs[r].is_alive()]
            if not left or dead or time.monotonic() > deadline:
                return left
            time.sleep(0.02)

    def drive(self, i: int, cfg: Config) -> tuple[list[str], float]:
        """Start job ``i``, let it run, stop it; returns failures of the launch itself
        (timeouts, dead workers) and the seconds the workers took to be ready."""
        go, stop = self.events[i]
        started = time.monotonic()
        missing = self._wait(i, ROLES, "ready", started + 180)
        startup = time.monotonic() - (self.launched if i == 0 else started)
        if missing:  # let the others go on to the next job
            go.set()
            stop.set()
            return [f"{r}: never ready (dead or timed out)" for r in missing], startup
        go.set()
        deadline = time.monotonic() + cfg.timeout_s
        failures = [f"{r}: did not finish within {cfg.timeout_s:.0f} s"
                    for r in self._wait(i, ("A", "B"), "done", deadline)]
        stop.set()
        failures += [f"{r}: did not finish within {cfg.timeout_s:.0f} s"
                     for r in self._wait(i, ("pruner", "reader"), "done", deadline)]
        return failures, startup

    def close(self) -> list[str]:
        failures = []
        for role, p in self.procs.items():
            p.join(10)
            if p.is_alive():
                failures.append(f"{role}: still running at the end; killed")
                p.kill()
                p.join()
            elif p.exitcode != 0:
                failures.append(f"{role}: exited with {p.exitcode}")
        return failures


def _describe(e: dict) -> str:
    fields = ", ".join(f"{k}={e[k]!r}" for k in ("what", "mode", "step", "error", "detail")
                       if e.get(k) is not None)
    trace = e.get("trace")
    return fields + (f"\n      {trace.strip().splitlines()[-1]}" if trace else "")


def _load_equal(mgr: CheckpointManager, step: int, saved: dict[int, dict]) -> str | None:
    """Why committed ``step`` does not verify and load equal to its (writer, step), or None."""
    writer = saved[step]["writer"] if step in saved else writer_of(step)
    try:
        mgr.verify(step)
        model, origin = _model(_READER_SEED), {}
        mgr.load(model, step=step, extra={"origin": origin}, verify=True)
    except Exception as e:
        return f"step {step} does not verify and load: {type(e).__name__}: {e}"
    if origin != {"writer": writer, "step": step}:
        return f"step {step} loaded extra {origin!r}"
    why = _differs(model, writer, step)
    if why:
        return f"step {step}: {why}"
    if step in saved and _crc(model.state_dict()) != saved[step]["crc"]:
        return f"step {step}: CRC-32 of the loaded weights differs from the writer's log"
    return None


def _debris(cfg: Config, mgr: CheckpointManager) -> list[str]:
    """What the root holds besides committed steps holding exactly their listed files."""
    files = storage_for(cfg.root, cfg.options).file_sizes(cfg.root)
    out = [f"temp file {p}" for p in files if p.endswith(".tmp")]
    by_top: dict[str, set[str]] = {}
    for p in files:
        top, _, rest = p.partition("/")
        by_top.setdefault(top, set()).add(rest)
    for top, inside in sorted(by_top.items()):
        step = manifest.step_of_name(top)
        if step is None:
            out.append(f"{top} (not a step directory)")
        elif manifest.MANIFEST not in inside:
            out.append(f"{top} (uncommitted step directory)")
        else:
            unlisted = inside - set(mgr.manifest(step).files) - {manifest.MANIFEST}
            if unlisted:
                out.append(f"{top} holds files its manifest does not list: {sorted(unlisted)}")
    return out


def run(cfg: Config, *, workdir: str | None = None) -> Outcome:
    """Run the workers on ``cfg.root`` and check it; logs go to ``workdir`` (a fresh
    temporary directory when None, removed unless something failed)."""
    return run_all([cfg], workdirs=None if workdir is None else [workdir])[0]


def run_all(cfgs: list[Config], *, workdirs: list[str] | None = None,
            report: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """:func:`run` for each config in turn, with one set of worker processes (their
    start, torch's import, is most of a short run's time); ``report`` is called with
    each outcome as soon as it is known."""
    for cfg in cfgs:
        if (cfg.seconds is None) == (cfg.rounds is None):
            raise ValueError("give exactly one of seconds and rounds")
    if len({cfg.start_method for cfg in cfgs}) != 1:
        raise ValueError("one start method for every config")
    own = workdirs is None
    logdirs = ([tempfile.mkdtemp(prefix="dcpu-conc-logs-") for _ in cfgs] if own
               else list(workdirs))
    for d in logdirs:
        os.makedirs(d, exist_ok=True)
    workers = _Workers(cfgs, logdirs)
    outcomes = []
    try:
        for i, cfg in enumerate(cfgs):
            start = time.monotonic()
            failures, startup = workers.drive(i, cfg)
            outcomes.append(_check(cfg, logdirs[i], failures, startup, start))
            if report is not None:
                report(outcomes[-1])
    finally:
        # a job that could not start leaves the later ones waiting: end them
        for go, stop in workers.events:
            go.set()
            stop.set()
        closing = workers.close()
    if closing and outcomes:
        outcomes[-1].failures += closing
    for out, d in zip(outcomes, logdirs):
        if own and out.ok:
            shutil.rmtree(d, ignore_errors=True)
        elif not out.ok:
            out.failures.append(f"(worker logs kept in {d})")
    return outcomes


def _check(cfg: Config, logdir: str, failures: list[str], startup: float,
           start: float) -> Outcome:
    """Everything checked after a job's workers stopped (see the module docstring)."""
    logs = _read_logs(logdir)
    for role in ROLES:
        failures += [f"{role}: {_describe(e)}" for e in logs[role] if e.get("ev") == "fail"]
        if not any(e.get("ev") == "done" for e in logs[role]):
            failures.append(f"{role}: did not finish its loop")
    ev = lambda role, name: [e for e in logs[role] if e.get("ev") == name]

    saved: dict[int, dict] = {}
    for role in WRITERS:
        for e in ev(role, "saved"):
            if e["step"] in saved:
                failures.append(f"step {e['step']} was saved twice ({saved[e['step']]['writer']} "
                                f"and {role})")
            if writer_of(e["step"]) != role:
                failures.append(f"{role} saved step {e['step']} of the other parity")
            saved[e["step"]] = e
    counts = {"saves_A": len(ev("A", "saved")), "saves_B": len(ev("B", "saved")),
              "writer_busy": len(ev("A", "busy")) + len(ev("B", "busy")),
              "async_saves": sum(not e["blocking"] for r in WRITERS for e in ev(r, "saved")),
              "prunes": len(ev("pruner", "pruned")), "prune_busy": len(ev("pruner", "busy")),
              "pruned_steps": sum(len(e["deleted"]) for e in ev("pruner", "pruned")),
              "reads": len(ev("reader", "read")), "raced": len(ev("reader", "raced")),
              "startup_s": round(startup, 1),
              "raced_by": dict(collections.Counter(e["error"].split(":", 1)[0]
                                                   for e in ev("reader", "raced")))}
    read_steps = {e["step"] for e in ev("reader", "read")}
    failures += [f"the reader loaded step {s}, which no writer reported saved"
                 for s in sorted(read_steps - set(saved))]

    mgr = CheckpointManager(cfg.root, keep_last=cfg.keep_last, storage_options=cfg.options)
    committed = mgr.steps()
    # The prune_keep_last highest saved steps were, whenever committed, among that many
    # newest of every set of committed steps: no retention (writers' or pruner's) may
    # have removed them. Which lower ones remain depends on who changed the root last
    # (a writer may save below a step committed while it waited for the lease), but
    # retention ran after that last change: at most keep_last remain.
    floor = sorted(saved)[-cfg.prune_keep_last:]
    lost = sorted(set(floor) - set(committed))
    if lost:
        failures.append(f"LOST: steps {lost} were saved and no retention may remove them, "
                        f"but the root holds {committed}")
    phantom = sorted(set(committed) - set(saved))
    if phantom:
        failures.append(f"steps {phantom} are committed but no writer reported them saved")
    if len(committed) > cfg.keep_last:
        failures.append(f"{committed} are committed: retention (keep_last={cfg.keep_last}) "
                        "did not run after the last change")
    equal = 0
    for step in committed:
        why = _load_equal(mgr, step, saved)
        if why:
            failures.append(why)
        else:
            equal += 1
    if _lease_holder(mgr, cfg) is not None:
        failures.append(f"{LEASE_FILE} is left behind after every worker closed its managers: "
                        f"{_lease_holder(mgr, cfg)!r}")

    # the next job: a fresh manager saves one step and closes; the root is then clean
    final = max([*saved, *committed, -1]) + 1
    fresh = CheckpointManager(cfg.root, keep_last=cfg.keep_last, storage_options=cfg.options)
    try:
        fresh.save(final, _model(_seed(FINAL, final)), extra={"origin": {"writer": FINAL,
                                                                        "step": final}})
    except Exception as e:
        failures.append(f"the final save of step {final} failed: {type(e).__name__}: {e}")
    finally:
        fresh.close()
    after = mgr.steps()
    want = sorted({*committed, final})[-cfg.keep_last:]
    if after != want:
        failures.append(f"after the final save, steps() is {after}, expected {want}")
    failures += [f"after the final save: {d}" for d in _debris(cfg, mgr)]
    final_state = {final: {"writer": FINAL, "crc": _crc(expected_state(FINAL, final))}}
    if final in after:
        why = _load_equal(mgr, final, final_state)
        if why:
            failures.append(f"the final save: {why}")

    n = len(committed)
    summary = (f"CONCURRENCY ({cfg.storage}): saves A={counts['saves_A']} B={counts['saves_B']} "
               f"busy={counts['writer_busy']} prunes={counts['prunes']} "
               f"busy={counts['prune_busy']} reads={counts['reads']} raced={counts['raced']} ; "
               f"committed steps loadable and equal: {equal}/{n} ; lost: {len(lost)}")
    return Outcome(cfg.storage, counts, committed, equal, lost, failures,
                   time.monotonic() - start, summary)


def _report(out: Outcome) -> None:
    c = out.counts
    print(f"{out.storage}: {out.seconds:.1f} s (workers' start {c['startup_s']} s); "
          f"{c['async_saves']} of the saves asynchronous; "
          f"the pruner deleted {c['pruned_steps']} steps; raced reads by error: "
          f"{c['raced_by'] or 'none'}; committed at the end: {out.committed}",
          flush=True)
    for f in out.failures:
        print(f"  FAILURE ({out.storage}): {f}", flush=True)
    print(out.summary, flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--storage", choices=["local", "s3", "both"], default="local")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--seconds", type=float,
                     help="run each storage this long, one after the other (default 30)")
    how.add_argument("--rounds", type=int,
                     help="each writer completes this many sessions that saved a step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-last", type=int, default=3, help="the writers' keep_last")
    parser.add_argument("--prune-keep-last", type=int, default=2, help="the pruner's keep_last")
    parser.add_argument("--saves-per-session", type=int, default=3)
    parser.add_argument("--async-fraction", type=float, default=0.25)
    parser.add_argument("--pause", type=float, default=None,
                        help="workers pause up to this many seconds between sessions "
                        "(default: 0.03 local, 0.15 on S3, where each request costs more)")
    parser.add_argument("--min-ops", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=None,
                        help="fail after this many seconds per storage (default: generous)")
    parser.add_argument("--start-method", choices=["spawn", "forkserver"], default="spawn",
                        help="how the workers start (forkserver: forked from a server that "
                        "imported torch and dcp_universal)")
    parser.add_argument("--keep", action="store_true", help="keep the local root and the logs")
    args = parser.parse_args(argv)
    if not 1 <= args.prune_keep_last <= args.keep_last:
        parser.error("--prune-keep-last must be between 1 and --keep-last")
    if args.seconds is None and args.rounds is None:
        args.seconds = 30.0
    timeout = args.timeout or ((args.seconds or 0) + 300 if args.seconds else 600)
    storages = ["local", "s3"] if args.storage == "both" else [args.storage]

    workdirs = {storage: tempfile.mkdtemp(prefix=f"dcpu-conc-{storage}-") for storage in storages}
    with contextlib.ExitStack() as stack:
        cfgs = []
        for storage in storages:
            pause = args.pause if args.pause is not None else 0.03 if storage == "local" else 0.15
            common = dict(storage=storage, keep_last=args.keep_last,
                          prune_keep_last=args.prune_keep_last, seconds=args.seconds,
                          rounds=args.rounds, saves_per_session=args.saves_per_session,
                          async_fraction=args.async_fraction, pause_s=pause,
                          min_ops=args.min_ops, seed=args.seed, timeout_s=timeout,
                          start_method=args.start_method)
            if storage == "local":
                cfgs.append(Config(root=os.path.join(workdirs[storage], "ckpt"), **common))
            else:
                from s3server import fresh_prefix, moto_s3

                url, options = stack.enter_context(moto_s3())
                env = {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                  "AWS_DEFAULT_REGION",
                                                  "AWS_EC2_METADATA_DISABLED")}
                cfgs.append(Config(root=fresh_prefix(url), options=options, env=env, **common))
        outcomes = run_all(cfgs, workdirs=[os.path.join(workdirs[s], "logs") for s in storages],
                           report=_report)
    failed = False
    for storage, out in zip(storages, outcomes):
        failed |= not out.ok
        if out.ok and not args.keep:
            shutil.rmtree(workdirs[storage], ignore_errors=True)
        else:
            print(f"  (root and logs kept in {workdirs[storage]})", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
