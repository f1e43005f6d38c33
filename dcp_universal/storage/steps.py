"""Steps and bases on a storage: listing, reading and writing manifests and base
records, and removing them in an order a kill cannot turn into a false commit. (What
the files say: :mod:`dcp_universal.format.manifest`.)"""

from __future__ import annotations

import json

from dcp_universal.errors import ManifestError, NotACheckpointError
from dcp_universal.format.manifest import (BASE_FILES, MANIFEST, FileRecord, Manifest,
                                           base_path, is_base_name, records_from_json,
                                           records_to_json, step_of_name)
from dcp_universal.storage import Storage, join
from dcp_universal.storage.integrity import block_checks

__all__ = ["list_steps", "list_bases", "read_manifest", "write_manifest", "remove_step",
           "read_base_files", "write_base_files", "remove_base", "uncommit",
           "verified_store"]


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
    path = join(step_dir, MANIFEST)
    try:
        data = store.read_bytes(path)
    except FileNotFoundError:
        raise NotACheckpointError(
            f"{step_dir} has no {MANIFEST}: it is not a committed step (a save that "
            "did not finish leaves such a directory; the next save removes it)") from None
    return Manifest.from_json(data, path)


def verified_store(store: Storage, step_dir: str, m: Manifest) -> Storage:
    """``store``, with every DCP directory of the step ``step_dir`` (and its base)
    read under the check of its block checksums (:meth:`Storage.verifying`)."""
    items = {rel.split("/", 1)[0] for rel in m.files if "/" in rel}
    checks = block_checks(store, m.files, {f"{i}/": join(step_dir, i) for i in items})
    if m.base:
        checks.update(block_checks(store, m.base_files or {}, {"": base_path(step_dir, m)}))
    return store.verifying(checks)


def write_manifest(store: Storage, step_dir: str, manifest: Manifest) -> None:
    """Commit a step: the manifest is written whole or not at all."""
    store.write_atomic(join(step_dir, MANIFEST), manifest.to_json().encode())


def remove_step(store: Storage, step_dir: str) -> None:
    """Uncommit first (manifest), then delete: a kill halfway leaves only debris. A step
    path that is a link loses the link only: nothing outside the root is touched."""
    left = uncommit(store, step_dir, MANIFEST)
    if left is not None:
        store.remove_tree(left)


def uncommit(store: Storage, directory: str, marker: str) -> str | None:
    """The first half of removing a step (``marker``: its manifest) or a base (its
    ``files.json``): the marker goes, so the directory is debris from now on; returns
    the directory, whose data is left to delete. A link loses the link only (None)."""
    if store.is_link(directory):
        store.remove_file(directory)
        return None
    store.remove_file(join(directory, marker))
    return directory


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


def remove_base(store: Storage, base_dir: str) -> None:
    """Mark incomplete first (``files.json``), then delete (a link: the link only)."""
    left = uncommit(store, base_dir, BASE_FILES)
    if left is not None:
        store.remove_tree(left)
