"""The hand-off's edges (issue "every PEFT configuration and every export, exact or
refused"): adapter variants this library cannot merge are refused before anything is
written, and exports never write what the model is not."""

from __future__ import annotations

import json
import os

import pytest
import torch

from hf_models import (bart, llama, logits, max_diff, peft, seq2seq_logits, transformers,
                       with_lora)
from dcp_universal import (CheckpointError, CheckpointManager, CheckpointMismatchError,
                           ExportExistsError, UnsupportedAdapterError,
                           export_hf, export_peft, load_model,
                           save_model)
from dcp_universal.cli import main as cli


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, state) -> bool:
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_lora_bias_is_refused_before_anything_is_written(tmp_path):
    """PEFT ``lora_bias=True`` gives lora_B a bias: a merge into W would drop it (the
    logits differed by 0.43 before)."""
    model = with_lora(llama(tied=False), target_modules=["q_proj", "v_proj"], lora_bias=True)
    with pytest.raises(UnsupportedAdapterError, match="lora_bias=True"):
        save_model(model, str(tmp_path / "m"))
    mgr = CheckpointManager(str(tmp_path / "run"))
    with pytest.raises(UnsupportedAdapterError, match="lora_bias=True"):
        mgr.save(1, model)
    mgr.close()
    assert not (tmp_path / "m").exists() and mgr.steps() == []


@pytest.mark.parametrize("config", ["prefix", "prompt"])
def test_prompt_learning_is_refused_on_save_and_load(tmp_path, config):
    """Prefix and prompt tuning keep their virtual tokens outside the weights: a save of
    the weights would load as the untuned base (0.79 from the tuned model before)."""
    make = {"prefix": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
            "prompt": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)}
    tuned = peft.get_peft_model(llama(tied=False), make[config]())
    with pytest.raises(UnsupportedAdapterError, match="prompt learning"):
        save_model(tuned, str(tmp_path / "m"))
    assert not (tmp_path / "m").exists()
    save_model(llama(tied=False, seed=5), str(tmp_path / "plain"))
    before = _state(tuned)
    with pytest.raises(UnsupportedAdapterError, match="prompt learning"):
        load_model(tuned, str(tmp_path / "plain"))
    assert _same(tuned, before)


@pytest.mark.parametrize("dtype", ["int8", torch.int32, "bool"])
def test_export_to_a_non_floating_dtype_is_refused(tmp_path, dtype):
    """A cast to int8 wrote every weight as 0 with exit status 0 before."""
    src = str(tmp_path / "m")
    save_model(llama(tied=False), src)
    with pytest.raises(ValueError, match="not a floating-point type"):
        export_hf(src, str(tmp_path / "hf"), dtype=dtype)
    assert not (tmp_path / "hf").exists()
    if dtype == "int8":
        assert cli(["export", src, str(tmp_path / "hf-cli"), "--dtype", "int8"]) != 0
        assert not os.path.exists(tmp_path / "hf-cli" / "model.safetensors")


@pytest.mark.parametrize("key", ["dtype", "torch_dtype"])
def test_export_writes_its_dtype_into_the_config(tmp_path, key):
    """``from_pretrained`` builds the model in the config's dtype: an export cast to
    bfloat16 with a config saying float32 loaded as an fp32 model before."""
    model = llama(tied=False)
    src = str(tmp_path / "m")
    save_model(model, src)
    cfg = model.config.to_dict()
    cfg.pop("dtype", None), cfg.pop("torch_dtype", None)
    cfg[key] = "float32"
    out = export_hf(src, str(tmp_path / "hf"), dtype="bfloat16", config=cfg)
    written = json.load(open(os.path.join(out, "config.json")))
    assert written["dtype"] == "bfloat16" and written.get(key) == "bfloat16"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.dtype == torch.bfloat16
    assert max_diff(logits(loaded), logits(model.to(torch.bfloat16))) == 0.0


