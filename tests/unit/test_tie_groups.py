"""Tie groups: every name bound to one parameter (T5 and BART tie four: shared, the
encoder's and decoder's embed_tokens, lm_head) is recorded wherever a model is saved,
every member is checked on load and export, and a refusal names the members that differ
and a fix that works for the architecture."""

from __future__ import annotations

import json
import os

import pytest
import torch

from hf_models import (bart, config_of, llama, logits, max_diff, peft, qwen2, seq2seq_logits, t5,
                       transformers, with_lora)
from dcp_universal import (CheckpointManager, CheckpointMismatchError, ManifestError, export_hf,
                           export_peft, load_model, save_model)
from dcp_universal.format import manifest

T5_GROUP = ["decoder.embed_tokens.weight", "encoder.embed_tokens.weight", "lm_head.weight",
            "shared.weight"]


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _untouched(model, state) -> bool:
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def _recorded(path) -> list[list[str]]:
    with open(os.path.join(path, manifest.MODEL_INFO)) as f:
        return json.load(f)["ties"]


def test_save_model_records_every_tie_group(tmp_path):
    save_model(t5(), str(tmp_path / "t5"))
    assert _recorded(tmp_path / "t5") == [T5_GROUP]
    save_model(llama(tied=False), str(tmp_path / "untied"))
    assert _recorded(tmp_path / "untied") == []  # known: no ties (not unknown)


def test_a_t5_merge_into_one_tied_name_is_refused_naming_the_members(tmp_path):
    """LoRA on T5's ``shared``: the merged directory holds W + update for shared.weight and
    W for the three others. transformers binds all four to one tensor whatever the config
    says, so no merged export computes the trained model: the refusal says so and names
    export_peft, which does (PEFT's own merge_and_unload is off by ~3.5 here)."""
    source = with_lora(t5(), target_modules=["q", "v", "shared"])
    ref = seq2seq_logits(source)
    save_model(source, str(tmp_path / "m"))
    assert _recorded(tmp_path / "m") == [T5_GROUP]
    cfg = config_of(source)

    with pytest.raises(CheckpointMismatchError) as e:
        export_hf(str(tmp_path / "m"), str(tmp_path / "hf"), config=cfg)
    msg = str(e.value)
    assert ("2 different values for them (decoder.embed_tokens.weight, "
            "encoder.embed_tokens.weight, lm_head.weight | shared.weight)") in msg
    assert "T5ForConditionalGeneration ties these names whatever tie_word_embeddings says" in msg
    assert "export_peft" in msg
    assert not (tmp_path / "hf").exists() or not os.listdir(tmp_path / "hf")
    with pytest.raises(CheckpointMismatchError):  # untying in the config changes nothing for T5
        export_hf(str(tmp_path / "m"), str(tmp_path / "hf"),
                  config={**cfg, "tie_word_embeddings": False})

    target = t5(seed=3)
    before = _state(target)
    with pytest.raises(CheckpointMismatchError) as e:
        load_model(target, str(tmp_path / "m"))
    assert "other values for 'shared.weight' than for 'decoder.embed_tokens.weight', " \
           "'encoder.embed_tokens.weight', 'lm_head.weight'" in str(e.value)
    assert _untouched(target, before)

    # the fix the refusal names, checked against the trained model
    step = CheckpointManager(str(tmp_path / "run")).save(1, source)
    out = export_peft(step, str(tmp_path / "adapter"))
    loaded = peft.PeftModel.from_pretrained(t5(), out).eval()
    assert max_diff(seq2seq_logits(loaded), ref) < 1e-5


def test_a_bart_merge_exports_untied_where_bart_can_untie(tmp_path):
    """BART unties all four names with tie_word_embeddings=false: the refusal says so,
    and the untied export computes the trained model (before: 12.5 off)."""
    source = with_lora(bart(seed=1), target_modules=["q_proj", "v_proj", "shared"])
    ref = seq2seq_logits(source)
    step = CheckpointManager(str(tmp_path / "run")).save(1, source)
    cfg = config_of(source)
    with pytest.raises(CheckpointMismatchError,
                       match=r"model.shared.weight\).*set \"tie_word_embeddings\": false"):
        export_hf(step, str(tmp_path / "hf"), config=cfg)
    out = export_hf(step, str(tmp_path / "hf"), config={**cfg, "tie_word_embeddings": False})
    loaded = transformers.BartForConditionalGeneration.from_pretrained(out).eval()
    assert max_diff(seq2seq_logits(loaded), ref) < 1e-5


