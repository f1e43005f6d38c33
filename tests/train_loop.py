"""A deterministic little training loop shared by the resume tests."""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

import tiny
from dcp_universal.model.view import reshard
from dcp_universal.model.names import canonical_parameters


class Data:
    """A per-rank data position: differs across ranks, so it is saved per rank."""

    def __init__(self, rank: int) -> None:
        self.rank, self.pos = rank, 0

    def next(self) -> torch.Tensor:
        self.pos += 1 + self.rank
        # the global RNG drives sampling, so a resume must restore it to match
        return (torch.randint(0, tiny.VOCAB, (4, 7)) + self.pos) % tiny.VOCAB

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]


def build(variant: str, mode: str, world_size: int, *, lr: float = 1e-2, seed: int = 0):
    model = tiny.make(variant, seed=seed)
    if mode == "fsdp":
        mesh = init_device_mesh("cpu", (world_size,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    elif mode == "ddp":
        model = DDP(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                            weight_decay=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched


def train(model, opt, sched, data, counters, until: int, on_step=None) -> list[torch.Tensor]:
    losses = []
    while counters["step"] < until:
        logits = model(data.next())
        loss = logits.logsumexp(-1).mean() - logits[..., 0].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        counters["step"] += 1
        losses.append(loss.detach().clone())
        if on_step is not None:
            on_step(counters["step"])
    return losses


def trained_job(variant: str = "plain", *, seed: int = 0, steps: int = 2):
    """``(model, opt, sched, counters)`` of one process trained ``steps`` steps."""
    torch.manual_seed(seed)
    model, opt, sched = build(variant, "none", 1, seed=seed)
    counters = {"step": 0}
    train(model, opt, sched, Data(0), counters, steps)
    return model, opt, sched, counters


def full(t):
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def snapshot(model, opt) -> tuple[dict, dict]:
    """Copies of the model's state dict and the optimizer's moments (one process)."""
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {k: {n: t.clone() for n, t in v.items()} for k, v in moments(model, opt).items()})


def assert_same(model, opt, snap: tuple[dict, dict]) -> None:
    """Model and optimizer hold exactly ``snap`` (``torch.equal``, every tensor)."""
    params, states = snap
    assert all(torch.equal(v, params[k]) for k, v in model.state_dict().items())
    now = moments(model, opt)
    assert now.keys() == states.keys()
    assert all(torch.equal(now[k][n], states[k][n]) for k in states for n in states[k])


def moments(model, opt) -> dict[str, dict[str, torch.Tensor]]:
    """Optimizer state by canonical parameter name, gathered (collective under FSDP2)."""
    reshard(model)
    by_id = {id(p): n for n, p in canonical_parameters(model).items()}
    out = {}
    for group in opt.param_groups:
        for p in group["params"]:
            out[by_id[id(p)]] = {k: full(v) for k, v in opt.state.get(p, {}).items()}
    return out
