"""The merge: ``W + sum(scale * L @ R)`` on blocks of ``W``, for any adapter kind.

Two paths share :func:`merge_block`:

* sharded: :func:`gather_factors` (collective) gathers the small ``R`` factors, and
  ``L`` only when its rows do not already line up with the rank's base rows; then each
  rank merges the block of ``W`` it holds;
* rank 0: the same call with the full base weight, offsets ``(0, 0)``.

The composed load (a LoRA step without ``model/``) calls :func:`merge_block` too, with
factors read from disk.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

from dcp_universal import _comm
from dcp_universal.adapters import Site

__all__ = ["Factors", "gather_factors", "merge_block"]


def _rows_line_up(left: torch.Tensor, base: torch.Tensor) -> bool:
    """True when ``left``'s local shard holds exactly the rows of ``base``'s local shard."""
    if not (isinstance(left, DTensor) and isinstance(base, DTensor)):
        return False
    row_sharded_only = all(isinstance(p, (Shard, Replicate)) and (not isinstance(p, Shard) or p.dim == 0)
                           for p in base.placements)
    return (row_sharded_only and left.placements == base.placements
            and left.device_mesh == base.device_mesh and left.shape[0] == base.shape[0])


@dataclasses.dataclass
class Factors:
    """A term's factors, ready for local merging: ``left`` is either the rank's own rows
    (``left_is_local``) or the full matrix; ``right`` is always full."""

    left: torch.Tensor
    right: torch.Tensor
    scale: float
    left_is_local: bool


@torch.no_grad()
def gather_factors(sites: list[Site], bases: list[torch.Tensor]) -> list[list[Factors]]:
    """The factors of every site's terms, ready for :func:`merge_block`.

    Collective: every rank calls it with the same sites in the same order. All factors
    that need gathering travel in one ``all_gather_object`` per device mesh (plus a
    ``full_tensor()`` for placements other than ``Shard(0)``), not one collective per
    factor.
    """
    _comm.on_caller_thread("gathering adapter factors")
    plans = []  # per site, per term: (term, left is local)
    wanted: list[torch.Tensor] = []
    for site, base in zip(sites, bases):
        terms = []
        for term in site.terms():
            local = not term.left_transposed and _rows_line_up(term.left, base)
            terms.append((term, local))
            if not local:
                wanted.append(term.left)
            wanted.append(term.right)
        plans.append(terms)
    full = iter(_gather_all(wanted))
    out = []
    for terms in plans:
        factors = []
        for term, local in terms:
            left = term.left.to_local() if local else next(full)
            right = next(full)
            factors.append(Factors(left.T if term.left_transposed else left,
                                   right.T if term.right_transposed else right,
                                   term.scale, local))
        out.append(factors)
    return out


def _gather_all(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Full copies of ``tensors``. Dim-0 sharded DTensors on a 1-D mesh travel in one
    all_gather_object per mesh; any other placement falls back to ``full_tensor()``."""
    out: list[torch.Tensor | None] = [None] * len(tensors)
    by_mesh: dict = {}
    for i, t in enumerate(tensors):
        if not isinstance(t, DTensor):
            out[i] = t.detach()
        elif t.device_mesh.ndim == 1 and t.placements == (Shard(0),):
            by_mesh.setdefault(t.device_mesh, []).append(i)
        else:
            out[i] = t.full_tensor()
    for mesh, idx in by_mesh.items():
        group = mesh.get_group()
        pieces = [None] * dist.get_world_size(group)
        dist.all_gather_object(pieces, [tensors[i].to_local().detach().cpu() for i in idx], group=group)
        for n, i in enumerate(idx):
            full = torch.cat([p[n] for p in pieces], dim=0)
            out[i] = full.to(tensors[i].to_local().device)
    return out


@torch.no_grad()
def merge_block(block: torch.Tensor, offsets, factors: list[Factors]) -> torch.Tensor:
    """``block`` of the base weight at ``offsets`` plus the same block of every update.

    Computed in float32 and returned in ``block``'s dtype, as a new tensor.
    """
    r0, c0 = offsets
    nr, nc = block.shape
    out = block.to(torch.float32)  # no copy for float32 blocks: the first addmm makes one
    for n, f in enumerate(factors):
        left = (f.left if f.left_is_local else f.left[r0:r0 + nr]).to(torch.float32)
        right = f.right[:, c0:c0 + nc].to(torch.float32)
        if n == 0 and out.data_ptr() == block.data_ptr():
            out = torch.addmm(out, left, right, alpha=f.scale)
        else:
            out.addmm_(left, right, alpha=f.scale)
    return out.to(block.dtype) if factors else block.clone()


