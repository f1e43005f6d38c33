"""Edges of the public API: file:// URLs, arguments checked before any I/O, and an
adapter kind registered by a user."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn as nn

import tiny
from dcp_universal import (CheckpointError, CheckpointManager, UnsupportedAdapterError,
                           adapters, load_model, save_model)
from dcp_universal.storage import dcp_io
from train_loop import Data, build, train


def _out(model):
    with torch.no_grad():
        return model(tiny.fixed_input())


def test_file_urls_work_for_manager_and_model_io(tmp_path):
    torch.manual_seed(0)
    model, opt, sched = build("lora4", "none", 1)
    tiny.randomize_adapters(model, seed=3)
    train(model, opt, sched, Data(0), {"step": 0}, 1)
    mgr = CheckpointManager(f"file://{tmp_path}/run")
    path = mgr.save(1, model, opt, merged=True)
    assert path == f"{tmp_path}/run/step-00000001" and os.path.isdir(path)
    assert mgr.steps() == [1] and not os.path.exists("file:")
    target, topt, _ = build("lora4", "none", 1, seed=5)
    CheckpointManager(f"file://{tmp_path}/run").load(target, topt)
    torch.testing.assert_close(_out(target), _out(model), atol=1e-5, rtol=0)

    save_model(model, f"file://{tmp_path}/merged")
    plain = tiny.make("plain", seed=9)
    load_model(plain, f"file://{tmp_path}/merged")
    torch.testing.assert_close(_out(plain), _out(model), atol=1e-5, rtol=0)
    plain = tiny.make("plain", seed=9)
    load_model(plain, f"file://{path}")
    torch.testing.assert_close(_out(plain), _out(model), atol=1e-5, rtol=0)


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model, opt, sched = build("plain", "none", 1)
    train(model, opt, sched, Data(0), {"step": 0}, 1)
    mgr = CheckpointManager(str(tmp_path))
    mgr.save(1, model, opt, extra={"train": {"step": 1}})
    return mgr, model, opt


def _count_io(monkeypatch) -> list[str]:
    calls: list[str] = []
    for name in ("load_state", "save_state", "read_metadata"):
        real = getattr(dcp_io, name)
        monkeypatch.setattr(dcp_io, name, lambda *a, _n=name, _r=real, **k: calls.append(_n) or _r(*a, **k))
    return calls


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(hyperparams="newest"), ValueError, "hyperparams='newest'"),
    (dict(extra={"train": object()}), TypeError, r"extra\['train'\] is a object"),
    (dict(extra={"data": {}}), CheckpointError, r"extra\['data'\] is not in step 1"),
    (dict(step=-1), ValueError, "step=-1"),
    (dict(skip_per_rank=[3]), ValueError, "skip_per_rank"),
])
def test_bad_load_arguments_raise_before_any_read(saved, monkeypatch, kwargs, error, match):
    mgr, model, opt = saved
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = _count_io(monkeypatch)
    with pytest.raises(error, match=match):
        mgr.load(model, opt, **kwargs)
    assert calls == []  # not one DCP read
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(extra={"bad/name": {}}), ValueError, "extra name 'bad/name'"),
    (dict(metrics={"loss": "low"}), ValueError, "metrics="),
])
def test_bad_save_arguments_raise_before_any_write(saved, monkeypatch, kwargs, error, match):
    mgr, model, opt = saved
    calls = _count_io(monkeypatch)
    with pytest.raises(error, match=match):
        mgr.save(2, model, opt, **kwargs)
    assert calls == [] and not os.path.exists(mgr.step_path(2))
    with pytest.raises(ValueError, match="step=True"):
        mgr.save(True, model, opt)
    with pytest.raises(ValueError, match="merge='zip'"):
        save_model(model, mgr.step_path(3), merge="zip")
    assert calls == [] and not os.path.exists(mgr.step_path(3))


class ScaledLowRank(nn.Module):
    """A user's own adapter: ``base(x) + gain * up(down(x))``, base under ``.inner``."""

    def __init__(self, inner: nn.Linear, r: int, gain: float) -> None:
        super().__init__()
        self.inner = inner.requires_grad_(False)
        self.down = nn.Parameter(torch.randn(r, inner.in_features) * 0.1)
        self.up = nn.Parameter(torch.randn(inner.out_features, r) * 0.1)
        self.gain = gain

    def forward(self, x):
        return self.inner(x) + self.gain * (x @ self.down.T @ self.up.T)


