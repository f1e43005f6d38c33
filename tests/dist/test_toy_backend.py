"""A backend of the seven core methods serves ranks too: two FSDP ranks save through
DCP's generic writer, one process loads (a resharding load through the generic
reader), model and optimizer equal."""

from __future__ import annotations

import base64
import contextlib
import os

import torch

import harness
from dcp_universal import CheckpointManager, storage
from dcp_universal.storage import Storage
from train_loop import Data, build, moments, train


class ToyDir(Storage):
    """``toydir://<key>``: a dict whose values are files named by their key (in
    ``options["dir"]``), so every rank sees one dict; nothing but the core."""

    def _file(self, key: str) -> str:
        return os.path.join(self.options["dir"], base64.urlsafe_b64encode(key.encode()).decode())

    def _keys(self) -> list[str]:
        return [base64.urlsafe_b64decode(n).decode() for n in os.listdir(self.options["dir"])
                if not n.startswith(".")]

    def exists(self, path: str) -> bool:
        prefix = path.rstrip("/") + "/"
        return any(k == path or k.startswith(prefix) for k in self._keys())

    def size(self, path: str) -> int:
        return os.path.getsize(self._file(path))  # FileNotFoundError when missing

    def listdir(self, path: str) -> list[str]:
        prefix = path.rstrip("/") + "/"
        return sorted({k[len(prefix):].split("/", 1)[0] for k in self._keys()
                       if k.startswith(prefix)})

    def open_read(self, path: str):
        return open(self._file(path), "rb")

    def write_atomic(self, path: str, data: bytes) -> None:
        tmp = os.path.join(self.options["dir"], f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, self._file(path))

    def create_new(self, path: str, data: bytes) -> bool:
        try:
            with open(self._file(path), "xb") as f:  # a racing writer sees it half written
                f.write(data)                        # (a toy: the tests do not race)
        except FileExistsError:
            return False
        return True

    def remove_file(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(self._file(path))


def _save(rank, world_size, options):
    storage.register_backend("toydir", ToyDir)
    torch.manual_seed(rank)
    model, opt, sched = build("plain", "fsdp", world_size)
    train(model, opt, sched, Data(rank), {"step": 0}, 2)
    CheckpointManager("toydir://run", storage_options=options).save(2, model, opt)
    state = {k: v.full_tensor() for k, v in model.state_dict().items()}
    return state, moments(model, opt)


def test_two_ranks_save_and_one_process_loads_through_the_generic_reader_and_writer(tmp_path):
    options = {"dir": str(tmp_path / "dict")}
    os.makedirs(options["dir"])
    state, moms = harness.run(_save, 2, options)[0]
    storage.register_backend("toydir", ToyDir)
    try:
        model, opt, _ = build("plain", "none", 1, seed=7)
        report = CheckpointManager("toydir://run", storage_options=options).load(model, opt)
        assert report.optimizer_restored
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, state[key], atol=0, rtol=0)
        for name, m in moments(model, opt).items():
            for k, v in m.items():
                torch.testing.assert_close(v, moms[name][k], atol=0, rtol=0)
    finally:
        storage.unregister_backend("toydir")
