"""lossless_trainer: a PyTorch trainer where the model owns its loss.

In training mode ``model(batch)`` returns a dict of named scalar losses; the trainer sums
them, backpropagates and steps. `write_summary` logs from anywhere inside the model.
"""

from .checkpoint import CheckpointError
from .errors import (
    ModelOutputError,
    NonFiniteLossError,
    RunDirectoryError,
    RunDirectoryInUseError,
    StorageError,
)
from .evaluation import Accuracy, Evaluator, MeanSquaredError
from .hooks import BestCheckpoint, EarlyStopping, Hook
from .loop import TrainerBase
from .means import Mean
from .model import Model, WithLoss
from .state import Priority, TrainerView, TrainState
from .summary import (
    SummaryRecord,
    current_step,
    is_summary_step,
    summaries_off,
    summary_scope,
    write_summary,
)
from .trainer import Trainer

__all__ = [
    "Accuracy",
    "BestCheckpoint",
    "CheckpointError",
    "EarlyStopping",
    "Evaluator",
    "Hook",
    "Mean",
    "MeanSquaredError",
    "Model",
    "ModelOutputError",
    "NonFiniteLossError",
    "Priority",
    "RunDirectoryError",
    "RunDirectoryInUseError",
    "StorageError",
    "SummaryRecord",
    "TrainState",
    "Trainer",
    "TrainerBase",
    "TrainerView",
    "WithLoss",
    "current_step",
    "is_summary_step",
    "summaries_off",
    "summary_scope",
    "write_summary",
]

__version__ = "0.1.0.dev0"
