"""Benchmark the local tier: a training loop's stall per save to S3, with and without
``local_dir``, and the time until each step is durable remotely.

Run from the repository root (needs the dev extra: moto's server and s3fs)::

    .venv/bin/python benchmarks/bench_tier.py                  # 64 MiB model, 4 saves each
    .venv/bin/python benchmarks/bench_tier.py --size-mb 16 --saves 2   # smoke, ~30 s

It starts moto's S3 server on 127.0.0.1 in a process of its own (nothing else is
contacted). One process trains a stack of ``Linear`` layers (``--size-mb`` MiB of fp32
weights, all trainable, AdamW: 3x that in state); each training step also waits
``--compute-s`` seconds, standing for the accelerator's work (the host is idle then, as
on a GPU node); it saves every ``--every`` steps, ``--saves`` times, in four ways:

* S3 root, blocking: ``mgr.save`` writes to S3 before it returns;
* S3 root, ``blocking=False``: the save stages a snapshot; the next save waits for the
  previous one's S3 write;
* local tier, blocking: ``CheckpointManager(s3, local_dir=...)``: the save commits to
  the local disk and returns; the upload runs in the background;
* local tier, ``blocking=False``.

Stall: how long ``save`` held the loop (blocking: the save; async: until it returned,
including any wait for the previous save). Durable: from the ``save`` call until the
step is committed on S3 (the handle's ``result()``, or ``mgr.wait()`` for blocking
local-tier saves, timed from a thread that watches the root). Medians over the saves
after the first. moto answers requests one at a time from a Python server: absolute
upload times are moto's, not S3's; compare the stalls.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from s3server import fresh_prefix  # noqa: E402  (the tests' S3 helpers)

from dcp_universal import CheckpointManager  # noqa: E402


@contextlib.contextmanager
def moto_process(bucket: str = "ckpt"):
    """moto's S3 server in a process of its own on 127.0.0.1 (an in-process server would
    share this process's interpreter lock with the save being measured)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                           "AWS_DEFAULT_REGION", "AWS_EC2_METADATA_DISABLED")})
    server = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"),
                               "-H", "127.0.0.1", "-p", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        import boto3

        client = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
        for _ in range(100):
            try:
                client.create_bucket(Bucket=bucket)
                break
            except Exception:
                time.sleep(0.1)
        yield f"s3://{bucket}", {"endpoint_url": url, "key": "testing", "secret": "testing",
                                  "client_kwargs": {"region_name": "us-east-1"}}
    finally:
        server.terminate()
        server.wait()

MODES = ("S3, blocking", "S3, async", "local tier, blocking", "local tier, async")


def _model(size_mb: float) -> nn.Sequential:
    n = max(1, round(size_mb * 2**20 / (4 * 1024 * 1024)))
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(n)])


def _watch(mgr: CheckpointManager, step: int, start: float, out: dict) -> threading.Thread:
    """Time until ``step`` is committed at the root (polls its listing)."""
    def run() -> None:
        while step not in mgr.remote_steps():
            time.sleep(0.01)
        out[step] = time.perf_counter() - start

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def run_mode(mode: str, root: str, options: dict, local: str, args) -> dict:
    model = _model(args.size_mb)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tier = {"local_dir": local} if mode.startswith("local") else {}
    mgr = CheckpointManager(root, storage_options=options, keep_last=2, **tier)
    blocking = mode.endswith("blocking")
    stalls, durable, watchers, step_s = [], {}, [], []
    x = torch.randn(64, 1024)
    for i in range(1, args.saves * args.every + 1):
        t0 = time.perf_counter()
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        time.sleep(args.compute_s)
        step_s.append(time.perf_counter() - t0)
        if i % args.every:
            continue
        start = time.perf_counter()
        watchers.append(_watch(mgr, i, start, durable))
        mgr.save(i, model, opt, blocking=blocking)
        stalls.append(time.perf_counter() - start)
    mgr.wait()
    for t in watchers:
        t.join(timeout=600)
    mgr.close()
    later = sorted(durable)[1:] or sorted(durable)
    return {"stall": statistics.median(stalls[1:] or stalls),
            "durable": statistics.median(durable[s] for s in later),
            "step": statistics.median(step_s)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=64)
    parser.add_argument("--saves", type=int, default=4)
    parser.add_argument("--every", type=int, default=3, help="training steps between saves")
    parser.add_argument("--compute-s", type=float, default=2.0,
                        help="seconds of accelerator work per training step (host idle)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = {}
    scratch = tempfile.mkdtemp(prefix="bench_tier_")
    try:
        with moto_process() as (url, options):
            for mode in MODES:
                local = os.path.join(scratch, mode.replace(" ", "_").replace(",", ""))
                results[mode] = run_mode(mode, fresh_prefix(url), options, local, args)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    state_mb = 3 * args.size_mb
    print(f"# 1 process, {args.size_mb:.0f} MiB fp32 weights + AdamW ({state_mb:.0f} MiB of "
          f"state), a save every {args.every} steps of {args.compute_s:.1f} s, {args.saves} "
          f"saves, moto S3 on 127.0.0.1, torch {torch.__version__}")
    base = results["S3, blocking"]["stall"]
    print("| save | stall per save s | vs S3 blocking | until durable on S3 s |")
    print("|---|---:|---:|---:|")
    for mode, r in results.items():
        print(f"| {mode} | {r['stall']:.3f} | {r['stall'] / base:.2f}x | {r['durable']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