def test_a_dtype_change_of_many_keys_is_one_note(tmp_path):
    """Loading bf16 weights into an fp32 model noted every key before."""
    source = llama(tied=False).to(torch.bfloat16)
    save_model(source, str(tmp_path / "m"))
    target = llama(tied=False, seed=9)
    report = load_model(target, str(tmp_path / "m"))
    casts = [n for n in report.notes if "cast to the model's" in n]
    n = len(source.state_dict())
    assert casts == [f"{n} tensors (model.embed_tokens.weight, ...): checkpoint torch.bfloat16 cast to "
                     "the model's torch.float32"], report.notes
    want = source.state_dict()
    assert all(torch.equal(v, want[k].float()) for k, v in target.state_dict().items()
               if "rotary" not in k)  # bf16 -> fp32 is exact; inv_freq is the model's own


def _two_adapters(seed: int, active: str = "a"):
    """A tiny Llama with PEFT adapters "a" and "b" (random factors), ``active`` on."""
    model = peft.get_peft_model(llama(tied=False, seed=seed), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), adapter_name="a")
    model.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"]))
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.set_adapter(active)
    return model.eval()


def test_two_adapters_restore_each_as_it_was_and_a_merge_uses_the_active_one(tmp_path):
    """Before: the base took a's update, b sat on top of it (1.26 after set_adapter)."""
    source = _two_adapters(seed=1)
    mgr = CheckpointManager(str(tmp_path / "run"))
    mgr.save(1, source)
    mgr.close()
    target = _two_adapters(seed=2)
    report = mgr.load(target)
    assert "restored base" in " ".join(report.notes)
    assert max_diff(logits(target), logits(source)) < 1e-5
    source.set_adapter("b"), target.set_adapter("b")
    assert max_diff(logits(target), logits(source)) < 1e-5
    source.set_adapter("a")
    # into a plain model: a merged, b (inactive) left out and said so
    plain = llama(tied=False, seed=3)
    report = mgr.load(plain)
    assert max_diff(logits(plain), logits(source)) < 1e-5
    assert any(n.startswith("not merged: ") and "inactive" in n for n in report.notes), report.notes
    # into the same adapters with b active: another function, refused, untouched
    other = _two_adapters(seed=4, active="b")
    before = _state(other)
    with pytest.raises(CheckpointMismatchError, match="set_adapter"):
        mgr.load(other)
    assert _same(other, before)


def test_a_merged_adapter_is_saved_as_what_the_model_computes(tmp_path):
    """Before: merge_adapter(), save, load into a fresh PEFT model applied the update twice
    (0.27)."""
    source = with_lora(llama(tied=False), target_modules=["q_proj", "v_proj"])
    want = logits(source)
    source.merge_adapter()
    mgr = CheckpointManager(str(tmp_path / "run"))
    mgr.save(1, source)
    mgr.close()
    fresh = with_lora(llama(tied=False, seed=5), target_modules=["q_proj", "v_proj"], seed=6)
    before = _state(fresh)
    with pytest.raises(CheckpointMismatchError, match="merge_adapter"):
        mgr.load(fresh)
    assert _same(fresh, before)
    fresh.merge_adapter()  # the same layout: merged too
    mgr.load(fresh)
    assert max_diff(logits(fresh), want) < 1e-5
    fresh.unmerge_adapter(), source.unmerge_adapter()
    assert max_diff(logits(fresh), logits(source)) < 1e-5
    plain = llama(tied=False, seed=7)
    mgr.load(plain)
    assert max_diff(logits(plain), want) < 1e-5


