"""The package's module sizes: the modules over ``--over`` lines (default 400), largest
first, as the Markdown table the README's development section shows.

    .venv/bin/python launch/module_sizes.py
"""
from __future__ import annotations

import argparse
import os
import statistics

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dcp_universal")


def sizes() -> dict[str, int]:
    """Module path (relative to the repository) -> lines."""
    out = {}
    for dirpath, _, files in os.walk(PKG):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                with open(path) as f:
                    out[os.path.relpath(path, os.path.dirname(PKG))] = sum(1 for _ in f)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--over", type=int, default=400)
    args = parser.parse_args()
    found = sizes()
    print(f"{len(found)} modules, {sum(found.values())} lines, median "
          f"{statistics.median(found.values()):.0f}; over {args.over} lines:\n")
    print("| module | lines |\n|---|---:|")
    for path, n in sorted(found.items(), key=lambda kv: -kv[1]):
        if n > args.over:
            print(f"| `{path}` | {n} |")


if __name__ == "__main__":
    main()
