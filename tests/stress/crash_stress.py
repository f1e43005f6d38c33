"""Crash stress: SIGKILL one rank at a random moment of a save, then check the root.

Each trial, in a fresh root, runs a gloo job on ``--world`` CPU ranks (FSDP2, the tiny
model of ``tests/tiny.py``, plain or LoRA) that trains, commits step 1, trains one more
step and saves step 2. The parent SIGKILLs one rank during that save and the others
after a random grace (as a launcher would), then checks, in this process with no
process group:

1. the half-written step is never taken for latest: ``latest_step()`` is 2 exactly
   when step 2's ``manifest.json`` exists, else 1;
2. the last committed step loads bit-identically: every committed step passes
   ``verify()`` (sizes and CRC-32) and loads into a fresh model, optimizer, scheduler
   and counters equal (``torch.equal``) to the job's state when it saved that step, and
   so does the forward output (per-rank RNG and data state are not compared: one
   process cannot load them);
3. the next save cleans up its debris: a new job resumes from the latest step and
   saves step 3, after which no uncommitted ``step-*`` directory, ``.tmp`` file, unused
   base, or file a committed step's manifest does not list remains, and every step
   still loads equal.

Trials vary the model (plain / LoRA, LoRA with the merged ``model/`` too), the retention
(keep all; ``keep_last=1``, so save 2 deletes step 1; ``keep_last=1, keep_every=1``, so
save 2 archives step 1), the save (``--mode``: blocking, or asynchronous: save 2 returns
once staged and the job trains one more step, changing every tensor, while the
background thread writes and commits; the step must still hold the state at the call)
and the kill, half the trials each way:

* timed: the parent kills a random rank a random delay after the job announces save 2,
  within 1.15x an undisturbed save (measured per configuration);
* hook: the ranks patch a few storage and collective functions in their own process
  (never the library's files) and one rank sends SIGKILL (mostly to itself) at the n-th
  call of one of them: halfway through writing a chunk of a DCP data file, around each
  DCP save and its ``.metadata`` rename, at each collective, right before and right
  after the manifest rename, at each file or tree removal (debris sweep, retention).
  Two calibration runs per configuration count the calls; a timer alone rarely
  lands in the commit window.

Run::

    python tests/stress/crash_stress.py --trials 100 --seed 0 --variant both

It prints one line per trial, then ``NEXT SAVE: M/N ...`` (claim 3) and ``CRASH TRIALS:
K/N left the last committed step loadable and equal`` (claims 1 and 2); the exit status
is 1 unless K == M == N. ``tests/dist/test_crash.py`` runs fixed trials in CI.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
import warnings

_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import harness  # noqa: E402
import tiny  # noqa: E402
from dcp_universal import CheckpointManager, storage
from dcp_universal.storage import checksums, dcp_io
from dcp_universal.format import manifest  # noqa: E402
from dcp_universal.model.view import reshard  # noqa: E402
from dcp_universal.model.names import canonical_names  # noqa: E402
from train_loop import Data, build, full, moments, train  # noqa: E402

__all__ = ["Trial", "Calibration", "Result", "DebrisError", "calibrate", "run_trial",
           "plan_trials", "main"]

VARIANTS = ("plain", "lora4")
# retention settings a trial runs under; save 2 prunes (last1) or archives (archive) step 1
RETENTION = {"all": {}, "last1": {"keep_last": 1}, "archive": {"keep_last": 1, "keep_every": 1}}
SAVED_AT = (2, 3)  # training steps at which steps 1 and 2 are saved
_POLL_S = 0.002


@dataclasses.dataclass(kw_only=True)
class Trial:
    """One crash.

    Attributes:
        variant: ``tests/tiny.py`` variant ("plain" or "lora4").
        world: number of ranks.
        victim: the rank that gets SIGKILL.
        retention: a key of ``RETENTION``: the manager's retention settings.
        merged: LoRA: also write the merged ``model/`` in save 2.
        delay: timed kill: seconds after the job announces save 2 (None: hook kill).
        point: hook kill: the patched call (see ``_Hooks``) whose ``n``-th run on rank
            ``trigger`` sends the kill.
        grace: seconds the surviving ranks get before they are killed too.
        calibrate: no kill; count the hook points and time the save instead.
        asynchronous: save 2 with ``blocking=False`` and train on while it is written.
    """

    variant: str = "plain"
    world: int = 2
    victim: int = 0
    retention: str = "all"
    merged: bool = False
    delay: float | None = None
    point: str | None = None
    n: int = 1
    trigger: int = 0
    grace: float = 0.5
    calibrate: bool = False
    asynchronous: bool = False

    def describe(self) -> str:
        how = (f"timed {self.delay * 1e3:6.1f} ms" if self.delay is not None else
               f"hook {self.point}#{self.n}@r{self.trigger}" if self.point else "no kill")
        return (f"{self.variant:5s} {'async' if self.asynchronous else 'block'} "
                f"victim=r{self.victim} {how} retention={self.retention}"
                f"{' merged' if self.merged else ''}")


@dataclasses.dataclass
class Calibration:
    """What an undisturbed save 2 looks like: its duration and, per rank, how many
    times each hook point ran."""

    save_s: float
    counts: dict[int, dict[str, int]]


# ---- the job (runs on every rank, through harness._entry) -----------------------------


class _Hooks:
    """Counts calls of a few library and DCP functions while armed, and sends SIGKILL
    at the trial's chosen one. Only this process is patched; the library is not."""

    def __init__(self, trial: Trial, rank: int, workdir: str) -> None:
        self.trial, self.rank, self.workdir = trial, rank, workdir
        self.counts: collections.Counter = collections.Counter()
        self.armed = False

    def fires(self, point: str) -> bool:
        if not self.armed:
            return False
        self.counts[point] += 1
        t = self.trial
        return (t.point == point and t.trigger == self.rank and self.counts[point] == t.n
                and not t.calibrate)

    def at(self, point: str) -> None:
        if self.fires(point):
            self.kill()

    def kill(self) -> None:
        pids = _wait_json(os.path.join(self.workdir, "pids.json"))
        victim = pids[self.trial.victim]
        _write_json(os.path.join(self.workdir, "fired.json"),
                    {"rank": self.rank, "victim": self.trial.victim, "t": time.time()})
        os.kill(victim, signal.SIGKILL)
        if victim == os.getpid():
            time.sleep(60)  # SIGKILL to oneself lands before this returns

    def install(self) -> None:
        hooks = self

        def around(owner, name, before=None, after=None):
            orig = getattr(owner, name)

            def wrapper(*args, **kwargs):
                if before:
                    hooks.at(before)
                out = orig(*args, **kwargs)
                if after:
                    hooks.at(after)
                return out

            setattr(owner, name, wrapper)

        around(dcp_io, "save_state", "dcp_begin", "dcp_end")
        around(checksums.Checksummed, "rename", "dcp_rename", "dcp_renamed")
        around(storage.Storage, "remove_file", "remove_file")
        around(storage.Storage, "remove_tree", "remove_tree")
        for name in ("all_gather_object", "broadcast_object_list", "all_reduce",
                     "scatter_object_list", "gather_object", "barrier"):
            around(dist, name, f"dist.{name}")

        write = checksums._CrcStream.write

        def torn_write(stream, data):
            if hooks.fires("file_write"):
                view = memoryview(data).cast("B")  # half of this chunk reaches the disk
                stream._inner.write(view[: len(view) // 2])
                stream._inner.flush()
                hooks.kill()
            return write(stream, data)

        checksums._CrcStream.write = torn_write

        replace = os.replace

        def manifest_replace(src, dst, *args, **kwargs):
            is_manifest = os.fspath(dst).endswith("/" + manifest.MANIFEST)
            if is_manifest:
                hooks.at("manifest_rename")
            out = replace(src, dst, *args, **kwargs)
            if is_manifest:
                hooks.at("manifest_renamed")
            return out

        os.replace = manifest_replace


def _write_json(path: str, obj) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)


def _wait_json(path: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(_POLL_S)
    with open(path) as f:
        return json.load(f)


def _state(model) -> dict[str, torch.Tensor]:
    """Every model tensor by canonical name, gathered (collective under FSDP2)."""
    reshard(model)
    sd = model.state_dict()
    names = canonical_names(model, sd.keys())
    return {names[k]: full(v) for k, v in sd.items()}


def _reference(model, opt, sched, counters) -> dict:
    """What a load of the step about to be saved must reproduce (collective)."""
    with torch.no_grad():
        y = model(tiny.fixed_input())
    return {"y": y, "model": _state(model), "moments": moments(model, opt),
            "sched": sched.state_dict(), "counters": dict(counters)}


def _job(rank: int, world: int, trial: Trial, root: str, workdir: str) -> None:
    # the references' forward under FSDP2 returns a view; nothing here writes to it
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")
    torch.manual_seed(1000 + rank)
    model, opt, sched = build(trial.variant, "fsdp", world)
    tiny.randomize_adapters(model, seed=50 + rank)
    data, counters = Data(rank), {"step": 0}
    extra = {"lr_scheduler": sched, "train": counters, "data": data}
    mgr = CheckpointManager(root, **RETENTION[trial.retention])
    hooks = _Hooks(trial, rank, workdir)
    hooks.install()

    for step, until in enumerate(SAVED_AT, start=1):
        train(model, opt, sched, data, counters, until)
        ref = _reference(model, opt, sched, counters)
        if rank == 0:
            torch.save(ref, os.path.join(workdir, f"ref-{step}.tmp"))
            os.replace(os.path.join(workdir, f"ref-{step}.tmp"),
                       os.path.join(workdir, f"ref-{step}.pt"))
        if step == 1:
            mgr.save(step, model, opt, extra=extra)
            continue
        dist.barrier()
        if rank == 0:
            _write_json(os.path.join(workdir, "saving.json"), {"t": time.time()})
        hooks.armed = True
        handle = mgr.save(step, model, opt, extra=extra, merged=trial.merged or None,
                          blocking=not trial.asynchronous)
        if trial.asynchronous:  # the loop goes on, changing everything, while it is written
            train(model, opt, sched, data, counters, until + 1)
            handle.result()
        hooks.armed = False
        _write_json(os.path.join(workdir, f"saved-{rank}.json"), {"counts": dict(hooks.counts)})


# ---- the parent -----------------------------------------------------------------------


def _context():
    """Like the harness's spawn, but forked from a server that imported torch once: a
    trial's ranks then start in a fraction of a second instead of seconds each."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed.fsdp", "torch.distributed.checkpoint",
                                "dcp_universal", "harness", "tiny", "train_loop", __name__])
    return ctx


def _launch(trial: Trial, root: str, workdir: str) -> dict:
    """Run the job and the kill; returns what happened, once every rank has ended."""
    ctx = _context()
    procs = [ctx.Process(target=harness._entry,
                         args=(r, trial.world, workdir, _job, (trial, root, workdir)), daemon=True)
             for r in range(trial.world)]
    for p in procs:
        p.start()
    _write_json(os.path.join(workdir, "pids.json"), [p.pid for p in procs])
    events: dict = {}
    started = time.monotonic()
    try:
        deadline = time.monotonic() + 120
        saving = os.path.join(workdir, "saving.json")
        while not os.path.exists(saving):
            errors = [f for f in os.listdir(workdir) if f.startswith("error-")]
            if errors or time.monotonic() > deadline or not all(p.is_alive() for p in procs):
                raise RuntimeError(f"the job failed before save 2: {_errors(workdir) or 'timeout'}")
            time.sleep(_POLL_S)
        t0 = time.monotonic()
        events["startup_s"] = t0 - started
        victim = procs[trial.victim]
        saved = lambda: all(os.path.exists(os.path.join(workdir, f"saved-{r}.json"))
                            for r in range(trial.world))
        if trial.delay is not None:
            time.sleep(trial.delay)
            events["after_save"] = saved()  # too late: every rank had finished the save
            victim.kill()
        # a hook kill, or no kill: wait for the victim to die or for the save to end
        deadline = time.monotonic() + 60
        while victim.is_alive() and not saved() and time.monotonic() < deadline:
            time.sleep(_POLL_S)
        events["save_s"] = time.monotonic() - t0
        if trial.calibrate:
            for p in procs:
                p.join(30)
        else:
            time.sleep(trial.grace)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join()
    events["ended_s"] = time.monotonic() - started
    events["exitcodes"] = [p.exitcode for p in procs]
    events["fired"] = os.path.exists(os.path.join(workdir, "fired.json"))
    events["saved"] = [os.path.exists(os.path.join(workdir, f"saved-{r}.json"))
                       for r in range(trial.world)]
    return events


def _errors(workdir: str) -> str:
    out = []
    for name in sorted(os.listdir(workdir)):
        if name.startswith("error-") and name.endswith(".txt"):
            with open(os.path.join(workdir, name)) as f:
                out.append(f"{name}:\n{f.read()}")
    return "\n".join(out)


def _equal(got, want, what: str) -> None:
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), (
            f"{what}: keys differ: {sorted(set(got) ^ set(want))}")
        for k in want:
            _equal(got[k], want[k], f"{what}[{k!r}]")
    elif isinstance(want, torch.Tensor):
        assert (isinstance(got, torch.Tensor) and got.dtype == want.dtype
                and got.shape == want.shape and torch.equal(got, want)), f"{what} differs"
    else:
        assert got == want, f"{what}: {got!r} != {want!r}"


def _load_and_compare(mgr: CheckpointManager, step: int, variant: str, ref: dict):
    """Load ``step`` into a fresh single-process model (and optimizer, scheduler and
    counters when the step has them: archived steps do not) and compare with ``ref``
    bit for bit. Returns what was loaded."""
    model, opt, sched = build(variant, "none", 1, seed=9)  # other weights: the load must win
    counters: dict = {}
    training = mgr.manifest(step).items.get("optimizer")
    if training:
        report = mgr.load(model, opt, step=step, extra={"lr_scheduler": sched, "train": counters},
                          skip_per_rank=["rng", "data"], verify=True)
        assert not report.optimizer_fresh and not report.optimizer_dropped, (
            f"step {step} did not restore the optimizer: {report.summary()}")
    else:
        report = mgr.load(model, step=step, verify=True)
    assert not report.fresh, f"step {step} did not restore the model: {report.summary()}"
    _equal(_state(model), ref["model"], f"step {step} model")
    with torch.no_grad():
        _equal(model(tiny.fixed_input()), ref["y"], f"step {step} forward output")
    if training:
        _equal(moments(model, opt), ref["moments"], f"step {step} optimizer")
        _equal(sched.state_dict(), ref["sched"], f"step {step} lr_scheduler")
        _equal(counters, ref["counters"], f"step {step} counters")
    return model, opt, sched, counters


def _files_under(path: str) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs}


def _check_every_step(mgr: CheckpointManager, variant: str, refs: dict[int, dict]) -> None:
    """Every committed step verifies (sizes and CRC-32 of every file it lists) and loads
    equal to the state it saved."""
    for step in mgr.steps():
        mgr.verify(step)
        _load_and_compare(mgr, step, variant, refs[step])


class DebrisError(AssertionError):
    """The save after the crash left something behind."""


def _check_crash(trial: Trial, root: str, workdir: str) -> tuple[int, str, dict]:
    """What the crash left: the last committed step is latest, never the half-written
    one, and every committed step verifies and loads equal. Returns the latest step,
    step 2's state in words, and the references by step."""
    mgr = CheckpointManager(root, **RETENTION[trial.retention])
    step2 = mgr.step_path(2)
    committed2 = os.path.exists(os.path.join(step2, manifest.MANIFEST))
    latest = mgr.latest_step()
    want = 2 if committed2 else 1
    assert latest == want, (f"latest_step() is {latest}, expected {want} "
                            f"(step 2 manifest {'present' if committed2 else 'absent'})")
    # step 1 goes only when step 2 committed and keep_last drops it (a kill in that
    # prune may leave it either way); archiving keeps it
    allowed = ([[1, 2], [2]] if committed2 and trial.retention == "last1" else
               [[1, 2]] if committed2 else [[1]])
    assert mgr.steps() in allowed, f"steps() is {mgr.steps()}, expected one of {allowed}"
    assert mgr.manifest(latest).items["optimizer"], f"latest step {latest} lost its optimizer"
    refs = {s: torch.load(os.path.join(workdir, f"ref-{s}.pt"), weights_only=False) for s in (1, 2)}
    _check_every_step(mgr, trial.variant, refs)
    state = "committed" if committed2 else "debris" if os.path.isdir(step2) else "not started"
    return latest, state, refs


def _check_next_save(trial: Trial, root: str, latest: int, refs: dict) -> list[int]:
    """A new job (one process, no group) resumes from ``latest`` and saves step 3: no
    uncommitted step, temp file, unused base or unlisted file remains, and every
    committed step still verifies and loads equal. Returns the steps after it."""
    mgr = CheckpointManager(root, **RETENTION[trial.retention])
    model, opt, sched, counters = _load_and_compare(mgr, latest, trial.variant, refs[latest])
    mgr.save(3, model, opt, extra={"lr_scheduler": sched, "train": counters})
    mgr.wait()  # retention's removals run on a thread of their own
    steps = mgr.steps()
    assert steps[-1] == 3, f"steps() after save 3 is {steps}"
    names = os.listdir(root)
    stray = [n for n in names if n.startswith("step-")
             and not os.path.exists(os.path.join(root, n, manifest.MANIFEST))]
    if stray:
        raise DebrisError(f"save 3 left uncommitted step directories {stray}")
    tmp = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".tmp")]
    if tmp:
        raise DebrisError(f"save 3 left temp files {tmp}")
    manifests = {s: mgr.manifest(s) for s in steps}
    orphans = [n for n in names if n.startswith("base-")
               and n not in {m.base for m in manifests.values()}]
    if orphans:
        raise DebrisError(f"save 3 left bases no committed step uses: {orphans}")
    for s, m in manifests.items():  # a committed step holds exactly what its manifest lists
        unlisted = _files_under(mgr.step_path(s)) - set(m.files) - {manifest.MANIFEST}
        if unlisted:
            raise DebrisError(f"after save 3, committed step {s} holds files its manifest does "
                              f"not list: {sorted(unlisted)}")
    _check_every_step(mgr, trial.variant, {**refs, 3: refs[latest]})
    return steps


