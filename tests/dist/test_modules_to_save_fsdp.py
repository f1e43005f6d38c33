"""PEFT ``modules_to_save`` originals on 2 gloo ranks with FSDP2 (issue 30, part 5): a
sharded run that starts from a Hugging Face directory gets the pretrained head as its
frozen original, saves it with the base, and resumes it exactly, on 2 ranks and in one
process; ``disable_adapter()`` computes the pretrained model throughout."""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import harness
from hf_models import bert_classifier, tokens, with_lora
from dcp_universal import CheckpointManager

TARGETS = ["query", "value"]


def _peft(seed: int, lora_seed: int):
    return with_lora(bert_classifier(seed=seed), target_modules=TARGETS,
                     modules_to_save=["classifier"], seed=lora_seed)


@torch.no_grad()
def _outputs(model) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, logits with the adapters and the trained head off)."""
    x = tokens()
    out = model(x).logits
    with model.disable_adapter():
        return out, model(x).logits


def _job(rank, world_size, root, hf_dir):
    model = _peft(seed=5 + rank, lora_seed=9)  # every rank's fresh original differs
    mesh = init_device_mesh("cpu", (world_size,))
    for layer in model.base_model.model.bert.encoder.layer:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the head's wrapper sits in the root group
    mgr = CheckpointManager(root)
    if hf_dir is not None:
        report = mgr.load(model, init_from=hf_dir)
        assert any("originals" in n for n in report.notes), report.notes
        started = _outputs(model)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for i in range(2):
            model((tokens() + i) % 61, labels=torch.tensor([i % 3, rank])).loss.backward()
            opt.step()
            opt.zero_grad()
        model.eval()
        mgr.save(2, model)
        return started, _outputs(model)
    report = mgr.load(model)
    assert any("exactly" in n for n in report.notes), report.notes
    return _outputs(model)


def test_sharded_run_keeps_the_pretrained_head_as_its_original(tmp_path):
    pretrained = bert_classifier()
    want = pretrained(tokens()).logits.detach()
    pretrained.save_pretrained(str(tmp_path / "hf"))
    root = str(tmp_path / "ck")

    saved = harness.run(_job, 2, root, str(tmp_path / "hf"))
    for (_, started_off), (_, off) in saved:
        assert torch.equal(started_off, want)  # filled from the pretrained head
        assert torch.equal(off, want)          # training left it frozen
    trained = saved[0][1][0]
    assert not torch.allclose(trained, want)

    for out, off in harness.run(_job, 2, root, None):
        assert torch.equal(out, trained) and torch.equal(off, want)

    one = _peft(seed=7, lora_seed=10)
    CheckpointManager(root).load(one)  # resharded into one process
    out, off = _outputs(one)
    torch.testing.assert_close(out, trained, atol=1e-6, rtol=0)
    torch.testing.assert_close(off, want, atol=1e-6, rtol=0)
