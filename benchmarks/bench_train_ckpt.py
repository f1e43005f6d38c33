"""Benchmark checkpointing a LoRA fine-tune: CheckpointManager against the merged torch.save's merged
torch.save and against plain DCP of the full training state, on 2 CPU ranks.

Run from the repository root::

    .venv/bin/python benchmarks/bench_train_ckpt.py                          # 256 MiB base, 3 checkpoints
    .venv/bin/python benchmarks/bench_train_ckpt.py --size-mb 16 --steps 2   # smoke, ~20 s
    .venv/bin/python benchmarks/bench_train_ckpt.py --json bench_out/train_ckpt.json

A default run takes under 2 minutes on 2 shared CPU cores (35 to 90 s seen).

It spawns 2 gloo ranks on CPU (loopback only) and fine-tunes one model: a frozen base (an
``nn.Embedding`` plus a stack of ``nn.Linear`` blocks, at least ``--size-mb`` MiB of fp32
parameters) with a LoRA adapter on every Linear block (``--lora-rank``; by default the
rank that makes the adapter ~1% of the base's parameters), wrapped with FSDP2 (each
block, then the root), trained by AdamW over the adapter parameters only. Between two
checkpoints it runs ``--train-steps`` real training steps on a tiny batch. At each of
``--steps`` checkpoints (steps 1..N) it saves, in the same run and in an order rotated
from checkpoint to checkpoint:

* ours: ``CheckpointManager.save(step, model, optimizer, extra=...)``: the step writes the
  adapters and the optimizer and training state; the frozen base is written once, by the
  first step, to ``<root>/base-<fingerprint>/`` (so the first save is reported apart);
* a merged torch.save: the full model and optimizer state gathered to rank 0
  (``get_model_state_dict`` / ``get_optimizer_state_dict`` with ``full_state_dict=True,
  cpu_offload=True``), LoRA merged there (``W + alpha/r * B @ A``, ``base_layer.``
  dropped from the names, the ``lora_*`` keys dropped) and written with ``torch.save`` as
  one dict ``{"model", "optimizer", "iter_num", ...}``, fsynced;
* plain DCP of the whole training state: ``dcp.save({"model": get_model_state_dict(model),
  "optim": get_optimizer_state_dict(model, opt)})``.

Bytes per checkpoint are what that checkpoint added on disk (the sizes of its files: for
ours the step directory, plus the base directory at the first step; a merged torch.save keeps one
file per step here, where they overwrite ``ckpt.pt``, so that each step can be measured).
After the last checkpoint it times resuming from it, ``--resume-repeats`` times, each
into a freshly built identical job (built untimed): ``CheckpointManager.load(model,
opt, extra=...)``; ``dcp.load`` of the model and optimizer state dicts followed by
``set_model_state_dict`` / ``set_optimizer_state_dict``; for a merged torch.save, ``torch.load`` of
the file on rank 0 only (installing it into the sharded job, which would take a broadcast,
is not timed: their number is a lower bound).

Resumes are checked, untimed: the resumed jobs' forward pass on a fixed batch, before
and after one more training step, is compared with the trained job's, and the merged torch.save's
merged state dict is loaded into a plain model on rank 0 and compared likewise.

Timing follows ``bench_model_io.py``: an operation runs from a barrier to a barrier (the
slowest rank's time), every writer fsyncs (``torch.save`` included) and dirty pages are
synced before each operation; loads read files just written, so the page cache is warm
for every contender alike. Compare ratios within one run, not absolute times across runs.

``--json PATH`` writes every measurement (per checkpoint and rank) plus the summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from dcp_universal import CheckpointManager
from dcp_universal.lora import apply_lora

from _common import (MiB, Model, exit_rank, init_gloo, merge_lora, model_shape, timed,
                     torch_save_fsynced, tree_bytes)

WORLD = 2
TARGET = "proj"  # every Linear block is adapted
ADAPTER_FRACTION = 0.01  # the default --lora-rank aims at this adapter / base parameter ratio
SEED = 0

# Checked at the end (reported as PASS / MISS, never asserted).
MIN_BYTES_RATIO = 20.0

OURS, SEEDS, DCP = "ours: CheckpointManager", "merged torch.save every step (rank 0)", "plain DCP (full state)"
APPROACHES = (OURS, SEEDS, DCP)


@dataclasses.dataclass(kw_only=True)
class Config:
    """What one benchmark run does."""

    size_mb: float
    """Lower bound on the base model's fp32 parameter size, in MiB."""
    hidden: int
    """Width of the Linear blocks and the embedding."""
    lora_rank: int
    """LoRA rank of every adapted Linear block."""
    lora_alpha: float
    """LoRA alpha (the merge scale is alpha / rank)."""
    steps: int
    """Checkpoints to write, at steps 1..steps."""
    train_steps: int
    """Training steps before each checkpoint."""
    batch: int
    """Sequences per rank and training step."""
    seq: int
    """Tokens per sequence."""
    lr: float
    """AdamW learning rate."""
    resume_repeats: int
    """Timed resumes per approach; the table reports the median."""
    out: str
    """Scratch directory for the checkpoints."""

    def __post_init__(self) -> None:
        for name in ("steps", "train_steps", "batch", "seq", "resume_repeats", "lora_rank", "hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)}: need at least 1")


