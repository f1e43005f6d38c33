"""load_model: a checkpoint of any format into a model of any configuration, staged.

The load is planned first (:func:`~dcp_universal.model.plan.plan_load`: every key loaded,
remapped, fresh or dropped), then read, then installed by the returned
:class:`~dcp_universal.model.plan.Staged`'s ``commit``; the format of the path is found by
the source registry (:mod:`dcp_universal.sources`).
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from dcp_universal import _comm, sources
from dcp_universal.sources import quantized
from dcp_universal.errors import CheckpointError, CheckpointMismatchError, IntegrityError
from dcp_universal.format import manifest
from dcp_universal.format.manifest import Manifest
from dcp_universal.storage.mapped import Copies
from dcp_universal.model.plan import LoadReport, Staged, TensorInfo, plan_load
from dcp_universal.model.buffers import dtensor_like, host_empty
from dcp_universal.storage import Storage, join, normalize, storage_for
from dcp_universal.model.view import ModelView, local_block

__all__ = ["load_model", "stage_model"]

logger = logging.getLogger(__name__)


def _infos(tensors: dict[str, torch.Tensor]) -> dict[str, TensorInfo]:
    return {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in tensors.items()}


def _host_buffer(t: torch.Tensor) -> torch.Tensor:
    """A staging buffer for ``t`` in host memory, never the device's (a job training at
    70% of its GPU memory must still be able to resume): a DTensor gets a DTensor over a
    host copy of its local shard."""
    if isinstance(t, DTensor):
        local = t.to_local()
        return dtensor_like(host_empty(local.shape, local.dtype), t)
    return host_empty(t.shape, t.dtype)


def _check_materialized(view: ModelView) -> None:
    meta = [k for k, t in {**view.tensors, **view.originals, **view.adapter_tensors}.items()
            if local_block(t)[0].is_meta]
    if meta:
        raise CheckpointError(
            f"the model has {len(meta)} tensors on the meta device (e.g. {meta[:4]}): there is "
            "no memory to load into -> materialise it first, e.g. model.to_empty(device=...), "
            "then load; buffers that no checkpoint holds (non-persistent ones such as rotary "
            "inv_freq) must then be initialised by the model's own code")


@torch.no_grad()
def _check_ties(ties: list[tuple[str, ...]], buffers: dict[str, torch.Tensor], desc: str) -> None:
    """Raise unless the checkpoint holds one value for every name of each tie group
    (collective when ``ties`` is not empty: one ``all_gather_object``; ``ties`` are the
    same on every rank).

    They differ when an adapter was merged into some of the tied names: a tied target
    holds one tensor and cannot compute that model.
    """
    if not ties:
        return
    diffs = []  # per group, per member after the first: its largest difference from it
    for group in ties:
        first = local_block(buffers[group[0]])[0].float()
        diffs.append([float((local_block(buffers[k])[0].float() - first).abs().max())
                      if first.numel() else 0.0 for k in group[1:]])
    gathered = _comm.all_gather_object(diffs)
    bad = []
    for i, group in enumerate(ties):
        d = [max(rank[i][j] for rank in gathered) for j in range(len(group) - 1)]
        if any(d):
            bad.append((group, [k for k, x in zip(group[1:], d) if x], max(d)))
    if bad:
        group, differ, most = bad[0]
        same = [k for k in group if k not in differ]
        raise CheckpointMismatchError(
            f"checkpoint {desc} does not match the model (nothing was loaded): the model ties "
            f"{', '.join(repr(k) for k in group)} into one tensor, but the checkpoint holds "
            f"other values for {', '.join(repr(k) for k in differ)} than for "
            f"{', '.join(repr(k) for k in same)} (by up to {most:.4g}"
            f"{f'; {len(bad) - 1} more groups differ' if len(bad) > 1 else ''}), as when an "
            "adapter was merged into some of them -> untie them in the target where the "
            "architecture allows it (transformers: tie_word_embeddings=False; T5 stays tied "
            "whatever its config says), or load a LoRA step into a model with an adapter of "
            "at least the saved rank on each tied module, which carries the update without "
            "merging it (the same adapters restore exactly)")


def _aliased(source: sources.Source, reads: dict[str, str]) -> set[str]:
    """Target keys of ``reads`` (checkpoint key -> target key) that ``source`` reads
    from one stored tensor (a tied pair stored once, a PEFT original filled from its
    module's value)."""
    by_stored: dict[tuple, list[str]] = {}
    for ck, tk in reads.items():
        e = source.entries[ck]
        by_stored.setdefault((id(e.dir), e.raw), []).append(tk)
    return {k for group in by_stored.values() if len(group) > 1 for k in group}


def _check_committed(store: Storage, path: str) -> None:
    """A step directory (``step-<n>``) loads checked only when committed: without its
    manifest nothing records its files' checksums, and its ``model/`` would otherwise
    load as a plain DCP directory, unchecked."""
    if (manifest.split_step_path(path) is not None and store.exists(path)
            and not store.exists(join(path, manifest.MANIFEST))):
        raise IntegrityError(
            f"{path} is a step directory without {manifest.MANIFEST}: not a committed step "
            "(a save killed before its commit, or its manifest was removed), so nothing "
            "records its files' checksums -> load a committed step, or load it with "
            "verify=False if you trust its files")


def load_model(model: nn.Module, path: str, *, strict: bool = True,
               prefix: str | None = None, storage_options: dict | None = None,
               verify: bool | None = None, stage: bool = True, trusted: bool = False,
               timeout: float = _comm.DEFAULT_TIMEOUT_S) -> LoadReport:
    """Load a model directory, or a committed step directory, into ``model``.

    Works for any configuration: plain / DDP / FSDP2 on any world size, with or without
    adapters of any rank, and in a single process with no process group. Every key is
    planned first; with ``strict=True`` a mismatch raises
    :class:`~dcp_universal.CheckpointMismatchError` before the model is written. Only
    model data is read, never ``optimizer/``.

    Collective under a process group (every rank, same ``path``).

    Adapter parameters with no counterpart in the checkpoint are reset so the update is
    zero: the loaded model computes the checkpoint's function.

    ``path`` may also be a legacy ``torch.save`` file (see :mod:`dcp_universal.interop.legacy`)
    or a URL (``s3://...``, with ``storage_options``; ``file://`` works too). For a step
    directory the sizes of the files read are checked against the manifest, and every
    byte read against its block checksum (CRC-32C): a damaged file raises
    :class:`~dcp_universal.IntegrityError` naming it, with the model untouched.
    ``verify=True`` also reads and checks every file of the step whole first (steps
    written before block checksums are checked only so); ``verify=False`` checks sizes
    only, the fast path for files known to be good.

    With ``stage=True`` (default) nothing lands in the model before every read
    succeeded, so a failure halfway (on any rank) leaves the model untouched. Local files
    need no staging memory for that: they are memory-mapped, every tensor is located and
    checked first, and the copies (one per tensor, from the page cache) wait for the
    commit (:mod:`dcp_universal.storage.mapped`). Remote files are read into staging buffers in
    host memory (never the device's). ``stage=False`` reads remote files in place (no
    extra memory, no such guarantee).

    A DCP checkpoint written by another tool loads too (see :mod:`dcp_universal.sources.foreign`):
    its keys are made canonical, the model's subtree of a nested layout is found (or
    given as ``prefix``, e.g. ``"app.model."``), other state saved beside the model
    (optimizer, LR scheduler, data loader, ...) is listed in the report's notes and not
    read, and a PEFT model's LoRA factors are merged unless the target has the same
    adapters.

    Tied weights: a target that ties two names (``lm_head.weight`` and the token
    embedding) takes them only when the checkpoint's values are equal, and keeps the tie;
    otherwise :class:`~dcp_universal.CheckpointMismatchError`, model untouched.

    Untrusted checkpoints: nothing in the files runs as code unless ``trusted=True``
    (DCP's ``.metadata`` is read with an allow-list of DCP's own records); anything
    that would raises :class:`~dcp_universal.UnsafeCheckpointError`, model untouched.

    ``timeout``: the longest any rank waits for the others (seconds); then every waiting
    rank raises :class:`~dcp_universal.CheckpointTimeoutError`, model untouched.
    """
    timeout = _comm.check_timeout(timeout)
    path = normalize(path)
    with _comm.operation(f"load_model of {path}", timeout):
        staged = stage_model(ModelView.of(model), path, strict=strict, verify=verify,
                             stage=stage, store=storage_for(path, storage_options),
                             prefix=prefix, trusted=trusted)
        staged.commit()
    return staged.report


def stage_model(view: ModelView, path: str, *, strict: bool, verify: bool | None, stage: bool,
                store: Storage, step_manifest: Manifest | None = None,
                prefix: str | None = None, trusted: bool = False) -> Staged:
    """Plan and read a model load; the returned commit installs it (collective: one
    read per directory, in the same order on every rank). ``step_manifest``: ``path``
    is a committed step whose manifest the caller has read (so it is not read twice)."""
    start = time.perf_counter()

    def planned():  # every read of metadata and the plan, agreed on before any data read
        _check_materialized(view)
        if verify is not False and step_manifest is None:
            _check_committed(store, path)
        source = sources.open_source(store, path, sources.Want(
            target=view, prefix=prefix, verify=verify, manifest=step_manifest, trusted=trusted))
        if source.loader is not None:
            return source, None, None
        source = source.sharing(view.ties).filling_originals(view.original_of)
        # a 4-bit target's weights: restored exactly from stored state, outside the plan
        source, restore = quantized.split_4bit(view, source)
        taken = restore.weights.keys() if restore is not None else ()
        model = {k: t for k, t in {**view.tensors, **view.originals}.items() if k not in taken}
        return source, restore, plan_load(source.keys, _infos(model),
                                          adapters=_infos(view.adapter_tensors),
                                          structural_names=view.structural, strict=strict,
                                          source=source.desc)

    source, restore, plan = _comm.agreed(planned)
    if plan is None:
        return source.loader(view, strict=strict)
    targets = {**view.tensors, **view.originals, **view.adapter_tensors}
    read = set(plan.reads.values())
    ties = [tuple(k for k in g if k in read) for g in view.ties]
    ties = [g for g in ties if len(g) > 1]
    # Staging keeps the model untouched until every read succeeded. A source prepared in
    # full needs none: its copies wait (views of memory maps) for the commit. Tied keys
    # are always staged (compared before one of them is installed), and so are keys read
    # from one stored tensor (copied from each other as soon as it is read) and keys that
    # get an adapter delta, when staging.
    held = {k for g in ties for k in g} | _aliased(source, plan.reads)
    if stage:
        held |= {tk for ck, tk in plan.reads.items() if ck in source.deltas}
    waits = stage and source.copies_can_wait
    staged = read if stage and not waits else held
    buffers = {tk: _host_buffer(targets[tk]) if tk in staged else targets[tk] for tk in read}
    later = Copies({ck for ck, tk in plan.reads.items() if tk not in staged} if waits else ())
    source.read({ck: buffers[tk] for ck, tk in plan.reads.items()}, later=later)
    restored = restore.stage() if restore is not None else None
    if restored is not None:
        plan.report.merge(restored.report)
    _check_ties(ties, buffers, source.desc)
    plan.report.notes.extend(source.notes)
    if view.non_persistent:
        plan.report.notes.append(
            f"non-persistent buffers, in no checkpoint, kept as the model set them: "
            f"{', '.join(view.non_persistent[:6])}"
            + (f", ... (+{len(view.non_persistent) - 6})" if len(view.non_persistent) > 6 else ""))
    plan.report.notes.extend(f"tied: {' = '.join(g)} (equal in the checkpoint; loaded once, "
                             "tie kept)" for g in ties)
    installed = staged - {k for g in ties for k in g[1:]}  # one copy per shared tensor

    @torch.no_grad()
    def commit() -> None:
        later.run()
        for tk in sorted(installed):
            local_block(targets[tk])[0].copy_(local_block(buffers[tk])[0])
        if restored is not None:
            restored.commit()
        fresh = set(plan.report.fresh)
        for site in view.sites:
            if any(k in fresh for k in site.adapter_params()):
                site.kind.reset(site.module)
        if _comm.rank() == 0:
            logger.info("loaded %s in %.2f s\n%s", source.desc, time.perf_counter() - start,
                        plan.report.summary())

    # what a caller may restore beside the model: a legacy file's optimizer state and how
    # the file's tensors relate to the model's (dcp_universal.interop.legacy)
    return Staged(plan.report, commit, {"restored_base": source.meta.get("restored_base"),
                                        "legacy_optimizer": source.meta.get("optimizer"),
                                        "layout": source.meta.get("layout") or {},
                                        "source_meta": source.meta})
