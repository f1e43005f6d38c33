"""Benchmark save_model / load_model against plain DCP and torch.save, on CPU ranks.

Run from the repository root::

    .venv/bin/python benchmarks/bench_model_io.py                  # ranks 2 4, 256 MiB, 10 rounds
    .venv/bin/python benchmarks/bench_model_io.py --ranks 2 4 --size-mb 256 --repeats 3
    .venv/bin/python benchmarks/bench_model_io.py --ranks 2 --size-mb 32 --repeats 1  # smoke

A default run takes 3 to 5 minutes on 2 shared CPU cores.

For each world size in ``--ranks`` it spawns that many gloo ranks on CPU (loopback only),
builds one model (an ``nn.Embedding`` plus a stack of ``nn.Linear`` blocks, sized so its
fp32 parameters total at least ``--size-mb`` MiB), wraps it with FSDP2 (each block, then
the root) and times, in the same run, round by round (each round runs every operation
once, saves then loads, in an order rotated from round to round):

* plain DCP: ``dcp.save`` / ``dcp.load`` of ``get_model_state_dict(model)``;
* ``save_model`` / ``load_model`` of the same plain model (``merge="sharded"``);
* LoRA (rank 16, alpha 32, every Linear block, non-zero ``lora_B`` so the merge does real
  work): ``save_model(merge="sharded")``, ``save_model(merge="rank0")`` and ``load_model``
  of the merged checkpoint back into the LoRA model;
* ``torch.save`` of a full state dict gathered to rank 0 (the gather is timed) and
  ``torch.load`` of it on rank 0.

An operation's time runs from a barrier before it to a barrier after it, so it is the
time until the slowest rank is done; the table shows the median over ``--repeats``. Its
memory is the peak resident set seen by a ~5 ms sampling thread minus the resident set
just before the operation, as the max over ranks and repeats.

Conditions, the same for every operation: checkpoints are read back right after being
written, so the page cache is warm and loads measure memory copies and deserialisation
rather than the disk; every writer fsyncs its files (DCP's ``FileSystemWriter`` does by
default, and the ``torch.save`` baseline is fsynced to match), and dirty pages are synced
before every operation so none pays for another's writes. Both DCP and dcp_universal see
exactly these conditions. The machine may be shared: compare the ratios within one run,
not absolute times across runs.

``--json PATH`` writes every measurement (per rank and repeat) plus the summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from dcp_universal import load_model, save_model
from dcp_universal.lora import LoRALinear, apply_lora

from _common import (MiB, Model, exit_rank, init_gloo, model_shape, remove_on_rank0, timed,
                     torch_save_fsynced)

LORA_RANK, LORA_ALPHA = 16, 32
TARGET = "proj"  # every Linear block is adapted
SEED = 0

# Targets checked at the end (reported as PASS / MISS, never asserted).
PLAIN_MAX_RATIO = 1.05
LORA_SHARDED_MAX_RATIO = 1.15
# "well below": the sharded merge's peak extra anonymous memory is at most this fraction of rank0's.
SHARDED_RSS_MAX_FRACTION = 0.5


@dataclasses.dataclass(kw_only=True)
class Config:
    """What one benchmark run does."""

    ranks: list[int]
    """World sizes to run, one spawned group each."""
    size_mb: float
    """Lower bound on the model's fp32 parameter size, in MiB."""
    hidden: int
    """Width of the Linear blocks and the embedding."""
    repeats: int
    """Timed rounds per world size; the table reports the median."""
    warmup: int
    """Untimed rounds run before the timed ones."""
    out: str
    """Scratch directory for checkpoints; every save gets a fresh sub-directory."""

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValueError(f"--repeats={self.repeats}: need at least 1")
        if self.warmup < 0:
            raise ValueError(f"--warmup={self.warmup}: cannot be negative")
        if any(n < 1 for n in self.ranks):
            raise ValueError(f"--ranks={self.ranks}: every world size must be >= 1")


# ---- the model -----------------------------------------------------------------------

def _build(vocab: int, hidden: int, n_layers: int, *, lora: bool) -> nn.Module:
    torch.manual_seed(SEED)  # every rank builds the same weights before sharding
    model = Model(vocab, hidden, n_layers)
    if lora:
        apply_lora(model, rank=LORA_RANK, alpha=LORA_ALPHA, targets=[TARGET])
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


@torch.no_grad()
def _randomize_lora_b(model: nn.Module, seed: int) -> None:
    """Non-zero B so the merge really adds something (load_model resets B to zero)."""
    gen = torch.Generator().manual_seed(seed * 1000 + dist.get_rank())
    for m in model.modules():
        if isinstance(m, LoRALinear):
            local = m.lora_B.weight.to_local()
            local.copy_(torch.randn(local.shape, generator=gen) * 1e-2)


# ---- measuring -----------------------------------------------------------------------

@dataclasses.dataclass
class _Op:
    name: str
    kind: str  # "save" or "load": which plain DCP number it is compared with
    run: Callable[[str], None]  # save: path to write; load: path to read
    reads: str | None = None  # load: the save op whose latest output it reads
    setup: Callable[[], None] | None = None  # untimed, before every repeat


