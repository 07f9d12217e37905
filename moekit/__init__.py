"""moekit: Mixture-of-Experts layers, language models and recommenders for PyTorch.

`import moekit` needs only torch and numpy; the training, data and reporting tools live in extras.
"""

from moekit.layers.config import MoEConfig
from moekit.layers.moe import MoE, MoEOutput

__version__ = "0.1.0"

__all__ = ["MoE", "MoEConfig", "MoEOutput", "__version__", "load"]


def load(path, device: str = "cpu"):
    """The trained model of a run folder (any family) or of a `save_pretrained` folder, in eval mode,
    with what using it needs: `loaded.model`, `loaded.config` (the run config), and per family
    `loaded.feature_spec` (mtl), `loaded.items` (seqrec, two-tower), `loaded.tokenizer` (lm).

        run = moekit.load("runs/mmoe")
        scores = run.model(*run.feature_spec.transform(columns).tensors())
    """
    from moekit.train.families import load as load_run

    return load_run(path, device)
