"""Two-tower retrieval: a user tower and an item tower meet in one inner product.

Yi et al., "Sampling-Bias-Corrected Neural Modeling for Large Corpus Item Recommendations", RecSys 2019
(in-batch softmax with logQ correction, L2-normalised embeddings with a temperature); Covington et
al., "Deep Neural Networks for YouTube Recommendations", RecSys 2016 (user tower over pooled watch
history and profile features). Each tower's body is a residual MLP block or a moekit `MoE` block.

Shape suffixes: B batch, L history length, D embedding width, H tower hidden width, G genres,
I catalogue items, M extra negatives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import ConfigError, check_choice, check_int, check_number, documented
from moekit.layers.config import MoEConfig
from moekit.layers.experts import FeedForward
from moekit.layers.moe import MoE
from moekit.models.pretrained import Pretrained

TOWERS = ("mlp", "moe")
POOLINGS = ("mean", "attention")


@documented
@dataclass
class TwoTowerOptions:
    """The towers of a two-tower model, without the sizes that come from the data (user and item
    counts): what a training config holds before the data is loaded."""

    tower: str = "mlp"
    """'mlp' (a residual FFN block per tower) or 'moe' (a sparse MoE block in its place)."""
    dim: int = 64
    """Width of the final (L2-normalised) embeddings and of the id embeddings."""
    hidden: int = 128
    """Tower hidden width (the MoE d_model)."""
    ffn_hidden: int = 256
    """Hidden width of the residual FFN block (MLP tower) or of each expert (MoE tower)."""
    num_experts: int = 4
    """MoE towers: experts per tower."""
    top_k: int = 2
    """MoE towers: experts per row."""
    aux_loss_coef: float = 0.01
    """MoE towers: load-balancing loss weight."""
    pooling: str = "mean"
    """How the user tower pools the recent history: 'mean' or 'attention' (query from the profile)."""
    history_len: int = 50
    """Recent training items the user tower sees."""
    use_user_id: bool = True
    """A user-id embedding memorises each known user; turn it off to serve users unseen in training."""
    temperature: float = 0.05
    """Softmax temperature on cosine scores: 1/0.05 = 20 spreads cosines in [-1, 1] enough to rank."""
    dropout: float = 0.1
    """Dropout inside the towers."""
    num_year_buckets: int = 20
    """Release-year buckets (5 years each from 1920; 0 = unknown)."""

    def __post_init__(self) -> None:
        check_choice("tower", self.tower, TOWERS)
        check_choice("pooling", self.pooling, POOLINGS)
        for name in ("dim", "hidden", "ffn_hidden", "num_experts", "top_k", "history_len", "num_year_buckets"):
            check_int(name, getattr(self, name), 1)
        check_number("temperature", self.temperature, 0.0, strict_min=True)
        check_number("aux_loss_coef", self.aux_loss_coef, 0.0)
        check_number("dropout", self.dropout, 0.0, 1.0, strict_max=True)
        if self.tower == "moe" and self.top_k > self.num_experts:
            raise ConfigError(f"top_k={self.top_k} must be in 1..num_experts={self.num_experts}")


@documented
@dataclass(kw_only=True)
class TwoTowerConfig(TwoTowerOptions):
    """Sizes of the two-tower model: the towers plus the user, item and side-feature counts of the data."""

    num_users: int
    """Users (rows of the user-id embedding and of the user side features)."""
    num_items: int
    """Items in the catalogue."""
    num_genres: int = 19
    """Genre (or category, tag) flags per item."""
    user_feature_sizes: tuple[int, ...] = (2, 7, 21)
    """Values of each categorical user feature (MovieLens: gender, age group, occupation); each gets an
    embedding and the user's profile is their sum."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("num_users", "num_items", "num_genres"):
            check_int(name, getattr(self, name), 1)
        self.user_feature_sizes = tuple(self.user_feature_sizes)
        if not self.user_feature_sizes:
            raise ConfigError("user_feature_sizes must list at least one feature (one of size 1: a constant)")
        for size in self.user_feature_sizes:
            check_int("user_feature_sizes", size, 1)


@dataclass
class TowerOutput:
    embedding: Tensor
    """(B, D) L2-normalised."""
    aux_loss: Tensor
    """Scalar MoE balancing loss (zero for an MLP tower)."""
    expert_counts: Tensor | None = None


