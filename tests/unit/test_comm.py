"""_comm's own contract in one process: what each collective returns without a process
group and in a world of one (gloo), the thread guards, the timeout option, and how a
remote rank's error travels (class, message, the rank, its traceback as a note)."""

from __future__ import annotations

import json
import pickle
import threading
import time

import pytest
import torch.distributed as dist

from dcp_universal import _comm
from dcp_universal._comm import operations, transport
from dcp_universal.errors import CheckpointIOError, CheckpointTimeoutError, IntegrityError


class Unpicklable(Exception):
    """An exception that cannot travel pickled (it holds a lock, say)."""

    def __reduce__(self):
        raise TypeError("cannot pickle")


class NeedsTwo(Exception):
    def __init__(self, a, b):
        super().__init__(f"{a}/{b}")

    def __reduce__(self):
        raise TypeError("cannot pickle")


def _raise(e: Exception):
    raise e


def _told(e: Exception) -> tuple:
    """What the rank that raised ``e`` sends the others."""
    return transport.attempt(_raise, (e,), {})[2]


# ---- without a process group ---------------------------------------------------------------

def test_without_a_process_group_every_collective_is_this_process_alone():
    assert (_comm.is_distributed(), _comm.rank(), _comm.world_size()) == (False, 0, 1)
    assert (_comm.all_true(True), _comm.all_true(False)) == (True, False)
    assert _comm.all_gather_object({"a": 1}) == [{"a": 1}]
    assert _comm.new_gloo_group(5.0) is None
    assert _comm.on_rank0(lambda a, b=0: a + b, 2, b=3) == 5
    assert _comm.agreed(lambda a, b=0: a * b, 2, b=3) == 6


def test_without_a_process_group_a_failure_is_raised_as_itself():
    boom = IntegrityError("bad block")

    def fail():
        raise boom

    for run in (_comm.on_rank0, _comm.agreed):
        with pytest.raises(IntegrityError) as e:
            run(fail)
        assert e.value is boom
        assert e.value.__traceback__ is not None


def test_an_operation_without_a_process_group_changes_nothing():
    with _comm.operation("save of step 1", timeout=5):
        assert _comm.resolve_group(None) is None
        assert not hasattr(operations._thread, "op")
        _comm.claim_commit()  # nothing to claim against
        _comm.progress("writing")
        assert _comm.on_rank0(lambda: "ok") == "ok"


def test_the_garbage_collector_is_paused_inside_an_operation_and_restored_after():
    import gc
    assert gc.isenabled()
    with _comm.operation("load"):
        assert not gc.isenabled()
        with _comm.operation("nested"):
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer one still holds the pause
    assert gc.isenabled()
    with pytest.raises(ValueError):
        with _comm.operation("load"):
            raise ValueError("boom")
    assert gc.isenabled()  # restored on failure too


def test_a_collector_the_caller_disabled_stays_disabled_and_background_writes_pause_nothing():
    import gc
    gc.disable()
    try:
        with _comm.operation("load"):
            assert not gc.isenabled()
        assert not gc.isenabled()  # the user's choice, kept
    finally:
        gc.enable()
    seen = []

    def background():
        with _comm.writes_only(None), _comm.operation("save (in the background)"):
            seen.append(gc.isenabled())

    t = threading.Thread(target=background)
    t.start()
    t.join()
    assert seen == [True]  # a long background write leaves the collector running
    # two threads' pauses overlap: the collector comes back after the last one
    entered, release = threading.Event(), threading.Event()

    def other():
        with operations.gc_paused():
            entered.set()
            release.wait(5)

    t = threading.Thread(target=other)
    t.start()
    entered.wait(5)
    with _comm.operation("load"):
        pass
    assert not gc.isenabled()
    release.set()
    t.join()
    assert gc.isenabled()


@pytest.mark.parametrize("value, expected", [(None, 600.0), (5, 5.0), (0.25, 0.25)])
def test_check_timeout_returns_seconds_as_a_float(value, expected):
    got = _comm.check_timeout(value)
    assert (got, type(got)) == (expected, float)


