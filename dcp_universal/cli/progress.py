"""Progress of long CLI work: a tqdm bar of bytes (total, percentage, time left) on a
terminal, nothing otherwise, and a closing line with bytes, time and throughput.

tqdm rather than rich: it is the bar the rest of this ecosystem already prints
(transformers, huggingface_hub, safetensors' users), it is one small pure-Python package
already present wherever transformers is, and a byte counter is all that is needed here.
It is optional (the ``progress`` extra): without it the closing line still prints.
"""

from __future__ import annotations

import sys
import time

__all__ = ["Progress"]


def human(n: float) -> str:
    """Bytes in decimal units (kB, MB, GB: the units of the closing lines' MB/s)."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class Progress:
    """Bytes done out of ``total``. Call it with each chunk's byte count.

    On a terminal with tqdm (the ``progress`` extra) a bar shows bytes done out of the
    total, the percentage, the rate and the time left, in decimal units like the closing
    line. A total learnt later goes in through :meth:`set_total` (an export knows its
    size once it has opened its source).

    Args:
        total: bytes expected (None when unknown yet).
        desc: the bar's label.
        enabled: False for ``--quiet``; a bar is drawn only on a terminal (stderr).
    """

    def __init__(self, total: int | None, desc: str, *, enabled: bool = True) -> None:
        self.done = 0
        self.start = time.perf_counter()
        self._bar = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True,
                                 unit_divisor=1000, file=sys.stderr, leave=False)

    def set_total(self, total: int) -> None:
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def __call__(self, nbytes: int) -> None:
        self.done += nbytes
        if self._bar is not None:
            self._bar.update(nbytes)

    def close(self) -> str:
        """Remove the bar; return ``"<bytes> bytes (<MB>) in <s> (<MB/s>)"``."""
        if self._bar is not None:
            self._bar.close()
        seconds = time.perf_counter() - self.start
        rate = self.done / seconds / 1e6 if seconds > 0 else 0.0
        return f"{self.done:,} bytes ({human(self.done)}) in {seconds:.2f} s ({rate:.1f} MB/s)"
