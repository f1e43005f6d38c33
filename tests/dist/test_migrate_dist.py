"""A torchtitan run saved by 2 FSDP2 ranks resumes here on 3 (issue 31): the model and
the optimizer state by parameter name reshard onto the new world, the step comes from
``train_state.step``, and every moment equals the saved one."""

from __future__ import annotations

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict)

import harness
from dcp_universal import CheckpointManager
from train_loop import Data, build, full, moments, train


def _torchtitan_save(rank, world_size, path):
    """torchtitan's layout (components/checkpoint.py), written by every rank."""
    model, opt, sched = build("plain", "fsdp", world_size, seed=3)
    train(model, opt, sched, Data(rank), {"step": 0}, until=3)
    state = {"model": get_model_state_dict(model),
             "optimizer": get_optimizer_state_dict(
                 model, opt, options=StateDictOptions(flatten_optimizer_state_dict=True)),
             "train_state": {"step": torch.tensor(12, dtype=torch.int32)}}
    dcp.save(state, checkpoint_id=path)
    return ({k: full(v) for k, v in model.state_dict().items()},
            {k: {n: t.clone() for n, t in v.items()} for k, v in moments(model, opt).items()})


def _resume(rank, world_size, root, src):
    model, opt, _ = build("plain", "fsdp", world_size, seed=9)
    report = CheckpointManager(root).load(model, opt, init_from=src)
    return (report.step, {k: full(v) for k, v in model.state_dict().items()},
            {k: {n: t.clone() for n, t in v.items()} for k, v in moments(model, opt).items()})


def test_a_torchtitan_run_of_two_ranks_resumes_on_three_with_its_optimizer(tmp_path):
    src = str(tmp_path / "outputs" / "checkpoint" / "step-12")
    params, states = harness.run(_torchtitan_save, 2, src)[0]
    step, got_params, got_states = harness.run(_resume, 3, str(tmp_path / "run"), src)[0]
    assert step == 12
    assert got_params.keys() == params.keys()
    assert all(torch.equal(got_params[k], params[k]) for k in params)
    assert got_states.keys() == states.keys() and states
    for name, saved in states.items():
        assert saved.keys() == got_states[name].keys()
        for key, t in saved.items():
            assert torch.equal(got_states[name][key], t), (name, key)
