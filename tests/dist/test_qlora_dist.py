"""QLoRA under FSDP2 on 2 gloo ranks (CPU): ``fully_shard`` shards the packed 4-bit bytes
and leaves the quantization state out of the state dict (the layer keeps it); the
library stores both. A run resumes bit-exactly on FSDP2 and in one process, and the
merged model (``save_model``, a step's ``model/``) is the dequantized base plus the
update, loadable into a plain Llama."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor import DTensor

bnb = pytest.importorskip("bitsandbytes")

import harness  # noqa: E402
from hf_models import (VOCAB, fsdp_layers, logits, max_diff, qlora_llama,  # noqa: E402
                       transformers, write_tiny_llama)
from dcp_universal import CheckpointManager, load_model, save_model  # noqa: E402

ATOL = 1e-5



def _full_state(model) -> dict[str, torch.Tensor]:
    """The state dict a single process has: every tensor whole, with the 4-bit layers'
    quantization state (collective under FSDP2)."""
    out = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
           for k, v in model.state_dict().items()}
    for name, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            out.update({f"{name}.weight.{k}": v.clone()
                        for k, v in m.quant_state.as_dict(packed=True).items()})
    return out


def _optimizer(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def _step(model, opt, i):
    model.train()
    x = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(i))
    model(x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad()


def _optimizer_state(opt) -> dict:
    return {(i, k): (v.full_tensor() if isinstance(v, DTensor) else v).clone()
            for i, s in opt.state_dict()["state"].items() for k, v in s.items()}


def _run(rank, world, llama_dir, root):
    src = fsdp_layers(qlora_llama(llama_dir), world)
    opt = _optimizer(src)
    _step(src, opt, 0)
    with CheckpointManager(f"{root}/run") as mgr:
        mgr.save(1, src, opt, merged=True)
    save_model(src, f"{root}/merged")
    saved, saved_logits = _full_state(src), logits(src)

    dst = fsdp_layers(qlora_llama(llama_dir, seed=9), world)
    opt2 = _optimizer(dst)
    with CheckpointManager(f"{root}/run") as mgr:
        report = mgr.load(dst, opt2)
    restored, restored_logits = _full_state(dst), logits(dst)
    want, got = _optimizer_state(opt), _optimizer_state(opt2)
    same_optimizer = sorted(k for k in want if k not in got or not torch.equal(want[k], got[k]))
    _step(src, opt, 1), _step(dst, opt2, 1)
    go_on = torch.equal(logits(src), logits(dst))
    return (report.notes, saved, saved_logits, restored, restored_logits, same_optimizer,
            go_on) if rank == 0 else None


def test_qlora_under_fsdp2_resumes_exactly_and_merges(tmp_path):
    llama_dir = write_tiny_llama(tmp_path / "tiny")
    root = str(tmp_path)
    notes, saved, saved_logits, restored, restored_logits, same_optimizer, go_on = \
        harness.run(_run, 2, llama_dir, root)[0]
    assert any("4-bit weights" in n for n in notes), notes
    assert any(k.endswith("q_proj.base_layer.weight.absmax") for k in saved)
    assert saved.keys() == restored.keys()
    for k in saved:
        assert torch.equal(saved[k], restored[k]), k
    assert torch.equal(saved_logits, restored_logits)
    assert same_optimizer == [] and go_on

    # the FSDP2 step, resumed in one process: the same bytes, state and function
    one = qlora_llama(llama_dir, seed=9)
    with CheckpointManager(f"{root}/run") as mgr:
        mgr.load(one)
    got = one.state_dict()
    assert got.keys() == saved.keys()
    for k in saved:
        assert torch.equal(got[k], saved[k]), k
    assert max_diff(logits(one), saved_logits) < ATOL

    # merged while sharded: the dequantized base plus the update, in a plain Llama
    for path in (f"{root}/merged", f"{root}/run/step-00000001/model",
                 f"{root}/run/step-00000001"):
        plain = transformers.LlamaForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
        load_model(plain, path)
        assert max_diff(logits(plain.eval()), saved_logits) < ATOL, path
