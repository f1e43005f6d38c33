"""Storage is one protocol with an implementation per kind of root: a new backend is one
subclass plus its registration, and every part of the package (manager, model I/O,
exports, legacy files) then works on it."""

from __future__ import annotations

import ast
import os

import pytest
import torch

import tiny
from dcp_universal import CheckpointManager, export_hf, load_model, save_model, storage
from dcp_universal.storage import FsspecStorage, LocalStorage, storage_for
from train_loop import Data, build, train

PKG_DIR = os.path.dirname(os.path.dirname(storage.__file__))


class Mirror(LocalStorage):
    """A toy backend: ``mirror://x`` lives at ``options["base"]/x`` on the local disk,
    and every path it turned into a file name is counted."""

    calls = 0

    def os_path(self, path: str) -> str:
        assert path.startswith("mirror://"), path
        Mirror.calls += 1
        return os.path.join(self.options["base"], path.removeprefix("mirror://"))


@pytest.fixture
def mirror(tmp_path):
    storage.register_backend("mirror", Mirror)
    try:
        yield {"base": str(tmp_path / "disk")}
    finally:
        storage.unregister_backend("mirror")


def _out(model):
    with torch.no_grad():
        return model(tiny.fixed_input())


def test_the_storage_is_chosen_once_by_the_roots_scheme(mirror):
    assert type(storage_for("/a/b")) is LocalStorage
    assert type(storage_for("s3://bucket/run", {"anon": True})) is FsspecStorage
    assert type(storage_for("mirror://run", mirror)) is Mirror
    assert LocalStorage.maps_files and not FsspecStorage.maps_files
    with pytest.raises(ValueError, match="scheme"):
        storage.register_backend("a://", Mirror)
    storage.register_backend("mirror", Mirror)  # again (a module imported twice): one
    assert storage._BACKENDS.names().count("mirror") == 1
    with pytest.raises(ValueError, match="storage backend named 'mirror' is already"):
        storage.register_backend("mirror", LocalStorage)  # one registry shape (issue 32)
    storage.unregister_backend("s3")  # never registered: fsspec serves it as before
    assert type(storage_for("s3://bucket/run", {"anon": True})) is FsspecStorage


def test_a_registered_backend_serves_manager_model_io_and_export(mirror, tmp_path):
    torch.manual_seed(0)
    model, opt, sched = build("lora4", "none", 1)
    tiny.randomize_adapters(model, seed=3)
    train(model, opt, sched, Data(0), {"step": 0}, 2)
    before = Mirror.calls
    mgr = CheckpointManager("mirror://run", storage_options=mirror, keep_last=1)
    mgr.save(1, model, opt)
    mgr.save(2, model, opt, merged=True)
    mgr.wait()
    assert Mirror.calls > before
    disk = os.path.join(mirror["base"], "run")
    assert sorted(n for n in os.listdir(disk) if n.startswith("step-")) == ["step-00000002"]
    assert mgr.steps() == [2]

    target, topt, _ = build("lora4", "none", 1, seed=5)
    report = CheckpointManager("mirror://run", storage_options=mirror).load(target, topt)
    assert report.optimizer_restored
    torch.testing.assert_close(_out(target), _out(model), atol=1e-5, rtol=0)
    for key, state in opt.state_dict()["state"].items():
        torch.testing.assert_close(topt.state_dict()["state"][key]["exp_avg"], state["exp_avg"])

    save_model(model, "mirror://merged", storage_options=mirror)
    assert os.path.isfile(os.path.join(mirror["base"], "merged", ".metadata"))
    plain = tiny.make("plain", seed=9)
    load_model(plain, "mirror://merged", storage_options=mirror)
    torch.testing.assert_close(_out(plain), _out(model), atol=1e-5, rtol=0)

    out = export_hf("mirror://run/step-00000002", str(tmp_path / "hf"), storage_options=mirror)
    plain = tiny.make("plain", seed=11)
    load_model(plain, out)
    torch.testing.assert_close(_out(plain), _out(model), atol=1e-5, rtol=0)


def test_legacy_files_are_read_through_the_storage(mirror):
    model = tiny.make("plain", seed=1)
    os.makedirs(mirror["base"])
    torch.save({"model": model.state_dict(), "iter_num": 7},
               os.path.join(mirror["base"], "ckpt.pt"))
    plain = tiny.make("plain", seed=2)
    load_model(plain, "mirror://ckpt.pt", storage_options=mirror)
    torch.testing.assert_close(_out(plain), _out(model), atol=0, rtol=0)


def test_no_module_outside_storage_tells_local_from_remote():
    """The kind of a root is decided in storage/; elsewhere a URL is just a path."""
    offenders = {}
    for dirpath, _, files in os.walk(PKG_DIR):
        if os.path.basename(dirpath) == "storage":
            continue
        for name in sorted(f for f in files if f.endswith(".py")):
            with open(os.path.join(dirpath, name)) as f:
                tree = ast.parse(f.read())
            hits = [n.lineno for n in ast.walk(tree)
                    if isinstance(n, ast.Constant) and n.value == "://"
                    or isinstance(n, ast.Name) and n.id == "is_remote"
                    or isinstance(n, ast.Attribute) and n.attr in ("is_remote", "isfile", "exists")
                    and isinstance(n.value, ast.Attribute) and n.value.attr == "path"]
            if hits:
                offenders[os.path.relpath(os.path.join(dirpath, name), PKG_DIR)] = hits
    assert not offenders, offenders
