"""The manifest: the one module that spells a manifest field, and the face of the
format (it re-exports the layout, :mod:`~dcp_universal.format.layout`, the typed
records, :mod:`~dcp_universal.format.records`, and the model directory's record,
:mod:`~dcp_universal.format.model_info`, so ``manifest.MODEL_DIR`` reads as before).
(Reading and writing them on a storage: :mod:`dcp_universal.storage.steps`.)

A step is committed by its ``manifest.json`` (written last, see
:func:`write_manifest`). The manifest is typed (:class:`Manifest` and the records it
holds); :meth:`Manifest.from_json` validates what it reads and raises
:class:`~dcp_universal.errors.ManifestError` naming the field, what was expected and
what was found. ``docs/format.md`` documents every field; a test keeps the two equal.

Layout under a root (local path or fsspec URL)::

    <root>/step-00000100/{model,optimizer,adapters}/ + manifest.json
    <root>/base-<fingerprint>/ + files.json
"""

from __future__ import annotations

import dataclasses
import json
import time
import zlib
from typing import Any

import torch

from dcp_universal._version import __version__
from dcp_universal.errors import (DamagedManifestError, FormatVersionError,
                                  UnsafeCheckpointError)
from dcp_universal.format.layout import (ADAPTERS_DIR, BASE_FILES, HF_INDEX, HF_SINGLE, ITEMS,
                                         MANIFEST, MAX_STEP, METADATA_FILE, MODEL_DIR,
                                         MODEL_INFO, OPTIMIZER_DIR, _BASE_RE, base_fingerprint,
                                         base_name, base_path, inside, is_base_name,
                                         split_step_path, step_name, step_of_name, step_path)
from dcp_universal.format.records import (CHECKSUM_ALGOS, CHECKSUMS_SINCE, FORMAT_VERSION,
                                          MAX_DEPTH, AdapterMagnitude,
                                          AdapterTerm, AdapterUpdate, Adapters, FileRecord,
                                          Mesh, Quantization, TrainingState, _get,
                                          parse_json, records_from_json, records_to_json)
from dcp_universal.format.model_info import model_info_from_json, model_info_to_json, ties_from_json

__all__ = [
    "FORMAT_VERSION", "MODEL_DIR", "OPTIMIZER_DIR", "ADAPTERS_DIR", "MANIFEST", "BASE_FILES",
    "METADATA_FILE", "ITEMS", "FileRecord", "AdapterTerm", "AdapterMagnitude",
    "AdapterUpdate", "Adapters", "Quantization", "Mesh", "TrainingState",
    "Manifest", "step_path", "split_step_path", "base_name", "base_path", "base_fingerprint",
    "step_of_name", "is_base_name", "records_to_json", "records_from_json", "CHECKSUM_ALGOS",
    "CHECKSUMS_SINCE", "MAX_STEP", "MAX_DEPTH", "step_name",
    "HF_SINGLE", "HF_INDEX", "MODEL_INFO", "inside", "parse_json",
    "model_info_to_json", "model_info_from_json", "AdapterTerm",
]


# Fields written only when they carry something (so manifests without them are
# byte-for-byte what earlier versions of this library wrote).
_OMITTED_WHEN_EMPTY = ("base_files", "archived", "legacy", "ties", "writer", "quantized")


