"""Training, fine-tuning and distillation with the SAM paper's recipe.

`samkit.train.train("configs/finetune_decoder.yaml", ["optim.steps=200"])` (or `samkit train CONFIG`)
builds the model and data a config describes, trains, and exports `out/model.safetensors`, which
`samkit.load` opens.
"""

from samkit.train.config import ConfigError, TrainConfig, load_config
from samkit.train.loop import Trainer, train
from samkit.train.metrics import read_metrics
from samkit.train.signals import TrainingInterrupted

__all__ = [
    "ConfigError",
    "TrainConfig",
    "Trainer",
    "TrainingInterrupted",
    "load_config",
    "read_metrics",
    "train",
]
