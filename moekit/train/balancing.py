"""Auxiliary-loss-free load balancing as an optimizer hook.

The MoE forward only counts tokens per expert; this hook moves each layer's expert bias after every
optimizer step, so gradient accumulation (several forwards, one step) sees the whole step's load.
"""

from __future__ import annotations

import torch
from torch import nn

from moekit.layers.moe import MoE


def update_expert_biases(model: nn.Module) -> None:
    """Apply one loss-free balancing update to every MoE layer in `model`."""
    for module in model.modules():
        if isinstance(module, MoE):
            module.update_expert_bias()


def attach_expert_bias_updates(model: nn.Module, optimizer: torch.optim.Optimizer):
    """Call `update_expert_biases(model)` after every `optimizer.step()`; returns the hook handle."""
    return optimizer.register_step_post_hook(lambda *_: update_expert_biases(model))
