"""The library's own LoRA layers saved as a plain state dict (``torch.save``, a
nanoGPT-style dict, safetensors, ``dcp.save``) load back: into the same adapters exactly,
into any other target merged with the file's ``lora_alpha``, or, with alpha unknown,
refused with the model untouched (issue 30, part 5)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed.checkpoint as dcp

import tiny
from dcp_universal import CheckpointMismatchError, load_model
from dcp_universal.lora import apply_lora

ALPHA = tiny.VARIANTS["lora4"]["alpha"]
TARGETS = tiny.VARIANTS["lora4"]["targets"]


def _out(model) -> torch.Tensor:
    with torch.no_grad():
        return model(tiny.fixed_input())


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_equal_state(model, expected: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


def _lora_source(seed: int = 3) -> torch.nn.Module:
    """The tiny model with own LoRA (Linear and Embedding) and non-zero factors."""
    model = tiny.make("lora4", seed=seed)
    tiny.randomize_adapters(model, seed=seed + 100)
    return model


def _write(model, tmp_path, layout: str, **beside) -> str:
    """``model.state_dict()`` written as ``layout``; ``beside``: what a nanoGPT-style
    dict holds next to ``"model"``."""
    sd = model.state_dict()
    if layout == "bare":
        path = str(tmp_path / "weights.pt")
        torch.save(sd, path)
    elif layout == "nanogpt":
        path = str(tmp_path / "ckpt.pt")
        torch.save({"model": sd, "iter_num": 11, **beside}, path)
    elif layout == "safetensors":
        import safetensors.torch  # the dev extra installs it

        path = str(tmp_path / "hf")
        os.makedirs(path)
        safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()},
                                    os.path.join(path, "model.safetensors"))
    else:
        path = str(tmp_path / "dcp")
        dcp.save(sd, checkpoint_id=path)
    return path


# ---- into the same adapters: exact -----------------------------------------------------

@pytest.mark.parametrize("layout", ["bare", "nanogpt", "safetensors", "dcp"])
def test_same_adapters_take_every_tensor_exactly(tmp_path, layout):
    src = _lora_source()
    path = _write(src, tmp_path, layout, model_args={"lora_alpha": ALPHA})
    target = tiny.make("lora4", seed=9)
    tiny.randomize_adapters(target, seed=7)
    report = load_model(target, path)
    _assert_equal_state(target, src.state_dict())
    assert torch.equal(_out(target), _out(src))
    assert any("restored the library's own LoRA factors of 7 layers" in n for n in report.notes)
    assert not report.fresh


def test_same_rank_without_alpha_takes_the_factors_under_the_models_alpha(tmp_path):
    src = _lora_source()
    report = load_model(target := tiny.make("lora4", seed=9), _write(src, tmp_path, "bare"))
    _assert_equal_state(target, src.state_dict())
    assert any("records no lora_alpha: the model's own alpha applies" in n for n in report.notes)


# ---- into other targets: merged with the file's alpha -----------------------------------

def _other_alpha(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return apply_lora(tiny.Tiny(), rank=4, alpha=2.0, targets=TARGETS)


@pytest.mark.parametrize("target", ["plain", "lora2", "lora8", "other_alpha"])
@pytest.mark.parametrize("where", ["model_args", "config"])
def test_other_targets_get_the_merged_weights(tmp_path, target, where):
    src = _lora_source()
    path = _write(src, tmp_path, "nanogpt", **{where: {"lora_alpha": ALPHA}})
    model = _other_alpha(9) if target == "other_alpha" else tiny.make(target, seed=9)
    report = load_model(model, path)
    torch.testing.assert_close(_out(model), _out(src), atol=1e-6, rtol=0)
    # the merged base is W + alpha / r * B @ A (Linear), W + alpha / r * A @ B (Embedding)
    s, scale = src.state_dict(), ALPHA / 4
    q = s["blocks.0.q.base_layer.weight"] + scale * s["blocks.0.q.lora_B.weight"] @ s["blocks.0.q.lora_A.weight"]
    wte = s["wte.base_layer.weight"] + scale * s["wte.lora_A"] @ s["wte.lora_B"]
    m = model.state_dict()
    torch.testing.assert_close(m.get("blocks.0.q.weight", m.get("blocks.0.q.base_layer.weight")), q,
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(m.get("wte.weight", m.get("wte.base_layer.weight")), wte,
                               atol=1e-6, rtol=0)
    assert any("merged the library's own LoRA factors of" in n for n in report.notes)


# ---- alpha unknown: refused, nothing loaded ---------------------------------------------

@pytest.mark.parametrize("layout", ["bare", "nanogpt", "safetensors", "dcp"])
@pytest.mark.parametrize("target", ["plain", "lora2"])
def test_merge_without_alpha_is_refused_and_the_model_untouched(tmp_path, layout, target):
    path = _write(_lora_source(), tmp_path, layout)  # nothing records alpha
    model = tiny.make(target, seed=9)
    before = _snapshot(model)
    with pytest.raises(CheckpointMismatchError) as e:
        load_model(model, path)
    msg = str(e.value)
    assert "own LoRA factors of" in msg and "rank 4" in msg
    assert "alpha is unknown: the file records no lora_alpha" in msg
    assert "nothing was loaded" in msg and "'lora_alpha': ALPHA" in msg
    _assert_equal_state(model, before)


# ---- a tiny transformers Llama with apply_lora --------------------------------------------

def _llama_with_lora(tied: bool, seed: int = 0):
    from hf_models import llama

    model = apply_lora(llama(tied=tied, seed=seed), rank=4, alpha=8.0,
                       targets=["q_proj", "v_proj", "down_proj", "embed_tokens"])
    tiny.randomize_adapters(model, seed=seed + 100)
    return model


def test_llama_same_adapters_exact_and_plain_merged(tmp_path):
    from hf_models import llama, logits, max_diff

    src = _llama_with_lora(tied=False)
    torch.save({"model": src.state_dict(), "config": {"lora_alpha": 8.0}}, tmp_path / "ckpt.pt")
    same = _llama_with_lora(tied=False, seed=5)
    load_model(same, str(tmp_path / "ckpt.pt"))
    _assert_equal_state(same, src.state_dict())
    assert torch.equal(logits(same), logits(src))
    plain = llama(tied=False, seed=5)
    load_model(plain, str(tmp_path / "ckpt.pt"))
    assert max_diff(logits(plain), logits(src)) < 1e-6


def test_llama_bare_file_into_plain_is_refused_untouched(tmp_path):
    from hf_models import llama

    torch.save(_llama_with_lora(tied=False).state_dict(), tmp_path / "w.pt")
    plain = llama(tied=False, seed=5)
    before = _snapshot(plain)
    with pytest.raises(CheckpointMismatchError, match="rank 4; ranks found: \\[4\\]"):
        load_model(plain, str(tmp_path / "w.pt"))
    _assert_equal_state(plain, before)


def test_llama_tied_embedding(tmp_path):
    from hf_models import llama, logits, max_diff

    src = _llama_with_lora(tied=True)
    assert src.lm_head.weight is src.model.embed_tokens.base_layer.weight  # apply_lora kept the tie
    torch.save({"model": src.state_dict(), "model_args": {"lora_alpha": 8.0}}, tmp_path / "ckpt.pt")
    # the same adapters: every tensor exactly, the tie kept
    same = _llama_with_lora(tied=True, seed=5)
    load_model(same, str(tmp_path / "ckpt.pt"))
    _assert_equal_state(same, src.state_dict())
    assert same.lm_head.weight is same.model.embed_tokens.base_layer.weight
    assert torch.equal(logits(same), logits(src))
    # a tied plain target cannot hold the merged embedding beside the unmerged head
    tied = llama(tied=True, seed=5)
    before = _snapshot(tied)
    with pytest.raises(CheckpointMismatchError, match="tie_word_embeddings=False"):
        load_model(tied, str(tmp_path / "ckpt.pt"))
    _assert_equal_state(tied, before)
    # an untied one computes the LoRA model's function
    untied = llama(tied=False, seed=5)
    load_model(untied, str(tmp_path / "ckpt.pt"))
    assert max_diff(logits(untied), logits(src)) < 1e-6
