"""SIGKILL one rank of a 2-rank FSDP2 job during a save, at fixed points of the commit
protocol: the previous committed step stays latest and loads bit-identically, the
half-written step is never taken for latest, and the next save removes its debris.

``tests/stress/crash_stress.py`` runs the same trial at random moments, 50+ times.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "stress"))

from crash_stress import Trial, run_trial  # noqa: E402

# name -> (trial, what step 2 must be after the kill)
CASES = {
    # rank 1 dies halfway through a chunk of one of its DCP data files
    "torn-data-file": (Trial(variant="plain", victim=1, point="file_write", trigger=1, n=200),
                       "debris"),
    # every rank's data is written; rank 0 dies with the manifest temp file not yet renamed
    "before-commit": (Trial(variant="lora4", merged=True, victim=0, point="manifest_rename",
                            trigger=0, n=1), "debris"),
    # asynchronous save 2: the job trains on while its background thread writes; rank 1
    # dies halfway through a chunk of a data file, or rank 0 just before the commit
    "async-torn-data-file": (Trial(variant="plain", asynchronous=True, victim=1,
                                   point="file_write", trigger=1, n=200), "debris"),
    "async-before-commit": (Trial(variant="lora4", asynchronous=True, victim=0,
                                  point="manifest_rename", trigger=0, n=1), "debris"),
    # rank 0 dies right after the rename, before keep_last=1 prunes step 1
    "after-commit": (Trial(variant="lora4", retention="last1", victim=0,
                           point="manifest_renamed", trigger=0, n=1), "committed"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_kill_during_save(tmp_path, name):
    trial, step2 = CASES[name]
    result = run_trial(trial, workdir=str(tmp_path))
    assert result.events["fired"], f"the kill at {trial.point}#{trial.n} never happened"
    assert result.loadable and result.clean, result.summary
    assert result.events["step2"] == step2, result.summary


def test_kill_while_archiving_leaves_no_debris(tmp_path):
    # save 2 commits, then archives step 1 (keep_every=1); rank 0 dies after step 1's
    # rewritten manifest is in place
    trial = Trial(variant="plain", retention="archive", victim=0, point="manifest_renamed",
                  trigger=0, n=2)
    result = run_trial(trial, workdir=str(tmp_path))
    assert result.events["fired"] and result.loadable, result.summary
    assert result.clean, result.summary  # the next prune removes the orphaned optimizer/
