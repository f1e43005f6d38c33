"""A new backend is its core methods alone: a toy store over a dict, implementing only
what :class:`~dcp_universal.storage.Storage` leaves abstract, serves saves and loads
(DCP's generic reader and writer, with every file's checksums), the local tier, the
Hugging Face export and the CLI."""

from __future__ import annotations

import io
import os
import threading

import pytest
import torch

import tiny
from dcp_universal import CheckpointManager, export_hf, load_model, storage
from dcp_universal.cli import main
from dcp_universal.storage.steps import read_manifest
from dcp_universal.storage import Storage, storage_for
from dcp_universal.storage.dcp_store import StoreReader, StoreWriter
from train_loop import Data, build, train


class ToyMem(Storage):
    """``toymem://<key>`` in one dict shared by every instance; nothing but the core."""

    files: dict[str, bytes] = {}
    lock = threading.Lock()

    def _below(self, path: str) -> list[str]:
        prefix = path.rstrip("/") + "/"
        return [k for k in self.files if k.startswith(prefix)]

    def exists(self, path: str) -> bool:
        return path in self.files or bool(self._below(path))

    def size(self, path: str) -> int:
        try:
            return len(self.files[path])
        except KeyError:
            raise FileNotFoundError(path) from None

    def listdir(self, path: str) -> list[str]:
        n = len(path.rstrip("/")) + 1
        return sorted({k[n:].split("/", 1)[0] for k in self._below(path)})

    def open_read(self, path: str):
        try:
            return io.BytesIO(self.files[path])
        except KeyError:
            raise FileNotFoundError(path) from None

    def write_atomic(self, path: str, data: bytes) -> None:
        self.files[path] = bytes(data)

    def create_new(self, path: str, data: bytes) -> bool:
        with self.lock:
            if path in self.files:
                return False
            self.files[path] = bytes(data)
            return True

    def remove_file(self, path: str) -> None:
        self.files.pop(path, None)


@pytest.fixture
def toymem():
    storage.register_backend("toymem", ToyMem)
    ToyMem.files.clear()
    try:
        yield ToyMem.files
    finally:
        storage.unregister_backend("toymem")
        ToyMem.files.clear()


def _out(model):
    with torch.no_grad():
        return model(tiny.fixed_input())


def _trained(kind="lora4"):
    torch.manual_seed(0)
    model, opt, sched = build(kind, "none", 1)
    if kind != "plain":
        tiny.randomize_adapters(model, seed=3)
    train(model, opt, sched, Data(0), {"step": 0}, 2)
    return model, opt


def _assert_same_optimizer(a, b):
    for key, state in a.state_dict()["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(b.state_dict()["state"][key][name], state[name],
                                       atol=0, rtol=0)


def test_the_core_is_seven_methods():
    assert sorted(Storage.__abstractmethods__) == sorted(
        ["exists", "size", "listdir", "open_read", "write_atomic", "create_new", "remove_file"])
    assert not ToyMem.__abstractmethods__


def test_the_defaults_on_the_core(toymem):
    store = storage_for("toymem://d", {})
    assert isinstance(store, ToyMem)
    store.makedirs("toymem://d")  # nothing to make
    store.write_atomic("toymem://d/a", b"0123456789")
    store.upload(__file__, "toymem://d/sub/me.py")
    assert store.is_file("toymem://d/a") and not store.is_file("toymem://d/sub")
    assert store.read_bytes("toymem://d/a") == b"0123456789"
    assert [bytes(t.numpy()) for t in store.read_spans("toymem://d/a", [(2, 3), (8, 2)])] \
        == [b"234", b"89"]
    with pytest.raises(Exception, match="truncated"):
        store.read_spans("toymem://d/a", [(8, 5)])
    assert store.file_sizes("toymem://d") == {"a": 10, "sub/me.py": os.path.getsize(__file__)}
    assert store.create_new("toymem://d/n", b"x") and not store.create_new("toymem://d/n", b"y")
    store.remove_tree("toymem://d")
    assert not store.exists("toymem://d") and store.file_sizes("toymem://d") == {}
    assert isinstance(store.dcp_writer("toymem://d/m"), StoreWriter)
    assert isinstance(store.dcp_reader("toymem://d/m"), StoreReader)


