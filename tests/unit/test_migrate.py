"""Migrations from torchtitan, Accelerate and plain DCP (issue 31): the recipes of
docs/coming-from.md run as written (examples/migrate/), carry the optimizer state where it
maps (exp_avg equal to the source's), take the step number from the source, and name
what they leave behind; ``convert`` writes the model alone into ``model/``.

The source checkpoints are built with the real layouts:

* torchtitan (``torchtitan/components/checkpoint.py``): ``dcp.save`` of ``{"model":
  get_model_state_dict(m), "optimizer": get_optimizer_state_dict(m, opt,
  flatten_optimizer_state_dict=True), "lr_scheduler": scheduler.state_dict(),
  "dataloader": {"dp_rank_0": bytes}, "train_state": {"step": int32 tensor,
  "global_avg_losses": BytesIO, "global_max_losses": BytesIO, "log_steps": BytesIO}}``
  into ``<folder>/step-<N>``; newer torchtitan flattens the model's keys to the top
  level (both are built);
* Accelerate (``accelerate/checkpointing.py``, ``save_accelerator_state``):
  ``model.safetensors`` (safe_serialization) or ``pytorch_model.bin``,
  ``optimizer.bin`` = torch.save(optimizer.state_dict()), ``scheduler.bin`` =
  torch.save(scheduler.state_dict()), ``random_states_0.pkl`` = torch.save of the
  Python, NumPy, torch and CUDA RNG states, in ``checkpoints/checkpoint_<N>``;
* plain DCP: ``dcp.save({"model": get_model_state_dict(m), "optim":
  get_optimizer_state_dict(m, opt)})``.
"""

from __future__ import annotations

import io
import os
import pickle
import random
import re
import runpy
import sys

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict)

from dcp_universal import CheckpointManager, CheckpointMismatchError
from dcp_universal.cli import main
from dcp_universal.training.commit import convert

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPES = os.path.join(REPO, "examples", "migrate")


