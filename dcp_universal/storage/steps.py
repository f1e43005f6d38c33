"""Steps and bases on a storage: listing, reading and writing manifests and base
records, and removing them in an order a kill cannot turn into a false commit. (What
the files say: :mod:`dcp_universal.format.manifest`.)"""

from __future__ import annotations

import json
import logging
from typing import Callable, cast

from dcp_universal.errors import (FormatVersionError, ManifestError, NotACheckpointError,
                                  UnsafeCheckpointError)
from dcp_universal.format import manifest, records
from dcp_universal.format.manifest import (BASE_FILES, MANIFEST, OPTIMIZER_DIR, FileRecord,
                                           Manifest, base_path, is_base_name,
                                           records_from_json, records_to_json,
                                           split_step_path, step_of_name)
from dcp_universal._torch_compat import DATA_SUFFIX
from dcp_universal.storage import LocalStorage, Storage, join, read_ahead
from dcp_universal.storage.integrity import block_checks, check_files, unchecked

__all__ = ["list_steps", "list_bases", "read_manifest", "write_manifest", "remove_step",
           "read_base_files", "write_base_files",
           "verified_store", "check_recorded", "newest_readable", "verify_step",
           "read_ahead_own"]

logger = logging.getLogger(__name__)


def list_steps(store: Storage, root: str, *, committed: bool = True) -> list[int]:
    """Step numbers under ``root``, ascending; only those with a manifest when
    ``committed``, only those without one otherwise (debris of a crashed save)."""
    out = []
    for name in store.listdir(root):
        step = step_of_name(name)
        if step is None or store.is_link(join(root, name)):
            continue  # a link leads outside the root: never listed, so never removed
        if (MANIFEST in store.listdir(join(root, name))) == committed:
            out.append(step)
    return sorted(out)


def list_bases(store: Storage, root: str) -> list[str]:
    return [n for n in store.listdir(root)
            if is_base_name(n) and not store.is_link(join(root, n))]


def read_manifest(store: Storage, step_dir: str) -> Manifest:
    """The manifest of the step directory ``step_dir``.

    Raises:
        NotACheckpointError: it has none (not committed).
        DamagedManifestError: it cannot be parsed (read at most
            :data:`~dcp_universal.format.records.MAX_MANIFEST_BYTES` + 1 bytes).
        ManifestError: a field is wrong, or its ``step`` is not the one its
            directory's name says.
    """
    path = join(step_dir, MANIFEST)
    try:
        with store.open_read(path) as f:
            data = f.read(records.MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise NotACheckpointError(
            f"{step_dir} has no {MANIFEST}: it is not a committed step (a save that "
            "did not finish leaves such a directory; the next save removes it)") from None
    m = Manifest.from_json(data, path)
    named = split_step_path(step_dir)
    if named is not None and named[1] != m.step:
        # a renamed directory, or a manifest copied from another step: which step this is
        # cannot be told, and retention and "latest" would judge it as the wrong one
        raise ManifestError(
            f"{path} says step {m.step}, but its directory {manifest.step_name(named[1])} "
            f"is step {named[1]}: a step directory was renamed or a manifest copied from "
            f"another step -> rename it back to {manifest.step_name(m.step)} if it was "
            "moved, or load another step")
    return m


def newest_readable(found: list[int], read: Callable[[int], Manifest]) -> int | None:
    """The newest of the steps ``found`` whose manifest ``read(step)`` reads (a step of a
    newer format counts: loading it says to upgrade). Each newer one that cannot be read
    is logged and skipped; when none can, the newest one's error is raised: a root whose
    steps are all damaged is not a first start."""
    first = None
    for step in sorted(found, reverse=True):
        try:
            read(step)
            return step
        except FormatVersionError:
            return step
        except (ManifestError, UnsafeCheckpointError, NotACheckpointError) as e:
            first = first or e
            logger.warning("step %d is not taken as the latest: its manifest cannot be read "
                           "(%s: %s)", step, type(e).__name__, e)
    if first is not None:
        raise first
    return None


def check_recorded(store: Storage, step_dir: str, m: Manifest) -> None:
    """Raise unless the step ``step_dir`` records block checksums for every file a load
    may read: every record has them, every file inside its directories has a record, and
    so does its base. Steps of a format before
    :data:`~dcp_universal.format.manifest.CHECKSUMS_SINCE` need records (their sizes),
    not block checksums.

    Raises:
        IntegrityError: naming what is missing, and ``verify=False`` as the way to load
            it unchecked.
    """
    # every format recorded every file (at least its size): a step recording none, or
    # holding a file it does not record, is damage whatever its format_version says
    if not m.files:
        raise unchecked(step_dir, f"has a {MANIFEST} that records no files")
    bare = sorted(rel for rel, rec in m.files.items() if not rec.has_blocks) \
        if m.requires_checksums() else []
    if bare:
        raise unchecked(join(step_dir, bare[0]), "has no block checksums in its manifest"
                        + (f" (nor do {len(bare) - 1} more files)" if len(bare) > 1 else ""))
    # an archive killed before its optimizer/ went left it behind: never read again
    leftover = f"{OPTIMIZER_DIR}/" if m.archived else None
    try:
        found = store.file_sizes(step_dir)
    except FileNotFoundError:
        found = {}
    extra = sorted(rel for rel in found if "/" in rel and rel not in m.files
                   and not (leftover and rel.startswith(leftover)))
    if extra:
        raise unchecked(join(step_dir, extra[0]), "is not recorded in the manifest"
                        + (f" (nor are {len(extra) - 1} more files)" if len(extra) > 1 else ""))
    if m.base:
        base_files = m.base_files or {}
        bare = sorted(rel for rel, rec in base_files.items() if not rec.has_blocks) \
            if m.requires_checksums() else []
        if not base_files or bare:
            raise unchecked(cast(str, base_path(step_dir, m)), "has no block checksums recorded in "
                            f"{join(step_dir, MANIFEST)}" + (f" ({bare[0]})" if bare else ""))


def verified_store(store: Storage, step_dir: str, m: Manifest) -> Storage:
    """``store``, with every DCP directory of the step ``step_dir`` (and its base)
    read under the check of its block checksums (:meth:`Storage.verifying`), once
    :func:`check_recorded` found every file recorded."""
    check_recorded(store, step_dir, m)
    items = {rel.split("/", 1)[0] for rel in m.files if "/" in rel}
    require = m.requires_checksums()
    checks = block_checks(store, m.files, {f"{i}/": join(step_dir, i) for i in items},
                          require=require)
    if m.base:
        checks.update(block_checks(store, m.base_files or {}, {"": cast(str, base_path(step_dir, m))},
                                   require=require))
    return store.verifying(checks)


def write_manifest(store: Storage, step_dir: str, manifest: Manifest) -> None:
    """Commit a step: the manifest is written whole or not at all."""
    store.write_atomic(join(step_dir, MANIFEST), manifest.to_json().encode())


def remove_step(store: Storage, directory: str, marker: str | None = MANIFEST,
                fence=None) -> None:
    """Remove a step (``marker``: its manifest) or a base (its ``files.json``; None: a
    directory that has none), uncommitted first: a kill halfway leaves only debris, and a
    link loses the link only. ``fence``: the root's writer lease, which must hold
    (:meth:`Storage.detach`)."""
    left = store.detach(directory, marker, fence)
    if left is not None:
        store.remove_tree(left)


def read_base_files(store: Storage, base_dir: str) -> dict[str, FileRecord] | None:
    """A base's file records, or None if the base is not complete (or absent)."""
    marker = join(base_dir, BASE_FILES)
    if not store.exists(marker):
        return None
    try:
        data = json.loads(store.read_bytes(marker))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{marker} is not valid JSON ({e}); remove {base_dir} and save "
                            "again to rewrite it") from None
    return records_from_json(data, marker)


