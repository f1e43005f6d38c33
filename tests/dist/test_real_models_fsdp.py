"""Real clients on 2 gloo ranks with FSDP2: tied Llama (the tied pair in the root group)
with PEFT LoRA resumes exactly; GPT-2's Conv1D LoRA merges on sharded input dimensions;
a tied target refuses a checkpoint whose tied names differ, on every rank; a torchtitan
layout written by sharded plain DCP loads into one process."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import harness
import tiny
from hf_models import gpt2, llama, logits, max_diff, tokens, with_lora
from dcp_universal import CheckpointManager, CheckpointMismatchError, load_model, save_model
from dcp_universal.model.view import reshard

ATOL = 1e-5


def _shard(model, layers, world_size):
    mesh = init_device_mesh("cpu", (world_size,))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the tied embedding / head pair sits in the root group
    return model


def _tied_lora(world_size):
    model = with_lora(llama(tied=True), target_modules=["q_proj", "v_proj"]).train()
    _shard(model, model.base_model.model.model.layers, world_size)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, opt


def _step(model, opt, i, rank):
    x = (tokens(2, 6) + i + 3 * rank) % 61
    loss = model(x, labels=x).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.detach().clone()


def _tied_run(rank, world_size, root, resume):
    model, opt = _tied_lora(world_size)
    mgr = CheckpointManager(root)
    if resume:
        report = mgr.load(model, opt)
        assert any("exactly" in n for n in report.notes), report.notes
        start = 2
    else:
        for i in range(2):
            _step(model, opt, i, rank)
        mgr.save(2, model, opt)
        start = 2
    return [_step(model, opt, i, rank) for i in range(start, 5)]


def test_tied_llama_peft_lora_under_fsdp2_resumes_exactly(tmp_path):
    root = str(tmp_path / "ck")
    full = harness.run(_tied_run, 2, root, False)
    resumed = harness.run(_tied_run, 2, root, True)
    for a, b in zip(full, resumed):
        assert all(torch.equal(x, y) for x, y in zip(a, b)), (a, b)
    assert CheckpointManager(root).manifest(2).ties == [["lm_head.weight",
                                                          "model.embed_tokens.weight"]]


def _gpt2_and_tied(rank, world_size, root):
    targets = ["c_attn", "c_proj", "c_fc"]
    src = with_lora(gpt2(), target_modules=targets, fan_in_fan_out=True)
    _shard(src, src.base_model.model.transformer.h, world_size)
    save_model(src, f"{root}/gpt2")
    save_model(src, f"{root}/gpt2-rank0", merge="rank0")

    tied_src = with_lora(llama(tied=True), target_modules=["q_proj", "lm_head"])
    _shard(tied_src, tied_src.base_model.model.model.layers, world_size)
    save_model(tied_src, f"{root}/tied-lora")
    target = llama(tied=True, seed=3)
    _shard(target, target.model.layers, world_size)
    before = {k: v.full_tensor().clone() for k, v in target.state_dict().items()}
    try:
        load_model(target, f"{root}/tied-lora")
        raised = ""
    except CheckpointMismatchError as e:
        raised = str(e)
    untouched = all(torch.equal(v.full_tensor(), before[k]) for k, v in target.state_dict().items())
    # into another rank: the adapter on the tied head is carried (padded), not merged
    with CheckpointManager(f"{root}/tied-run") as mgr:
        mgr.save(1, tied_src)
        bigger = with_lora(llama(tied=True, seed=3), target_modules=["q_proj", "lm_head"],
                           r=8, lora_alpha=16, seed=5)
        _shard(bigger, bigger.base_model.model.model.layers, world_size)
        notes = mgr.load(bigger).notes
    carried = (logits(bigger), [n for n in notes if n.startswith("carried")])

    plain = llama(tied=False, seed=1)
    _shard(plain, plain.model.layers, world_size)
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-3)
    x = tokens()  # the same batch on both ranks
    plain(x, labels=x).loss.backward()
    opt.step()
    ref = logits(plain)
    reshard(plain)  # FSDP2's root stays unsharded after a forward
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    osd = get_optimizer_state_dict(plain, opt, options=StateDictOptions(flatten_optimizer_state_dict=True))
    dcp.save({**plain.state_dict(), "optimizer": osd, "train_state": {"step": 1}},
             checkpoint_id=f"{root}/titan")
    return raised, untouched, ref, carried


def test_gpt2_conv1d_and_tied_targets_and_titan_layout_under_fsdp2(tmp_path):
    root = str(tmp_path)
    raised, untouched, titan_ref, (carried, notes) = harness.run(_gpt2_and_tied, 2, root)[0]
    assert "tie_word_embeddings=False" in raised
    assert untouched
    tied_ref = logits(with_lora(llama(tied=True), target_modules=["q_proj", "lm_head"]))
    assert max_diff(carried, tied_ref) < ATOL
    assert notes == ["carried the adapter of lm_head (rank 4) into the target's rank 8, adding "
                     "the same update: its base is tied to other names, so it was not merged"]

    targets = ["c_attn", "c_proj", "c_fc"]
    ref_model = with_lora(gpt2(), target_modules=targets, fan_in_fan_out=True)
    ref = logits(ref_model)
    expected = ref_model.merge_and_unload().state_dict()
    for name in ("gpt2", "gpt2-rank0"):
        saved = tiny.read_dir(f"{root}/{name}")
        for k, v in expected.items():
            torch.testing.assert_close(saved[k], v, atol=1e-6, rtol=0)
        plain = gpt2(seed=9)
        load_model(plain, f"{root}/{name}")
        assert max_diff(logits(plain), ref) < ATOL

    target = llama(tied=False, seed=4)
    report = load_model(target, f"{root}/titan")
    assert max_diff(logits(target), titan_ref) == 0.0
    assert any(n.startswith("other state") and "optimizer" in n for n in report.notes)


def _export_job(rank, world_size, root):
    from dcp_universal import export_hf

    model = with_lora(llama(tied=False), target_modules=["q_proj", "v_proj"])
    _shard(model, model.base_model.model.model.layers, world_size)
    step = CheckpointManager(root).save(1, model)
    # every rank writes its own shards (i % world_size); rank 0 the index and config
    export_hf(step, f"{root}/hf", max_shard_size=4000,
              config=model.get_base_model().config.to_dict())
    return sorted(os.listdir(f"{root}/hf"))


def test_two_ranks_export_a_sharded_lora_step_in_parallel(tmp_path):
    from hf_models import transformers

    listing = harness.run(_export_job, 2, str(tmp_path))
    assert listing[0] == listing[1] and "model.safetensors.index.json" in listing[0]
    assert len([f for f in listing[0] if f.endswith(".safetensors")]) > 2
    ref = logits(with_lora(llama(tied=False), target_modules=["q_proj", "v_proj"]))
    loaded = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert max_diff(logits(loaded), ref) < 1e-4


def _start_from_hf(rank, world_size, hf_dir):
    from dcp_universal import apply_lora

    own = apply_lora(llama(tied=True, seed=5), rank=4, alpha=8.0, targets=["q_proj", "v_proj"])
    peft_model = with_lora(llama(tied=True, seed=5), target_modules=["q_proj", "lm_head"])
    out = []
    for model, layers in ((own, own.model.layers), (peft_model, peft_model.base_model.model.model.layers)):
        _shard(model, layers, world_size)
        report = load_model(model, hf_dir)
        out.append((logits(model), sorted(report.fresh)))
    return out


def test_a_sharded_lora_run_starts_from_an_hf_directory(tmp_path):
    src = llama(tied=True, seed=1)
    ref = logits(src)
    src.save_pretrained(str(tmp_path / "hf"), max_shard_size="5KB")
    for rank_out in harness.run(_start_from_hf, 2, str(tmp_path / "hf")):
        for out, fresh in rank_out:
            assert fresh  # the adapters start at a zero update
            assert max_diff(out, ref) < ATOL


def _from_hf_on_s3(rank, world_size, url, options):
    from dcp_universal import apply_lora

    model = apply_lora(llama(tied=True, seed=5), rank=4, alpha=8.0, targets=["q_proj"])
    _shard(model, model.model.layers, world_size)
    report = load_model(model, url, storage_options=options)
    return logits(model), report.notes


def test_hf_directory_on_s3_loads_on_two_ranks(tmp_path, s3):
    import fsspec

    from s3server import fresh_prefix

    root, options = s3
    src = llama(tied=True, seed=1)
    ref = logits(src)
    src.save_pretrained(str(tmp_path / "hf"), max_shard_size="5KB")
    url = f"{fresh_prefix(root)}/hf"
    fs = fsspec.filesystem("s3", **options)
    fs.put(str(tmp_path / "hf") + "/", url.removeprefix("s3://") + "/", recursive=True)
    for out, notes in harness.run(_from_hf_on_s3, 2, url, options):
        assert max_diff(out, ref) < ATOL
        assert any(n.startswith("read Hugging Face safetensors s3://") for n in notes)


def _export_fails_on_rank1(rank, world_size, root):
    from unittest import mock

    from dcp_universal import CheckpointError, export_hf
    from dcp_universal.interop import hf

    model = llama(tied=False)
    save_model(model, f"{root}/m")
    real = hf._write_shard

    def flaky(*args, **kwargs):
        if rank == 1:
            raise OSError("disk full (simulated)")
        return real(*args, **kwargs)

    with mock.patch.object(hf, "_write_shard", flaky):
        try:
            export_hf(f"{root}/m", f"{root}/hf", max_shard_size=4000)
        except (OSError, CheckpointError) as e:
            return type(e).__name__, str(e)
    return None


def test_export_failure_on_one_rank_raises_on_every_rank(tmp_path):
    outcomes = harness.run(_export_fails_on_rank1, 2, str(tmp_path))
    assert outcomes[1] == ("OSError", "disk full (simulated)")
    assert outcomes[0][0] == "CheckpointIOError" and "another rank" in outcomes[0][1]
    assert not (tmp_path / "hf" / "model.safetensors.index.json").exists()
