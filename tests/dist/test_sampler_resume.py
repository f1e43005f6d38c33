"""The data position across world sizes, through CheckpointManager: a job of 8 gloo ranks
takes a few batches and saves, jobs of 3, 2 and 5 ranks resume in turn; across the
epoch every sample is consumed once, none repeated, none skipped."""

from __future__ import annotations

from torch.utils.data import DataLoader

import harness
import tiny
from dcp_universal import CheckpointManager, ResumableSampler

N, BATCH = 500, 4


def _job(rank, world_size, root, steps):
    sampler = ResumableSampler(N, seed=7)  # rank and world size from the process group
    model = tiny.make("plain")
    with CheckpointManager(root) as mgr:
        report = mgr.load(model, extra={"sampler": sampler})
        start = mgr.latest_step() or 0
        batches = iter(DataLoader(range(N), batch_size=BATCH, sampler=sampler))
        taken = []
        for _ in range(steps if steps is not None else N):  # a loop of training steps
            batch = next(batches, None)
            if batch is None:
                break
            taken += batch.tolist()
        mgr.save(start + 1, model, extra={"sampler": sampler})
    notes = [n for n in (report.notes if report else []) if "sampler" in n]
    return taken, notes


def test_eight_ranks_resumed_on_three_two_and_five_consume_the_epoch_once(tmp_path):
    root = str(tmp_path / "run")
    seen, notes = [], []
    for world, steps in ((8, 3), (3, 5), (2, 4), (5, None)):
        for taken, n in harness.run(_job, world, root, steps):
            seen += taken
            notes += n
    assert len(seen) == N and sorted(seen) == list(range(N))
    assert ResumableSampler(N, seed=7, rank=0, world_size=1).order()[:8 * 3 * BATCH] != \
        sorted(seen[:8 * 3 * BATCH])  # shuffled
    assert any("resharded from 8 ranks" in n for n in notes), notes