@pytest.mark.parametrize("value", [0, -1, float("nan"), float("inf"), True, "10"])
def test_check_timeout_refuses_anything_but_a_positive_finite_number(value):
    with pytest.raises(ValueError) as e:
        _comm.check_timeout(value, "upload_timeout")
    assert str(e.value) == (f"upload_timeout={value!r}: expected a positive number of seconds "
                            "(default 600)")


# ---- thread guards ---------------------------------------------------------------------------

def test_a_background_save_thread_may_use_its_own_group_only():
    mine, other = object(), object()
    with _comm.writes_only(mine):
        _comm.check_group(mine, "barrier")
        with pytest.raises(RuntimeError) as e:
            _comm.check_group(None, "barrier")
        assert str(e.value).startswith("barrier on the default group from the background "
                                       "thread of an asynchronous save")
        with pytest.raises(RuntimeError, match="^all_true on another group from"):
            _comm.check_group(other, "all_true")
        with pytest.raises(RuntimeError, match="^full_tensor\\(\\) from the background"):
            _comm.on_caller_thread("full_tensor()")
        with pytest.raises(RuntimeError, match=r"^on_rank0\(<lambda>\) on the default group"):
            _comm.on_rank0(lambda: 1)
    _comm.check_group(None, "barrier")
    _comm.on_caller_thread("full_tensor()")


def test_the_background_mark_is_per_thread():
    seen = []

    def caller():
        try:
            _comm.check_group(None, "barrier")
            seen.append("ok")
        except RuntimeError as e:
            seen.append(str(e))

    with _comm.writes_only(object()):
        t = threading.Thread(target=caller)
        t.start()
        t.join()
    assert seen == ["ok"]


# ---- which failures are a lost peer ----------------------------------------------------------

def test_a_lost_peer_is_found_through_causes_and_contexts():
    gloo = RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer")
    try:
        try:
            raise gloo
        except RuntimeError as e:
            raise CheckpointIOError("writing shard 3 failed") from e
    except CheckpointIOError as outer:
        assert operations._lost_peer(outer) is gloo
    assert operations._lost_peer(RuntimeError("Timed out waiting 600000ms for recv")) is not None


def test_other_failures_are_not_a_lost_peer():
    assert operations._lost_peer(RuntimeError("CUDA out of memory")) is None
    assert operations._lost_peer(ValueError("timed out waiting")) is None  # not a collective's
    assert operations._lost_peer(CheckpointTimeoutError("timed out waiting")) is None
    loop = RuntimeError("a")
    loop.__context__ = RuntimeError("b")
    loop.__context__.__context__ = loop
    assert operations._lost_peer(loop) is None  # a cycle ends


# ---- error transport -------------------------------------------------------------------------

def test_a_picklable_error_travels_as_itself_with_the_remote_traceback_as_a_note():
    told = _told(IntegrityError("a.bin fails its checksum"))
    blob, module, qualname, message, trace = told
    assert (module, qualname, message) == ("dcp_universal.errors", "IntegrityError",
                                           "a.bin fails its checksum")
    assert pickle.loads(blob).args == ("a.bin fails its checksum",)
    exc = transport.rebuild(told, 3)
    assert (type(exc), str(exc)) == (IntegrityError, "a.bin fails its checksum")
    assert exc.__notes__ == ["raised on rank 3:\n" + trace.rstrip()]
    assert "IntegrityError: a.bin fails its checksum" in trace


def test_an_unpicklable_error_is_rebuilt_from_its_class_and_message():
    told = _told(Unpicklable("no lock travels"))
    assert told[0] is None
    exc = transport.rebuild(told)
    assert (type(exc), exc.args) == (Unpicklable, ("no lock travels",))
    assert exc.__notes__[0].startswith("raised on rank 0:\nTraceback (most recent call last)")


def test_an_error_whose_constructor_wants_more_keeps_its_class_and_message():
    exc = transport.rebuild(_told(NeedsTwo("x", "y")))
    assert (type(exc), exc.args) == (NeedsTwo, ("x/y",))


def test_an_error_of_a_class_this_rank_cannot_import_is_a_runtime_error_naming_it():
    class Local(Exception):
        def __reduce__(self):
            raise TypeError("cannot pickle")

    exc = transport.rebuild(_told(Local("gone")), 2)
    assert type(exc) is RuntimeError
    assert str(exc) == (f"{__name__}.test_an_error_of_a_class_this_rank_cannot_import_is_a_"
                        "runtime_error_naming_it.<locals>.Local: gone")
    assert exc.__notes__[0].startswith("raised on rank 2:\n")


