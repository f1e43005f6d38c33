"""Benchmark a whole training checkpoint: ``CheckpointManager.save`` / ``load`` against
plain DCP of ``get_state_dict`` of the same state, in one run, on 2 (or ``--world``) gloo
ranks.

Run from the repository root::

    .venv/bin/python benchmarks/bench_manager.py                   # 151 MB, 2 ranks, 5 rounds
    .venv/bin/python benchmarks/bench_manager.py --world 1,2,4     # one table, 3 jobs
    .venv/bin/python benchmarks/bench_manager.py --size-mb 16 --repeats 2   # smoke, ~30 s
    .venv/bin/python benchmarks/bench_manager.py --profile save    # where ours spends its time

The job: FSDP2 over an embedding and ``Linear`` blocks (``--size-mb`` MiB of fp32
weights, all trainable), AdamW with its moments filled by one step, an LR scheduler and a
dict of counters. Each round, in an order rotated from round to round:

* ours: ``mgr.save(step, model, opt, extra=...)`` with checksums (the default) and
  ``keep_last=2`` (from the third round on, each save also deletes a step);
* plain DCP: ``dcp.save({"model": get_model_state_dict(m), "optim":
  get_optimizer_state_dict(m, opt)})`` to a fresh directory (its cleanup untimed).

Loads, each from its own save: ``mgr.load(model, opt, extra=...)`` (verified by default,
with ``verify=False``, and verified through the memory maps alone, without the
read-ahead: ``storage.read_ahead.READ_AHEAD = False``) against ``dcp.load`` of the same state dicts followed by
``set_model_state_dict`` / ``set_optimizer_state_dict``. Warm: the same load run once
untimed just before, so its own files are in the page cache; cold: the page cache
dropped first (``echo 3 > /proc/sys/vm/drop_caches``, needs root; skipped otherwise and
said so).

A model-only checkpoint, in the same rounds: ``save_model`` / ``load_model`` against
``dcp.save`` / ``dcp.load`` of ``get_model_state_dict`` (+ ``set_model_state_dict``),
and the raw disk for the model's share alone.

The raw disk, in the same rounds: each rank writes the bytes of its share of the state
(its shards of the weights and of the optimizer's moments) to one file with 16 MiB
writes and one fsync, and reads them back with 16 MiB ``readinto`` calls into one
preallocated buffer (warm, and cold like the loads). What a save or a resume can cost is
set by these; the table gives ours / DCP and ours / raw.

The page cache is also dropped before every save (when root): on this project's machine
a write into a page cache full of earlier checkpoints runs up to 4x slower than the same
write after a drop, or after a delete freed pages, so without it the contender that
writes right after the other one's cleanup wins by whole seconds.

Timing is ``_common.timed``: barrier to barrier (the slowest rank), dirty pages synced
before each operation; every writer fsyncs. Medians; compare the ratios.

``--profile save|load`` runs ``cProfile`` on rank 0 around 3 of our saves (or loads)
and prints the top functions by cumulative time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import shutil
import statistics
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from dcp_universal import CheckpointManager, load_model, save_model
from dcp_universal.storage import read_ahead

from _common import MiB, Model, exit_rank, init_gloo, model_shape, remove_on_rank0, timed

SEED = 0
OPS = ("ours save", "DCP save", "raw write", "ours load (verified)", "ours load verify=False",
       "ours load, maps alone",
       "DCP load + set_state_dict", "raw read", "save_model", "DCP save (model)",
       "raw write (model)", "load_model", "DCP load (model) + set_state_dict",
       "raw read (model)")
RAW_CHUNK = 16 * 1024 * 1024


def _local_bytes(tensors) -> int:
    """Bytes of this rank's shards of ``tensors`` (DTensors' local parts; others whole)."""
    return sum((t.to_local() if isinstance(t, DTensor) else t).numel() * t.element_size()
               for t in tensors if isinstance(t, torch.Tensor))


def _rank_bytes(model, opt) -> int:
    """Bytes of this rank's share of the state: its shards of the weights and moments."""
    return _local_bytes([*model.state_dict().values(),
                         *(v for state in opt.state.values() for v in state.values())])


def _raw_write(path: str, data: bytearray) -> None:
    """``data`` to ``path``: large writes, one fsync."""
    view = memoryview(data)
    with open(path, "wb", buffering=0) as f:
        for at in range(0, len(data), RAW_CHUNK):
            f.write(view[at:at + RAW_CHUNK])
        os.fsync(f.fileno())


def _raw_read(path: str, into: bytearray) -> None:
    """``path`` into the preallocated ``into``: large ``readinto`` calls."""
    view = memoryview(into)
    with open(path, "rb", buffering=0) as f:
        got = 0
        while got < len(into):
            n = f.readinto(view[got:got + RAW_CHUNK])
            if not n:
                raise EOFError(path)
            got += n