class ScaledLowRankKind(adapters.AdapterKind):
    name = "tests.scaled_low_rank"

    def matches(self, module):
        return isinstance(module, ScaledLowRank)

    def base_attr(self, module):
        return "inner"

    def terms(self, module):
        return [adapters.Term(left=module.up, right=module.down, scale=module.gain)]

    def reset(self, module):
        with torch.no_grad():
            module.up.zero_()


def test_a_registered_kind_is_merged_named_and_loaded_like_the_built_in_ones(tmp_path):
    adapters.register(ScaledLowRankKind())
    model = tiny.make("plain", seed=1)
    model.blocks[0].q = ScaledLowRank(model.blocks[0].q, r=3, gain=0.7)
    save_model(model, str(tmp_path / "m"))
    plain = tiny.make("plain", seed=2)
    report = load_model(plain, str(tmp_path / "m"))  # canonical names: no "inner", no factors
    assert "blocks.0.q.weight" in report.loaded and not report.dropped
    torch.testing.assert_close(_out(plain), _out(model), atol=1e-5, rtol=0)
    # and the other way: plain weights into the adapted model, update reset to zero
    adapted = tiny.make("plain", seed=3)
    adapted.blocks[0].q = ScaledLowRank(adapted.blocks[0].q, r=3, gain=0.7)
    report = load_model(adapted, str(tmp_path / "m"))
    assert report.remapped["blocks.0.q.weight"] == "blocks.0.q.inner.weight"
    assert set(report.fresh) == {"blocks.0.q.down", "blocks.0.q.up"}
    torch.testing.assert_close(_out(adapted), _out(plain), atol=1e-5, rtol=0)


def test_a_registered_kind_exports_to_peft_by_its_declared_layout(tmp_path):
    """Export follows the layout the kind declares (here the default, read off its base
    layer), not factor names: a kind whose factors are called up/down exports, and the
    adapter loads into the library's own LoRA layers with the same function."""
    from dcp_universal import apply_lora, export_peft

    adapters.register(ScaledLowRankKind())
    model = tiny.make("plain", seed=1).requires_grad_(False)
    model.blocks[0].q = ScaledLowRank(model.blocks[0].q, r=3, gain=0.7)
    step = CheckpointManager(str(tmp_path / "run")).save(1, model)
    m = CheckpointManager(str(tmp_path / "run")).manifest(1)
    assert m.adapters.layouts == {"blocks.0.q": "linear"}
    out = export_peft(step, str(tmp_path / "adapter"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 3 and config["lora_alpha"] == pytest.approx(0.7 * 3)
    target = apply_lora(tiny.make("plain", seed=1), rank=3, alpha=1.0, targets=["q"])
    report = load_model(target, out)
    assert {"blocks.0.q.lora_A", "blocks.0.q.lora_B"} <= set(report.loaded)
    torch.testing.assert_close(_out(target), _out(model), atol=1e-5, rtol=0)
    # a step written before layouts were recorded: the two old kinds' names still place
    # their factors; a kind this version cannot place is refused, not guessed
    raw = json.loads((tmp_path / "run" / "step-00000001" / "manifest.json").read_text())
    del raw["adapters"]["layouts"], raw["content_crc32"]  # as written before either existed
    (tmp_path / "run" / "step-00000001" / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(UnsupportedAdapterError, match="records no layout"):
        export_peft(step, str(tmp_path / "adapter2"))