def _as_if_distributed(monkeypatch, me: int, world: int) -> None:
    for module in (_comm, operations):  # the collectives, and the operations' board
        monkeypatch.setattr(module, "is_distributed", lambda: True)
        monkeypatch.setattr(module, "rank", lambda: me)
        monkeypatch.setattr(module, "world_size", lambda: world)


def test_agreed_raises_the_first_failing_ranks_error_prefixed_with_its_rank(monkeypatch):
    _as_if_distributed(monkeypatch, 0, 3)
    told = _told(Unpicklable("disk full on node 4"))
    gathered = [None, told, _told(ValueError("later"))]
    monkeypatch.setattr(_comm, "all_gather_object", lambda obj, group=None: gathered)
    ran = []
    with pytest.raises(Unpicklable) as e:
        _comm.agreed(lambda: ran.append(1))
    assert ran == [1]  # this rank ran it, and succeeded
    assert str(e.value) == "rank 1: disk full on node 4"
    assert e.value.__notes__ == ["raised on rank 1:\n" + told[4].rstrip()]


def test_agreed_returns_this_ranks_result_when_every_rank_succeeded(monkeypatch):
    _as_if_distributed(monkeypatch, 1, 2)
    monkeypatch.setattr(_comm, "all_gather_object", lambda obj, group=None: [None, obj])
    assert _comm.agreed(lambda: "mine") == "mine"


def test_on_rank0_on_another_rank_returns_or_raises_what_rank0_told(monkeypatch):
    _as_if_distributed(monkeypatch, 2, 3)
    sent = []

    def broadcast(box, src, group=None):
        assert (src, box) == (0, [(None, None)])  # this rank sends nothing of its own
        box[0] = sent.pop()

    monkeypatch.setattr(_comm.dist, "broadcast_object_list", broadcast)
    ran = []
    sent.append((41, None))
    assert _comm.on_rank0(lambda: ran.append(1)) == 41
    told = _told(IntegrityError("step 7 is damaged"))
    sent.append((None, told))
    with pytest.raises(IntegrityError) as e:
        _comm.on_rank0(lambda: ran.append(1))
    assert ran == []  # only rank 0 runs fn
    assert str(e.value) == "step 7 is damaged"
    assert e.value.__notes__ == ["raised on rank 0:\n" + told[4].rstrip()]


def test_on_rank0_raises_its_own_failure_when_the_broadcast_fails_too(monkeypatch):
    _as_if_distributed(monkeypatch, 0, 2)

    def broadcast(box, src, group=None):
        raise RuntimeError("Connection closed by peer")

    monkeypatch.setattr(_comm.dist, "broadcast_object_list", broadcast)
    with pytest.raises(IntegrityError, match="^own$"):
        _comm.on_rank0(lambda: _raise(IntegrityError("own")))
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        _comm.on_rank0(lambda: 1)


def _op_seen(monkeypatch, board: dict, world: int, fate: str | None = None) -> operations._Op:
    _as_if_distributed(monkeypatch, 0, world)
    op = operations._Op("save of step 5")
    op.seq, op.marks, op.timeout = 2, 4, 5.0
    monkeypatch.setattr(op, "board", lambda: board)
    monkeypatch.setattr(op, "fate", lambda desired: fate or desired)
    return op


def test_giving_up_names_the_ranks_behind_and_what_they_last_did(monkeypatch):
    now = time.time()
    op = _op_seen(monkeypatch, {1: [2, 4, now, "writing"],
                                2: [2, 2, now - 7.2, "waiting in a barrier"],
                                4: [1, 9, now - 30.2, "committing"]}, world=5)
    err = operations._give_up(op, RuntimeError("Timed out waiting 5000ms for recv\nmore"))
    assert isinstance(err, CheckpointTimeoutError)
    assert str(err) == (
        "save of step 5: rank 0 waited longer than timeout=5 s for rank(s) [2, 3, 4] and gave "
        "up: rank 2 (last seen 7 s ago: waiting in a barrier); rank 3 (no progress posted); "
        "rank 4 (last seen 30 s ago: an earlier operation (committing)). Nothing was "
        "committed, and a rank that wakes up later commits nothing either. The collective "
        "said: Timed out waiting 5000ms for recv. This job's checkpoint connections are "
        "closed now -> restart the job (torchrun restarts it) and look at the rank(s) named; "
        "if the storage is only slow, pass a larger timeout=")


