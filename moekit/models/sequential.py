"""Next-item recommendation with self-attention: SASRec and FAME.

SASRec: W.-C. Kang and J. McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018,
  https://arxiv.org/abs/1808.09781. Causal self-attention over the user's item sequence, learned
  positions, dropout; the item embedding table also scores the next item.
FAME: M. Liu, S. Zhang and C. Long, "Facet-Aware Multi-Head Mixture-of-Experts Model for Sequential
  Recommendation", WSDM 2025, https://arxiv.org/abs/2411.01457. The same backbone, but in the last
  layer every attention head is a facet: the head's output (after a feed-forward shared by heads)
  scores items against that head's item sub-embedding; inside each head several query projections
  (experts) are mixed by a learned router; a gate over heads combines the heads' predictions.

Both models return the hidden state at every position (`forward`) and score items from it
(`logits`), so the trainer can use full softmax cross-entropy or sampled negatives with BCE.

Shape suffixes: B batch (users), T positions, D hidden, H heads, K = D / H head width, N experts per
head, I items (+1 for padding id 0), P scored positions (rows of a flattened batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import ConfigError, check_choice, check_int, check_number, documented
from moekit.layers.experts import FeedForward
from moekit.models.pretrained import Pretrained


@documented
@dataclass
class SASRecConfig:
    """Sizes of a SASRec model."""

    num_items: int
    """Items are 1..num_items; id 0 is padding."""
    max_len: int = 50
    """Positions seen; the standard setting for Amazon data (SASRec paper: 50)."""
    hidden: int = 64
    """Width of item embeddings and hidden states."""
    num_layers: int = 2
    """Transformer blocks."""
    num_heads: int = 2
    """Attention heads."""
    ffn_mult: int = 4
    """FFN width = ffn_mult * hidden (RecBole's 256 for hidden 64)."""
    dropout: float = 0.5
    """Dropout on embeddings and block outputs (the SASRec paper's choice for sparse Amazon data)."""
    attn_dropout: float = 0.5
    """Dropout on attention weights."""
    positions: str = "end"
    """Which position index each item gets: 'end' counts back from the most recent item (the SASRec
    reference code's left-padded layout: the newest item is always at max_len - 1); 'start' counts from
    the oldest item in the window (RecBole's layout), so a training prefix of length t sits at the same
    positions as a test history of length t."""

    def __post_init__(self) -> None:
        check_choice("positions", self.positions, ("end", "start"))
        for name in ("num_items", "max_len", "hidden", "num_layers", "num_heads", "ffn_mult"):
            check_int(name, getattr(self, name), 1)
        if self.hidden % self.num_heads:
            raise ConfigError(f"hidden must be divisible by num_heads (got hidden={self.hidden}, "
                              f"num_heads={self.num_heads})")
        for name in ("dropout", "attn_dropout"):
            check_number(name, getattr(self, name), 0.0, 1.0, strict_max=True)


@documented
@dataclass
class FAMEConfig(SASRecConfig):
    """Sizes of a FAME model: SASRec's plus the last layer's experts and head mixing."""

    num_experts: int = 4
    """Query-projection experts inside each head of the last layer."""
    head_mixing: str = "logits"
    """How the head gate combines the heads: 'logits' adds the heads' item scores weighted by H times the
    gate (with cross-entropy it trained faster and better on Beauty than the alternative), 'probability'
    mixes the heads' softmax distributions (a mixture of softmaxes; the log of the mixture is the score;
    full-softmax cross-entropy only)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("num_experts", self.num_experts, 1)
        check_choice("head_mixing", self.head_mixing, ("probability", "logits"))


def attention_mask(items_BT: Tensor) -> Tensor:
    """(B, 1, T, T) boolean: query t may attend to key s <= t that is a real item. A padding query
    attends to itself only, so its (ignored) row stays finite; real queries never see padding."""
    T = items_BT.shape[1]
    causal_TT = torch.ones(T, T, dtype=torch.bool, device=items_BT.device).tril()
    mask_BTT = causal_TT & (items_BT != 0)[:, None, :]
    mask_BTT = mask_BTT | torch.eye(T, dtype=torch.bool, device=items_BT.device)
    return mask_BTT[:, None]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.num_heads, self.attn_dropout = config.num_heads, config.attn_dropout
        self.qkv = nn.Linear(config.hidden, 3 * config.hidden)
        self.proj = nn.Linear(config.hidden, config.hidden)

    def forward(self, x_BTD: Tensor, mask_B1TT: Tensor) -> Tensor:
        B, T, D = x_BTD.shape
        q, k, v = self.qkv(x_BTD).split(D, dim=-1)
        q, k, v = (z.view(B, T, self.num_heads, -1).transpose(1, 2) for z in (q, k, v))  # (B, H, T, K)
        y_BHTK = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_B1TT,
                                                dropout_p=self.attn_dropout if self.training else 0.0)
        return self.proj(y_BHTK.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    """Pre-LayerNorm transformer block (as in the SASRec reference code: LN before attention/FFN)."""

    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.hidden)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.hidden)
        self.ffn = FeedForward(config.hidden, config.ffn_mult * config.hidden, expert_type="mlp",
                               activation="gelu", bias=True)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x_BTD: Tensor, mask_B1TT: Tensor) -> Tensor:
        x_BTD = x_BTD + self.drop(self.attn(self.ln1(x_BTD), mask_B1TT))
        return x_BTD + self.drop(self.ffn(self.ln2(x_BTD)))


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (h_PD @ w_ID.T) against target_P, `chunk` rows of logits at a time: the
    forward keeps only each row's log-sum-exp, the backward scores each chunk again (one more matmul)
    and turns it into softmax - one-hot in place."""

    @staticmethod
    def forward(ctx, h_PD: Tensor, w_ID: Tensor, target_P: Tensor, chunk: int) -> Tensor:
        P = h_PD.shape[0]
        lse_P = torch.empty(P, dtype=h_PD.dtype, device=h_PD.device)
        total = h_PD.new_zeros(())
        for lo in range(0, P, chunk):
            logits_CI = h_PD[lo:lo + chunk] @ w_ID.T
            lse_P[lo:lo + chunk] = torch.logsumexp(logits_CI, dim=1)
            total += (lse_P[lo:lo + chunk] - logits_CI.gather(1, target_P[lo:lo + chunk, None]).squeeze(1)).sum()
        ctx.save_for_backward(h_PD, w_ID, target_P, lse_P)
        ctx.chunk = chunk
        return total / P

    @staticmethod
    def backward(ctx, grad: Tensor):
        h_PD, w_ID, target_P, lse_P = ctx.saved_tensors
        P, chunk = h_PD.shape[0], ctx.chunk
        grad_h = torch.empty_like(h_PD) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(w_ID) if ctx.needs_input_grad[1] else None
        for lo in range(0, P, chunk):
            h_CD, t_C = h_PD[lo:lo + chunk], target_P[lo:lo + chunk]
            g_CI = (h_CD @ w_ID.T).sub_(lse_P[lo:lo + chunk, None]).exp_()  # softmax
            g_CI[torch.arange(len(t_C), device=t_C.device), t_C] -= 1.0
            g_CI.mul_(grad / P)
            if grad_h is not None:
                grad_h[lo:lo + chunk] = g_CI @ w_ID
            if grad_w is not None:
                grad_w.addmm_(g_CI.T, h_CD)
        return grad_h, grad_w, None, None


def chunked_cross_entropy(h_PD: Tensor, w_ID: Tensor, target_P: Tensor, chunk: int) -> Tensor:
    """`F.cross_entropy(h_PD @ w_ID.T, target_P)` (the mean, equal up to rounding) without the (P, I)
    logits: `chunk` rows at a time in the forward and again in the backward, so a training step holds
    (chunk, I) where the plain loss holds the logits, their log-softmax and its gradient, 3 x (P, I)."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 (got {chunk})")
    return _ChunkedCrossEntropy.apply(h_PD, w_ID, target_P, chunk)


def _slice_start(items: slice | None) -> int:
    """First item id of a contiguous range of item ids (None: all items)."""
    if items is None:
        return 0
    if items.step not in (None, 1) or (items.start or 0) < 0 or (items.stop is not None and items.stop < 0):
        raise ValueError(f"items must be a contiguous slice(lo, hi) of item ids (got {items})")
    return items.start or 0


class SASRec(Pretrained, nn.Module):
    """SASRec (Kang & McAuley 2018): item + position embeddings -> causal self-attention blocks -> a
    hidden state per position, scored against the item table (shared input/output embeddings).
    `forward(items_BT)` gives (B, T, D) states; `scores(items_BT)` every item's score for the next step."""

    config_class = SASRecConfig
    family = "seqrec"

    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.config = config
        self.item_emb = nn.Embedding(config.num_items + 1, config.hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(config.max_len, config.hidden)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(self._num_plain_blocks()))
        self.ln_f = nn.LayerNorm(config.hidden)
        self.apply(self._init_weights)

    def _num_plain_blocks(self) -> int:
        return self.config.num_layers

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # Small normal init (std 0.02, as RecBole/BERT): the item table doubles as output layer.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()

    def embed(self, items_BT: Tensor) -> tuple[Tensor, Tensor]:
        """Input embeddings and attention mask. Sequences are left-padded: the last column is the
        most recent item; either position layout (config.positions) leaves the output unchanged
        when leading all-padding columns are trimmed."""
        B, T = items_BT.shape
        if T > self.config.max_len:
            raise ValueError(f"sequence length {T} > max_len={self.config.max_len}")
        if items_BT.numel() and (int(items_BT.min()) < 0 or int(items_BT.max()) > self.config.num_items):
            raise ValueError(f"item ids must be in 0..{self.config.num_items} (0 = padding), got "
                             f"{int(items_BT.min())}..{int(items_BT.max())}")
        # sqrt(D) scaling of item embeddings as in the SASRec reference code.
        x_BTD = self.item_emb(items_BT) * math.sqrt(self.config.hidden) + self.pos_emb(self.position_ids(items_BT))
        x_BTD = self.drop(x_BTD) * (items_BT != 0).unsqueeze(-1)  # padding rows are exactly zero
        return x_BTD, attention_mask(items_BT)

    def position_ids(self, items_BT: Tensor) -> Tensor:
        """(T,) or (B, T) indices into pos_emb; padding columns get any index (their rows are zeroed)."""
        T = items_BT.shape[1]
        if self.config.positions == "end":
            return torch.arange(self.config.max_len - T, self.config.max_len, device=items_BT.device)
        # Left-padded rows: the first real item is 0; a position depends only on earlier columns.
        return ((items_BT != 0).cumsum(1) - 1).clamp_min(0)

    def forward(self, items_BT: Tensor) -> Tensor:
        """Hidden state after each position: (B, T) item ids -> (B, T, D)."""
        x_BTD, mask_B1TT = self.embed(items_BT)
        for block in self.blocks:
            x_BTD = block(x_BTD, mask_B1TT)
        return self.ln_f(x_BTD)

    def logits(self, h_PD: Tensor, items: Tensor | slice | None = None) -> Tensor:
        """Scores of all items (P, I+1) (padding column is -inf), of the item ids in `slice(lo, hi)`
        (P, hi - lo: those columns of all items' scores, up to rounding; chunked full ranking), or of
        `items` (P, C) per row."""
        if items is None or isinstance(items, slice):
            lo = _slice_start(items)
            logits_PI = h_PD @ self.item_emb.weight[items if items is not None else slice(None)].T
            if lo == 0:
                logits_PI[:, 0] = float("-inf")
            return logits_PI
        return (h_PD.unsqueeze(1) * self.item_emb(items)).sum(-1)

    def scores(self, items_BT: Tensor) -> Tensor:
        """Ranking scores of every item for the next step after each sequence: (B, I+1)."""
        return self.logits(self.forward(items_BT)[:, -1])

    def next_item_loss(self, h_PD: Tensor, target_P: Tensor, chunk: int | None = None) -> Tensor:
        """Mean full-softmax cross-entropy of the next items (P,) given hidden states (P, D).
        Scores items 1..I only (no padding column to mask: one pass less over (P, I)). `chunk`: score
        that many positions at a time (`chunked_cross_entropy`: memory (chunk, I), not 3 x (P, I))."""
        if chunk is not None:
            return chunked_cross_entropy(h_PD, self.item_emb.weight[1:], target_P - 1, chunk)
        return F.cross_entropy(h_PD @ self.item_emb.weight[1:].T, target_P - 1)


# ---------------------------------------------------------------------------------------------
# FAME: the last layer keeps its heads apart


@dataclass
class FAMEOutput:
    head_logits_PHI: Tensor  # each head's item scores
    gate_PH: Tensor  # head weights (sum to 1)


class MoEHeadAttention(nn.Module):
    """Multi-head causal attention whose heads stay separate (no output mixing across heads).

    Per head h: N query experts W_Q^(h,n) share the head's keys and values; each gives an
    attention output o_n; a router reads [o_1 ... o_N] and weights them: o = sum_n r_n o_n. A
    per-head output projection (K -> K) keeps each facet in its own sub-space."""

    def __init__(self, config: FAMEConfig) -> None:
        super().__init__()
        D, H, N = config.hidden, config.num_heads, config.num_experts
        K = D // H
        self.H, self.N, self.K, self.attn_dropout = H, N, K, config.attn_dropout
        self.q = nn.Linear(D, H * N * K)
        self.kv = nn.Linear(D, 2 * D)
        self.router_HNKN = nn.Parameter(torch.zeros(H, N * K, N))  # zeros: experts start equally weighted
        self.proj_HKK = nn.Parameter(torch.empty(H, K, K))
        self.proj_bias_HK = nn.Parameter(torch.zeros(H, K))
        nn.init.normal_(self.proj_HKK, std=0.02)

    def forward(self, x_BTD: Tensor, mask_B1TT: Tensor) -> tuple[Tensor, Tensor]:
        """-> per-head outputs (B, T, H, K) and router weights (B, T, H, N)."""
        B, T, D = x_BTD.shape
        H, N, K = self.H, self.N, self.K
        q = self.q(x_BTD).view(B, T, H * N, K).transpose(1, 2)  # (B, H*N, T, K), head-major
        k, v = self.kv(x_BTD).split(D, dim=-1)
        k = k.view(B, T, H, 1, K).expand(B, T, H, N, K).reshape(B, T, H * N, K).transpose(1, 2)
        v = v.view(B, T, H, 1, K).expand(B, T, H, N, K).reshape(B, T, H * N, K).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_B1TT,
                                           dropout_p=self.attn_dropout if self.training else 0.0)
        o_BTHNK = o.transpose(1, 2).reshape(B, T, H, N, K)
        # Router (float32 softmax: the weights must sum to one exactly).
        r_logits_BTHN = torch.einsum("bthm,hmn->bthn", o_BTHNK.reshape(B, T, H, N * K), self.router_HNKN)
        r_BTHN = r_logits_BTHN.float().softmax(-1).to(o_BTHNK.dtype)
        o_BTHK = (r_BTHN.unsqueeze(-1) * o_BTHNK).sum(3)
        y_BTHK = torch.einsum("bthk,hjk->bthj", o_BTHK, self.proj_HKK) + self.proj_bias_HK
        return y_BTHK, r_BTHN


