"""dcp_universal: universal checkpoints for multi-GPU PyTorch training on top of DCP."""

from dcp_universal._version import __version__
from dcp_universal.errors import (CheckpointError, CheckpointIOError, CheckpointMismatchError,
                                  CheckpointTimeoutError, DamagedManifestError,
                                  ExportExistsError, FormatVersionError, IntegrityError, ManifestError,
                                  NotACheckpointError, NotARootError, PerRankStateError,
                                  RootBusyError, StepAlreadyExistsError,
                                  UnsafeCheckpointError, UnsupportedAdapterError)
from dcp_universal.lora import LoRAEmbedding, LoRALinear, apply_lora  # registers its kind
# Input formats register themselves on import, in the order they are asked: a legacy
# file, a committed step, a DCP directory, a PEFT adapter directory, an Accelerate
# save_state directory, a Hugging Face one.
from dcp_universal.interop import legacy, safetensors, accelerate  # noqa: F401
from dcp_universal.sources import dcp, step  # noqa: F401
from dcp_universal.interop.peft import export_peft  # also the PEFT LoRA kind
from dcp_universal.interop.hf import export_hf
from dcp_universal.model.plan import LoadReport
from dcp_universal.model_io.load import load_model
from dcp_universal.model_io.save import save_model
from dcp_universal.training.manager import CheckpointManager, SaveHandle
from dcp_universal.training.retention import KeepBest, KeepEvery, KeepLast, RetentionPolicy
from dcp_universal.training.sampler import ResumableSampler

__all__ = [
    "CheckpointManager",
    "SaveHandle",
    "RetentionPolicy",
    "KeepLast",
    "KeepEvery",
    "KeepBest",
    "ResumableSampler",
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
    "CheckpointTimeoutError",
    "FormatVersionError",
    "IntegrityError",
    "DamagedManifestError",
    "ManifestError",
    "NotACheckpointError",
    "NotARootError",
    "PerRankStateError",
    "StepAlreadyExistsError",
    "ExportExistsError",
    "UnsupportedAdapterError",
    "UnsafeCheckpointError",
    "RootBusyError",
    "__version__",
]
