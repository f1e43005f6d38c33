"""export_peft and `dcp-universal export --format peft`: PEFT's PeftModel.from_pretrained
is the reader, for steps made with PEFT and with the library's own LoRA."""

from __future__ import annotations

import json

import pytest

import tiny
from hf_models import gpt2, llama, logits, max_diff, peft, with_lora
from dcp_universal import CheckpointError, CheckpointManager, apply_lora, export_peft, save_model
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
    model = apply_lora(llama(tied=False, seed=1), rank=2, alpha=4.0, targets=["q_proj"])
    step = CheckpointManager(str(tmp_path / "ck")).save(1, model)  # norms etc. still trainable
    with pytest.raises(CheckpointError, match="outside the adapters"):
        export_peft(step, str(tmp_path / "adapter"))
    plain = CheckpointManager(str(tmp_path / "plain")).save(1, llama(tied=False))
    with pytest.raises(CheckpointError, match="not a LoRA step"):
        export_peft(plain, str(tmp_path / "adapter"))
    assert not (tmp_path / "adapter").exists()