def _build(size_mb: float, hidden: int):
    vocab, n_layers = model_shape(size_mb, hidden)
    torch.manual_seed(SEED)
    model = Model(vocab, hidden, n_layers)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LinearLR(opt, total_iters=1000)
    model(torch.zeros(1, 4, dtype=torch.long)).square().mean().backward()
    opt.step()
    sched.step()
    return model, opt, {"sched": sched, "train": {"step": 1, "tokens": 4096}}


def _can_drop_caches() -> bool:
    return os.access("/proc/sys/vm/drop_caches", os.W_OK)


def _drop_caches() -> None:
    if dist.get_rank() == 0:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    dist.barrier()


def _dcp_state(model, opt) -> dict:
    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}


def _worker(rank: int, world: int, cfg: dict, init_file: str, result_file: str) -> None:
    init_gloo(rank, world, init_file)
    model, opt, extra = _build(cfg["size_mb"], cfg["hidden"])
    out = cfg["out"]
    mgr = CheckpointManager(os.path.join(out, "ours"), keep_last=2)
    rounds: dict[str, dict[str, list[float]]] = {"warm": {k: [] for k in OPS},
                                                  "cold": {k: [] for k in OPS}}
    cold = cfg["cold"]
    step = 0

    def ours_save():
        mgr.save(step, model, opt, extra=extra)

    def dcp_save():
        dcp.save(_dcp_state(model, opt), checkpoint_id=os.path.join(out, f"dcp-{step}"))

    def ours_load(verify, ahead=True):
        def run():
            read_ahead.READ_AHEAD = ahead
            try:
                mgr.load(model, opt, extra=extra, step=step,
                         **({} if verify else {"verify": False}))
            finally:
                read_ahead.READ_AHEAD = True
        return run

    def dcp_load():
        state = _dcp_state(model, opt)
        dcp.load(state, checkpoint_id=os.path.join(out, f"dcp-{step}"))
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, opt, state["optim"])

    def model_save():
        save_model(model, os.path.join(out, f"model-{step}"))

    def dcp_model_save():
        dcp.save({"model": get_model_state_dict(model)},
                 checkpoint_id=os.path.join(out, f"dcpm-{step}"))

    def model_load():
        load_model(model, os.path.join(out, f"model-{step}"))

    def dcp_model_load():
        state = {"model": get_model_state_dict(model)}
        dcp.load(state, checkpoint_id=os.path.join(out, f"dcpm-{step}"))
        set_model_state_dict(model, state["model"])

    share = bytearray(os.urandom(1024)) * (_rank_bytes(model, opt) // 1024 + 1)
    landing = bytearray(len(share))
    model_share = memoryview(share)[:_local_bytes(model.state_dict().values())]
    model_landing = memoryview(landing)[:len(model_share)]

    def raw_path(s: int, what: str = "raw") -> str:
        return os.path.join(out, f"{what}-{s}-rank{rank}.bin")

    if cfg["profile"]:
        profiles = {"ours": cProfile.Profile(), "DCP": cProfile.Profile()}
        runs = ({"ours": ours_save, "DCP": dcp_save} if cfg["profile"] == "save"
                else {"ours": ours_load(True), "DCP": dcp_load})
        for step in range(1, 5):
            if cfg["profile"] == "load":
                ours_save()
                dcp_save()
            for name, run in runs.items():
                if cold:
                    _drop_caches()
                dist.barrier()
                if rank == 0 and step > 1:
                    profiles[name].enable()
                run()
                if rank == 0:
                    profiles[name].disable()
        if rank == 0:
            for name, prof in profiles.items():
                s = io.StringIO()
                pstats.Stats(prof, stream=s).sort_stats(cfg["sort"]).print_stats(40)
                print(f"==== {name} {cfg['profile']}, rank 0, 3 runs")
                print(s.getvalue())
        dist.barrier()
        dist.destroy_process_group()
        exit_rank()

    groups = [  # (saves, loads) of one kind of checkpoint; order rotated per round
        ({"ours save": ours_save, "DCP save": dcp_save,
          "raw write": lambda: _raw_write(raw_path(step), share)},
         {"ours load (verified)": ours_load(True), "ours load verify=False": ours_load(False),
          "ours load, maps alone": ours_load(True, ahead=False),
          "DCP load + set_state_dict": dcp_load,
          "raw read": lambda: _raw_read(raw_path(step), landing)}),
        ({"save_model": model_save, "DCP save (model)": dcp_model_save,
          "raw write (model)": lambda: _raw_write(raw_path(step, "rawm"), model_share)},
         {"load_model": model_load, "DCP load (model) + set_state_dict": dcp_model_load,
          "raw read (model)": lambda: _raw_read(raw_path(step, "rawm"), model_landing)}),
    ]
    for r in range(cfg["warmup"] + cfg["repeats"]):
        step = r + 1
        times: dict[str, dict[str, float]] = {"warm": {}, "cold": {}}
        for saves, loads in groups:
            for k in _rotated(saves, r):
                if cold:  # every save starts from the same page cache: see the docstring
                    _drop_caches()
                times["warm"][k] = timed(saves[k])[0]
            for k in _rotated(loads, r):  # warm: this load's own files just read once
                loads[k]()
                times["warm"][k] = timed(loads[k])[0]
            if cold:
                for k in _rotated(loads, r):
                    _drop_caches()
                    times["cold"][k] = timed(loads[k])[0]
        if r >= cfg["warmup"]:
            for cache, got in times.items():
                for k, v in got.items():
                    rounds[cache][k].append(v)
        remove_on_rank0([os.path.join(out, f"{d}-{step - 1}") for d in ("dcp", "dcpm", "model")])
        for what in ("raw", "rawm"):
            if os.path.exists(raw_path(step - 1, what)):
                os.remove(raw_path(step - 1, what))
    if rank == 0:
        state_mb = sum(t.numel() * t.element_size() for t in
                       [*model.state_dict().values()] if hasattr(t, "numel")) / MiB
        with open(result_file, "w") as f:
            json.dump({"rounds": rounds, "model_mb": state_mb}, f)
    mgr.close()
    dist.barrier()
    dist.destroy_process_group()
    exit_rank()


def _rotated(ops: dict, r: int) -> list[str]:
    keys = list(ops)
    return keys[r % len(keys):] + keys[:r % len(keys)]


def _baselines(k: str) -> tuple[str, str]:
    """The plain-DCP and raw-disk rows ``k`` is compared with."""
    model = "model" in k
    if "save" in k or "write" in k:
        return (("DCP save (model)", "raw write (model)") if model
                else ("DCP save", "raw write"))
    return (("DCP load (model) + set_state_dict", "raw read (model)") if model
            else ("DCP load + set_state_dict", "raw read"))


def _run(world: int, args, cold: bool) -> dict | None:
    out = tempfile.mkdtemp(prefix="bench_manager_")
    try:
        with tempfile.TemporaryDirectory(prefix="bench_manager_init_") as scratch:
            result_file = os.path.join(scratch, "result.json")
            cfg = {"size_mb": args.size_mb, "hidden": args.hidden, "repeats": args.repeats,
                   "warmup": args.warmup, "out": out, "cold": cold, "profile": args.profile,
                   "sort": args.sort}
            mp.spawn(_worker, args=(world, cfg, os.path.join(scratch, "init"), result_file),
                     nprocs=world, join=True)
            if args.profile:
                return None
            with open(result_file) as f:
                return json.load(f)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=144, help="fp32 weights, MiB "
                        "(default 144 MiB = 151 MB)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--world", default="2", help="ranks; a comma list runs each "
                        "(e.g. 1,2,4)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-cold", action="store_true", help="skip the cold-cache loads")
    parser.add_argument("--profile", choices=("save", "load"), default=None)
    parser.add_argument("--sort", default="cumulative", help="--profile's order: cumulative "
                        "or tottime")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    cold = not args.no_cold and _can_drop_caches()
    worlds = [int(w) for w in args.world.split(",")]
    results = {}
    for world in worlds:
        got = _run(world, args, cold)
        if got is None:
            return 0
        results[world] = got
    print(f"# FSDP2, {args.size_mb * MiB / 1e6:.0f} MB fp32 weights + AdamW, median of "
          f"{args.repeats} rounds, torch {torch.__version__}")
    print("| ranks | operation | cache | median s | vs plain DCP | vs raw disk |")
    print("|---:|---|---|---:|---:|---:|")
    for world, raw in results.items():
        for cache in ("warm", "cold"):
            med = {k: statistics.median(v) for k, v in raw["rounds"][cache].items() if v}
            for k, v in med.items():
                dcp_key, raw_key = _baselines(k)
                vs_dcp = f"{v / med[dcp_key]:.2f}x" if med.get(dcp_key) else "-"
                vs_raw = f"{v / med[raw_key]:.2f}x" if med.get(raw_key) else "-"
                print(f"| {world} | {k} | {cache} | {v:.3f} | {vs_dcp} | {vs_raw} |")
    if not cold:
        print("(cold loads skipped: dropping the page cache needs root)", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