@dataclasses.dataclass
class Result:
    """A trial's verdict.

    Attributes:
        loadable: the last committed step is latest (never the half-written one) and
            every committed step verifies and loads equal to what was saved.
        clean: the next save left no debris and every step still loads equal.
        summary: one line; the failure's message when one failed.
        events: what the parent saw (exit codes, whether the hook fired, timings).
    """

    loadable: bool
    clean: bool
    summary: str
    events: dict


def run_trial(trial: Trial, *, workdir: str | None = None, keep: bool = False) -> Result:
    """Run one trial in ``workdir`` (an empty directory the caller owns), or else in a
    fresh temp directory, removed unless ``keep`` or the trial failed."""
    own = workdir is None
    workdir = tempfile.mkdtemp(prefix="dcpu-crash-") if own else workdir
    keep = keep or not own
    root = os.path.join(workdir, "ckpt")
    events: dict = {}
    loadable = False
    try:
        events = _launch(trial, root, workdir)
        if trial.calibrate and (_errors(workdir) or not all(events["saved"])):
            raise RuntimeError(f"the undisturbed run failed:\n{_errors(workdir)}")
        latest, events["step2"], refs = _check_crash(trial, root, workdir)
        loadable = True
        steps = _check_next_save(trial, root, latest, refs)
        summary = (f"step 2 {events['step2']}; latest {latest} loads equal; "
                   f"save 3 clean, steps {steps}")
        return Result(True, True, summary, events)
    except Exception as e:
        keep = True
        detail = str(e) if isinstance(e, AssertionError) else traceback.format_exc()
        stage = "next save" if loadable else "crash"
        return Result(loadable, False, f"FAILED ({stage}): {detail} (in {workdir})", events)
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def calibrate(variant: str, world: int = 2, merged: bool = False, retention: str = "all",
              runs: int = 2, asynchronous: bool = False) -> Calibration:
    """Undisturbed runs (each must pass every check): how long save 2 takes, the
    fastest run on the parent's clock (announced -> every rank done, as timed kills
    count), and how often each hook point runs (the fewest, so every n is reached)."""
    trial = Trial(variant=variant, world=world, calibrate=True, merged=merged, retention=retention,
                  asynchronous=asynchronous)
    times, counts = [], {}
    for _ in range(runs):
        workdir = tempfile.mkdtemp(prefix="dcpu-crash-cal-")
        try:
            root = os.path.join(workdir, "ckpt")
            times.append(_launch(trial, root, workdir)["save_s"])
            latest, _, refs = _check_crash(trial, root, workdir)
            _check_next_save(trial, root, latest, refs)
            for r in range(world):
                seen = _wait_json(os.path.join(workdir, f"saved-{r}.json"), timeout=1)["counts"]
                mine = counts.setdefault(r, seen)
                for point in set(mine) | set(seen):
                    mine[point] = min(mine.get(point, 0), seen.get(point, 0))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    counts = {r: {p: c for p, c in cs.items() if c} for r, cs in counts.items()}
    return Calibration(save_s=min(times), counts=counts)


