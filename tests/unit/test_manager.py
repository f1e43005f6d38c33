"""CheckpointManager in one process: layout, commits, retention, optimizer options."""

from __future__ import annotations

import json
import os

import pytest
import torch

import tiny
from dcp_universal import CheckpointError, CheckpointManager, load_model, save_model
from dcp_universal import NotACheckpointError, StepAlreadyExistsError
from train_loop import Data, build, moments, train


def _trained(variant="lora4", steps=2):
    torch.manual_seed(0)
    model, opt, sched = build(variant, "none", 1)
    tiny.randomize_adapters(model, seed=3)
    train(model, opt, sched, Data(0), {"step": 0}, steps)
    return model, opt, sched


def _out(model):
    with torch.no_grad():
        return model(tiny.fixed_input())


def _bytes_under(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def test_lora_steps_share_one_base_and_write_only_trainable_state(tmp_path):
    model, opt, sched = _trained()
    mgr = CheckpointManager(str(tmp_path))
    mgr.save(1, model, opt)
    train(model, opt, sched, Data(0), {"step": 0}, 1)
    mgr.save(2, model, opt, merged=True)
    bases = [n for n in os.listdir(tmp_path) if n.startswith("base-")]
    assert len(bases) == 1  # the frozen base did not change: written once
    m1, m2 = mgr.manifest(1), mgr.manifest(2)
    assert m1.base == m2.base == bases[0]
    assert m1.items == {"adapters": True, "optimizer": True}
    assert m2.items == {"adapters": True, "model": True, "optimizer": True}
    assert m1.adapters.modules["blocks.0.q"] == {"rank": 4, "alpha": 8.0}
    assert m1.world_size == 1 and m1.format_version == 2 and m1.files
    assert all(rec.size == os.path.getsize(tmp_path / "step-00000001" / f)
               for f, rec in m1.files.items())
    adapters = tiny.read_dir(str(tmp_path / "step-00000001" / "adapters"))
    assert "blocks.0.q.lora_A" in adapters and "blocks.0.ln.weight" in adapters
    assert "blocks.0.q.weight" not in adapters  # frozen: lives in the base
    # every step loads into any configuration, composing base + adapters when needed
    for variant in ("plain", "lora2"):
        target = tiny.make(variant, seed=8)
        report = load_model(target, mgr.step_path(1))
        assert any("merged 7 adapters" in n for n in report.notes)
        # step 1's weights differ from the current model's: compare with step 2
    target = tiny.make("plain", seed=8)
    load_model(target, mgr.step_path(2))
    torch.testing.assert_close(_out(target), _out(model), atol=1e-5, rtol=0)


def test_composed_load_equals_merged_model_dir(tmp_path):
    model, opt, _ = _trained()
    mgr = CheckpointManager(str(tmp_path))
    mgr.save(1, model, opt, merged=True)
    os.rename(tmp_path / "step-00000001" / "model", tmp_path / "merged")
    manifest_path = tmp_path / "step-00000001" / "manifest.json"
    manifest = mgr.manifest(1)
    manifest.items.pop("model")
    manifest_path.write_text(manifest.to_json())
    a, b = tiny.make("plain", seed=1), tiny.make("plain", seed=2)
    load_model(a, str(tmp_path / "merged"))
    load_model(b, mgr.step_path(1))
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0, msg=k)
    torch.testing.assert_close(_out(b), _out(model), atol=1e-5, rtol=0)


def test_retention_keeps_newest_and_the_bases_kept_steps_use(tmp_path):
    mgr = CheckpointManager(str(tmp_path), keep_last=2)
    model, opt, _ = _trained()
    mgr.save(1, model, opt)
    first_base = mgr.manifest(1).base
    mgr.save(2, model, opt)
    with torch.no_grad():  # a new base (e.g. after a merge-and-rebase)
        model.blocks[0].q.base_layer.weight.add_(1.0)
    mgr.save(3, model, opt)
    assert mgr.steps() == [2, 3]
    assert os.path.isdir(tmp_path / first_base)  # step 2 still uses it
    mgr.save(4, model, opt)
    assert mgr.steps() == [3, 4]
    mgr.wait()  # retention's removals run on a thread of their own
    assert not os.path.exists(tmp_path / first_base)
    assert mgr.manifest(3).base != first_base and os.path.isdir(tmp_path / mgr.manifest(3).base)


