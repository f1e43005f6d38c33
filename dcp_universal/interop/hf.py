"""The Hugging Face hand-off: export a model directory or a step as HF safetensors.

The output is what ``transformers``' ``save_pretrained`` writes and ``from_pretrained``
reads: ``model.safetensors``, or shards named ``model-00001-of-0000N.safetensors`` with
``model.safetensors.index.json`` (``metadata.total_size``, ``weight_map``), plus the
user's ``config.json`` when given. Keys are the canonical names, which are the model's
own (``model.layers.0.self_attn.q_proj.weight``). A LoRA step without a merged
``model/`` is merged from its base and adapters while exporting.

Memory is bounded by one output shard: each shard's tensors are read (and merged), cast
and written straight to a file (no serialised copy in memory) before the next shard is
read. Under a process group every rank
writes its own shards (shard ``i`` on rank ``i % world_size``), and rank 0 writes the
index and the config after all shards are in place.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from typing import Callable

import torch

from dcp_universal import _comm, sources
from dcp_universal.format import manifest
from dcp_universal.errors import (CheckpointError, CheckpointIOError,
                                  CheckpointMismatchError, ExportExistsError,
                                  NotACheckpointError)
from dcp_universal.interop.safetensors import import_safetensors
from dcp_universal.model.view import ModelView
from dcp_universal.storage import Storage, join, normalize, storage_for

__all__ = ["export_hf", "parse_size"]

logger = logging.getLogger(__name__)

CONFIG = "config.json"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or a string such as ``"5GB"`` (10^9, as transformers
    reads it) or ``"512MiB"`` (2^20)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
        if m is None or m[2] not in _UNITS:
            raise ValueError(f"max_shard_size={size!r}: expected bytes as an int or a size "
                             "such as '5GB' or '512MiB'")
        value = int(float(m[1]) * _UNITS[m[2]])
    if value <= 0:
        raise ValueError(f"max_shard_size={size!r}: expected a positive size")
    return value


def _dtype(dtype) -> torch.dtype | None:
    """The floating dtype ``dtype`` names (None: keep each tensor's)."""
    if dtype is None:
        return None
    found = dtype if isinstance(dtype, torch.dtype) else getattr(
        torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(found, torch.dtype):
        raise ValueError(f"dtype={dtype!r}: expected a torch dtype or its name, e.g. 'bfloat16'")
    if not found.is_floating_point:
        # a cast to an integer type truncates every weight (most to 0): never an export
        raise ValueError(
            f"dtype={dtype!r} is not a floating-point type: a cast would truncate the weights "
            "-> export as 'bfloat16', 'float16' or 'float32' and quantize with a quantizer")
    return found


def _config_with_dtype(cfg: dict | None, cast: torch.dtype | None) -> dict | None:
    """``cfg`` saying the exported dtype, so ``from_pretrained`` builds the model in it:
    ``dtype`` (transformers 5) and ``torch_dtype`` (earlier releases) when present."""
    if cfg is None or cast is None:
        return cfg
    name = str(cast).removeprefix("torch.")
    out = dict(cfg)
    out["dtype"] = name
    if "torch_dtype" in out:
        out["torch_dtype"] = name
    return out


def _shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Keys in order, cut greedily so no shard exceeds ``max_bytes`` unless one tensor
    alone does (it then gets a shard of its own, as transformers does)."""
    shards: list[list[str]] = [[]]
    used = 0
    for key, n in sizes.items():
        if shards[-1] and used + n > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += n
    return shards


def _shard_name(i: int, n: int) -> str:
    return manifest.HF_SINGLE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _read_config(config, storage_options: dict | None) -> dict | None:
    if config is None or isinstance(config, dict):
        return config
    path = normalize(str(config))
    try:
        return json.loads(storage_for(path, storage_options).read_bytes(path))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"config={config!r} is not a readable JSON file ({e})") from None


# The output embedding transformers ties to the input one (``get_output_embeddings``
# of its causal-LM heads): save_pretrained leaves it out of a tied model's files, and
# from_pretrained ties it back. Other names of a tie group are written (T5-like models
# tie several, and which one their code keeps differs).
_TIED_OUTPUT = "lm_head.weight"


def transformers_ties(config: dict, **changes) -> list[tuple[str, ...]] | None:
    """The groups of names that transformers binds to one tensor in the model that
    ``config`` (with ``changes``) describes: its ``architectures[0]`` built on the meta
    device (no memory, no download), tie groups found by identity. ``None`` when that
    cannot be known here (transformers not installed, no or unknown architecture)."""
    arch = (config.get("architectures") or [None])[0]
    try:
        import transformers
        cls = getattr(transformers, arch) if isinstance(arch, str) else None
        if cls is None:
            return None
        built = transformers.AutoConfig.for_model(**{**config, **changes})
        with torch.device("meta"):
            model = cls(built)
    except Exception as e:  # an old transformers, a config it cannot build: unknown
        logger.debug("tie groups of %s not known from transformers: %s", arch, e)
        return None
    return ModelView.of(model).ties


def _equal_classes(source: sources.Source, group: list[str]) -> list[list[str]]:
    """``group`` split into classes of names holding equal values, largest first."""
    values = {k: torch.empty(source.keys[k].shape, dtype=source.keys[k].dtype) for k in group}
    source.read(values, single_process=True)
    classes: list[list[str]] = []
    for k in group:
        same = next((c for c in classes if torch.equal(values[c[0]], values[k])), None)
        same.append(k) if same is not None else classes.append([k])
    return sorted(classes, key=len, reverse=True)


def _tie_fix(config: dict, group: list[str]) -> str:
    """What makes a checkpoint whose ``group`` differs exportable, for this architecture."""
    unpeft = ("export the adapters unmerged with export_peft (the base stays tied and "
              "PEFT adds each update on top, as in training)")
    untied = transformers_ties(config, tie_word_embeddings=False)
    if untied is None:
        return (f"set \"tie_word_embeddings\": false in the config.json you export with, if "
                f"this architecture unties them (T5 does not), or {unpeft}")
    if any(len(set(group) & set(g)) > 1 for g in untied):
        arch = config["architectures"][0]
        return (f"{arch} ties these names whatever tie_word_embeddings says, so no merged "
                f"export of this checkpoint computes the trained model -> {unpeft}")
    return f"set \"tie_word_embeddings\": false in the config.json you export with, or {unpeft}"


def _tied_duplicates(source: sources.Source, config: dict | None) -> list[str]:
    """The names to leave out of an export with ``config``, as save_pretrained does
    (``lm_head.weight`` when tied), after checking that every group of names transformers
    will load one tensor for holds one value (else CheckpointMismatchError naming the
    members that differ and a fix for this architecture, before anything is written).

    The groups are asked of transformers (:func:`transformers_ties`) when it can say;
    otherwise, with ``tie_word_embeddings``, they are the checkpoint's recorded ones and
    ``lm_head.weight`` with a partner: the name recorded with it or, when the checkpoint
    records no ties, a tensor of its shape and dtype holding its value."""
    config = config or {}
    present = lambda g: [k for k in g if k in source.keys]  # noqa: E731
    asked = transformers_ties(config)
    if asked is not None:
        groups = [(present(g), True) for g in asked]
    elif config.get("tie_word_embeddings", False):
        groups = [(present(g), True) for g in source.ties]
        if _TIED_OUTPUT in source.keys and not any(_TIED_OUTPUT in g for g, _ in groups):
            twins = [k for k, info in source.keys.items()
                     if k != _TIED_OUTPUT and info == source.keys[_TIED_OUTPUT]]
            # recorded without a tie: the model never tied them; unrecorded: a partner
            groups.append(([_TIED_OUTPUT, *twins], bool(source.meta.get("ties_recorded"))))
    else:
        return []
    drop = []
    for group, every in (g for g in groups if len(g[0]) > 1):
        classes = _equal_classes(source, group)
        held = classes[0] if every else next((c for c in classes if _TIED_OUTPUT in c), [])
        if len(classes) > 1 and (every or len(held) < 2):
            parts = " | ".join(", ".join(c) for c in classes)
            raise CheckpointMismatchError(
                f"{source.desc}: transformers will load one tensor for {', '.join(group)} "
                f"with this config, but the checkpoint holds {len(classes)} different values "
                f"for them ({parts}), as when an adapter was merged into some of them or the "
                f"model never tied them -> {_tie_fix(config, group)}")
        if _TIED_OUTPUT in group:
            drop.append(_TIED_OUTPUT)
    return drop


def export_hf(src: str, out: str, *, dtype=None, max_shard_size: int | str = "5GB",
              storage_options: dict | None = None, config: str | dict | None = None,
              progress: Callable[[int], None] | None = None, trusted: bool = False,
              overwrite: bool = False, timeout: float = _comm.DEFAULT_TIMEOUT_S,
              prefix: str | None = None) -> str:
    """Write the merged model of ``src`` to ``out`` as Hugging Face safetensors.

    Args:
        src: a model directory, a committed step directory (a LoRA step without
            ``model/`` is merged from base plus adapters) or a legacy ``torch.save`` file.
        out: the output directory (local or an fsspec URL). One that already holds an
            export (safetensors files, an index) is refused unless ``overwrite``, which
            removes that export first (index first); other files there are kept.
        dtype: cast floating-point tensors (``torch.bfloat16`` or ``"bfloat16"``), and
            say so in the written config (``dtype``); a non-floating dtype is refused.
            ``None`` keeps the saved dtypes.
        max_shard_size: the largest output file, e.g. ``"5GB"`` (transformers' default).
        storage_options: fsspec options for ``src`` and ``out``.
        config: the model's ``config.json`` (a path or a dict), written beside the
            weights so that ``from_pretrained(out)`` works. When it ties the embeddings
            (``tie_word_embeddings``) and the checkpoint tied them, ``lm_head.weight`` is
            left out, as ``save_pretrained`` does; their values must be equal.
        progress: called with the tensor bytes of each shard this rank wrote; if it
            has ``set_total(n)``, that is called first with this rank's total.
        trusted: read pickles in ``src`` as they are (default: plain data only).
        overwrite: replace an earlier export in ``out``.
        timeout: the longest any rank waits for the others (seconds); then every
            waiting rank raises :class:`~dcp_universal.CheckpointTimeoutError`.
        prefix: the model's subtree in a checkpoint written by another tool (e.g.
            ``"app.model."``). ``None``: a checkpoint that keeps other state beside its
            model (torchtitan's optimizer, ``{"app": {"model", "optim"}}``) exports the
            model's subtree alone, its keys made canonical; never the other state.

    A killed export never looks complete: the file that makes a directory an HF export
    (the index, or the single ``model.safetensors``) is written last, each file whole or
    not at all.

    Collective when called under a process group (every rank, same arguments). Call
    order, every rank: the source is opened and agreed on (``_comm.agreed``); rank 0
    clears an earlier export (``overwrite``) and writes the config (``on_rank0``); each
    rank writes its own shards; one ``all_true`` (a failure on any rank raises on every
    rank, and no index is written); rank 0 writes the index (``on_rank0``). Returns
    ``out``.
    """
    timeout = _comm.check_timeout(timeout)
    with _comm.operation(f"export_hf of {src}", timeout):
        return _export_hf(src, out, dtype=dtype, max_shard_size=max_shard_size,
                          storage_options=storage_options, config=config, progress=progress,
                          trusted=trusted, overwrite=overwrite, prefix=prefix)


def _export_hf(src, out, *, dtype, max_shard_size, storage_options, config, progress, trusted,
               overwrite, prefix) -> str:
    start = time.perf_counter()
    src, out = normalize(src), normalize(out)
    store, out_store = storage_for(src, storage_options), storage_for(out, storage_options)
    cast = _dtype(dtype)
    max_bytes = parse_size(max_shard_size)

    def opened() -> tuple[sources.Source, dict | None]:  # agreed on by every rank below
        source = sources.open_source(store, src, sources.Want(trusted=trusted, prefix=prefix,
                                                               model_only=True))
        if source.meta.get("adapter_only"):
            raise NotACheckpointError(
                f"{src} is an adapter without base weights; export_hf writes a whole model "
                "-> export the LoRA step it came from, or load base and adapter into a model "
                "and save_model() it first")
        cfg = _config_with_dtype(_read_config(config, storage_options), cast)
        # written once, as save_pretrained does
        return source.without(_tied_duplicates(source, cfg)), cfg

    source, cfg = _comm.agreed(opened)

    def out_dtype(key: str) -> torch.dtype:
        d = source.keys[key].dtype
        return cast if cast is not None and d.is_floating_point else d

    sizes = {k: math.prod(source.keys[k].shape) * out_dtype(k).itemsize
             for k in sorted(source.keys)}
    shards = _shards(sizes, max_bytes)
    names = [_shard_name(i, len(shards)) for i in range(len(shards))]
    rank, world = _comm.rank(), _comm.world_size()
    if hasattr(progress, "set_total"):
        progress.set_total(sum(sizes[k] for i, keys in enumerate(shards) if i % world == rank
                               for k in keys))
    _comm.on_rank0(_prepare_out, out_store, out, overwrite, cfg)
    error = None
    try:
        for i, keys in enumerate(shards):
            if i % world == rank:
                _write_shard(out_store, source, keys, join(out, names[i]), out_dtype)
                if progress is not None:
                    progress(sum(sizes[k] for k in keys))
    except Exception as e:  # every rank learns of it below, none waits forever
        error = e
    if not _comm.all_true(error is None):
        if error is not None:
            raise error
        raise CheckpointIOError(f"export to {out} failed on another rank (its error names the "
                                "cause); no index was written")

    def finish() -> None:
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(sizes.values())},
                     "weight_map": {k: names[i] for i, keys in enumerate(shards) for k in keys}}
            out_store.write_atomic(join(out, manifest.HF_INDEX),
                                   json.dumps(index, indent=2, sort_keys=True).encode())
        logger.info("exported %s to %s: %d tensors, %d files, %.1f MB in %.2f s", src, out,
                    len(sizes), len(shards), sum(sizes.values()) / 1e6,
                    time.perf_counter() - start)

    _comm.on_rank0(finish)
    return out


def _is_export_file(name: str) -> bool:
    return name == manifest.HF_INDEX or name == CONFIG or (
        name.startswith("model") and name.endswith(".safetensors"))


def _prepare_out(store: Storage, out: str, overwrite: bool, cfg: dict | None) -> None:
    """Rank 0: refuse (or, ``overwrite``, remove) an earlier export in ``out``, its index
    first so it never looks complete while half removed; then write the config."""
    earlier = sorted(n for n in store.listdir(out) if _is_export_file(n))
    if earlier and not overwrite:
        raise ExportExistsError(
            f"{out} already holds an export ({', '.join(earlier[:4])}"
            f"{', ...' if len(earlier) > 4 else ''}): writing over it could mix two exports "
            "-> pass overwrite=True (CLI: --overwrite) to replace it, or export to an "
            "empty directory")
    for name in sorted(earlier, key=lambda n: n != manifest.HF_INDEX):
        store.remove_file(join(out, name))
    store.makedirs(out)
    if cfg is not None:
        store.write_atomic(join(out, CONFIG), json.dumps(cfg, indent=2).encode())


@torch.no_grad()
def _write_shard(out_store: Storage, source: sources.Source, keys: list[str], path: str,
                 out_dtype) -> None:
    save_file = import_safetensors("export_hf").save_file

    tensors = {k: torch.empty(source.keys[k].shape, dtype=source.keys[k].dtype) for k in keys}
    source.read(tensors, single_process=True)
    for k in keys:
        tensors[k] = tensors[k].to(out_dtype(k)).contiguous()
    # straight to a file: no serialised copy of the shard in memory
    out_store.write_atomic_with(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
