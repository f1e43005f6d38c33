"""A fault-injecting fsspec file system: local files under ``faulty://<path>``.

Faults are configured through environment variables, so spawned ranks inherit them:

    FAULTY_PATTERN   fnmatch pattern of paths that fail (default: nothing fails)
    FAULTY_MODE      "write" (default) or "read": which opens fail
    FAULTY_RANK      only this rank fails (default: every rank)
    FAULTY_DELAY     seconds to hang before failing, as a storage client timing out
    FAULTY_AFTER     let this many matching opens succeed first (default 0)
"""

from __future__ import annotations

import fnmatch
import os
import time

import fsspec
from fsspec.implementations.local import LocalFileSystem


class FaultyFileSystem(LocalFileSystem):
    protocol = ("faulty",)
    _opens = 0

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        if path.startswith("faulty://"):
            path = path[len("faulty://"):]
        return super()._strip_protocol(path)

    def _open(self, path, mode="rb", **kwargs):
        pattern = os.environ.get("FAULTY_PATTERN")
        writing = any(c in mode for c in "wa+")
        wanted = os.environ.get("FAULTY_MODE", "write") == ("write" if writing else "read")
        if pattern and wanted and fnmatch.fnmatch(path, pattern) and self._this_rank():
            FaultyFileSystem._opens += 1
            if FaultyFileSystem._opens > int(os.environ.get("FAULTY_AFTER", "0")):
                delay = float(os.environ.get("FAULTY_DELAY", "0"))
                if delay:
                    time.sleep(delay)
                    raise TimeoutError(f"injected: storage timed out after {delay} s on {path}")
                raise OSError(f"injected {'write' if writing else 'read'} failure on {path}")
        return super()._open(path, mode=mode, **kwargs)

    @staticmethod
    def _this_rank() -> bool:
        want = os.environ.get("FAULTY_RANK")
        if want is None:
            return True
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        return rank == int(want)


def register() -> None:
    fsspec.register_implementation("faulty", FaultyFileSystem, clobber=True)
