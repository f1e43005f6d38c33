"""PEFT ``modules_to_save`` originals (issue 30, part 5): the frozen copy of a wrapped
module, which ``disable_adapter()`` computes with (a DPO reference model), is stored with
the frozen base of a LoRA step and restored exactly; a load from a checkpoint that
stores none (a Hugging Face directory, a merged model, an older step) fills it from the
module's value there; a target without ``modules_to_save`` does not need it; merged
writes never hold it. Tiny BERT and ViT classifiers, random weights, one process.
Before this, resume and ``init_from`` left the original as the fresh model had it."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from safetensors.torch import load_file

import tiny
from hf_models import bert_classifier, peft, vit_classifier
from dcp_universal import CheckpointManager, export_hf, load_model, save_model
from dcp_universal.model.view import ModelView

HEAD = "classifier.original_module.weight"

_TARGETS = {"bert": ["query", "value"], "vit": ["q_proj", "v_proj"]}
_BUILD = {"bert": bert_classifier, "vit": vit_classifier}


def inputs(kind: str) -> dict:
    g = torch.Generator().manual_seed(7)
    if kind == "vit":
        return {"pixel_values": torch.randn(2, 3, 8, 8, generator=g)}
    return {"input_ids": torch.randint(0, 61, (2, 7), generator=g)}


def with_head(model, kind: str = "bert", *, seed: int = 1, modules_to_save=("classifier",)):
    """PEFT LoRA with the classifier head in ``modules_to_save``; adapters and the
    trained copy of the head random, so neither equals the original."""
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=_TARGETS[kind],
        modules_to_save=list(modules_to_save) or None))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


@torch.no_grad()
def logits(model, kind: str = "bert") -> torch.Tensor:
    return model(**inputs(kind)).logits


@torch.no_grad()
def disabled(model, kind: str = "bert") -> torch.Tensor:
    """The reference model's logits: adapters and trained head off."""
    with model.disable_adapter():
        return model(**inputs(kind)).logits


def _train(model, kind: str, steps: int = 2) -> None:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for i in range(steps):
        loss = model(**inputs(kind), labels=torch.tensor([i % 3, 1])).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def _wrapper(model):
    return model.base_model.model.classifier


def _base_keys(root: str, step: int) -> set[str]:
    m = CheckpointManager(root).manifest(step)
    return set(tiny.read_dir(os.path.join(root, m.base)))


def _hf_dir(model, path) -> str:
    model.save_pretrained(str(path))
    return str(path)


# ---- resume ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["bert", "vit"])
def test_resume_restores_the_trained_head_and_the_original_exactly(tmp_path, kind):
    src = with_head(_BUILD[kind](), kind)
    _train(src, kind)
    root = str(tmp_path / "ck")
    mgr = CheckpointManager(root)
    mgr.save(1, src)
    _train(src, kind, steps=1)
    mgr.save(2, src)

    dst = with_head(_BUILD[kind](seed=5), kind, seed=9)
    assert not torch.equal(disabled(dst, kind), disabled(src, kind))
    report = mgr.load(dst)
    assert torch.equal(logits(dst, kind), logits(src, kind))
    assert torch.equal(disabled(dst, kind), disabled(src, kind))
    assert torch.equal(_wrapper(dst).original_module.weight, _wrapper(src).original_module.weight)
    assert any("exactly" in n for n in report.notes), report.notes
    assert HEAD in report.loaded
    # stored once, with the frozen base, beside (not instead of) the trained copy
    assert mgr.manifest(1).base == mgr.manifest(2).base
    assert HEAD in _base_keys(root, 2)
    step = tiny.read_dir(os.path.join(root, "step-00000002", "adapters"))
    assert HEAD not in step and "classifier.weight" in step


def test_a_resumed_run_keeps_its_base(tmp_path):
    """The original is frozen: the next save after a resume reuses the base."""
    src = with_head(bert_classifier())
    mgr = CheckpointManager(str(tmp_path / "ck"))
    mgr.save(1, src)
    dst = with_head(bert_classifier(seed=5), seed=9)
    mgr.load(dst)
    _train(dst, "bert", steps=1)
    mgr.save(2, dst)
    assert mgr.manifest(2).base == mgr.manifest(1).base
    assert HEAD in _base_keys(str(tmp_path / "ck"), 2)


# ---- first start from a Hugging Face directory ----------------------------------------

def test_init_from_an_hf_directory_fills_the_original_with_the_pretrained_head(tmp_path):
    pretrained = bert_classifier()
    hf = _hf_dir(pretrained, tmp_path / "hf")
    want = logits(pretrained)

    fresh = with_head(bert_classifier(seed=5), seed=9)
    assert not torch.equal(disabled(fresh), want)
    root = str(tmp_path / "ck")
    report = CheckpointManager(root).load(fresh, init_from=hf)
    assert any("originals" in n and "filled" in n for n in report.notes), report.notes
    assert torch.equal(disabled(fresh), want)
    assert torch.equal(_wrapper(fresh).original_module.weight, pretrained.classifier.weight)

    # and the run that started so resumes with that original
    _train(fresh, "bert")
    CheckpointManager(root).save(1, fresh)
    again = with_head(bert_classifier(seed=6), seed=10)
    CheckpointManager(root).load(again)
    assert torch.equal(disabled(again), want)
    assert torch.equal(logits(again), logits(fresh))


