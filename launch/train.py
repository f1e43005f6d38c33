"""Reference trainer: a tiny GPT on Python's own source, checkpointed with dcp_universal.

The text is the bytes of a fixed list of standard-library modules, so every machine has
it and nothing is downloaded; the vocabulary is the 256 byte values. A run can start from
any model or step directory (``--init-from``, model weights only), whatever configuration
wrote it, and ends by printing one line ``EVAL_LOSS <loss>`` (the loss on a fixed
evaluation batch, identical in every configuration).

With ``--ckpt-dir ROOT`` the run is checkpointed by a ``CheckpointManager`` at ROOT: every
``--save-every`` steps and at the last step, which also gets the merged ``model/`` that
``--init-from ROOT/step-<8 digits>`` and ``dcp-universal inspect`` read. A step holds the
model (in LoRA runs: adapters and trainable tensors, the frozen base being written once
as ``ROOT/base-<fingerprint>/``), the optimizer, the LR schedule, the step counter, the
RNG and each rank's data position, so ``--resume auto`` continues a run exactly where
its last committed step left it: same world size, same losses, bit for bit.

Resuming on another number of processes (GPUs) reshards everything: model, optimizer,
LR schedule, step counter, and the data position: the batches are windows of the text in
one global order per epoch (``ResumableSampler``), so the resumed job trains on the
windows the stopped one had not reached, none twice. The RNG stays each rank's own.

Run from the repository root:

    # pre-train with FSDP2 on 4 processes; the last step is ROOT/step-00000150
    torchrun --standalone --nproc_per_node=4 launch/train.py --parallel fsdp \\
        --steps 150 --ckpt-dir runs/pre
    # LoRA fine-tune on 2 processes (DDP works the same way: --parallel ddp), saving every
    # 20 steps; rerun the same line after a crash or pre-emption to continue
    torchrun --standalone --nproc_per_node=2 launch/train.py --parallel fsdp \\
        --init-from runs/pre/step-00000150 --lora-rank 8 --lora-targets q,v,fc1,wte \\
        --lr 3e-3 --steps 100 --ckpt-dir runs/lora --save-every 20 --resume auto
    # ... or continue it on 3 processes
    torchrun --standalone --nproc_per_node=3 launch/train.py --parallel fsdp \\
        --lora-rank 8 --lora-targets q,v,fc1,wte --lr 3e-3 --steps 100 \\
        --ckpt-dir runs/lora --save-every 20 --resume auto
    # ... or on a 2-D mesh: FSDP x TP (--tp 2: (dp 2, tp 2) on 4 processes), or HSDP
    torchrun --standalone --nproc_per_node=4 launch/train.py --parallel fsdp --tp 2 \\
        --lora-rank 8 --lora-targets q,v,fc1,wte --lr 3e-3 --steps 100 \\
        --ckpt-dir runs/lora --save-every 20 --resume auto
    # one process, no process group: evaluate and sample (an inference node)
    python launch/train.py --parallel none --init-from runs/lora/step-00000100 \\
        --eval-only --sample 200

The model flags (--n-layer, --n-head, --n-embd, --block-size) must match the checkpoint's;
a mismatch fails with the keys and both shapes. See launch/demo.sh for the whole tour.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import NoReturn

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.nn.parallel import DistributedDataParallel as DDP

from dcp_universal import CheckpointManager, ResumableSampler, load_model
from dcp_universal.lora import apply_lora
from model import GPT, GPTConfig

# Modules present in every CPython >= 3.10, read in this order.
SOURCES = ["argparse.py", "dataclasses.py", "functools.py", "heapq.py", "os.py",
           "random.py", "textwrap.py"]
EVAL_SEED = 1234  # depends on neither rank nor world size: one eval batch for all runs
EVAL_BATCH = 32
MIN_LR_RATIO = 0.1  # the cosine schedule ends at 10% of --lr


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parallel", choices=["fsdp", "ddp", "none"], default="fsdp")
    p.add_argument("--tp", type=int, default=1, metavar="N",
                   help="fsdp: tensor parallelism of degree N inside each group of N processes "
                   "(a (world/N, N) mesh: FSDP over the first dimension, TP over the second)")
    p.add_argument("--hsdp", type=int, default=1, metavar="R",
                   help="fsdp: hybrid sharding, R replicas each sharded over world/R processes")
    p.add_argument("--lora-rank", type=int, default=0, help="0: train the full model")
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-targets", default="q,v", help="comma-separated module names")
    p.add_argument("--init-from", help="model directory or step directory to start from "
                   "(weights only; ignored when --resume auto finds a step)")
    p.add_argument("--ckpt-dir", metavar="ROOT", help="checkpoint root (CheckpointManager)")
    p.add_argument("--save-every", type=int, default=0, metavar="N",
                   help="save every N steps (0: only the last step, which is always saved)")
    p.add_argument("--keep-last", type=int, metavar="K", help="keep the K newest steps")
    p.add_argument("--async-save", action="store_true",
                   help="save with blocking=False: training stalls only for the snapshot, "
                        "the write and commit run in the background (the last step blocks)")
    p.add_argument("--storage-options", type=json.loads, default=None, metavar="JSON",
                   help='fsspec options for s3:// roots, e.g. \'{"endpoint_url": "http://127.0.0.1:5000"}\'')
    p.add_argument("--resume", choices=["auto", "none"], default="none",
                   help="auto: continue from ROOT's latest committed step if there is one")
    p.add_argument("--reshard-per-rank", choices=["error", "skip"], default="error",
                   help="no effect (kept for earlier command lines): a resume on another "
                   "number of processes continues the data order without it")
    p.add_argument("--kill-after", type=int, metavar="M",
                   help="simulate pre-emption: every rank exits with status 1 right after "
                   "step M (and its save, when M is a save step)")
    p.add_argument("--steps", type=int, default=150, help="total steps of the run")
    p.add_argument("--warmup-steps", type=int, default=10, help="linear warm-up, then cosine")
    p.add_argument("--batch-size", type=int, default=16, help="per rank")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=25, metavar="N", help="print the loss every N steps")
    p.add_argument("--eval-only", action="store_true", help="skip training")
    p.add_argument("--sample", type=int, default=0, metavar="N", help="print N generated bytes")
    args = p.parse_args()
    if args.eval_only and args.ckpt_dir:
        p.error("--eval-only trains and saves nothing: drop --ckpt-dir "
                "(to evaluate a step, pass its directory to --init-from)")
    for flag in ("save_every", "log_every", "warmup_steps"):
        if getattr(args, flag) < 0:
            p.error(f"--{flag.replace('_', '-')}={getattr(args, flag)}: must be >= 0")
    if args.kill_after is not None and not 1 <= args.kill_after < args.steps:
        p.error(f"--kill-after={args.kill_after}: must be a step before the last, 1..{args.steps - 1}")
    return args


def load_corpus() -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) byte tensors: the first 90% of the text and the rest."""
    libdir = os.path.dirname(os.__file__)
    text = b"".join(open(os.path.join(libdir, name), "rb").read() for name in SOURCES)
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    n = int(0.9 * len(data))
    return data[:n], data[n:]


