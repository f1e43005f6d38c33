"""The typed records a manifest holds (file records, adapters, mesh, training state,
quantization), each read back with a check of every field: a record from anyone
raises :class:`~dcp_universal.errors.ManifestError` naming the field, what was
expected and what was found. Also the bounded JSON every checkpoint record is
parsed with (:func:`parse_json`)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, cast

from dcp_universal.errors import DamagedManifestError, ManifestError
from dcp_universal.format.layout import inside

__all__ = ["FORMAT_VERSION", "CHECKSUMS_SINCE", "MAX_MANIFEST_BYTES", "MAX_DEPTH",
           "CHECKSUM_ALGOS", "FileRecord", "records_to_json", "records_from_json",
           "AdapterTerm", "AdapterMagnitude", "AdapterUpdate", "Adapters", "Mesh",
           "TrainingState", "Quantization", "parse_json"]

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
#: the largest manifest (or model directory record) read. Inline block sums cost 8 hex
#: digits per 128 KiB block (1/16384 of the data; larger files keep theirs in sidecars),
#: so 256 MiB covers a 4 TiB step (a 405B-parameter model with its optimizer on 16k
#: ranks, each file at most 512 MiB); parsing one costs at most a few GB of memory
MAX_MANIFEST_BYTES = 256 << 20
#: the deepest nesting of objects and lists a manifest may have (the library writes at
#: most 6: adapters.modules.<name>.<config>.<list>); deeper is damage, refused before
#: anything recurses over it
MAX_DEPTH = 64

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
