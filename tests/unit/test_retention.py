"""Retention's own contract, without a manager: which steps each policy and each
combination keeps, archives and deletes (NaN metrics, archived steps, unreadable
manifests, bases), and what :func:`retention.apply` leaves on disk, in which order."""

from __future__ import annotations

import json
import math
import os

import pytest

from dcp_universal.format import manifest
from dcp_universal.format.manifest import FileRecord, Manifest
from dcp_universal.storage import LocalStorage, steps
from dcp_universal.training import retention
from dcp_universal.training.retention import KeepBest, KeepEvery, KeepLast, KeepSteps, decide


def _m(step: int, *, loss: float | None = None, optimizer: bool = True, archived: bool = False,
       base: str | None = None) -> Manifest:
    files = {"model/__0_0.distcp": FileRecord(size=4), "model/.metadata": FileRecord(size=2)}
    if optimizer:
        files["optimizer/__0_0.distcp"] = FileRecord(size=3)
    return Manifest(step=step, world_size=1, merge="sharded", dtypes=["torch.float32"],
                    items={"model": True, "optimizer": optimizer}, base=base,
                    metrics={} if loss is None else {"loss": loss}, files=files,
                    archived=archived)


def _ms(*steps_, **kw) -> dict[int, Manifest]:
    return {s: _m(s, **kw) for s in steps_}


def _lists(d: retention.Decision) -> tuple:
    return d.keep, d.archive, d.delete, d.archived, d.delete_bases


# ---- policies --------------------------------------------------------------------------

def test_keep_last_keeps_the_n_newest_steps_whatever_their_order_in_the_dict():
    ms = {s: _m(s) for s in (30, 10, 50, 20, 40)}
    assert KeepLast(2).keep(ms) == {40, 50}
    assert KeepLast(9).keep(ms) == {10, 20, 30, 40, 50}


def test_keep_every_archives_the_multiples_of_k_only():
    assert KeepEvery(20).archive(_ms(0, 10, 20, 30, 40, 55)) == {0, 20, 40}
    assert KeepEvery(1).archive(_ms(3, 4)) == {3, 4}


def test_keep_best_ranks_by_the_metric_and_mode():
    ms = {1: _m(1, loss=0.5), 2: _m(2, loss=0.2), 3: _m(3, loss=0.9), 4: _m(4, loss=0.3)}
    assert KeepBest(2, "loss").keep(ms) == {2, 4}
    assert KeepBest(2, "loss", mode="max").keep(ms) == {3, 1}
    assert KeepBest(1, "accuracy").keep(ms) == set()  # nobody recorded it


def test_keep_best_never_ranks_a_nan_or_a_step_without_the_metric():
    ms = {1: _m(1, loss=0.4), 2: _m(2, loss=math.nan), 3: _m(3), 4: _m(4, loss=0.7)}
    # NaN compares false with everything: sorted naively it could land first
    assert KeepBest(1, "loss").keep(ms) == {1}
    assert KeepBest(1, "loss", mode="max").keep(ms) == {4}
    assert KeepBest(5, "loss").keep(ms) == {1, 4}


def test_keep_best_breaks_ties_towards_the_older_step_when_minimizing():
    ms = {5: _m(5, loss=0.1), 3: _m(3, loss=0.1), 9: _m(9, loss=0.2)}
    assert KeepBest(1, "loss").keep(ms) == {3}


def test_keep_steps_keeps_only_steps_that_are_committed():
    assert KeepSteps([2, 7, 99]).keep(_ms(1, 2, 3, 7)) == {2, 7}


@pytest.mark.parametrize("make, message", [
    (lambda: KeepLast(0), "keep_last=0: expected a positive whole number"),
    (lambda: KeepEvery(0), "keep_every=0: expected a positive whole number"),
    (lambda: KeepBest(0, "loss"), "keep_best=0: expected a positive whole number"),
    (lambda: KeepBest(1, "loss", mode="lowest"), "best_mode='lowest': expected 'min' or 'max'"),
])
def test_a_policy_refuses_an_option_it_cannot_honour_by_name(make, message):
    with pytest.raises(ValueError) as e:
        make()
    assert str(e.value).startswith(message)


