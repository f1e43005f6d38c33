"""Real clients, one process: tiny Llama and GPT-2 from transformers, PEFT as configured in
the wild. Every load either computes the saved model's function or raises a specific
CheckpointError with the model untouched."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed.checkpoint as dcp

import tiny
from hf_models import gpt2, llama, logits, max_diff, tokens, with_lora
from dcp_universal import (CheckpointError, CheckpointManager, CheckpointMismatchError,
                           load_model, save_model)

ATOL = 1e-5


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model, before):
    after = model.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def _plain_dcp(state: dict, path) -> None:
    dcp.save(state, checkpoint_id=str(path), no_dist=True)


def _step(model, opt, i):
    """One deterministic training step of a causal LM; returns the loss."""
    x = (tokens(2, 6) + i) % 61
    loss = model(x, labels=x).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.detach()


def _save_and_resume(build, tmp_path):
    """Train 2 steps, save, train 2 more; load the save into a fresh build. Returns the
    load's report, the resumed model and optimizer, and the 2 losses after the save."""
    model, opt = build()
    for i in range(2):
        _step(model, opt, i)
    mgr = CheckpointManager(str(tmp_path / "ck"))
    mgr.save(2, model, opt)
    expected = [_step(model, opt, i) for i in range(2, 4)]
    model2, opt2 = build()
    return mgr.load(model2, opt2), model2, opt2, expected


# ---- tied weights -------------------------------------------------------------------

@pytest.mark.parametrize("target_module", ["lm_head", "embed_tokens"])
def test_lora_on_a_tied_name_refuses_a_tied_target_and_loads_an_untied_one(tmp_path, target_module):
    src = with_lora(llama(tied=True), target_modules=["q_proj", target_module])
    ref = logits(src)
    save_model(src, str(tmp_path / "m"))
    saved = tiny.read_dir(str(tmp_path / "m"))
    assert not torch.equal(saved["lm_head.weight"], saved["model.embed_tokens.weight"])

    tied = llama(tied=True, seed=5)
    before = _snapshot(tied)
    with pytest.raises(CheckpointMismatchError) as e:
        load_model(tied, str(tmp_path / "m"))
    assert ("ties 'lm_head.weight', 'model.embed_tokens.weight' into one tensor" in str(e.value))
    assert "other values for 'model.embed_tokens.weight' than for 'lm_head.weight'" in str(e.value)
    assert "tie_word_embeddings=False" in str(e.value)
    _assert_untouched(tied, before)
    with pytest.raises(CheckpointMismatchError):  # strict=False is no way around it
        load_model(tied, str(tmp_path / "m"), strict=False)
    _assert_untouched(tied, before)

    untied = llama(tied=False, seed=5)
    load_model(untied, str(tmp_path / "m"))
    assert max_diff(logits(untied), ref) < ATOL


def test_tied_checkpoint_into_tied_targets_keeps_the_tie(tmp_path):
    src = llama(tied=True, seed=2)
    ref = logits(src)
    save_model(src, str(tmp_path / "m"))
    for target in (llama(tied=True, seed=9),
                   with_lora(llama(tied=True, seed=9), target_modules=["q_proj", "lm_head"])):
        report = load_model(target, str(tmp_path / "m"))
        base = target.get_base_model() if hasattr(target, "get_base_model") else target
        assert base.lm_head.weight is base.model.embed_tokens.weight
        assert any(n.startswith("tied: lm_head.weight = model.embed_tokens.weight") for n in report.notes)
        assert max_diff(logits(target), ref) < ATOL  # PEFT target: adapters reset to zero


def test_tied_lora_step_through_the_manager(tmp_path):
    src = with_lora(llama(tied=True), target_modules=["q_proj", "lm_head"])
    ref = logits(src)
    mgr = CheckpointManager(str(tmp_path / "ck"))
    mgr.save(1, src)
    assert mgr.manifest(1).ties == [["lm_head.weight", "model.embed_tokens.weight"]]
    tied = llama(tied=True, seed=3)
    before = _snapshot(tied)
    with pytest.raises(CheckpointMismatchError, match="tie_word_embeddings=False"):
        mgr.load(tied)
    _assert_untouched(tied, before)
    untied = llama(tied=False, seed=3)
    mgr.load(untied)
    assert max_diff(logits(untied), ref) < ATOL
    same = with_lora(llama(tied=True, seed=3), target_modules=["q_proj", "lm_head"], seed=4)
    report = mgr.load(same)  # the same adapters: base and adapters exactly, tie kept
    assert max_diff(logits(same), ref) == 0.0
    assert any("exactly" in n for n in report.notes)


