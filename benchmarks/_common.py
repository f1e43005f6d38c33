"""Helpers shared by the benchmark scripts: the model, the gloo ranks, the timing.

Not a benchmark itself. The scripts import it as ``_common`` (their own directory is on
``sys.path`` when run as ``python benchmarks/<script>.py``, and spawned ranks inherit it).
"""

from __future__ import annotations

import ctypes
import gc
import math
import os
import shutil
import sys
import threading
import time
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["MiB", "Block", "Model", "model_shape", "merge_lora", "PeakRSS", "timed",
           "init_gloo", "remove_on_rank0", "exit_rank", "torch_save_fsynced", "tree_bytes",
           "elements_sent"]

MiB = 2**20


# ---- the model -----------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.proj(x))


class Model(nn.Module):
    """An embedding and a stack of Linear blocks: parameter bytes without much compute."""

    def __init__(self, vocab: int, hidden: int, n_layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(Block(hidden) for _ in range(n_layers))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        for layer in self.layers:
            x = layer(x)
        return x


def model_shape(size_mb: float, hidden: int) -> tuple[int, int]:
    """(vocab, n_layers) so the fp32 parameters total >= size_mb MiB, a quarter embedding."""
    target = size_mb * MiB
    vocab = max(1, round(target / 4 / (4 * hidden)))
    layer_bytes = 4 * (hidden * hidden + hidden)
    n_layers = max(1, math.ceil((target - 4 * vocab * hidden) / layer_bytes))
    return vocab, n_layers


# ---- a LoRA merge of a gathered state dict (the torch.save baseline) -----------------------

_LORA_KEYS = (".lora_A", ".lora_B", ".lora_A.weight", ".lora_B.weight")
_BASE_INFIX = ".base_layer."


def _factor(state: dict[str, torch.Tensor], module: str, name: str) -> torch.Tensor | None:
    """The own LoRA's factor ``name`` of ``module``: a Linear module's weight, or a bare
    parameter (Embedding)."""
    return state.get(f"{module}.{name}.weight", state.get(f"{module}.{name}"))


@torch.no_grad()
def merge_lora(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A full LoRA state dict as the plain model's: ``W + scale * B @ A`` under ``.weight``.

    Raises:
        KeyError: a ``base_layer`` weight whose ``lora_A`` / ``lora_B`` are missing.
    """
    merged = {}
    for key, value in state.items():
        if key.endswith(_LORA_KEYS):
            continue
        if _BASE_INFIX in key:
            module, _, leaf = key.rpartition(_BASE_INFIX)
            if leaf == "weight":
                a, b = _factor(state, module, "lora_A"), _factor(state, module, "lora_B")
                if a is None or b is None:
                    raise KeyError(f"{key!r}: no lora_A / lora_B of {module} in the state "
                                   "dict to merge with")
                value = value + scale * (b @ a)
            key = f"{module}.{leaf}"
        merged[key] = value
    return merged


# ---- measuring -----------------------------------------------------------------------

_PAGE = os.sysconf("SC_PAGE_SIZE")

try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc: no malloc_trim, baselines may then include freed heap
    _LIBC = None


def _release_free_heap() -> None:
    """Give memory freed by earlier operations back to the OS.

    glibc keeps freed heap pages resident; without trimming, one operation's garbage
    raises the next one's baseline and hides that operation's own allocations.
    """
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _rss() -> int:
    """Anonymous resident memory: resident minus file-backed pages. A memory-mapped
    checkpoint's pages are page cache (shared, reclaimable), not memory a load holds."""
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    return (int(fields[1]) - int(fields[2])) * _PAGE


class PeakRSS:
    """Peak anonymous resident memory during a ``with`` block, sampled by a thread every
    ~5 ms.

    ru_maxrss is a process-lifetime high-water mark, so it cannot attribute a peak to one
    operation; sampling can, at the cost of missing spikes shorter than the interval.
    """

    def __init__(self, interval_s: float = 0.005) -> None:
        self._interval = interval_s
        self._stop = threading.Event()
        self.base = self.peak = 0

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, _rss())

    def __enter__(self) -> "PeakRSS":
        _release_free_heap()
        self.base = self.peak = _rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.base) / MiB


