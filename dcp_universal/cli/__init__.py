"""The ``dcp-universal`` command.

    dcp-universal inspect PATH     per key: name, shape, dtype, bytes; totals (any format)
    dcp-universal verify STEP      every file of a step and its base: size and CRC-32
    dcp-universal prune ROOT ...   apply a retention policy (keep last / every / best)
    dcp-universal convert SRC ROOT a checkpoint of another format -> a committed step
    dcp-universal export SRC OUT --format hf|peft   HF safetensors (merged) or a PEFT adapter
"""

from __future__ import annotations

import argparse
import math
import sys
import time

from dcp_universal.format import manifest
from dcp_universal import sources
from dcp_universal.errors import CheckpointError
from dcp_universal.cli.progress import Progress
from dcp_universal.storage import normalize, storage_for

__all__ = ["main"]


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _inspect(args) -> int:
    start = time.perf_counter()  # inspect reads metadata only: a time, no bar
    path = normalize(args.path)
    source = sources.open_source(storage_for(path), path, sources.Want(trusted=args.trusted))
    rows, total, count = [], 0, 0
    for key, info in sorted(source.keys.items()):
        nbytes = math.prod(info.shape) * info.dtype.itemsize
        rows.append((key, "x".join(map(str, info.shape)) or "()",
                     str(info.dtype).removeprefix("torch."), str(nbytes)))
        total += nbytes
        count += math.prod(info.shape)
    rows += [(key, "-", "bytes", "-") for key in sorted(source.meta.get("other_keys", ()))]
    rows.sort()
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(("key", "shape", "dtype", "bytes"))]
    print(f"{source.desc}")
    for note in source.notes:
        print(f"  ({note})")
    header = ("key", "shape", "dtype", "bytes")
    for row in (header, *rows):
        print("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    print(f"total: {len(rows)} keys, {count:,} elements, {total:,} bytes ({_human(total)}); "
          f"metadata read in {time.perf_counter() - start:.2f} s")
    return 0


def _verify(args) -> int:
    from dcp_universal.training.manager import CheckpointManager

    path = normalize(args.path)
    parts = manifest.split_step_path(path)
    if parts is None:
        raise CheckpointError(f"{path} is not a step directory (expected <root>/step-<number>)")
    root, step = parts
    progress = Progress(None, "verify", enabled=not args.quiet)
    result = CheckpointManager(root).verify(step, progress=progress)
    done = progress.close()
    print(f"{path}: OK ({result['files']} files, sizes and CRC-32; {done})")
    return 0


def _prune(args) -> int:
    from dcp_universal.training.manager import CheckpointManager

    if args.keep_last is None and args.keep_every is None and args.keep_best is None:
        raise CheckpointError("prune needs a policy: --keep-last, --keep-every and/or --keep-best")
    mgr = CheckpointManager(args.root, keep_last=args.keep_last, keep_every=args.keep_every,
                            keep_best=args.keep_best, best_metric=args.metric, best_mode=args.mode)
    try:
        d = mgr.prune(dry_run=args.dry_run)
    finally:
        mgr.close()  # releases the root's writer lease
    verb = "would " if args.dry_run else ""
    print(f"{args.root}: {verb}keep steps {d.keep}, {verb}archive (drop optimizer/) {d.archive}, "
          f"{verb}delete steps {d.delete} and bases {d.delete_bases}")
    for step, why in sorted(d.unreadable.items()):
        print(f"  kept step {step}: its manifest cannot be read ({why})")
    return 0


def _convert(args) -> int:
    from dcp_universal.training.commit import convert

    progress = Progress(None, "convert", enabled=False)  # one read, one write: no bar
    path = convert(args.src, args.root, step=args.step, trusted=args.trusted)
    src = normalize(args.src)
    store = storage_for(src)
    progress(store.size(src) if store.is_file(src) else sum(store.file_sizes(src).values()))
    print(f"wrote {path} from {args.src}: {progress.close()}")
    return 0


def _export(args) -> int:
    from dcp_universal.interop.hf import export_hf
    from dcp_universal.interop.peft import export_peft

    if args.format == "peft":
        if args.dtype or args.config:
            raise CheckpointError("--dtype and --config apply to --format hf only")
        start = time.perf_counter()
        out = export_peft(args.src, args.out, trusted=args.trusted, overwrite=args.overwrite)
        print(f"exported the adapters of {args.src} to {out} (PEFT LoRA adapter) in "
              f"{time.perf_counter() - start:.2f} s")
        return 0
    progress = Progress(None, "export", enabled=not args.quiet)
    out = export_hf(args.src, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                    trusted=args.trusted, overwrite=args.overwrite,
                    config=args.config, progress=progress, prefix=args.prefix)
    print(f"exported {args.src} to {out} (Hugging Face safetensors): {progress.close()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dcp-universal", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="list a model checkpoint's keys, shapes, dtypes and sizes")
    p.add_argument("path", help="a step, a model directory, an HF or PEFT directory, a torch.save file")
    p.set_defaults(func=_inspect)
    p = sub.add_parser("verify", help="check every file of a step (and its base): size and CRC-32")
    p.add_argument("path", help="a step directory, <root>/step-<number>")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_verify)
    p = sub.add_parser("prune", help="apply a retention policy to a checkpoint root")
    p.add_argument("root")
    p.add_argument("--keep-last", type=int, help="keep the N newest steps whole")
    p.add_argument("--keep-every", type=int, help="archive steps divisible by K (model only)")
    p.add_argument("--keep-best", type=int, help="keep the N best steps by --metric whole")
    p.add_argument("--metric", help="metric recorded by save(metrics=...), e.g. val_loss")
    p.add_argument("--mode", choices=["min", "max"], default="min")
    p.add_argument("--dry-run", action="store_true", help="print what would happen")
    p.set_defaults(func=_prune)
    p = sub.add_parser("convert", help="turn a checkpoint of another format into a step directory")
    p.add_argument("src", help="ckpt.pt (any torch.save layout of the seeds), an HF directory, "
                               "another tool's DCP checkpoint")
    p.add_argument("root", help="checkpoint root to write <root>/step-<N> into")
    p.add_argument("--step", type=int, help="step number (default: the file's iter_num/global_step)")
    p.set_defaults(func=_convert)
    p = sub.add_parser("export", help="write HF safetensors (merged) or a PEFT LoRA adapter")
    p.add_argument("src", help="a model directory or a step directory (a LoRA step is merged)")
    p.add_argument("out", help="the output directory")
    p.add_argument("--format", choices=["hf", "peft"], default="hf")
    p.add_argument("--dtype", help="cast floating-point weights, e.g. bfloat16")
    p.add_argument("--max-shard-size", default="5GB", help="largest output file (default 5GB)")
    p.add_argument("--config", help="the model's config.json, copied beside the weights")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in OUT")
    p.add_argument("--prefix", default=None, help="hf: the model's subtree in another tool's "
                   "checkpoint, e.g. app.model. (default: found beside other state)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_export)
    for p in sub.choices.values():
        p.add_argument("--trusted", action="store_true",
                       help="read pickles in the checkpoint as they are (runs code from the "
                            "files: only for checkpoints you trust)")
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, ValueError) as e:
        print(f"dcp-universal: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
