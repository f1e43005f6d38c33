"""The merge: ``W + sum(scale * L @ R)``, rescaled where the kind says so (DoRA:
``(m / ||V||) * V`` with ``V`` the sum), on blocks of ``W``, for any adapter kind.

Every path builds one :class:`Merge` per adapted weight and calls :func:`merge_block`:

* sharded: :func:`prepare` (collective) gathers the small ``R`` factors, ``L`` only
  when its rows do not already line up with the rank's base rows, and any magnitude
  vector; for a rescale it then computes the norms of ``V`` (each rank sums the squares
  of its own block, one reduction per weight); then each rank merges the block of ``W``
  it holds;
* rank 0: :func:`gather_factors` on every rank, then :func:`add_norms` and
  :func:`merge_block` with the full base weight, offsets ``(0, 0)``;
* the composed load (a LoRA step without ``model/``), with factors read from disk.

The norms need the whole row (or column) of ``V``, which a rank holds only when the
base is not sharded across it: under FSDP's row sharding a per-row norm (DoRA on a
Linear) is local and a per-column one (an Embedding, a Conv1D) is reduced; under a
``RowwiseParallel`` base the reverse. The reduction is DTensor's own (``sum`` of the
squares over the sharded dim), so every placement, replicated and uneven ones
included, counts each element once.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence, cast

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

from dcp_universal import _comm
from dcp_universal._torch_compat import local_block
from dcp_universal.adapters import Site, Term, expert_pieces

__all__ = ["Factors", "Merge", "prepare", "gather_factors", "factors_of", "add_norms", "norms",
           "merge_block"]


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
    (``left_is_local``) or the full matrix; ``right`` is always full. For a term on a
    3-D expert weight both are 3-D: ``(E, rows, r)`` and ``(E, r, columns)``."""

    left: torch.Tensor
    right: torch.Tensor
    scale: float
    left_is_local: bool


@dataclasses.dataclass
class Merge:
    """One adapted weight's update, ready for :func:`merge_block` on any of its blocks.

    Attributes:
        factors: the terms' factors.
        magnitude: the whole rescale vector (DoRA's ``m``), or ``None``.
        axis: ``magnitude`` runs along the weight's rows (0) or columns (1).
        norms: the whole ``||W + sum(terms)||`` along ``axis`` (float32), set by
            :func:`add_norms`; needed when there is a ``magnitude``.
    """

    factors: list[Factors]
    magnitude: torch.Tensor | None = None
    axis: int = 0
    norms: torch.Tensor | None = None


@torch.no_grad()
def prepare(sites: list[Site], bases: list[torch.Tensor]) -> list[Merge]:
    """:func:`gather_factors`, then :func:`add_norms` on ``bases`` (the weights the
    ranks hold). Collective: every rank calls it with the same sites in the same order."""
    merges = gather_factors(sites, bases)
    add_norms(merges, bases)
    return merges


@torch.no_grad()
def gather_factors(sites: list[Site], bases: list[torch.Tensor]) -> list[Merge]:
    """The factors (and magnitudes) of every site's update, ready for
    :func:`merge_block` once :func:`add_norms` has run where a site has a magnitude.

    Collective: every rank calls it with the same sites in the same order. All tensors
    that need gathering travel in one ``all_gather_object`` per device mesh (plus a
    ``full_tensor()`` for placements other than ``Shard(0)``), not one collective per
    factor.
    """
    _comm.on_caller_thread("gathering adapter factors")
    plans = []  # per site: ([(term, left is local)], magnitude)
    wanted: list[torch.Tensor] = []
    for site, base in zip(sites, bases):
        terms = []
        for term in site.terms():
            local = not term.left_transposed and not term.experts and _rows_line_up(term.left, base)
            terms.append((term, local))
            if not local:
                wanted.append(term.left)
            wanted.append(term.right)
        magnitude = site.magnitude()
        if magnitude is not None:
            wanted.append(magnitude.vector)
        plans.append((terms, magnitude))
    full = iter(_gather_all(wanted))
    out = []
    for terms, magnitude in plans:
        factors = []
        for term, local in terms:
            left = cast(DTensor, term.left).to_local() if local else next(full)
            factors.append(factors_of(term, left, next(full), left_is_local=local))
        out.append(Merge(factors) if magnitude is None
                     else Merge(factors, next(full), magnitude.axis))
    return out


def factors_of(term, left: torch.Tensor, right: torch.Tensor, *,
               left_is_local: bool = False) -> Factors:
    """The :class:`Factors` of ``term`` (an :class:`~dcp_universal.adapters.Term`, or a
    manifest's ``AdapterTerm``: the same fields, spelled ``left_t`` / ``right_t``) from
    its tensors ``left`` and ``right`` (whole, or ``left`` the rank's own rows)."""
    if isinstance(term, Term):
        left_t, right_t = term.left_transposed, term.right_transposed
    else:
        left_t, right_t = term.left_t, term.right_t
    if term.experts:
        return Factors(expert_pieces(left, term.experts, term.left_split, left_t),
                       expert_pieces(right, term.experts, term.right_split, right_t),
                       term.scale, False)
    return Factors(left.T if left_t else left, right.T if right_t else right, term.scale,
                   left_is_local)