# ---- decide ----------------------------------------------------------------------------

def test_without_policies_every_step_is_kept_and_no_base_in_use_is_deleted():
    ms = {1: _m(1, base="base-aa"), 2: _m(2, base="base-aa")}
    d = decide([], ms, ["base-aa", "base-bb"])
    assert _lists(d) == ([1, 2], [], [], [], ["base-bb"])


def test_no_committed_step_decides_nothing_not_even_bases():
    d = decide([KeepLast(1)], {}, ["base-aa"])
    assert _lists(d) == ([], [], [], [], [])


def test_keep_last_deletes_everything_older():
    d = decide([KeepLast(2)], _ms(1, 2, 3, 4, 5), [])
    assert _lists(d) == ([4, 5], [], [1, 2, 3], [], [])


def test_the_newest_step_is_kept_even_when_no_policy_keeps_it():
    ms = {1: _m(1, loss=0.1), 2: _m(2, loss=0.5), 3: _m(3, loss=0.9)}
    d = decide([KeepBest(1, "loss")], ms, [])
    assert _lists(d) == ([1, 3], [], [2], [], [])


def test_keep_every_archives_older_multiples_and_keep_last_wins_over_it():
    ms = _ms(10, 20, 25, 30, 40)
    d = decide([KeepLast(2), KeepEvery(20)], ms, [])
    # 40 is a multiple but kept whole (keep wins); 20 is archived; 10, 25 go; 30 kept
    assert _lists(d) == ([30, 40], [20], [10, 25], [], [])


def test_a_step_archived_before_is_reported_as_archived_not_archived_again():
    ms = {20: _m(20, optimizer=False, archived=True), 40: _m(40), 50: _m(50)}
    d = decide([KeepLast(1), KeepEvery(20)], ms, [])
    assert _lists(d) == ([50], [40], [], [20], [])


def test_an_archived_step_that_keep_last_keeps_stays_archived():
    ms = {20: _m(20, optimizer=False, archived=True), 21: _m(21)}
    d = decide([KeepLast(2)], ms, [])
    assert _lists(d) == ([21], [], [], [20], [])


def test_an_archived_step_no_policy_holds_is_deleted():
    ms = {20: _m(20, optimizer=False, archived=True), 21: _m(21), 22: _m(22)}
    d = decide([KeepLast(1)], ms, [])
    assert _lists(d) == ([22], [], [20, 21], [], [])


def test_keep_every_does_not_archive_a_step_saved_without_optimizer_and_keeps_it():
    ms = {20: _m(20, optimizer=False), 30: _m(30)}
    d = decide([KeepLast(1), KeepEvery(20)], ms, [])
    assert d.archive == [] and d.delete == []


def test_keep_best_combined_with_keep_last_and_keep_every():
    ms = {s: _m(s, loss=loss) for s, loss in
          [(10, 0.9), (20, 0.3), (30, math.nan), (40, 0.1), (50, 0.6), (60, 0.8)]}
    d = decide([KeepLast(1), KeepEvery(30), KeepBest(2, "loss")], ms, [])
    # best two: 40 (0.1), 20 (0.3); NaN at 30 is only archived (a multiple of 30)
    assert _lists(d) == ([20, 40, 60], [30], [10, 50], [], [])


def test_a_nan_newest_step_is_still_kept_whole():
    ms = {1: _m(1, loss=0.2), 2: _m(2, loss=0.1), 3: _m(3, loss=math.nan)}
    d = decide([KeepBest(1, "loss")], ms, [])
    assert _lists(d) == ([2, 3], [], [1], [], [])


def test_protected_steps_survive_keep_last():
    d = decide([KeepLast(1), KeepSteps({2, 3})], _ms(1, 2, 3, 4), [])
    assert _lists(d) == ([2, 3, 4], [], [1], [], [])


