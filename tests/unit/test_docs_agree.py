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
    """status.md's row, the README's feature bullet and its Performance section quote
    the same warm and cold ratios of a verified load to plain ``dcp.load``."""
    readme, status = _read("README.md"), _read("docs", "status.md")
    warm = _pair(r"warm loads (\d\.\d+)-(\d\.\d+)x", status)
    cold = _pair(r"cold (\d\.\d+)-(\d\.\d+)x", status)
    bullet = " ".join(readme[readme.index("* **Verified by default**"):].split("\n* ")[0].split())
    assert _pair(r"in (\d\.\d+)-(\d\.\d+)x plain `dcp.load`'s time from a warm", bullet) == warm
    assert _pair(r"and (\d\.\d+)-(\d\.\d+)x from a cold", bullet) == cold
    perf = readme[readme.index("* `mgr.load`, verified"):].split("\n* ")[0]
    at = perf.index("warm")
    assert tuple(re.findall(r"(\d\.\d+)x", perf[:at])) == warm, perf
    assert tuple(re.findall(r"(\d\.\d+)x", perf[at:])) == cold, perf
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
