"""The reference trainer on 2-D meshes: FSDP x TP (--tp 2) computes what plain FSDP on
the same data ranks computes, and its checkpoint resumes under HSDP (--hsdp 2) with the
data order continuing, then serves one process with the same evaluation loss."""

from __future__ import annotations

import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
MODEL = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "32",
         "--batch-size", "4", "--lora-rank", "4", "--lora-targets", "q,v,fc1,o", "--log-every", "1"]


def _run(n: int, *args: str) -> str:
    cmd = [*TORCHRUN, f"--nproc_per_node={n}"] if n else [sys.executable]
    done = subprocess.run([*cmd, os.path.join(REPO, "launch", "train.py"), *MODEL, *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _losses(out: str) -> list[str]:
    return re.findall(r"step +\d+  loss (\S+)", out)


def test_tp_equals_fsdp_on_the_same_data_and_resumes_under_hsdp(tmp_path):
    tp = _run(4, "--parallel", "fsdp", "--tp", "2", "--steps", "4", "--ckpt-dir", str(tmp_path / "tp"))
    fsdp = _run(2, "--parallel", "fsdp", "--steps", "4", "--ckpt-dir", str(tmp_path / "fsdp"))
    # 2 data ranks either way: the same batches, the same losses up to TP's reduction order
    assert len(_losses(tp)) == len(_losses(fsdp)) == 4
    assert all(abs(float(a) - float(b)) < 1e-4 for a, b in zip(_losses(tp), _losses(fsdp)))
    resumed = _run(4, "--parallel", "fsdp", "--hsdp", "2", "--steps", "6", "--resume", "auto",
                   "--ckpt-dir", str(tmp_path / "tp"))
    assert "at step 4" in resumed and "data at window 32 of " in resumed  # 4 steps x 2 x 4
    want = re.findall(r"EVAL_LOSS (\S+)", resumed)[-1]
    served = _run(0, "--parallel", "none", "--eval-only",
                  "--init-from", str(tmp_path / "tp" / "step-00000006"))
    assert abs(float(re.findall(r"EVAL_LOSS (\S+)", served)[-1]) - float(want)) < 1e-5