def timed(fn: Callable[[], None]) -> tuple[float, float]:
    """Run ``fn`` on every rank, barrier to barrier: (seconds, peak extra anonymous memory in MiB).

    The seconds are the time until the slowest rank is done.
    """
    # Flush every dirty page first, so no operation's fsync pays for an earlier one's
    # writes (the page cache stays warm: sync writes pages back, it does not evict them).
    if dist.get_rank() == 0:
        os.sync()
    dist.barrier()
    with PeakRSS() as rss:
        start = time.perf_counter()
        fn()
        dist.barrier()
        seconds = time.perf_counter() - start
    return seconds, rss.extra_mb


def elements_sent(fn: Callable[[], None]) -> int:
    """Elements this rank put into gloo collectives while ``fn`` ran (one profiled run).

    Object collectives (``all_gather_object``, ...) count their pickled bytes as elements.
    """
    with torch.profiler.profile(record_shapes=True) as prof:
        fn()
    total = 0
    for e in prof.events():
        if e.name.startswith("gloo:"):
            for shape in e.input_shapes:
                n = 1
                for d in shape:
                    n *= d
                total += n if shape else 0
    return total


def torch_save_fsynced(obj, path: str) -> None:
    """torch.save, then fsync: DCP fsyncs its files, so a baseline without it would not
    be comparable."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def tree_bytes(path: str) -> int:
    """Bytes of every regular file under ``path`` (a file: its own size; missing: 0)."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for folder, _, names in os.walk(path):
        total += sum(os.path.getsize(os.path.join(folder, n)) for n in names)
    return total


# ---- the ranks -----------------------------------------------------------------------

def init_gloo(rank: int, world: int, init_file: str) -> None:
    """Join a gloo group on loopback, with the machine's cores split among the ranks."""
    # Stay on loopback: gloo would otherwise pick an interface from the hostname.
    if os.path.exists("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # Ranks share the machine's cores; oversubscribing threads only adds noise.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)


def remove_on_rank0(paths: list[str]) -> None:
    """Rank 0 deletes ``paths`` (checkpoints between operations, untimed), between
    barriers so no rank reads or writes them meanwhile."""
    dist.barrier()
    if dist.get_rank() == 0:
        for p in paths:
            shutil.rmtree(p, ignore_errors=True)
    dist.barrier()


def exit_rank() -> None:
    """Leave a rank after ``dist.destroy_process_group()``, skipping interpreter teardown.

    With torch 2.13, a gloo rank that has run FSDP2 + DCP sometimes aborts during
    interpreter teardown ("terminate called without an active exception", ~1 run in 4
    with 2 ranks, library not involved). Call this only once the results are written; an
    exception raised before it still propagates to mp.spawn as usual.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def measure(ops: dict[str, Callable[[], None]], order: Callable[[int], list[str]],
            repeats: int) -> list[dict]:
    """Collective: run ``ops`` for ``repeats`` rounds, round ``r`` in ``order(r)``, each
    :func:`timed`; then each op once more, profiled, for the elements it sends. Returns
    every rank's ``{"seconds": {op: [...]}, "peak": {op: MiB}, "sent": {op: n}}``."""
    seconds: dict[str, list[float]] = {op: [] for op in ops}
    peak = {op: 0.0 for op in ops}
    for r in range(repeats):
        for op in order(r):
            s, mb = timed(ops[op])
            seconds[op].append(s)
            peak[op] = max(peak[op], mb)
    sent = {op: elements_sent(ops[op]) for op in ops}
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, {"seconds": seconds, "peak": peak, "sent": sent})
    return everyone
