"""Bytes fetched from S3 by loads: ours against DCP's fsspec reader, counted at s3fs.

Run from the repository root (needs the dev extra: moto's server and s3fs)::

    .venv/bin/python benchmarks/bench_s3.py                 # 64 MiB model (~1 min)
    .venv/bin/python benchmarks/bench_s3.py --size-mb 16    # smoke
    .venv/bin/python benchmarks/bench_s3.py --size-mb 256 --hidden 4096   # 64 MiB records

It starts moto's S3 server on 127.0.0.1 (nothing else is contacted) and measures:

* an inference node's model-only load (one process, no process group) from a LoRA step
  that also holds the optimizer's state: a step with the merged ``model/`` and a LoRA
  step (base + adapters, merged while loading); ``load_model`` against ``dcp.load``
  through DCP's ``FsspecReader`` of the same ``model/`` directory;
* a resharding load: an FSDP2 model saved by 2 ranks, loaded by 3; each rank's fetched
  ``.distcp`` bytes against its share (the bytes of its local shards), ``load_model``
  against ``dcp.load`` through ``FsspecReader``.

Every ranged read and whole-object read s3fs makes is counted (its ``_fetch_range`` and
``_cat_file``, patched in each process); metadata and manifests are counted apart. The
resharding load's speed is the rank's share per second (MB/s), beside moto's own: every
rank GETs one object of its share's size at once, in the same run (what the server and
the loopback can give; a load's ranged reads run several at a time per rank, in parts of
``PART_BYTES``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import fsspec
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from s3server import Counting, fresh_prefix, moto_s3  # noqa: E402  (the tests' S3 helpers)

from dcp_universal import CheckpointManager, apply_lora, load_model, save_model  # noqa: E402
from dcp_universal import _torch_compat  # noqa: E402

from _common import MiB, exit_rank, init_gloo  # noqa: E402

HIDDEN = int(os.environ.get("BENCH_S3_HIDDEN", "1024"))


def _layers(size_mb: float) -> nn.Sequential:
    n = max(1, round(size_mb * MiB / (4 * (HIDDEN * HIDDEN + HIDDEN))))
    return nn.Sequential(*[nn.Linear(HIDDEN, HIDDEN) for _ in range(n)])


def _param_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _dcp_fsspec_load(state: dict, url: str, options: dict) -> None:
    reader_cls, _ = _torch_compat.fsspec_reader_writer()
    dcp.load(state, storage_reader=reader_cls(url, **options))


def model_only(size_mb: float, root: str, options: dict) -> list[dict]:
    torch.manual_seed(0)
    model = apply_lora(_layers(size_mb), rank=16, alpha=32.0, targets=["0", "1", "2"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model(torch.randn(2, HIDDEN)).sum().backward()
    opt.step()
    mgr = CheckpointManager(fresh_prefix(root), storage_options=options)
    merged, lora = mgr.save(1, model, opt, merged=True), mgr.save(2, model, opt)
    counter, rows = Counting(), []
    for label, step in (("merged step (model/)", merged), ("LoRA step (base + adapters)", lora)):
        plain = _layers(size_mb)
        want = _param_bytes(plain)
        counter.reset()
        start = time.perf_counter()
        load_model(plain, step, storage_options=options)
        rows.append({"load": f"load_model, {label}", "seconds": time.perf_counter() - start,
                     "fetched_mib": counter.total() / MiB, "ratio": counter.total() / want,
                     "optimizer_objects": sum("/optimizer/" in p for p in counter.fetched),
                     "gets": sum(counter.requests.values())})
    plain = _layers(size_mb)
    counter.reset()
    start = time.perf_counter()
    _dcp_fsspec_load(plain.state_dict(), f"{merged}/model", options)
    rows.append({"load": "dcp.load, DCP's FsspecReader, model/", "seconds":
                 time.perf_counter() - start, "fetched_mib": counter.total() / MiB,
                 "ratio": counter.total() / _param_bytes(plain), "optimizer_objects": 0,
                 "gets": sum(counter.requests.values())})
    return rows


def _fsdp(size_mb: float) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = _layers(size_mb)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _reshard_worker(rank, world, size_mb, url, options, init_file, result_file, mode):
    init_gloo(rank, world, init_file)
    try:
        model = _fsdp(size_mb)
        if mode == "save":
            save_model(model, f"{url}/ours", storage_options=options)
            dcp.save(get_model_state_dict(model), storage_writer=_torch_compat.fsspec_reader_writer()[1](
                f"{url}/dcp", **options))
            out = None
        else:
            counter = Counting()
            share = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
            out = {"share": share}
            # moto's own throughput: every rank GETs an object of its share's size, at once
            fs = fsspec.filesystem("s3", **options)
            blob = f"{url}/plain/rank{rank}"
            fs.pipe_file(blob, os.urandom(share))
            dist.barrier()
            start = time.perf_counter()
            got = len(fs.cat_file(blob))
            dist.barrier()
            out["plain"] = {"fetched": got, "seconds": time.perf_counter() - start}
            for system, load in (
                    ("ours", lambda: load_model(model, f"{url}/ours", storage_options=options)),
                    ("unverified", lambda: load_model(model, f"{url}/ours", verify=False,
                                                      storage_options=options)),
                    ("dcp", lambda: _dcp_fsspec_load(get_model_state_dict(model), f"{url}/dcp",
                                                     options))):
                dist.barrier()
                counter.reset()
                start = time.perf_counter()
                load()
                dist.barrier()
                out[system] = {"fetched": counter.data(), "seconds": time.perf_counter() - start,
                               "requests": counter.data_requests()}
        gathered = [None] * world
        dist.all_gather_object(gathered, out)
        if rank == 0 and mode == "load":
            with open(result_file, "w") as f:
                json.dump(gathered, f)
    finally:
        dist.destroy_process_group()
    exit_rank()


def reshard(size_mb: float, root: str, options: dict, src: int, dst: int) -> list[dict]:
    url = fresh_prefix(root)
    with tempfile.TemporaryDirectory(prefix="bench_s3_") as scratch:
        result = os.path.join(scratch, "result.json")
        for world, mode in ((src, "save"), (dst, "load")):
            mp.spawn(_reshard_worker, args=(world, size_mb, url, options,
                                            os.path.join(scratch, f"init-{mode}"), result, mode),
                     nprocs=world, join=True)
        with open(result) as f:
            ranks = json.load(f)
    return [{"rank": r, "share_mib": out["share"] / MiB,
             "ours_fetched_mib": out["ours"]["fetched"] / MiB,
             "ours_ratio": out["ours"]["fetched"] / out["share"],
             "dcp_fetched_mib": out["dcp"]["fetched"] / MiB,
             "dcp_ratio": out["dcp"]["fetched"] / out["share"],
             "ours_s": out["ours"]["seconds"], "dcp_s": out["dcp"]["seconds"],
             "ours_mbs": out["share"] / 1e6 / out["ours"]["seconds"],
             "unverified_ratio": out["unverified"]["fetched"] / out["share"],
             "unverified_mbs": out["share"] / 1e6 / out["unverified"]["seconds"],
             "dcp_mbs": out["share"] / 1e6 / out["dcp"]["seconds"],
             "plain_mbs": out["plain"]["fetched"] / 1e6 / out["plain"]["seconds"],
             "ours_gets": out["ours"]["requests"], "dcp_gets": out["dcp"]["requests"]}
            for r, out in enumerate(ranks)]


def main(argv: list[str] | None = None) -> int:
    global HIDDEN
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=64, help="model MiB (default 64)")
    parser.add_argument("--reshard", default="2:3", help="FROM:TO ranks (default 2:3)")
    parser.add_argument("--hidden", type=int, default=HIDDEN, help="Linear width (default "
                        "1024: 4 MiB records; 4096: 64 MiB, a 7B model's size)")
    args = parser.parse_args(argv)
    HIDDEN = args.hidden
    os.environ["BENCH_S3_HIDDEN"] = str(args.hidden)  # spawned ranks read it too
    src, dst = (int(n) for n in args.reshard.split(":"))
    with moto_s3() as (root, options):
        rows = model_only(args.size_mb, root, options)
        print("| model-only load, 1 process | s | fetched MiB | vs model bytes | GETs | "
              "optimizer objects |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['load']} | {r['seconds']:.2f} | {r['fetched_mib']:.1f} | "
                  f"{r['ratio']:.3f}x | {r['gets']} | {r['optimizer_objects']} |")
        print(f"\n| rank ({src} -> {dst}) | share MiB | ours fetched | ours vs share | "
              "DCP FsspecReader fetched | DCP vs share | ours GETs | DCP GETs | ours s | DCP s | "
              "ours MB/s | DCP MB/s | plain GET MB/s | verify=False vs share | verify=False MB/s |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in reshard(args.size_mb, root, options, src, dst):
            print(f"| {r['rank']} | {r['share_mib']:.2f} | {r['ours_fetched_mib']:.2f} | "
                  f"{r['ours_ratio']:.3f}x | {r['dcp_fetched_mib']:.2f} | {r['dcp_ratio']:.3f}x | "
                  f"{r['ours_gets']} | {r['dcp_gets']} | {r['ours_s']:.2f} | {r['dcp_s']:.2f} | "
                  f"{r['ours_mbs']:.0f} | {r['dcp_mbs']:.0f} | {r['plain_mbs']:.0f} | "
                  f"{r['unverified_ratio']:.3f}x | {r['unverified_mbs']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