def test_tied_full_finetune_resumes_exactly_with_one_optimizer_entry(tmp_path):
    def build():
        model = llama(tied=True).train()
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

    report, model2, opt2, expected = _save_and_resume(build, tmp_path)
    assert model2.lm_head.weight is model2.model.embed_tokens.weight
    assert "model.embed_tokens.weight" in report.optimizer_restored
    assert "lm_head.weight" not in report.optimizer_restored + report.optimizer_fresh
    assert [_step(model2, opt2, i) for i in range(2, 4)] == expected


# ---- PEFT modules_to_save --------------------------------------------------------------

def _mts(seed=0, head_seed=11):
    model = with_lora(llama(tied=False, seed=seed), target_modules=["q_proj"],
                      modules_to_save=["lm_head"])
    with torch.no_grad():
        head = model.base_model.model.lm_head.modules_to_save["default"].weight
        head.copy_(torch.randn(head.shape, generator=torch.Generator().manual_seed(head_seed)))
    return model


def test_modules_to_save_is_saved_under_the_modules_own_name(tmp_path):
    src = _mts()
    ref = logits(src)
    save_model(src, str(tmp_path / "m"))
    saved = tiny.read_dir(str(tmp_path / "m"))
    assert set(saved) == set(llama(tied=False).state_dict())  # no original_module, no copies
    assert torch.equal(saved["lm_head.weight"],
                       src.base_model.model.lm_head.modules_to_save["default"].weight)
    plain = llama(tied=False, seed=4)
    load_model(plain, str(tmp_path / "m"))
    assert max_diff(logits(plain), ref) < ATOL
    same = _mts(seed=4, head_seed=12)
    load_model(same, str(tmp_path / "m"))
    assert max_diff(logits(same), ref) < ATOL


def test_modules_to_save_lora_run_resumes_exactly(tmp_path):
    def build():
        model = _mts().train()
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    report, model2, opt2, expected = _save_and_resume(build, tmp_path)
    assert "lm_head.weight" in report.optimizer_restored
    assert [_step(model2, opt2, i) for i in range(2, 4)] == expected


# ---- GPT-2: Conv1D bases, PEFT's fan_in_fan_out -----------------------------------------

