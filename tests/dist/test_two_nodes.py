"""A 2-node job (two torchrun agents, --nnodes=2, rendezvous on 127.0.0.1, 2 processes
each) checkpoints to S3 (moto on 127.0.0.1), then resumes with --nnodes=1
--nproc_per_node=3, and an inference process loads the final model from S3."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import torch

from dcp_universal import CheckpointManager
from s3server import fresh_prefix

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
MODEL = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "32",
         "--batch-size", "4", "--lora-rank", "4", "--lora-targets", "q,v", "--parallel", "fsdp"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(root, options, *extra) -> list[str]:
    return [os.path.join(REPO, "launch", "train.py"), *MODEL, "--ckpt-dir", root,
            "--storage-options", json.dumps(options), "--save-every", "5", "--log-every", "5",
            "--resume", "auto", *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_two_node_job_on_s3_resumes_on_three_processes(s3):
    url, options = s3
    root = fresh_prefix(url)
    endpoint = f"127.0.0.1:{_free_port()}"
    agents = [subprocess.Popen(
        [*TORCHRUN, "--nnodes=2", "--nproc_per_node=2", "--rdzv_backend=c10d",
         f"--rdzv_endpoint={endpoint}", "--rdzv_id=two-nodes", f"--node_rank={n}",
         *_train(root, options, "--steps", "10")],
        cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for n in range(2)]
    outputs = [a.communicate(timeout=240)[0] for a in agents]
    for a, out in zip(agents, outputs):
        assert a.returncode == 0, out[-3000:]
    mgr = CheckpointManager(root, storage_options=options)
    assert mgr.steps() == [5, 10]
    assert mgr.manifest(10).world_size == 4

    resumed = subprocess.run(
        [*TORCHRUN, "--standalone", "--nnodes=1", "--nproc_per_node=3",
         *_train(root, options, "--steps", "15")],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert re.search(r"resumed \S+step-00000010 \(saved by 4 processes\).*at step 10", resumed.stdout)
    # the data order continues: 10 steps of 4 processes consumed 10 x 4 x batch windows
    batch = int(MODEL[MODEL.index("--batch-size") + 1]) if "--batch-size" in MODEL else 16
    assert f"data at window {10 * 4 * batch} of " in resumed.stdout, resumed.stdout[-2000:]
    assert mgr.steps()[-1] == 15 and mgr.manifest(15).world_size == 3
    want = float(re.findall(r"EVAL_LOSS (\S+)", resumed.stdout)[-1])

    inference = subprocess.run(
        [sys.executable, os.path.join(REPO, "launch", "train.py"), *MODEL[:-6],
         "--parallel", "none", "--eval-only", "--init-from", mgr.step_path(15),
         "--storage-options", json.dumps(options)],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert inference.returncode == 0, inference.stderr[-3000:]
    got = float(re.findall(r"EVAL_LOSS (\S+)", inference.stdout)[-1])
    assert abs(got - want) < 1e-4, (got, want)
    assert torch.isfinite(torch.tensor(got))
