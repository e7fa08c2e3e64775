"""Training, fine-tuning and distillation with the SAM paper's recipe.

`samkit.train.train("configs/finetune_decoder.yaml", ["optim.steps=200"])` (or `samkit train CONFIG`)
builds the model and data a config describes, trains, and exports `out/model.safetensors`, which
`samkit.load` opens.
"""

from samkit.train.config import ConfigError, load_config
from samkit.train.loop import Trainer, TrainingInterrupted, read_metrics, train

__all__ = ["ConfigError", "Trainer", "TrainingInterrupted", "load_config", "read_metrics", "train"]
