"""The typed manifest: round trip, validation with expected/found, the documentation's
tables, and the bytes a save writes."""

from __future__ import annotations

import dataclasses
import json
import os
import re

import pytest
import torch

from dcp_universal import CheckpointManager, FormatVersionError, ManifestError
from dcp_universal.format import manifest
from dcp_universal.format.manifest import (AdapterTerm, Adapters, FileRecord, Manifest, Mesh,
                                           TrainingState)
from train_loop import Data, build, train

DOC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "format.md")


def _sample() -> Manifest:
    return Manifest(
        step=7, world_size=2, mesh=Mesh(shape=[2], placements=["Shard(dim=0)"]), merge="sharded",
        dtypes=["torch.float32"], items={"adapters": True, "optimizer": True},
        base="base-00ff", metrics={"val_loss": 1.5},
        adapters=Adapters(kinds=["dcp_universal.lora"], modules={"q": {"rank": 4, "alpha": 8.0}},
                          sites={"q": [AdapterTerm(left="q.lora_B", right="q.lora_A", scale=2.0)]}),
        training_state=TrainingState(extra=["train"], per_rank=["rng"]),
        files={"adapters/.metadata": FileRecord(size=10, crc32=5)},
        base_files={"__0_0.distcp": FileRecord(size=99, crc32=1)})


def test_round_trip_is_exact():
    m = _sample()
    again = Manifest.from_json(m.to_json())
    assert again == m
    assert again.to_json() == m.to_json()


@pytest.mark.parametrize("field, value, expected", [
    ("step", "seven", "expected an integer step, found 'seven'"),
    ("world_size", True, "expected an integer world size, found True"),
    ("items", {"model": "yes"}, "items.model: expected a boolean, found 'yes'"),
    ("files", {"model/x": {"size": "big"}}, "expected an integer byte count, found 'big'"),
    ("training_state", None, "training_state: expected an object, found None"),
])
def test_a_wrong_field_is_named_with_expected_and_found(field, value, expected):
    d = json.loads(_sample().to_json())
    d[field] = value
    d["content_crc32"] = manifest._content_crc32(d)  # written so (another tool, a bug)
    with pytest.raises(ManifestError, match=re.escape(expected)):
        Manifest.from_json(json.dumps(d), "x/manifest.json")


def test_items_this_version_does_not_know_are_kept_not_refused():
    d = json.loads(_sample().to_json())
    d["items"]["ema"] = True  # written by a newer version, or by a run's own item
    d["content_crc32"] = manifest._content_crc32(d)  # as that writer computes it
    m = Manifest.from_json(json.dumps(d))
    assert m.items == {"adapters": True, "optimizer": True, "ema": True} and m.has("ema")
    assert json.loads(m.to_json())["items"]["ema"] is True


def test_a_missing_field_and_a_newer_format_are_refused():
    d = json.loads(_sample().to_json())
    del d["merge"]
    d["content_crc32"] = manifest._content_crc32(d)
    with pytest.raises(ManifestError, match=r"manifest.json.merge: expected .* found nothing \(missing\)"):
        Manifest.from_json(json.dumps(d))
    d = json.loads(_sample().to_json())
    d["format_version"] = manifest.FORMAT_VERSION + 1
    with pytest.raises(FormatVersionError, match="upgrade dcp_universal"):
        Manifest.from_json(json.dumps(d))


def _documented_fields() -> dict[str, list[str]]:
    """``### `Name` `` heading -> the backticked first cells of the table under it."""
    out: dict[str, list[str]] = {}
    current = None
    with open(DOC) as f:
        for line in f:
            heading = re.match(r"^### `(\w+)`", line)
            if heading:
                current = heading.group(1)
                out[current] = []
            elif line.startswith("## "):
                current = None
            elif current and (cell := re.match(r"^\| `(\w+)` \|", line)):
                out[current].append(cell.group(1))
    return out


def test_format_doc_lists_exactly_the_dataclass_fields():
    documented = _documented_fields()
    for cls in (Manifest, FileRecord, Mesh, Adapters, AdapterTerm, TrainingState):
        assert documented.get(cls.__name__) == [f.name for f in dataclasses.fields(cls)], cls.__name__


def test_a_saved_manifest_has_the_documented_keys_and_loads_back(tmp_path):
    torch.manual_seed(0)
    model, opt, sched = build("lora4", "none", 1)
    train(model, opt, sched, Data(0), {"step": 0}, 1)
    mgr = CheckpointManager(str(tmp_path))
    mgr.save(3, model, opt, metrics={"loss": 2.0})
    raw = json.loads((tmp_path / "step-00000003" / "manifest.json").read_text())
    # the keys this library has written since format_version 1, and the fencing token
    assert set(raw) == {"format_version", "step", "world_size", "mesh", "torch_version",
                        "library_version", "created_unix", "merge", "dtypes", "items", "base",
                        "adapters", "training_state", "metrics", "files", "base_files",
                        "content_crc32", "writer"}
    assert raw["writer"] == mgr._lease.token
    assert set(raw["files"]["optimizer/.metadata"]) == {"size", "checksum"}
    assert raw["files"]["optimizer/.metadata"]["checksum"]["algo"] == "crc32c"
    assert raw["adapters"]["sites"]["blocks.0.q"] == [
        {"left": "blocks.0.q.lora_B", "right": "blocks.0.q.lora_A", "scale": 2.0,
         "left_t": False, "right_t": False}]
    m = mgr.manifest(3)
    assert m.to_json() == json.dumps(raw, indent=1, sort_keys=True)
    assert m.base == raw["base"] and m.metrics == {"loss": 2.0}
