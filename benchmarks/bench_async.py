"""Benchmark asynchronous saves: how long the training loop stalls, against a blocking save.

Run from the repository root::

    .venv/bin/python benchmarks/bench_async.py                        # 160 MiB, 2 ranks (~2 min)
    .venv/bin/python benchmarks/bench_async.py --size-mb 16 --repeats 1 --loop-steps 4   # smoke

It spawns 2 gloo ranks on CPU (loopback only) and trains one model with every parameter
trainable (an ``nn.Embedding`` plus a stack of ``nn.Linear`` blocks, at least
``--size-mb`` MiB of fp32 weights, so AdamW adds twice that in moments), wrapped with
FSDP2 (each block, then the root). In one run it measures, per round (the median over
``--repeats`` rounds of the slowest rank is reported):

* ``mgr.save(step, model, opt)``, blocking: barrier to barrier;
* ``mgr.save(step, model, opt, blocking=False)``: the stall (until it returns; the
  snapshot is taken by then) and the total (until ``handle.result()`` on every rank);
* DCP's own ``dcp.async_save`` of the same model and optimizer state dicts, for
  comparison, with a background thread and with a background process
  (``AsyncCheckpointerType``): stall and total;

and then a training loop of ``--loop-steps`` steps that checkpoints every ``--every``
steps: the mean step time (a step's time includes any save it started) with no
checkpoints, with blocking saves, and with asynchronous saves (the loop ends with
``mgr.wait()``, which is counted).

Also reported: the state size, the snapshot copy bandwidth (state bytes / stall) and
what a copy at a given device-to-pinned-host bandwidth would take (``--pinned-gbps``,
default 20 GB/s, a PCIe Gen4 x16 link's order of magnitude).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from _common import MiB, Model, exit_rank, init_gloo, model_shape


def _build(size_mb: float, hidden: int, world: int):
    vocab, n_layers = model_shape(size_mb, hidden)
    torch.manual_seed(0)
    model = Model(vocab, hidden, n_layers)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, opt, vocab


def _step(model: nn.Module, opt, vocab: int, rank: int, i: int) -> None:
    g = torch.Generator().manual_seed(rank * 1000 + i)
    idx = torch.randint(0, vocab, (2, 8), generator=g)
    loss = model(idx).float().pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def _slowest(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _barrier_sync() -> None:
    if dist.get_rank() == 0:
        os.sync()
    dist.barrier()


def _worker(rank: int, world: int, cfg: dict, init_file: str, result_file: str) -> None:
    init_gloo(rank, world, init_file)
    from dcp_universal import CheckpointManager

    try:
        model, opt, vocab = _build(cfg["size_mb"], cfg["hidden"], world)
        for i in range(2):  # AdamW's moments exist after the first step
            _step(model, opt, vocab, rank, i)
        local = sum(p.to_local().numel() * 4 for p in model.parameters())
        state_mb = 3 * local / MiB  # weights + two moments, this rank's shard
        gloo = dist.new_group(backend="gloo")
        rec: dict[str, list[float]] = {k: [] for k in (
            "blocking save", "async stall", "async total", "DCP async_save stall",
            "DCP async_save total", "DCP async_save (process) stall",
            "DCP async_save (process) total")}
        step = 0
        for r in range(cfg["warmup"] + cfg["repeats"]):
            keep = r >= cfg["warmup"]
            root = os.path.join(cfg["out"], f"r{r}")
            mgr = CheckpointManager(root)
            step += 1
            _barrier_sync()
            t = time.perf_counter()
            mgr.save(step, model, opt)
            dist.barrier()
            blocking = _slowest(time.perf_counter() - t)
            step += 1
            _barrier_sync()
            t = time.perf_counter()
            handle = mgr.save(step, model, opt, blocking=False)
            stall = _slowest(time.perf_counter() - t)
            handle.result()
            total = _slowest(time.perf_counter() - t)
            mgr.close()
            state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
            _barrier_sync()
            t = time.perf_counter()
            fut = dcp.async_save(state, checkpoint_id=os.path.join(root, "dcp"), process_group=gloo)
            dcp_stall = _slowest(time.perf_counter() - t)
            fut.result()
            dcp_total = _slowest(time.perf_counter() - t)
            _barrier_sync()
            t = time.perf_counter()
            fut = dcp.async_save(state, checkpoint_id=os.path.join(root, "dcp-process"),
                                 process_group=gloo,
                                 async_checkpointer_type=AsyncCheckpointerType.PROCESS)
            proc_stall = _slowest(time.perf_counter() - t)
            fut.result()
            proc_total = _slowest(time.perf_counter() - t)
            if keep:
                for k, v in zip(rec, (blocking, stall, total, dcp_stall, dcp_total,
                                      proc_stall, proc_total)):
                    rec[k].append(v)
            dist.barrier()
            if rank == 0:
                shutil.rmtree(root, ignore_errors=True)

        loops = {}
        for mode in ("no checkpoints", "blocking saves", "async saves"):
            root = os.path.join(cfg["out"], mode.replace(" ", "-"))
            mgr = CheckpointManager(root, keep_last=1)
            _barrier_sync()
            t = time.perf_counter()
            for i in range(cfg["loop_steps"]):
                _step(model, opt, vocab, rank, 100 + i)
                if mode != "no checkpoints" and (i + 1) % cfg["every"] == 0:
                    mgr.save(i + 1, model, opt, blocking=mode == "blocking saves")
            mgr.close()
            loops[mode] = _slowest(time.perf_counter() - t) / cfg["loop_steps"]
            dist.barrier()
            if rank == 0:
                shutil.rmtree(root, ignore_errors=True)
        if rank == 0:
            with open(result_file, "w") as f:
                json.dump({"state_mb_per_rank": state_mb, "rounds": rec, "loop": loops}, f)
    finally:
        dist.destroy_process_group()
    exit_rank()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=160, help="fp32 weights, MiB (default 160)")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--loop-steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=4, help="checkpoint every k loop steps")
    parser.add_argument("--pinned-gbps", type=float, default=20.0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    world = 2
    out = tempfile.mkdtemp(prefix="bench_async_")
    try:
        with tempfile.TemporaryDirectory(prefix="bench_async_init_") as scratch:
            result_file = os.path.join(scratch, "result.json")
            cfg = {"size_mb": args.size_mb, "hidden": args.hidden, "repeats": args.repeats,
                   "warmup": args.warmup, "loop_steps": args.loop_steps, "every": args.every,
                   "out": out}
            mp.spawn(_worker, args=(world, cfg, os.path.join(scratch, "init"), result_file),
                     nprocs=world, join=True)
            with open(result_file) as f:
                raw = json.load(f)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in raw["rounds"].items()}
    state_mb = raw["state_mb_per_rank"]
    print(f"# 2 ranks, FSDP2, {args.size_mb:.0f} MiB fp32 weights + AdamW moments "
          f"({state_mb:.0f} MiB of state per rank), median of {args.repeats} rounds, "
          f"torch {torch.__version__}")
    print("| operation | median s | vs blocking save |")
    print("|---|---:|---:|")
    for k, v in med.items():
        print(f"| {k} | {v:.3f} | {v / med['blocking save']:.2f}x |")
    print()
    print(f"| training loop, checkpoint every {args.every} of {args.loop_steps} steps | mean step s "
          "| vs no checkpoints |")
    print("|---|---:|---:|")
    base = raw["loop"]["no checkpoints"]
    for k, v in raw["loop"].items():
        print(f"| {k} | {v:.3f} | {v / base:.2f}x |")
    stall_ratio = med["async stall"] / med["blocking save"]
    print()
    print(f"async stall / blocking save: {stall_ratio:.3f} (target <= 0.10: "
          f"{'PASS' if stall_ratio <= 0.10 else 'MISS'})")
    print(f"snapshot copy: {state_mb / med['async stall']:.0f} MiB/s per rank; at "
          f"{args.pinned_gbps:.0f} GB/s device-to-pinned-host the same state takes "
          f"{state_mb * MiB / (args.pinned_gbps * 1e9) * 1e3:.1f} ms")
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), **raw, "medians": med}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
