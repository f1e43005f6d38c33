"""The seeds' torch.save formats load directly into any configuration."""

from __future__ import annotations

import pytest
import torch

import tiny
from dcp_universal import CheckpointError, load_model


def _out(model):
    with torch.no_grad():
        return model(tiny.fixed_input())


def _seed_lora_state(model, alpha):
    """model's weights in the seeds' LoRA layout, with non-zero adapters on q and wte
    whose merge reproduces model's own weights."""
    sd = {f"_orig_mod.{k}": v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    w = sd.pop("_orig_mod.blocks.0.q.weight")
    a, b = torch.randn(4, w.shape[1], generator=g), torch.randn(w.shape[0], 4, generator=g)
    sd["_orig_mod.blocks.0.q.main_weight.weight"] = w - alpha / 4 * b @ a
    sd["_orig_mod.blocks.0.q.main_weight.bias"] = sd.pop("_orig_mod.blocks.0.q.bias")
    sd["_orig_mod.blocks.0.q.lora_A.weight"], sd["_orig_mod.blocks.0.q.lora_B.weight"] = a, b
    e = sd.pop("_orig_mod.wte.weight")  # Embedding: A (num, r), B (dim, r)
    ea, eb = torch.randn(e.shape[0], 2, generator=g), torch.randn(e.shape[1], 2, generator=g)
    sd["_orig_mod.wte.main_weight.weight"] = e - alpha / 2 * ea @ eb.T
    sd["_orig_mod.wte.lora_A.weight"], sd["_orig_mod.wte.lora_B.weight"] = ea, eb
    return sd


@pytest.mark.parametrize("target", ["plain", "lora4", "lora2"])
def test_nanogpt_ckpt_with_compile_prefix_and_seed_lora_layout(tmp_path, target):
    src = tiny.make("plain", seed=3)
    ref = _out(src)
    torch.save({"model": _seed_lora_state(src, alpha=2.0), "optimizer": {"state": {}, "param_groups": []},
                "model_args": {"lora_alpha": 2.0, "n_layer": 2}, "iter_num": 7,
                "best_val_loss": 1.25, "config": {"lr": 1e-3}}, tmp_path / "ckpt.pt")
    model = tiny.make(target, seed=9)
    report = load_model(model, str(tmp_path / "ckpt.pt"))
    torch.testing.assert_close(_out(model), ref, atol=1e-5, rtol=0)
    assert any("merged main_weight-layout LoRA into 2 weights" in n for n in report.notes)


@pytest.mark.parametrize("layout", ["model_state_dict", "state_dict", "bare", "separated"])
def test_state_dict_layouts(tmp_path, layout):
    src = tiny.make("plain", seed=3)
    sd = src.state_dict()
    if layout == "bare":
        path = tmp_path / "weights.pt"
        torch.save(sd, path)
    elif layout == "separated":
        path = tmp_path / "checkpoint-step001000-optimizer.pt"  # either file of the pair
        torch.save({"model_state_dict": sd, "global_step": 1000}, tmp_path / "checkpoint-step001000-model.pt")
        torch.save({"optimizer_states": [{"state": {}, "param_groups": []}], "global_step": 1000}, path)
    else:
        path = tmp_path / "ckpt.pt"
        torch.save({layout: sd, "global_step": 3}, path)
    model = tiny.make("lora4", seed=9)
    load_model(model, str(path))
    torch.testing.assert_close(_out(model), _out(src), atol=1e-5, rtol=0)


def test_bad_legacy_files_raise_checkpoint_errors(tmp_path):
    src = tiny.make("plain")
    torch.save({"model": src.state_dict()}, tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    target = tiny.make("plain", seed=5)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError, match="truncated or damaged"):
        load_model(target, str(tmp_path / "trunc.pt"))
    torch.save({"weights": [1, 2]}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="has no model state"):
        load_model(target, str(tmp_path / "odd.pt"))
    sd = _seed_lora_state(src, alpha=2.0)
    torch.save({"model": sd}, tmp_path / "noalpha.pt")
    with pytest.raises(CheckpointError, match="no lora_alpha"):
        load_model(target, str(tmp_path / "noalpha.pt"))
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


def test_convert_writes_a_committed_step_every_loader_reads(tmp_path, capsys):
    from dcp_universal import CheckpointManager
    from dcp_universal.cli import main

    src = tiny.make("plain", seed=3)
    torch.save({"model": _seed_lora_state(src, alpha=2.0), "model_args": {"lora_alpha": 2.0},
                "iter_num": 250, "best_val_loss": torch.tensor(1.5), "config": {"lr": 1e-3}},
               tmp_path / "ckpt.pt")
    assert main(["convert", str(tmp_path / "ckpt.pt"), str(tmp_path / "root")]) == 0
    size = (tmp_path / "ckpt.pt").stat().st_size
    assert f": {size:,} bytes ({size / 1e3:.1f} kB) in " in capsys.readouterr().out  # bytes, time, rate
    mgr = CheckpointManager(str(tmp_path / "root"))
    assert mgr.steps() == [250]
    manifest = mgr.manifest(250)
    assert manifest.legacy["meta"]["iter_num"] == 250 and not manifest.items["optimizer"]
    mgr.verify(250)
    model = tiny.make("lora2", seed=9)
    mgr.load(model)
    torch.testing.assert_close(_out(model), _out(src), atol=1e-5, rtol=0)
    assert main(["convert", str(tmp_path / "ckpt.pt"), str(tmp_path / "root")]) == 2
    err = capsys.readouterr().err
    assert "already exists under" in err and "pass another --step N" in err, err
    from dcp_universal import StepAlreadyExistsError
    from dcp_universal.training.commit import convert
    with pytest.raises(StepAlreadyExistsError, match=r"pass another step=N \(CLI: --step N\)"):
        convert(str(tmp_path / "ckpt.pt"), str(tmp_path / "root"))