# ---- the operations ------------------------------------------------------------------

def _dcp_save(model: nn.Module, path: str) -> None:
    dcp.save(get_model_state_dict(model), checkpoint_id=path)


def _dcp_load(model: nn.Module, path: str) -> None:
    # Loads in place into the DTensors the state dict shares with the model; nothing
    # further to set.
    dcp.load(get_model_state_dict(model), checkpoint_id=path)


def _torch_save(model: nn.Module, path: str) -> None:
    full = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        torch_save_fsynced(full, os.path.join(path, "model.pt"))


def _torch_load(path: str) -> None:
    if dist.get_rank() == 0:
        torch.load(os.path.join(path, "model.pt"), map_location="cpu", weights_only=True)


def _operations(plain: nn.Module, lora: nn.Module, round_seed: list[int]) -> list[_Op]:
    """Saves, then the loads that read this round's checkpoints; plain DCP first."""
    reseed = lambda: _randomize_lora_b(lora, round_seed[0])
    return [
        _Op("DCP save (plain)", "save", lambda p: _dcp_save(plain, p)),
        _Op("save_model sharded (plain)", "save", lambda p: save_model(plain, p, merge="sharded")),
        _Op("save_model sharded (LoRA)", "save", lambda p: save_model(lora, p, merge="sharded"),
            setup=reseed),
        _Op("save_model rank0 (LoRA)", "save", lambda p: save_model(lora, p, merge="rank0"),
            setup=reseed),
        _Op("torch.save rank0 full (plain)", "save", lambda p: _torch_save(plain, p)),
        _Op("DCP load (plain)", "load", lambda p: _dcp_load(plain, p), reads="DCP save (plain)"),
        _Op("load_model (plain)", "load", lambda p: load_model(plain, p),
            reads="save_model sharded (plain)"),
        # in place, as plain DCP loads: no staging buffers, no all-or-nothing guarantee
        _Op("load_model stage=False (plain)", "load", lambda p: load_model(plain, p, stage=False),
            reads="save_model sharded (plain)"),
        _Op("load_model (LoRA)", "load", lambda p: load_model(lora, p),
            reads="save_model sharded (LoRA)"),
        _Op("torch.load rank0 (plain)", "load", _torch_load, reads="torch.save rank0 full (plain)"),
    ]


def _rotated(ops: list[_Op], shift: int) -> list[_Op]:
    """Saves, then loads, each rotated by ``shift`` so no operation always runs first."""
    out = []
    for kind in ("save", "load"):
        group = [op for op in ops if op.kind == kind]
        k = shift % len(group)
        out += group[k:] + group[:k]
    return out


def _run_round(ops: list[_Op], root: str, tag: str,
               record: dict[str, list[tuple[float, float]]] | None) -> list[str]:
    written: dict[str, str] = {}
    for i, op in enumerate(ops):
        if op.setup is not None:
            op.setup()
        if op.kind == "save":
            path = os.path.join(root, f"{tag}-{i}")  # fresh per op and round
            written[op.name] = path
        else:
            path = written[op.reads]
        result = timed(lambda: op.run(path))
        if record is not None:
            record[op.name].append(result)
    return list(written.values())


def _worker(rank: int, world: int, cfg: dict, init_file: str, result_file: str) -> None:
    init_gloo(rank, world, init_file)
    try:
        root = os.path.join(cfg["out"], f"world{world}")
        round_seed = [0]

        vocab, n_layers = model_shape(cfg["size_mb"], cfg["hidden"])
        plain = _build(vocab, cfg["hidden"], n_layers, lora=False)
        lora = _build(vocab, cfg["hidden"], n_layers, lora=True)
        ops = _operations(plain, lora, round_seed)
        record: dict[str, list[tuple[float, float]]] = {op.name: [] for op in ops}
        # Untimed warm-up rounds first: first-call costs (imports, gloo pairs, first touch
        # of buffers) are paid there, not by whichever operation happens to run first.
        for r in range(-cfg["warmup"], cfg["repeats"]):
            round_seed[0] = r + 1 + cfg["warmup"]
            timed = record if r >= 0 else None
            remove_on_rank0(_run_round(_rotated(ops, r), root, f"r{r}", timed))

        h = cfg["hidden"]
        param_bytes = 4 * (vocab * h + n_layers * (h * h + h))
        per_rank = [None] * world
        dist.all_gather_object(per_rank, record)
        if rank == 0:
            with open(result_file, "w") as f:
                json.dump({"world": world, "vocab": vocab, "hidden": cfg["hidden"],
                           "n_layers": n_layers, "param_mb": param_bytes / MiB,
                           "ops": [{"name": op.name, "kind": op.kind} for op in ops],
                           "per_rank": per_rank}, f)
    finally:
        dist.destroy_process_group()
    exit_rank()  # the results are written: skip the teardown that sometimes aborts


# ---- summary -------------------------------------------------------------------------

