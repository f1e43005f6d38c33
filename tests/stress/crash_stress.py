"""Crash stress: SIGKILL one rank at a random moment of a save, then check the root.

Each trial, in a fresh root, runs a gloo job on ``--world`` spawned CPU ranks (FSDP2,
the tiny model of ``tests/tiny.py``) that trains, commits step 1, trains one more step
and starts saving step 2. The parent kills one rank during that save, kills the rest
after a short grace (as a launcher would), and then, in this process with no process
group, checks the issue's three claims:

* the half-written step is never taken for latest: ``latest_step()`` is 2 only when
  step 2's ``manifest.json`` exists, 1 otherwise;
* the last committed step loads bit-identically: model tensors, optimizer moments,
  scheduler and counters equal (``torch.equal``) the state the job held when it saved
  that step, and so does the forward output; ``verify()`` passes;
* the next save cleans up the debris: a save of step 3 leaves no uncommitted
  ``step-*`` directory, no manifest temp file and no base that no step uses, and
  step 3 loads equal as well.

Two kinds of kill, half the trials each:

* ``timed``: the parent waits a random delay in [0, T] after the job announces the save
  (T: 1.3x a measured save), then kills a random rank;
* ``hook``: the job patches a few storage and collective functions, counts how often
  each runs during the save (a calibration trial per variant), and the chosen rank
  sends SIGKILL at the n-th call of a chosen one: inside a DCP data file (after writing
  half of a chunk), before/after DCP's ``.metadata`` rename, at the barriers, right
  before and right after the manifest rename, during pruning. This forces coverage of
  the commit window, which a timer hits rarely.

Run::

    python tests/stress/crash_stress.py --trials 50 --seed 0 --variant both

It prints one line per trial and ``CRASH TRIALS: K/N ...``; the exit status is 1 unless
K == N. ``tests/dist/test_crash.py`` runs a few fixed trials in CI.
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

_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import harness  # noqa: E402
import tiny  # noqa: E402
from dcp_universal import CheckpointManager, manager, storage  # noqa: E402
from dcp_universal.model_io import reshard  # noqa: E402
from dcp_universal.names import canonical_names  # noqa: E402
from train_loop import Data, build, full, moments, train  # noqa: E402

__all__ = ["Trial", "Calibration", "calibrate", "run_trial", "plan_trials", "main"]

VARIANTS = ("plain", "lora4")
SAVED_AT = (2, 3)  # training steps at which steps 1 and 2 are saved
_POLL_S = 0.002


@dataclasses.dataclass(kw_only=True)
class Trial:
    """One crash.

    Attributes:
        variant: ``tests/tiny.py`` variant ("plain" or "lora4").
        world: number of ranks.
        victim: the rank that gets SIGKILL.
        keep_last: the manager's retention (1 makes save 2 prune step 1).
        merged: LoRA: also write the merged ``model/`` in save 2.
        delay: timed kill: seconds after the job announces save 2 (None: hook kill).
        point: hook kill: the patched call (see ``_Hooks``) whose ``n``-th run on rank
            ``trigger`` sends the kill.
        grace: seconds the surviving ranks get before they are killed too.
        calibrate: no kill; count the hook points and time the save instead.
    """

    variant: str = "plain"
    world: int = 2
    victim: int = 0
    keep_last: int | None = None
    merged: bool = False
    delay: float | None = None
    point: str | None = None
    n: int = 1
    trigger: int = 0
    grace: float = 0.5
    calibrate: bool = False

    def describe(self) -> str:
        how = (f"timed {self.delay * 1e3:6.1f} ms" if self.delay is not None else
               f"hook {self.point}#{self.n}@r{self.trigger}" if self.point else "no kill")
        return (f"{self.variant:5s} victim=r{self.victim} {how} keep_last={self.keep_last}"
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

        around(storage.Storage, "save_state", "dcp_begin", "dcp_end")
        around(storage._Checksummed, "rename", "dcp_rename", "dcp_renamed")
        around(storage.Storage, "remove_file", "remove_file")
        around(storage.Storage, "remove_tree", "remove_tree")
        around(manager, "_barrier", "barrier")
        for name in ("all_gather_object", "broadcast_object_list", "all_reduce",
                     "scatter_object_list", "gather_object", "barrier"):
            around(dist, name, f"dist.{name}")

        write = storage._CrcStream.write

        def torn_write(stream, data):
            if hooks.fires("file_write"):
                view = memoryview(data).cast("B")  # half of this chunk reaches the disk
                stream._inner.write(view[: len(view) // 2])
                stream._inner.flush()
                hooks.kill()
            return write(stream, data)

        storage._CrcStream.write = torn_write

        replace = os.replace

        def manifest_replace(src, dst, *args, **kwargs):
            is_manifest = os.fspath(dst).endswith("/" + storage.MANIFEST)
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
    torch.manual_seed(1000 + rank)
    model, opt, sched = build(trial.variant, "fsdp", world)
    tiny.randomize_adapters(model, seed=50 + rank)
    data, counters = Data(rank), {"step": 0}
    extra = {"lr_scheduler": sched, "train": counters, "data": data}
    mgr = CheckpointManager(root, keep_last=trial.keep_last)
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
        start = time.time()
        mgr.save(step, model, opt, extra=extra, merged=trial.merged or None)
        hooks.armed = False
        _write_json(os.path.join(workdir, f"saved-{rank}.json"),
                    {"counts": dict(hooks.counts), "start": start, "end": time.time()})


# ---- the parent -----------------------------------------------------------------------


def _launch(trial: Trial, root: str, workdir: str) -> tuple[list, dict]:
    """Run the job and the kill; returns the processes (all ended) and what happened."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=harness._entry,
                         args=(r, trial.world, workdir, _job, (trial, root, workdir)), daemon=True)
             for r in range(trial.world)]
    for p in procs:
        p.start()
    _write_json(os.path.join(workdir, "pids.json"), [p.pid for p in procs])
    events: dict = {}
    try:
        deadline = time.monotonic() + 120
        saving = os.path.join(workdir, "saving.json")
        while not os.path.exists(saving):
            errors = [f for f in os.listdir(workdir) if f.startswith("error-")]
            if errors or time.monotonic() > deadline or not all(p.is_alive() for p in procs):
                raise RuntimeError(f"the job failed before save 2: {_errors(workdir) or 'timeout'}")
            time.sleep(_POLL_S)
        t0 = time.monotonic()
        victim = procs[trial.victim]
        if trial.delay is not None:
            time.sleep(trial.delay)
            events["victim_alive_at_kill"] = victim.is_alive()
            victim.kill()
        # a hook kill, or no kill: wait for the victim to die or for the save to end
        deadline = time.monotonic() + 60
        saved = lambda: all(os.path.exists(os.path.join(workdir, f"saved-{r}.json"))
                            for r in range(trial.world))
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
    events["exitcodes"] = [p.exitcode for p in procs]
    events["fired"] = os.path.exists(os.path.join(workdir, "fired.json"))
    events["saved"] = [os.path.exists(os.path.join(workdir, f"saved-{r}.json"))
                       for r in range(trial.world)]
    return procs, events


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


