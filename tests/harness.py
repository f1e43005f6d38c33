"""One harness for every multi-process test: spawned gloo processes on CPU.

``run(fn, world_size, *args)`` starts ``world_size`` processes, each joining a gloo group
through a FileStore (no ports to race for), calls ``fn(rank, world_size, *args)`` and
returns every rank's return value. A rank's exception is re-raised in the parent with its
traceback. Processes leave with ``os._exit`` after writing their result and destroying the
group, because gloo has been seen to abort in interpreter teardown; a result file written
before that is what counts, not the exit code.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_S = 90


def _entry(rank, world_size, workdir, fn, args):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    ok = False
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{workdir}/store", rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        out = fn(rank, world_size, *args)
        torch.save(out, f"{workdir}/result-{rank}.tmp")
        os.replace(f"{workdir}/result-{rank}.tmp", f"{workdir}/result-{rank}.pt")
        ok = True
    except BaseException:
        with open(f"{workdir}/error-{rank}.tmp", "w") as f:
            f.write(traceback.format_exc())
        os.replace(f"{workdir}/error-{rank}.tmp", f"{workdir}/error-{rank}.txt")
    finally:
        try:
            if ok and dist.is_initialized():
                dist.barrier()
            if dist.is_initialized():
                dist.destroy_process_group()
        except BaseException:
            pass
        os._exit(0 if ok else 1)


def run(fn, world_size: int, *args, timeout: float = 300.0) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return results by rank."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="dcpu-harness-") as workdir:
        procs = [ctx.Process(target=_entry, args=(r, world_size, workdir, fn, args), daemon=True)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        results = {}
        errors = {}
        while time.monotonic() < deadline:
            for r in range(world_size):
                if r not in errors and os.path.exists(f"{workdir}/error-{r}.txt"):
                    with open(f"{workdir}/error-{r}.txt") as f:
                        errors[r] = f.read()
            if errors or all(not p.is_alive() for p in procs):
                break
            time.sleep(0.05)
        if errors and any(p.is_alive() for p in procs):
            # peers of a failed rank may sit in a collective until the gloo timeout
            time.sleep(1.0)
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
        if errors:
            first = min(errors)
            raise RuntimeError(f"rank {first} of {world_size} failed:\n{errors[first]}")
        for r in range(world_size):
            path = f"{workdir}/result-{r}.pt"
            if not os.path.exists(path):
                codes = [p.exitcode for p in procs]
                raise RuntimeError(f"rank {r} of {world_size} left no result "
                                   f"(exit codes {codes}, timeout {timeout}s)")
            results[r] = torch.load(path, weights_only=False)
        return [results[r] for r in range(world_size)]


def outcome(fn) -> tuple:
    """Run ``fn`` on this rank: ``(exception class name or None, message, seconds)``, so a
    rank can report a failure as a result instead of dying with it."""
    start = time.monotonic()
    try:
        fn()
    except Exception as e:
        return type(e).__name__, str(e), time.monotonic() - start
    return None, "", time.monotonic() - start