def _summarise(raw: dict) -> dict:
    """Per op: median over repeats of the slowest rank's time; max extra RSS over all."""
    per_rank = raw["per_rank"]
    rows = {}
    for op in raw["ops"]:
        name = op["name"]
        repeats = len(per_rank[0][name])
        slowest = [max(r[name][i][0] for r in per_rank) for i in range(repeats)]
        rows[name] = {"kind": op["kind"], "median_s": statistics.median(slowest),
                      "times_s": slowest,
                      "peak_extra_mb": max(mb for r in per_rank for _, mb in r[name])}
    base = {"save": rows["DCP save (plain)"]["median_s"],
            "load": rows["DCP load (plain)"]["median_s"]}
    for row in rows.values():
        row["ratio"] = row["median_s"] / base[row["kind"]]
    return rows


def _targets(rows: dict) -> list[dict]:
    rss_sharded = rows["save_model sharded (LoRA)"]["peak_extra_mb"]
    rss_rank0 = rows["save_model rank0 (LoRA)"]["peak_extra_mb"]
    checks = [
        (f"save_model (plain) <= {PLAIN_MAX_RATIO}x DCP save",
         rows["save_model sharded (plain)"]["ratio"], PLAIN_MAX_RATIO, "x"),
        (f"load_model stage=False (plain) <= {PLAIN_MAX_RATIO}x DCP load",
         rows["load_model stage=False (plain)"]["ratio"], PLAIN_MAX_RATIO, "x"),
        (f"save_model sharded (LoRA) <= {LORA_SHARDED_MAX_RATIO}x DCP save",
         rows["save_model sharded (LoRA)"]["ratio"], LORA_SHARDED_MAX_RATIO, "x"),
        (f"sharded merge peak RSS <= {SHARDED_RSS_MAX_FRACTION}x rank0 merge's",
         rss_sharded / rss_rank0 if rss_rank0 > 0 else math.inf, SHARDED_RSS_MAX_FRACTION,
         f"x ({rss_sharded:.0f} vs {rss_rank0:.0f} MB)"),
    ]
    return [{"target": t, "value": v, "limit": lim, "pass": v <= lim,
             "shown": f"{v:.2f}{unit}"} for t, v, lim, unit in checks]


def _spawn(world: int, cfg: Config) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_model_io_") as scratch:
        init_file = os.path.join(scratch, "init")
        result_file = os.path.join(scratch, "result.json")
        mp.spawn(_worker, args=(world, dataclasses.asdict(cfg), init_file, result_file),
                 nprocs=world, join=True)
        with open(result_file) as f:
            return json.load(f)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4],
                        help="world sizes to run (default: 2 4)")
    parser.add_argument("--size-mb", type=float, default=256,
                        help="minimum fp32 parameter size of the model in MiB (default: 256)")
    parser.add_argument("--hidden", type=int, default=2048, help="layer width (default: 2048)")
    # Single operations take well under a second at 256 MiB and vary by 2x or more from
    # round to round on a shared machine, so the default takes more rounds than 3.
    parser.add_argument("--repeats", type=int, default=10,
                        help="timed rounds per world size; the median is reported (default: 10)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed rounds before the timed ones (default: 1)")
    parser.add_argument("--out", default=None,
                        help="scratch directory for checkpoints (default: a temporary directory, "
                             "deleted at the end); each round's checkpoints are deleted after it")
    parser.add_argument("--json", default=None, help="also write all results to this JSON file")
    args = parser.parse_args(argv)

    own_out = args.out is None
    out = tempfile.mkdtemp(prefix="bench_model_io_out_") if own_out else args.out
    os.makedirs(out, exist_ok=True)
    cfg = Config(ranks=args.ranks, size_mb=args.size_mb, hidden=args.hidden,
                 repeats=args.repeats, warmup=args.warmup, out=out)
    results = []
    try:
        for world in cfg.ranks:
            start = time.perf_counter()
            raw = _spawn(world, cfg)
            rows = _summarise(raw)
            results.append({**raw, "rows": rows, "targets": _targets(rows),
                            "wall_s": time.perf_counter() - start})
            print(f"world {world}: model {raw['param_mb']:.1f} MiB fp32 (vocab {raw['vocab']}, "
                  f"hidden {raw['hidden']}, {raw['n_layers']} Linear blocks), "
                  f"{cfg.warmup} warm-up + {cfg.repeats} timed rounds, "
                  f"{results[-1]['wall_s']:.0f} s", file=sys.stderr)
    finally:
        if own_out:
            shutil.rmtree(out, ignore_errors=True)

    print("| ranks | operation | median s | ratio vs plain DCP | peak extra anon MB (max over ranks) |")
    print("|---:|---|---:|---:|---:|")
    for res in results:
        for name, row in res["rows"].items():
            print(f"| {res['world']} | {name} | {row['median_s']:.3f} | "
                  f"{row['ratio']:.2f}x {row['kind']} | {row['peak_extra_mb']:.0f} |")
    print()
    print("Targets (reported, not asserted):")
    for res in results:
        for t in res["targets"]:
            print(f"  ranks={res['world']}: {'PASS' if t['pass'] else 'MISS'}  "
                  f"{t['target']}: {t['shown']}")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": dataclasses.asdict(cfg), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
