"""4-bit weights in a QLoRA step's base: served dequantized, or restored exactly.

A QLoRA step's frozen base holds each 4-bit weight as bitsandbytes stores it (packed
bytes under the canonical name, the quantization state under ``<name>.<suffix>``), and
the manifest's ``quantized`` records how it was quantized. A load decides per weight:

* **dequantized** (:func:`serve`): for a target that holds the weight in float (a plain
  model, or the same LoRA adapters on an unquantized base), for an export (no target),
  and wherever an adapter update is merged into the weight, the stored entries become
  one float entry in the compute dtype, read through :class:`DequantizedDir`; merges
  then see a float base like any other.
* **restored** (:func:`split_4bit`): for a target that holds the weight in 4 bits, the
  stored bytes and state are read whole and rebuilt with ``Params4bit.from_prequantized``
  (:func:`dcp_universal.model.bnb.rebuild`), bit-exact, after checking that the target
  quantizes the weight the same way. Anything else into a 4-bit weight (a float
  checkpoint, a merged update) is refused: it would have to be quantized again.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import torch

from dcp_universal.errors import CheckpointMismatchError
from dcp_universal.format.manifest import Quantization
from dcp_universal.model import bnb
from dcp_universal.model.plan import LoadReport, Staged, TensorInfo
from dcp_universal.model.view import ModelView, local_block
from dcp_universal.sources import Dir, Entry, Source
from dcp_universal.storage.mapped import Copies

__all__ = ["DequantizedDir", "serve", "split_4bit"]


@dataclasses.dataclass(frozen=True)
class _Stored:
    """One 4-bit weight's stored entries: the bytes and the state by stored suffix."""

    packed: Entry
    stats: Mapping[str, Entry]
    quantization: Quantization

    def read(self, key: str, *, single_process: bool) -> tuple[torch.Tensor, dict]:
        """Read the bytes and the state whole (collective unless ``single_process``)."""
        entries = {key: self.packed, **{f"{key}.{s}": e for s, e in self.stats.items()}}
        full = {k: torch.empty(e.info.shape, dtype=e.info.dtype) for k, e in entries.items()}
        Source(desc=key, entries=entries).read(full, single_process=single_process)
        return full.pop(key), {s: full[f"{key}.{s}"] for s in self.stats}


def _stored(source: Source, key: str, q: Quantization) -> _Stored | None:
    keys = bnb.stored_keys(source.entries, key)
    if key not in source.entries or not any(bnb.STATE_BLOB in k for k in keys):
        return None
    prefix = len(key) + 1
    return _Stored(source.entries[key], {k[prefix:]: source.entries[k] for k in keys}, q)


@dataclasses.dataclass(frozen=True, eq=False)
class DequantizedDir(Dir):
    """Stored 4-bit weights, read as float tensors in their compute dtype."""

    desc: str
    weights: Mapping[str, _Stored]

    @property
    def copies_can_wait(self) -> bool:
        return False

    @torch.no_grad()
    def load(self, state, *, single_process, copies: Copies) -> None:
        for key in sorted(state):  # the same order on every rank
            stored = self.weights[key]
            packed, stats = stored.read(key, single_process=single_process)
            full = bnb.dequantize(packed, stats, stored.quantization)
            block, offsets = local_block(state[key])
            block.copy_(full[tuple(slice(o, o + n) for o, n in zip(offsets, block.shape))])