def write_base_files(store: Storage, base_dir: str, records: dict[str, FileRecord]) -> None:
    """Complete a base: its file records, written whole or not at all."""
    store.write_atomic(join(base_dir, BASE_FILES),
                       json.dumps(records_to_json(records), sort_keys=True).encode())



def verify_step(store: Storage, step_dir: str, *,
                progress: Callable[[int], None] | None = None) -> dict[str, int]:
    """Check every file of the committed step ``step_dir`` and of its base, whole: size
    and checksums (one process). Returns ``{"files": n, "bytes": total}``.

    Raises:
        IntegrityError: naming the first bad file.
    """
    m = read_manifest(store, step_dir)
    check_recorded(store, step_dir, m)
    check_files(store, step_dir, m.files, checksums=True, progress=progress)
    checked = list(m.files.values())
    if m.base:
        check_files(store, cast(str, manifest.base_path(step_dir, m)), m.base_files or {},
                    checksums=True, progress=progress)
        checked += list((m.base_files or {}).values())
    return {"files": len(checked), "bytes": sum(r.size for r in checked)}


def read_ahead_own(store: Storage, step_dir: str, m: Manifest, items: list[str], rank: int,
                   world_size: int):
    """Start reading, on a thread of its own, the data files rank ``rank`` wrote in the
    step's ``items`` directories (``"model"``, ``"optimizer"``), when the job has the
    world size that saved the step: the files it will read, almost whole, before its
    load has planned a single read. Returns the
    :class:`~dcp_universal.storage.read_ahead.ReadAhead` (``cancel()`` it when done), or
    ``None`` (files not on a local disk, another world size: each read plans its own).

    Blocks checked here (the store's block checks, a verifying store's) are not read or
    checked again by the load; a damaged block stops this reading quietly and is
    refused by the load's own read of it.
    """
    if (not read_ahead.READ_AHEAD or not isinstance(store, LocalStorage)
            or m.world_size != world_size):
        return None
    own = f"__{rank}_"  # DCP's file names: one prefix per writing rank
    files = {}
    for rel, rec in sorted(m.files.items()):
        folder, _, name = rel.rpartition("/")
        if folder in items and name.startswith(own) and name.endswith(DATA_SUFFIX):
            directory = join(step_dir, folder)
            files[rel] = (store.os_path(join(directory, name)), name, [(0, rec.size)],
                          store.checks.get(directory))
    return read_ahead.ReadAhead(files) if files else None