class Tower(nn.Module):
    """in -> Linear -> GELU -> x + block(LayerNorm(x)) -> Linear -> L2 normalise.

    `block` is a dense FFN ('mlp') or a sparse MoE ('moe'); everything else is shared, so the two
    variants differ only in that block."""

    def __init__(self, d_in: int, config: TwoTowerConfig) -> None:
        super().__init__()
        self.proj_in = nn.Linear(d_in, config.hidden)
        self.norm = nn.LayerNorm(config.hidden)
        if config.tower == "moe":
            self.block = MoE(MoEConfig(
                d_model=config.hidden, d_ff=config.ffn_hidden, num_experts=config.num_experts,
                top_k=config.top_k, expert_type="mlp", activation="gelu", aux_loss_coef=config.aux_loss_coef,
            ))
        else:
            self.block = FeedForward(config.hidden, config.ffn_hidden, expert_type="mlp", activation="gelu")
        self.dropout = nn.Dropout(config.dropout)
        self.proj_out = nn.Linear(config.hidden, config.dim)

    def forward(self, x_BF: Tensor) -> TowerOutput:
        h_BH = F.gelu(self.proj_in(x_BF))
        if isinstance(self.block, MoE):
            out = self.block(self.norm(h_BH))
            h_BH = h_BH + self.dropout(out.hidden_states)
            aux, counts = out.aux_loss, out.expert_counts
        else:
            h_BH = h_BH + self.dropout(self.block(self.norm(h_BH)))
            aux, counts = h_BH.new_zeros(()), None
        return TowerOutput(F.normalize(self.proj_out(h_BH), dim=-1), aux, counts)


class TwoTower(Pretrained, nn.Module):
    """User tower(user id, categorical user features (MovieLens: gender, age group, occupation), pooled
    history) and item tower(item id, genres, year bucket). Side features are buffers, so a checkpoint
    carries them."""

    config_class = TwoTowerConfig
    family = "two-tower"

    def __init__(self, config: TwoTowerConfig) -> None:
        super().__init__()
        self.config = c = config
        D = c.dim
        self.pad_item = c.num_items  # history padding index
        self.item_emb = nn.Embedding(c.num_items + 1, D, padding_idx=c.num_items)  # shared by both towers
        self.genre_proj = nn.Linear(c.num_genres, D, bias=False)
        self.year_emb = nn.Embedding(c.num_year_buckets, D)
        self.user_emb = nn.Embedding(c.num_users, D) if c.use_user_id else None
        self.user_feature_emb = nn.ModuleList(nn.Embedding(size, D) for size in c.user_feature_sizes)
        if c.pooling == "attention":
            self.pool_query = nn.Linear(D, D, bias=False)
        self.user_tower = Tower(3 * D if c.use_user_id else 2 * D, c)
        self.item_tower = Tower(3 * D, c)
        self.register_buffer("item_genres", torch.zeros(c.num_items, c.num_genres))
        self.register_buffer("item_year", torch.zeros(c.num_items, dtype=torch.long))
        self.register_buffer("user_features", torch.zeros(c.num_users, len(c.user_feature_sizes), dtype=torch.long))
        nn.init.normal_(self.item_emb.weight, std=0.05)
        with torch.no_grad():
            self.item_emb.weight[self.pad_item].zero_()

    def set_side_features(self, item_genres_IG: Tensor, item_year_I: Tensor, user_features_UF: Tensor) -> None:
        """Copy the catalogue's and the users' static features into the model (checked against the config)."""
        c = self.config
        item_genres_IG, item_year_I, user_features_UF = (torch.as_tensor(t) for t in (item_genres_IG, item_year_I,
                                                                                     user_features_UF))
        for name, value, shape in (("item_genres", item_genres_IG, (c.num_items, c.num_genres)),
                                   ("item_year", item_year_I, (c.num_items,)),
                                   ("user_features", user_features_UF, (c.num_users, len(c.user_feature_sizes)))):
            if tuple(value.shape) != shape:
                raise ValueError(f"{name} must have shape {shape} (got {tuple(value.shape)})")
        if item_year_I.numel() and (item_year_I.min() < 0 or item_year_I.max() >= c.num_year_buckets):
            raise ValueError(f"item_year values must lie in [0, {c.num_year_buckets})")
        for f, size in enumerate(c.user_feature_sizes):
            column = user_features_UF[:, f]
            if column.numel() and (column.min() < 0 or column.max() >= size):
                raise ValueError(f"user feature {f} values must lie in [0, {size}) "
                                 f"(got {column.min()}..{column.max()})")
        self.item_genres.copy_(item_genres_IG)
        self.item_year.copy_(item_year_I)
        self.user_features.copy_(user_features_UF)

    def item_forward(self, item_B: Tensor) -> TowerOutput:
        x_BF = torch.cat([
            self.item_emb(item_B),  # (B, D)
            self.genre_proj(self.item_genres[item_B]),  # (B, G) -> (B, D)
            self.year_emb(self.item_year[item_B]),  # (B, D)
        ], dim=-1)
        return self.item_tower(x_BF)

    def user_forward(self, user_B: Tensor, history_BL: Tensor) -> TowerOutput:
        """`history_BL`: the user's most recent items, padded with `num_items` (any padding position)."""
        features_BF = self.user_features[user_B]
        profile_BD = self.user_feature_emb[0](features_BF[:, 0])
        for f, emb in enumerate(self.user_feature_emb[1:], 1):
            profile_BD = profile_BD + emb(features_BF[:, f])
        hist_BLD = self.item_emb(history_BL)
        valid_BL = history_BL != self.pad_item
        if self.config.pooling == "attention":
            query_BD = self.pool_query(profile_BD)
            score_BL = torch.einsum("bld,bd->bl", hist_BLD, query_BD) / math.sqrt(self.config.dim)
            score_BL = score_BL.masked_fill(~valid_BL, float("-inf"))
            weight_BL = torch.softmax(score_BL, dim=-1).nan_to_num(0.0)  # empty history -> all zeros
        else:
            weight_BL = valid_BL.float() / valid_BL.sum(-1, keepdim=True).clamp(min=1)
        pooled_BD = torch.einsum("bl,bld->bd", weight_BL, hist_BLD)
        parts = [profile_BD, pooled_BD]
        if self.user_emb is not None:
            parts.append(self.user_emb(user_B))
        return self.user_tower(torch.cat(parts, dim=-1))

    @torch.no_grad()
    def all_item_embeddings(self, batch_size: int = 4096) -> Tensor:
        """(I, D) embeddings of the whole catalogue, for the nearest-neighbour index."""
        items = torch.arange(self.config.num_items, device=self.item_emb.weight.device)
        return torch.cat([self.item_forward(chunk).embedding for chunk in items.split(batch_size)])


