"""DoRA (PEFT ``use_dora=True``): merged as PEFT's ``merge_and_unload`` computes it,
resumed exactly, loaded into other targets, exported to transformers and PEFT.

PEFT's merge is ``(m / ||W + s * B @ A||) * (W + s * B @ A)`` with the norm per output
feature: a Linear's rows, a Conv1D's and an Embedding's columns. Each case below runs on
a tiny model people fine-tune (Llama, GPT-2), built here with random weights.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from hf_models import config_of, gpt2, llama, logits, max_diff, peft, transformers, with_lora
from dcp_universal import (CheckpointManager, UnsupportedAdapterError, export_hf, export_peft,
                           load_model, save_model)

ATOL = 1e-5
TARGETS = ["q_proj", "v_proj", "down_proj", "embed_tokens"]


def _dora_llama(seed=1, r=4, targets=TARGETS):
    return with_lora(llama(tied=False), seed=seed, r=r, target_modules=targets, use_dora=True)


def _dora_gpt2(seed=1):
    return with_lora(gpt2(tied=False), seed=seed, target_modules=["c_attn", "c_fc", "wte"],
                     fan_in_fan_out=True, use_dora=True)


def _peft_merged(model):
    return copy.deepcopy(model).merge_and_unload()


@pytest.mark.parametrize("build", [_dora_llama, _dora_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("merge", ["sharded", "rank0"])
def test_dora_merges_as_peft_merge_and_unload(tmp_path, build, merge):
    src = build()
    expected = _peft_merged(src)
    save_model(src, str(tmp_path / "m"), merge=merge)
    plain = (gpt2 if build is _dora_gpt2 else llama)(tied=False, seed=9)
    load_model(plain, str(tmp_path / "m"))
    got, want = plain.state_dict(), expected.state_dict()
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0, msg=k)
    assert max_diff(logits(plain), logits(expected)) < ATOL
    assert max_diff(logits(plain), logits(src)) < ATOL  # PEFT's own DoRA forward


def _train(model, steps=2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for i in range(steps):
        x = torch.randint(0, 61, (2, 6), generator=torch.Generator().manual_seed(i))
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


def test_dora_resumes_exactly_magnitude_and_factors(tmp_path):
    src = _dora_llama()
    opt = _train(src)
    mgr = CheckpointManager(str(tmp_path / "ck"))
    mgr.save(2, src, opt)
    m = json.loads((tmp_path / "ck" / "step-00000002" / "manifest.json").read_text())
    assert m["format_version"] == 3 and m["adapters"]["magnitudes"]
    target = _dora_llama(seed=5)
    opt2 = torch.optim.AdamW([p for p in target.parameters() if p.requires_grad], lr=1e-2)
    report = mgr.load(target, opt2)
    assert not report.fresh
    want = dict(src.named_parameters())
    magnitudes = [n for n in want if "lora_magnitude_vector" in n]
    assert len(magnitudes) == 2 * 3 + 1  # q, v, down_proj in 2 layers, and the embedding
    for n, p in target.named_parameters():
        assert torch.equal(p, want[n]), n
    assert torch.equal(logits(target), logits(src))
    # the optimizer's moments of the magnitudes came back too
    by_name = {id(p): n for n, p in target.named_parameters()}
    src_names = {id(p): n for n, p in src.named_parameters()}
    src_state = {src_names[id(p)]: s for p, s in opt.state.items()}
    for p, s in opt2.state.items():
        torch.testing.assert_close(s["exp_avg"], src_state[by_name[id(p)]]["exp_avg"], atol=0, rtol=0)


def test_a_step_without_dora_stays_format_2(tmp_path):
    src = with_lora(llama(tied=False), target_modules=["q_proj"])
    CheckpointManager(str(tmp_path / "ck")).save(1, src)
    m = json.loads((tmp_path / "ck" / "step-00000001" / "manifest.json").read_text())
    assert m["format_version"] == 2 and "magnitudes" not in m["adapters"]


@pytest.mark.parametrize("target", ["plain", "lora_r2", "dora_r2", "lora_same_rank"])
def test_dora_step_loads_into_other_targets(tmp_path, target):
    src = _dora_llama()
    expected = logits(_peft_merged(src))
    CheckpointManager(str(tmp_path / "ck")).save(1, src)
    model = {"plain": lambda: llama(tied=False, seed=9),
             "lora_r2": lambda: with_lora(llama(tied=False, seed=9), r=2, target_modules=TARGETS),
             "dora_r2": lambda: _dora_llama(seed=6, r=2),
             "lora_same_rank": lambda: with_lora(llama(tied=False, seed=9), target_modules=TARGETS),
             }[target]()
    report = CheckpointManager(str(tmp_path / "ck")).load(model)
    assert max_diff(logits(model), expected) < ATOL
    if target != "plain":
        assert report.fresh  # the target's adapters start at a zero update
        if target == "dora_r2":  # a fresh DoRA magnitude is the norm of its new base
            q = model.base_model.model.model.layers[0].self_attn.q_proj
            w = q.base_layer.weight
            torch.testing.assert_close(q.lora_magnitude_vector["default"].weight,
                                       w.norm(dim=1), atol=1e-6, rtol=0)


def test_dora_exports_load_in_transformers_and_peft(tmp_path):
    src = _dora_llama()
    expected = logits(_peft_merged(src))
    mgr = CheckpointManager(str(tmp_path / "ck"))
    mgr.save(1, src)
    step = str(tmp_path / "ck" / "step-00000001")
    export_hf(step, str(tmp_path / "hf"), config=config_of(src))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    assert max_diff(logits(hf), expected) < ATOL
    export_peft(step, str(tmp_path / "peft"))
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True
    loaded = peft.PeftModel.from_pretrained(llama(tied=False), str(tmp_path / "peft")).eval()
    assert max_diff(logits(loaded), logits(src)) < ATOL
    for (n, p), (n2, p2) in zip(src.named_parameters(), loaded.named_parameters()):
        if "lora_" in n:
            assert n == n2 and torch.equal(p, p2), n


def test_two_active_dora_adapters_are_refused_before_writing(tmp_path):
    model = _dora_llama(targets=["q_proj"])
    model.add_adapter("other", peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    model.base_model.set_adapter(["default", "other"])
    with pytest.raises(UnsupportedAdapterError, match="active together"):
        save_model(model, str(tmp_path / "m"))
    assert not (tmp_path / "m").exists()
