"""A LoRA run saved the old way (main_weight layout, optimizer state by position) resumes
on 3 FSDP2 ranks: every rank maps the file's state onto its own shards, and one more step
equals the one-process reference."""

from __future__ import annotations

import torch

import harness
import tiny
from dcp_universal import CheckpointManager
from train_loop import build
from legacy_files import lora_run, step


def _resume(rank, world_size, root, path):
    model, opt, _ = build("lora4", "fsdp", world_size, seed=9)
    for g in opt.param_groups:
        g["weight_decay"] = 0.01  # AdamW's default, as the file's run used
    report = CheckpointManager(root).load(model, opt, init_from=path)
    step(model, opt, 3)
    full = {k: v.full_tensor() for k, v in model.state_dict().items()}
    return full, len(report.optimizer_restored), [n for n in report.notes if "by position" in n]


def test_an_old_lora_run_resumes_on_three_fsdp_ranks(tmp_path):
    src, path = lora_run(tmp_path)
    full, restored, notes = harness.run(_resume, 3, str(tmp_path / "run"), path)[0]
    assert restored == len([p for p in tiny.make("lora4").parameters() if p.requires_grad])
    assert notes
    for name, ref in src.state_dict().items():
        torch.testing.assert_close(full[name], ref, atol=1e-6, rtol=0, msg=name)
