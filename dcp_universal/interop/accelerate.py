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

Under FSDP with ``SHARDED_STATE_DICT`` (accelerate's ``fsdp_utils.save_fsdp_model`` /
``save_fsdp_optimizer``) the model and optimizer are DCP directories instead::

    pytorch_model_fsdp_0/         dcp.save({"model": model state dict})
    optimizer_0/                  dcp.save({"optimizer": optimizer state keyed by FQN})

The model is read by the Hugging Face, the legacy or the DCP format; the optimizer and
scheduler are named in the source's metadata for a migration
(:mod:`dcp_universal.training.migrate`), which maps ``optimizer.bin`` by position with
the legacy checks (:func:`~dcp_universal.interop.legacy.stage_legacy_optimizer`) and
``optimizer_0/`` by parameter name. Extra models and optimizers (``pytorch_model_1.bin``,
``optimizer_1.bin``, ``pytorch_model_fsdp_1/``) and FSDP's full and local layouts
(``pytorch_model_fsdp.bin``, ``..._rank<i>.bin``) are not read; they are named as left
behind.
"""

from __future__ import annotations

import dataclasses

from dcp_universal.format import manifest
from dcp_universal.interop.legacy import LegacyFormat
from dcp_universal.interop.safetensors import HfFormat
from dcp_universal.sources import DcpDir, Format, Source, Want, dir_entries, register_format
from dcp_universal.sources.dcp import DcpFormat
from dcp_universal.sources.foreign import optimizer_only
from dcp_universal.storage import Storage, join

__all__ = ["AccelerateFormat", "OPTIMIZER_FILE", "SCHEDULER_FILE", "MODEL_BIN", "FSDP_MODEL_DIR",
           "FSDP_OPTIMIZER_DIR"]

MODEL_BIN = "pytorch_model.bin"
OPTIMIZER_FILE = "optimizer.bin"
SCHEDULER_FILE = "scheduler.bin"
#: FSDP's SHARDED_STATE_DICT: DCP directories of the first model and optimizer
FSDP_MODEL_DIR = "pytorch_model_fsdp_0"
FSDP_OPTIMIZER_DIR = "optimizer_0"
_STATE_FILES = (OPTIMIZER_FILE, SCHEDULER_FILE, "random_states_0.pkl", FSDP_OPTIMIZER_DIR)


def _is_dcp(store: Storage, d: str) -> bool:
    return store.exists(join(d, manifest.METADATA_FILE))


class AccelerateFormat(Format):
    """A directory ``accelerator.save_state`` wrote: its model, and its other files named."""

    name = "accelerate"
    looks_like = (f"an Accelerate save_state directory ({manifest.HF_SINGLE} or {MODEL_BIN} "
                  f"beside {OPTIMIZER_FILE} / random_states_0.pkl)")

    def detect(self, store: Storage, path: str) -> bool:
        return (any(store.exists(join(path, f)) for f in (manifest.HF_SINGLE, MODEL_BIN))
                or _is_dcp(store, join(path, FSDP_MODEL_DIR))) \
            and any(store.exists(join(path, f)) for f in _STATE_FILES)

    def open(self, store: Storage, path: str, want: Want) -> Source:
        if store.exists(join(path, manifest.HF_SINGLE)):
            model, source = manifest.HF_SINGLE, HfFormat().open(store, path, want)
        elif store.exists(join(path, MODEL_BIN)):
            model = MODEL_BIN
            source = LegacyFormat().open(store, join(path, MODEL_BIN), want)
        else:
            model = FSDP_MODEL_DIR
            source = DcpFormat().open(store, join(path, FSDP_MODEL_DIR), want)
        present = set(store.listdir(path))
        carried = {model, OPTIMIZER_FILE, SCHEDULER_FILE}
        meta = {k: v for k, v in source.meta.items()
                if k not in ("optimizer", "step", "legacy", "beside", "dir")}
        by_name = None
        if FSDP_OPTIMIZER_DIR in present and _is_dcp(store, join(path, FSDP_OPTIMIZER_DIR)):
            d = DcpDir(store, join(path, FSDP_OPTIMIZER_DIR), trusted=want.trusted)
            tensors, other, md = dir_entries(d)
            beside = optimizer_only(tensors, other)
            if beside.optimizer:
                carried.add(FSDP_OPTIMIZER_DIR)
                by_name = (dataclasses.replace(d, metadata=md), beside)  # read once
        meta["accelerate"] = {
            "optimizer_by_name": by_name,
            "optimizer": join(path, OPTIMIZER_FILE) if OPTIMIZER_FILE in present else None,
            "scheduler": join(path, SCHEDULER_FILE) if SCHEDULER_FILE in present else None,
            "left": sorted(present - carried)}
        return source.replace(notes=(*source.notes, f"read Accelerate save_state {path}"),
                              meta=meta)


register_format(AccelerateFormat(), before="hf")