def test_an_equal_tie_group_exports_once_and_loads_tied(tmp_path):
    source = with_lora(t5(seed=2), target_modules=["q", "v"])
    ref = seq2seq_logits(source)
    save_model(source, str(tmp_path / "m"))
    out = export_hf(str(tmp_path / "m"), str(tmp_path / "hf"), config=config_of(source))
    loaded = transformers.T5ForConditionalGeneration.from_pretrained(out).eval()
    assert loaded.lm_head.weight is loaded.shared.weight
    assert max_diff(seq2seq_logits(loaded), ref) < 1e-5
    target = t5(seed=5)
    report = load_model(target, str(tmp_path / "m"))
    assert any(n.startswith("tied: " + " = ".join(T5_GROUP)) for n in report.notes)
    assert max_diff(seq2seq_logits(target), ref) < 1e-5


def test_qwen2_tied_embedding_adapter(tmp_path):
    """Qwen2 ties its head to the embedding: LoRA on embed_tokens resumes exactly into the
    same adapters, is refused by a tied target naming the pair, loads into an untied one."""
    source = with_lora(qwen2(), target_modules=["q_proj", "embed_tokens"])
    ref = logits(source)
    mgr = CheckpointManager(str(tmp_path / "run"))
    mgr.save(1, source)
    same = with_lora(qwen2(seed=4), target_modules=["q_proj", "embed_tokens"], seed=9)
    mgr.load(same)
    assert max_diff(logits(same), ref) == 0.0
    tied = qwen2(seed=4)
    before = _state(tied)
    with pytest.raises(CheckpointMismatchError, match="'lm_head.weight', 'model.embed_tokens.weight'"):
        mgr.load(tied)
    assert _untouched(tied, before)
    cfg = config_of(source)
    with pytest.raises(CheckpointMismatchError, match="tie_word_embeddings\": false"):
        export_hf(mgr.step_path(1), str(tmp_path / "hf"), config=cfg)
    out = export_hf(mgr.step_path(1), str(tmp_path / "hf"),
                    config={**cfg, "tie_word_embeddings": False})
    loaded = transformers.Qwen2ForCausalLM.from_pretrained(out).eval()
    assert max_diff(logits(loaded), ref) < 1e-5


def test_a_directory_without_a_record_is_still_checked_by_transformers(tmp_path):
    """A model directory written before tie groups were recorded (or by plain DCP): the
    config's architecture, built on the meta device, says which names transformers ties."""
    source = with_lora(t5(), target_modules=["q", "shared"])
    save_model(source, str(tmp_path / "m"))
    os.remove(tmp_path / "m" / manifest.MODEL_INFO)
    with pytest.raises(CheckpointMismatchError, match="shared.weight\\)"):
        export_hf(str(tmp_path / "m"), str(tmp_path / "hf"), config=config_of(source))


def test_a_damaged_tie_record_is_refused(tmp_path):
    save_model(llama(tied=True), str(tmp_path / "m"))
    (tmp_path / "m" / manifest.MODEL_INFO).write_text('{"format_version": 1, "ties": "x"}')
    with pytest.raises(ManifestError, match="ties: expected a list of lists of names"):
        load_model(llama(tied=True), str(tmp_path / "m"))


@pytest.mark.parametrize("build,targets", [(qwen2, ["q_proj", "embed_tokens"]),
                                           (t5, ["q", "embed_tokens"])])
def test_a_tied_adapter_resumes_into_a_larger_rank_and_is_refused_into_a_smaller(
        tmp_path, build, targets):
    """Another LoRA rank merges the saved adapters into the base, which a tied embedding
    cannot hold. The tied adapter is carried instead: its factors padded with zeros and
    rescaled to the target's alpha add the same update (exact); the other adapters merge.
    A smaller rank cannot hold the update: refused, untouched."""
    out = seq2seq_logits if build is t5 else logits
    source = with_lora(build(), target_modules=targets)
    ref = out(source)
    mgr = CheckpointManager(str(tmp_path / "run"))
    mgr.save(1, source)
    bigger = with_lora(build(seed=6), target_modules=targets, r=8, lora_alpha=32, seed=7)
    report = mgr.load(bigger)
    assert max_diff(out(bigger), ref) < 1e-5
    assert any(n.startswith("carried the adapter of ") and "(rank 4) into the target's rank 8" in n
               for n in report.notes), report.notes
    smaller = with_lora(build(seed=6), target_modules=targets, r=2, seed=7)
    before = _state(smaller)
    with pytest.raises(CheckpointMismatchError, match="into one tensor"):
        mgr.load(smaller)
    assert _untouched(smaller, before)
