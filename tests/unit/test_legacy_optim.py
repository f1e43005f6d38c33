"""Optimizer state saved the old way (``torch.save(optimizer.state_dict())``: keyed by
parameter ids, often of the trainable parameters only, in two param groups of which one
is empty) resumes through ``mgr.load(model, optimizer, init_from=file)``: mapped by
position (or by the names torch records), every tensor's shape checked, any mismatch
refused naming the first parameter that does not fit, with nothing changed."""

from __future__ import annotations

import pytest
import torch

import tiny
from dcp_universal import CheckpointManager, CheckpointMismatchError
from legacy_files import lora_run, step, trainable


def test_a_lora_run_saved_the_old_way_resumes_exactly(tmp_path):
    src, path = lora_run(tmp_path)
    model = tiny.make("lora4", seed=9)
    opt = torch.optim.AdamW(trainable(model), lr=5e-3)  # one group: the saved [n, 0] fits
    report = CheckpointManager(str(tmp_path / "run")).load(model, opt, init_from=path)
    assert len(report.optimizer_restored) == len(trainable(model)) and not report.optimizer_fresh
    assert any("restored its main_weight-layout LoRA of 7 layers" in n for n in report.notes)
    assert any("matched by position" in n and "[" in n and "hyperparameters restored" in n
               for n in report.notes), report.notes
    assert opt.param_groups[0]["lr"] == 1e-2  # the file's non-empty group
    step(model, opt, 3)
    for (name, a), b in zip(src.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


def test_names_recorded_by_torch_are_used_whatever_the_order(tmp_path):
    src, path = lora_run(tmp_path, named=True)
    model = tiny.make("lora4", seed=9)
    opt = torch.optim.AdamW(list(reversed(trainable(model))), lr=1e-2)
    report = CheckpointManager(str(tmp_path / "run")).load(model, opt, init_from=path)
    assert any("matched by the parameter names" in n for n in report.notes)
    step(model, opt, 3)
    for (name, a), b in zip(src.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("build,match", [
    # the bug the old loader documents: an optimizer over every parameter, frozen ones too
    (lambda m: torch.optim.AdamW(m.parameters()), r"state for \d+ parameters .* holds \d+"),
    # the right parameters in another order: a position lands on another shape
    (lambda m: torch.optim.AdamW(list(reversed(trainable(m)))), "does not fit 'head.bias'"),
])
def test_a_position_that_does_not_fit_is_refused_with_nothing_changed(tmp_path, build, match):
    _, path = lora_run(tmp_path)
    model = tiny.make("lora4", seed=9)
    opt = build(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match=match):
        CheckpointManager(str(tmp_path / "run")).load(model, opt, init_from=path)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert opt.state_dict()["state"] == {}


def test_a_full_fine_tune_checkpoint_resumes_exactly(tmp_path):
    src = tiny.make("plain", seed=1)
    opt = torch.optim.AdamW(src.parameters(), lr=1e-2)
    for i in range(2):
        step(src, opt, i)
    torch.save({"model": {f"_orig_mod.{k}": v for k, v in src.state_dict().items()},
                "optimizer": opt.state_dict(), "iter_num": 2}, tmp_path / "ckpt.pt")
    step(src, opt, 2)
    model = tiny.make("plain", seed=9)
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-2)
    report = CheckpointManager(str(tmp_path / "run")).load(model, opt2,
                                                           init_from=str(tmp_path / "ckpt.pt"))
    assert len(report.optimizer_restored) == len(list(model.parameters()))
    step(model, opt2, 2)
    for (name, a), b in zip(src.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


def test_another_lora_rank_keeps_the_rest_of_the_state_and_says_what_starts_fresh(tmp_path):
    """The file's LoRA merged into a rank-8 target (the adapters start fresh): their saved
    moments are not theirs, the other trainable parameters' are restored."""
    _, path = lora_run(tmp_path)
    model = tiny.make("lora8", seed=9)
    opt = torch.optim.AdamW(trainable(model), lr=1e-2)
    report = CheckpointManager(str(tmp_path / "run")).load(model, opt, init_from=path)
    lora = {n for n, _ in model.named_parameters() if ".lora_" in n}
    assert set(report.optimizer_fresh) == {n.removesuffix(".weight") for n in lora}
    assert set(report.optimizer_restored) == {n for n, p in model.named_parameters()
                                              if p.requires_grad} - lora
    got = opt.state_dict()["state"]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert "exp_avg" in got[names.index("head.bias")] and names.index("wte.lora_A") not in got


def test_convert_says_it_leaves_the_optimizer_and_how_to_resume_it(tmp_path, capsys):
    from dcp_universal.cli import main

    _, path = lora_run(tmp_path)
    assert main(["convert", path, str(tmp_path / "root")]) == 0
    err = capsys.readouterr().err
    assert "holds optimizer state, which convert does not write" in err and "init_from=" in err


def test_a_bad_init_from_or_a_damaged_optimizer_entry_changes_nothing(tmp_path):
    from dcp_universal import CheckpointError, NotACheckpointError

    model = tiny.make("lora4", seed=9)
    opt = torch.optim.AdamW(trainable(model), lr=1e-2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mgr = CheckpointManager(str(tmp_path / "run"))
    with pytest.raises(NotACheckpointError):
        mgr.load(model, opt, init_from=str(tmp_path / "missing"))
    src, path = lora_run(tmp_path)
    blob = torch.load(path, weights_only=True)
    blob["optimizer"] = {"state": [1, 2], "param_groups": "all"}  # not a state_dict()
    torch.save(blob, tmp_path / "damaged.pt")
    with pytest.raises(CheckpointMismatchError, match="is not an optimizer.state_dict"):
        mgr.load(model, opt, init_from=str(tmp_path / "damaged.pt"))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert opt.state_dict()["state"] == {} and mgr.steps() == []