def test_export_peft_writes_every_adapter_under_its_name(tmp_path):
    """The active adapter at the root (what the run computed), each inactive one in a
    folder named after it, as PEFT's save_pretrained writes a non-default adapter; it
    was left out with a warning before."""
    source = _two_adapters(seed=1)
    step = CheckpointManager(str(tmp_path / "run")).save(1, source)
    out = export_peft(step, str(tmp_path / "adapter"))
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors", "b"]
    loaded = peft.PeftModel.from_pretrained(llama(tied=False, seed=1), out).eval()
    assert max_diff(logits(loaded), logits(source)) < 1e-5
    b = json.load(open(os.path.join(out, "b", "adapter_config.json")))
    assert (b["r"], b["lora_alpha"], b["target_modules"][0]) == (2, 4, "model.layers.0.self_attn.o_proj")
    loaded.load_adapter(os.path.join(out, "b"), adapter_name="b")
    loaded.set_adapter("b"), source.set_adapter("b")
    assert max_diff(logits(loaded), logits(source)) < 1e-5
    with pytest.raises(ExportExistsError, match="already holds an adapter"):
        export_peft(step, out)


def test_disabled_adapters_are_restored_not_reset(tmp_path):
    """Before: a step saved after disable_adapter_layers() resumed with the adapters reset
    ("8 fresh")."""
    source = with_lora(llama(tied=False), target_modules=["q_proj", "v_proj"])
    source.base_model.disable_adapter_layers()
    mgr = CheckpointManager(str(tmp_path / "run"))
    mgr.save(1, source)
    mgr.close()
    target = with_lora(llama(tied=False, seed=5), target_modules=["q_proj", "v_proj"], seed=6)
    target.base_model.disable_adapter_layers()
    report = mgr.load(target)
    assert not report.fresh
    assert max_diff(logits(target), logits(source)) < 1e-5
    source.base_model.enable_adapter_layers(), target.base_model.enable_adapter_layers()
    assert max_diff(logits(target), logits(source)) < 1e-5
    plain = llama(tied=False, seed=7)
    mgr.load(plain)
    source.base_model.disable_adapter_layers()
    assert max_diff(logits(plain), logits(source)) < 1e-5


def _seq_cls(seed: int):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=61, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        num_labels=3, pad_token_id=0)
    return transformers.LlamaForSequenceClassification(cfg).eval()


@torch.no_grad()
def _scores(model) -> torch.Tensor:
    from hf_models import tokens
    return model(tokens() % 60 + 1).logits.float()


def test_export_peft_of_a_seq_cls_model_keeps_its_head_in_modules_to_save(tmp_path):
    """PEFT adds modules_to_save=["score"] to a SEQ_CLS model itself; export_peft refused
    it ("trained weights outside the adapters") before."""
    source = peft.get_peft_model(_seq_cls(seed=1), peft.LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # trained adapters and a trained head copy
        for name, p in source.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    source.eval()
    mgr = CheckpointManager(str(tmp_path / "run"))
    step = mgr.save(1, source)
    mgr.close()
    out = export_peft(step, str(tmp_path / "adapter"))
    config = json.load(open(os.path.join(out, "adapter_config.json")))
    assert config["modules_to_save"] == ["score"]
    loaded = peft.PeftModel.from_pretrained(_seq_cls(seed=1), out).eval()
    assert max_diff(_scores(loaded), _scores(source)) < 1e-5
    # and the adapter loads back into a PEFT model of the same layout
    again = peft.get_peft_model(_seq_cls(seed=1), peft.LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])).eval()
    load_model(again, out)
    assert max_diff(_scores(again), _scores(source)) < 1e-5


