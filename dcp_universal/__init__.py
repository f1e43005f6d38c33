"""dcp_universal: universal checkpoints for multi-GPU PyTorch training on top of DCP."""

from dcp_universal._version import __version__
from dcp_universal.errors import (CheckpointError, CheckpointIOError, CheckpointMismatchError,
                                  FormatVersionError, IntegrityError, ManifestError,
                                  NotACheckpointError, PerRankStateError,
                                  StepAlreadyExistsError, UnsupportedAdapterError)
from dcp_universal.lora import LoRAEmbedding, LoRALinear, apply_lora  # registers its kind
# input formats register themselves on import, in the order they are asked
from dcp_universal import legacy, step_source, dcp_source  # noqa: F401,E402
from dcp_universal.peft_io import export_peft  # also the PEFT LoRA kind and adapter dirs
from dcp_universal import safetensors_reader  # noqa: F401  (Hugging Face directories)
from dcp_universal.hf import export_hf
from dcp_universal.load import load_model
from dcp_universal.manager import CheckpointManager, SaveHandle
from dcp_universal.plan import LoadReport
from dcp_universal.save import save_model

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
