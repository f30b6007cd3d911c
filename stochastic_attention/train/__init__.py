"""Pre-training: configuration, loop, checkpoints and distributed setup."""

from .checkpoint import CheckpointError
from .config import DataConfig, ExperimentConfig, TrainConfig, config_from_dict, load_config
from .loop import build_model, evaluate, train
from .schedule import cosine_schedule

__all__ = ["CheckpointError", "DataConfig", "ExperimentConfig", "TrainConfig", "build_model",
           "config_from_dict", "cosine_schedule", "evaluate", "load_config", "train"]