def default_lora_rank(size_mb: float, hidden: int) -> int:
    """The rank whose adapter holds ~ADAPTER_FRACTION of the base's parameters."""
    vocab, n_layers = model_shape(size_mb, hidden)
    base = vocab * hidden + n_layers * (hidden * hidden + hidden)
    return max(1, round(ADAPTER_FRACTION * base / (n_layers * 2 * hidden)))


# ---- the job -------------------------------------------------------------------------

@dataclasses.dataclass
class _Job:
    model: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    counters: dict

    @property
    def extra(self) -> dict:
        return {"lr_scheduler": self.sched, "train": self.counters}


def _build_job(cfg: Config, vocab: int, n_layers: int) -> _Job:
    torch.manual_seed(SEED)  # every rank builds the same weights (LoRA's A too) before sharding
    model = Model(vocab, cfg.hidden, n_layers)
    # A fine-tune trains the adapters only; apply_lora freezes just the layers it
    # replaces, so the embedding is frozen here.
    model.requires_grad_(False)
    apply_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=[TARGET])
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.1,
                                              total_iters=1000)
    return _Job(model, opt, sched, {"step": 0, "tokens": 0})


def _batch(cfg: Config, vocab: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank- and step-keyed data, independent of the global RNG (step 0: the eval batch,
    the same on every rank)."""
    rank = dist.get_rank() if step else 0
    gen = torch.Generator().manual_seed(SEED + 7919 * step + rank)
    idx = torch.randint(0, vocab, (cfg.batch, cfg.seq), generator=gen)
    target = torch.randn(cfg.batch, cfg.seq, cfg.hidden, generator=gen) * 0.1
    return idx, target


def _train(job: _Job, cfg: Config, vocab: int, n: int, *, first_step: int | None = None) -> list[float]:
    losses = []
    for i in range(n):
        step = (job.counters["step"] if first_step is None else first_step - 1) + 1 + i
        idx, target = _batch(cfg, vocab, step)
        loss = F.mse_loss(job.model(idx), target)
        job.opt.zero_grad(set_to_none=True)
        loss.backward()
        job.opt.step()
        job.sched.step()
        job.counters["step"] += 1
        job.counters["tokens"] += cfg.batch * cfg.seq * dist.get_world_size()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def _eval(job: _Job, cfg: Config, vocab: int) -> torch.Tensor:
    return job.model(_batch(cfg, vocab, 0)[0])


# ---- the saves and resumes -----------------------------------------------------------

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _save_seeds(job: _Job, cfg: Config, path: str) -> None:
    model_sd = get_model_state_dict(job.model, options=_FULL)
    optim_sd = get_optimizer_state_dict(job.model, job.opt, options=_FULL)
    if dist.get_rank() == 0:
        ckpt = {"model": merge_lora(model_sd, cfg.lora_alpha / cfg.lora_rank),
                "optimizer": optim_sd, "iter_num": job.counters["step"],
                "lr_scheduler": job.sched.state_dict(), "config": dataclasses.asdict(cfg)}
        torch_save_fsynced(ckpt, path)


def _training_state(job: _Job) -> dict:
    return {"model": get_model_state_dict(job.model),
            "optim": get_optimizer_state_dict(job.model, job.opt)}


def _save_dcp(job: _Job, path: str) -> None:
    dcp.save(_training_state(job), checkpoint_id=path)


def _load_dcp(job: _Job, path: str) -> None:
    state = _training_state(job)
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(job.model, state["model"])
    set_optimizer_state_dict(job.model, job.opt, state["optim"])


def _load_seeds(path: str, box: dict) -> None:
    if dist.get_rank() == 0:
        box["ckpt"] = torch.load(path, map_location="cpu", weights_only=True)


def _rotated(items: tuple, shift: int) -> list:
    k = shift % len(items)
    return list(items[k:] + items[:k])


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _run(cfg: Config) -> dict:
    rank = dist.get_rank()
    vocab, n_layers = model_shape(cfg.size_mb, cfg.hidden)
    roots = {OURS: os.path.join(cfg.out, "ours"), SEEDS: os.path.join(cfg.out, "seeds"),
             DCP: os.path.join(cfg.out, "dcp")}
    job = _build_job(cfg, vocab, n_layers)
    mgr = CheckpointManager(roots[OURS])

    base_params = sum(p.numel() for p in job.model.parameters() if not p.requires_grad)
    adapter_params = sum(p.numel() for p in job.model.parameters() if p.requires_grad)

    def save(name: str, step: int) -> Callable[[], None]:
        if name == OURS:
            return lambda: mgr.save(step, job.model, job.opt, extra=job.extra)
        if name == SEEDS:
            return lambda: _save_seeds(job, cfg, os.path.join(roots[SEEDS], f"step-{step}.pt"))
        return lambda: _save_dcp(job, os.path.join(roots[DCP], f"step-{step}"))

    saves = {name: [] for name in APPROACHES}  # this rank: per checkpoint
    on_disk = {name: 0 for name in APPROACHES}
    losses = []
    for step in range(1, cfg.steps + 1):
        losses += _train(job, cfg, vocab, cfg.train_steps)
        for name in _rotated(APPROACHES, step - 1):
            seconds, extra_mb = timed(save(name, step))
            record = {"step": step, "seconds": seconds, "peak_extra_mb": extra_mb}
            if rank == 0:  # untimed: what this checkpoint added on disk
                total = tree_bytes(roots[name])
                if name == OURS:  # the root's writer lease is the job's, not a checkpoint's
                    lease = os.path.join(roots[name], "writer.lease")
                    total -= os.path.getsize(lease) if os.path.exists(lease) else 0
                record["bytes"], on_disk[name] = total - on_disk[name], total
                if name == OURS:
                    manifest = mgr.manifest(step)
                    files = sum(f.size for f in manifest.files.values())
                    base = sum(f.size for f in (manifest.base_files or {}).values())
                    if step == 1:  # the base's own files.json completes it
                        base += os.path.getsize(os.path.join(roots[name], manifest.base, "files.json"))
                    record["manifest_bytes"] = files + (base if step == 1 else 0)
                    record["manifest_json_bytes"] = os.path.getsize(
                        os.path.join(mgr.step_path(step), "manifest.json"))
            saves[name].append(record)

    reference = _eval(job, cfg, vocab)
    last = cfg.steps
    resumed: dict[str, _Job] = {}
    seeds_box: dict = {}

    def resume(name: str) -> tuple[Callable[[], None], Callable[[], None]]:
        """(untimed setup, timed load)."""
        if name == SEEDS:
            return seeds_box.clear, lambda: _load_seeds(os.path.join(roots[SEEDS], f"step-{last}.pt"), seeds_box)

        def setup() -> None:
            resumed.pop(name, None)  # one spare job at a time
            resumed[name] = _build_job(cfg, vocab, n_layers)

        if name == OURS:
            return setup, lambda: CheckpointManager(roots[OURS]).load(
                resumed[OURS].model, resumed[OURS].opt, extra=resumed[OURS].extra)
        return setup, lambda: _load_dcp(resumed[DCP], os.path.join(roots[DCP], f"step-{last}"))

    loads = {name: [] for name in APPROACHES}
    for r in range(cfg.resume_repeats):
        for name in _rotated(APPROACHES, r):
            setup, run = resume(name)
            setup()
            seconds, extra_mb = timed(run)
            loads[name].append({"seconds": seconds, "peak_extra_mb": extra_mb})

    checks = _check_resumes(cfg, vocab, n_layers, job, resumed, seeds_box, reference)
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, {"saves": saves, "loads": loads})
    return {"vocab": vocab, "n_layers": n_layers, "hidden": cfg.hidden,
            "base_params": base_params, "adapter_params": adapter_params,
            "adapter_pct": 100 * adapter_params / base_params,
            "losses": losses, "checks": checks, "per_rank": per_rank}


def _check_resumes(cfg: Config, vocab: int, n_layers: int, job: _Job, resumed: dict[str, _Job],
                   seeds_box: dict, reference: torch.Tensor) -> dict:
    """Forward outputs of the resumed jobs against the trained one (rank 0's numbers)."""
    checks: dict = {}
    for name, other in resumed.items():
        checks[name] = {"forward_max_abs_diff": _max_abs_diff(_eval(other, cfg, vocab), reference)}
    if OURS in resumed:
        ours = resumed[OURS]
        checks[OURS]["counters_equal"] = ours.counters == job.counters
        checks[OURS]["scheduler_equal"] = ours.sched.state_dict() == job.sched.state_dict()
    # One more step everywhere, on the same batch: equal outputs need equal optimizer state.
    next_step = job.counters["step"] + 1
    for other in (job, *resumed.values()):
        _train(other, cfg, vocab, 1, first_step=next_step)
    after = _eval(job, cfg, vocab)
    for name, other in resumed.items():
        checks[name]["after_one_step_max_abs_diff"] = _max_abs_diff(_eval(other, cfg, vocab), after)
    if dist.get_rank() == 0 and "ckpt" in seeds_box:
        with torch.device("meta"):
            plain = Model(vocab, cfg.hidden, n_layers)
        plain.load_state_dict(seeds_box["ckpt"]["model"], assign=True)
        with torch.no_grad():
            out = plain(_batch(cfg, vocab, 0)[0])
        checks[SEEDS] = {"forward_max_abs_diff": _max_abs_diff(out, reference),
                         "note": "merged state dict in a plain model on rank 0"}
    dist.barrier()
    return checks


def _worker(rank: int, cfg: dict, init_file: str, result_file: str) -> None:
    init_gloo(rank, WORLD, init_file)
    try:
        result = _run(Config(**cfg))
        if rank == 0:
            with open(result_file, "w") as f:
                json.dump(result, f)
    finally:
        dist.destroy_process_group()
    exit_rank()  # the results are written: skip the teardown that sometimes aborts


# ---- summary -------------------------------------------------------------------------

def _steady(values: list[float]) -> float:
    """The median after the first checkpoint (the first alone when there is no other)."""
    return statistics.median(values[1:]) if len(values) > 1 else values[0]


def _summarise(raw: dict) -> dict:
    per_rank = raw["per_rank"]
    rows = {}
    for name in APPROACHES:
        n = len(per_rank[0]["saves"][name])
        save_s = [max(r["saves"][name][i]["seconds"] for r in per_rank) for i in range(n)]
        nbytes = [per_rank[0]["saves"][name][i]["bytes"] for i in range(n)]
        m = len(per_rank[0]["loads"][name])
        load_s = [max(r["loads"][name][i]["seconds"] for r in per_rank) for i in range(m)]
        rows[name] = {"save_s": save_s, "bytes": nbytes, "resume_s_all": load_s,
                      "first_save_s": save_s[0], "steady_save_s": _steady(save_s),
                      "first_bytes": nbytes[0], "steady_bytes": _steady(nbytes),
                      "resume_s": statistics.median(load_s),
                      "save_peak_extra_mb": max(rec["peak_extra_mb"] for r in per_rank
                                                for rec in r["saves"][name])}
    seeds = rows[SEEDS]["steady_bytes"]
    for row in rows.values():
        row["bytes_ratio_vs_seeds"] = seeds / row["steady_bytes"]
    return rows


def _fmt_bytes(n: float) -> str:
    return f"{n / MiB:.1f} MiB"


def _spawn(cfg: Config) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_train_ckpt_") as scratch:
        init_file = os.path.join(scratch, "init")
        result_file = os.path.join(scratch, "result.json")
        mp.spawn(_worker, args=(dataclasses.asdict(cfg), init_file, result_file),
                 nprocs=WORLD, join=True)
        with open(result_file) as f:
            return json.load(f)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=256,
                        help="minimum fp32 parameter size of the frozen base in MiB (default: 256)")
    parser.add_argument("--hidden", type=int, default=2048, help="layer width (default: 2048)")
    parser.add_argument("--lora-rank", type=int, default=None,
                        help="LoRA rank (default: the rank that makes the adapter ~1%% of the base)")
    parser.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA alpha (default: 32)")
    parser.add_argument("--steps", type=int, default=3,
                        help="checkpoints to write, at steps 1..N (default: 3)")
    parser.add_argument("--train-steps", type=int, default=2,
                        help="training steps before each checkpoint (default: 2)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per rank and step (default: 4)")
    parser.add_argument("--seq", type=int, default=16, help="tokens per sequence (default: 16)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default: 1e-3)")
    parser.add_argument("--resume-repeats", type=int, default=3,
                        help="timed resumes per approach; the median is reported (default: 3)")
    parser.add_argument("--out", default=None,
                        help="where to put the temporary checkpoint directory (default: the "
                             "system's temporary directory); it is deleted at the end")
    parser.add_argument("--json", default=None, help="also write all results to this JSON file")
    args = parser.parse_args(argv)

    lora_rank = args.lora_rank or default_lora_rank(args.size_mb, args.hidden)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    out = tempfile.mkdtemp(prefix="bench_train_ckpt_out_", dir=args.out)
    cfg = Config(size_mb=args.size_mb, hidden=args.hidden, lora_rank=lora_rank,
                 lora_alpha=args.lora_alpha, steps=args.steps, train_steps=args.train_steps,
                 batch=args.batch, seq=args.seq, lr=args.lr, resume_repeats=args.resume_repeats,
                 out=out)
    start = time.perf_counter()
    try:
        raw = _spawn(cfg)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    wall = time.perf_counter() - start
    rows = _summarise(raw)

    print(f"{WORLD} ranks: base {4 * raw['base_params'] / MiB:.1f} MiB fp32 "
          f"({raw['base_params'] / 1e6:.1f}M params: vocab {raw['vocab']}, hidden {raw['hidden']}, "
          f"{raw['n_layers']} Linear blocks), LoRA rank {cfg.lora_rank} alpha {cfg.lora_alpha:g} on "
          f"every block: {raw['adapter_params'] / 1e6:.3f}M adapter params = "
          f"{raw['adapter_pct']:.2f}% of the base; {cfg.steps} checkpoints, {cfg.train_steps} "
          f"training steps before each; {wall:.0f} s", file=sys.stderr)
    print(f"losses: {' '.join(f'{x:.5f}' for x in raw['losses'])}", file=sys.stderr)

    print("| approach | bytes/ckpt (steady) | ratio vs merged torch.save (it / this) | save s (steady) "
          "| first save s | resume s | bytes (first ckpt) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, row in rows.items():
        resume = f"{row['resume_s']:.3f}" + (" (torch.load on rank 0 only)" if name == SEEDS else "")
        print(f"| {name} | {_fmt_bytes(row['steady_bytes'])} | {row['bytes_ratio_vs_seeds']:.1f}x "
              f"| {row['steady_save_s']:.3f} | {row['first_save_s']:.3f} | {resume} "
              f"| {_fmt_bytes(row['first_bytes'])} |")
    print()
    print("steady = median over checkpoints 2..N (checkpoint 1 alone when N = 1); seconds are the "
          f"slowest rank's, barrier to barrier; resume = median of {cfg.resume_repeats}.")
    ratio = rows[OURS]["bytes_ratio_vs_seeds"]
    verdict = "PASS" if ratio >= MIN_BYTES_RATIO else "MISS"
    print(f"LoRA step with a ~{raw['adapter_pct']:.1f}% adapter writes >= {MIN_BYTES_RATIO:g}x fewer "
          f"bytes than a merged torch.save: {verdict} ({ratio:.1f}x)")

    ours0 = raw["per_rank"][0]["saves"][OURS]
    mismatch = [r["step"] for r in ours0
                if abs(r["bytes"] - r["manifest_bytes"] - r["manifest_json_bytes"]) > 0]
    print("ours: bytes on disk = manifest 'files' (+ 'base_files' and the base's files.json at step 1) + manifest.json: "
          + ("yes, every step" if not mismatch else f"NO at steps {mismatch}"))
    parts = []
    for name in (n for n in APPROACHES if n in raw["checks"]):
        c = raw["checks"][name]
        text = f"{name}: forward {c['forward_max_abs_diff']:.3g}"
        if "after_one_step_max_abs_diff" in c:
            text += f", after one more step {c['after_one_step_max_abs_diff']:.3g}"
        if "counters_equal" in c:
            text += f", counters {'equal' if c['counters_equal'] else 'DIFFER'}"
            text += f", scheduler {'equal' if c['scheduler_equal'] else 'DIFFERS'}"
        parts.append(text)
    print("resume check (max |diff| vs the trained job, rank 0): " + "; ".join(parts))

    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"config": dataclasses.asdict(cfg), "wall_s": wall, **raw, "rows": rows,
                       "target": {"min_bytes_ratio": MIN_BYTES_RATIO, "ratio": ratio,
                                  "pass": ratio >= MIN_BYTES_RATIO}}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