class FAMEBlock(nn.Module):
    """The last layer of FAME: the SASRec block with its heads kept apart. The residual of head h is
    its slice of the input; the feed-forward (width ffn_mult*K) and LayerNorms act on K and are
    shared by all heads, as the paper's FFN'."""

    def __init__(self, config: FAMEConfig) -> None:
        super().__init__()
        K = config.hidden // config.num_heads
        self.H, self.K = config.num_heads, K
        self.ln1 = nn.LayerNorm(config.hidden)
        self.attn = MoEHeadAttention(config)
        self.ln2 = nn.LayerNorm(K)
        self.ffn = FeedForward(K, config.ffn_mult * K, expert_type="mlp", activation="gelu", bias=True)
        self.ln_f = nn.LayerNorm(K)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x_BTD: Tensor, mask_B1TT: Tensor) -> tuple[Tensor, Tensor]:
        B, T, D = x_BTD.shape
        y_BTHK, r_BTHN = self.attn(self.ln1(x_BTD), mask_B1TT)
        x_BTHK = x_BTD.view(B, T, self.H, self.K) + self.drop(y_BTHK)
        x_BTHK = x_BTHK + self.drop(self.ffn(self.ln2(x_BTHK)))
        return self.ln_f(x_BTHK), r_BTHN