def test_load_model_of_an_hf_directory_fills_the_original(tmp_path):
    pretrained = bert_classifier()
    hf = _hf_dir(pretrained, tmp_path / "hf")
    fresh = with_head(bert_classifier(seed=5), seed=9)
    report = load_model(fresh, hf)
    assert HEAD in report.loaded
    assert any("filled from their modules' values" in n for n in report.notes), report.notes
    assert torch.equal(disabled(fresh), logits(pretrained))


# ---- merged checkpoints and exports ----------------------------------------------------

def test_merged_writes_hold_the_trained_head_never_the_original(tmp_path):
    src = with_head(bert_classifier())
    root = str(tmp_path / "ck")
    CheckpointManager(root).save(1, src)
    assert HEAD in _base_keys(root, 1)
    plain = set(bert_classifier().state_dict())
    trained = _wrapper(src).modules_to_save["default"].weight

    save_model(src, str(tmp_path / "m"))
    saved = tiny.read_dir(str(tmp_path / "m"))
    assert set(saved) == plain
    assert torch.equal(saved["classifier.weight"], trained)

    out = export_hf(os.path.join(root, "step-00000001"), str(tmp_path / "hf"))
    exported = load_file(os.path.join(out, "model.safetensors"))
    assert set(exported) == plain - {"bert.embeddings.position_ids"}
    assert torch.equal(exported["classifier.weight"], trained)


def test_a_merged_model_fills_the_original_from_its_head(tmp_path):
    """A merged model holds one head, the trained one: the original is filled from it
    (said in the report), and the trained function is exact."""
    src = with_head(bert_classifier())
    save_model(src, str(tmp_path / "m"))
    dst = with_head(bert_classifier(seed=5), seed=9)
    report = load_model(dst, str(tmp_path / "m"))
    assert any("filled from their modules' values" in n for n in report.notes), report.notes
    assert torch.equal(_wrapper(dst).original_module.weight,
                       _wrapper(src).modules_to_save["default"].weight)
    torch.testing.assert_close(logits(dst), logits(src), atol=1e-6, rtol=0)


# ---- a step written before originals were stored ---------------------------------------

def _as_before(monkeypatch) -> None:
    """Views as the library built them before originals were stored: none."""
    of = ModelView.of.__func__

    def without_originals(cls, model):
        view = of(cls, model)
        return dataclasses.replace(view, originals={}, original_of={},
                                   frozen=view.frozen - set(view.originals))

    monkeypatch.setattr(ModelView, "of", classmethod(without_originals))


def test_an_older_step_loads_as_before_with_the_original_filled(tmp_path, monkeypatch):
    src = with_head(bert_classifier())
    root = str(tmp_path / "ck")
    with monkeypatch.context() as m:
        _as_before(m)
        CheckpointManager(root).save(1, src)
    assert HEAD not in _base_keys(root, 1)

    dst = with_head(bert_classifier(seed=5), seed=9)
    mgr = CheckpointManager(root)
    report = mgr.load(dst)
    assert any("exactly" in n for n in report.notes), report.notes
    assert any("filled from their modules' values" in n for n in report.notes), report.notes
    assert torch.equal(logits(dst), logits(src))
    head = _wrapper(src).modules_to_save["default"].weight
    assert torch.equal(_wrapper(dst).original_module.weight, head)

    # the next save does not reuse the old base (it lacks the original): it writes one
    # that holds it, and that step resumes the original exactly
    mgr.save(2, dst)
    assert mgr.manifest(2).base != mgr.manifest(1).base
    assert HEAD in _base_keys(root, 2)
    again = with_head(bert_classifier(seed=6), seed=10)
    mgr.load(again)
    assert torch.equal(disabled(again), disabled(dst))


# ---- targets without modules_to_save ---------------------------------------------------

def test_a_target_without_modules_to_save_does_not_need_the_originals(tmp_path):
    src = with_head(bert_classifier())
    want = logits(src)
    root = str(tmp_path / "ck")
    CheckpointManager(root).save(1, src)
    assert HEAD in _base_keys(root, 1)

    same_lora = with_head(bert_classifier(seed=5), seed=9, modules_to_save=())
    report = CheckpointManager(root).load(same_lora)  # strict: no mismatch
    assert not any("original_module" in k for k in report.loaded + report.dropped)
    assert torch.equal(logits(same_lora), want)

    for plain in (bert_classifier(seed=5),
                  with_head(bert_classifier(seed=5), seed=9, modules_to_save=())):
        load_model(plain, os.path.join(root, "step-00000001"))  # merged: other adapters
        torch.testing.assert_close(logits(plain), want, atol=1e-6, rtol=0)


def test_other_adapters_still_get_the_stored_original(tmp_path):
    """A target with other adapters takes merged weights (so its disabled adapters do
    not give the saved model's reference function: the saved update is in the base),
    and the original stored in the base, not a fill from the trained head."""
    src = with_head(bert_classifier())
    root = str(tmp_path / "ck")
    CheckpointManager(root).save(1, src)
    dst = peft.get_peft_model(bert_classifier(seed=5), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["query"], modules_to_save=["classifier"])).eval()
    report = CheckpointManager(root).load(dst)
    assert HEAD in report.loaded
    assert not any("filled" in n for n in report.notes), report.notes
    assert torch.equal(_wrapper(dst).original_module.weight, _wrapper(src).original_module.weight)
    torch.testing.assert_close(logits(dst), logits(src), atol=1e-6, rtol=0)
