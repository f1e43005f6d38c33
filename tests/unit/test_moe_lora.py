"""LoRA on mixture-of-experts parameters (PEFT ``target_parameters``, nested
``ParamWrapper`` when one module has two targets) on the fused experts of Qwen3-MoE,
Mixtral and GPT-OSS: merged as PEFT's ``merge_and_unload`` computes it (sharded and on
rank 0), resumed exactly, loaded into a plain model, exported to transformers and PEFT.
The distributed cases (expert parallelism) are in tests/dist/test_moe_lora_ep.py."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from hf_models import logits, max_diff
from moe_models import BOTH, BUILDERS, peft, transformers, with_expert_lora
from dcp_universal import CheckpointManager, export_hf, export_peft, load_model, save_model

ATOL = 1e-5


def _merged(model):
    return copy.deepcopy(model).merge_and_unload()


@pytest.mark.parametrize("arch", sorted(BUILDERS))
@pytest.mark.parametrize("params", [BOTH, ["mlp.experts.down_proj"]], ids=["both", "down"])
def test_expert_lora_merges_as_peft(tmp_path, arch, params):
    build = BUILDERS[arch]
    src = with_expert_lora(build(), params=params)
    expected = _merged(src)
    for mode in ("sharded", "rank0"):
        save_model(src, str(tmp_path / mode), merge=mode)
        plain = build(seed=9)
        load_model(plain, str(tmp_path / mode))
        got, want = plain.state_dict(), expected.state_dict()
        assert set(got) == set(want)
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0, msg=k)
        assert max_diff(logits(plain), logits(src)) < ATOL, mode


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_expert_lora_resumes_exactly_and_loads_merged(tmp_path, arch):
    build = BUILDERS[arch]
    src = with_expert_lora(build())
    opt = torch.optim.AdamW([p for p in src.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, 61, (2, 6), generator=torch.Generator().manual_seed(3))
    src.train()
    src(x, labels=x).loss.backward()
    opt.step()
    src.eval()
    mgr = CheckpointManager(str(tmp_path / "ck"))
    mgr.save(1, src, opt)
    m = json.loads((tmp_path / "ck" / "step-00000001" / "manifest.json").read_text())
    assert m["format_version"] == 3
    site = "model.layers.0.mlp.experts.gate_up_proj"
    assert m["adapters"]["layouts"][site] == "parameter"
    assert m["adapters"]["sites"][site][0]["experts"] == 4
    target = with_expert_lora(build(seed=4), seed=8)
    opt2 = torch.optim.AdamW([p for p in target.parameters() if p.requires_grad], lr=1e-2)
    report = mgr.load(target, opt2)
    assert not report.fresh and any("exactly" in n for n in report.notes)
    want = dict(src.named_parameters())
    for n, p in target.named_parameters():
        assert torch.equal(p, want[n]), n
    assert torch.equal(logits(target), logits(src))
    assert len(opt2.state) == len(opt.state)
    plain = build(seed=6)  # composed: base + adapters merged while loading
    mgr.load(plain)
    assert max_diff(logits(plain), logits(_merged(src))) < ATOL


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_expert_lora_exports_load_in_transformers_and_peft(tmp_path, arch):
    build = BUILDERS[arch]
    src = with_expert_lora(build())
    mgr = CheckpointManager(str(tmp_path / "ck"))
    mgr.save(1, src)
    step = str(tmp_path / "ck" / "step-00000001")
    config = {**src.get_base_model().config.to_dict(),
              "architectures": [type(src.get_base_model()).__name__]}
    export_hf(step, str(tmp_path / "hf"), config=config)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert max_diff(logits(hf), logits(src)) < ATOL
    export_peft(step, str(tmp_path / "peft"))
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert sorted(cfg["target_parameters"]) == [f"model.layers.{i}.{p}" for i in range(2)
                                                for p in sorted(BOTH)]
    loaded = peft.PeftModel.from_pretrained(build(), str(tmp_path / "peft")).eval()
    assert max_diff(logits(loaded), logits(src)) < ATOL
    mine = dict(src.named_parameters())
    for n, p in loaded.named_parameters():
        if "lora_" in n:
            assert torch.equal(p, mine[n]), n
