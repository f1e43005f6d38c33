"""A decision that differs between ranks is agreed on before the next collective: when
one rank fails, every rank raises the same error at once instead of waiting for the
process group's timeout (issue "Trust": hangs)."""

from __future__ import annotations


import pytest
import torch

import harness
import tiny
from dcp_universal import CheckpointManager, IntegrityError, NotACheckpointError

# well under the harness's collective timeout: a rank that waited for it fails this
FAST_S = harness.COLLECTIVE_TIMEOUT_S / 3


class _PicklesOnRank0Only:
    """An ``extra`` object whose state holds a lock on rank 1 (cannot be pickled)."""

    def __init__(self, rank: int) -> None:
        import threading

        self.state = {"step": 1} if rank == 0 else {"step": 1, "lock": threading.Lock()}

    def state_dict(self):
        return self.state

    def load_state_dict(self, state):
        self.state = state


def _save_with_extra_unpicklable_on_rank1(rank, world_size, root):
    model = tiny.make("plain", seed=0)
    mgr = CheckpointManager(root)
    out = harness.outcome(lambda: mgr.save(1, model, extra={"data": _PicklesOnRank0Only(rank)}))
    return out, mgr.steps()


def test_an_extra_that_cannot_be_saved_on_one_rank_fails_every_rank_at_once(tmp_path):
    results = harness.run(_save_with_extra_unpicklable_on_rank1, 2, str(tmp_path))
    for (name, message, seconds), steps in results:
        assert name == "TypeError" and "extra['data']" in message and "rank(s) [1]" in message
        assert seconds < FAST_S and steps == []


def _load_failing_on_rank1(rank, world_size, root, where):
    from dcp_universal.sources import step as step_format
    from dcp_universal.storage import steps

    model = tiny.make("plain", seed=0)
    mgr = CheckpointManager(root)
    mgr.save(1, model)
    mgr.save(2, model)
    if rank == 1 and where == "manifest":  # step 2 pruned between the two ranks' reads
        real = steps.read_manifest

        def read_manifest(store, path):
            if path.endswith("step-00000002"):
                raise NotACheckpointError(f"{path} has no manifest.json")
            return real(store, path)

        steps.read_manifest = read_manifest
    if rank == 1 and where == "files":  # a file damaged as this rank sees it

        def open_(self, store, path, want):
            raise IntegrityError(f"{path}/model/__0_0.distcp has 3 bytes, the manifest says 9")

        step_format.StepFormat.open = open_
    target = tiny.make("plain", seed=5)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    out = harness.outcome(lambda: mgr.load(target))
    untouched = all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
    return out, untouched


@pytest.mark.parametrize("where, error", [("manifest", "NotACheckpointError"),
                                          ("files", "IntegrityError")])
def test_a_load_failing_on_one_rank_fails_every_rank_at_once(tmp_path, where, error):
    results = harness.run(_load_failing_on_rank1, 2, str(tmp_path), where)
    for (name, message, seconds), untouched in results:
        assert name == error and seconds < FAST_S and untouched, (name, message, seconds)
    assert "rank 1" in results[0][0][1]  # rank 0 learns whose error it is
