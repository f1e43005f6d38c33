"""The DCP directory format: a model directory written by this library (canonical
keys), or a DCP checkpoint written by another tool (keys made canonical, the model's
subtree found or given, other state listed: :mod:`dcp_universal.sources.foreign`).

Other tools also save adapter factors beside the base weights (a PEFT model's plain
DCP). A *factor rule* (:func:`register_factor_rule`) turns such factors into updates
merged on load; the PEFT rule lives with the rest of PEFT (:mod:`dcp_universal.interop.peft`),
the rule for the library's own layers saved as a plain state dict in
:mod:`dcp_universal.sources.own_lora`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, cast

from dcp_universal._registry import Registry
from dcp_universal.errors import ManifestError
from dcp_universal.sources import foreign, own_lora
from dcp_universal.format import manifest
from dcp_universal.sources import DcpDir, Format, Source, Want, dir_entries, register_format
from dcp_universal.storage import Storage, join
from dcp_universal.storage.integrity import block_checks, check_files
from dcp_universal.model.view import ModelView

__all__ = ["DcpFormat", "model_dir", "dir_source", "register_factor_rule", "model_records"]

#: ``rule(store, source, target) -> source``: adapter factors of another tool, found
#: among ``source``'s keys, turned into deltas (or left as keys the target reads as is)
FactorRule = Callable[[Storage, Source, ModelView], Source]
_FACTOR_RULES: Registry[FactorRule] = Registry("a factor rule")


def register_factor_rule(rule: FactorRule) -> FactorRule:
    """Ask ``rule`` of every DCP directory a load reads (after those registered before;
    a function registered again is one rule)."""
    return _FACTOR_RULES.add(rule)


register_factor_rule(own_lora.factor_rule)


def model_dir(store: Storage, path: str) -> str | None:
    """``path`` itself if it is a DCP directory, its ``model/`` child if that is one
    (a step-like layout), else ``None``."""
    for d in (path, join(path, manifest.MODEL_DIR)):
        if store.exists(join(d, manifest.METADATA_FILE)):
            return d
    return None


def dir_source(store: Storage, d: DcpDir, want: Want, *, notes: tuple[str, ...] = ()) -> Source:
    """The model in the directory ``d``: with no target its keys as they are (an
    export, ``model_only``: the model's subtree beside other state, or under
    ``prefix``, made canonical: :func:`foreign.model_only`); otherwise resolved onto the target's canonical names (:func:`foreign.resolve`),
    and other tools' adapter factors handled by the registered factor rules."""
    infos, other, meta = dir_entries(d)
    if d.reader_of is None:  # planning read it: the load need not parse it again
        d = dataclasses.replace(d, metadata=meta)
    # what a migration may carry beside the model (dcp_universal.training.migrate)
    found = {"other_keys": other, "beside": foreign.beside_model(infos, other), "dir": d}
    if want.target is None:
        res = foreign.model_only(infos, other, prefix=want.prefix, desc=d.path) \
            if want.model_only else None
        if res is None:
            return Source.in_directory(d.path, d, infos, notes=notes, meta=found)
        return Source.in_directory(d.path, d, {name: infos[raw] for name, raw in res.raw_of.items()},
                                   raw_of=res.raw_of, notes=(*notes, *res.notes),
                                   meta=found)
    res = foreign.resolve(infos, other, set(want.target.tensors), prefix=want.prefix,
                          desc=d.path)
    source = Source.in_directory(d.path, d, {name: infos[raw] for name, raw in res.raw_of.items()},
                                 raw_of=res.raw_of, notes=(*notes, *res.notes),
                                 meta=found)
    for rule in _FACTOR_RULES:
        source = rule(store, source, want.target)
    return source


class DcpFormat(Format):
    name = "dcp"
    looks_like = (f"a DCP directory (with {manifest.METADATA_FILE}) or a step directory "
                  f"with {manifest.MODEL_DIR}/{manifest.METADATA_FILE}")
    takes_prefix = True

    def detect(self, store: Storage, path: str) -> bool:
        return model_dir(store, path) is not None

    def open(self, store: Storage, path: str, want: Want) -> Source:
        d = cast(str, model_dir(store, path))  # detect() found it
        ties, files = model_records(store, d)
        if files is not None:  # a save_model directory: sizes, and its checksums
            check_files(store, d, files, checksums=bool(want.verify))
            if want.verify is not False:
                store = store.verifying(block_checks(store, files, {"": d}))
        source = dir_source(store, DcpDir(store, d, trusted=want.trusted), want)
        if ties is None or want.prefix is not None:
            return source
        kept = tuple(g for g in (tuple(k for k in g if k in source.entries) for g in ties)
                     if len(g) > 1)
        return source.replace(ties=kept, meta={**source.meta, "ties_recorded": True})


_MODEL_INFO_LIMIT = 64 << 20


def model_records(store: Storage, d: str) -> tuple[list[list[str]] | None, dict | None]:
    """The tie groups and the file records a save_model directory keeps (None each: a
    directory written by another tool, or before they were recorded)."""
    info = join(d, manifest.MODEL_INFO)
    if not store.exists(info):
        return None, None
    if store.size(info) > _MODEL_INFO_LIMIT:
        raise ManifestError(
            f"{info} is {store.size(info)} bytes, over the {_MODEL_INFO_LIMIT} a model "
            "directory's record can be: it was not written by dcp_universal -> remove it")
    return manifest.model_info_from_json(store.read_bytes(info), info)


register_format(DcpFormat())