def test_manifestless_step_is_ignored_and_cleaned_by_next_save(tmp_path):
    model, opt, _ = _trained("plain")
    mgr = CheckpointManager(str(tmp_path))
    mgr.save(1, model, opt)
    mgr.save(2, model, opt)
    os.remove(tmp_path / "step-00000002" / "manifest.json")  # a save killed before commit
    assert mgr.steps() == [1] and mgr.latest_step() == 1
    with pytest.raises(CheckpointError, match="not a committed step"):
        mgr.load(model, step=2)
    mgr.save(3, model, opt)
    assert not (tmp_path / "step-00000002").exists()
    assert mgr.steps() == [1, 3]


def test_existing_step_raises_unless_overwrite(tmp_path):
    model, opt, _ = _trained("plain")
    mgr = CheckpointManager(str(tmp_path))
    mgr.save(5, model, opt)
    with pytest.raises(StepAlreadyExistsError, match="overwrite=True"):
        mgr.save(5, model, opt)
    with torch.no_grad():
        model.head.bias.fill_(0.5)
    mgr.save(5, model, opt, overwrite=True)
    target = tiny.make("plain")
    load_model(target, mgr.step_path(5))
    assert torch.equal(target.head.bias, torch.full_like(target.head.bias, 0.5))


def test_param_group_mismatch_and_hyperparameter_choice(tmp_path):
    model, opt, _ = _trained("plain")
    for g in opt.param_groups:
        g["lr"] = 0.123
    mgr = CheckpointManager(str(tmp_path))
    mgr.save(1, model, opt)
    saved = moments(model, opt)

    target, topt, _ = build("plain", "none", 1, lr=0.5)
    report = mgr.load(target, topt, hyperparams="current")
    assert topt.param_groups[0]["lr"] == 0.5
    assert any("kept from the current optimizer" in n for n in report.notes)
    report = mgr.load(target, topt)
    assert topt.param_groups[0]["lr"] == 0.123

    # two groups (decay / no decay) against the checkpoint's one: the target's stand
    target = tiny.make("plain")
    decay = [p for n, p in target.named_parameters() if p.dim() == 2]
    rest = [p for n, p in target.named_parameters() if p.dim() < 2]
    topt = torch.optim.AdamW([{"params": decay, "lr": 0.7}, {"params": rest, "lr": 0.9,
                                                             "weight_decay": 0.0}])
    report = mgr.load(target, topt)
    assert [g["lr"] for g in topt.param_groups] == [0.7, 0.9]
    assert any("param groups differ" in n for n in report.notes)
    got = moments(target, topt)  # the state itself still follows names
    assert len(report.optimizer_restored) == len(saved)
    for name in saved:
        for k in saved[name]:
            assert torch.equal(got[name][k], saved[name][k])


