"""The Hugging Face hand-off, from an inference node's view: one process, no process group.

A Llama-shaped transformers model of about 256 MiB fp32 (random weights, built here).
In one run, interleaved repeats of:

* load the model alone: ``load_model`` from our model directory (default, staged; and
  ``stage=False``), and from the HF export (our safetensors reader); plain ``dcp.load``
  of the same directory, and of the export with DCP's ``HuggingFaceStorageReader``, for
  reference;
* ``safetensors.torch.load_file`` of the same weights exported by ``export_hf`` (alone,
  and followed by ``load_state_dict``, which is what a load of the model costs);
* ``from_pretrained`` of the exported directory;
* ``export_hf`` of the model directory, against a plain copy of the same bytes.

Prints a table of medians and ratios (vs ``load_file`` + ``load_state_dict`` for loads,
vs the file copy for the export). Usage::

    .venv/bin/python benchmarks/bench_hf.py [--repeats 5] [--size-mb 256] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

from _common import MiB, PeakRSS, tree_bytes


def _model(size_mb: float):
    import transformers

    hidden, inter, vocab = 768, 2048, 16000
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((size_mb * MiB / 4 - 2 * vocab * hidden) / per_layer))
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                   num_hidden_layers=layers, num_attention_heads=12,
                                   num_key_value_heads=12, tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval(), cfg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--size-mb", type=float, default=256)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    import torch.distributed.checkpoint as dcp
    import transformers
    from safetensors.torch import load_file

    from dcp_universal import export_hf, load_model, save_model

    work = args.workdir or tempfile.mkdtemp(prefix="bench-hf-")
    model, cfg = _model(args.size_mb)
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    mdir, hdir = os.path.join(work, "model"), os.path.join(work, "hf")
    save_model(model, mdir)
    export_hf(mdir, hdir, config=cfg.to_dict())
    st_file = os.path.join(hdir, "model.safetensors")
    target, _ = _model(args.size_mb)
    transformers.logging.set_verbosity_error()

    def st_load_only():
        load_file(st_file)

    def st_load_model():
        target.load_state_dict(load_file(st_file))

    def dcp_load():
        dcp.load(target.state_dict(), checkpoint_id=mdir, no_dist=True)

    def dcp_hf_load():
        dcp.load(target.state_dict(), storage_reader=dcp.HuggingFaceStorageReader(hdir),
                 no_dist=True)

    def export_once():
        export_hf(mdir, os.path.join(work, "hf2"), config=cfg.to_dict(), overwrite=True)

    def copy_once():
        shutil.copytree(mdir, os.path.join(work, "copy"), dirs_exist_ok=True)

    ops = {
        "load_model, staged (default)": lambda: load_model(target, mdir),
        "load_model stage=False": lambda: load_model(target, mdir, stage=False),
        "load_model of the HF export (our safetensors reader)": lambda: load_model(target, hdir),
        "plain dcp.load into the model's state dict": dcp_load,
        "dcp.load of the HF export (DCP's HuggingFaceStorageReader)": dcp_hf_load,
        "safetensors load_file + load_state_dict": st_load_model,
        "safetensors load_file alone": st_load_only,
        "from_pretrained of the export": lambda: transformers.LlamaForCausalLM.from_pretrained(hdir),
        "export_hf (model dir -> safetensors)": export_once,
        "plain copy of the model dir": copy_once,
    }
    times = {name: [] for name in ops}
    peaks = {name: 0.0 for name in ops}
    for _ in range(args.repeats):
        for name, fn in ops.items():
            os.sync()
            with PeakRSS() as rss:
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
            peaks[name] = max(peaks[name], rss.extra_mb)
    med = {n: statistics.median(t) for n, t in times.items()}
    load_ref = med["safetensors load_file + load_state_dict"]
    copy_ref = med["plain copy of the model dir"]
    print(f"# {nbytes / MiB:.0f} MiB fp32 Llama-shaped model ({len(model.state_dict())} tensors), "
          f"one process, {args.repeats} repeats, torch {torch.__version__}")
    print("| operation | median s | ratio | GB/s | peak extra anon MB |")
    print("|---|---|---|---|---|")
    for name in ops:
        ref, label = (copy_ref, "copy") if name.startswith(("export", "plain copy")) else (load_ref, "st load")
        print(f"| {name} | {med[name]:.3f} | {med[name] / ref:.2f}x {label} | "
              f"{nbytes / med[name] / 1e9:.2f} | {peaks[name]:.0f} |")
    print(f"model dir {tree_bytes(mdir) / MiB:.0f} MiB, export {tree_bytes(hdir) / MiB:.0f} MiB")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
