"""Hugging Face Accelerate ``save_state`` directories, read as they are.

``accelerator.save_state(dir)`` writes (accelerate's ``checkpointing.py``;
``ProjectConfiguration(automatic_checkpoint_naming=True)`` names the directory
``checkpoints/checkpoint_<N>``)::

    model.safetensors             the model (safe_serialization, the default), or
    pytorch_model.bin             a torch.save of the model's state dict
    optimizer.bin                 torch.save(optimizer.state_dict()): state by position
    scheduler.bin                 torch.save(scheduler.state_dict())
    sampler.bin, scaler.pt, custom_checkpoint_<i>.pkl, ...
    random_states_<rank>.pkl      Python, NumPy, torch and CUDA RNG states, per process

The model is read by the Hugging Face or the legacy format; the optimizer and scheduler
files are named in the source's metadata for a migration
(:mod:`dcp_universal.training.migrate`), which maps the optimizer by position with the
legacy checks (:func:`~dcp_universal.interop.legacy.stage_legacy_optimizer`). Extra
models and optimizers (``pytorch_model_1.bin``, ``optimizer_1.bin``) and FSDP's
sharded layouts are not read; they are named as left behind.
"""

from __future__ import annotations

from dcp_universal.format import manifest
from dcp_universal.interop.legacy import LegacyFormat
from dcp_universal.interop.safetensors import HfFormat
from dcp_universal.sources import Format, Source, Want, register_format
from dcp_universal.storage import Storage, join

__all__ = ["AccelerateFormat", "OPTIMIZER_FILE", "SCHEDULER_FILE", "MODEL_BIN"]

MODEL_BIN = "pytorch_model.bin"
OPTIMIZER_FILE = "optimizer.bin"
SCHEDULER_FILE = "scheduler.bin"
_STATE_FILES = (OPTIMIZER_FILE, SCHEDULER_FILE, "random_states_0.pkl")


class AccelerateFormat(Format):
    """A directory ``accelerator.save_state`` wrote: its model, and its other files named."""

    name = "accelerate"
    looks_like = (f"an Accelerate save_state directory ({manifest.HF_SINGLE} or {MODEL_BIN} "
                  f"beside {OPTIMIZER_FILE} / random_states_0.pkl)")

    def detect(self, store: Storage, path: str) -> bool:
        return any(store.exists(join(path, f)) for f in (manifest.HF_SINGLE, MODEL_BIN)) \
            and any(store.exists(join(path, f)) for f in _STATE_FILES)

    def open(self, store: Storage, path: str, want: Want) -> Source:
        if store.exists(join(path, manifest.HF_SINGLE)):
            model, source = manifest.HF_SINGLE, HfFormat().open(store, path, want)
        else:
            model = MODEL_BIN
            source = LegacyFormat().open(store, join(path, MODEL_BIN), want)
        present = set(store.listdir(path))
        carried = {model, OPTIMIZER_FILE, SCHEDULER_FILE}
        meta = {k: v for k, v in source.meta.items() if k not in ("optimizer", "step", "legacy")}
        meta["accelerate"] = {
            "optimizer": join(path, OPTIMIZER_FILE) if OPTIMIZER_FILE in present else None,
            "scheduler": join(path, SCHEDULER_FILE) if SCHEDULER_FILE in present else None,
            "left": sorted(present - carried)}
        return source.replace(notes=(*source.notes, f"read Accelerate save_state {path}"),
                              meta=meta)


register_format(AccelerateFormat(), before="hf")
