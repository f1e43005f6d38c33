"""Key resolution for DCP checkpoints written by other tools (pure functions)."""

from __future__ import annotations

import pytest

from dcp_universal import CheckpointMismatchError
from dcp_universal.sources.foreign import canonical_key, resolve
from dcp_universal.interop.peft import peft_factors

TARGET = {"wte.weight", "blocks.0.q.weight", "head.weight"}


def test_canonical_key_strips_wrappers_and_peft_infixes():
    assert canonical_key("_orig_mod.module.blocks.0.q.weight") == "blocks.0.q.weight"
    assert canonical_key("module._orig_mod.blocks.0.q.weight") == "blocks.0.q.weight"
    assert canonical_key("base_model.model.blocks.0.q.base_layer.weight") == "blocks.0.q.weight"
    assert canonical_key("base_model.model.head.modules_to_save.default.weight") == "head.weight"
    assert canonical_key("base_model.model.head.original_module.weight") is None
    assert canonical_key("blocks.0.q.lora_A.default.weight") == "blocks.0.q.lora_A.default.weight"


def test_own_keys_are_taken_as_they_are():
    # a user module really named "module": the string rules must not touch it
    keys = {"module.weight", "wte.weight"}
    r = resolve(keys, [], set(keys), prefix=None, desc="ck")
    assert r.raw_of == {"module.weight": "module.weight", "wte.weight": "wte.weight"}
    assert r.prefix == "" and not r.notes


def test_nested_prefix_is_found_and_other_state_listed():
    keys = [f"app.model.{k}" for k in TARGET] + ["app.optim.state.wte.weight.exp_avg"]
    r = resolve(keys, ["app.optim.param_groups"], TARGET, prefix=None, desc="ck")
    assert r.prefix == "app.model."
    assert r.raw_of["head.weight"] == "app.model.head.weight"
    assert r.other == ["app.optim.state.wte.weight.exp_avg", "app.optim.param_groups"]
    assert any("every model key is present" in n for n in r.notes)
    assert any("app.optim (2 keys)" in n for n in r.notes)


def test_partial_coverage_says_so():
    keys = ["model.wte.weight", "model.head.weight"]
    r = resolve(keys, [], TARGET, prefix=None, desc="ck")
    assert r.prefix == "model."
    assert any("2 of 3 model keys" in n for n in r.notes)


def test_training_state_names_are_other_state_unless_the_model_has_them():
    keys = list(TARGET) + ["optimizer.state.x", "lr_scheduler.last_epoch"]
    r = resolve(keys, ["train_state"], TARGET, prefix=None, desc="ck")
    assert set(r.raw_of) == TARGET
    assert sorted(r.other) == ["lr_scheduler.last_epoch", "optimizer.state.x", "train_state"]
    target = TARGET | {"optimizer.state.x"}  # a model with a submodule named "optimizer"
    r = resolve(keys, [], target, prefix=None, desc="ck")
    assert "optimizer.state.x" in r.raw_of


def test_given_prefix_must_exist():
    with pytest.raises(CheckpointMismatchError, match="top-level names are \\['app'\\]"):
        resolve(["app.model.wte.weight"], [], TARGET, prefix="model", desc="ck")


def test_peft_factors_pairs_and_user_modules_named_lora():
    keys = ["q.lora_A.default.weight", "q.lora_B.default.weight", "wte.lora_embedding_A.default",
            "wte.lora_embedding_B.default", "mlp.lora_proj.weight"]
    found = peft_factors(keys)
    assert [(f.site, f.embedding) for f in found] == [("q", False), ("wte", True)]
    with pytest.raises(CheckpointMismatchError, match="without its pair"):
        peft_factors(["q.lora_A.default.weight"])
