"""Cost curves: save, LoRA save, load and resharding loads by model size and rank count,
for dcp_universal, plain DCP and torch.save / torch.load side by side, in one run.

Run from the repository root::

    .venv/bin/python benchmarks/bench_sweep.py           # 64/256/1024 MiB x 1/2/4/8 ranks (~10 min)
    .venv/bin/python benchmarks/bench_sweep.py --quick   # 16/64 MiB x 1/2/4 ranks (~2 min)
    .venv/bin/python benchmarks/bench_sweep.py --out-dir bench_out/sweep --repeats 3

It writes ``sweep.csv`` (one row per model, operation, system and world size) and
``sweep.png`` (the curves; needs matplotlib, the ``bench`` extra) to ``--out-dir``
(default ``bench_out/``, git-ignored), and prints a table of how each cost grows.

Worlds run one after another, largest first, each as spawned gloo ranks on CPU: every
world in ``--ranks`` runs, for every model, the three saves and the three loads, round by
round (the order of the systems rotated from round to round); a resharding load runs in
its target world and reads what its source world saved (4 -> 2 and 8 -> 3 by default).

The models: an ``nn.Embedding`` plus ``Linear(2048, 2048)`` blocks of at least each
``--sizes`` MiB of fp32 parameters, sharded with FSDP2 (each block, then the root), and,
to tell a cost per key from a cost per byte, one more model of the smallest size made of
``Linear(256, 256)`` blocks (many more keys for the same bytes). Models are built on the
meta device and materialised shard by shard, so no rank ever holds a whole model.

The operations:

* save: ``save_model``; ``dcp.save(get_model_state_dict(model))``; the full state dict
  gathered to rank 0 and ``torch.save``'d there (fsynced, as DCP fsyncs).
* LoRA save (rank 16 on every block, non-zero ``lora_B``): ``save_model(merge="sharded")``
  (the merged model, each rank merging its shards); plain DCP of the LoRA model's state
  dict (unmerged: DCP cannot merge); the seeds' way: gathered to rank 0, merged there,
  ``torch.save``'d.
* load, into the plain model: ``load_model`` (the default, all-or-nothing load);
  ``dcp.load`` into ``get_model_state_dict(model)``; ``torch.load`` on rank 0 then
  ``set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True)``.
* reshard: the same three loads in a world of another size than the one that saved.

Times run from a barrier to a barrier (the slowest rank), median over ``--repeats``;
memory is the peak extra anonymous memory of any rank (``_common.PeakRSS``). Loads read
files just written (warm page cache). The machine may be shared: compare systems within
one run.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import json
import math
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
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     set_model_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from dcp_universal import load_model, save_model
from dcp_universal.lora import LoRALinear, apply_lora
from _common import (MiB, Model, exit_rank, init_gloo, merge_lora, model_shape,
                     remove_on_rank0, timed, torch_save_fsynced)

LORA_RANK, LORA_ALPHA = 16, 32
OURS, DCP, TORCH = "dcp_universal", "plain DCP", "torch.save/load"
SYSTEMS = (OURS, DCP, TORCH)
OPS = ("save", "LoRA save", "load", "reshard")
WIDE, NARROW = 2048, 256  # the hidden sizes of the models


@dataclasses.dataclass(frozen=True)
class Spec:
    """One model of the sweep."""

    size_mb: int
    hidden: int

    @property
    def tag(self) -> str:
        return f"{self.size_mb}MiB-h{self.hidden}"


@dataclasses.dataclass(kw_only=True)
class Config:
    sizes: list[int]
    ranks: list[int]
    reshard: list[tuple[int, int]]
    repeats: int
    out: str  # scratch directory for checkpoints

    @property
    def specs(self) -> list[Spec]:
        return [Spec(s, WIDE) for s in self.sizes] + [Spec(min(self.sizes), NARROW)]


# ---- the models ----------------------------------------------------------------------

def _build(spec: Spec, *, lora: bool) -> nn.Module:
    vocab, n_layers = model_shape(spec.size_mb, spec.hidden)
    with torch.device("meta"):
        model = Model(vocab, spec.hidden, n_layers)
        if lora:
            apply_lora(model, rank=LORA_RANK, alpha=LORA_ALPHA, targets=["proj"])
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(1000 * dist.get_rank() + spec.hidden)
    with torch.no_grad():  # the values do not matter; non-zero lora_B makes the merge real
        for p in model.parameters():
            p.to_local().normal_(0.0, 0.02, generator=gen)
    return model


def _keys(model: nn.Module) -> int:
    return len(model.state_dict())


# ---- the operations ------------------------------------------------------------------

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _torch_save(model: nn.Module, path: str, merge: bool = False) -> None:
    full = get_model_state_dict(model, options=_FULL)
    if dist.get_rank() == 0:
        torch_save_fsynced(merge_lora(full, LORA_ALPHA / LORA_RANK) if merge else full,
                           os.path.join(path, "model.pt"))


def _torch_load(model: nn.Module, path: str) -> None:
    full = {}
    if dist.get_rank() == 0:
        full = torch.load(os.path.join(path, "model.pt"), map_location="cpu", weights_only=True)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True,
                                                               broadcast_from_rank0=True))


def _saves(plain: nn.Module, lora: nn.Module) -> dict:
    """``{(op, system): save(path)}``."""
    return {
        ("save", OURS): lambda p: save_model(plain, p),
        ("save", DCP): lambda p: dcp.save(get_model_state_dict(plain), checkpoint_id=p),
        ("save", TORCH): lambda p: _torch_save(plain, p),
        ("LoRA save", OURS): lambda p: save_model(lora, p, merge="sharded"),
        ("LoRA save", DCP): lambda p: dcp.save(get_model_state_dict(lora), checkpoint_id=p),
        ("LoRA save", TORCH): lambda p: _torch_save(lora, p, merge=True),
    }


def _loads(plain: nn.Module) -> dict:
    """``{system: load(path of that system's plain save)}``."""
    return {
        OURS: lambda p: load_model(plain, p),
        DCP: lambda p: dcp.load(get_model_state_dict(plain), checkpoint_id=p),
        TORCH: lambda p: _torch_load(plain, p),
    }


def _saved(cfg: dict, world: int, spec: Spec, system: str, op: str = "save") -> str:
    name = f"{system}-{op}".replace("/", "_").replace(" ", "_").replace(".", "_")
    return os.path.join(cfg["out"], f"world{world}", spec.tag, name)


def _sweep_model(cfg: dict, world: int, spec: Spec, sources: list[int], record: dict,
                 warmup: bool) -> dict:
    """Every operation of this world on ``spec``, ``cfg["repeats"]`` times, after one
    untimed round when ``warmup`` (a world's first model: first-call costs such as gloo
    connections and imports are paid there)."""
    plain = _build(spec, lora=False)
    info = {"keys": _keys(plain),
            "param_bytes": sum(p.numel() * 4 for p in plain.parameters())}
    if world in cfg["ranks"]:
        lora = _build(spec, lora=True)
        saves = _saves(plain, lora)
        loads = _loads(plain)
        for r in range(0 if warmup else 1, cfg["repeats"] + 1):  # round 0: untimed
            order = list(SYSTEMS[r % 3:] + SYSTEMS[:r % 3])
            for op in ("save", "LoRA save"):
                for system in order:
                    path = _saved(cfg, world, spec, system, op)
                    remove_on_rank0([path])
                    result = timed(lambda: saves[op, system](path))
                    if r:
                        record.setdefault((spec.tag, op, system, world), []).append(result)
            for system in order:
                path = _saved(cfg, world, spec, system)
                result = timed(lambda: loads[system](path))
                if r:
                    record.setdefault((spec.tag, "load", system, world), []).append(result)
        remove_on_rank0([_saved(cfg, world, spec, s, "LoRA save") for s in SYSTEMS])
        del lora, saves
    loads = _loads(plain)
    for src in sources:
        for r in range(-1 if warmup and world not in cfg["ranks"] else 0, cfg["repeats"]):
            for system in SYSTEMS[r % 3:] + SYSTEMS[:r % 3]:
                path = _saved(cfg, src, spec, system)
                result = timed(lambda: loads[system](path))
                if r >= 0:
                    record.setdefault((spec.tag, "reshard", system, world, src), []).append(result)
    del plain, loads
    gc.collect()
    return info


def _worker(rank: int, world: int, cfg: dict, sources: list[int], keep: bool,
            init_file: str, result_file: str) -> None:
    init_gloo(rank, world, init_file)
    try:
        record, infos = {}, {}
        for i, spec in enumerate(Spec(**s) for s in cfg["specs"]):
            infos[spec.tag] = _sweep_model(cfg, world, spec, sources, record, warmup=i == 0)
            if not keep:  # no later world reads this one's checkpoints
                remove_on_rank0([_saved(cfg, world, spec, s) for s in SYSTEMS])
        for src in sources:  # read by this world alone
            remove_on_rank0([os.path.join(cfg["out"], f"world{src}")])
        per_rank = [None] * world
        dist.all_gather_object(per_rank, {repr(k): v for k, v in record.items()})
        if rank == 0:
            with open(result_file, "w") as f:
                json.dump({"infos": infos, "per_rank": per_rank}, f)
    finally:
        dist.destroy_process_group()
    exit_rank()


def _spawn(world: int, cfg: Config, sources: list[int], keep: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_sweep_") as scratch:
        result_file = os.path.join(scratch, "result.json")
        args = {**dataclasses.asdict(cfg), "specs": [dataclasses.asdict(s) for s in cfg.specs]}
        mp.spawn(_worker, args=(world, args, sources, keep, os.path.join(scratch, "init"),
                                result_file), nprocs=world, join=True)
        with open(result_file) as f:
            return json.load(f)


# ---- results -------------------------------------------------------------------------

def _rows(world: int, raw: dict, specs: list[Spec]) -> list[dict]:
    by_tag = {s.tag: s for s in specs}
    keys = raw["per_rank"][0].keys()
    rows = []
    for key in keys:
        tag, op, system, ranks, *src = eval(key)  # our own repr of a tuple of str/int
        runs = [r[key] for r in raw["per_rank"]]
        slowest = [max(run[i][0] for run in runs) for i in range(len(runs[0]))]
        info, spec = raw["infos"][tag], by_tag[tag]
        median = statistics.median(slowest)
        rows.append({
            "model": tag, "size_mib": spec.size_mb, "hidden": spec.hidden,
            "param_mib": round(info["param_bytes"] / MiB, 1), "keys": info["keys"],
            "op": op, "system": system, "ranks": ranks, "from_ranks": src[0] if src else ranks,
            "median_s": round(median, 4),
            "gib_per_s": round(info["param_bytes"] / 2**30 / median, 3) if median else "",
            "peak_extra_mib": round(max(mb for run in runs for _, mb in run), 1),
            "repeats": len(slowest), "times_s": " ".join(f"{t:.4f}" for t in slowest)})
    return rows


def _growth(rows: list[dict], cfg: Config) -> list[dict]:
    """How each (op, system) cost grows, from the wide models: its exponent in bytes
    (log-log slope between the two largest sizes, where bytes dominate), its seconds per
    GiB at the largest size on the fewest and the most ranks, and its milliseconds per
    key (the narrow model's extra time over the wide one of the same bytes, per extra
    key) on the fewest and the most ranks."""
    out = []
    sizes, lo, hi = cfg.sizes, min(cfg.ranks), max(cfg.ranks)
    small, big = sizes[0], sizes[-1]
    keys = {(r["hidden"], r["ranks"]): r["keys"] for r in rows if r["size_mib"] == small}
    for op in ("save", "LoRA save", "load"):
        for system in SYSTEMS:
            t = {(r["size_mib"], r["hidden"], r["ranks"]): r["median_s"] for r in rows
                 if r["op"] == op and r["system"] == system}
            row = {"op": op, "system": system}
            if len(sizes) > 1:
                a, b = sizes[-2], big
                row[f"bytes exponent ({a}->{b} MiB, {lo} rank)"] = round(
                    math.log(t[b, WIDE, lo] / t[a, WIDE, lo]) / math.log(b / a), 2)
            for n in sorted({lo, hi}):
                row[f"s/GiB, {n} ranks"] = round(t[big, WIDE, n] * 1024 / big, 3)
            for n in sorted({lo, hi}):
                extra = keys[NARROW, n] - keys[WIDE, n]
                row[f"ms/key, {n} ranks"] = round(
                    1e3 * (t[small, NARROW, n] - t[small, WIDE, n]) / extra, 2)
            out.append(row)
    return out


def _plot(rows: list[dict], cfg: Config, path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is missing (pip install -e '.[bench]'): no plot", file=sys.stderr)
        return False
    colors = {OURS: "tab:blue", DCP: "tab:orange", TORCH: "tab:gray"}
    styles = ["-", "--", "-.", ":", (0, (1, 3))]
    fig, axes = plt.subplots(2, 4, figsize=(18, 8.5))
    wide = [r for r in rows if r["hidden"] == WIDE]
    for ax, op in zip(axes[0], OPS):
        worlds = sorted({(r["from_ranks"], r["ranks"]) for r in wide if r["op"] == op},
                        key=lambda w: (w[1], w[0]))
        for system in SYSTEMS:
            for style, w in zip(styles, worlds):
                pts = sorted((r["param_mib"], r["median_s"]) for r in wide
                             if r["op"] == op and r["system"] == system
                             and (r["from_ranks"], r["ranks"]) == w)
                if pts:
                    label = f"{system}, {w[0]}->{w[1]}" if op == "reshard" else f"{system}, {w[1]} ranks"
                    ax.plot(*zip(*pts), linestyle=style, marker="o", color=colors[system],
                            label=label, markersize=3)
        ax.set(xscale="log", yscale="log", title=f"{op}: seconds by model size",
               xlabel="model MiB (fp32)", ylabel="seconds")
        ax.legend(fontsize=6)
    big = max(cfg.sizes)
    for ax, op in zip(axes[1][:3], OPS[:3]):
        for system in SYSTEMS:
            pts = sorted((r["ranks"], r["median_s"]) for r in wide
                         if r["op"] == op and r["system"] == system and r["size_mib"] == big)
            if pts:
                ax.plot(*zip(*pts), marker="o", color=colors[system], label=system)
        ax.set(xscale="log", title=f"{op}: seconds by ranks, {big} MiB", xlabel="ranks",
               ylabel="seconds")
        ax.minorticks_off()
        ax.set_xticks(cfg.ranks, [str(n) for n in cfg.ranks])
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    ax = axes[1][3]  # a cost per key: the same bytes in many more tensors
    small, hi = min(cfg.sizes), max(cfg.ranks)
    width = 0.27
    for i, op in enumerate(OPS[:3]):
        for j, system in enumerate(SYSTEMS):
            t = {r["hidden"]: (r["median_s"], r["keys"]) for r in rows
                 if r["op"] == op and r["system"] == system and r["size_mib"] == small
                 and r["ranks"] == hi}
            if WIDE in t and NARROW in t:
                per_key = 1e3 * (t[NARROW][0] - t[WIDE][0]) / (t[NARROW][1] - t[WIDE][1])
                ax.bar(i + (j - 1) * width, per_key, width, color=colors[system],
                       label=system if i == 0 else None)
    ax.axhline(0.0, color="black", linewidth=0.5)
    keys = sorted({r["keys"] for r in rows if r["size_mib"] == small})
    ax.set(xticks=range(3), xticklabels=OPS[:3], ylabel="ms per key",
           title=f"cost per key: {small} MiB in {keys[-1]} vs {keys[0]} keys, {hi} ranks")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def _markdown(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024],
                        help="model sizes in MiB of fp32 parameters (default: 64 256 1024)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8],
                        help="world sizes (default: 1 2 4 8)")
    parser.add_argument("--reshard", nargs="*", default=["4:2", "8:3"],
                        help="resharding loads FROM:TO (default: 4:2 8:3); FROM must be in --ranks")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed rounds (after one untimed round); the median is reported")
    parser.add_argument("--quick", action="store_true",
                        help="16 and 64 MiB, 1/2/4 ranks, 4:2 only (about 2 minutes)")
    parser.add_argument("--out-dir", default="bench_out", help="where sweep.csv / sweep.png go")
    parser.add_argument("--scratch", default=None, help="checkpoint directory (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.ranks, args.reshard = [16, 64], [1, 2, 4], ["4:2"]
    reshard = [tuple(int(n) for n in pair.split(":")) for pair in args.reshard]
    for src, dst in reshard:
        if src not in args.ranks or src == dst:
            parser.error(f"--reshard {src}:{dst}: the source world must be in --ranks "
                         "and differ from the target")
    if args.repeats < 1 or min(args.ranks) < 1 or min(args.sizes) < 1:
        parser.error("--repeats, --ranks and --sizes must be positive")
    os.makedirs(args.out_dir, exist_ok=True)
    scratch = args.scratch or tempfile.mkdtemp(prefix="bench_sweep_ckpt_")
    cfg = Config(sizes=sorted(args.sizes), ranks=sorted(set(args.ranks)), reshard=reshard,
                 repeats=args.repeats, out=scratch)
    worlds = sorted(set(cfg.ranks) | {dst for _, dst in reshard}, reverse=True)
    started, rows = time.perf_counter(), []
    try:
        for world in worlds:  # sources (larger) before their targets
            sources = [src for src, dst in reshard if dst == world]
            keep = any(src == world for src, _ in reshard)
            t0 = time.perf_counter()
            rows += _rows(world, _spawn(world, cfg, sources, keep), cfg.specs)
            print(f"world {world}: {time.perf_counter() - t0:.0f} s", flush=True)
    finally:
        if args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
    rows.sort(key=lambda r: (r["op"] != "save", r["op"] != "LoRA save", r["op"] != "load",
                             r["hidden"], r["size_mib"], r["ranks"], r["from_ranks"],
                             SYSTEMS.index(r["system"])))
    base = {(r["model"], r["op"], r["ranks"], r["from_ranks"]): r["median_s"]
            for r in rows if r["system"] == DCP}
    for r in rows:
        b = base.get((r["model"], r["op"], r["ranks"], r["from_ranks"]))
        r["vs_dcp"] = round(r["median_s"] / b, 2) if b else ""
    csv_path = os.path.join(args.out_dir, "sweep.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    growth = _growth(rows, cfg)
    print(_markdown(rows, ["model", "keys", "op", "ranks", "from_ranks", "system", "median_s",
                           "gib_per_s", "vs_dcp", "peak_extra_mib"]))
    print()
    print(_markdown(growth, list(growth[0])))
    png = os.path.join(args.out_dir, "sweep.png")
    plotted = _plot(rows, cfg, png)
    print(f"\nwrote {csv_path}" + (f" and {png}" if plotted else "")
          + f" in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
