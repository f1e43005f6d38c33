"""Progress of long CLI work: a tqdm bar of bytes on a terminal, nothing otherwise, and a
closing line with bytes, time and throughput.

tqdm rather than rich: it is the bar the rest of this ecosystem already prints
(transformers, huggingface_hub, safetensors' users), it is one small pure-Python package
already present wherever transformers is, and a byte counter is all that is needed here.
It is optional (the ``progress`` extra): without it the closing line still prints.
"""

from __future__ import annotations

import sys
import time

__all__ = ["Progress"]


class Progress:
    """Bytes done out of ``total``. Call it with each chunk's byte count.

    Args:
        total: bytes expected (None when unknown).
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
                                 unit_divisor=1024, file=sys.stderr, leave=False)

    def __call__(self, nbytes: int) -> None:
        self.done += nbytes
        if self._bar is not None:
            self._bar.update(nbytes)

    def close(self) -> str:
        """Remove the bar; return ``"<bytes> in <s> (<MB/s>)"``."""
        if self._bar is not None:
            self._bar.close()
        seconds = time.perf_counter() - self.start
        rate = self.done / seconds / 1e6 if seconds > 0 else 0.0
        return f"{self.done:,} bytes in {seconds:.2f} s ({rate:.1f} MB/s)"
