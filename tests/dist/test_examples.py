"""The README's examples run as written (examples/), with torchrun on gloo ranks: a
training loop resumed on another world size, 8 ranks resumed on 3 then served by one
process, and a LoRA fine-tune that starts from a Hugging Face directory and ships both
exports. Each is checked on values, not on its exit status alone."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

import torch

from hf_models import llama, logits, max_diff, peft, transformers
from dcp_universal import CheckpointManager, load_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}


def _run(*cmd: str, cwd: str = REPO) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=400)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    return done.stdout


def _torchrun(n: int, *args: str) -> str:
    return _run(sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", *args)


def test_eight_ranks_resumed_on_three_and_served_by_one(tmp_path):
    # started from another directory than the repository's: it finds its examples
    out = _run("bash", os.path.join(REPO, "examples/resume_8_on_3.sh"), "ckpt",
               cwd=str(tmp_path))
    losses = [float(x) for x in re.findall(r"step \d+: loss ([0-9.]+)", out)]
    assert re.findall(r"step (\d+): loss", out) == ["20", "40"], out
    assert losses[1] < losses[0]  # the resumed run went on learning from where it stopped
    assert "resumed step 20: loaded 4 keys as is" in out
    assert CheckpointManager(str(tmp_path / "ckpt")).steps() == [30, 40]  # keep_last=2
    assert "step 40: held-out loss" in out


def test_a_lora_fine_tune_from_an_hf_directory(tmp_path):
    hf_dir, root, exports = (str(tmp_path / d) for d in ("hf", "ckpt", "out"))
    pretrained = llama(tied=False, seed=3)
    pretrained.save_pretrained(hf_dir)
    _torchrun(2, "examples/lora_from_hf.py", hf_dir, root, exports)  # first start: HF weights
    first = llama(tied=False, seed=9)
    load_model(first, f"{root}/step-00000005")
    frozen = "model.layers.0.mlp.up_proj.weight"  # no adapter there: the HF weights, exactly
    assert torch.equal(first.state_dict()[frozen], pretrained.state_dict()[frozen])
    out = _torchrun(3, "examples/lora_from_hf.py", hf_dir, root, exports)  # resumed on 3
    assert "step 10: loss" in out
    assert CheckpointManager(root).steps() == [5, 10]

    trained = llama(tied=False, seed=9)
    load_model(trained, f"{root}/step-00000010")
    ref = logits(trained)
    merged = transformers.AutoModelForCausalLM.from_pretrained(f"{exports}/merged").eval()
    assert max_diff(logits(merged), ref) < 1e-5
    adapted = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(hf_dir), f"{exports}/adapter").eval()
    assert max_diff(logits(adapted), ref) < 1e-5
    assert max_diff(logits(pretrained), ref) > 1e-3  # it did train


def _seen(d) -> list[int]:
    return [int(x) for name in sorted(os.listdir(d)) for x in open(os.path.join(d, name)).read().split()]


@pytest.mark.parametrize("workers", ["0", "2"])
def test_the_data_position_follows_a_change_of_world_size(tmp_path, workers):
    ckpt, seen = str(tmp_path / "ckpt"), str(tmp_path / "seen")
    _torchrun(4, "examples/resumable_data.py", ckpt, seen, "5", workers)  # 4 x 5 x 8 samples
    _torchrun(3, "examples/resumable_data.py", ckpt, seen, "6", workers)  # resumed on 3
    got = _seen(seen)
    assert len(got) == 4 * 5 * 8 + 3 * 6 * 8 and len(set(got)) == len(got)  # none twice
    from dcp_universal import ResumableSampler
    order = ResumableSampler(1000, seed=0, rank=0, world_size=1).order()
    assert set(got) == set(order[:len(got)])  # none skipped: a prefix of the epoch's order
