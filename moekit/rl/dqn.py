"""DQN recommender: a Q-network over the simulator's observation, n-step Double-DQN targets.

Mnih et al., "Human-level control through deep reinforcement learning", Nature 2015 (experience
replay, target network, Huber loss); van Hasselt, Guez & Silver, "Deep Reinforcement Learning with
Double Q-learning", AAAI 2016 (the online network picks the next action, the target network
scores it); Sutton 1988 / Hessel et al., "Rainbow", AAAI 2018 (n-step returns). Zheng et al.,
"DRN: A Deep Reinforcement Learning Framework for News Recommendation", WWW 2018, apply DQN to
recommendation.

Q(s, a) = V(s) + A(s, a) - mean_a' A(s, a'),  A(s, a) = <f(s), e_a + W g_a> + b_a  (the dueling
head of Wang et al., "Dueling Network Architectures for Deep Reinforcement Learning", ICML 2016:
V carries the value of the session going on, which is the same for every item and far larger than
the differences between items; without it each item's bias would have to learn that value on its
own, and the items tried most would win). The state encoder f sees what every policy sees (the
observation of `moekit.rl.simulator.RecommendationEnv`): the user's history window (mean-pooled
item embeddings) and categorical features, and the session so far (the genres of the latest
recommendations by position, with their reactions), passed through a residual MLP or MoE block.
Every item a has an output embedding e_a, its genres g_a (item side information) and a bias b_a,
so one forward gives the Q-values of the whole catalogue. Shape suffixes: B batch, H history
window, W session window, F user features, G genres, D width, I catalogue items.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import ConfigError, check_choice, check_int, check_number, documented
from moekit.layers.config import MoEConfig
from moekit.layers.experts import FeedForward
from moekit.layers.moe import MoE
from moekit.models.pretrained import Pretrained

OBS_KEYS = ("history", "user", "items", "stars", "step")


@documented
@dataclass
class QNetworkOptions:
    """The Q-network's architecture, without the sizes the simulator fixes (what a run config holds)."""

    q_net: str = "mlp"
    """'mlp' (a dense residual FFN block) or 'moe' (a sparse MoE block in its place)."""
    dim: int = 64
    """Width of the state encoding and of the item embeddings."""
    ffn_hidden: int = 128
    """Hidden width of the residual block (MLP) or of each expert (MoE)."""
    num_experts: int = 4
    """MoE: experts in the block."""
    top_k: int = 2
    """MoE: experts per state."""
    aux_loss_coef: float = 0.01
    """MoE: load-balancing loss weight."""
    dueling: bool = True
    """Q = V(s) + A(s, a) - mean A (a state-value head); False: Q = A(s, a)."""

    def __post_init__(self) -> None:
        check_choice("q_net", self.q_net, ("mlp", "moe"))
        for name in ("dim", "ffn_hidden", "num_experts", "top_k"):
            check_int(name, getattr(self, name), 1)
        check_number("aux_loss_coef", self.aux_loss_coef, 0.0)
        if self.q_net == "moe" and self.top_k > self.num_experts:
            raise ConfigError(f"top_k={self.top_k} must be in 1..num_experts={self.num_experts}")