def _load_and_compare(mgr: CheckpointManager, step: int, variant: str, ref: dict) -> None:
    """Load ``step`` into a fresh single-process model and compare with ``ref`` bit for bit."""
    model, opt, sched = build(variant, "none", 1, seed=9)  # other weights: the load must win
    counters: dict = {}
    report = mgr.load(model, opt, step=step, extra={"lr_scheduler": sched, "train": counters},
                      skip_per_rank=["rng", "data"], verify=True)
    assert not report.fresh and not report.optimizer_fresh and not report.optimizer_dropped, (
        f"step {step} did not restore everything: {report.summary()}")
    _equal(_state(model), ref["model"], f"step {step} model")
    _equal(moments(model, opt), ref["moments"], f"step {step} optimizer")
    _equal(sched.state_dict(), ref["sched"], f"step {step} lr_scheduler")
    _equal(counters, ref["counters"], f"step {step} counters")
    with torch.no_grad():
        _equal(model(tiny.fixed_input()), ref["y"], f"step {step} forward output")
    return model, opt, sched, counters


def _check_root(trial: Trial, root: str, workdir: str) -> str:
    """The issue's claims on what the crash left; returns a one-line summary."""
    mgr = CheckpointManager(root, keep_last=trial.keep_last)
    step2 = mgr.step_path(2)
    committed2 = os.path.exists(os.path.join(step2, storage.MANIFEST))
    debris2 = os.path.isdir(step2) and not committed2
    latest = mgr.latest_step()
    want = 2 if committed2 else 1
    assert latest == want, (f"latest_step() is {latest}, expected {want} "
                            f"(step 2 manifest {'present' if committed2 else 'absent'})")
    allowed = [[1, 2], [2]] if committed2 and trial.keep_last == 1 else [[1, 2]] if committed2 else [[1]]
    assert mgr.steps() in allowed, f"steps() is {mgr.steps()}, expected one of {allowed}"
    mgr.verify(latest)
    ref = torch.load(os.path.join(workdir, f"ref-{latest}.pt"), weights_only=False)
    model, opt, sched, counters = _load_and_compare(mgr, latest, trial.variant, ref)

    # the next save, by a new job (no process group), removes the debris
    mgr3 = CheckpointManager(root, keep_last=trial.keep_last)
    mgr3.save(3, model, opt, extra={"lr_scheduler": sched, "train": counters})
    steps = mgr3.steps()
    assert steps[-1] == 3, f"steps() after save 3 is {steps}"
    names = os.listdir(root)
    stray = [n for n in names if n.startswith("step-")
             and not os.path.exists(os.path.join(root, n, storage.MANIFEST))]
    assert not stray, f"save 3 left uncommitted step directories {stray}"
    tmp = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".tmp")]
    assert not tmp, f"temp files left after save 3: {tmp}"
    used = {mgr3.manifest(s).get("base") for s in steps}
    orphans = [n for n in names if n.startswith("base-") and n not in used]
    assert not orphans, f"bases no committed step uses: {orphans}"
    mgr3.verify(3)
    _load_and_compare(mgr3, 3, trial.variant, ref)  # step 3 saved the loaded state
    return (f"step 2 {'committed' if committed2 else 'debris' if debris2 else 'not started'}; "
            f"latest {latest} loads equal; save 3 clean, steps {steps}")