def serve(source: Source, quantized: Mapping[str, Quantization],
          target: ModelView | None) -> Source:
    """``source`` (a step's) with each 4-bit weight of ``quantized`` (the manifest's
    record) served dequantized, except where ``target`` holds it in 4 bits and no update
    is merged into it: those keep their stored entries for :func:`split_4bit`."""
    if not quantized:
        return source
    keep = set(target.quantized) if target is not None else set()
    entries = dict(source.entries)
    weights = {}
    for key, q in sorted(quantized.items()):
        stored = _stored(source, key, q)
        if stored is None or (key in keep and key not in source.deltas):
            continue
        weights[key] = stored
        for k in (key, *(f"{key}.{s}" for s in stored.stats)):
            del entries[k]
    if weights:
        d = DequantizedDir(f"{source.desc} (4-bit weights, dequantized)", weights)
        entries.update({k: Entry(TensorInfo(w.quantization.shape,
                                            getattr(torch, w.quantization.compute_dtype)), d, k)
                        for k, w in weights.items()})
    return source.replace(entries=entries, meta={**source.meta, "quantized": dict(quantized)})


def _refusal(source: Source, key: str, live: bnb.Live4bit) -> CheckpointMismatchError:
    info = source.entries[key].info
    why = ("its adapters differ from the model's, so their update would be merged into it"
           if key in source.deltas else
           f"it holds the weight as a {str(info.dtype).removeprefix('torch.')} "
           f"{tuple(info.shape)} tensor")
    return CheckpointMismatchError(
        f"checkpoint {source.desc} does not fit the model's 4-bit weight {key!r} "
        f"({live.quantization.describe()}) (nothing was loaded): {why}, and putting that "
        "into the model would quantize it again, which changes it -> load it into a model "
        "that is not quantized (from_pretrained without quantization_config), or resume the "
        "4-bit model from a QLoRA step with the same adapters")


def split_4bit(view: ModelView, source: Source) -> tuple[Source, "_Restore | None"]:
    """``(source without the target's 4-bit weights, their exact restore)``; the restore
    is ``None`` when the target holds no 4-bit weight the source offers.

    Raises:
        CheckpointMismatchError: the source offers a target's 4-bit weight otherwise than
            stored with the same quantization (a float tensor, a merged update, another
            quant type, block size, double quantization or compute dtype). Nothing is
            read.
    """
    if not view.quantized:
        return source, None
    recorded = source.meta.get("quantized") or {}
    taken, differ = {}, []
    for key, live in sorted(view.quantized.items()):
        if key not in source.entries:
            continue  # the plan reports it missing
        stored = _stored(source, key, recorded[key]) if key in recorded else None
        if stored is None or key in source.deltas:
            raise _refusal(source, key, live)
        diffs = stored.quantization.differences(live.quantization)
        if diffs:
            differ.append((key, diffs))
        taken[key] = stored
    if differ:
        key, diffs = differ[0]
        raise CheckpointMismatchError(
            f"checkpoint {source.desc} holds {len(differ)} 4-bit weights quantized otherwise "
            f"than the model (nothing was loaded): {key!r}: checkpoint vs model: "
            f"{'; '.join(diffs)} -> load it into a model that is not quantized (the weights "
            "are served dequantized), or quantize the target as the checkpoint was: "
            f"{taken[key].quantization.describe()} (BitsAndBytesConfig's bnb_4bit_quant_type, "
            "bnb_4bit_use_double_quant, bnb_4bit_compute_dtype)")
    if not taken:
        return source, None
    drop = {k for key, s in taken.items() for k in (key, *(f"{key}.{x}" for x in s.stats))}
    return source.without(drop), _Restore(view, taken, source.desc)


@dataclasses.dataclass
class _Restore:
    """The exact restore of a target's 4-bit weights from their stored state."""

    view: ModelView
    weights: dict[str, _Stored]
    desc: str

    def stage(self) -> Staged:
        """Read every weight's bytes and state whole (collective: one read per weight,
        in key order); the commit rebuilds them."""
        read = {key: s.read(key, single_process=False) for key, s in sorted(self.weights.items())}
        report = LoadReport(loaded=sorted(read))
        report.notes.append(f"restored {len(read)} 4-bit weights with their quantization "
                            f"state exactly ({next(iter(self.weights.values())).quantization.describe()})")

        def commit() -> None:
            for key, (packed, stats) in read.items():
                bnb.rebuild(self.view.quantized[key], packed, stats)

        return Staged(report, commit)
