"""A data sampler whose position survives a change of world size.

Each epoch has one global order of the dataset's indices (a permutation drawn from
``seed + epoch``, or ``0 .. n-1``). The ranks take it in rounds: from the position ``p``
where the current stretch began, rank ``r`` of ``W`` gets positions ``p + r``,
``p + r + W``, ... So after every rank consumed ``k`` samples, exactly the positions
``[p, p + k W)`` are consumed: a prefix of the epoch's order. A resume on ``W'`` ranks
starts a new stretch at ``p + k W``, whatever ``W'`` is, and across the whole run every
sample of the epoch is seen once: none repeated, none skipped.

The position counts what the training loop consumed, not what a ``DataLoader``
prefetched. With ``num_workers=0`` the loader asks the sampler for a batch's indices
when the loop asks for the batch, so the indices yielded are the samples consumed. A
loader with workers asks ahead (``prefetch_factor`` batches per worker): the loop then
says what it consumed, ``sampler.advance(len(batch))`` after each batch, and from the
first call on only ``advance`` moves the position.

No sample is repeated to even out the ranks: in the last round of an epoch some ranks
may get one sample fewer (``drop_last=True`` leaves that round out instead).
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import Sampler

from dcp_universal import _comm
from dcp_universal.errors import CheckpointError, CheckpointMismatchError

__all__ = ["ResumableSampler"]

_FIELDS = ("seed", "shuffle", "drop_last", "dataset_len")


class ResumableSampler(Sampler[int]):
    """This rank's share of one global order per epoch, resumable on any world size.

    Args:
        dataset_len: the number of samples.
        seed: the epoch's order is drawn from ``seed + epoch`` (the same on every rank).
        shuffle: ``False``: the order is ``0 .. dataset_len - 1``.
        drop_last: leave out an epoch's last round when it cannot give every rank a
            sample.
        rank, world_size: default: the process group's (0 and 1 without one). With
            tensor parallelism, the data-parallel rank and size (TP peers take the same
            samples).

    Save and restore it as a per-rank ``extra`` object of
    :meth:`~dcp_universal.CheckpointManager.save` / ``load``; on another world size the
    manager calls :meth:`load_resharded_state_dicts` with every saved rank's state.
    """

    def __init__(self, dataset_len: int, *, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False, rank: int | None = None,
                 world_size: int | None = None) -> None:
        if isinstance(dataset_len, bool) or not isinstance(dataset_len, int) or dataset_len < 0:
            raise ValueError(f"dataset_len={dataset_len!r}: expected a whole number >= 0")
        self.dataset_len, self.seed = dataset_len, int(seed)
        self.shuffle, self.drop_last = bool(shuffle), bool(drop_last)
        self.world_size = _comm.world_size() if world_size is None else int(world_size)
        self.rank = _comm.rank() if rank is None else int(rank)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank={self.rank}, world_size={self.world_size}: expected "
                             "0 <= rank < world_size")
        self.epoch = 0
        self._start = 0      # where this stretch of the epoch's order began
        self._consumed = 0   # samples this rank consumed since then
        self._counting = "yielded"

    # ---- the order ----------------------------------------------------------------------

    def order(self, epoch: int | None = None) -> list[int]:
        """The global order of ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        if not self.shuffle:
            return list(range(self.dataset_len))
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.dataset_len, generator=g).tolist()

    def _end(self) -> int:
        """The position after the last one this epoch hands out."""
        if not self.drop_last:
            return self.dataset_len
        rest = self.dataset_len - self._start
        return self._start + rest - rest % self.world_size

    def _positions(self) -> range:
        """The positions of this rank's remaining samples in the epoch's order."""
        return range(self._start + self._consumed * self.world_size + self.rank, self._end(),
                     self.world_size)

    def __iter__(self) -> Iterator[int]:
        order = self.order()
        for pos in self._positions():
            if self._counting == "yielded":
                self._consumed += 1
            yield order[pos]

    def __len__(self) -> int:
        return len(self._positions())

    # ---- moving on ------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning (call it before each epoch, as with
        ``DistributedSampler``); the current epoch again keeps its position."""
        if epoch != self.epoch:
            self.epoch, self._start, self._consumed = int(epoch), 0, 0

    def advance(self, n: int) -> None:
        """The loop consumed ``n`` more samples on this rank (a ``DataLoader`` with
        workers prefetches: call it after each batch with the batch's size). From the
        first call on, only ``advance`` moves the position."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"advance({n!r}): expected a number of samples >= 0")
        if self._counting == "yielded":  # what was yielded so far includes prefetched ones
            self._counting, self._consumed = "advanced", 0
        self._consumed += n

    @property
    def position(self) -> int:
        """How far into the epoch's order the ranks together are (every rank having
        consumed as many samples as this one)."""
        return min(self._start + self._consumed * self.world_size, self.dataset_len)

    # ---- state ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "start": self._start, "consumed": self._consumed,
                "rank": self.rank, "world_size": self.world_size, "counting": self._counting,
                **{k: getattr(self, k) for k in _FIELDS}}

    def _check(self, state: dict) -> None:
        for k in _FIELDS:
            if state.get(k) != getattr(self, k):
                raise CheckpointMismatchError(
                    f"the saved sampler has {k}={state.get(k)!r}, this one {getattr(self, k)!r}: "
                    "another dataset or order; resuming would repeat or skip samples -> build "
                    "the sampler with the saved run's arguments")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """One saved rank's state (the manager gives each rank its own when the world
        size is the same; the data-parallel size may still differ, as when TP peers
        share a data rank): the position where every saved data rank had consumed as
        many samples as this one (synchronous training); a new stretch starts there."""
        self._check(state)
        # a new stretch where the saved one stopped: the same positions, whatever this
        # run's way of counting
        self.epoch, self._consumed = state["epoch"], 0
        self._start = state["start"] + state["consumed"] * state["world_size"]
        self._counting = state.get("counting", "yielded")

    def load_resharded_state_dicts(self, states: list[dict[str, Any]]) -> None:
        """Every saved rank's state (another world size): this rank starts a new stretch
        at the first position no saved rank consumed."""
        for s in states:
            self._check(s)
        # ranks that shared a data rank (tensor-parallel peers) saved the same state
        by_rank: dict[int, dict] = {}
        for s in states:
            if by_rank.setdefault(s["rank"], s) != s:
                raise CheckpointError(f"two saved states of data rank {s['rank']} differ: "
                                      "the ranks that share it must consume alike")
        states = [by_rank[r] for r in sorted(by_rank)]
        epochs = {s["epoch"] for s in states}
        if len(epochs) != 1:
            raise CheckpointError(f"the saved samplers are in different epochs {sorted(epochs)}")
        world = states[0]["world_size"]
        start = states[0]["start"]
        consumed = {s["rank"]: s["consumed"] for s in states}
        if len(states) != world or set(consumed) != set(range(world)) or \
                {s["start"] for s in states} != {start}:
            raise CheckpointError(
                f"the saved sampler states are not one job's: {len(states)} states for world "
                f"size {world}, ranks {sorted(consumed)}")
        done = {start + r + j * world for r, k in consumed.items() for j in range(k)}
        position = start + min(consumed.values()) * world
        while position in done:
            position += 1
        if any(p >= position for p in done):
            raise CheckpointError(
                f"the saved ranks consumed {sorted(consumed.values())} samples each since "
                f"position {start}: not a prefix of the epoch's order, so a resume on another "
                "world size would repeat some -> save when every rank has consumed as many")
        self.epoch, self._start, self._consumed = states[0]["epoch"], position, 0
        self._counting = states[0].get("counting", "yielded")
