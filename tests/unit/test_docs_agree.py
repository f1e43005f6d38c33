"""The docs agree with each other and with the code (issue 31's contradictions, each a
check here): load figures quoted the same in the README and the status page and never
called faster than they were measured, the demo's duration said once, the top-level
names api.md promises importable, the scheduler saved only as the guide says it is."""

from __future__ import annotations

import os
import re

import dcp_universal
import dcp_universal.lora as lora

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _read(*parts: str) -> str:
    with open(os.path.join(REPO, *parts)) as f:
        return f.read()


def _pair(pattern: str, text: str) -> tuple[str, str]:
    m = re.search(pattern, text)
    assert m, pattern
    return m.group(1), m.group(2)


def test_load_figures_agree_and_are_not_called_faster():
    """status.md's row, the README's feature bullet and its Performance table quote the
    same ratios of a verified load to plain ``dcp.load`` (the table's 2-rank figures lie
    in status's ranges, the bullet quotes the table's cold one)."""
    readme, status = _read("README.md"), _read("docs", "status.md")
    cold = _pair(r"cold (\d\.\d+)-(\d\.\d+)x", status)
    warm = _pair(r"warm (\d\.\d+)-(\d\.\d+)x", status)
    table = readme[readme.index("## Performance"):].split("\n\n* ")[0]
    row_cold = re.search(r"\| `mgr.load` \(verified\), cold page cache \| [\d.]+ \| (\d\.\d+)x", table)
    row_warm = re.search(r"\| `mgr.load` \(verified\), warm \| [\d.]+ \| (\d\.\d+)x", table)
    assert row_cold and row_warm, table
    assert float(cold[0]) <= float(row_cold.group(1)) <= float(cold[1])
    assert float(warm[0]) <= float(row_warm.group(1)) <= float(warm[1])
    bullet = " ".join(readme[readme.index("* **Verified by default**"):].split("\n* ")[0].split())
    said = re.search(r"a cold resume in (\d\.\d+)x plain `dcp.load`'s time", bullet)
    assert said and said.group(1) == row_cold.group(1), bullet
    if float(cold[1]) >= 1.0:  # a resumed job reads cold
        assert not re.search(r"faster than (plain )?`dcp\.load`", readme)


def test_the_demo_takes_as_long_as_both_places_say():
    said = [re.search(r"about (\d+) minutes on 2 CPU cores once set up", " ".join(
        text.replace("\n#", " ").split())) for text in (_read("README.md"), _read("launch", "demo.sh"))]
    assert all(said) and len({m.group(1) for m in said}) == 1


def test_names_api_md_puts_at_the_top_level_are_there():
    api = _read("docs", "api.md")
    heading = next(line for line in api.splitlines() if line.startswith("## The library's own LoRA"))
    claimed = re.findall(r"`(\w+)`", heading.split(";", 1)[1]) if ";" in heading else []
    assert claimed, heading
    assert [n for n in claimed if not hasattr(dcp_universal, n)] == []
    section = api[api.index(heading):].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)", section, flags=re.M)
    assert rows and [n for n in rows if not hasattr(lora, n)] == []


def test_the_guide_says_the_scheduler_needs_extra():
    guide = _read("docs", "guide.md")
    for para in guide.split("\n\n"):
        if "mgr.save` stores" in para and "scheduler" in para:
            assert "extra=" in para, para