def test_manager_save_and_load_with_records_and_block_sums(toymem):
    model, opt = _trained()
    mgr = CheckpointManager("toymem://run", keep_last=1)
    mgr.save(1, model, opt)
    mgr.save(2, model, opt, merged=True)
    mgr.wait()
    assert mgr.steps() == [2]
    assert not any(k.startswith("toymem://run/step-00000001/") for k in toymem)
    step = "toymem://run/step-00000002"
    manifest = read_manifest(storage_for(step, {}), step)
    stored = storage_for(step, {}).file_sizes(step)
    for rel, rec in manifest.files.items():  # every file recorded, with its block sums
        assert stored[rel] == rec.size, rel
        assert rec.sums is not None or rec.sidecar is not None, rel
    assert any(rel.endswith(".distcp") for rel in manifest.files)

    target, topt, _ = build("lora4", "none", 1, seed=5)
    report = CheckpointManager("toymem://run").load(target, topt)
    assert report.optimizer_restored
    torch.testing.assert_close(_out(target), _out(model), atol=1e-5, rtol=0)
    _assert_same_optimizer(opt, topt)
    assert CheckpointManager("toymem://run").verify(2)["files"] >= len(manifest.files)  # and its base

    plain = tiny.make("plain", seed=9)  # a merged model, read by the generic reader
    load_model(plain, f"{step}/model")
    torch.testing.assert_close(_out(plain), _out(model), atol=1e-5, rtol=0)


def test_a_damaged_byte_is_found_by_the_generic_reader(toymem):
    model, opt = _trained("plain")
    CheckpointManager("toymem://run").save(1, model, opt)
    name = next(k for k in toymem if k.endswith(".distcp") and "/model/" in k)
    data = bytearray(toymem[name])
    data[len(data) // 2] ^= 0xFF
    toymem[name] = bytes(data)
    target = tiny.make("plain", seed=4)
    with pytest.raises(Exception, match="(?i)checksum|damaged"):
        CheckpointManager("toymem://run").load(target)


def test_local_tier_uploads_to_it(toymem, tmp_path):
    model, opt = _trained()
    local = str(tmp_path / "local")
    with CheckpointManager("toymem://run", local_dir=local) as mgr:
        mgr.save(3, model, opt)
    assert any(k.startswith("toymem://run/step-00000003/") for k in toymem)
    assert "toymem://run/step-00000003/manifest.json" in toymem

    target, topt, _ = build("lora4", "none", 1, seed=6)  # from the store alone
    CheckpointManager("toymem://run").load(target, topt)
    torch.testing.assert_close(_out(target), _out(model), atol=1e-5, rtol=0)
    _assert_same_optimizer(opt, topt)


def test_export_hf_from_it_and_the_cli(toymem, tmp_path, capsys):
    model, opt = _trained()
    CheckpointManager("toymem://run").save(4, model, opt, merged=True)
    out = export_hf("toymem://run/step-00000004", str(tmp_path / "hf"))
    plain = tiny.make("plain", seed=11)
    load_model(plain, out)
    torch.testing.assert_close(_out(plain), _out(model), atol=1e-5, rtol=0)

    assert main(["inspect", "toymem://run"]) == 0
    assert "4" in capsys.readouterr().out
    assert main(["inspect", "toymem://run/step-00000004/model"]) == 0
    assert "float32" in capsys.readouterr().out
    assert main(["verify", "toymem://run/step-00000004"]) == 0
    name = next(k for k in toymem if k.endswith(".distcp") and "/optimizer/" in k)
    toymem[name] = toymem[name][:-1] + bytes([toymem[name][-1] ^ 1])
    capsys.readouterr()
    assert main(["verify", "toymem://run/step-00000004"]) == 2
    assert "fails its checksum" in capsys.readouterr().err