class FAME(SASRec):
    """FAME (Liu et al. 2025, facet-aware multi-head MoE): SASRec whose last layer keeps its heads
    apart; each head scores items in its own facet with a mixture of query experts, and a gate
    weighs the heads' scores (see `score_weights`)."""

    config_class = FAMEConfig

    def __init__(self, config: FAMEConfig) -> None:
        super().__init__(config)
        D, H = config.hidden, config.num_heads
        K = D // H
        self.last = FAMEBlock(config)
        self.last.apply(self._init_weights)
        # W_f^(h): item embedding -> head h's sub-embedding. Starts as the slice h*K:(h+1)*K of the
        # item embedding (a literal sub-embedding) and is learned from there.
        self.item_proj_HDK = nn.Parameter(torch.eye(D).view(D, H, K).permute(1, 0, 2).clone())
        self.gate = nn.Linear(D, H)
        nn.init.zeros_(self.gate.weight)  # heads start equally weighted
        nn.init.zeros_(self.gate.bias)

    def _num_plain_blocks(self) -> int:
        return self.config.num_layers - 1

    def forward(self, items_BT: Tensor) -> Tensor:
        """Per-head hidden states (B, T, H*K): head h occupies columns h*K:(h+1)*K."""
        return self.forward_with_router(items_BT)[0]

    def forward_with_router(self, items_BT: Tensor) -> tuple[Tensor, Tensor]:
        x_BTD, mask_B1TT = self.embed(items_BT)
        for block in self.blocks:
            x_BTD = block(x_BTD, mask_B1TT)
        h_BTHK, r_BTHN = self.last(x_BTD, mask_B1TT)
        return h_BTHK.flatten(2), r_BTHN

    def head_gate(self, h_PD: Tensor) -> Tensor:
        """(P, H) weights of the heads, from all heads' outputs (float32 softmax: sums to one)."""
        return self.gate(h_PD).float().softmax(-1).to(h_PD.dtype)

    def heads(self, h_PD: Tensor, items: Tensor | slice | None = None) -> FAMEOutput:
        """Each head's scores of all items (P, H, I+1), of the ids in `slice(lo, hi)` (P, H, hi - lo), or
        of `items` (P, H, C), and the head gate."""
        P, D = h_PD.shape
        H = self.config.num_heads
        h_PHK = h_PD.view(P, H, D // H)
        gate_PH = self.head_gate(h_PD)
        if items is None or isinstance(items, slice):
            lo = _slice_start(items)
            weight_ID = self.item_emb.weight[items if items is not None else slice(None)]
            sub_HIK = torch.einsum("id,hdk->hik", weight_ID, self.item_proj_HDK)
            head_PHI = torch.einsum("phk,hik->phi", h_PHK, sub_HIK)
            if lo == 0:
                head_PHI[..., 0] = float("-inf")
        else:
            sub_PCHK = torch.einsum("pcd,hdk->pchk", self.item_emb(items), self.item_proj_HDK)
            head_PHI = torch.einsum("phk,pchk->phc", h_PHK, sub_PCHK)
        return FAMEOutput(head_PHI, gate_PH)

    def score_weights(self, gate_PH: Tensor) -> Tensor:
        """(P, H) weights of the heads' scores under 'logits' mixing: H * gate, summing to H. With an
        even gate the score is the sum of the heads' sub-embedding scores, the full D-wide dot product
        SASRec scores with; weights summing to one would start every score at 1/H of that scale (on
        Beauty, 3 seeds: test NDCG@10 0.0543 vs 0.0521; docs/results/seqrec_variants.md)."""
        return gate_PH * self.config.num_heads

    def logits(self, h_PD: Tensor, items: Tensor | None = None) -> Tensor:
        """'probability' mixing: log sum_h g_h softmax_h(scores) over all items (a log-probability,
        so cross-entropy on it is the mixture's NLL); 'logits' mixing: sum_h H g_h scores_h."""
        out = self.heads(h_PD, items)
        if self.config.head_mixing == "logits":
            return (self.score_weights(out.gate_PH).unsqueeze(-1) * out.head_logits_PHI).sum(1)
        if items is not None:  # a slice too: the softmax needs every item
            raise ValueError("FAME with head_mixing='probability' scores against the full item set only; "
                             "use head_mixing='logits' for sampled negatives (loss='bce')")
        # Leave the padding column out of the softmax: a logsumexp over all -inf has a NaN gradient.
        log_p_PHI = out.head_logits_PHI[..., 1:].float().log_softmax(-1)
        log_p_PI = torch.logsumexp(log_p_PHI + out.gate_PH.float().log().unsqueeze(-1), dim=1)
        return F.pad(log_p_PI, (1, 0), value=float("-inf"))

    def next_item_loss(self, h_PD: Tensor, target_P: Tensor, chunk: int | None = None) -> Tensor:
        """Mean cross-entropy of the next items (P,). 'probability' mixing: the mixture's NLL,
        -log sum_h g_h softmax_h(scores)[target], from each head's cross-entropy (fused log-softmax)
        mixed in log space; the (P, I) mixture is never built, which makes a training step ~3x cheaper
        than cross-entropy on `logits` (same value). Items 1..I only: no -inf padding column, whose
        gradient through the gate would be NaN (0 * inf)."""
        if chunk is not None:
            raise ValueError("FAME scores all its heads' items at once: a chunked loss is SASRec's only")
        P, D = h_PD.shape
        H = self.config.num_heads
        h_HPK = h_PD.view(P, H, D // H).transpose(0, 1)
        sub_HIK = torch.einsum("id,hdk->hik", self.item_emb.weight[1:], self.item_proj_HDK)
        head_HPI = torch.bmm(h_HPK, sub_HIK.transpose(1, 2))  # contiguous per head
        gate_PH = self.head_gate(h_PD)
        if self.config.head_mixing == "logits":
            return F.cross_entropy(torch.einsum("ph,hpi->pi", self.score_weights(gate_PH), head_HPI), target_P - 1)
        nll_HP = F.cross_entropy(head_HPI.flatten(0, 1).float(), (target_P - 1).repeat(H),
                                 reduction="none").view(H, P)
        return -torch.logsumexp(gate_PH.float().log() - nll_HP.T, dim=1).mean()


def build_model(kind: str, config: SASRecConfig) -> SASRec:
    """SASRec or FAME by name ('sasrec', 'fame')."""
    if kind == "sasrec":
        return SASRec(config)
    if kind == "fame":
        if not isinstance(config, FAMEConfig):
            raise ValueError("model 'fame' needs a FAMEConfig")
        return FAME(config)
    raise ValueError(f"unknown model {kind!r}: expected 'sasrec' or 'fame'")
