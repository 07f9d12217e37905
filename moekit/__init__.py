"""moekit: Mixture-of-Experts layers, language models and recommenders for PyTorch.

`import moekit` needs only torch and numpy; the training, data and reporting tools live in extras.
"""

from moekit.layers.config import MoEConfig
from moekit.layers.moe import MoE, MoEOutput

__version__ = "0.1.0"

__all__ = ["MoE", "MoEConfig", "MoEOutput", "__version__"]
