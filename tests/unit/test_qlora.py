"""QLoRA: PEFT LoRA on bitsandbytes 4-bit bases (NF4 / FP4, double quantization on and
off), as ``from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True))``
and ``get_peft_model`` build it, on CPU.

* a step's base holds the packed bytes and the quantization state; a resume into the
  same QLoRA model is bit-exact (state dict, optimizer, logits);
* everything universal (``save_model``, a step loaded into a plain model, ``export_hf``)
  is the dequantized base plus the merged update, in the compute dtype;
* a 4-bit target quantized another way, or a float checkpoint into a 4-bit target, is
  refused with the model untouched.

bitsandbytes' CPU inference path repacks 4-bit weights in place on CPUs with
AVX512-BF16 (an eval forward without grad); the models here turn it off, as the
library's error asks (:func:`test_repacked_weights_are_refused`).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")  # the dev extra installs it

from hf_models import (VOCAB, max_diff, qlora_llama, transformers, with_lora,  # noqa: E402
                       write_tiny_llama)
from dcp_universal import (CheckpointError, CheckpointManager,  # noqa: E402
                           CheckpointMismatchError, UnsupportedAdapterError, export_hf,
                           load_model, save_model)

ATOL = 1e-5
TARGETS = ["q_proj", "v_proj", "down_proj"]
QUANTS = [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)]
IDS = [f"{t}-{'dq' if d else 'nodq'}" for t, d in QUANTS]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def qlora(llama_dir, quant_type="nf4", double_quant=True, *, seed=1,
          compute_dtype=torch.float32, targets=TARGETS):
    return qlora_llama(llama_dir, quant_type, double_quant, seed=seed,
                       compute_dtype=compute_dtype, targets=targets)


def plain_llama(llama_dir, seed=5):
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():  # nothing of the base survives by accident
            p.add_(torch.randn_like(p))
    return model.eval()


def tokens():
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def logits(model):
    return model(tokens()).logits.float()


def _train(model, steps=2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for i in range(steps):
        x = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(i))
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_state(got: dict, want: dict):
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def _expected_weights(model) -> dict[str, torch.Tensor]:
    """Canonical name -> dequant(W) + scale * B @ A of every 4-bit Linear, as PEFT
    computes them (``dequantize_module_weight``, ``get_delta_weight``)."""
    from peft.utils.integrations import dequantize_module_weight
    out = {}
    for name, m in model.base_model.model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit) and not name.endswith("base_layer"):
            out[f"{name}.weight"] = dequantize_module_weight(m)
    for name, m in model.base_model.model.named_modules():
        if type(m).__name__ == "Linear4bit" and type(m).__module__.startswith("peft"):
            base = dequantize_module_weight(m.base_layer)
            out[f"{name}.weight"] = base + m.get_delta_weight("default")
    return out


@pytest.mark.parametrize("quant_type,double_quant", QUANTS, ids=IDS)
def test_qlora_resumes_exactly(tmp_path, llama_dir, quant_type, double_quant):
    src = qlora(llama_dir, quant_type, double_quant)
    opt = _train(src)
    mgr = CheckpointManager(str(tmp_path / "run"))
    mgr.save(1, src, opt)
    mgr.save(2, src, opt)
    bases = [n for n in os.listdir(tmp_path / "run") if n.startswith("base-")]
    assert len(bases) == 1  # the 4-bit base is stored once
    m = json.loads((tmp_path / "run" / "step-00000002" / "manifest.json").read_text())
    q = m["quantized"]["model.layers.0.self_attn.q_proj.weight"]
    assert m["format_version"] == 3  # a reader of version 2 refuses it, never half-reads it
    assert (q["quant_type"], q["double_quant"], q["compute_dtype"]) == (
        quant_type, double_quant, "float32")

    dst = qlora(llama_dir, quant_type, double_quant, seed=9)
    opt2 = torch.optim.AdamW([p for p in dst.parameters() if p.requires_grad], lr=1e-2)
    report = mgr.load(dst, opt2)
    assert any("4-bit weights" in n for n in report.notes)
    _assert_same_state(dst.state_dict(), src.state_dict())
    assert torch.equal(logits(dst), logits(src))
    want, got = opt.state_dict(), opt2.state_dict()
    for i, s in want["state"].items():
        for k, v in s.items():
            assert torch.equal(got["state"][i][k], v), (i, k)
    # training goes on identically
    _train(src, 1), _train(dst, 1)
    assert torch.equal(logits(dst), logits(src))


@pytest.mark.parametrize("quant_type,double_quant", QUANTS, ids=IDS)
def test_universal_model_is_the_dequantized_base_plus_the_update(
        tmp_path, llama_dir, quant_type, double_quant):
    src = qlora(llama_dir, quant_type, double_quant)
    want = _expected_weights(src)
    save_model(src, str(tmp_path / "m"))
    plain = plain_llama(llama_dir)
    load_model(plain, str(tmp_path / "m"))
    got = plain.state_dict()
    assert len(want) == 7
    for k, w in want.items():
        torch.testing.assert_close(got[k], w, atol=1e-6, rtol=0, msg=k)
    assert max_diff(logits(plain), logits(src)) < ATOL
    # a step (no merged model/) into a plain model composes the same weights
    mgr = CheckpointManager(str(tmp_path / "run"))
    mgr.save(1, src)
    plain2 = plain_llama(llama_dir)
    mgr.load(plain2)
    _assert_same_state(plain2.state_dict(), got)
    # and a step with a merged model/ too
    mgr.save(2, src, merged=True)
    plain3 = plain_llama(llama_dir)
    mgr.load(plain3, step=2)
    _assert_same_state(plain3.state_dict(), got)


def test_step_into_the_same_adapters_on_a_float_base(tmp_path, llama_dir):
    """The same LoRA on an unquantized Llama: the base is served dequantized, the
    adapters restored exactly."""
    src = qlora(llama_dir)
    mgr = CheckpointManager(str(tmp_path / "run"))
    mgr.save(1, src)
    dst = with_lora(plain_llama(llama_dir), seed=4, target_modules=TARGETS)
    mgr.load(dst)
    adapters = {k: v for k, v in src.state_dict().items() if "lora_" in k}
    got = dst.state_dict()
    for k, v in adapters.items():
        assert torch.equal(got[k], v), k
    assert max_diff(logits(dst), logits(src)) < ATOL


def test_export_hf_loads_with_from_pretrained(tmp_path, llama_dir):
    src = qlora(llama_dir)
    mgr = CheckpointManager(str(tmp_path / "run"))
    mgr.save(1, src)
    out = str(tmp_path / "hf")
    export_hf(str(tmp_path / "run" / "step-00000001"), out,
              config=os.path.join(llama_dir, "config.json"))
    assert "quantization_config" not in json.loads((tmp_path / "hf" / "config.json").read_text())
    exported = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert exported.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    assert max_diff(logits(exported), logits(src)) < ATOL


def test_universal_weights_are_in_the_compute_dtype(tmp_path, llama_dir):
    src = qlora(llama_dir, compute_dtype=torch.bfloat16)
    save_model(src, str(tmp_path / "m"))
    plain = plain_llama(llama_dir).to(torch.bfloat16)
    load_model(plain, str(tmp_path / "m"))
    # the base as the layer computes with it (dequantized, in bfloat16), plus the update
    # added in float32, rounded once
    from peft.utils.integrations import dequantize_module_weight
    layer = src.base_model.model.model.layers[0].self_attn.q_proj
    base = dequantize_module_weight(layer.base_layer).to(torch.bfloat16)
    want = (base.float() + layer.get_delta_weight("default").float()).to(torch.bfloat16)
    got = plain.model.layers[0].self_attn.q_proj.weight
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    k_proj = plain.model.layers[0].self_attn.k_proj.weight  # no adapter: the base alone
    assert torch.equal(k_proj, dequantize_module_weight(
        src.base_model.model.model.layers[0].self_attn.k_proj).to(torch.bfloat16))


@pytest.mark.parametrize("other,differs", [
    (dict(quant_type="fp4"), "quant_type nf4 vs fp4"),
    (dict(double_quant=False), "double_quant True vs False"),
    (dict(compute_dtype=torch.bfloat16), "compute_dtype float32 vs bfloat16"),
], ids=["quant-type", "double-quant", "compute-dtype"])
def test_other_quantization_is_refused_untouched(tmp_path, llama_dir, other, differs):
    src = qlora(llama_dir)
    mgr = CheckpointManager(str(tmp_path / "run"))
    mgr.save(1, src)
    dst = qlora(llama_dir, **other, seed=9)
    before = _state(dst)
    with pytest.raises(CheckpointMismatchError, match="quantized otherwise") as e:
        mgr.load(dst)
    assert differs in str(e.value) and "not quantized" in str(e.value)
    _assert_same_state(dst.state_dict(), before)


def test_float_weights_into_a_4bit_target_are_refused_untouched(tmp_path, llama_dir):
    src = qlora(llama_dir)
    save_model(src, str(tmp_path / "m"))
    mgr = CheckpointManager(str(tmp_path / "run"))
    mgr.save(1, src)
    for path, why in ((str(tmp_path / "m"), "as a float32"),
                      (str(tmp_path / "run" / "step-00000001"), "adapters differ")):
        dst = qlora(llama_dir, seed=9, targets=["q_proj"])  # other adapters: a merge
        before = _state(dst)
        with pytest.raises(CheckpointMismatchError, match="quantize it again") as e:
            load_model(dst, path)
        assert why in str(e.value)
        _assert_same_state(dst.state_dict(), before)


@pytest.mark.skipif(not bnb.functional.has_avx512bf16(),
                    reason="bitsandbytes repacks 4-bit weights only on CPUs with AVX512-BF16")
def test_repacked_weights_are_refused(tmp_path, llama_dir):
    src = qlora(llama_dir)
    for m in src.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = True
    logits(src)  # eval, no grad: bitsandbytes rewrites the weights in place
    with pytest.raises(CheckpointError, match="support_avx512bf16_for_cpu"):
        save_model(src, str(tmp_path / "m"))


def test_8bit_layers_are_refused(tmp_path):
    model = torch.nn.Sequential(bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False))
    with pytest.raises(UnsupportedAdapterError, match="8-bit"):
        save_model(model, str(tmp_path / "m"))
