"""A ``save_model`` directory's own record, :data:`~dcp_universal.format.layout.MODEL_INFO`
(``dcp_universal.json``): what DCP's metadata cannot say (tie groups) and, once the
directory is written, its files' records."""

from __future__ import annotations

import json
from typing import Any

from dcp_universal.format.records import (CHECKSUMS_SINCE, FileRecord, _fail, _get, parse_json,
                                          records_from_json, records_to_json)

__all__ = ["ties_from_json", "model_info_to_json", "model_info_from_json"]

def ties_from_json(d: Any, where: str) -> list[list[str]]:
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
    return (ties_from_json(d.get("ties", []), f"{where}.ties"),
            None if files is None else records_from_json(files, f"{where}.files"))
