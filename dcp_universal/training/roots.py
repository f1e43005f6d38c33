"""What may be a checkpoint root: refused before a save writes into it or a load reads
nothing from it.

A root is a directory (or a URL prefix) that holds ``step-<n>/`` directories. Four
mistakes look like roots and would lose a run without a word: a file (a load finds no
step and training silently starts over), a committed step directory (new steps would be
written inside the committed one), a DCP checkpoint directory (its ``.metadata``: no step
of ours, so a resume starts over inside it) and a folder of another tool's checkpoints
(torchtitan's ``step-1000/``: no step of ours, so a resume starts over beside them).
Each is refused with the path that was meant.
"""

from __future__ import annotations

from dcp_universal.errors import NotARootError
from dcp_universal.format import manifest
from dcp_universal.storage import Storage, join, parent

__all__ = ["check_root"]

_FOREIGN_LOOKS = 3  # another tool's step-N/ directories looked into, at most


def check_root(store: Storage, root: str) -> None:
    """Raise :class:`NotARootError` unless ``root`` can be a root (it may not exist
    yet). Not collective: call it where one rank decides."""
    if store.is_file(root):
        raise NotARootError(
            f"checkpoint root {root} is a file: a root is a directory (or a URL prefix) "
            "holding step-<n>/ directories -> pass another path; to start from this file, "
            "mgr.load(model, optimizer, init_from=<the file>)")
    names = set(store.listdir(root))
    if manifest.MANIFEST in names:
        up = parent(root)
        raise NotARootError(
            f"checkpoint root {root} is a committed step directory (it holds "
            f"{manifest.MANIFEST}), not a root: new steps would be written inside it -> "
            f"pass its parent {up!r} as the root (mgr.load(..., step=N) picks a step)")
    if manifest.METADATA_FILE in names:
        raise NotARootError(
            f"checkpoint root {root} is a DCP checkpoint directory (it holds "
            f"{manifest.METADATA_FILE}), not a root -> give the manager a root of its own "
            f"and start from it with mgr.load(model, init_from={root!r})")
    foreign = sorted(n for n in names
                     if n.startswith("step-") and manifest.step_of_name(n) is None)
    for name in foreign[:_FOREIGN_LOOKS]:
        if store.exists(join(root, name, manifest.METADATA_FILE)):
            raise NotARootError(
                f"checkpoint root {root} holds another tool's checkpoints ({name}/ is a DCP "
                f"directory, e.g. torchtitan's step-N/; this library's steps are named "
                f"{manifest.step_path(root, 1).rsplit('/', 1)[-1]}) -> give the manager a root of its "
                f"own and start from one of them with mgr.load(model, "
                f"init_from={join(root, name)!r})")
