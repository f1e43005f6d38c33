"""The local tier's own contract in one process, on two local directories: which rank
uploads which file, what an upload copies and commits remotely (and in which order),
what it cleans, refuses and retries, and which local steps count as durable or whole."""

from __future__ import annotations

import os
import re

import pytest

from dcp_universal.errors import CheckpointIOError, IntegrityError, StepAlreadyExistsError
from dcp_universal.format import manifest
from dcp_universal.format.manifest import FileRecord, Manifest
from dcp_universal.storage import LocalStorage, integrity, steps
from dcp_universal.training import tier as tier_mod
from dcp_universal.training.tier import LocalTier, owner

STEP_FILES = {"model/__0_0.distcp": b"rank zero model bytes",
              "model/__1_0.distcp": b"rank one",
              "model/.metadata": b"meta",
              "optimizer/__0_0.distcp": b"adam moments"}
BASE_FILES = {"__0_0.distcp": b"frozen base weights", ".metadata": b"base meta"}


def _record(data: bytes) -> FileRecord:
    return FileRecord(size=len(data), algo=integrity.ALGO, block=integrity.BLOCK_BYTES,
                      sums=integrity.checksum(integrity.ALGO, data).to_bytes(4, "big"))


def _write_tree(path: str, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        os.makedirs(os.path.dirname(os.path.join(path, rel)), exist_ok=True)
        with open(os.path.join(path, rel), "wb") as f:
            f.write(data)


def _commit(root: str, step: int, base: str | None = None) -> Manifest:
    """A committed step under ``root`` (and its base, when ``base``), its records true."""
    m = Manifest(step=step, world_size=2, merge="sharded", dtypes=["torch.float32"],
                 items={"model": True, "optimizer": True},
                 files={rel: _record(data) for rel, data in STEP_FILES.items()})
    path = manifest.step_path(root, step)
    _write_tree(path, STEP_FILES)
    if base is not None:
        m.base, m.base_files = base, {rel: _record(d) for rel, d in BASE_FILES.items()}
        _write_tree(os.path.join(root, base), BASE_FILES)
        steps.write_base_files(LocalStorage(), os.path.join(root, base), m.base_files)
    steps.write_manifest(LocalStorage(), path, m)
    return m


def _tree(path: str) -> dict[str, bytes]:
    out = {}
    for d, _, names in os.walk(path):
        for n in names:
            with open(os.path.join(d, n), "rb") as f:
                out[os.path.relpath(os.path.join(d, n), path)] = f.read()
    return out


class Recording(LocalStorage):
    """A remote that records every upload and commit, and fails the first ``fail`` uploads."""

    def __init__(self, fail: int = 0) -> None:
        super().__init__()
        self.fail, self.calls = fail, []

    def upload(self, local_path, path):
        self.calls.append(("upload", path))
        if self.fail:
            self.fail -= 1
            raise OSError("503 Slow Down")
        super().upload(local_path, path)

    def write_atomic(self, path, data):
        self.calls.append(("write", path))
        super().write_atomic(path, data)


@pytest.fixture
def roots(tmp_path):
    local, remote = str(tmp_path / "nvme"), str(tmp_path / "bucket")
    os.makedirs(local)
    os.makedirs(remote)
    return local, remote


def _tier(roots, remote_store=None, **kw) -> tuple[LocalTier, list]:
    retained = []
    t = LocalTier(LocalStorage(), roots[0], remote_store or LocalStorage(), roots[1],
                  retain_remote=lambda: retained.append(len(retained)), backoff=0.0, **kw)
    return t, retained


# ---- owner ---------------------------------------------------------------------------------

@pytest.mark.parametrize("rel, world, rank", [
    ("model/__3_0.distcp", 4, 3),
    ("model/__3_0.distcp.sums", 4, 3),  # a sums file follows its data file
    ("optimizer/__5_2.distcp", 4, 1),  # written by a job of 8 ranks, uploaded by one of 4
    ("__12_0.distcp", 1, 0),
    ("model/.metadata", 4, 0),
    ("model/dcp_universal.json", 4, 0),
    ("model/x__1_0.distcp", 4, 0),  # only a name that begins so is a rank's
    ("__1_0/.metadata", 4, 0),  # a directory's name is not the file's
])
def test_owner_maps_a_ranks_files_to_that_rank_modulo_world_and_shared_files_to_rank0(
        rel, world, rank):
    assert owner(rel, world) == rank


# ---- upload --------------------------------------------------------------------------------

def test_an_upload_copies_every_file_byte_for_byte_and_commits_with_the_manifest_last(roots):
    local, remote = roots
    m = _commit(local, 1, base="base-ab")
    store = Recording()
    t, retained = _tier(roots, store)
    assert t.upload(1, m, None) == manifest.step_path(remote, 1)
    assert _tree(os.path.join(remote, "step-00000001")) == _tree(os.path.join(local,
                                                                               "step-00000001"))
    assert _tree(os.path.join(remote, "base-ab")) == _tree(os.path.join(local, "base-ab"))
    assert store.calls[-2:] == [("write", f"{remote}/base-ab/files.json"),
                                ("write", f"{remote}/step-00000001/manifest.json")]
    assert sorted(p for kind, p in store.calls if kind == "upload") == sorted(
        [f"{remote}/step-00000001/{rel}" for rel in STEP_FILES]
        + [f"{remote}/base-ab/{rel}" for rel in BASE_FILES])
    assert retained == [0]  # the remote root's retention, after the commit
    assert t.remote_steps() == [1]


def test_a_base_already_complete_remotely_is_not_uploaded_again(roots):
    local, remote = roots
    t, _ = _tier(roots)
    t.upload(1, _commit(local, 1, base="base-ab"), None)
    store = Recording()
    t.remote = store
    t.upload(2, _commit(local, 2, base="base-ab"), None)
    assert not any("base-ab" in p for _, p in store.calls)
    assert t.remote_steps() == [1, 2]


def test_an_upload_removes_what_a_killed_upload_of_the_step_left(roots):
    local, remote = roots
    m = _commit(local, 3)
    _write_tree(os.path.join(remote, "step-00000003"), {"model/__0_0.distcp": b"half",
                                                        "model/__7_0.distcp": b"stale"})
    t, _ = _tier(roots)
    t.upload(3, m, None)
    assert _tree(os.path.join(remote, "step-00000003")) == _tree(os.path.join(local,
                                                                               "step-00000003"))


def test_a_step_committed_remotely_meanwhile_is_refused_unless_overwrite(roots):
    local, remote = roots
    m = _commit(local, 4)
    other = _commit(remote, 4)
    with open(os.path.join(remote, "step-00000004", "model", "__0_0.distcp"), "wb") as f:
        f.write(b"another job's")
    t, retained = _tier(roots)
    with pytest.raises(StepAlreadyExistsError) as e:
        t.upload(4, m, None)
    assert str(e.value).startswith(
        f"step 4 was committed at {remote}/step-00000004 by another save while this one was "
        f"written locally; it stays committed under {local} only")
    assert _tree(os.path.join(remote, "step-00000004"))["model/__0_0.distcp"] == b"another job's"
    assert steps.read_manifest(LocalStorage(), f"{remote}/step-00000004") == other
    assert retained == []
    t.upload(4, m, None, overwrite=True)
    assert _tree(os.path.join(remote, "step-00000004")) == _tree(os.path.join(local,
                                                                               "step-00000004"))


def test_damaged_local_bytes_are_never_uploaded_and_nothing_is_committed(roots):
    local, remote = roots
    m = _commit(local, 5)
    path = os.path.join(local, "step-00000005", "optimizer", "__0_0.distcp")
    with open(path, "r+b") as f:
        f.write(b"A")  # "adam" -> "Adam": same size, another checksum
    store = Recording()
    t, retained = _tier(roots, store)
    with pytest.raises(IntegrityError, match=re.escape(f"{local}/step-00000005/optimizer/"
                                                       "__0_0.distcp fails its checksum")):
        t.upload(5, m, None)
    assert [c for c in store.calls if c[0] == "upload"] == []
    assert (t.remote_steps(), retained) == ([], [])


def test_an_upload_retries_each_file_with_doubling_waits(roots, monkeypatch):
    local, remote = roots
    m = _commit(local, 6)
    waits = []
    monkeypatch.setattr(tier_mod.time, "sleep", waits.append)
    t, _ = _tier(roots, Recording(fail=2), retries=3)
    t.backoff = 0.5
    t.upload(6, m, None)
    assert waits == [0.5, 1.0]
    assert t.remote_steps() == [6]


def test_an_upload_that_keeps_failing_says_where_the_step_is_and_commits_nothing(roots):
    local, remote = roots
    m = _commit(local, 7)
    store = Recording(fail=99)
    t, retained = _tier(roots, store, retries=1)
    with pytest.raises(CheckpointIOError) as e:
        t.upload(7, m, None)
    first = sorted(STEP_FILES)[0]
    assert str(e.value).startswith(
        f"uploading {local}/step-00000007/{first} to {remote}/step-00000007/{first} failed 2 "
        f"times (OSError: 503 Slow Down); step 7 is committed locally under {local} and not "
        "remotely (local retention keeps it)")
    assert store.calls == [("upload", f"{remote}/step-00000007/{first}")] * 2
    assert (t.remote_steps(), retained) == ([], [])


def test_a_commit_whose_files_did_not_all_arrive_writes_no_manifest(roots):
    local, remote = roots
    m = _commit(local, 8)
    _write_tree(os.path.join(remote, "step-00000008"),
                {rel: data for rel, data in STEP_FILES.items() if "__1_" not in rel})
    t, retained = _tier(roots)
    with pytest.raises(IntegrityError, match=re.escape(f"{remote}/step-00000008/model/"
                                                       "__1_0.distcp is missing")):
        t._commit(8, m, f"{remote}/step-00000008", False)
    assert (t.remote_steps(), retained) == ([], [])


def test_a_commit_that_cannot_write_says_the_step_stays_local(roots):
    local, remote = roots
    m = _commit(local, 9)
    _write_tree(os.path.join(remote, "step-00000009"), STEP_FILES)

    class ReadOnly(LocalStorage):
        def write_atomic(self, path, data):
            raise PermissionError(13, "Permission denied")

    t, retained = _tier(roots, ReadOnly())
    with pytest.raises(CheckpointIOError) as e:
        t._commit(9, m, f"{remote}/step-00000009", False)
    assert str(e.value) == (f"committing the upload of step 9 at {remote}/step-00000009 failed "
                            "(PermissionError: [Errno 13] Permission denied); it stays "
                            "committed locally")
    assert retained == []


# ---- what is where -------------------------------------------------------------------------

def test_a_local_copy_is_whole_only_while_every_file_and_its_base_has_its_size(roots):
    local, _ = roots
    _commit(local, 1, base="base-ab")
    _commit(local, 2, base="base-ab")
    _commit(local, 3)
    t, _ = _tier(roots)
    assert [t.local_copy_whole(s) for s in (1, 2, 3, 4)] == [True, True, True, False]
    os.truncate(os.path.join(local, "step-00000003", "model", "__1_0.distcp"), 2)
    os.remove(os.path.join(local, "base-ab", ".metadata"))
    assert [t.local_copy_whole(s) for s in (1, 2, 3)] == [False, False, False]
    os.remove(os.path.join(local, "step-00000001", "manifest.json"))
    assert t.local_copy_whole(1) is False


def test_not_durable_is_every_local_step_the_remote_root_does_not_have(roots):
    local, remote = roots
    for s in (1, 2, 3):
        _commit(local, s)
    _commit(remote, 1)
    os.makedirs(os.path.join(remote, "step-00000002"))  # an upload killed before its commit
    t, _ = _tier(roots)
    assert t.not_durable() == {2, 3}
    assert t.durable == {1}


def test_a_remote_that_cannot_be_listed_makes_every_local_step_not_durable(roots):
    local, _ = roots
    _commit(local, 1)
    _commit(local, 2)

    class Down(LocalStorage):
        def listdir(self, path):
            raise ConnectionError("no route to host")

    t, _ = _tier(roots, Down())
    assert t.not_durable() == {1, 2}
    assert t.durable is None  # the next call lists again


# ---- the upload thread ---------------------------------------------------------------------

def test_recover_uploads_local_steps_newer_than_the_remote_newest_oldest_first(roots):
    local, remote = roots
    for s in (1, 2, 3, 5):
        _commit(local, s)
    _commit(remote, 2)
    t, retained = _tier(roots)
    try:
        queued = t.recover()
        assert [s for s, _ in queued] == [3, 5]  # 1 is older than the remote's newest
        assert [f.result() for _, f in queued] == [f"{remote}/step-00000003",
                                                   f"{remote}/step-00000005"]
        assert t.recover() == []  # once per manager
    finally:
        t.close()
    assert t.remote_steps() == [2, 3, 5]
    assert (t.durable, t.pending, retained) == ({2, 3, 5}, {}, [0, 1])


def test_recover_waits_for_the_next_save_when_the_remote_cannot_be_listed(roots):
    local, _ = roots
    _commit(local, 1)

    class Down(LocalStorage):
        def listdir(self, path):
            raise OSError("no route to host")

    t, _ = _tier(roots, Down())
    try:
        assert t.recover() == []
        assert t._recovered is False
    finally:
        t.close()


def test_a_failed_upload_stays_pending_and_not_durable(roots):
    local, remote = roots
    m1, m2 = _commit(local, 1), _commit(local, 2)
    t, _ = _tier(roots, Recording(fail=99), retries=0)
    t.durable = set()
    t.start()
    try:
        failed = t.submit(1, m1)
        with pytest.raises(CheckpointIOError):
            failed.result()
        t.remote = LocalStorage()
        assert t.submit(2, m2).result() == f"{remote}/step-00000002"
    finally:
        t.close()
    assert t.started is False
    assert (t.pending, t.durable) == ({1: failed}, {2})
    assert t.not_durable() == {1}


def test_recover_skips_a_local_step_whose_manifest_cannot_be_read(roots, caplog):
    # a damaged local manifest must not fail every later save and load of the job: loads
    # skip such a step and retention keeps it; recover leaves it where it is, and says so
    local, remote = roots
    _commit(local, 1)
    _commit(local, 3)
    os.makedirs(os.path.join(local, "step-00000002"))
    with open(os.path.join(local, "step-00000002", "manifest.json"), "w") as f:
        f.write("{not json")
    t, _ = _tier(roots)
    try:
        with caplog.at_level("WARNING", logger="dcp_universal.training.tier"):
            queued = t.recover()
        assert [s for s, _ in queued] == [1, 3]
        assert [f.result() for _, f in queued] == [f"{remote}/step-00000001",
                                                   f"{remote}/step-00000003"]
    finally:
        t.close()
    assert t.remote_steps() == [1, 3]
    assert t.not_durable() == {2}  # local retention keeps it
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        f"local step 2 is not uploaded: its manifest under {local} cannot be read"]
