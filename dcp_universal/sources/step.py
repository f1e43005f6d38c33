"""The committed-step format: ``<root>/step-<n>/`` with its ``manifest.json``.

A plain step's model is ``model/``. A LoRA step (``adapters/`` plus a shared frozen
base) restores exactly into a model with the same adapters; any other target (and an
export) gets merged weights: ``model/`` when the step has it, otherwise base plus
adapters, composed while reading. The base also holds the frozen originals of PEFT
``modules_to_save`` modules (``head.original_module.weight``): read into a target that
has them (whatever its adapters), left out for any other target and for exports. The
files read are checked against the manifest: sizes always, and every byte read against
its block checksums unless ``verify=False`` (``verify=True``: every file read and
checked whole first).
"""

from __future__ import annotations

from typing import cast

import torch

from dcp_universal.errors import CheckpointMismatchError
from dcp_universal.format import manifest
from dcp_universal.storage import dcp_io, steps
from dcp_universal.sources import quantized
from dcp_universal.sources.dcp import dir_source
from dcp_universal.storage.integrity import check_files
from dcp_universal.format.manifest import Manifest
from dcp_universal.model import names
from dcp_universal.sources import (DcpDir, Entry, Format, Source, Want, dir_entries,
                                   register_format)
from dcp_universal.storage import Storage, join

__all__ = ["StepFormat"]


class StepFormat(Format):
    name = "step"
    looks_like = f"a committed step (with {manifest.MANIFEST}), whose keys are canonical"

    def detect(self, store: Storage, path: str) -> bool:
        return store.exists(join(path, manifest.MANIFEST))

    def open(self, store: Storage, path: str, want: Want) -> Source:
        m = want.manifest if want.manifest is not None else steps.read_manifest(store, path)
        if want.verify is not False:
            store = steps.verified_store(store, path, m)
        source = quantized.serve(_step_source(store, path, want, m), m.quantized, want.target)
        return source.replace(ties=tuple(tuple(g) for g in m.ties),
                              meta={**source.meta, "ties_recorded": True})


def _opened(store: Storage, path: str, trusted: bool) -> tuple[DcpDir, dict]:
    infos, _, meta = dir_entries(DcpDir(store, path, trusted=trusted))
    return DcpDir(store, path, meta, trusted=trusted), infos


def _step_source(store: Storage, path: str, want: Want, m: Manifest) -> Source:
    view = want.target

    def checked(*items: str) -> None:  # sizes always, checksums when asked
        check_files(store, path, m.files, checksums=want.verify,
                    prefixes=tuple(f"{i}/" for i in items))

    merged = Want(target=view, trusted=want.trusted)
    model_dir = DcpDir(store, join(path, manifest.MODEL_DIR), trusted=want.trusted)
    if m.adapters is None:
        checked(manifest.MODEL_DIR)
        return dir_source(store, model_dir, merged)
    base, base_keys = _opened(store, cast(str, manifest.base_path(path, m)), want.trusted)
    adapters, step_keys = _opened(store, join(path, manifest.ADAPTERS_DIR), want.trusted)
    complete = view is not None and view.frozen_tensors().keys() == base_keys.keys()
    base_keys, originals = _split_originals(base_keys, step_keys, view)
    sites = m.adapters.sites
    factor_keys, idle = m.adapters.factor_keys(), set(m.adapters.idle)
    same_adapters = view is not None and (
        {s.name for s in view.sites} == set(sites)
        and set(view.adapter_tensors) == factor_keys | idle
        and all(tuple(view.adapter_tensors[k].shape) == step_keys[k].shape
                for k in factor_keys | idle))
    check_files(store, base.path, m.base_files or {}, checksums=want.verify)
    if same_adapters:
        assert view is not None  # same_adapters needs a view
        _check_same_updates(path, view.active_factor_keys(), factor_keys)
        checked(manifest.ADAPTERS_DIR)
        return Source(desc=path, entries={**{k: Entry(i, base, k) for k, i in base_keys.items()},
                                          **{k: Entry(i, adapters, k) for k, i in step_keys.items()}},
                      notes=(f"restored base ({m.base}) and adapters exactly",),
                      # the next save may reuse this base only if it holds what that
                      # save's base would (not a step written before originals were)
                      meta={"restored_base": m.base if complete else None})
    if m.has(manifest.MODEL_DIR):
        checked(manifest.MODEL_DIR)
        source = dir_source(store, model_dir, merged)
        return source.replace(entries={**source.entries,
                                       **{k: Entry(i, base, k) for k, i in originals.items()}})
    checked(manifest.ADAPTERS_DIR)
    trained = {k: Entry(i, adapters, k) for k, i in step_keys.items()
               if k not in factor_keys and k not in idle}
    merging = m.adapters.updates()
    carried, notes = {}, []
    if view is not None:
        carried = _carry_tied(view, merging, adapters, step_keys)
        merging = {n: t for n, t in merging.items() if n not in carried}
        notes += [f"carried the adapter of {n} (rank {r}) into the target's rank {r2}, adding "
                  "the same update: its base is tied to other names, so it was not merged"
                  for n, (r, r2, _) in sorted(carried.items())]
    notes.insert(0, f"merged {len(merging)} adapters into base {m.base} while loading"
                 if merging else f"base {m.base} loaded" if carried
                 else f"base {m.base} loaded; no adapter was active when the step was saved")
    if idle:
        notes.append(f"not merged: {len(idle)} tensors of adapters that were inactive, "
                     f"disabled or merged into the base when the step was saved ({min(idle)}, "
                     "...)")
    padded = {k: t for _, _, tensors in carried.values() for k, t in tensors.items()}
    if padded:
        trained.update(Source.in_memory(path, padded).entries)
    return Source(
        desc=path, entries={**{k: Entry(i, base, k) for k, i in base_keys.items()}, **trained},
        deltas={m.adapters.weight_key(name): update for name, update in merging.items()},
        factors={k: Entry(step_keys[k], adapters, k) for k in factor_keys},
        notes=tuple(notes))


