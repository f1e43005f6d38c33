"""The tiny model every test uses, in three configurations.

Dimensions are deliberately not divisible by 2, 3 or 4 so FSDP2 shards are uneven and
some ranks hold empty adapter shards.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from dcp_universal.lora import apply_lora

VOCAB, DIM, HIDDEN = 37, 13, 21

# name -> apply_lora kwargs (None: plain)
VARIANTS = {
    "plain": None,
    "lora4": dict(rank=4, alpha=8.0, targets=["q", "v", "fc1", "wte"]),
    "lora2": dict(rank=2, alpha=3.0, targets=["q", "fc2"]),
    "lora8": dict(rank=8, alpha=8.0, targets=["q", "v", "fc1", "wte"]),
}


class Block(nn.Module):
    def __init__(self, dim: int = DIM, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim, bias=False)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, h):
        x = self.ln(h)
        x = torch.tanh(self.q(x)) * self.v(x)
        return h + self.fc2(torch.relu(self.fc1(x)))


class Tiny(nn.Module):
    def __init__(self, n_blocks: int = 2, dim: int = DIM, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.wte = nn.Embedding(VOCAB, dim)
        self.blocks = nn.ModuleList(Block(dim, hidden) for _ in range(n_blocks))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, idx):
        h = self.wte(idx)
        for b in self.blocks:
            h = b(h)
        return self.head(self.ln_f(h))


def make(variant: str = "plain", seed: int = 0, **kwargs) -> Tiny:
    torch.manual_seed(seed)
    model = Tiny(**kwargs)
    if VARIANTS[variant] is not None:
        apply_lora(model, **VARIANTS[variant])
    return model


@torch.no_grad()
def randomize_adapters(model: nn.Module, seed: int) -> None:
    """Give every adapter factor non-zero values, so merges are not no-ops.

    Under FSDP2 this writes each rank's *local* shard from a rank-specific seed, so the
    shards hold values no rank could infer from its own.
    """
    from torch.distributed.tensor import DTensor

    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_" in name and p.requires_grad:
            local = p.to_local() if isinstance(p, DTensor) else p
            local.copy_(torch.randn(local.shape, generator=g) * 0.3)


def fixed_input() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(1234))


def read_dir(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP directory, read in this process (no process group)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(path).read_metadata()
    out = {k: torch.empty(m.size, dtype=m.properties.dtype)
           for k, m in meta.state_dict_metadata.items()}
    dcp.load(out, storage_reader=FileSystemReader(path), no_dist=True)
    return out


@torch.no_grad()
def reference_merge(model: nn.Module) -> dict[str, torch.Tensor]:
    """Canonical merged weights computed independently of the library (float64), from
    full (gathered) tensors: collective under FSDP2, call on every rank."""
    from torch.distributed.tensor import DTensor

    from dcp_universal.lora import LoRAEmbedding, LoRALinear

    full = lambda t: (t.full_tensor() if isinstance(t, DTensor) else t).double()
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (LoRALinear, LoRAEmbedding)):
            name = name.replace("_checkpoint_wrapped_module.", "").removeprefix("module.")
            factor = lambda f: f.weight if isinstance(f, nn.Module) else f  # noqa: E731
            A, B, W = full(factor(m.lora_A)), full(factor(m.lora_B)), full(m.base_layer.weight)
            delta = B @ A if isinstance(m, LoRALinear) else A @ B
            out[f"{name}.weight"] = (W + m.scale * delta).float()
    return out