def in_batch_softmax_loss(
    user_BD: Tensor,
    item_BD: Tensor,
    item_ids_B: Tensor,
    log_q_B: Tensor,
    temperature: float,
    neg_item_MD: Tensor | None = None,
    neg_ids_M: Tensor | None = None,
    neg_log_q_M: Tensor | None = None,
    rows: Tensor | None = None,
) -> Tensor:
    """Sampled softmax over the batch's items (plus optional extra negatives), logQ-corrected.

    Row b's positive is item b; the other items of the batch are its negatives. Every logit
    `<u, v_j> / T` is corrected by `- log q_j`, q_j being how likely item j is to appear as a
    sample (Yi et al. 2019, eq. 3): without it popular items, over-represented among in-batch
    negatives, are pushed down too hard. A copy of row b's own positive elsewhere in the batch is
    not a negative and is masked out; so is an extra negative that equals the positive.

    `rows` (R,): the users given are only these rows of the batch (data parallelism: a process scores
    its own rows against all B items); the loss is then the mean over those rows.
    """
    B = item_BD.shape[0]
    rows_R = torch.arange(B, device=user_BD.device) if rows is None else rows.to(user_BD.device)
    logits_RB = user_BD @ item_BD.T / temperature - log_q_B[None, :]
    same_RB = item_ids_B[rows_R, None] == item_ids_B[None, :]
    same_RB[torch.arange(len(rows_R)), rows_R] = False  # the row's own positive
    logits = [logits_RB.masked_fill(same_RB, float("-inf"))]
    if neg_item_MD is not None:
        if neg_ids_M is None or neg_log_q_M is None:
            raise ValueError("extra negatives need neg_ids_M and neg_log_q_M too")
        logits_RM = user_BD @ neg_item_MD.T / temperature - neg_log_q_M[None, :]
        logits.append(logits_RM.masked_fill(neg_ids_M[None, :] == item_ids_B[rows_R, None], float("-inf")))
    return F.cross_entropy(torch.cat(logits, dim=1), rows_R)