def test_bases_go_when_no_remaining_step_names_them():
    ms = {1: _m(1, base="base-aa"), 2: _m(2, base="base-bb"), 3: _m(3, base="base-bb")}
    d = decide([KeepLast(2)], ms, ["base-aa", "base-bb", "base-cc"])
    assert d.delete == [1]
    assert d.delete_bases == ["base-aa", "base-cc"]


def test_an_archived_step_keeps_its_base():
    ms = {1: _m(1, base="base-aa"), 2: _m(2, base="base-bb")}
    d = decide([KeepLast(1), KeepEvery(1)], ms, ["base-aa", "base-bb"])
    assert (d.archive, d.delete_bases) == ([1], [])


def test_an_unreadable_step_keeps_every_base_and_is_reported():
    ms = {1: _m(1, base="base-aa"), 3: _m(3, base="base-bb")}
    d = decide([KeepLast(1)], ms, ["base-aa", "base-bb", "base-cc"],
               unreadable={2: "ManifestError: bad"})
    assert _lists(d) == ([3], [], [1], [], [])
    assert d.unreadable == {2: "ManifestError: bad"}


# ---- apply -----------------------------------------------------------------------------

def _commit(root: str, m: Manifest) -> str:
    path = manifest.step_path(root, m.step)
    for rel, rec in m.files.items():
        os.makedirs(os.path.dirname(os.path.join(path, rel)), exist_ok=True)
        with open(os.path.join(path, rel), "wb") as f:
            f.write(b"x" * rec.size)
    steps.write_manifest(LocalStorage(), path, m)
    return path


def _base(root: str, name: str) -> str:
    path = os.path.join(root, name)
    os.makedirs(path)
    with open(os.path.join(path, "__0_0.distcp"), "wb") as f:
        f.write(b"base")
    steps.write_base_files(LocalStorage(), path, {"__0_0.distcp": FileRecord(size=4)})
    return path


def _tree(root: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, n), root)
                  for d, _, names in os.walk(root) for n in names)


def test_apply_deletes_archives_and_removes_unused_bases_on_disk(tmp_path):
    root, store = str(tmp_path), LocalStorage()
    ms = {1: _m(1, base="base-aa"), 2: _m(2, base="base-bb"), 3: _m(3, base="base-bb")}
    for m in ms.values():
        _commit(root, m)
    _base(root, "base-aa")
    _base(root, "base-bb")
    d = decide([KeepLast(1), KeepEvery(2)], ms, steps.list_bases(store, root))
    assert _lists(d) == ([3], [2], [1], [], ["base-aa"])
    retention.apply(d, root, store, ms)
    assert _tree(root) == [
        "base-bb/__0_0.distcp", "base-bb/files.json",
        "step-00000002/manifest.json", "step-00000002/model/.metadata",
        "step-00000002/model/__0_0.distcp",
        "step-00000003/manifest.json", "step-00000003/model/.metadata",
        "step-00000003/model/__0_0.distcp", "step-00000003/optimizer/__0_0.distcp"]
    archived = steps.read_manifest(store, manifest.step_path(root, 2))
    assert archived.archived is True
    assert archived.items["optimizer"] is False
    assert sorted(archived.files) == ["model/.metadata", "model/__0_0.distcp"]
    assert steps.list_steps(store, root) == [2, 3]


def test_apply_removes_an_optimizer_dir_a_killed_archive_left(tmp_path):
    root, store = str(tmp_path), LocalStorage()
    ms = {4: _m(4), 5: _m(5)}
    for m in ms.values():
        _commit(root, m)
    # killed after the archived manifest was written, before optimizer/ went
    ms[4] = retention._archived(ms[4])
    steps.write_manifest(store, manifest.step_path(root, 4), ms[4])
    d = decide([KeepLast(1), KeepEvery(4)], ms, [])
    assert _lists(d) == ([5], [], [], [4], [])
    retention.apply(d, root, store, ms)
    assert not os.path.exists(os.path.join(root, "step-00000004", "optimizer"))
    assert os.path.exists(os.path.join(root, "step-00000004", "model", "__0_0.distcp"))


