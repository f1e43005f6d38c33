"""The manifest and the step layout: the one module that spells a manifest field or a
step / base directory name. (Reading and writing them on a storage:
:mod:`dcp_universal.storage.steps`.)

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
import re
import time
import zlib
from typing import Any, cast

import torch

from dcp_universal._version import __version__
from dcp_universal.errors import (DamagedManifestError, FormatVersionError, ManifestError,
                                  UnsafeCheckpointError)
from dcp_universal._paths import join, parent

__all__ = [
    "FORMAT_VERSION", "MODEL_DIR", "OPTIMIZER_DIR", "ADAPTERS_DIR", "MANIFEST", "BASE_FILES",
    "METADATA_FILE", "ITEMS", "FileRecord", "AdapterTerm", "AdapterMagnitude",
    "AdapterUpdate", "Adapters", "Quantization", "Mesh", "TrainingState",
    "Manifest", "step_path", "split_step_path", "base_name", "base_path", "base_fingerprint",
    "step_of_name", "is_base_name", "records_to_json", "records_from_json", "CHECKSUM_ALGOS",
    "CHECKSUMS_SINCE", "MAX_STEP", "MAX_MANIFEST_BYTES", "MAX_DEPTH", "step_name",
]

#: The layout's version, and what each one promises:
#:
#: 1. every data file has a record: its size, and a whole-file CRC-32, block checksums,
#:    or (written by a save whose checksums were off) nothing more;
#: 2. every data file has a record with block checksums, and every file inside the
#:    step's (or a model directory's) DCP directories has a record: a record without
#:    them, or a file without a record, is damage, not an older writer;
#: 3. adapters may rescale their update (``adapters.magnitudes``: DoRA), which a reader
#:    of version 2 would merge as plain LoRA, adapt a parameter other than a ``.weight``
#:    or a stack of experts, and the base may hold 4-bit weights (``quantized``).
#:
#: A manifest records the lowest version that holds what it records
#: (:meth:`Manifest.raise_version`): a step without DoRA, expert or parameter adapters or
#: 4-bit weights stays version 2, readable by the releases that read 2.
FORMAT_VERSION = 3
#: the first version whose files all carry block checksums: an older step (or model
#: directory) loads with what it recorded; a newer one missing any loads only unchecked
CHECKSUMS_SINCE = 2
#: the largest step number: a signed 64-bit integer, as a training loop's counter and a
#: tensor hold it; a step directory's name has 8 to 19 digits
MAX_STEP = 2 ** 63 - 1
#: the largest manifest (or model directory record) read. Inline block sums cost 8 hex
#: digits per 128 KiB block (1/16384 of the data; larger files keep theirs in sidecars),
#: so 256 MiB covers a 4 TiB step (a 405B-parameter model with its optimizer on 16k
#: ranks, each file at most 512 MiB); parsing one costs at most a few GB of memory
MAX_MANIFEST_BYTES = 256 << 20
#: the deepest nesting of objects and lists a manifest may have (the library writes at
#: most 6: adapters.modules.<name>.<config>.<list>); deeper is damage, refused before
#: anything recurses over it
MAX_DEPTH = 64

MODEL_DIR = "model"
OPTIMIZER_DIR = "optimizer"
ADAPTERS_DIR = "adapters"
ITEMS = (MODEL_DIR, ADAPTERS_DIR, OPTIMIZER_DIR)
MANIFEST = "manifest.json"
BASE_FILES = "files.json"  # a base's file records, written last: its presence completes it
METADATA_FILE = ".metadata"  # written by DCP, last, when a DCP directory is complete
# Hugging Face safetensors, as transformers' save_pretrained names them
HF_SINGLE = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
# beside a save_model directory's DCP files: what DCP's metadata cannot say (tie groups);
# written before DCP's .metadata, so every complete model directory has it
MODEL_INFO = "dcp_universal.json"

# ASCII digits only (``\d`` also matches other scripts' digits, which int() accepts)
_STEP_RE = re.compile(r"step-([0-9]{8,19})")
_BASE_RE = re.compile(r"^base-[0-9a-f]+$")


# ---- typed records ------------------------------------------------------------------

_MISSING = object()


def _fail(where: str, expected: str, found: Any) -> ManifestError:
    shown = "nothing (missing)" if found is _MISSING else repr(found)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return ManifestError(f"{where}: expected {expected}, found {shown}; the step is damaged "
                         "or was not written by dcp_universal: load an earlier step")


def _get(d: dict, key: str, types: type | tuple, where: str, expected: str, *,
         optional: bool = False, default: Any = None) -> Any:
    if key not in d:
        if optional:
            return default
        raise _fail(f"{where}.{key}", expected, _MISSING)
    value = d[key]
    if optional and value is None:
        return None
    # bool is an int in Python; a count must not be True
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        raise _fail(f"{where}.{key}", expected, value)
    return value


def _as_tuple(types) -> tuple:
    return types if isinstance(types, tuple) else (types,)


#: checksum algorithms a file record may name (``FileRecord.algo``)
CHECKSUM_ALGOS = ("crc32c", "crc32")


@dataclasses.dataclass(kw_only=True)
class FileRecord:
    """One data file of a step or base.

    Attributes:
        size: bytes, checked on every load.
        algo / block / sums / sidecar: the file's checksums, computed while writing:
            ``algo`` (:data:`CHECKSUM_ALGOS`) of every ``block`` bytes (the last block
            may be shorter), 4 big-endian bytes per block: in ``sums``, or, for a large
            file, in the file named ``sidecar`` beside it (itself a file of the step
            with a record of its own). A load checks the blocks holding every byte it
            reads.
        crc32: CRC-32 of the whole file: what steps written before block checksums
            carry (checked with ``verify=True`` only, which reads every file whole).
    """

    size: int
    crc32: int | None = None
    algo: str | None = None
    block: int | None = None
    sums: bytes | None = None
    sidecar: str | None = None

    @property
    def has_blocks(self) -> bool:
        return self.sums is not None or self.sidecar is not None

    @property
    def n_blocks(self) -> int:
        return -(-self.size // self.block) if self.block else 0

    def to_json(self) -> dict:
        out: dict[str, Any] = {"size": self.size}
        if self.crc32 is not None or not self.has_blocks:
            out["crc32"] = self.crc32
        if self.has_blocks:
            out["checksum"] = {"algo": self.algo, "block": self.block}
            if self.sidecar is not None:
                out["checksum"]["file"] = self.sidecar
            else:
                assert self.sums is not None  # has_blocks without a sidecar
                out["checksum"]["sums"] = self.sums.hex()
        return out

    @classmethod
    def from_json(cls, d: Any, where: str) -> "FileRecord":
        if not isinstance(d, dict):
            raise _fail(where, "an object {size, checksum}", d)
        size = _get(d, "size", int, where, "an integer byte count")
        crc32 = _get(d, "crc32", int, where, "an integer CRC-32", optional=True)
        c = _get(d, "checksum", dict, where, "an object {algo, block, sums}", optional=True)
        if c is None:
            return cls(size=size, crc32=crc32)
        w = f"{where}.checksum"
        algo = _get(c, "algo", str, w, f"one of {list(CHECKSUM_ALGOS)}")
        if algo not in CHECKSUM_ALGOS:
            raise _fail(f"{w}.algo", f"one of {list(CHECKSUM_ALGOS)} (a newer dcp_universal "
                        "may know it: upgrade)", algo)
        block = _get(c, "block", int, w, "a positive block size in bytes")
        if block <= 0:
            raise _fail(f"{w}.block", "a positive block size in bytes", block)
        sidecar = _get(c, "file", str, w, "the name of its checksums' file", optional=True)
        if sidecar is not None:
            if "/" in sidecar or "\\" in sidecar or sidecar in (".", ".."):
                raise _fail(f"{w}.file", "a file name beside it", sidecar)
            return cls(size=size, crc32=crc32, algo=algo, block=block, sidecar=sidecar)
        hexed = _get(c, "sums", str, w, "hex digits, 8 per block")
        n_blocks = -(-size // block)
        try:
            sums = bytes.fromhex(hexed)
        except ValueError:
            raise _fail(f"{w}.sums", "hex digits, 8 per block", hexed[:40]) from None
        if len(sums) != 4 * n_blocks:
            raise _fail(w, f"{n_blocks} block sums of {block} bytes for {size} bytes",
                        f"{len(sums) // 4} sums")
        return cls(size=size, crc32=crc32, algo=algo, block=block, sums=sums)


def records_to_json(records: dict[str, FileRecord]) -> dict:
    return {name: rec.to_json() for name, rec in sorted(records.items())}


def records_from_json(d: Any, where: str) -> dict[str, FileRecord]:
    if not isinstance(d, dict):
        raise _fail(where, "an object of file records", d)
    for name in d:
        inside(name, where)
    return {name: FileRecord.from_json(rec, f"{where}[{name!r}]") for name, rec in d.items()}


def inside(relative: str, where: str) -> str:
    """``relative`` itself, if it names a file below its directory (a relative path
    with no ``..`` part, no backslash, no drive), else :class:`UnsafeCheckpointError`:
    a name read from a checkpoint never leads outside it."""
    parts = relative.split("/")
    if (not relative or relative.startswith("/") or "\\" in relative or ":" in parts[0]
            or any(p in ("", ".", "..") for p in parts)):
        raise UnsafeCheckpointError(
            f"{where} names {relative!r}, which is not a file inside the checkpoint: a "
            "checkpoint never refers outside its directory -> the file was written by "
            "another tool or edited; do not load it")
    return relative


@dataclasses.dataclass(kw_only=True)
class AdapterTerm:
    """One low-rank update of an adapted weight, as stored: ``scale * L @ R`` where
    ``L`` is the tensor ``left`` (transposed when ``left_t``) and ``R`` is ``right``
    (transposed when ``right_t``); both are canonical keys of ``adapters/``.

    Attributes:
        left: canonical key of the factor whose rows line up with the weight's rows.
        right: canonical key of the other factor.
        scale: the factor in front of the product (LoRA: ``alpha / r``).
        left_t: ``left`` is stored transposed.
        right_t: ``right`` is stored transposed.
        experts: on a 3-D ``(E, rows, columns)`` weight (format 3), ``E``: expert ``e``
            gets ``scale * L_e @ R_e``, each factor split into ``E`` pieces as
            ``left_split`` / ``right_split`` say (``rows``, ``cols_strided``,
            ``stacked``: :data:`dcp_universal.adapters.SPLITS`), each piece transposed
            where ``left_t`` / ``right_t`` say. 0 for a 2-D weight.
    """

    left: str
    right: str
    scale: float
    left_t: bool = False
    right_t: bool = False
    experts: int = 0
    left_split: str = ""
    right_split: str = ""

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        if not self.experts:
            for k in ("experts", "left_split", "right_split"):
                del out[k]
        return out

    @classmethod
    def from_json(cls, d: Any, where: str) -> "AdapterTerm":
        if not isinstance(d, dict):
            raise _fail(where, "an object {left, right, scale, left_t, right_t}", d)
        experts = _get(d, "experts", int, where, "a number of experts", optional=True, default=0)
        splits = ("rows", "cols_strided", "stacked")
        term = cls(left=_get(d, "left", str, where, "a tensor key"),
                   right=_get(d, "right", str, where, "a tensor key"),
                   scale=float(_get(d, "scale", (int, float), where, "a number")),
                   left_t=_get(d, "left_t", bool, where, "a boolean", optional=True, default=False),
                   right_t=_get(d, "right_t", bool, where, "a boolean", optional=True, default=False),
                   experts=experts,
                   left_split=_get(d, "left_split", str, where, f"one of {splits}",
                                   optional=True, default=""),
                   right_split=_get(d, "right_split", str, where, f"one of {splits}",
                                    optional=True, default=""))
        if isinstance(experts, bool) or experts < 0 or (experts and not (
                term.left_split in splits and term.right_split in splits)):
            raise _fail(where, f"experts >= 0, and with experts both splits one of {splits}",
                        {k: d.get(k) for k in ("experts", "left_split", "right_split")})
        return term


@dataclasses.dataclass(frozen=True)
class AdapterMagnitude:
    """A rescale of a site's updated weight, as stored (DoRA, format 3): ``W' = (m /
    ||V||) * V``, ``V = W + sum(terms)``, where ``m`` is the tensor ``key`` of
    ``adapters/`` with one value per row of ``W`` (``axis`` 0) or per column (1), and
    the norm is taken over the other axis."""

    key: str
    axis: int

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Any, where: str) -> "AdapterMagnitude":
        if not isinstance(d, dict):
            raise _fail(where, "an object {key, axis}", d)
        axis = _get(d, "axis", int, where, "0 (rows) or 1 (columns)")
        if axis not in (0, 1) or isinstance(axis, bool):
            raise _fail(f"{where}.axis", "0 (rows) or 1 (columns)", axis)
        return cls(key=_get(d, "key", str, where, "a tensor key"), axis=axis)


@dataclasses.dataclass(frozen=True)
class AdapterUpdate:
    """Everything added to one weight: its terms, and the rescale when there is one."""

    terms: tuple[AdapterTerm, ...]
    magnitude: AdapterMagnitude | None = None

    def keys(self) -> list[str]:
        """The ``adapters/`` tensors the update reads."""
        return [k for t in self.terms for k in (t.left, t.right)] + (
            [self.magnitude.key] if self.magnitude else [])

    def add(self, term: AdapterTerm) -> "AdapterUpdate":
        return dataclasses.replace(self, terms=(*self.terms, term))


@dataclasses.dataclass(kw_only=True)
class Adapters:
    """The adapters of a LoRA step: enough to merge them from disk.

    Attributes:
        kinds: names of the adapter kinds present (``dcp_universal.adapters``).
        modules: canonical module name -> the kind's configuration (rank, alpha, ...).
        sites: site -> the terms added to its weight: a canonical module name (its
            ``.weight``), or for a ``parameter`` layout the canonical key of the
            parameter itself (:meth:`weight_key`).
        layouts: canonical module name -> its base weight's layout, as its kind declares
            it (``linear``, ``conv1d``, ``embedding``); exports to other tools' adapter
            formats follow it. Empty in steps written before it was recorded.
        idle: canonical keys of adapter tensors the step holds that added nothing to the
            saved model's function: adapters inactive, disabled or already merged into
            the base when it was saved (PEFT's ``set_adapter``,
            ``disable_adapter_layers``, ``merge_adapter``). Restored into a target whose
            same adapters are idle too; never merged. Empty in steps written before.
        buffers: canonical keys of buffers the step's ``adapters/`` holds beside the
            trained weights (BART's ``final_logits_bias``, BatchNorm statistics): state,
            not trained parameters. Empty in steps written before.
        magnitudes: canonical module name -> the rescale of its updated weight (DoRA);
            format 3, absent from steps without one.
    """

    kinds: list[str]
    modules: dict[str, dict]
    sites: dict[str, list[AdapterTerm]]
    layouts: dict[str, str] = dataclasses.field(default_factory=dict)
    idle: list[str] = dataclasses.field(default_factory=list)
    buffers: list[str] = dataclasses.field(default_factory=list)
    magnitudes: dict[str, AdapterMagnitude] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        out = {"kinds": list(self.kinds), "modules": self.modules,
               "sites": {n: [t.to_json() for t in terms] for n, terms in self.sites.items()}}
        if self.magnitudes:
            out["magnitudes"] = {n: m.to_json() for n, m in sorted(self.magnitudes.items())}
        if self.layouts:
            out["layouts"] = dict(self.layouts)
        if self.idle:
            out["idle"] = sorted(self.idle)
        if self.buffers:
            out["buffers"] = sorted(self.buffers)
        return out

    @classmethod
    def from_json(cls, d: Any, where: str) -> "Adapters":
        if not isinstance(d, dict):
            raise _fail(where, "an object {kinds, modules, sites}", d)
        sites = _get(d, "sites", dict, where, "an object of module -> terms")
        for name, terms in sites.items():
            if not isinstance(terms, list):
                raise _fail(f"{where}.sites[{name!r}]", "a list of terms", terms)
        return cls(kinds=_get(d, "kinds", list, where, "a list of kind names"),
                   modules=_get(d, "modules", dict, where, "an object of module -> config"),
                   sites={n: [AdapterTerm.from_json(t, f"{where}.sites[{n!r}]") for t in terms]
                          for n, terms in sites.items()},
                   layouts=_get(d, "layouts", dict, where, "an object of module -> layout",
                                optional=True, default={}) or {},
                   idle=_keys(d, "idle", where), buffers=_keys(d, "buffers", where),
                   magnitudes=_magnitudes(d, sites, where))

    def updates(self) -> dict[str, AdapterUpdate]:
        """Canonical module name -> everything its active adapters add (sites with an
        update only)."""
        return {n: AdapterUpdate(tuple(terms), self.magnitudes.get(n))
                for n, terms in self.sites.items() if terms}

    def least_version(self) -> int:
        """The lowest format version that records these adapters: 3 for a rescale
        (DoRA), an adapted parameter other than a ``.weight``, or an expert term."""
        newer = (self.magnitudes or "parameter" in self.layouts.values()
                 or any(t.experts for terms in self.sites.values() for t in terms))
        return 3 if newer else CHECKSUMS_SINCE

    def weight_key(self, site: str) -> str:
        """The canonical key of the parameter ``site`` adapts: the site itself for a
        ``parameter`` layout (``layers.0.mlp.experts.gate_up_proj``), else its
        ``.weight``."""
        return site if self.layouts.get(site) == "parameter" else f"{site}.weight"

    def factor_keys(self) -> set[str]:
        """The ``adapters/`` tensors of every active update (magnitudes included)."""
        return {k for u in self.updates().values() for k in u.keys()}


def _magnitudes(d: dict, sites: dict, where: str) -> dict[str, AdapterMagnitude]:
    raw = _get(d, "magnitudes", dict, where, "an object of module -> {key, axis}",
               optional=True, default={}) or {}
    out = {n: AdapterMagnitude.from_json(m, f"{where}.magnitudes[{n!r}]") for n, m in raw.items()}
    bare = sorted(n for n in out if not sites.get(n))
    if bare:
        raise _fail(f"{where}.magnitudes", "rescales of sites with terms", bare)
    return out


def _keys(d: dict, field: str, where: str) -> list[str]:
    keys = _get(d, field, list, where, "a list of tensor keys", optional=True, default=[]) or []
    if not all(isinstance(k, str) for k in keys):
        raise _fail(f"{where}.{field}", "a list of tensor keys", keys)
    return keys


class _ListsRecord:
    """A record whose fields are all lists: written as they are, read with a check of
    each (``_expect``: field -> what it holds, for the error)."""

    _expect: dict[str, str] = {}

    def to_json(self) -> dict:
        return dataclasses.asdict(cast(Any, self))  # a mixin: its subclasses are dataclasses

    @classmethod
    def from_json(cls, d: Any, where: str):
        names = [f.name for f in dataclasses.fields(cast(Any, cls))]
        if not isinstance(d, dict):
            raise _fail(where, "an object {" + ", ".join(names) + "}", d)
        return cls(**{n: _get(d, n, list, where, cls._expect[n]) for n in names})


@dataclasses.dataclass(kw_only=True)
class Mesh(_ListsRecord):
    """The device mesh of the sharded model at save.

    Attributes:
        shape: the mesh's shape (``[world_size]`` for FSDP2 on one dimension).
        placements: the DTensor placements, as text (``"Shard(dim=0)"``).
    """

    _expect = {"shape": "a list of ints", "placements": "a list of strings"}
    shape: list[int]
    placements: list[str]


@dataclasses.dataclass(kw_only=True)
class TrainingState(_ListsRecord):
    """What ``optimizer/`` holds besides the optimizer.

    Attributes:
        extra: names of the ``extra`` objects saved (``save(extra={...})``).
        per_rank: names saved once per rank (``"rng"``, and extras that differ across
            ranks); they cannot follow a change of world size without a rule.
    """

    _expect = {"extra": "a list of names", "per_rank": "a list of names"}
    extra: list[str] = dataclasses.field(default_factory=list)
    per_rank: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Quantization:
    """How one weight is quantized: what an exact restore needs to match.

    Attributes:
        quant_type: ``"nf4"`` or ``"fp4"``.
        blocksize: weights per ``absmax`` value.
        double_quant: ``absmax`` is itself quantized (``bnb_4bit_use_double_quant``).
        compute_dtype: the layer's compute dtype (``bnb_4bit_compute_dtype``), also the
            dtype of the weight dequantized.
        dtype: the dtype bitsandbytes dequantizes to (the weights' dtype when quantized).
        shape: the weight's shape, ``(out, in)``.
    """

    quant_type: str
    blocksize: int
    double_quant: bool
    compute_dtype: str
    dtype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "shape": list(self.shape)}

    @classmethod
    def from_json(cls, d: Any, where: str) -> "Quantization":
        types = {"quant_type": str, "blocksize": int, "double_quant": bool,
                 "compute_dtype": str, "dtype": str, "shape": list}
        if not isinstance(d, dict) or set(d) != set(types) or any(
                not isinstance(d[k], t) for k, t in types.items()) or any(
                not isinstance(n, int) for n in d["shape"]):
            raise _fail(where, f"an object {sorted(types)} (a 4-bit weight's quantization)", d)
        return cls(**{**d, "shape": tuple(d["shape"])})

    def differences(self, other: "Quantization") -> list[str]:
        """``"<field> <self's> vs <other's>"`` for every field that differs."""
        return [f"{f.name} {getattr(self, f.name)} vs {getattr(other, f.name)}"
                for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]

    def describe(self) -> str:
        return (f"{self.quant_type}, blocksize {self.blocksize}, double quant "
                f"{'on' if self.double_quant else 'off'}, compute dtype {self.compute_dtype}")


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
            DamagedManifestError: not JSON, larger than :data:`MAX_MANIFEST_BYTES`,
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
            ties=_ties_from_json(d.get("ties", []), f"{where}.ties"),
            writer=_get(d, "writer", str, where, "a lease token", optional=True),
            quantized={k: Quantization.from_json(q, f"{where}.quantized[{k!r}]")
                       for k, q in quantized.items()},
        )


def parse_json(text: str | bytes, where: str, fix: str) -> Any:
    """JSON that a checkpoint holds (a manifest, a model directory's record), bounded:
    at most :data:`MAX_MANIFEST_BYTES`, nested at most :data:`MAX_DEPTH` deep.

    Raises:
        DamagedManifestError: naming ``where`` and ``fix`` (any parse error, never a
            bare ``RecursionError`` or ``ValueError``).
    """
    if len(text) > MAX_MANIFEST_BYTES:
        raise DamagedManifestError(
            f"{where} is larger than any manifest this library writes (over "
            f"{MAX_MANIFEST_BYTES} bytes), so it is not read: {fix}")
    try:
        d = json.loads(text)
    # ValueError: not JSON, not UTF-8, an integer of more digits than Python converts;
    # RecursionError: nested deeper than the parser recurses ("[" * 200000)
    except (ValueError, RecursionError) as e:
        raise DamagedManifestError(f"{where} is not valid JSON ({type(e).__name__}: "
                                   f"{str(e)[:200]}): {fix}") from None
    if _depth_over(d, MAX_DEPTH):
        raise DamagedManifestError(f"{where} nests objects or lists more than {MAX_DEPTH} "
                                   f"deep, which no manifest does: {fix}")
    return d


def _depth_over(value: Any, limit: int) -> bool:
    """``value`` nests objects and lists deeper than ``limit`` (walked without
    recursion)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if not isinstance(v, (dict, list)):
            continue
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in (v.values() if isinstance(v, dict) else v))
    return False


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


def _ties_from_json(d: Any, where: str) -> list[list[str]]:
    if not isinstance(d, list) or not all(
            isinstance(g, list) and all(isinstance(k, str) for k in g) for g in d):
        raise _fail(where, "a list of lists of names", d)
    return [list(g) for g in d]


def model_info_to_json(ties, files: dict[str, FileRecord] | None = None) -> bytes:
    """The :data:`MODEL_INFO` file of a model directory: its tie groups and, once the
    directory is written, its files' records (sizes and checksums)."""
    out: dict[str, Any] = {"format_version": CHECKSUMS_SINCE, "ties": [sorted(g) for g in ties]}
    if files is not None:
        out["files"] = records_to_json(files)
    return json.dumps(out, indent=1).encode()


def model_info_from_json(data: bytes, where: str
                         ) -> tuple[list[list[str]], dict[str, FileRecord] | None]:
    """The tie groups and the file records of a :data:`MODEL_INFO` file (a file from
    anyone: checked). The records are None in a directory of a format before
    :data:`CHECKSUMS_SINCE` that did not record them (it loads unchecked); from that
    format on, a directory without records has none (``{}``: a checked load refuses
    it)."""
    d = parse_json(data, where, "the model directory is damaged -> save the model again")
    if not isinstance(d, dict):
        raise _fail(where, "an object", d)
    version = _get(d, "format_version", int, where, "an integer")
    files = d.get("files")
    if files is None and version >= CHECKSUMS_SINCE:
        # recorded since this version: none recorded means none to check against, which
        # a checked load refuses (a save killed before its records, or records removed)
        files = {}
    return (_ties_from_json(d.get("ties", []), f"{where}.ties"),
            None if files is None else records_from_json(files, f"{where}.files"))


# ---- layout ---------------------------------------------------------------------------

def step_name(step: int) -> str:
    """The one name of step ``step``'s directory: ``step-`` and at least 8 digits.

    Raises:
        ValueError: ``step`` is not an integer from 0 to :data:`MAX_STEP`.
    """
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_STEP:
        raise ValueError(f"step={step!r}: expected an integer from 0 to {MAX_STEP}")
    return f"step-{step:08d}"


def step_path(root: str, step: int) -> str:
    return join(root, step_name(step))


def split_step_path(path: str) -> tuple[str, int] | None:
    """``(root, step)`` of a step directory's path, or None if it does not name one."""
    step = step_of_name(path.rstrip("/").rpartition("/")[2])
    return None if step is None else (parent(path), step)


def base_name(fingerprint: str) -> str:
    return f"base-{fingerprint}"


def base_fingerprint(name: str) -> str:
    return name.removeprefix("base-")


def base_path(step_dir: str, manifest: Manifest) -> str | None:
    """Where the base named by ``manifest`` (a step of ``step_dir``) lives: beside it."""
    return join(parent(step_dir), manifest.base) if manifest.base else None


def step_of_name(name: str) -> int | None:
    """The step number of a step directory's name, else None. Only the name
    :func:`step_name` spells is a step: ``step-000000100`` (an extra zero),
    ``step-+0000100``, other scripts' digits and steps over :data:`MAX_STEP` are not,
    so one step is one directory (never listed twice, loaded from a look-alike, or
    removed by retention)."""
    m = _STEP_RE.fullmatch(name)
    if m is None:
        return None
    step = int(m.group(1))
    return step if step <= MAX_STEP and step_name(step) == name else None


def is_base_name(name: str) -> bool:
    return bool(_BASE_RE.match(name))
