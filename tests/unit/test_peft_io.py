"""PEFT adapters both ways: export_peft (and `export --format peft`) from steps made with
PEFT and with the library's own LoRA, read by PEFT's PeftModel.from_pretrained; and PEFT
adapter directories loaded into LoRA models by load_model."""

from __future__ import annotations

import json

import pytest
import torch

import tiny
from hf_models import gpt2, llama, logits, max_diff, peft, with_lora
from dcp_universal import (CheckpointError, CheckpointManager, apply_lora, export_peft,
                           save_model)
from dcp_universal.cli import main as cli

pytest.importorskip("safetensors")


def _peft_load(base, out):
    return peft.PeftModel.from_pretrained(base, str(out)).eval()


def test_peft_made_step_with_mixed_ranks_and_rslora(tmp_path):
    src = with_lora(llama(tied=False, seed=1), target_modules=["q_proj", "v_proj", "embed_tokens"],
                    use_rslora=True, lora_alpha=12, rank_pattern={"v_proj": 2})
    ref = logits(src)
    step = CheckpointManager(str(tmp_path / "ck")).save(1, src)
    export_peft(step, str(tmp_path / "adapter"))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and not cfg["use_rslora"]
    assert cfg["lora_alpha"] == 24.0  # 12 / sqrt(4) = 6 = alpha / r
    assert set(cfg["rank_pattern"].values()) == {2} and len(cfg["rank_pattern"]) == 2
    assert "model.embed_tokens" in cfg["target_modules"]
    loaded = _peft_load(llama(tied=False, seed=1), tmp_path / "adapter")
    assert max_diff(logits(loaded), ref) < 1e-4


def test_own_lora_run_exports_to_peft(tmp_path):
    model = llama(tied=False, seed=1)
    model.requires_grad_(False)  # only the adapters train, as in a PEFT run
    apply_lora(model, rank=4, alpha=8.0, targets=["q_proj", "v_proj", "embed_tokens"])
    tiny.randomize_adapters(model, seed=3)
    ref = logits(model)
    step = CheckpointManager(str(tmp_path / "ck")).save(1, model)
    assert cli(["export", step, str(tmp_path / "adapter"), "--format", "peft"]) == 0
    loaded = _peft_load(llama(tied=False, seed=1), tmp_path / "adapter")
    assert max_diff(logits(loaded), ref) < 1e-4


def test_gpt2_conv1d_adapter_and_tied_frozen_head(tmp_path):
    src = with_lora(gpt2(seed=1), target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    ref = logits(src)
    mgr = CheckpointManager(str(tmp_path / "ck"))
    step = mgr.save(1, src)
    # the frozen head tied to wte belongs to the base, not to the step's trained tensors
    assert set(tiny.read_dir(f"{step}/adapters")) == mgr.manifest(1).adapters.factor_keys()
    export_peft(step, str(tmp_path / "adapter"))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True
    loaded = _peft_load(gpt2(seed=1), tmp_path / "adapter")
    assert max_diff(logits(loaded), ref) < 1e-4


def test_what_peft_cannot_hold_is_refused(tmp_path):
    # (weights trained outside the adapters go to modules_to_save: test_peft_edges.py)
    model = with_lora(llama(tied=False, seed=1), target_modules=["q_proj"])
    model.base_model.disable_adapter_layers()  # the step's model is the base alone
    step = CheckpointManager(str(tmp_path / "ck")).save(1, model)
    with pytest.raises(CheckpointError, match="none was active when it was saved"):
        export_peft(step, str(tmp_path / "adapter"))
    plain = CheckpointManager(str(tmp_path / "plain")).save(1, llama(tied=False))
    with pytest.raises(CheckpointError, match="not a LoRA step"):
        export_peft(plain, str(tmp_path / "adapter"))
    assert not (tmp_path / "adapter").exists()


def test_peft_adapter_directory_loads_into_lora_models(tmp_path):
    from dcp_universal import CheckpointMismatchError, load_model

    src = with_lora(llama(tied=False, seed=1), target_modules=["q_proj", "v_proj", "embed_tokens"],
                    lora_alpha=12)
    ref = logits(src)
    src.save_pretrained(str(tmp_path / "adapter"))  # PEFT's own files
    # the same PEFT configuration: adapters <- the files, base as it is
    same = with_lora(llama(tied=False, seed=1), target_modules=["q_proj", "v_proj", "embed_tokens"],
                     lora_alpha=12, seed=9)
    report = load_model(same, str(tmp_path / "adapter"))
    assert max_diff(logits(same), ref) < 1e-5 and not report.fresh
    # the library's own LoRA of the same rank (another alpha: the update is rescaled)
    own = llama(tied=False, seed=1)
    apply_lora(own, rank=4, alpha=3.0, targets=["q_proj", "v_proj", "embed_tokens"])
    load_model(own, str(tmp_path / "adapter"))
    assert max_diff(logits(own), ref) < 1e-5
    # another rank, or no adapter where the file has one: refused, nothing touched
    for bad in (with_lora(llama(tied=False, seed=1), r=2, lora_alpha=12,
                          target_modules=["q_proj", "v_proj", "embed_tokens"]),
                with_lora(llama(tied=False, seed=1), target_modules=["q_proj"])):
        before = {k: v.clone() for k, v in bad.state_dict().items()}
        with pytest.raises(CheckpointMismatchError):
            load_model(bad, str(tmp_path / "adapter"))
        assert all(torch.equal(v, before[k]) for k, v in bad.state_dict().items())


def test_exported_adapter_round_trips_into_the_library(tmp_path):
    from dcp_universal import load_model

    src = with_lora(gpt2(seed=1), target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    ref = logits(src)
    step = CheckpointManager(str(tmp_path / "ck")).save(1, src)
    export_peft(step, str(tmp_path / "adapter"))
    target = with_lora(gpt2(seed=1), target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                       seed=4)
    load_model(target, str(tmp_path / "adapter"))
    assert max_diff(logits(target), ref) < 1e-5


def test_peft_saved_gpt2_with_a_linear_head_loads_layer_by_layer(tmp_path):
    from dcp_universal import load_model

    # PEFT turns the saved fan_in_fan_out off on meeting the Linear head, after the
    # Conv1D layers (c_proj is square) took it on: only the layers say which is which
    targets = ["c_attn", "c_proj", "lm_head"]
    src = with_lora(gpt2(tied=False, seed=1), target_modules=targets, fan_in_fan_out=True)
    ref = logits(src)
    src.save_pretrained(str(tmp_path / "adapter"))
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())[
        "fan_in_fan_out"] is False
    target = with_lora(gpt2(tied=False, seed=1), target_modules=targets, fan_in_fan_out=True,
                       seed=5)
    load_model(target, str(tmp_path / "adapter"))
    assert max_diff(logits(target), ref) < 1e-5