def test_giving_up_after_rank0_began_its_commit_says_it_may_be_committed(monkeypatch):
    now = time.time()
    op = _op_seen(monkeypatch, {1: [2, 6, now - 3.2, "committing"]}, world=2, fate="commit")
    err = operations._give_up(op, RuntimeError("Connection reset by peer"))
    assert str(err).startswith(
        "save of step 5: rank 0 fell behind, and the other ranks stopped waiting for it "
        "(timeout=5 s; rank 1 (last seen 3 s ago: committing)). Rank 0 had begun committing "
        "when this rank gave up: the save of step 5 is committed if rank 0 finished it")


# ---- a world of one, over gloo ---------------------------------------------------------------

@pytest.fixture
def world_of_one(tmp_path, monkeypatch):
    monkeypatch.setattr(operations, "_groups", {})
    monkeypatch.setattr(operations, "_caller_groups", {})
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_a_world_of_one_answers_every_collective_with_its_own_value(world_of_one):
    assert (_comm.is_distributed(), _comm.rank(), _comm.world_size()) == (True, 0, 1)
    assert _comm.all_true(True)
    assert (_comm.all_true(True), _comm.all_true(False)) == (True, False)
    assert _comm.all_gather_object(("x", 1)) == [("x", 1)]
    assert _comm.on_rank0(lambda: {"n": 2}) == {"n": 2}
    assert _comm.agreed(lambda: 3) == 3
    with pytest.raises(IntegrityError, match="^bad$"):
        _comm.agreed(lambda: _raise(IntegrityError("bad")))


def test_an_operation_makes_one_gloo_group_per_timeout_and_posts_progress(world_of_one):
    with _comm.operation("save of step 1", timeout=7):
        op = operations._thread.op
        assert _comm.all_true(True)
        group = op._pg
        assert (operations._groups[id(group)].timeout, op.seq) == (7.0, 1)
        assert json.loads(op.store.get("board/0"))[:2] == [1, 2]
        assert json.loads(op.store.get("board/0"))[3] == "waiting to agree"
        _comm.claim_commit()  # nobody gave up: the commit is ours
    with _comm.operation("save of step 2", timeout=7):
        assert _comm.all_true(True)
        assert (operations._thread.op._pg, operations._thread.op.seq) == (group, 2)
    assert not hasattr(operations._thread, "op")


def test_an_operation_refuses_a_bad_timeout_before_any_collective(world_of_one):
    with pytest.raises(ValueError, match=r"^timeout=-1: expected a positive number"):
        with _comm.operation("save of step 1", timeout=-1):
            pass
    assert operations._caller_groups == {}


def test_a_commit_after_another_rank_gave_up_is_refused(world_of_one):
    with pytest.raises(CheckpointTimeoutError) as e:
        with _comm.operation("save of step 3", timeout=9):
            assert _comm.all_true(True)
            assert operations._thread.op.fate("abandoned by rank 1") == "abandoned by rank 1"
            _comm.claim_commit()
    assert str(e.value).startswith("save of step 3: not committed: abandoned by rank 1 (it "
                                   "waited longer than timeout=9 s for this rank")


def test_a_lost_peer_inside_an_operation_becomes_a_timeout_error(world_of_one):
    with pytest.raises(CheckpointTimeoutError) as e:
        with _comm.operation("load of step 4", timeout=3):
            assert _comm.all_true(True)
            raise RuntimeError("Connection closed by peer [127.0.0.1]:1234")
    assert str(e.value).startswith("load of step 4: rank 0 fell behind")
    assert isinstance(e.value.__cause__, RuntimeError)
    with pytest.raises(KeyError):  # anything else passes through as itself
        with _comm.operation("load of step 5", timeout=3):
            assert _comm.all_true(True)
            raise KeyError("w")
