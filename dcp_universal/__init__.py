"""dcp_universal: universal checkpoints for multi-GPU PyTorch training on top of DCP."""

from dcp_universal.errors import CheckpointError, CheckpointMismatchError
from dcp_universal.manager import CheckpointManager
from dcp_universal.model_io import load_model, save_model
from dcp_universal.plan import LoadReport

__all__ = [
    "CheckpointManager",
    "save_model",
    "load_model",
    "LoadReport",
    "CheckpointError",
    "CheckpointMismatchError",
]

__version__ = "0.1.0"