@torch.no_grad()
def add_norms(merges: list[Merge], bases: list[torch.Tensor], *,
              collective: bool = True) -> None:
    """Set the norms of every merge with a magnitude, from the weights in ``bases``
    (:func:`norms`; collective as it is, one reduction per rescaled merge, in order)."""
    for m, base in zip(merges, bases):
        if m.magnitude is not None and m.norms is None:
            m.norms = norms(base, m.axis, m.factors, collective=collective).to(
                m.magnitude.device)


@torch.no_grad()
def norms(base: torch.Tensor, axis: int, factors: Sequence[Factors] = (), *,
          collective: bool = True) -> torch.Tensor:
    """The whole ``||W + sum(terms)||`` of every row (``axis`` 0) or column (1) of the
    weight ``base`` (a DTensor or a plain tensor), in float32.

    Collective when ``base`` is a DTensor and ``collective``: one reduction (every rank
    calls it for the same weights in the same order). Without ``collective``, ``base``
    must be whole on this rank.
    """
    block, offsets = local_block(base)
    if tuple(block.shape) != tuple(base.shape) and not collective:
        raise RuntimeError(f"the norms of a rescaled adapter need the whole weight "
                           f"{tuple(base.shape)}, this rank holds {tuple(block.shape)}")
    squares = merge_block(block, offsets, Merge(list(factors)), dtype=torch.float32).square_()
    if isinstance(base, DTensor) and collective:
        shape = tuple(base.shape)
        stride = tuple(torch.empty(shape, device="meta").stride())
        whole = DTensor.from_local(squares, base.device_mesh, base.placements,
                                   shape=shape,  # type: ignore[arg-type]  # any int tuple works
                                   stride=stride, run_check=False)
        # a DTensor's sum is a DTensor (torch's stubs say Tensor)
        return cast(DTensor, whole.sum(dim=1 - axis)).full_tensor().sqrt()
    return squares.sum(dim=1 - axis).sqrt()


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
        pieces: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(pieces, [tensors[i].to_local().detach().cpu() for i in idx], group=group)
        for n, i in enumerate(idx):
            full = torch.cat([p[n] for p in pieces], dim=0)
            out[i] = full.to(tensors[i].to_local().device)
    return cast("list[torch.Tensor]", out)  # every slot filled


@torch.no_grad()
def merge_block(block: torch.Tensor, offsets, m: Merge,
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """``block`` of the base weight at ``offsets``, merged: plus the same block of every
    term, times the same rows (or columns) of ``magnitude / norms`` when there is a
    magnitude.

    Computed in float32 and returned as a new tensor in ``dtype`` (default: ``block``'s).
    """
    if block.dim() == 3:
        return _merge_experts(block, offsets, m, dtype)
    r0, c0 = offsets
    nr, nc = block.shape
    out = block.to(torch.float32)  # no copy for float32 blocks: the first addmm makes one
    for n, f in enumerate(m.factors):
        left = (f.left if f.left_is_local else f.left[r0:r0 + nr]).to(torch.float32)
        right = f.right[:, c0:c0 + nc].to(torch.float32)
        if n == 0 and out.data_ptr() == block.data_ptr():
            out = torch.addmm(out, left, right, alpha=f.scale)
        else:
            out.addmm_(left, right, alpha=f.scale)
    if m.magnitude is not None:
        if m.norms is None:
            raise RuntimeError("merge_block of a rescaled adapter before add_norms")
        scale = m.magnitude.to(torch.float32) / m.norms
        out = out * (scale[r0:r0 + nr, None] if m.axis == 0 else scale[None, c0:c0 + nc])
    elif out.data_ptr() == block.data_ptr():
        out = out.clone()
    return out.to(dtype or block.dtype)


def _merge_experts(block: torch.Tensor, offsets, m: Merge, dtype) -> torch.Tensor:
    """:func:`merge_block` of a block ``(experts, rows, columns)`` of a 3-D expert weight:
    each expert the rank holds gets its own pieces' product (one batched matmul)."""
    if m.magnitude is not None:
        raise RuntimeError("a rescaled (DoRA) update of an expert weight")
    e0, r0, c0 = offsets
    ne, nr, nc = block.shape
    out = block.to(torch.float32)
    for f in m.factors:
        left = f.left[e0:e0 + ne, r0:r0 + nr].to(torch.float32)
        right = f.right[e0:e0 + ne, :, c0:c0 + nc].to(torch.float32)
        out = torch.baddbmm(out, left, right, alpha=f.scale)  # a new tensor each time
    if out.data_ptr() == block.data_ptr():
        out = out.clone()
    return out.to(dtype or block.dtype)