def get_batch(data: torch.Tensor, batch_size: int, block_size: int, gen: torch.Generator):
    """Random windows (the evaluation batch: one fixed seed for every run)."""
    ix = torch.randint(len(data) - block_size - 1, (batch_size,), generator=gen)
    x = torch.stack([data[i:i + block_size] for i in ix])
    y = torch.stack([data[i + 1:i + 1 + block_size] for i in ix])
    return x, y


class Batches:
    """The training batches: non-overlapping windows of the text in the order of a
    :class:`~dcp_universal.ResumableSampler` (one global order per epoch, each rank its
    share), so that a resume on another number of processes continues the order where
    the job stopped: across the run every window of an epoch is trained on once.

    ``drop_last``: every rank gets as many windows per epoch, so all ranks move to the
    next epoch at the same step (the collectives of FSDP and DDP need that).
    """

    def __init__(self, data: torch.Tensor, batch_size: int, block_size: int, seed: int,
                 rank: int, world_size: int) -> None:
        self.data, self.batch_size, self.block_size = data, batch_size, block_size
        self.sampler = ResumableSampler((len(data) - 1) // block_size, seed=seed,
                                        drop_last=True, rank=rank, world_size=world_size)
        self._it = None

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if len(self.sampler) < self.batch_size:  # the epoch's rest: too few for a batch
            self.sampler.set_epoch(self.sampler.epoch + 1)
            self._it = None
        if self._it is None:
            self._it = iter(self.sampler)
        ix = [next(self._it) * self.block_size for _ in range(self.batch_size)]
        x = torch.stack([self.data[i:i + self.block_size] for i in ix])
        y = torch.stack([self.data[i + 1:i + 1 + self.block_size] for i in ix])
        return x, y

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
        self._it = None

    def load_resharded_state_dicts(self, states: list[dict]) -> None:
        self.sampler.load_resharded_state_dicts(states)
        self._it = None


