"""Training: one LightningModule and DataModule for every stage, and the stage functions flows call."""
from nexus.training.config import TrainConfig
from nexus.training.datamodule import MixtureDataModule
from nexus.training.module import CausalLMModule
from nexus.training.stages import StageResult, train_dense, train_moe

__all__ = ["CausalLMModule", "MixtureDataModule", "StageResult", "TrainConfig", "train_dense", "train_moe"]
