"""Input formats are one registry: a format registered once is read the same way by
load_model (any target), export_hf, inspect and convert."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

import tiny
from dcp_universal import (CheckpointManager, NotACheckpointError, export_hf, load_model,
                           sources)
from dcp_universal.cli import main
from dcp_universal.storage import join, storage_for


class FlatFormat(sources.Format):
    """A toy format: ``index.json`` ({key: [shape, byte offset]}) and ``weights.bin``
    (float32, back to back), read through the storage's ranged reads."""

    name = "flat"
    looks_like = "a flat directory (index.json and weights.bin)"

    def detect(self, store, path):
        return store.exists(join(path, "index.json"))

    def open(self, store, path, want):
        index = json.loads(store.read_bytes(join(path, "index.json")))
        spans = [(off, math.prod(shape) * 4) for shape, off in index.values()]
        raws = store.read_spans(join(path, "weights.bin"), spans)
        tensors = {k: raw.view(torch.float32).reshape(shape)
                   for (k, (shape, _)), raw in zip(index.items(), raws)}
        return sources.Source.in_memory(path, tensors, notes=(f"read flat directory {path}",))


def _write_flat(state: dict[str, torch.Tensor], path: str) -> None:
    os.makedirs(path)
    index, blobs, off = {}, [], 0
    for k, t in state.items():
        data = t.detach().float().contiguous().numpy().tobytes()
        index[k] = [list(t.shape), off]
        blobs.append(data)
        off += len(data)
    with open(os.path.join(path, "weights.bin"), "wb") as f:
        f.write(b"".join(blobs))
    with open(os.path.join(path, "index.json"), "w") as f:
        json.dump(index, f)


@pytest.fixture
def flat():
    fmt = sources.register_format(FlatFormat(), before="hf")
    try:
        yield fmt
    finally:
        sources.unregister_format(fmt)


def _out(model):
    with torch.no_grad():
        return model(tiny.fixed_input())


def test_the_registry_asks_formats_in_order_and_names_them_all_when_none_fits(flat, tmp_path):
    names = [f.name for f in sources.registered_formats()]
    assert names == ["legacy", "step", "dcp", "accelerate", "peft_adapter", "flat", "hf"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotACheckpointError, match="index.json and weights.bin") as e:
        load_model(tiny.make("plain"), str(tmp_path / "empty"))
    assert "committed step" in str(e.value) and "Hugging Face" in str(e.value)
    with pytest.raises(ValueError, match="already registered"):
        sources.register_format(type("Other", (FlatFormat,), {})())


def test_a_registered_format_is_read_by_every_reader(flat, tmp_path, capsys):
    src = tiny.make("plain", seed=3)
    path = str(tmp_path / "flat")
    _write_flat(src.state_dict(), path)

    plain = tiny.make("plain", seed=4)
    report = load_model(plain, path)
    assert sorted(report.loaded) == sorted(src.state_dict())
    assert f"read flat directory {path}" in report.notes
    torch.testing.assert_close(_out(plain), _out(src), atol=0, rtol=0)
    lora = tiny.make("lora4", seed=5)  # base <- the weights, adapters fresh
    report = load_model(lora, path)
    assert report.remapped and report.fresh
    torch.testing.assert_close(_out(lora), _out(src), atol=1e-6, rtol=0)

    with pytest.raises(ValueError, match="prefix='app.model.'.*a flat directory"):
        load_model(tiny.make("plain"), path, prefix="app.model.")

    assert main(["inspect", path]) == 0
    out = capsys.readouterr().out
    for key, t in src.state_dict().items():
        line = next(l for l in out.splitlines() if l.startswith(key + " "))
        assert line.split()[1:] == ["x".join(map(str, t.shape)), "float32", str(t.numel() * 4)]

    hf = export_hf(path, str(tmp_path / "hf"))
    plain = tiny.make("plain", seed=6)
    load_model(plain, hf)
    torch.testing.assert_close(_out(plain), _out(src), atol=0, rtol=0)

    assert main(["convert", path, str(tmp_path / "root"), "--step", "5"]) == 0
    mgr = CheckpointManager(str(tmp_path / "root"))
    assert mgr.steps() == [5]
    mgr.verify(5)
    plain = tiny.make("plain", seed=7)
    mgr.load(plain)
    torch.testing.assert_close(_out(plain), _out(src), atol=0, rtol=0)


def test_a_truncated_span_is_an_integrity_error_on_every_storage(tmp_path):
    from dcp_universal import IntegrityError

    path = str(tmp_path / "f.bin")
    with open(path, "wb") as f:
        f.write(b"x" * 10)
    store = storage_for(path)
    assert bytes(store.read_spans(path, [(2, 4)])[0].numpy()) == b"xxxx"
    with pytest.raises(IntegrityError, match="truncated"):
        store.read_spans(path, [(8, 4)])
    url = "memory://spans/f.bin"
    mem = storage_for(url)
    mem.write_atomic(url, b"y" * 10)
    try:
        assert bytes(mem.read_spans(url, [(2, 4)])[0].numpy()) == b"yyyy"
        with pytest.raises(IntegrityError, match="truncated"):
            mem.read_spans(url, [(8, 4)])
    finally:
        mem.remove_tree("memory://spans")


def test_factor_rules_are_a_registry_like_kinds_and_formats():
    """Issue 32: one registry shape. A rule registered twice (its module imported twice)
    is one rule, asked in order after the built-in ones; another object under a taken
    name is refused."""
    from dcp_universal._registry import Registry, name_of
    from dcp_universal.sources import dcp as dcp_format

    def toy_rule(store, source, target):
        return source

    before = dcp_format._FACTOR_RULES.names()
    try:
        assert dcp_format.register_factor_rule(toy_rule) is toy_rule
        dcp_format.register_factor_rule(toy_rule)
        names = dcp_format._FACTOR_RULES.names()
        assert names == before + [name_of(toy_rule)]
        assert dcp_format._FACTOR_RULES.named(name_of(toy_rule)) is toy_rule
    finally:
        dcp_format._FACTOR_RULES.remove(toy_rule)
    assert dcp_format._FACTOR_RULES.names() == before

    class Kind:
        def __init__(self, name):
            self.name = name

    reg: Registry = Registry("a toy")
    first = reg.add(Kind("a"))
    assert reg.add(Kind("a")) is first  # the same class again: a no-op

    class Other:
        name = "a"

    with pytest.raises(ValueError, match="a toy named 'a' is already registered"):
        reg.add(Other())
