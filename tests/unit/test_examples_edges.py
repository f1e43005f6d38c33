"""The README's examples on the first thing a newcomer may type wrong: the inference
node pointed at a root with no step says so, instead of a TypeError about None."""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_inference_on_a_root_without_a_step_says_what_to_do(tmp_path):
    for root in (tmp_path / "empty", tmp_path / "missing"):
        if root.name == "empty":
            root.mkdir()
        done = subprocess.run([sys.executable, os.path.join(REPO, "examples", "inference.py"),
                               str(root)], cwd=str(tmp_path), capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 1
        assert "holds no committed step: train first" in done.stderr
        assert "Traceback" not in done.stderr


def test_the_package_says_it_is_typed():
    """PEP 561: ``py.typed`` in the package, shipped as package data, and the classifier."""
    import importlib.resources

    assert importlib.resources.files("dcp_universal").joinpath("py.typed").is_file()
    with open(os.path.join(REPO, "pyproject.toml")) as f:
        project = f.read()
    assert 'dcp_universal = ["py.typed"]' in project and '"Typing :: Typed"' in project