def run_trial(trial: Trial, *, keep: bool = False) -> tuple[bool, str, dict]:
    """Run one trial in a fresh temp root; returns (passed, summary, events)."""
    workdir = tempfile.mkdtemp(prefix="dcpu-crash-")
    root = os.path.join(workdir, "ckpt")
    events: dict = {}
    try:
        _, events = _launch(trial, root, workdir)
        if trial.calibrate:
            errors = _errors(workdir)
            assert not errors and all(events["saved"]), f"calibration run failed:\n{errors}"
        summary = _check_root(trial, root, workdir)
        return True, summary, events
    except Exception as e:
        detail = traceback.format_exc() if not isinstance(e, AssertionError) else str(e)
        keep = True
        return False, f"FAILED: {detail} (kept {workdir})", events
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def calibrate(variant: str, world: int = 2, merged: bool = False, keep_last=None) -> Calibration:
    """An undisturbed run: how long save 2 takes and how often each hook point runs."""
    trial = Trial(variant=variant, world=world, calibrate=True, merged=merged, keep_last=keep_last)
    workdir = tempfile.mkdtemp(prefix="dcpu-crash-cal-")
    try:
        _, events = _launch(trial, os.path.join(workdir, "ckpt"), workdir)
        counts, spans = {}, []
        for r in range(world):
            saved = _wait_json(os.path.join(workdir, f"saved-{r}.json"), timeout=1)
            counts[r] = saved["counts"]
            spans.append((saved["start"], saved["end"]))
        save_s = max(e for _, e in spans) - min(s for s, _ in spans)
        return Calibration(save_s=save_s, counts=counts)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def plan_trials(n: int, seed: int, variants: list[str], world: int,
                calibrations: dict) -> list[Trial]:
    """``n`` random trials, half timed and half hook kills, alternating the variants.

    ``calibrations``: ``(variant, merged, keep_last) -> Calibration``.
    """
    rng = random.Random(seed)
    trials = []
    for i in range(n):
        variant = variants[i % len(variants)]
        merged = variant != "plain" and rng.random() < 0.5
        keep_last = rng.choice([None, 1])
        cal = calibrations[(variant, merged, keep_last)]
        t = Trial(variant=variant, world=world, victim=rng.randrange(world), keep_last=keep_last,
                  merged=merged, grace=rng.uniform(0.0, 1.0))
        if i % 2 == 0:
            t.delay = rng.uniform(0.0, 1.3 * cal.save_s)
        else:
            choices = [(r, p, c) for r, counts in cal.counts.items() for p, c in counts.items()]
            t.trigger, t.point, count = rng.choice(sorted(choices))
            t.n = rng.randint(1, count)
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
    parser.add_argument("--keep", action="store_true", help="keep every trial's directory")
    args = parser.parse_args(argv)
    variants = list(VARIANTS) if args.variant == "both" else [args.variant]

    start = time.monotonic()
    calibrations = {}
    for variant in variants:
        for merged in ([False, True] if variant != "plain" else [False]):
            for keep_last in (None, 1):
                cal = calibrate(variant, args.world, merged, keep_last)
                calibrations[(variant, merged, keep_last)] = cal
                points = sorted({p for c in cal.counts.values() for p in c})
                print(f"calibration {variant} merged={merged} keep_last={keep_last}: save 2 "
                      f"takes {cal.save_s * 1e3:.0f} ms; hook points {points}", flush=True)
    trials = plan_trials(args.trials, args.seed, variants, args.world, calibrations)
    passed = 0
    outcomes = collections.Counter()
    for i, trial in enumerate(trials):
        t0 = time.monotonic()
        ok, summary, events = run_trial(trial, keep=args.keep)
        passed += ok
        outcomes[summary.split(";")[0] if ok else "FAILED"] += 1
        fired = " fired" if events.get("fired") else ""
        print(f"trial {i:3d} {trial.describe()}{fired} exit={events.get('exitcodes')} "
              f"({time.monotonic() - t0:.1f} s): {summary}", flush=True)
    print(f"outcomes: {dict(outcomes)}; {time.monotonic() - start:.0f} s in all")
    print(f"CRASH TRIALS: {passed}/{len(trials)} left the last committed step loadable and equal")
    return 0 if passed == len(trials) else 1


if __name__ == "__main__":
    sys.exit(main())