def test_gpt2_lora_merges_like_peft_and_loads_both_ways(tmp_path):
    src = with_lora(gpt2(), target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    ref = logits(src)
    save_model(src, str(tmp_path / "m"))
    peft_merged = tiny.read_dir(str(tmp_path / "m"))
    merged = with_lora(gpt2(), target_modules=["c_attn", "c_proj", "c_fc"],
                       fan_in_fan_out=True).merge_and_unload()
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(peft_merged[k], v, atol=1e-6, rtol=0)
    plain = gpt2(seed=3)
    load_model(plain, str(tmp_path / "m"))
    assert max_diff(logits(plain), ref) < ATOL

    save_model(gpt2(seed=5), str(tmp_path / "plain"))
    lora = with_lora(gpt2(seed=6), target_modules=["c_attn"], fan_in_fan_out=True, r=2)
    report = load_model(lora, str(tmp_path / "plain"))
    assert report.fresh  # adapters reset to a zero update
    assert max_diff(logits(lora), logits(gpt2(seed=5))) < ATOL


# ---- DCP checkpoints written by other tools ------------------------------------------

def _titan_state(model, opt):
    """torchtitan's layout: model keys at the top level beside the other state."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, StateDictOptions
    osd = get_optimizer_state_dict(model, opt, options=StateDictOptions(flatten_optimizer_state_dict=True))
    return {**model.state_dict(), "optimizer": osd,
            "lr_scheduler": {"last_epoch": 3, "base_lrs": [0.1]},
            "dataloader": {"dp_rank_0": b"position"}, "train_state": {"step": 3}}


def _trained(model):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = tokens()
    model(x, labels=x).loss.backward()
    opt.step()
    return opt


def test_torchtitan_layout_loads_with_other_state_noted(tmp_path):
    src = llama(tied=False, seed=1)
    opt = _trained(src)
    ref = logits(src)
    _plain_dcp(_titan_state(src, opt), tmp_path / "titan")
    target = llama(tied=False, seed=2)
    report = load_model(target, str(tmp_path / "titan"))
    assert max_diff(logits(target), ref) == 0.0
    other = [n for n in report.notes if n.startswith("other state")]
    assert other and all(w in other[0] for w in ("optimizer (", "lr_scheduler", "dataloader",
                                                   "train_state"))
    assert not report.dropped


@pytest.mark.parametrize("layout", ["titan", "app", "app-given"])
def test_export_of_another_tools_checkpoint_takes_exactly_the_model(tmp_path, layout):
    """export_hf of a torchtitan-layout or {"app": {...}} DCP checkpoint wrote 149 keys,
    optimizer moments included, into model.safetensors before."""
    from safetensors import safe_open
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from transformers import AutoModelForCausalLM

    from dcp_universal import export_hf

    src = llama(tied=False, seed=1)
    opt = _trained(src)
    ref = logits(src)
    if layout == "titan":
        state = _titan_state(src, opt)
    else:
        msd, osd = get_state_dict(src, opt)
        state = {"app": {"model": msd, "optim": osd}}
    _plain_dcp(state, tmp_path / "ckpt")
    out = export_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"), config=src.config.to_dict(),
                    prefix="app.model." if layout == "app-given" else None)
    with safe_open(f"{out}/model.safetensors", "pt") as f:
        assert set(f.keys()) == set(src.state_dict())
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert max_diff(logits(loaded), ref) == 0.0


def test_tutorial_nested_layout_finds_the_prefix_or_takes_it(tmp_path):
    src = llama(tied=False, seed=1)
    opt = _trained(src)
    ref = logits(src)
    from torch.distributed.checkpoint.state_dict import get_state_dict
    msd, osd = get_state_dict(src, opt)
    _plain_dcp({"app": {"model": msd, "optim": osd}}, tmp_path / "app")
    target = llama(tied=False, seed=2)
    report = load_model(target, str(tmp_path / "app"))
    assert max_diff(logits(target), ref) == 0.0
    assert any("'app.model.'" in n and "found" in n for n in report.notes)
    assert any(n.startswith("other state") and "app.optim" in n for n in report.notes)

    target = llama(tied=False, seed=3)
    report = load_model(target, str(tmp_path / "app"), prefix="app.model")
    assert max_diff(logits(target), ref) == 0.0
    assert any("(given)" in n for n in report.notes)

    target = llama(tied=False, seed=3)
    before = _snapshot(target)
    with pytest.raises(CheckpointMismatchError, match="no tensor under prefix 'app.modle.'"):
        load_model(target, str(tmp_path / "app"), prefix="app.modle.")
    with pytest.raises(CheckpointMismatchError, match="strict=False would load nothing"):
        load_model(target, str(tmp_path / "app"), prefix="app.optim.", strict=False)
    _assert_untouched(target, before)


def test_plain_dcp_of_wrapped_models_loads(tmp_path):
    src = tiny.make("plain", seed=1)
    with torch.no_grad():
        ref = src(tiny.fixed_input())
    # what dcp.save of a compiled model's, and of a DDP model's, state_dict writes
    _plain_dcp({f"_orig_mod.{k}": v for k, v in src.state_dict().items()}, tmp_path / "compiled")
    _plain_dcp({f"module.{k}": v for k, v in src.state_dict().items()}, tmp_path / "ddp")
    for name in ("compiled", "ddp"):
        target = tiny.make("lora2", seed=4)
        load_model(target, str(tmp_path / name))
        with torch.no_grad():
            torch.testing.assert_close(target(tiny.fixed_input()), ref, atol=ATOL, rtol=0)


def test_plain_dcp_of_a_peft_model(tmp_path):
    src = with_lora(llama(tied=False, seed=1), target_modules=["q_proj", "v_proj", "embed_tokens"],
                    lora_alpha=12, use_rslora=True)
    ref = logits(src)
    _plain_dcp(src.state_dict(), tmp_path / "peft")  # base_model.model....lora_A.default.weight

    same = with_lora(llama(tied=False, seed=2), target_modules=["q_proj", "v_proj", "embed_tokens"],
                     lora_alpha=12, use_rslora=True, seed=3)
    report = load_model(same, str(tmp_path / "peft"))
    assert max_diff(logits(same), ref) == 0.0
    assert not report.fresh

    plain = llama(tied=False, seed=2)
    before = _snapshot(plain)
    with pytest.raises(CheckpointMismatchError, match="adapter_config.json"):
        load_model(plain, str(tmp_path / "peft"))
    _assert_untouched(plain, before)

    src.save_pretrained(str(tmp_path / "adapter"))  # PEFT's own adapter_config.json
    (tmp_path / "peft" / "adapter_config.json").write_text(
        (tmp_path / "adapter" / "adapter_config.json").read_text())
    report = load_model(plain, str(tmp_path / "peft"))
    assert max_diff(logits(plain), ref) < ATOL
    assert any("merged 5 PEFT LoRA adapters" in n for n in report.notes)
    other_rank = with_lora(llama(tied=False, seed=2), target_modules=["q_proj"], r=2)
    load_model(other_rank, str(tmp_path / "peft"))
    assert max_diff(logits(other_rank), ref) < ATOL


def test_plain_dcp_of_a_gpt2_peft_model_merges_conv1d(tmp_path):
    # the config says fan_in_fan_out, yet PEFT applies it per layer: the Linear head and
    # the square c_proj Conv1D both need their own orientation
    src = with_lora(gpt2(tied=False, seed=1), target_modules=["c_attn", "c_proj", "lm_head"],
                    fan_in_fan_out=True)
    ref = logits(src)
    _plain_dcp(src.state_dict(), tmp_path / "peft")
    src.save_pretrained(str(tmp_path / "peft"))  # adapter_config.json beside the DCP files
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is False  # what PEFT saved: only the layers know
    plain = gpt2(tied=False, seed=2)
    load_model(plain, str(tmp_path / "peft"))
    assert max_diff(logits(plain), ref) < ATOL


def test_strict_false_that_loads_nothing_raises(tmp_path):
    _plain_dcp({"something.else": torch.zeros(3)}, tmp_path / "other")
    model = tiny.make("plain")
    before = _snapshot(model)
    with pytest.raises(CheckpointMismatchError, match="strict=False would load nothing"):
        load_model(model, str(tmp_path / "other"), strict=False)
    _assert_untouched(model, before)


# ---- meta-device initialisation ------------------------------------------------------

def test_meta_model_is_refused_and_non_persistent_buffers_are_reported(tmp_path):
    src = llama(tied=True, seed=1)
    ref = logits(src)
    save_model(src, str(tmp_path / "m"))
    with torch.device("meta"):
        target = llama(tied=True, seed=2)
    with pytest.raises(CheckpointError, match="meta device") as e:
        load_model(target, str(tmp_path / "m"))
    assert "to_empty" in str(e.value) and "model.embed_tokens.weight" in str(e.value)

    target.to_empty(device="cpu")
    target.model.rotary_emb.__init__(target.config)  # the model's own code sets inv_freq
    report = load_model(target, str(tmp_path / "m"))
    assert any("non-persistent" in n and "model.rotary_emb.inv_freq" in n for n in report.notes)
    assert max_diff(logits(target), ref) < ATOL


def test_tied_optimizer_state_follows_whichever_name_the_target_lists(tmp_path):
    import torch.nn as nn

    class HeadFirst(nn.Module):  # lists the shared parameter as head.weight, not wte.weight
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(tiny.DIM, tiny.VOCAB, bias=False)
            self.wte = nn.Embedding(tiny.VOCAB, tiny.DIM)
            self.head.weight = self.wte.weight

        def forward(self, x):
            return self.head(self.wte(x))

    class WteFirst(HeadFirst):
        def __init__(self):
            super().__init__()
            self.wte = self._modules.pop("wte")  # re-register: wte first
            self._modules = {"wte": self.wte, "head": self._modules["head"]}

    def trained(cls):
        torch.manual_seed(0)
        model = cls()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        model(tiny.fixed_input()).sum().backward()
        opt.step()
        return model, opt

    src, opt = trained(WteFirst)
    assert [n for n, _ in src.named_parameters()] == ["wte.weight"]
    mgr = CheckpointManager(str(tmp_path / "ck"))
    mgr.save(1, src, opt)
    target, topt = trained(HeadFirst)
    assert [n for n, _ in target.named_parameters()] == ["head.weight"]
    report = mgr.load(target, topt)
    assert report.optimizer_restored == ["head.weight"] and not report.optimizer_dropped
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(topt.state[target.head.weight][key], opt.state[src.wte.weight][key])
    assert target.head.weight is target.wte.weight


def test_plain_dcp_of_a_dora_model_is_refused(tmp_path):
    from dcp_universal import UnsupportedAdapterError

    src = with_lora(llama(tied=False, seed=1), target_modules=["q_proj"], use_dora=True)
    _plain_dcp(src.state_dict(), tmp_path / "dora")
    src.save_pretrained(str(tmp_path / "dora"))
    plain = llama(tied=False, seed=2)
    before = _snapshot(plain)
    with pytest.raises(UnsupportedAdapterError, match="DoRA"):
        load_model(plain, str(tmp_path / "dora"))
    _assert_untouched(plain, before)