def plan_trials(n: int, seed: int, variants: list[str], world: int,
                calibrations: dict, modes: tuple[bool, ...] = (False,)) -> list[Trial]:
    """``n`` random trials: the variants alternate, and timed and hook kills alternate
    in turns of one trial per variant; blocking and asynchronous saves (``modes``)
    alternate trial by trial.

    ``calibrations``: ``(variant, merged, retention, asynchronous) -> Calibration``.
    """
    rng = random.Random(seed)
    trials = []
    for i in range(n):
        variant = variants[i % len(variants)]
        merged = variant != "plain" and rng.random() < 0.5
        retention = rng.choice(sorted(RETENTION))
        asynchronous = modes[i % len(modes)]
        cal = calibrations[(variant, merged, retention, asynchronous)]
        t = Trial(variant=variant, world=world, victim=rng.randrange(world), retention=retention,
                  merged=merged, grace=rng.uniform(0.0, 1.0), asynchronous=asynchronous)
        if (i // len(variants)) % 2 == 0:
            t.delay = rng.uniform(0.0, 1.15 * cal.save_s)
        else:
            # a point first (each as likely, however often it runs), then a rank that runs it
            t.point = rng.choice(sorted({p for counts in cal.counts.values() for p in counts}))
            t.trigger = rng.choice(sorted(r for r, counts in cal.counts.items() if t.point in counts))
            t.n = rng.randint(1, cal.counts[t.trigger][t.point])
            # mostly the rank at the point dies; sometimes a peer, wherever it is then
            t.victim = t.trigger if rng.random() < 0.7 else rng.randrange(world)
        trials.append(t)
    return trials


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--variant", choices=[*VARIANTS, "both"], default="both")
    parser.add_argument("--mode", choices=["blocking", "async", "both"], default="both",
                        help="save 2 blocking, asynchronous, or alternating")
    parser.add_argument("--keep", action="store_true", help="keep every trial's directory")
    args = parser.parse_args(argv)
    variants = list(VARIANTS) if args.variant == "both" else [args.variant]
    modes = {"blocking": (False,), "async": (True,), "both": (False, True)}[args.mode]

    start = time.monotonic()
    calibrations = {}
    for variant in variants:
        for merged in ([False, True] if variant != "plain" else [False]):
            for retention in sorted(RETENTION):
                for asynchronous in modes:
                    cal = calibrate(variant, args.world, merged, retention,
                                    asynchronous=asynchronous)
                    calibrations[(variant, merged, retention, asynchronous)] = cal
                    points = sorted({p for c in cal.counts.values() for p in c})
                    print(f"calibration {variant} merged={merged} retention={retention} "
                          f"async={asynchronous}: save 2 takes {cal.save_s * 1e3:.0f} ms; "
                          f"hook points {points}", flush=True)
    trials = plan_trials(args.trials, args.seed, variants, args.world, calibrations, modes)
    loadable = clean = 0
    outcomes: collections.Counter = collections.Counter()
    for i, trial in enumerate(trials):
        t0 = time.monotonic()
        result = run_trial(trial, keep=args.keep)
        loadable += result.loadable
        clean += result.clean
        outcomes[result.events.get("step2", "?")] += 1
        fired = (" (fired)" if result.events.get("fired") else " (never fired)" if trial.point
                 else " (after the save)" if result.events.get("after_save")
                 else "")
        print(f"trial {i:3d} {trial.describe()}{fired} exit={result.events.get('exitcodes')} "
              f"{time.monotonic() - t0:.1f} s: {result.summary}", flush=True)
    n = len(trials)
    print(f"step 2 after the kill: {dict(outcomes)}; {time.monotonic() - start:.0f} s in all")
    print(f"NEXT SAVE: {clean}/{n} trials' next save left no debris")
    print(f"CRASH TRIALS: {loadable}/{n} left the last committed step loadable and equal")
    return 0 if loadable == clean == n else 1


if __name__ == "__main__":
    sys.exit(main())
