"""Step items: a run adds one (here an EMA copy of the weights) as one class passed to
the manager; it is written, committed, loaded and reported like the library's own, and a
reader without it keeps the step loadable and says what it skipped."""

from __future__ import annotations

import os

import pytest
import torch

import tiny
from dcp_universal import CheckpointManager, _comm
from dcp_universal.storage import dcp_io
from dcp_universal.adapters import merge
from dcp_universal.training.items import Item
from dcp_universal.model.plan import LoadReport, Staged
from dcp_universal.storage import join
from train_loop import Data, build, train


class Ema(Item):
    """An exponential moving average of the model's weights, in ``ema/``."""

    name = "ema"

    def __init__(self, ema: dict[str, torch.Tensor]) -> None:
        self.ema = ema

    def save(self, ctx):
        state = ctx.snapshot(dict(self.ema), "ema")
        return lambda path, group: dcp_io.save_state(ctx.store, state, path, group=group)

    def stage(self, ctx):
        if not ctx.manifest.has(self.name):
            report = LoadReport(notes=[f"step {ctx.manifest.step} has no EMA: kept as is"])
            return Staged(report, lambda: None)
        buffers = {k: torch.empty_like(v) for k, v in self.ema.items()}
        dcp_io.load_state(ctx.store, buffers, join(ctx.path, self.name))

        def commit():
            for k, v in buffers.items():
                self.ema[k].copy_(v)

        return Staged(LoadReport(notes=[f"EMA restored ({len(buffers)} tensors)"]), commit)


def _ema_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() * 0.5 for k, v in model.state_dict().items()}


def test_an_item_of_the_run_is_written_committed_and_loaded(tmp_path):
    torch.manual_seed(0)
    model, opt, sched = build("plain", "none", 1)
    train(model, opt, sched, Data(0), {"step": 0}, 2)
    ema = _ema_of(model)
    mgr = CheckpointManager(str(tmp_path), items=[Ema(ema)], keep_last=1)
    mgr.save(1, model, opt)
    path = mgr.save(2, model, opt)
    m = mgr.manifest(2)
    assert m.items["ema"] is True and any(f.startswith("ema/") for f in m.files)
    mgr.verify(2)  # its files are checksummed like every item's
    mgr.wait()  # retention's removals run on a thread of their own
    assert not os.path.exists(mgr.step_path(1))

    restored = {k: torch.zeros_like(v) for k, v in ema.items()}
    target, topt, _ = build("plain", "none", 1, seed=4)
    report = CheckpointManager(str(tmp_path), items=[Ema(restored)]).load(target, topt)
    assert "EMA restored (%d tensors)" % len(ema) in report.notes
    assert report.optimizer_restored  # the library's items load as before
    for k in ema:
        assert torch.equal(restored[k], ema[k]), k

    # a reader without the item loads the rest and says what it skipped
    plain = tiny.make("plain", seed=5)
    report = CheckpointManager(str(tmp_path)).load(plain)
    assert any("does not read: ['ema']" in n for n in report.notes)
    assert torch.equal(plain.state_dict()["wte.weight"], model.state_dict()["wte.weight"])
    assert os.path.isdir(join(path, "ema"))


def test_items_are_checked_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="two items named 'optimizer'"):
        CheckpointManager(str(tmp_path), items=[type("O", (Ema,), {"name": "optimizer"})({})])
    with pytest.raises(ValueError, match="expected a directory name"):
        CheckpointManager(str(tmp_path), items=[type("S", (Ema,), {"name": "a/b"})({})])
    with pytest.raises(TypeError, match="not a dcp_universal.training.items.Item"):
        CheckpointManager(str(tmp_path), items=[object()])
    assert not os.listdir(tmp_path)


class Greedy(Item):
    """A buggy item whose write gathers the model instead of writing its snapshot."""

    name = "greedy"

    def save(self, ctx):
        view = ctx.view

        def write(path, group):
            merge.gather_factors(view.sites, [view.tensors[s.weight_key] for s in view.sites])
            return {}

        return write


def test_the_background_thread_runs_only_the_writes(tmp_path):
    """An asynchronous save's thread runs the writes and the commit on its own group; a
    gather of the model there (which would race the training loop's collectives) or a
    collective on another group raises, and the step is not committed."""
    model, opt, _ = build("lora4", "none", 1)
    mgr = CheckpointManager(str(tmp_path), items=[Greedy()])
    mgr.save(1, model, opt)  # a blocking save runs it on the caller's thread: fine
    handle = mgr.save(2, model, opt, blocking=False)
    with pytest.raises(RuntimeError, match="background thread of an asynchronous save"):
        handle.result()
    assert mgr.steps() == [1]
    with _comm.writes_only(object()):
        with pytest.raises(RuntimeError, match="on the default group from the background"):
            _comm.all_true(True)
        with pytest.raises(RuntimeError, match="on the default group from the background"):
            _comm.on_rank0(lambda: 1)
    assert _comm.all_true(True)  # the caller's thread is unaffected