@torch.no_grad()
def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> None:
    """``torch.nn.utils.clip_grad_norm_`` for parameters on several meshes (FSDP x TP
    puts TP'd weights on the 2-D mesh and the rest on the data-parallel one, which torch's
    version cannot stack): each gradient's norm made whole, then one scale for all."""
    grads = [p.grad for p in params if p.grad is not None]
    norms = [torch.linalg.vector_norm(g) for g in grads]
    total = torch.stack([n.full_tensor() if isinstance(n, DTensor) else n for n in norms]).norm()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale)


def tp_plan(model: GPT) -> dict:
    """Megatron-style tensor parallelism of every block: q, k, v and fc1 column-wise, o
    and fc2 row-wise. An adapted layer (the library's LoRA) puts its base layer in the
    plan, and the factor that lines up with the sharded dimension: lora_B under a
    column-wise base, lora_A under a row-wise one (the other factor stays replicated)."""
    plan = {}
    for i, block in enumerate(model.blocks):
        for name, style in (("attn.q", ColwiseParallel), ("attn.k", ColwiseParallel),
                            ("attn.v", ColwiseParallel), ("attn.o", RowwiseParallel),
                            ("mlp.fc1", ColwiseParallel), ("mlp.fc2", RowwiseParallel)):
            fqn = f"blocks.{i}.{name}"
            if hasattr(model.get_submodule(fqn), "base_layer"):
                plan[f"{fqn}.base_layer"] = style()
                plan[f"{fqn}.{'lora_B' if style is ColwiseParallel else 'lora_A'}"] = style()
            else:
                plan[fqn] = style()
    return plan