@dataclasses.dataclass(kw_only=True)
class Manifest:
    """A committed step's ``manifest.json``.

    Attributes:
        format_version: this layout's version; a newer one raises FormatVersionError.
            A new manifest is written with the lowest version that holds what it
            records: :data:`CHECKSUMS_SINCE`, raised by :meth:`raise_version`.
        step: the step number.
        world_size: processes that wrote the step.
        mesh: the model's device mesh at save (None when not sharded).
        torch_version: ``torch.__version__`` at save.
        library_version: dcp_universal's version at save.
        created_unix: commit time, seconds since the epoch.
        merge: how merged weights were written: "sharded" or "rank0".
        dtypes: the model tensors' dtypes.
        items: which item directories hold data: ``model``, ``adapters``, and
            ``optimizer`` (true when optimizer state was saved; the directory also holds
            the training state, and exists either way), and any item a run added
            (:mod:`dcp_universal.training.items`); a reader keeps items it does not know.
        base: the shared frozen base directory (``base-<fingerprint>``), LoRA runs only.
        adapters: the adapters, LoRA runs only.
        training_state: names of the training state in ``optimizer/``.
        metrics: numbers given to ``save(metrics=...)`` (retention's ``keep_best``).
        files: every data file of the step, relative to the step directory.
        base_files: the base's file records, relative to the base (LoRA runs only).
        archived: retention archived the step (its ``optimizer/`` was removed).
        legacy: where a converted legacy ``torch.save`` file came from (``convert``).
        ties: groups of canonical names that named one shared tensor in the saved model
            (a token embedding tied to the output head).
        writer: the writer lease's acquisition that committed the step (the fencing
            token, :mod:`dcp_universal.training.lease`); None without a lease.
        quantized: canonical key -> the quantization of each 4-bit weight the base holds
            packed (QLoRA, :mod:`dcp_universal.model.bnb`); empty otherwise.
    """

    format_version: int = CHECKSUMS_SINCE
    step: int
    world_size: int
    mesh: Mesh | None = None
    torch_version: str = dataclasses.field(default_factory=lambda: torch.__version__)
    library_version: str = __version__
    created_unix: float = dataclasses.field(default_factory=time.time)
    merge: str
    dtypes: list[str]
    items: dict[str, bool]
    base: str | None = None
    adapters: Adapters | None = None
    training_state: TrainingState = dataclasses.field(default_factory=TrainingState)
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    files: dict[str, FileRecord] = dataclasses.field(default_factory=dict)
    base_files: dict[str, FileRecord] | None = None
    archived: bool = False
    legacy: dict | None = None
    ties: list[list[str]] = dataclasses.field(default_factory=list)
    writer: str | None = None
    quantized: dict[str, Quantization] = dataclasses.field(default_factory=dict)

    def has(self, item: str) -> bool:
        """True if the step holds data of ``item`` (:data:`ITEMS`, or another one)."""
        return bool(self.items.get(item))

    def least_version(self) -> int:
        """The lowest format version that records what this manifest records: 3 for
        adapters that need it (:meth:`Adapters.least_version`) or 4-bit weights
        (``quantized``), else :data:`CHECKSUMS_SINCE`."""
        return max(CHECKSUMS_SINCE, self.adapters.least_version() if self.adapters else 0,
                   3 if self.quantized else 0)

    def raise_version(self) -> None:
        """Raise :attr:`format_version` to :meth:`least_version` (a writer calls it once
        what the step records is set)."""
        self.format_version = max(self.format_version, self.least_version())

    def files_under(self, item: str) -> dict[str, FileRecord]:
        return {k: v for k, v in self.files.items() if k.startswith(f"{item}/")}

    def to_json(self) -> str:
        if CHECKSUMS_SINCE <= self.format_version < self.least_version():
            raise ValueError(f"a manifest of format {self.format_version} cannot record what "
                             f"needs format {self.least_version()}: call raise_version()")
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _OMITTED_WHEN_EMPTY and not value:
                continue
            if f.name in ("files", "base_files"):
                value = records_to_json(value)
            elif f.name == "quantized":
                value = {k: q.to_json() for k, q in sorted(value.items())}
            elif hasattr(value, "to_json"):
                value = value.to_json()
            out[f.name] = value
        out["content_crc32"] = _content_crc32(json.loads(json.dumps(out)))
        return json.dumps(out, indent=1, sort_keys=True)

    def requires_checksums(self) -> bool:
        """Every file of the step must carry block checksums (its format is
        :data:`CHECKSUMS_SINCE` or newer): one without is damage, not an older writer."""
        return self.format_version >= CHECKSUMS_SINCE

    @classmethod
    def from_json(cls, text: str | bytes, where: str = MANIFEST) -> "Manifest":
        """Parse and validate a manifest.

        Raises:
            DamagedManifestError: not JSON, larger than :data:`~dcp_universal.format.records.MAX_MANIFEST_BYTES`,
                nested deeper than :data:`MAX_DEPTH`, not an object with an integer
                ``format_version``, a number out of range, or failing its own checksum.
            ManifestError: a field of the wrong type.
            FormatVersionError: written by a newer format than this library reads.
        """
        fix = "the step is damaged; load an earlier step (CheckpointManager.steps())"
        d = parse_json(text, where, fix)
        if not isinstance(d, dict) or isinstance(d.get("format_version"), bool) \
                or not isinstance(d.get("format_version"), int) or d["format_version"] < 1:
            raise DamagedManifestError(f"{where} is not a dcp_universal manifest (no "
                                       f"format_version from 1 up): {fix}")
        if d["format_version"] > FORMAT_VERSION:
            damaged = _content_fails(d)
            raise FormatVersionError(
                f"{where} has format_version {d['format_version']}; this dcp_universal "
                f"reads versions up to {FORMAT_VERSION}: upgrade dcp_universal to read it"
                + (" (or the manifest is damaged: it fails this version's content "
                   "checksum)" if damaged else ""))
        _check_content(d, where)  # before the fields: a changed byte is damage, whatever
        # field it hit
        try:
            return cls._fields(d, where)
        except OverflowError as e:  # a number float() cannot hold: 1e999 written as digits
            raise DamagedManifestError(f"{where} holds a number out of range ({e}): {fix}") \
                from None

    @classmethod
    def _fields(cls, d: dict, where: str) -> "Manifest":
        # items another version (or another run's CheckpointManager(items=...)) wrote
        # are kept as they are: a reader that does not know one says so and skips it
        items = _get(d, "items", dict, where, "an object of item -> bool")
        for name, value in items.items():
            _get(items, name, bool, f"{where}.items", "a boolean")
        mesh, adapters = d.get("mesh"), d.get("adapters")
        quantized = _get(d, "quantized", dict, where, "an object of key -> quantization",
                         optional=True, default={}) or {}
        metrics = _get(d, "metrics", dict, where, "an object", optional=True, default={}) or {}
        return cls(
            format_version=d["format_version"],
            step=_get(d, "step", int, where, "an integer step"),
            world_size=_get(d, "world_size", int, where, "an integer world size"),
            mesh=Mesh.from_json(mesh, f"{where}.mesh") if mesh is not None else None,
            torch_version=_get(d, "torch_version", str, where, "a version string"),
            library_version=_get(d, "library_version", str, where, "a version string"),
            created_unix=float(_get(d, "created_unix", (int, float), where, "a time")),
            merge=_get(d, "merge", str, where, "'sharded' or 'rank0'"),
            dtypes=_get(d, "dtypes", list, where, "a list of dtype names"),
            items=dict(items),
            base=_base_name(_get(d, "base", str, where, "a base directory name",
                                 optional=True), f"{where}.base"),
            adapters=Adapters.from_json(adapters, f"{where}.adapters") if adapters else None,
            training_state=TrainingState.from_json(
                _get(d, "training_state", dict, where, "an object"), f"{where}.training_state"),
            metrics={k: float(_get(metrics, k, (int, float), f"{where}.metrics", "a number"))
                     for k in metrics},
            files=records_from_json(d.get("files", {}), f"{where}.files"),
            base_files=(records_from_json(d["base_files"], f"{where}.base_files")
                        if d.get("base_files") is not None else None),
            archived=_get(d, "archived", bool, where, "a boolean", optional=True, default=False),
            legacy=_get(d, "legacy", dict, where, "an object", optional=True),
            ties=ties_from_json(d.get("ties", []), f"{where}.ties"),
            writer=_get(d, "writer", str, where, "a lease token", optional=True),
            quantized={k: Quantization.from_json(q, f"{where}.quantized[{k!r}]")
                       for k, q in quantized.items()},
        )


def _base_name(name: str | None, where: str) -> str | None:
    if name is not None and not _BASE_RE.match(name):
        raise UnsafeCheckpointError(
            f"{where} is {name!r}, expected a base directory name 'base-<hex>' beside the "
            "step: a manifest never points outside its root -> the manifest was edited or "
            "written by another tool; do not load it")
    return name


def _content_crc32(d: dict) -> int:
    """CRC-32 of a manifest's fields (all but the checksum itself), in a canonical
    JSON spelling, so any edit of a field after the commit shows."""
    body = {k: v for k, v in d.items() if k != "content_crc32"}
    return zlib.crc32(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def _content_fails(d: dict) -> bool:
    """A manifest's ``content_crc32`` does not match its fields (one written before
    manifests carried it passes)."""
    return "content_crc32" in d and d["content_crc32"] != _content_crc32(d)


def _check_content(d: dict, where: str) -> None:
    if _content_fails(d):
        raise DamagedManifestError(
            f"{where} fails its own checksum (content_crc32): a field was changed after "
            "the step was committed, which can change what the step loads -> load an "
            "earlier step, or restore this manifest from a copy")
