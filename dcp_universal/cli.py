"""The ``dcp-universal`` command.

    dcp-universal inspect PATH     per key: canonical name, shape, dtype, bytes; totals
    dcp-universal verify STEP      every file of a step and its base: size and CRC-32
"""

from __future__ import annotations

import argparse
import math
import sys

from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from dcp_universal import storage
from dcp_universal.errors import CheckpointError

__all__ = ["main"]


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _inspect(args) -> int:
    store = storage.Storage()
    model_dir = store.resolve_model_dir(args.path)
    meta = store.read_metadata(model_dir)
    rows, total, count = [], 0, 0
    for key in sorted(meta.state_dict_metadata):
        m = meta.state_dict_metadata[key]
        if isinstance(m, TensorStorageMetadata):
            dtype = m.properties.dtype
            nbytes = math.prod(m.size) * dtype.itemsize
            rows.append((key, "x".join(map(str, m.size)) or "()", str(dtype).removeprefix("torch."),
                         str(nbytes)))
            total += nbytes
            count += math.prod(m.size)
        else:
            rows.append((key, "-", "bytes", "-"))
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(("key", "shape", "dtype", "bytes"))]
    print(f"{model_dir}")
    header = ("key", "shape", "dtype", "bytes")
    for row in (header, *rows):
        print("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    print(f"total: {len(rows)} keys, {count:,} elements, {total:,} bytes ({_human(total)})")
    return 0


def _verify(args) -> int:
    from dcp_universal.manager import CheckpointManager

    path = args.path.rstrip("/")
    root, _, name = path.rpartition("/")
    if not name.startswith("step-") or not name[5:].isdigit():
        raise CheckpointError(f"{path} is not a step directory (expected <root>/step-<number>)")
    result = CheckpointManager(root or ".").verify(int(name[5:]))
    print(f"{path}: OK ({result['files']} files, {result['bytes']:,} bytes, sizes and CRC-32)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dcp-universal", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="list a model checkpoint's keys, shapes, dtypes and sizes")
    p.add_argument("path", help="a model directory, or a step directory holding model/")
    p.set_defaults(func=_inspect)
    p = sub.add_parser("verify", help="check every file of a step (and its base): size and CRC-32")
    p.add_argument("path", help="a step directory, <root>/step-<number>")
    p.set_defaults(func=_verify)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CheckpointError as e:
        print(f"dcp-universal: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
