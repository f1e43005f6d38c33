"""dcp-universal: inspect, verify, prune, convert and export checkpoints from the shell.

    dcp-universal inspect PATH     a root (its steps), a step, a model, HF or PEFT directory,
                                   a torch.save file: keys (canonical), shapes, dtypes, bytes
    dcp-universal verify PATH      a step, every step of a root, or a save_model directory:
                                   sizes and CRC-32C block checksums
    dcp-universal prune ROOT ...   apply a retention policy (keep last / every / best)
    dcp-universal convert SRC ROOT a checkpoint of another format -> a committed step
    dcp-universal export SRC OUT --format hf|peft   HF safetensors (merged) or a PEFT adapter

Exit status: 0 done; 1 done, but some steps' manifests could not be read (prune kept
them, inspect shows them as damaged); 2 refused (an error, named on stderr); 141 the
reader of its output left first (``inspect | head``: no traceback); 130 interrupted.

Every command takes ``--storage-options JSON`` (fsspec options for URLs, e.g.
``'{"endpoint_url": "http://127.0.0.1:9000"}'``), ``--trusted`` and ``--debug`` (the
traceback of an error). Sizes are in decimal units (kB, MB, GB) throughout.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import time
from typing import Sequence

import torch

from dcp_universal import sources
from dcp_universal.sources import foreign
from dcp_universal._version import __version__
from dcp_universal.errors import CheckpointError, NotACheckpointError
from dcp_universal.cli.progress import Progress, human
from dcp_universal.format import manifest
from dcp_universal.storage import normalize, steps, storage_for

__all__ = ["main"]

DESCRIPTION = ("Inspect, verify, prune, convert and export universal checkpoints (and every "
               "format load_model reads).")

# Python argument names in library errors -> the flags a CLI user typed
_FLAGS = {"keep_last": "--keep-last", "keep_every": "--keep-every", "keep_best": "--keep-best",
          "best_metric": "--metric", "best_mode": "--mode", "dtype": "--dtype",
          "max_shard_size": "--max-shard-size", "prefix": "--prefix", "step": "--step",
          "storage_options": "--storage-options", "config": "--config",
          "overwrite": "--overwrite", "trusted": "--trusted"}
_FLAG_RE = re.compile(r"\b(" + "|".join(_FLAGS) + r")=")


# a switch's own hint ("overwrite=True (CLI: --overwrite)"), and a library option's off
# value, which a flag spells by its absence
_SWITCH_RE = re.compile(r"\b\w+=(?:True|N) \(CLI: (--[\w-]+(?: N)?)\)")
_OFF = "(or None to turn it off)"


def _as_flags(message: str) -> str:
    message = _SWITCH_RE.sub(r"\1", message).replace(_OFF, "(or leave the flag out)")
    message = re.sub(r"\b(overwrite|trusted)=True\b", lambda m: _FLAGS[m[1]], message)
    return _FLAG_RE.sub(lambda m: _FLAGS[m[1]] + " ", message)


def _json_options(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e}): expected an object such as "
                                         "'{\"endpoint_url\": \"http://127.0.0.1:9000\"}'")
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, found {text!r}")
    return value


def _store(args, path: str):
    return storage_for(path, args.storage_options)


def _inspect(args) -> int:
    start = time.perf_counter()  # inspect reads metadata only: a time, no bar
    path = normalize(args.path)
    store = _store(args, path)
    try:
        source = sources.open_source(store, path, sources.Want(trusted=args.trusted))
    except NotACheckpointError:
        if store.exists(path) and steps.list_steps(store, path):
            return _inspect_root(store, path, start)
        raise
    rows, total, count = [], 0, 0
    # an adapter's files keep PEFT's root (base_model.model.): shown under canonical names
    name = foreign.canonical_key if source.meta.get("adapter_only") else (lambda k: k)
    for key, info in sorted(source.keys.items()):
        nbytes = math.prod(info.shape) * info.dtype.itemsize
        rows.append((name(key) or key, "x".join(map(str, info.shape)) or "()",
                     str(info.dtype).removeprefix("torch."), str(nbytes)))
        total += nbytes
        count += math.prod(info.shape)
    rows += [(key, "-", "bytes", "-") for key in sorted(source.meta.get("other_keys", ()))]
    rows.sort()
    print(f"{source.desc}")
    for note in source.notes:
        print(f"  ({note})")
    _table(("key", "shape", "dtype", "bytes"), rows, right=(3,))
    print(f"total: {len(rows)} keys, {count:,} elements, {total:,} bytes ({human(total)}); "
          f"metadata read in {time.perf_counter() - start:.2f} s")
    return 0


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]], right=()) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    for row in (header, *rows):
        print("  ".join(c.rjust(w) if i in right else c.ljust(w)
                        for i, (c, w) in enumerate(zip(row, widths))).rstrip())


def _age(seconds: float) -> str:
    """How long ago, by this machine's clock and the writer's (a skew shows as "just
    now")."""
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{seconds:.0f} s ago" if seconds >= 1 else "just now"


def _inspect_root(store, root: str, start: float) -> int:
    """A checkpoint root: its committed steps (items, bytes, metrics), the latest marked,
    and the bases the LoRA steps share."""
    committed = steps.list_steps(store, root)
    rows: list = []
    bases: dict = {}
    readable: list = []
    for step in committed:
        try:
            m = steps.read_manifest(store, manifest.step_path(root, step))
        except CheckpointError as e:  # shown, and the others still listed
            rows.append((str(step), f"manifest cannot be read ({type(e).__name__})", "-", "-",
                         "-", "-"))
            print(f"step {step}: {e}", file=sys.stderr)
            continue
        items = [i for i in manifest.ITEMS if m.has(i)] + sorted(
            i for i in m.items if i not in manifest.ITEMS and m.has(i))
        size = sum(r.size for r in m.files.values())
        if m.base:
            bases.setdefault(m.base, (sum(r.size for r in (m.base_files or {}).values()), []))
            bases[m.base][1].append(step)
        readable.append(len(rows))
        rows.append((str(step), " ".join(items) + (" (archived)" if m.archived else ""),
                     str(m.world_size), human(size), _age(time.time() - m.created_unix),
                     " ".join(f"{k}={v:g}" for k, v in sorted(m.metrics.items())) or "-"))
    latest = "none readable"
    if readable:  # the step a load picks: the newest whose manifest reads
        row = rows[readable[-1]]
        latest, rows[readable[-1]] = row[0], (f"{row[0]} (latest)", *row[1:])
    print(f"{root}: {len(committed)} committed steps, latest {latest}")
    _table(("step", "items", "ranks", "size", "saved", "metrics"), rows, right=(2, 3, 4))
    for name, (size, used) in sorted(bases.items()):
        print(f"{name}: {human(size)}, the frozen base of steps {used}")
    pending = steps.list_steps(store, root, committed=False)
    if pending:
        print(f"uncommitted (a save in progress or killed): steps {pending}")
    print(f"read in {time.perf_counter() - start:.2f} s")
    return 0 if len(readable) == len(committed) else 1


def _verify(args) -> int:
    from dcp_universal.training.manager import CheckpointManager

    path = normalize(args.path)
    store = _store(args, path)
    if not store.exists(path):
        raise NotACheckpointError(f"{path} does not exist")
    parts = manifest.split_step_path(path)
    if parts is not None and store.exists(f"{path}/{manifest.MANIFEST}"):
        root, wanted = parts[0], [parts[1]]
    elif steps.list_steps(store, path):
        root, wanted = path, steps.list_steps(store, path)
    elif store.exists(f"{path}/{manifest.MODEL_INFO}"):
        return _verify_model_dir(args, store, path)
    else:
        raise CheckpointError(
            f"{path} carries no checksums: committed steps (<root>/step-<number>, with "
            f"{manifest.MANIFEST}) and save_model directories (with {manifest.MODEL_INFO}) "
            "record them, and this is none of them nor a root holding steps (an HF or PEFT "
            "directory or a torch.save file has none; their sizes are checked when they "
            "load)")
    mgr = CheckpointManager(root, storage_options=args.storage_options)
    records = [r for step in wanted for m in [mgr.manifest(step)]
               for r in (*m.files.values(), *(m.base_files or {}).values())]
    progress = Progress(sum(r.size for r in records), "verify", enabled=not args.quiet)
    files = sum(mgr.verify(step, progress=progress)["files"] for step in wanted)
    done = progress.close()
    what = path if len(wanted) == 1 else f"{path}: steps {wanted}"
    print(f"{what}: OK ({files} files, {_what_checked(records)}; {done})")
    return 0


def _what_checked(records) -> str:
    blocks = all(r.has_blocks for r in records)
    return "sizes and CRC-32C block checksums" if blocks else "sizes and CRC-32"


def _verify_model_dir(args, store, path: str) -> int:
    """``verify`` of a save_model directory: every file its record lists, read whole."""
    from dcp_universal.sources.dcp import model_records
    from dcp_universal.storage.integrity import check_files, unchecked

    _, files = model_records(store, path)
    if not files:
        raise unchecked(path, f"records no files in its {manifest.MODEL_INFO}" if files == {}
                        else f"was written before {manifest.MODEL_INFO} recorded its files")
    recorded = set(files) | {manifest.MODEL_INFO}
    extra = sorted(rel for rel in store.file_sizes(path) if rel not in recorded)
    if extra:
        raise unchecked(f"{path}/{extra[0]}", f"is not recorded in {manifest.MODEL_INFO}")
    progress = Progress(sum(r.size for r in files.values()), "verify", enabled=not args.quiet)
    check_files(store, path, files, checksums=True, progress=progress)
    done = progress.close()
    print(f"{path}: OK (save_model directory, {len(files)} files, "
          f"{_what_checked(files.values())}; {done})")
    return 0


def _prune(args) -> int:
    from dcp_universal.training.manager import CheckpointManager

    if args.keep_last is None and args.keep_every is None and args.keep_best is None:
        raise CheckpointError("prune needs a policy: --keep-last, --keep-every and/or --keep-best")
    root = normalize(args.root)
    store = _store(args, root)
    if not store.exists(root):
        raise NotACheckpointError(f"{root} does not exist")
    if not (steps.list_steps(store, root) or steps.list_steps(store, root, committed=False)
            or steps.list_bases(store, root)):
        raise NotACheckpointError(f"{root} holds no checkpoint (no step-<number> directory, no "
                                  "base): pass the root a CheckpointManager wrote")
    mgr = CheckpointManager(root, keep_last=args.keep_last, keep_every=args.keep_every,
                            keep_best=args.keep_best, best_metric=args.metric,
                            best_mode=args.mode, storage_options=args.storage_options)
    try:
        d = mgr.prune(dry_run=args.dry_run)
    finally:
        mgr.close()  # releases the root's writer lease
    verb = "would " if args.dry_run else ""
    print(f"{args.root}: {verb}keep steps {d.keep}, {verb}archive (drop optimizer/) {d.archive}, "
          f"{verb}delete steps {d.delete} and bases {d.delete_bases}")
    for step, why in sorted(d.unreadable.items()):
        print(f"  kept step {step}: its manifest cannot be read ({why})")
    return 1 if d.unreadable else 0


def _convert(args) -> int:
    from dcp_universal.training.commit import convert

    progress = Progress(None, "convert", enabled=False)  # one read, one write: no bar
    path = convert(args.src, args.root, step=args.step, trusted=args.trusted,
                   storage_options=args.storage_options)
    src = normalize(args.src)
    store = _store(args, src)
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
        out = export_peft(args.src, args.out, trusted=args.trusted, overwrite=args.overwrite,
                          storage_options=args.storage_options)
        print(f"exported the adapters of {args.src} to {out} (PEFT LoRA adapter) in "
              f"{time.perf_counter() - start:.2f} s")
        return 0
    progress = Progress(None, "export", enabled=not args.quiet)
    out = export_hf(args.src, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                    trusted=args.trusted, overwrite=args.overwrite,
                    config=args.config, progress=progress, prefix=args.prefix,
                    storage_options=args.storage_options)
    print(f"exported {args.src} to {out} (Hugging Face safetensors): {progress.close()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dcp-universal", description=DESCRIPTION,
        epilog="Run 'dcp-universal COMMAND --help' for a command's options.")
    parser.add_argument("--version", action="version",
                        version=f"dcp-universal {__version__} (torch {torch.__version__})")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--storage-options", type=_json_options, default=None, metavar="JSON",
                        help="fsspec options for URLs (s3://...), a JSON object, e.g. "
                             "'{\"endpoint_url\": \"http://127.0.0.1:9000\"}'")
    common.add_argument("--trusted", action="store_true",
                        help="read pickles in the checkpoint as they are (runs code from the "
                             "files: only for checkpoints you trust)")
    common.add_argument("--debug", action="store_true", help="print the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, func):
        p = sub.add_parser(name, help=help, description=help, parents=[common])
        p.set_defaults(func=func)
        return p

    p = command("inspect", "list a checkpoint's keys (canonical names), shapes, dtypes and "
                "sizes; for a root, its steps", _inspect)
    p.add_argument("path", help="a root, a step, a model directory, an HF or PEFT directory, "
                                "a torch.save file (local path or URL)")
    p = command("verify", "check sizes and CRC-32C block checksums of every file of a step "
                "(and its base), of every step of a root, or of a save_model directory",
                _verify)
    p.add_argument("path", help="a step directory (<root>/step-<number>), a root, or a "
                                "save_model directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p = command("prune", "apply a retention policy to a checkpoint root", _prune)
    p.add_argument("root")
    p.add_argument("--keep-last", type=int, help="keep the N newest steps whole")
    p.add_argument("--keep-every", type=int, help="archive steps divisible by K (model only)")
    p.add_argument("--keep-best", type=int, help="keep the N best steps by --metric whole")
    p.add_argument("--metric", help="metric recorded by save(metrics=...), e.g. val_loss")
    p.add_argument("--mode", choices=["min", "max"], default="min")
    p.add_argument("--dry-run", action="store_true", help="print what would happen")
    p = command("convert", "turn a checkpoint of another format into a committed step", _convert)
    p.add_argument("src", help="a torch.save file (nanoGPT ckpt.pt, NAME-model.pt, ...), an HF "
                               "directory, another tool's DCP checkpoint")
    p.add_argument("root", help="checkpoint root to write <root>/step-<N> into")
    p.add_argument("--step", type=int,
                   help="step number (default: the file's iter_num / global_step, else 0)")
    p = command("export", "write HF safetensors (merged) or a PEFT LoRA adapter", _export)
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
    args = parser.parse_args(argv)
    # the library's warnings (a converted file without a step number, ...) reach the user
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("dcp-universal: %(levelname)s: %(message)s"))
    library = logging.getLogger("dcp_universal")
    library.addHandler(handler)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("dcp-universal: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left (inspect | head): no traceback, no message
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # nor one when Python flushes at exit
        return 141  # as a process killed by SIGPIPE: it did not finish
    except Exception as e:
        if args.debug:
            raise
        known = isinstance(e, (CheckpointError, ValueError, OSError))
        print(f"dcp-universal: error: {'' if known else type(e).__name__ + ': '}"
              f"{_as_flags(str(e))}", file=sys.stderr)
        if not known:
            print("dcp-universal: (run again with --debug for the traceback)", file=sys.stderr)
        return 2
    finally:
        library.removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