@documented
@dataclass(kw_only=True)
class QNetworkConfig(QNetworkOptions):
    """Sizes and options of a `QNetwork`: the options plus what the simulator fixes (see
    `moekit.train.dqn.build_q_network`)."""

    num_items: int
    """I: catalogue size (item index I is the padding)."""
    num_genres: int = 0
    """G: genres per item (the item_genres buffer); 0: no genre features."""
    user_feature_sizes: list[int] = field(default_factory=lambda: [1])
    """Cardinality of each categorical user feature."""
    session_window: int = 10
    """W: how many latest recommendations the observation holds."""
    max_steps: float = 100.0
    """Session step count is divided by this before it enters the network."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("num_items", self.num_items, 1)
        check_int("num_genres", self.num_genres, 0)
        check_int("session_window", self.session_window, 1)
        if not self.user_feature_sizes or min(self.user_feature_sizes) < 1:
            raise ConfigError(f"user_feature_sizes must be a non-empty list of sizes >= 1 "
                              f"(got {self.user_feature_sizes})")


class QNetwork(Pretrained, nn.Module):
    """Q(observation, item) for every item (see the module docstring)."""

    config_class = QNetworkConfig
    family = "dqn"

    def __init__(self, config: QNetworkConfig) -> None:
        super().__init__()
        self.config = c = config
        self.pad = c.num_items
        G, W = c.num_genres, c.session_window
        self.register_buffer("item_genres", torch.zeros(c.num_items + 1, G))  # (I + 1, G), padding row 0
        self.item_in = nn.Embedding(c.num_items + 1, c.dim, padding_idx=c.num_items)
        self.user_in = nn.ModuleList(nn.Embedding(n, c.dim) for n in c.user_feature_sizes)
        # session: per position, the item's genres and genres x reaction, the reaction and a presence flag
        self.session_in = nn.Linear(2 * W * G + 2 * W + 1, c.dim)
        self.empty_state = nn.Parameter(torch.zeros(c.dim))  # the history encoding with no liked movie yet
        self.norm = nn.LayerNorm(c.dim)
        if c.q_net == "moe":
            self.block = MoE(MoEConfig(
                d_model=c.dim, d_ff=c.ffn_hidden, num_experts=c.num_experts, top_k=c.top_k,
                expert_type="mlp", activation="gelu", aux_loss_coef=c.aux_loss_coef,
            ))
        else:
            self.block = FeedForward(c.dim, c.ffn_hidden, expert_type="mlp", activation="gelu")
        self.item_out = nn.Embedding(c.num_items, c.dim)
        self.genre_out = nn.Linear(G, c.dim, bias=False) if G else None
        self.item_bias = nn.Parameter(torch.zeros(c.num_items))
        self.value = nn.Linear(c.dim, 1) if c.dueling else None
        for emb in (self.item_in, self.item_out, *self.user_in):
            nn.init.normal_(emb.weight, std=0.05)
        with torch.no_grad():
            self.item_in.weight[self.pad].zero_()

    @torch.no_grad()
    def set_item_genres(self, item_genres_IG: np.ndarray | Tensor) -> None:
        """Item side information: the (I, G) genre matrix (rows are normalised to unit length)."""
        g = torch.as_tensor(np.asarray(item_genres_IG, dtype=np.float32))
        if g.shape != (self.config.num_items, self.config.num_genres):
            raise ValueError(f"item_genres must have shape {(self.config.num_items, self.config.num_genres)}, "
                             f"got {tuple(g.shape)}")
        self.item_genres[: self.pad] = g / g.norm(dim=1, keepdim=True).clamp(min=1e-12)

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

    def encode(self, obs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """State encoding f(s) (B, D) and the MoE balancing loss (scalar; zero for the MLP)."""
        history_BH, items_BW = obs["history"], obs["items"]
        valid_BH = history_BH != self.pad
        count_B1 = valid_BH.sum(-1, keepdim=True)
        pooled_BD = self.item_in(history_BH).sum(1) / count_B1.clamp(min=1)
        pooled_BD = torch.where(count_B1 > 0, pooled_BD, self.empty_state)
        user_BD = sum(emb(obs["user"][:, f]) for f, emb in enumerate(self.user_in))
        present_BW = (items_BW != self.pad).float()
        react_BW = (obs["stars"] - 3.0) / 2.0 * present_BW  # reactions in reward units, 0 where padded
        genres_BWG = self.item_genres[items_BW]
        session_BX = torch.cat([genres_BWG.flatten(1), (genres_BWG * react_BW[..., None]).flatten(1), react_BW,
                                present_BW, obs["step"] / self.config.max_steps], dim=1)
        z_BD = pooled_BD + user_BD + self.session_in(session_BX)
        if isinstance(self.block, MoE):
            out = self.block(self.norm(z_BD))
            return z_BD + out.hidden_states, out.aux_loss
        return z_BD + self.block(self.norm(z_BD)), z_BD.new_zeros(())

    def forward(self, obs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Q-values (B, I) and the MoE balancing loss (scalar; zero for the MLP)."""
        h_BD, aux = self.encode(obs)
        items_ID = self.item_out.weight
        if self.genre_out is not None:
            items_ID = items_ID + self.genre_out(self.item_genres[: self.pad])
        adv_BI = h_BD @ items_ID.T + self.item_bias
        if self.value is None:
            return adv_BI, aux
        return self.value(h_BD) + adv_BI - adv_BI.mean(dim=1, keepdim=True), aux


def obs_to_tensors(obs: dict[str, np.ndarray], batched: bool = False) -> dict[str, Tensor]:
    """An observation dict (one, or a batch with `batched`) as torch tensors with a batch dimension."""
    out = {}
    for k in OBS_KEYS:
        v = torch.from_numpy(np.asarray(obs[k]))
        out[k] = v if batched else v[None]
    return out


def n_step_transitions(rewards: list[float], gamma: float, n: int, terminated: bool
                       ) -> list[tuple[float, int, float]]:
    """For an episode's rewards r_0..r_{T-1}: per start step t, (R_t, m, discount) with
    R_t = Σ_{k<m} γ^k r_{t+k}, m = min(n, T - t) the steps looked ahead (the target bootstraps from
    the observation after step t + m - 1), and discount = γ^m, or 0 when the episode terminated
    within those m steps (no bootstrap). `terminated` False: the episode was cut (bootstrap at the end)."""
    T, out = len(rewards), []
    for t in range(T):
        m = min(n, T - t)
        ret = sum(gamma ** k * rewards[t + k] for k in range(m))
        ends = terminated and t + m == T
        out.append((ret, m, 0.0 if ends else gamma ** m))
    return out


def q_targets(q_online_next_BI: Tensor, q_target_next_BI: Tensor, return_B: Tensor, discount_B: Tensor,
              next_mask_BI: Tensor, double: bool = True) -> Tensor:
    """Bootstrapped targets R + discount * Q_target(s', a*), with a* the best allowed next action by
    the online network (Double DQN) or by the target network itself (DQN). For n-step returns R is
    the discounted n-step reward sum and discount = γ^n (0 at a terminal)."""
    chooser = q_online_next_BI if double else q_target_next_BI
    best_B = chooser.masked_fill(~next_mask_BI, float("-inf")).argmax(dim=1)
    next_q_B = q_target_next_BI.gather(1, best_B[:, None]).squeeze(1)
    next_q_B = torch.where(next_mask_BI.any(dim=1), next_q_B, 0.0)  # nothing left to recommend
    return return_B + discount_B * next_q_B


def dqn_loss(q_BI: Tensor, action_B: Tensor, target_B: Tensor, huber_delta: float = 1.0) -> Tensor:
    """Huber loss between Q(s, a) of the taken actions and their (detached) targets."""
    q_taken_B = q_BI.gather(1, action_B[:, None]).squeeze(1)
    return F.huber_loss(q_taken_B, target_B.detach(), delta=huber_delta)


def masked_argmax(q_BI: Tensor, mask_BI: Tensor) -> Tensor:
    """Best allowed item per row."""
    return q_BI.masked_fill(~mask_BI, float("-inf")).argmax(dim=1)
