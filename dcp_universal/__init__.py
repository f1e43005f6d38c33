"""dcp_universal: universal checkpoints for multi-GPU PyTorch training on top of DCP."""

from dcp_universal._version import __version__
from dcp_universal.errors import (CheckpointError, CheckpointIOError, CheckpointMismatchError,
                                  FormatVersionError, IntegrityError, ManifestError,
                                  NotACheckpointError, PerRankStateError,
                                  StepAlreadyExistsError, UnsupportedAdapterError)
from dcp_universal.lora import LoRAEmbedding, LoRALinear, apply_lora  # registers its kind
from dcp_universal.hf import export_hf
from dcp_universal.manager import CheckpointManager, SaveHandle
from dcp_universal.peft_io import export_peft
from dcp_universal.model_io import load_model, save_model
from dcp_universal.plan import LoadReport
from dcp_universal import peft_lora  # noqa: E402,F401  (registers the PEFT LoRA kind)

__all__ = [
    "CheckpointManager",
    "SaveHandle",
    "save_model",
    "load_model",
    "LoadReport",
    "export_hf",
    "export_peft",
    "apply_lora",
    "LoRALinear",
    "LoRAEmbedding",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointIOError",
    "FormatVersionError",
    "IntegrityError",
    "ManifestError",
    "NotACheckpointError",
    "PerRankStateError",
    "StepAlreadyExistsError",
    "UnsupportedAdapterError",
    "__version__",
]