def _trained(steps: int = 3):
    """The recipes' model and optimizer, trained a little (non-zero exp_avg), and a
    scheduler stepped with it."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + 0.01 * s))
    for _ in range(steps):
        model(torch.randn(8, 32)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    return model, optimizer, scheduler


def _exp_avg(model, optimizer) -> dict[str, torch.Tensor]:
    return {n: optimizer.state[p]["exp_avg"].clone() for n, p in model.named_parameters()}


def _assert_carried(model, optimizer, got_model, got_opt) -> None:
    """The weights and every parameter's exp_avg equal the source's, exactly."""
    want, got = _exp_avg(model, optimizer), _exp_avg(got_model, got_opt)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
    for a, b in zip(model.parameters(), got_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _blob(obj) -> io.BytesIO:
    b = io.BytesIO()
    torch.save(obj, b)
    return b


def _torchtitan(path, step: int, *, top_level_model: bool = False):
    model, optimizer, scheduler = _trained()
    opt = get_optimizer_state_dict(model, optimizer,
                                   options=StateDictOptions(flatten_optimizer_state_dict=True))
    state = {"optimizer": opt, "lr_scheduler": scheduler.state_dict(),
             "dataloader": {"dp_rank_0": pickle.dumps({"sample": 12})},
             "train_state": {"step": torch.tensor(step, dtype=torch.int32),
                             "global_avg_losses": _blob([1.0, 0.5]),
                             "global_max_losses": _blob([2.0, 1.0]),
                             "log_steps": _blob([1, 2])}}
    if top_level_model:
        state.update(get_model_state_dict(model))
    else:
        state["model"] = get_model_state_dict(model)
    dcp.save(state, checkpoint_id=str(path / f"step-{step}"), no_dist=True)
    return str(path / f"step-{step}"), model, optimizer, scheduler


def _plain_dcp(path):
    model, optimizer, _ = _trained()
    dcp.save({"model": get_model_state_dict(model),
              "optim": get_optimizer_state_dict(model, optimizer)},
             checkpoint_id=str(path), no_dist=True)
    return str(path), model, optimizer


def _accelerate(path, step: int, *, safetensors: bool = True):
    model, optimizer, scheduler = _trained()
    out = path / "checkpoints" / f"checkpoint_{step}"
    out.mkdir(parents=True)
    if safetensors:
        from safetensors.torch import save_file
        save_file(model.state_dict(), str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(model.state_dict(), out / "pytorch_model.bin")
    torch.save(optimizer.state_dict(), out / "optimizer.bin")
    torch.save(scheduler.state_dict(), out / "scheduler.bin")
    torch.save({"random_state": random.getstate(), "numpy_random_seed": np.random.get_state(),
                "torch_manual_seed": torch.get_rng_state(), "torch_cuda_manual_seed": []},
               out / "random_states_0.pkl")
    return str(out), model, optimizer, scheduler


def _accelerate_fsdp(path, step: int):
    """accelerate's FSDP SHARDED_STATE_DICT layout (``fsdp_utils.save_fsdp_model`` /
    ``save_fsdp_optimizer``): the model and optimizer as DCP directories."""
    model, optimizer, scheduler = _trained()
    out = path / "checkpoints" / f"checkpoint_{step}"
    dcp.save({"model": get_model_state_dict(model)},
             checkpoint_id=str(out / "pytorch_model_fsdp_0"), no_dist=True)
    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)},
             checkpoint_id=str(out / "optimizer_0"), no_dist=True)
    torch.save(scheduler.state_dict(), out / "scheduler.bin")
    torch.save({"random_state": random.getstate(), "torch_manual_seed": torch.get_rng_state()},
               out / "random_states_0.pkl")
    return str(out), model, optimizer, scheduler


def _run(recipe: str, *args: str, monkeypatch, capsys) -> str:
    monkeypatch.setattr(sys, "argv", [recipe, *args])
    runpy.run_path(os.path.join(RECIPES, recipe), run_name="__main__")
    return capsys.readouterr().out


def _resumed(root: str, step: int, *, scheduler: bool = False):
    """The step the recipe committed right after the migration, loaded fresh."""
    model, optimizer, sched = _trained(0)
    extra = {"lr_scheduler": sched} if scheduler else None
    CheckpointManager(root).load(model, optimizer, step=step, extra=extra)
    return model, optimizer, sched


@pytest.mark.parametrize("top_level_model", [False, True])
def test_torchtitan_recipe_carries_optimizer_and_step(tmp_path, monkeypatch, capsys,
                                                      top_level_model):
    src, model, optimizer, scheduler = _torchtitan(tmp_path / "checkpoint", 40,
                                                   top_level_model=top_level_model)
    root = str(tmp_path / "root")
    out = _run("from_torchtitan.py", src, root, monkeypatch=monkeypatch, capsys=capsys)
    assert CheckpointManager(root).steps() == [40, 50, 60]  # torchtitan's step-40, then on
    assert "step 40 taken from" in out
    assert "dataloader" in out and "lr_scheduler'] (last_epoch 3)" in out
    left = re.search(r"\(left behind\): (.*)", out).group(1)
    assert "dataloader" in left and "lr_scheduler" not in left
    got_model, got_opt, got_sched = _resumed(root, 40, scheduler=True)
    assert got_sched.last_epoch == 3 and got_sched.get_last_lr() == scheduler.get_last_lr()
    _assert_carried(model, optimizer, got_model, got_opt)


def test_plain_dcp_recipe_carries_optimizer(tmp_path, monkeypatch, capsys):
    src, model, optimizer = _plain_dcp(tmp_path / "plain")
    root = str(tmp_path / "root")
    out = _run("from_dcp.py", src, root, "7", monkeypatch=monkeypatch, capsys=capsys)
    assert CheckpointManager(root).steps() == [7, 10, 20]  # no step recorded: the one given
    assert "optim.param_groups" in out  # hyperparameters: the optimizer's own stand
    got_model, got_opt, _ = _resumed(root, 7)
    want, got = _exp_avg(model, optimizer), _exp_avg(got_model, got_opt)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)


def test_accelerate_recipe_carries_optimizer_scheduler_and_step(tmp_path, monkeypatch, capsys):
    src, model, optimizer, scheduler = _accelerate(tmp_path / "project", 5)
    root = str(tmp_path / "root")
    out = _run("from_accelerate.py", src, root, monkeypatch=monkeypatch, capsys=capsys)
    assert CheckpointManager(root).steps() == [5, 10, 20]  # checkpoint_5, then on
    assert "random_states_0.pkl (RNG states)" in out
    got_model, got_opt, got_sched = _resumed(root, 5, scheduler=True)
    want, got = _exp_avg(model, optimizer), _exp_avg(got_model, got_opt)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
    assert got_sched.last_epoch == scheduler.last_epoch == 3


def test_accelerate_fsdp_sharded_layout_carries_model_optimizer_and_scheduler(
        tmp_path, monkeypatch, capsys):
    src, model, optimizer, scheduler = _accelerate_fsdp(tmp_path / "project", 5)
    root = str(tmp_path / "root")
    out = _run("from_accelerate.py", src, root, monkeypatch=monkeypatch, capsys=capsys)
    assert CheckpointManager(root).steps() == [5, 10, 20]
    assert "optimizer_0/optimizer.param_groups" in out and "random_states_0.pkl" in out
    got_model, got_opt, got_sched = _resumed(root, 5, scheduler=True)
    _assert_carried(model, optimizer, got_model, got_opt)
    assert got_sched.last_epoch == scheduler.last_epoch == 3
    convert(src, str(tmp_path / "converted"))  # no live optimizer: written by name
    converted, converted_opt, _ = _resumed(str(tmp_path / "converted"), 5)
    _assert_carried(model, optimizer, converted, converted_opt)


def test_accelerate_optimizer_of_another_shape_is_refused(tmp_path):
    src, *_ = _accelerate(tmp_path / "project", 5, safetensors=False)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    optimizer = torch.optim.AdamW(list(model.parameters())[::-1], lr=1e-2)  # other order
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(CheckpointMismatchError, match="does not fit"):
        CheckpointManager(str(tmp_path / "root")).load(model, optimizer, init_from=src)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not optimizer.state


@pytest.mark.parametrize("layout", ["torchtitan", "plain"])
def test_convert_writes_the_model_alone_and_the_optimizer_by_name(tmp_path, layout, capsys):
    if layout == "torchtitan":
        src, model, optimizer, _ = _torchtitan(tmp_path / "checkpoint", 40)
    else:
        src, model, optimizer = _plain_dcp(tmp_path / "plain")
    root = str(tmp_path / "root")
    assert main(["convert", src, root]) == 0
    err = capsys.readouterr().err
    step = 40 if layout == "torchtitan" else 0
    mgr = CheckpointManager(root)
    assert mgr.steps() == [step]
    keys = dcp.FileSystemReader(os.path.join(mgr.step_path(step), "model")).read_metadata()
    assert sorted(keys.state_dict_metadata) == sorted(k for k, _ in model.named_parameters())
    assert "left behind" in err and "param_groups" in err
    if layout == "torchtitan":
        assert "dataloader" in err and "train_state.global_avg_losses" in err
    got_model, got_opt, _ = _resumed(root, step)
    want, got = _exp_avg(model, optimizer), _exp_avg(got_model, got_opt)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)


def test_convert_of_accelerate_says_what_it_cannot_carry(tmp_path, capsys):
    src, *_ = _accelerate(tmp_path / "project", 5)
    root = str(tmp_path / "root")
    assert main(["convert", src, root]) == 0
    err = capsys.readouterr().err
    assert "keyed by position" in err and "init_from" in err
    assert "random_states_0.pkl (RNG states)" in err and "scheduler.bin" in err
    mgr = CheckpointManager(root)
    assert mgr.steps() == [5]
    assert mgr.manifest(5).items["optimizer"] is False


def test_two_step_records_that_disagree_are_not_guessed(tmp_path):
    src, *_ = _torchtitan(tmp_path / "checkpoint", 40)
    moved = str(tmp_path / "checkpoint" / "step-41")
    os.rename(src, moved)
    with pytest.raises(Exception, match="two step numbers"):
        convert(moved, str(tmp_path / "root"))
    assert convert(moved, str(tmp_path / "root"), step=41).endswith("step-00000041")


def test_the_recipes_in_coming_from_are_the_files():
    with open(os.path.join(REPO, "docs", "coming-from.md")) as f:
        doc = f.read()
    blocks = dict(re.findall(r"```python\n# (examples/migrate/\S+)\n(.*?)```", doc, flags=re.S))
    assert sorted(blocks) == [f"examples/migrate/{n}" for n in sorted(os.listdir(RECIPES))
                              if n.endswith(".py")]
    for path, body in blocks.items():
        with open(os.path.join(REPO, path)) as f:
            assert body == f.read(), f"docs/coming-from.md's copy of {path} differs"


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_torchtitan_scheduler_that_is_not_plain_data_is_refused_and_nothing_loads(tmp_path):
    from dcp_universal import UnsafeCheckpointError

    model, optimizer, scheduler = _trained()
    sched = scheduler.state_dict()
    sched["lr_lambdas"] = [_Payload()]
    dcp.save({"model": get_model_state_dict(model), "lr_scheduler": sched,
              "train_state": {"step": torch.tensor(8, dtype=torch.int32)}},
             checkpoint_id=str(tmp_path / "step-8"), no_dist=True)
    target, target_opt, target_sched = _trained(0)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(UnsafeCheckpointError, match="lr_scheduler.lr_lambdas.*trusted=True"):
        CheckpointManager(str(tmp_path / "root")).load(
            target, target_opt, init_from=str(tmp_path / "step-8"),
            extra={"lr_scheduler": target_sched})
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    assert target_sched.last_epoch == 0


def test_convert_commits_under_the_lease_and_never_beside_a_live_job(tmp_path):
    """Issue 32: convert used to write its manifest without the lease or the file check,
    so a live job could take its unfinished step for debris and delete it."""
    import json
    import socket

    from dcp_universal import RootBusyError
    from dcp_universal.training import lease

    src, model, _, _ = _torchtitan(tmp_path / "checkpoint", 40)
    root = tmp_path / "root"
    root.mkdir()
    held = {"owner": "live-job", "acquired": "a1", "host": socket.gethostname(),
            "pid": os.getppid(), "started": lease._started(os.getppid()), "ttl_s": 120.0}
    (root / lease.LEASE_FILE).write_text(json.dumps(held))  # a live job on this host
    with pytest.raises(RootBusyError, match="being written by another job"):
        convert(src, str(root))
    assert sorted(os.listdir(root)) == [lease.LEASE_FILE]  # nothing written beside it

    (root / lease.LEASE_FILE).unlink()  # that job ended
    (root / "step-00000007" / "model").mkdir(parents=True)  # a killed save's debris
    (root / "step-00000007" / "model" / "__0_0.distcp").write_bytes(b"x" * 10)
    path = convert(src, str(root))
    assert sorted(os.listdir(root)) == ["step-00000040"]  # debris gone, lease released
    written = json.loads(open(os.path.join(path, "manifest.json")).read())
    assert written["writer"]  # committed under the lease (its fencing token)
    got, _, _ = _resumed(str(root), 40)
    for a, b in zip(model.parameters(), got.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
