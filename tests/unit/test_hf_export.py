"""export_hf and `dcp-universal export --format hf`, with transformers' from_pretrained
and safetensors as the real readers (tiny configs, no hub)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from hf_models import llama, logits, max_diff, transformers, with_lora
from dcp_universal import CheckpointManager, CheckpointMismatchError, export_hf, save_model
from dcp_universal.cli import main as cli

safetensors = pytest.importorskip("safetensors.torch")


def _load(out, **kw):
    return transformers.LlamaForCausalLM.from_pretrained(str(out), **kw).eval()


@pytest.mark.parametrize("tied", [False, True])
def test_model_dir_exports_sharded_and_loads_with_transformers(tmp_path, tied):
    src = llama(tied=tied, seed=1)
    ref = logits(src)
    save_model(src, str(tmp_path / "m"))
    export_hf(str(tmp_path / "m"), str(tmp_path / "hf"), config=src.config.to_dict(),
              max_shard_size=4000)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    src.save_pretrained(str(tmp_path / "ref"))  # the names transformers itself writes
    with safetensors.safe_open(str(tmp_path / "ref" / "model.safetensors"), "pt") as f:
        assert set(index["weight_map"]) == set(f.keys())
    assert ("lm_head.weight" in index["weight_map"]) == (not tied)
    on_disk = {}
    for f in files:
        part = safetensors.load_file(str(tmp_path / "hf" / f))
        assert os.path.getsize(tmp_path / "hf" / f) <= 4000 + 1024 or len(part) == 1
        on_disk.update(part)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in on_disk.values())
    for k, v in src.state_dict().items():
        assert torch.equal(on_disk[k], v) if k in on_disk else (tied and k == "lm_head.weight"), k
    loaded = _load(tmp_path / "hf")
    assert max_diff(logits(loaded), ref) == 0.0
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied


def test_bf16_export_is_the_rounded_weights(tmp_path):
    src = llama(tied=False, seed=1)
    ref = logits(src)
    save_model(src, str(tmp_path / "m"))
    export_hf(str(tmp_path / "m"), str(tmp_path / "bf"), dtype="bfloat16",
              config=src.config.to_dict())
    on_disk = safetensors.load_file(str(tmp_path / "bf" / "model.safetensors"))
    assert not (tmp_path / "bf" / "model.safetensors.index.json").exists()  # one file
    for k, v in src.state_dict().items():
        assert torch.equal(on_disk[k], v.to(torch.bfloat16)), k
    rounded = logits(_load(tmp_path / "bf", dtype=torch.bfloat16))
    assert max_diff(rounded, logits(src.to(torch.bfloat16))) == 0.0
    assert max_diff(rounded, ref) < 0.05


def test_lora_step_without_model_is_merged_on_export(tmp_path):
    src = with_lora(llama(tied=False, seed=1), target_modules=["q_proj", "v_proj", "embed_tokens"])
    ref = logits(src)
    mgr = CheckpointManager(str(tmp_path / "ck"))
    step = mgr.save(3, src)
    assert not mgr.manifest(3).has("model")
    (tmp_path / "config.json").write_text(src.get_base_model().config.to_json_string())
    rc = cli(["export", step, str(tmp_path / "hf"), "--format", "hf",
              "--config", str(tmp_path / "config.json")])
    assert rc == 0
    assert max_diff(logits(_load(tmp_path / "hf")), ref) < 1e-4


def test_tied_config_refuses_a_merge_that_untied_the_pair(tmp_path):
    src = with_lora(llama(tied=True, seed=1), target_modules=["q_proj", "lm_head"])
    ref = logits(src)
    step = CheckpointManager(str(tmp_path / "ck")).save(1, src)
    cfg = src.get_base_model().config.to_dict()
    with pytest.raises(CheckpointMismatchError, match="tie_word_embeddings"):
        export_hf(step, str(tmp_path / "hf"), config=cfg)
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    export_hf(step, str(tmp_path / "hf"), config={**cfg, "tie_word_embeddings": False})
    loaded = _load(tmp_path / "hf")
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    assert max_diff(logits(loaded), ref) < 1e-4


def test_tied_config_refuses_a_model_that_never_tied(tmp_path):
    """A model directory records no ties: lm_head.weight must equal a tensor of its shape."""
    untied = llama(tied=False, seed=1)
    save_model(untied, str(tmp_path / "m"))
    with pytest.raises(CheckpointMismatchError, match=r"2 different values for them \(lm_head.weight \| model.embed_tokens.weight\).*tie_word_embeddings"):
        export_hf(str(tmp_path / "m"), str(tmp_path / "hf"),
                  config={**untied.config.to_dict(), "tie_word_embeddings": True})
    assert not (tmp_path / "hf").exists() or not os.listdir(tmp_path / "hf")


def test_export_bad_arguments(tmp_path):
    save_model(llama(tied=False), str(tmp_path / "m"))
    with pytest.raises(ValueError, match="max_shard_size"):
        export_hf(str(tmp_path / "m"), str(tmp_path / "o"), max_shard_size="lots")
    with pytest.raises(ValueError, match="dtype"):
        export_hf(str(tmp_path / "m"), str(tmp_path / "o"), dtype="float7")
    # a model directory has no adapters to export
    assert cli(["export", str(tmp_path / "m"), str(tmp_path / "o"), "--format", "peft"]) == 2


@pytest.mark.parametrize("tied", [False, True])
def test_hf_directory_loads_into_plain_and_lora_models(tmp_path, tied):
    from dcp_universal import load_model

    src = llama(tied=tied, seed=1)
    ref = logits(src)
    src.save_pretrained(str(tmp_path / "hf"), max_shard_size="5KB")  # sharded, with index
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    plain = llama(tied=tied, seed=2)
    report = load_model(plain, str(tmp_path / "hf"))
    assert max_diff(logits(plain), ref) == 0.0
    assert any(n.startswith("read Hugging Face safetensors") for n in report.notes)
    if tied:  # transformers stores the tied pair once
        assert any("stores model.embed_tokens.weight once" in n for n in report.notes)
        assert plain.lm_head.weight is plain.model.embed_tokens.weight
    lora = with_lora(llama(tied=tied, seed=2), target_modules=["q_proj", "v_proj"])
    report = load_model(lora, str(tmp_path / "hf"))
    assert report.fresh and max_diff(logits(lora), ref) == 0.0


def test_export_and_verify_report_bytes_time_and_throughput(tmp_path, capsys):
    src = llama(tied=False, seed=1)
    step = CheckpointManager(str(tmp_path / "ck")).save(1, src)
    seen = []
    export_hf(step, str(tmp_path / "hf"), max_shard_size=4000, progress=seen.append)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(seen) > 2 and sum(seen) == index["metadata"]["total_size"]
    assert cli(["export", step, str(tmp_path / "hf2"), "--format", "hf", "--quiet"]) == 0
    out = capsys.readouterr().out
    total = sum(t.numel() * t.element_size() for t in src.state_dict().values())
    assert f"{total:,} bytes ({total / 1e3:.1f} kB) in " in out and " MB/s)" in out
    assert cli(["verify", step, "--quiet"]) == 0
    assert "MB/s" in capsys.readouterr().out


def test_progress_bar_only_on_a_terminal(monkeypatch, capsys):
    from dcp_universal.cli.progress import Progress

    p = Progress(100, "x")  # pytest's stderr is not a terminal: no bar
    p(60)
    p(40)
    assert p._bar is None and p.close().startswith("100 bytes (100 B) in ")
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    p = Progress(None, "x")
    p.set_total(2_000_000)  # learnt once the source is open: a percentage and a time left
    p(1_000_000)
    assert p._bar is not None and p._bar.n == 1_000_000 and p._bar.total == 2_000_000
    shown = str(p._bar)
    assert "50%" in shown and "1.00M/2.00M" in shown and "<" in shown, shown  # decimal units, ETA
    p.close()
    assert Progress(100, "x", enabled=False)._bar is None


def test_export_to_s3_and_load_back(tmp_path, s3):
    from dcp_universal import load_model
    from s3server import fresh_prefix

    root, options = s3
    src = llama(tied=False, seed=1)
    ref = logits(src)
    save_model(src, str(tmp_path / "m"))
    url = f"{fresh_prefix(root)}/hf"
    export_hf(str(tmp_path / "m"), url, max_shard_size=4000, storage_options=options,
              config=src.config.to_dict())
    target = llama(tied=False, seed=2)
    report = load_model(target, url, storage_options=options)
    assert max_diff(logits(target), ref) == 0.0
    assert any(n.startswith("read Hugging Face safetensors s3://") for n in report.notes)


def test_errors_of_damaged_indexes_and_adapter_only_sources_are_specific(tmp_path):
    """Issue 32: specific classes instead of a bare CheckpointError."""
    import json

    import tiny
    from dcp_universal import IntegrityError, NotACheckpointError, load_model
    from dcp_universal.training.commit import convert

    d = tmp_path / "hf"
    d.mkdir()
    (d / "model.safetensors.index.json").write_text("{not json")
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(IntegrityError, match="is not a safetensors index"):
        load_model(tiny.make("plain"), str(d))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["a"]}))
    with pytest.raises(IntegrityError, match="weight_map is not an object"):
        load_model(tiny.make("plain"), str(d))

    peft_dir = tmp_path / "adapter"
    peft_dir.mkdir()
    (peft_dir / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4}))
    from safetensors.torch import save_file
    save_file({"base_model.model.q.lora_A.weight": torch.zeros(2, 8),
               "base_model.model.q.lora_B.weight": torch.zeros(8, 2)},
              str(peft_dir / "adapter_model.safetensors"))
    with pytest.raises(NotACheckpointError, match="adapter without base weights"):
        export_hf(str(peft_dir), str(tmp_path / "out"))
    with pytest.raises(NotACheckpointError, match="adapter without base weights"):
        convert(str(peft_dir), str(tmp_path / "root"))