def _split_originals(base_keys: dict, step_keys: dict, view) -> tuple[dict, dict]:
    """``(base keys a load reads, the PEFT modules_to_save originals among them)``: an
    original only where the target has one (an export, and a target without
    ``modules_to_save`` there, do not need it; it is no mismatch)."""
    stored = names.stored_originals({**base_keys, **step_keys}.keys())
    wanted = view.originals if view is not None else {}
    keep = {k: i for k, i in base_keys.items() if k not in stored or k in wanted}
    return keep, {k: i for k, i in keep.items() if k in stored}


def _rank(info, transposed: bool, side: int) -> int:
    """The rank of a factor shaped ``info.shape`` (``side``: the rank's axis untransposed)."""
    return info.shape[1 - side] if transposed else info.shape[side]


def _carry_tied(view, merging: dict, adapters: DcpDir, step_keys: dict) -> dict:
    """Adapters that cannot be merged because the target ties their base weight to other
    names (a LoRA on a tied embedding): when the target has one adapter of at least the
    saved rank there, the saved factors padded with zeros and rescaled to the target's
    scale add the same update. ``{site: (saved rank, target rank, {key: tensor})}``; a
    site not carried is merged (and a tied target then refuses the load)."""
    fits = {}  # site -> (saved term, target term, saved rank, target rank)
    for name, update in merging.items():
        site = next((s for s in view.sites if s.name == name), None)
        if len(view.tie_of(f"{name}.weight")) < 2 or site is None or len(update.terms) != 1 \
                or update.magnitude is not None or site.magnitude() is not None:
            continue  # a rescaled update is no sum of terms a plain adapter could carry
        now = site.terms()
        if len(now) != 1 or now[0].scale == 0:
            continue
        saved, t = update.terms[0], now[0]
        r = _rank(step_keys[saved.left], saved.left_t, 1)
        r2 = _rank(t.left, t.left_transposed, 1)
        if r2 >= r and _rank(step_keys[saved.right], saved.right_t, 0) == r:
            fits[name] = (saved, t, r, r2)
    if not fits:
        return {}
    full = {k: torch.empty(step_keys[k].shape, dtype=step_keys[k].dtype)
            for saved, *_ in fits.values() for k in (saved.left, saved.right)}
    dcp_io.load_state(adapters.store, full, adapters.path, single_process=True,
                      metadata=adapters.metadata, trusted=adapters.trusted)  # one read
    out = {}
    for name, (saved, t, r, r2) in fits.items():
        left = full[saved.left].T if saved.left_t else full[saved.left]      # (rows, r)
        right = full[saved.right].T if saved.right_t else full[saved.right]  # (r, cols)
        pl = left.new_zeros((left.shape[0], r2))
        pl[:, :r] = left * (saved.scale / t.scale)
        pr = right.new_zeros((r2, right.shape[1]))
        pr[:r] = right
        pl, pr = (pl.T if t.left_transposed else pl), (pr.T if t.right_transposed else pr)
        if pl.shape != t.left.shape or pr.shape != t.right.shape:
            continue
        lkey, rkey = view.param_keys[id(t.left)], view.param_keys[id(t.right)]
        out[name] = (r, r2, {lkey: pl.contiguous(), rkey: pr.contiguous()})
    return out


def _check_same_updates(path: str, target: set[str], saved: set[str]) -> None:
    """An exact restore computes the saved function only if the target's adapters add
    the same updates the saved ones did (the same adapters active, enabled, unmerged)."""
    if target == saved:
        return
    now, then = sorted(target - saved), sorted(saved - target)
    raise CheckpointMismatchError(
        f"{path} holds the model's adapters, but they were not adding the same updates when "
        f"it was saved: active in the target only: {now[:4]}{' ...' if len(now) > 4 else ''}; "
        f"active in the step only: {then[:4]}{' ...' if len(then) > 4 else ''}. Restoring "
        "them would compute another function -> make the target's adapters match the saved "
        "run first (PEFT: set_adapter(...) for the adapter that was active, merge_adapter() "
        "if it was merged, disable_adapter_layers() if disabled), or load into a model "
        "without these adapters to get the saved model's function merged")


register_format(StepFormat(), before="dcp")
