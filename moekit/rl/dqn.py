"""DQN recommender: a Q-network over the user's recent positively-rated items, Double-DQN targets.

Mnih et al., "Human-level control through deep reinforcement learning", Nature 2015 (experience
replay, target network, Huber loss); van Hasselt, Guez & Silver, "Deep Reinforcement Learning with
Double Q-learning", AAAI 2016 (the online network picks the next action, the target network
scores it). Zheng et al., "DRN: A Deep Reinforcement Learning Framework for News Recommendation",
WWW 2018, apply DQN to recommendation.

Q(s, a) = <f(s), e_a> + b_a: the state encoder f pools the embeddings of the state's items and
passes them through an MLP or MoE block; every item a has an output embedding e_a and bias b_a,
so one forward gives the Q-values of the whole catalogue. Shape suffixes: B batch, S state
length, D width, I catalogue items.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.layers.config import MoEConfig
from moekit.layers.experts import FeedForward
from moekit.layers.moe import MoE
from moekit.models.pretrained import Pretrained


@dataclass
class QNetworkConfig:
    num_items: int
    dim: int = 64
    ffn_hidden: int = 128
    q_net: str = "mlp"
    """'mlp' (a dense residual FFN block) or 'moe' (a sparse MoE block in its place)."""
    num_experts: int = 4
    top_k: int = 2
    aux_loss_coef: float = 0.01

    def __post_init__(self) -> None:
        if self.q_net not in ("mlp", "moe"):
            raise ValueError(f"unknown q_net={self.q_net!r}; expected 'mlp' or 'moe'")
        if self.num_items < 1 or self.dim < 1:
            raise ValueError(f"num_items and dim must be >= 1 (got {self.num_items}, {self.dim})")


class QNetwork(Pretrained, nn.Module):
    """Q(state, item) for every item: the state (recent liked items) is pooled, passed through a dense or
    MoE block and scored against an output embedding per item (plus a per-item bias)."""

    config_class = QNetworkConfig
    family = "dqn"

    def __init__(self, config: QNetworkConfig) -> None:
        super().__init__()
        self.config = c = config
        self.pad = c.num_items
        self.item_in = nn.Embedding(c.num_items + 1, c.dim, padding_idx=c.num_items)
        self.norm = nn.LayerNorm(c.dim)
        if c.q_net == "moe":
            self.block = MoE(MoEConfig(
                d_model=c.dim, d_ff=c.ffn_hidden, num_experts=c.num_experts, top_k=c.top_k,
                expert_type="mlp", activation="gelu", aux_loss_coef=c.aux_loss_coef,
            ))
        else:
            self.block = FeedForward(c.dim, c.ffn_hidden, expert_type="mlp", activation="gelu")
        self.empty_state = nn.Parameter(torch.zeros(c.dim))  # the encoding of a state with no positives yet
        self.item_out = nn.Embedding(c.num_items, c.dim)
        self.item_bias = nn.Parameter(torch.zeros(c.num_items))
        nn.init.normal_(self.item_in.weight, std=0.05)
        nn.init.normal_(self.item_out.weight, std=0.05)
        with torch.no_grad():
            self.item_in.weight[self.pad].zero_()

    @torch.no_grad()
    def init_items_from_mf(
        self, item_factors_IF: Tensor, item_bias_I: Tensor, reward_scale: float = 0.5
    ) -> None:
        """Warm-start the item embeddings from a matrix factorisation of the training ratings (as
        Zhao et al., RecSys 2018, start from pre-trained item embeddings): the first F dimensions of
        both item tables get the MF item factors (F <= dim) and the item bias gets the MF item bias
        times `reward_scale` (stars -> reward units). Only training data enters; Q-learning goes on
        from there."""
        item_factors_IF = torch.as_tensor(item_factors_IF, dtype=torch.float32)
        I, F = item_factors_IF.shape
        if I != self.config.num_items or F > self.config.dim:
            raise ValueError(f"MF factors of shape {(I, F)} do not fit {self.config.num_items} items of dim "
                             f"{self.config.dim}")
        self.item_in.weight[:I, :F] = item_factors_IF
        self.item_out.weight[:, :F] = item_factors_IF
        self.item_bias.copy_(torch.as_tensor(item_bias_I, dtype=torch.float32) * reward_scale)

    def forward(self, state_BS: Tensor) -> tuple[Tensor, Tensor]:
        """Q-values (B, I) and the MoE balancing loss (scalar; zero for the MLP)."""
        valid_BS = state_BS != self.pad
        count_B1 = valid_BS.sum(-1, keepdim=True)
        pooled_BD = self.item_in(state_BS).sum(1) / count_B1.clamp(min=1)
        pooled_BD = torch.where(count_B1 > 0, pooled_BD, self.empty_state)
        if isinstance(self.block, MoE):
            out = self.block(self.norm(pooled_BD))
            h_BD, aux = pooled_BD + out.hidden_states, out.aux_loss
        else:
            h_BD, aux = pooled_BD + self.block(self.norm(pooled_BD)), pooled_BD.new_zeros(())
        return h_BD @ self.item_out.weight.T + self.item_bias, aux


def q_targets(q_online_next_BI: Tensor, q_target_next_BI: Tensor, reward_B: Tensor, done_B: Tensor,
              next_mask_BI: Tensor, gamma: float, double: bool = True) -> Tensor:
    """Bootstrapped targets r + gamma * (1 - done) * Q_target(s', a*), with a* the best allowed
    next action by the online network (Double DQN) or by the target network itself (DQN)."""
    chooser = q_online_next_BI if double else q_target_next_BI
    best_B = chooser.masked_fill(~next_mask_BI, float("-inf")).argmax(dim=1)
    next_q_B = q_target_next_BI.gather(1, best_B[:, None]).squeeze(1)
    next_q_B = torch.where(next_mask_BI.any(dim=1), next_q_B, 0.0)  # nothing left to recommend
    return reward_B + gamma * (~done_B).float() * next_q_B


def dqn_loss(q_BI: Tensor, action_B: Tensor, target_B: Tensor, huber_delta: float = 1.0) -> Tensor:
    """Huber loss between Q(s, a) of the taken actions and their (detached) targets."""
    q_taken_B = q_BI.gather(1, action_B[:, None]).squeeze(1)
    return F.huber_loss(q_taken_B, target_B.detach(), delta=huber_delta)


def masked_argmax(q_BI: Tensor, mask_BI: Tensor) -> Tensor:
    """Best allowed item per row."""
    return q_BI.masked_fill(~mask_BI, float("-inf")).argmax(dim=1)
