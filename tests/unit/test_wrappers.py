"""A checkpoint saved from any wrapping loads into any other (single process)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

import tiny
from dcp_universal import load_model, save_model
from dcp_universal.model.names import canonical_names

peft = pytest.importorskip("peft")  # installed by the README's set-up ([peft] extra)


def _peft(rank=4, alpha=8.0, targets=("q", "v", "wte"), **kw):
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), **kw)
    return peft.get_peft_model(tiny.Tiny(), cfg)


def _plain_keys():
    return set(tiny.make("plain").state_dict())


def _out(model):
    with torch.no_grad():
        return model(tiny.fixed_input())


def test_compiled_and_checkpoint_wrapped_names_are_canonical(tmp_path):
    model = tiny.make("lora4")
    tiny.randomize_adapters(model, seed=1)
    ref = _out(model)
    for i, b in enumerate(model.blocks):
        model.blocks[i] = checkpoint_wrapper(b)
    compiled = torch.compile(model)  # only wrapped; never run, so nothing is compiled
    names = canonical_names(compiled, compiled.state_dict().keys())
    assert any(k.startswith("_orig_mod.") for k in names)
    assert "blocks.0.q.weight" in names.values()
    save_model(compiled, str(tmp_path / "m"))
    assert set(tiny.read_dir(str(tmp_path / "m"))) == _plain_keys()

    target = torch.compile(tiny.make("lora2", seed=3))
    report = load_model(target, str(tmp_path / "m"))
    torch.testing.assert_close(_out(target._orig_mod), ref, atol=1e-5, rtol=0)
    assert report.remapped["blocks.1.fc2.weight"] == "blocks.1.fc2.base_layer.weight"


def test_user_module_named_like_a_wrapper_keeps_its_name():
    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.module = nn.Linear(2, 2)  # not DDP's child: must stay in the name
            self.model = nn.Linear(2, 2)

    names = canonical_names(Holder(), Holder().state_dict().keys())
    assert names["module.weight"] == "module.weight"
    assert names["model.bias"] == "model.bias"


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_lora_saves_merged_and_loads_into_plain_and_own_lora(tmp_path, rslora):
    model = _peft(use_rslora=rslora)
    expected_scale = 8.0 / (4 ** 0.5 if rslora else 4)
    assert model.base_model.model.blocks[0].q.scaling["default"] == pytest.approx(expected_scale)
    tiny.randomize_adapters(model, seed=2)
    ref = _out(model)
    save_model(model, str(tmp_path / "m"))
    assert set(tiny.read_dir(str(tmp_path / "m"))) == _plain_keys()
    for variant in tiny.VARIANTS:
        target = tiny.make(variant, seed=5)
        load_model(target, str(tmp_path / "m"))
        torch.testing.assert_close(_out(target), ref, atol=1e-5, rtol=0)


def test_plain_checkpoint_into_peft_resets_adapters(tmp_path):
    src = tiny.make("plain", seed=4)
    ref = _out(src)
    save_model(src, str(tmp_path / "m"))
    target = _peft()
    tiny.randomize_adapters(target, seed=9)  # trained adapters would change the function
    report = load_model(target, str(tmp_path / "m"))
    torch.testing.assert_close(_out(target), ref, atol=1e-5, rtol=0)
    assert "blocks.0.q.lora_A.default.weight" in report.fresh
    assert "wte.lora_embedding_B.default" in report.fresh
    assert report.remapped["wte.weight"] == "wte.base_layer.weight"


def test_peft_merged_adapter_is_not_added_twice(tmp_path):
    model = _peft()
    tiny.randomize_adapters(model, seed=2)
    ref = _out(model)
    model.merge_adapter()  # base now holds W + BA; the adapter must not be added again
    save_model(model, str(tmp_path / "m"))
    target = tiny.make("plain")
    load_model(target, str(tmp_path / "m"))
    torch.testing.assert_close(_out(target), ref, atol=1e-5, rtol=0)