def lr_lambda(warmup: int, total: int):
    """Linear warm-up over ``warmup`` steps, then cosine decay to MIN_LR_RATIO at ``total``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


@torch.no_grad()
def evaluate(model: torch.nn.Module, val: torch.Tensor, block_size: int) -> float:
    # Every rank scores the whole batch (FSDP2 needs all ranks in each forward anyway), so
    # the number is the same on every rank and in every configuration.
    x, y = get_batch(val, EVAL_BATCH, block_size, torch.Generator().manual_seed(EVAL_SEED))
    model.eval()
    _, loss = model(x, y)
    model.train()
    return loss.item()


def main() -> None:
    args = parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    distributed = args.parallel != "none"
    if distributed and "WORLD_SIZE" not in os.environ:
        raise SystemExit(f"--parallel {args.parallel} needs torchrun; for one process use --parallel none")
    if not distributed and world > 1:
        raise SystemExit(f"--parallel none runs one process, but torchrun started {world}")
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0

    def log(*a) -> None:
        if rank == 0:
            print(*a, flush=True)

    def fail(message: str) -> NoReturn:
        """Stop every rank with one message (rank 0's) instead of a traceback per rank."""
        if rank == 0:
            print(f"train.py: error: {message}", file=sys.stderr, flush=True)
        if distributed:
            dist.destroy_process_group()
        sys.exit(2)

    # Same seed on every rank: FSDP2 keeps each rank's slice of its own initial weights,
    # so the ranks must agree on them (LoRA's random A factors included).
    torch.manual_seed(args.seed)
    config = GPTConfig(block_size=args.block_size, n_layer=args.n_layer,
                       n_head=args.n_head, n_embd=args.n_embd)
    model = GPT(config)
    if args.lora_rank > 0:
        targets = [t for t in args.lora_targets.split(",") if t]
        apply_lora(model, rank=args.lora_rank, alpha=args.lora_alpha, targets=targets)
    n_all = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"{args.parallel} x{world}: {n_all / 1e3:.1f}k parameters, {n_train / 1e3:.1f}k trainable"
        + (f" (LoRA rank {args.lora_rank} on {args.lora_targets})" if args.lora_rank else ""))

    data_rank, data_world = rank, world  # TP peers take the same batches
    if args.parallel == "fsdp":
        if world % args.tp or world % args.hsdp or (args.tp > 1 and args.hsdp > 1):
            fail(f"--tp {args.tp} / --hsdp {args.hsdp}: each must divide the {world} "
                 "processes, and only one of them may be above 1")
        if args.tp > 1:
            mesh = init_device_mesh("cpu", (world // args.tp, args.tp), mesh_dim_names=("dp", "tp"))
            parallelize_module(model, mesh["tp"], tp_plan(model))
            shard_mesh = mesh["dp"]
            data_rank, data_world = mesh["dp"].get_local_rank(), world // args.tp
        elif args.hsdp > 1:
            shard_mesh = init_device_mesh("cpu", (args.hsdp, world // args.hsdp),
                                          mesh_dim_names=("replicate", "shard"))
        else:
            shard_mesh = init_device_mesh("cpu", (world,))
        for block in model.blocks:
            fully_shard(block, mesh=shard_mesh)
        fully_shard(model, mesh=shard_mesh)
    elif args.tp > 1 or args.hsdp > 1:
        fail("--tp and --hsdp need --parallel fsdp")
    elif args.parallel == "ddp":
        model = DDP(model)
    core = model.module if isinstance(model, DDP) else model  # for generate()

    train, val = load_corpus()
    mgr = None
    if not args.eval_only:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(args.warmup_steps, args.steps))
        data = Batches(train, args.batch_size, args.block_size, args.seed, data_rank, data_world)
        counters = {"step": 0}
        extra = {"lr_scheduler": scheduler, "train": counters, "data": data}
        if args.ckpt_dir:
            mgr = CheckpointManager(args.ckpt_dir, keep_last=args.keep_last,
                                    storage_options=args.storage_options)

    # Loading after wrapping is the point: the checkpoint does not care how it was written.
    latest = mgr.latest_step() if mgr else None
    if latest is not None and args.resume == "none":
        fail(f"--ckpt-dir {args.ckpt_dir} already holds committed steps {mgr.steps()}; pass "
             f"--resume auto to continue from step {latest}, or give an empty --ckpt-dir")
    if mgr and args.resume == "auto" and latest is None:
        log(f"--resume auto: no committed step under {args.ckpt_dir} yet, starting at step 0")
    if latest is not None:
        saved_world = mgr.manifest(latest).world_size
        t0 = time.perf_counter()
        # the data position reshards (Batches.load_resharded_state_dicts); the RNG is
        # each rank's own on another world size
        report = mgr.load(model, optimizer, extra=extra)
        log(f"resumed {mgr.step_path(latest)} (saved by {saved_world} processes) in "
            f"{time.perf_counter() - t0:.2f} s: at step {counters['step']}, "
            f"lr {scheduler.get_last_lr()[0]:.3g}, data at window {data.sampler.position} of "
            f"{data.sampler.dataset_len} in epoch {data.sampler.epoch}\n{report.summary()}")
        if args.init_from:
            log(f"--init-from {args.init_from} ignored: the run resumes from its own checkpoint")
    elif args.init_from:
        report = load_model(model, args.init_from, storage_options=args.storage_options)
        log(f"loaded {args.init_from}:\n{report.summary()}")

    if not args.eval_only:
        if counters["step"] >= args.steps:
            log(f"already at step {counters['step']} of --steps {args.steps}: nothing to train")
        first = counters["step"] + 1
        t0 = time.perf_counter()
        while counters["step"] < args.steps:
            x, y = data.next()
            _, loss = model(x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            clip_grad_norm(params, 1.0)
            optimizer.step()
            scheduler.step()
            counters["step"] += 1
            step = counters["step"]
            if (step in (first, args.steps, args.kill_after)
                    or (args.log_every and step % args.log_every == 0)):
                # repr: the exact float, so runs can be compared bit for bit
                log(f"step {step:4d}  loss {loss.item()!r}  (rank 0's batch)  "
                    f"{time.perf_counter() - t0:.1f} s")
            save_now = mgr is not None and (
                step == args.steps or (args.save_every > 0 and step % args.save_every == 0))
            if save_now:
                t1 = time.perf_counter()
                blocking = not args.async_save or step == args.steps
                out = mgr.save(step, model, optimizer, extra=extra, merged=step == args.steps,
                               blocking=blocking)
                if blocking:
                    log(f"saved {out} in {time.perf_counter() - t1:.2f} s")
                else:
                    log(f"step {step}: staged in {out.stall_s:.3f} s; written in the background")
            if step == args.kill_after:
                if mgr is not None:
                    mgr.wait()  # as a pre-emption notice (SIGTERM) handler would
                log(f"--kill-after {step}: simulating pre-emption "
                    f"({'step saved' if save_now else 'no save at this step'}); "
                    "every rank exits with status 1")
                if distributed:
                    dist.barrier()  # no rank may still be inside a collective
                sys.stdout.flush()
                os._exit(1)  # no clean-up, as after a SIGKILL

    if mgr is not None:
        mgr.close()  # every asynchronous save committed
    log(f"EVAL_LOSS {evaluate(model, val, args.block_size):.6f}")
    if args.sample:
        # One seed on every rank: under FSDP2 the ranks generate in lock-step.
        start = torch.tensor([[ord("\n")]])
        out = core.generate(start, args.sample, generator=torch.Generator().manual_seed(args.seed))
        log("--- sample ---\n" + bytes(out[0, 1:].tolist()).decode("utf-8", errors="replace")
            + "\n--------------")
    if distributed:
        dist.destroy_process_group()
        # torch 2.13's gloo ranks sometimes abort in interpreter teardown after a clean
        # destroy (seen without dcp_universal too); the work is done and flushed, so leave
        # without running it and let torchrun see success.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
