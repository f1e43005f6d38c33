"""ResumableSampler: one global order per epoch, each rank its share, and a position that
follows a change of world size (no sample repeated, none skipped), counting what the
loop consumed even when a DataLoader prefetches."""

from __future__ import annotations

import pytest
from torch.utils.data import DataLoader

from dcp_universal import CheckpointError, ResumableSampler


def _job(world: int, n: int, **kw) -> list[ResumableSampler]:
    return [ResumableSampler(n, rank=r, world_size=world, **kw) for r in range(world)]


def _run(samplers, steps: int, batch: int) -> list[int]:
    """Every rank takes ``steps`` batches of ``batch`` samples (num_workers=0)."""
    seen = []
    for s in samplers:
        it = iter(DataLoader(range(s.dataset_len), batch_size=batch, sampler=s))
        for _ in range(steps):
            seen += next(it).tolist()
    return seen


def _resume(samplers, world: int) -> list[ResumableSampler]:
    states = [s.state_dict() for s in samplers]
    new = _job(world, samplers[0].dataset_len, seed=samplers[0].seed)
    for s in new:
        s.load_resharded_state_dicts(states)
    return new


def test_eight_ranks_resumed_on_three_then_two_then_five_see_every_sample_once():
    n, batch = 1000, 4
    job = _job(8, n, seed=3)
    seen = _run(job, 5, batch)
    for world in (3, 2, 5):
        job = _resume(job, world)
        seen += _run(job, 7, batch)
    job = _resume(job, 4)
    for s in job:  # the rest of the epoch
        seen += [i for b in DataLoader(range(n), batch_size=batch, sampler=s) for i in b.tolist()]
    assert len(seen) == n and sorted(seen) == list(range(n))  # none repeated, none skipped
    assert seen != sorted(seen)  # shuffled
    order = job[0].order()
    assert set(seen[:8 * 5 * batch]) == set(order[:8 * 5 * batch])  # a prefix of the order


def test_epochs_draw_their_own_order_and_set_epoch_restarts():
    (s,) = _job(1, 50, seed=1)
    first = list(s)
    s.set_epoch(1)
    second = list(s)
    assert sorted(first) == sorted(second) == list(range(50)) and first != second
    assert ResumableSampler(5, shuffle=False, rank=0, world_size=1).order() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("workers", [0, 2])
def test_the_position_counts_what_the_loop_consumed_not_what_was_prefetched(workers):
    n, batch = 64, 4
    (s,) = _job(1, n, seed=2)
    loader = DataLoader(range(n), batch_size=batch, sampler=s, num_workers=workers)
    taken = []
    for i, b in enumerate(loader):
        taken += b.tolist()
        if workers:
            s.advance(len(b))
        if i == 2:
            break
    assert s.position == 3 * batch  # workers prefetched more; those are not consumed
    (t,) = _resume([s], 1)
    rest = [i for b in DataLoader(range(n), batch_size=batch, sampler=t) for i in b.tolist()]
    assert sorted(taken + rest) == list(range(n))


def test_same_world_size_round_trip_and_bad_states():
    job = _job(2, 30, seed=0)
    _run(job, 2, 3)
    again = _job(2, 30, seed=0)
    for s, old in zip(again, job):
        s.load_state_dict(old.state_dict())
    assert [list(s) for s in again] == [list(s) for s in job]
    with pytest.raises(CheckpointError, match="dataset_len=30"):
        ResumableSampler(31, rank=0, world_size=1).load_state_dict(job[0].state_dict())
    with pytest.raises(CheckpointError, match="not one job's"):
        _job(1, 30)[0].load_resharded_state_dicts([job[0].state_dict()])
    uneven = _job(2, 30, seed=0)
    _run(uneven[:1], 2, 3)  # rank 0 took 6 samples, rank 1 none
    with pytest.raises(CheckpointError, match="not a prefix"):
        _job(3, 30, seed=0)[0].load_resharded_state_dicts([s.state_dict() for s in uneven])


def test_drop_last_leaves_out_the_round_that_cannot_fill_every_rank():
    job = _job(4, 10, shuffle=False, drop_last=True)
    assert [len(s) for s in job] == [2, 2, 2, 2]
    job = _job(4, 10, shuffle=False)
    assert [len(s) for s in job] == [3, 3, 2, 2] and sorted(i for s in job for i in s) == list(range(10))
    with pytest.raises(ValueError, match="rank=4"):
        ResumableSampler(10, rank=4, world_size=4)


def test_tensor_parallel_peers_share_a_data_rank_and_their_copies_count_once():
    """(dp 2, tp 2): four processes save two data ranks' states twice each; a resume on
    3 data ranks (or on the same 4 processes as HSDP, 4 data ranks) continues the order."""
    job = _job(2, 40, seed=4)
    seen = _run(job, 2, 3)
    saved = [s.state_dict() for s in job for _ in range(2)]  # each TP peer's copy
    new = _job(3, 40, seed=4)
    for s in new:
        s.load_resharded_state_dicts(saved)
    rest = [i for s in new for i in s]
    assert sorted(seen + rest) == list(range(40))
    same_world = _job(4, 40, seed=4)
    for s, state in zip(same_world, saved):  # the manager gives each process its own
        s.load_state_dict(state)
    assert sorted(seen + [i for s in same_world for i in s]) == list(range(40))
    saved[1] = {**saved[1], "consumed": 0}
    with pytest.raises(CheckpointError, match="two saved states of data rank 0 differ"):
        _job(3, 40, seed=4)[0].load_resharded_state_dicts(saved)
