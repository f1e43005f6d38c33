"""The README's code is the examples' code: a Python block that starts with
``# examples/<file>`` must equal that file, and every example is named in the README
(tests/dist/test_examples.py runs them; tests/unit/test_migrate.py the migration
recipes of examples/migrate/)."""

from __future__ import annotations

import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _read(*parts: str) -> str:
    with open(os.path.join(REPO, *parts)) as f:
        return f.read()


def test_readme_blocks_are_the_example_files():
    readme = _read("README.md")
    blocks = re.findall(r"```python\n# (examples/\S+)\n(.*?)```", readme, flags=re.S)
    assert blocks, "the README includes no example"
    for path, body in blocks:
        assert body == _read(path), f"the README's copy of {path} differs from the file"


def test_every_example_is_in_the_readme_and_run_by_a_test():
    readme = _read("README.md")
    runs = _read("tests", "dist", "test_examples.py") + _read("tests", "unit", "test_migrate.py")
    names = sorted(os.listdir(os.path.join(REPO, "examples")))
    # run by the tests: named there, or by an example script they run
    ran = [n for n in names if f"examples/{n}" in runs]
    ran += [n for n in names for s in ran if s.endswith(".sh")
            and any(f"{d}/{n}" in _read("examples", s) for d in ("examples", "$here"))]
    for name in names:
        assert f"examples/{name}" in readme, f"examples/{name} is not in the README"
        assert name in ran, f"examples/{name} is run by no test"