def test_sgd_momentum_round_trips(tmp_path):
    torch.manual_seed(0)
    model = tiny.make("lora4")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    train(model, opt, sched, Data(0), {"step": 0}, 2)
    CheckpointManager(str(tmp_path)).save(2, model, opt)
    target = tiny.make("lora4", seed=4)
    topt = torch.optim.SGD([p for p in target.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    report = CheckpointManager(str(tmp_path)).load(target, topt)
    assert not report.optimizer_fresh
    want, got = moments(model, opt), moments(target, topt)
    assert want.keys() == got.keys() and all(
        torch.equal(got[n]["momentum_buffer"], want[n]["momentum_buffer"]) for n in want)


def test_optimizer_over_frozen_parameters_warns_with_names(tmp_path):
    model = tiny.make("lora4")
    opt = torch.optim.AdamW(model.parameters())  # seed 003's bug: frozen bases included
    with pytest.warns(UserWarning, match=r"of which 11 are frozen.*blocks\.0\.q\.weight"):
        CheckpointManager(str(tmp_path)).save(1, model, opt)


def test_extra_state_and_rng_restore_in_one_process(tmp_path):
    model, opt, sched = _trained("plain")
    counters = {"step": 2, "best": 1.5}
    mgr = CheckpointManager(str(tmp_path))
    torch.manual_seed(42)
    mgr.save(2, model, opt, extra={"lr_scheduler": sched, "train": counters})
    expected = torch.rand(3)
    target, topt, tsched = build("plain", "none", 1)
    tcounters = {}
    torch.manual_seed(0)
    mgr.load(target, topt, extra={"lr_scheduler": tsched, "train": tcounters})
    assert tcounters == counters
    assert tsched.state_dict() == sched.state_dict()
    assert torch.equal(torch.rand(3), expected)
    with pytest.raises(CheckpointError, match=r"extra\['data'\] is not in step 2"):
        mgr.load(target, topt, extra={"data": Data(0)})


def test_a_first_start_loads_nothing_or_the_initial_weights(tmp_path):
    """An empty root: load returns None (torchtitan's load returns False there), or with
    init_from loads the model alone; once a step is committed, init_from is not read."""
    model, opt = tiny.make(), None
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mgr = CheckpointManager(str(tmp_path / "run"))
    assert mgr.load(model) is None
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(NotACheckpointError, match="step=3 is not a committed step"):
        mgr.load(model, step=3)

    pretrained = tiny.make(seed=5)
    save_model(pretrained, str(tmp_path / "pretrained"))
    model = tiny.make(seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    report = mgr.load(model, opt, init_from=str(tmp_path / "pretrained"))
    assert all(torch.equal(v, pretrained.state_dict()[k]) for k, v in model.state_dict().items())
    assert opt.state_dict()["state"] == {}  # fresh: a fine-tune's first start
    assert any(n.startswith("no committed step under") for n in report.notes)
    assert mgr.steps() == []  # nothing written

    mgr.save(1, model, opt)
    other = tiny.make(seed=2)
    report = mgr.load(other, init_from=str(tmp_path / "missing"))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in other.state_dict().items())
    assert any("init_from=" in n and "not read" in n for n in report.notes)


def test_base_is_hashed_once_while_frozen_weights_are_unchanged(tmp_path, monkeypatch):
    from dcp_universal.training import base_store

    calls = []
    real = base_store.fingerprint
    monkeypatch.setattr(base_store, "fingerprint", lambda t: calls.append(1) or real(t))
    model, opt, _ = _trained()
    mgr = CheckpointManager(str(tmp_path))
    for step in (1, 2, 3):
        mgr.save(step, model, opt)
    assert len(calls) == 1
    # a resumed job starts from the restored base: no hash, no second base directory
    target, topt, _ = build("lora4", "none", 1, seed=4)
    resumed = CheckpointManager(str(tmp_path))
    resumed.load(target, topt)
    resumed.save(4, target, topt)
    assert len(calls) == 1
    assert len([n for n in os.listdir(tmp_path) if n.startswith("base-")]) == 1
    with torch.no_grad():
        target.blocks[0].q.base_layer.weight.mul_(2)  # an in-place change is noticed
    resumed.save(5, target, topt)
    assert len(calls) == 2 and resumed.manifest(5).base != resumed.manifest(4).base


def test_keep_every_archives_model_only_and_keep_best_keeps_by_metric(tmp_path):
    model, opt, _ = _trained()
    mgr = CheckpointManager(str(tmp_path), keep_last=1, keep_every=4, keep_best=1,
                            best_metric="val_loss")
    losses = {1: 3.0, 2: 1.0, 3: 2.5, 4: 2.0, 5: 2.2, 6: 2.4}
    for step, loss in losses.items():
        mgr.save(step, model, opt, metrics={"val_loss": loss})
    # 6: newest; 2: best val_loss; 4: archived (divisible by 4); the rest deleted
    assert mgr.steps() == [2, 4, 6]
    assert mgr.manifest(2).items["optimizer"] and mgr.manifest(6).items["optimizer"]
    archived = mgr.manifest(4)
    assert archived.archived and not archived.items["optimizer"]
    assert not (tmp_path / "step-00000004" / "optimizer").exists()
    assert not any(f.startswith("optimizer/") for f in archived.files)
    mgr.verify(4)
    target = tiny.make("plain", seed=3)  # an archived LoRA step still loads: base + adapters
    load_model(target, mgr.step_path(4))
    torch.testing.assert_close(_out(target), _out(model), atol=1e-5, rtol=0)
    resumer = tiny.make("lora4")
    with pytest.raises(CheckpointError, match="archived by retention.*optimizer=None"):
        mgr.load(resumer, torch.optim.AdamW(resumer.parameters()), step=4)


def test_a_step_without_optimizer_state_resumes_the_loop_with_a_fresh_optimizer(tmp_path):
    """A model-only step (saved without an optimizer, or converted from another format)
    loads into mgr.load(model, optimizer): the model loaded, the optimizer left fresh,
    and the report says so."""
    from dcp_universal.training.commit import convert

    src = tiny.make("plain", seed=1)
    torch.save({"model": src.state_dict(), "iter_num": 7}, tmp_path / "ckpt.pt")
    convert(str(tmp_path / "ckpt.pt"), str(tmp_path / "converted"))
    saved = CheckpointManager(str(tmp_path / "saved"))
    saved.save(3, src)  # no optimizer
    saved.close()
    for root, step in ((tmp_path / "converted", 7), (tmp_path / "saved", 3)):
        model = tiny.make("plain", seed=2)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        mgr = CheckpointManager(str(root))
        report = mgr.load(model, opt)
        assert all(torch.equal(v, src.state_dict()[k]) for k, v in model.state_dict().items())
        assert opt.state == {} and not report.optimizer_restored
        assert sorted(report.optimizer_fresh) == sorted(n for n, _ in model.named_parameters())
        assert any(f"step {step} holds no optimizer state" in n for n in report.notes)
        model(torch.zeros(1, 3, dtype=torch.long)).sum().backward()
        opt.step()  # the loop goes on, and saves the optimizer from now on
        mgr.save(step + 1, model, opt)
        assert mgr.manifest(step + 1).items["optimizer"]
        mgr.close()


def test_prune_killed_halfway_leaves_only_debris(tmp_path):
    model, opt, _ = _trained("plain")
    mgr = CheckpointManager(str(tmp_path))
    for step in (1, 2, 3):
        mgr.save(step, model, opt)
    # a prune killed after removing step 1's manifest but before its files
    os.remove(tmp_path / "step-00000001" / "manifest.json")
    assert mgr.steps() == [2, 3]
    decision = CheckpointManager(str(tmp_path), keep_last=1).prune(dry_run=True)
    assert decision.delete == [2] and mgr.steps() == [2, 3]
    last = CheckpointManager(str(tmp_path), keep_last=1)
    last.save(4, model, opt)
    assert mgr.steps() == [4]  # uncommitted at once; the files go on a thread of their own
    last.wait()
    assert sorted(os.listdir(tmp_path)) == [  # and the writer's lease and fence
        "step-00000004", f"writer.fence-{last._lease.token}", "writer.lease"]


def test_prune_cli(tmp_path, capsys):
    from dcp_universal.cli import main

    model, opt, _ = _trained("plain")
    mgr = CheckpointManager(str(tmp_path))
    for step in (1, 2, 3, 4):
        mgr.save(step, model, opt)
    assert main(["prune", str(tmp_path), "--keep-last", "1", "--keep-every", "2", "--dry-run"]) == 0
    assert mgr.steps() == [1, 2, 3, 4]
    assert "would delete steps [1, 3]" in capsys.readouterr().out
    assert main(["prune", str(tmp_path), "--keep-last", "1", "--keep-every", "2"]) == 0
    assert mgr.steps() == [2, 4] and not mgr.manifest(2).items["optimizer"]


def test_bases_left_by_crashed_saves_are_checked_or_cleaned(tmp_path):
    model, opt, _ = _trained()
    mgr = CheckpointManager(str(tmp_path))
    mgr.save(1, model, opt)
    base = mgr.manifest(1).base
    # a crash after the base was complete but before step 1 committed
    os.remove(tmp_path / "step-00000001" / "manifest.json")
    # ... and another one that left an unfinished base (no files.json)
    os.makedirs(tmp_path / "base-00000000deadbeef")
    (tmp_path / "base-00000000deadbeef" / "__0_0.distcp").write_bytes(b"partial")
    # and a complete base no step uses any more
    other, oopt, _ = _trained(steps=1)
    with torch.no_grad():
        other.blocks[0].q.base_layer.weight.add_(1)
    CheckpointManager(str(tmp_path / "elsewhere")).save(1, other, oopt)
    orphan = CheckpointManager(str(tmp_path / "elsewhere")).manifest(1).base
    os.rename(tmp_path / "elsewhere" / orphan, tmp_path / orphan)

    fresh = CheckpointManager(str(tmp_path))
    fresh.save(1, model, opt)
    fresh.wait()
    manifest = fresh.manifest(1)
    assert manifest.base == base and manifest.base_files  # reused, with its records
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("base-")) == [base]
    victim = tmp_path / base / "__0_0.distcp"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="fails its checksum"):
        fresh.verify(1)
