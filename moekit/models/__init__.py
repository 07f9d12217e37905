"""Model families, one per file."""

from moekit.models.multitask import MultiTaskConfig, MultiTaskModel, MultiTaskOptions
from moekit.models.pretrained import Pretrained
from moekit.models.sequential import FAME, FAMEConfig, SASRec, SASRecConfig
from moekit.models.transformer import Transformer, TransformerConfig
from moekit.models.two_tower import TwoTower, TwoTowerConfig

__all__ = [
    "FAME", "FAMEConfig", "MultiTaskConfig", "MultiTaskModel", "MultiTaskOptions", "Pretrained", "SASRec",
    "SASRecConfig", "Transformer", "TransformerConfig", "TwoTower", "TwoTowerConfig",
]
