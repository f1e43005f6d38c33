"""Bad input gets a specific error, and the model is left untouched."""

from __future__ import annotations

import pytest
import torch

import tiny
from dcp_universal import (CheckpointError, CheckpointMismatchError, NotACheckpointError,
                           load_model, save_model)
from dcp_universal.errors import UnsupportedAdapterError
from dcp_universal.lora import apply_lora


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k


def test_other_architecture_raises_with_keys_and_shapes_and_leaves_model_untouched(tmp_path, monkeypatch):
    save_model(tiny.make("plain", dim=16), str(tmp_path / "wide"))  # the same layout, wider
    target = tiny.make("lora4", seed=3)
    tiny.randomize_adapters(target, seed=1)
    before = _snapshot(target)
    with pytest.raises(CheckpointMismatchError) as err:
        load_model(target, str(tmp_path / "wide"))
    msg = str(err.value)
    assert "'blocks.0.q.weight': checkpoint has (16, 16), model has (13, 13)" in msg
    assert "nothing was loaded" in msg
    _assert_untouched(target, before)


def test_missing_and_unexpected_keys_raise_strict_and_report_non_strict(tmp_path):
    save_model(tiny.make("plain", n_blocks=3), str(tmp_path / "deep"))
    target = tiny.make("plain", seed=3, n_blocks=2)
    before = _snapshot(target)
    with pytest.raises(CheckpointMismatchError, match=r"in checkpoint but not in model \(9\)"):
        load_model(target, str(tmp_path / "deep"))
    _assert_untouched(target, before)

    report = load_model(target, str(tmp_path / "deep"), strict=False)
    assert sorted(report.dropped) == sorted(k for k in tiny.read_dir(str(tmp_path / "deep"))
                                            if k.startswith("blocks.2."))
    assert "blocks.0.q.weight" in report.loaded and not report.missing
    torch.testing.assert_close(target.blocks[0].q.weight,
                               tiny.read_dir(str(tmp_path / "deep"))["blocks.0.q.weight"])

    shallow = tiny.make("plain", seed=3, n_blocks=4)
    with pytest.raises(CheckpointMismatchError, match="missing from checkpoint"):
        load_model(shallow, str(tmp_path / "deep"))
    report = load_model(shallow, str(tmp_path / "deep"), strict=False)
    assert len(report.missing) == 9 and all(k.startswith("blocks.3.") for k in report.missing)


def test_not_a_checkpoint_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="is not a model checkpoint"):
        load_model(tiny.make(), str(tmp_path))
    with pytest.raises(NotACheckpointError, match="does not exist"):
        load_model(tiny.make(), str(tmp_path / "nope"))


def test_step_directory_resolves_to_its_model(tmp_path):
    src = tiny.make("plain", seed=4)
    save_model(src, str(tmp_path / "step" / "model"))
    target = tiny.make("plain")
    load_model(target, str(tmp_path / "step"))
    torch.testing.assert_close(target.head.weight, src.head.weight, atol=0, rtol=0)


def test_unsupported_peft_variants_raise_before_writing(tmp_path):
    peft = pytest.importorskip("peft")
    biased = peft.get_peft_model(tiny.Tiny(), peft.LoraConfig(r=2, target_modules=["q"],
                                                              lora_bias=True))
    with pytest.raises(UnsupportedAdapterError, match="lora_bias=True"):
        save_model(biased, str(tmp_path / "dora"))
    loha = peft.get_peft_model(tiny.Tiny(), peft.LoHaConfig(r=2, target_modules=["q"]))
    with pytest.raises(UnsupportedAdapterError, match="is not supported"):
        save_model(loha, str(tmp_path / "loha"))
    assert not (tmp_path / "dora").exists() and not (tmp_path / "loha").exists()


def test_apply_lora_rejects_unknown_targets_and_freezes_only_bases():
    with pytest.raises(ValueError, match=r"targets \['nope'\] match no"):
        apply_lora(tiny.Tiny(), rank=2, alpha=2, targets=["q", "nope"])
    model = tiny.make("lora4")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "blocks.0.q.lora_A.weight" in trainable and "blocks.0.ln.weight" in trainable
    assert "blocks.0.q.base_layer.weight" not in trainable
    assert "blocks.0.fc2.weight" in trainable  # not a target: untouched


def test_fresh_adapters_do_not_change_the_function():
    model = tiny.make("lora4")
    plain = tiny.make("plain")
    with torch.no_grad():
        torch.testing.assert_close(model(tiny.fixed_input()), plain(tiny.fixed_input()))
