"""Building blocks: routers, token dispatch, expert banks and the MoE layer."""

from moekit.layers.config import MoEConfig
from moekit.layers.experts import FeedForward, GroupedExperts
from moekit.layers.moe import MoE, MoEOutput
from moekit.layers.routers import ExpertChoiceRouter, TokenChoiceRouter, load_balancing_loss, router_z_loss

__all__ = [
    "ExpertChoiceRouter", "FeedForward", "GroupedExperts", "MoE", "MoEConfig", "MoEOutput",
    "TokenChoiceRouter", "load_balancing_loss", "router_z_loss",
]