def test_apply_with_defer_uncommits_at_once_and_removes_data_later(tmp_path):
    root, store = str(tmp_path), LocalStorage()
    ms = _ms(1, 2, 3)
    for m in ms.values():
        _commit(root, m)
    deferred = []
    d = decide([KeepLast(1), KeepEvery(2)], ms, [])
    retention.apply(d, root, store, ms, defer=deferred.append)
    # the decision is visible now: step 1 uncommitted, step 2 archived
    assert steps.list_steps(store, root) == [2, 3]
    assert steps.read_manifest(store, manifest.step_path(root, 2)).archived
    assert os.path.exists(os.path.join(root, "step-00000001", "model", "__0_0.distcp"))
    assert os.path.exists(os.path.join(root, "step-00000002", "optimizer"))
    assert len(deferred) == 1
    deferred[0]()
    assert not os.path.exists(os.path.join(root, "step-00000001"))
    assert not os.path.exists(os.path.join(root, "step-00000002", "optimizer"))


def test_apply_with_nothing_to_remove_defers_nothing(tmp_path):
    root, store = str(tmp_path), LocalStorage()
    ms = _ms(1, 2)
    for m in ms.values():
        _commit(root, m)
    deferred = []
    retention.apply(decide([KeepLast(2)], ms, []), root, store, ms, defer=deferred.append)
    assert deferred == []
    assert steps.list_steps(store, root) == [1, 2]


def test_apply_uncommits_a_step_before_removing_its_files(tmp_path):
    root = str(tmp_path)
    ms = _ms(1, 2)
    for m in ms.values():
        _commit(root, m)
    order = []

    class Watching(LocalStorage):
        def remove_file(self, path):
            order.append(("remove_file", os.path.relpath(path, root)))
            super().remove_file(path)

        def remove_tree(self, path):
            order.append(("remove_tree", os.path.relpath(path, root)))
            super().remove_tree(path)

    retention.apply(decide([KeepLast(1)], ms, []), root, Watching(), ms)
    assert order == [("remove_file", "step-00000001/manifest.json"),
                     ("remove_tree", "step-00000001")]


def test_archived_manifest_keeps_its_content_checksum_valid():
    m = _m(6, loss=0.25)
    again = Manifest.from_json(retention._archived(m).to_json())
    assert again.metrics == {"loss": 0.25}
    assert json.loads(again.to_json())["items"] == {"model": True, "optimizer": False}


# ---- policies of one's own, through the manager --------------------------------------------

def test_a_users_policy_composes_with_the_shortcuts_in_a_manager(tmp_path):
    import torch

    import tiny
    from dcp_universal import CheckpointManager, RetentionPolicy

    class KeepBelowLoss(RetentionPolicy):
        def keep(self, manifests):
            return {s for s, m in manifests.items() if m.metrics.get("loss", 1e9) < 0.1}

    model = tiny.make("plain", seed=1)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.zeros(2, 3, dtype=torch.long)).sum().backward()
    opt.step()
    mgr = CheckpointManager(str(tmp_path / "run"), keep_last=1,
                            retention=[KeepEvery(4), KeepBelowLoss()])
    for step in range(1, 7):
        mgr.save(step, model, opt, metrics={"loss": 0.05 if step == 1 else 0.5})
    mgr.close()
    assert mgr.steps() == [1, 4, 6]  # below the loss, every 4th (archived), the newest
    assert mgr.manifest(4).archived and not mgr.manifest(1).archived
    assert mgr.prune(dry_run=True).delete == []


@pytest.mark.parametrize("given", ["keep_last=3", KeepLast(3), [object()], [KeepLast]])
def test_retention_that_is_not_a_list_of_policies_is_refused(tmp_path, given):
    from dcp_universal import CheckpointManager

    with pytest.raises(ValueError, match="retention.*RetentionPolicy"):
        CheckpointManager(str(tmp_path / "run"), retention=given)
    assert not os.path.exists(tmp_path / "run")  # refused before anything was written
