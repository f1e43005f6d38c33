"""Every resharding pair between mesh layouts, plain and LoRA: the full matrix behind
``tests/dist/test_meshes.py`` (which runs one pair of each class within the suite's time).

For each source layout the tiny model (dims divisible by the TP degrees) is saved as a
committed step by a job in that layout; a job in each target layout loads it (the same
adapters: restored exactly; a plain target: merged) and its forward output is compared
with a one-process reference. Layouts: one process, FSDP2 x3 and x4, (dp 2, tp 2),
(dp 1, tp 4), HSDP (2, 2), and (dp 4, tp 2) on 8 ranks.

    .venv/bin/python tests/stress/mesh_matrix.py            # every pair (about 10 min)
    .venv/bin/python tests/stress/mesh_matrix.py --quick    # LoRA only, 3 sources

Prints one line per pair and exits 1 if any differs by more than 1e-5.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "dist")]

import harness  # noqa: E402
from test_meshes import ATOL, _model, _out, layout  # noqa: E402
from dcp_universal import CheckpointManager  # noqa: E402

# name -> (layout kind, world size)
LAYOUTS = {"one": ("none", 1), "fsdp3": ("fsdp", 3), "fsdp4": ("fsdp", 4), "2d": ("2d", 4),
           "tp4": ("tp", 4), "hsdp": ("hsdp", 4), "2d-8": ("2d", 8)}


def _save(rank, world, root, kind, variant):
    model = layout(_model(variant, seed=1), kind, world)
    with CheckpointManager(root) as mgr:
        mgr.save(1, model)
    return _out(model)


def _load(rank, world, root, kind, variant):
    model = layout(_model(variant, seed=7), kind, world)
    with CheckpointManager(root) as mgr:
        mgr.load(model)
    return _out(model)


def _run(fn, world, *args):
    return fn(0, 1, *args) if world == 1 else harness.run(fn, world, *args)[0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    variants = ["lora4"] if args.quick else ["plain", "lora4"]
    sources = ["2d", "hsdp", "fsdp4"] if args.quick else list(LAYOUTS)
    bad, start = 0, time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for variant in variants:
            ref = _out(_model(variant, seed=1))
            for src in sources:
                root = os.path.join(tmp, f"{variant}-{src}")
                kind, world = LAYOUTS[src]
                saved = _run(_save, world, root, kind, variant)
                assert (saved - ref).abs().max() < ATOL, f"{src} does not compute the model"
                for dst, (dkind, dworld) in LAYOUTS.items():
                    got = _run(_load, dworld, root, dkind, variant)
                    diff = float((got - ref).abs().max())
                    bad += diff >= ATOL
                    print(f"{variant:6s} {src:6s} -> {dst:6s}  max |diff| {diff:.2e}  "
                          f"{'ok' if diff < ATOL else 'DIFFERS'}", flush=True)
    print(f"{'all pairs equal' if not bad else f'{bad} pairs differ'} "
          f"({time.perf_counter() - start:.0f} s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