def test_export_peft_of_an_apply_lora_run_with_trainable_norms(tmp_path):
    """The README's way (apply_lora leaves norms and the head trainable): export_peft
    refused it before; now the trained non-adapter weights go into modules_to_save."""
    from dcp_universal.lora import apply_lora

    source = apply_lora(llama(tied=False), rank=4, alpha=8, targets=["q_proj", "v_proj"])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in source.named_parameters():
            if p.requires_grad:  # adapters, norms, embedding and head: all trained
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    mgr = CheckpointManager(str(tmp_path / "run"))
    step = mgr.save(1, source)
    mgr.close()
    out = export_peft(step, str(tmp_path / "adapter"))
    assert "model.norm" in json.load(open(os.path.join(out, "adapter_config.json")))[
        "modules_to_save"]
    loaded = peft.PeftModel.from_pretrained(llama(tied=False), out).eval()
    assert max_diff(logits(loaded), logits(source)) < 1e-5


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_an_adapter_that_changed_the_base_is_not_exported_for_the_original_base(tmp_path, init):
    """PiSSA / OLoRA factors complete a residual base: exported as a plain LoRA for the
    original base they were off by 0.03-0.29 before. The step itself is exact."""
    source = peft.get_peft_model(llama(tied=False), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=init)).eval()
    with torch.no_grad():  # training moves the factors
        for name, p in source.named_parameters():
            if "lora_" in name:
                p.add_(0.05)
    mgr = CheckpointManager(str(tmp_path / "run"))
    step = mgr.save(1, source)
    mgr.close()
    with pytest.raises(CheckpointError, match=f"init_lora_weights='{init}'"):
        export_peft(step, str(tmp_path / "adapter"))
    assert not (tmp_path / "adapter").exists()
    plain = llama(tied=False, seed=4)
    mgr.load(plain)  # the merged model is what the run computed
    assert max_diff(logits(plain), logits(source)) < 1e-5
    out = export_hf(step, str(tmp_path / "hf"), config=source.config.to_dict())
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert max_diff(logits(loaded), logits(source)) < 1e-5


@pytest.mark.parametrize("init", ["mica", "orthogonal", "nora"])
def test_initialisations_known_to_keep_the_base_export_to_peft(tmp_path, init):
    """An allow-list: these start with B @ A = 0 on the untouched base (MiCA was refused
    by the old deny-list)."""
    source = peft.get_peft_model(llama(tied=False), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=init)).eval()
    with torch.no_grad():
        for name, p in source.named_parameters():
            if "lora_" in name:
                p.add_(0.05)
    mgr = CheckpointManager(str(tmp_path / "run"))
    out = export_peft(mgr.save(1, source), str(tmp_path / "adapter"))
    loaded = peft.PeftModel.from_pretrained(llama(tied=False), out).eval()
    assert max_diff(logits(loaded), logits(source)) < 1e-5


def test_an_initialisation_not_known_to_keep_the_base_is_not_exported(tmp_path):
    """ASTRA (and any initialisation added after this release) changes the base like
    PiSSA: exported as plain LoRA it was off by 0.083 under the old deny-list."""
    source = with_lora(llama(tied=False), target_modules=["q_proj"])
    source.peft_config["default"].init_lora_weights = "astra"  # what an ASTRA run's config says
    mgr = CheckpointManager(str(tmp_path / "run"))
    step = mgr.save(1, source)
    with pytest.raises(CheckpointError, match="init_lora_weights='astra'"):
        export_peft(step, str(tmp_path / "adapter"))
    assert not (tmp_path / "adapter").exists()


def test_export_peft_of_bart_leaves_its_buffer_to_the_base(tmp_path):
    """BART's final_logits_bias is a buffer, never trained: export_peft refused BART as
    'trained weights outside the adapters' before."""
    source = with_lora(bart(seed=1), target_modules=["q_proj", "v_proj"])
    mgr = CheckpointManager(str(tmp_path / "run"))
    step = mgr.save(1, source)
    mgr.close()
    assert "final_logits_bias" in mgr.manifest(1).adapters.buffers
    out = export_peft(step, str(tmp_path / "adapter"))
    assert json.load(open(os.path.join(out, "adapter_config.json")))["modules_to_save"] is None
    loaded = peft.PeftModel.from_pretrained(bart(seed=1), out).eval()
    assert max_diff(seq2seq_logits(loaded), seq2seq_logits(source)) < 1e-5
