"""`MoEConfig`: every routing recipe of the MoE layer as one validated dataclass.

A bad value fails here, at construction, with the field and the value in the message, rather than
deep inside a forward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moekit.config import check_choice, check_int, check_number, documented

EXPERT_TYPES = ("swiglu", "geglu", "mlp", "linear", "clamped_swiglu")
ACTIVATIONS = ("relu", "gelu", "silu")
ROUTERS = ("softmax_topk", "topk_softmax", "noisy_topk", "sigmoid_topk", "expert_choice", "soft")
BACKENDS = ("auto", "grouped", "sparse", "loop", "dense")
GROUP_SCORES = ("auto", "max", "top2_sum")


@documented
@dataclass
class MoEConfig:
    """Configuration of one `moekit.MoE` layer.

    Defaults follow current practice: SwiGLU experts without bias, softmax-then-top-k routing
    renormalised over the chosen k, no shared experts, dropless, no balancing loss.
    """

    d_model: int
    """Width of the tokens going in."""
    d_ff: int
    """Hidden width of each routed expert (fine-grained experts: many experts, small d_ff)."""
    num_experts: int = 8
    """Routed experts."""
    top_k: int = 2
    """Experts per token (token-choice routers); for expert choice, the average experts per token
    that sets each expert's capacity. Ignored by the soft router, which uses every expert."""
    d_out: int | None = None
    """Width of the tokens coming out; None = d_model (a transformer FFN). A dense MoE head may map
    4 features to 3."""

    # --- experts
    expert_type: str = "swiglu"
    """'swiglu' / 'geglu' (gated FFN), 'mlp' (two layers with `activation`), 'linear' (one layer),
    'clamped_swiglu' (GPT-OSS: gate and up clamped at `swiglu_limit`, gate * sigmoid(alpha * gate) * (up + 1))."""
    activation: str = "gelu"
    """Activation of 'mlp' experts: relu, gelu or silu."""
    expert_bias: bool = False
    """Biases in the experts' (and shared experts') projections (GPT-OSS)."""
    swiglu_alpha: float = 1.702
    """'clamped_swiglu' only: the sigmoid's slope (GPT-OSS's 1.702 makes x * sigmoid(1.702 x) close to GELU)."""
    swiglu_limit: float = 7.0
    """'clamped_swiglu' only: gate clamped to <= limit, up to [-limit, limit] (GPT-OSS: 7.0)."""

    # --- router
    router: str = "softmax_topk"
    """softmax_topk: softmax over all experts, then top-k (GShard, DeepSeek-V2, Qwen).
    topk_softmax: top-k logits, then softmax over those k (Mixtral).
    noisy_topk: topk_softmax on logits plus learned-scale Gaussian noise in training (Shazeer 2017).
    sigmoid_topk: sigmoid affinities, top-k, normalised (DeepSeek-V3).
    expert_choice: each expert picks its top tokens (Zhou et al. 2022).
    soft: every expert, softmax weights (the classic dense MoE)."""
    router_bias: bool = False
    """A learned bias on the router logits (GPT-OSS; a gate that is an nn.Linear with bias)."""
    normalize_topk: bool = True
    """Renormalise the chosen k weights to sum to 1 (softmax_topk and sigmoid_topk; k > 1)."""
    num_expert_groups: int = 1
    """Group-limited routing (DeepSeek-V3): experts form this many equal groups ..."""
    topk_groups: int = 1
    """... and each token chooses its top-k experts only inside its `topk_groups` best groups."""
    group_score: str = "auto"
    """How a group is ranked: 'top2_sum' (sum of its two best experts' scores, DeepSeek-V3), 'max'
    (its best expert, DeepSeek-V2), 'auto' (top2_sum for sigmoid_topk, max otherwise)."""
    routed_scaling_factor: float = 1.0
    """Multiplies the routed experts' weights (DeepSeek-V3 uses 2.5 with sigmoid routing)."""
    selection_bias: bool = False
    """A per-expert bias (buffer `router.expert_bias`) added to the scores for selection only, held
    fixed: DeepSeek-V3's e_score_correction_bias, loaded from a checkpoint. bias_update_rate > 0
    adds it too and moves it."""

    # --- shared experts (DeepSeek-MoE, Qwen-MoE)
    num_shared_experts: int = 0
    """Experts every token goes through (DeepSeek-MoE, Qwen-MoE), fused into one FFN."""
    shared_d_ff: int | None = None
    """Hidden width of each shared expert; defaults to d_ff."""
    shared_expert_gate: bool = False
    """Scale the shared experts' output by a learned sigmoid gate per token (Qwen-MoE)."""

    # --- capacity
    capacity_factor: float | None = None
    """None: dropless. Otherwise each expert takes at most ceil(factor * tokens * k / E)
    assignments, keeping the highest router scores; expert choice defaults to 1.0."""

    # --- balancing
    aux_loss_coef: float = 0.0
    """Switch/GShard auxiliary loss E * sum_e f_e * P_e."""
    seq_aux_loss_coef: float = 0.0
    """DeepSeek-V3 sequence-wise auxiliary loss (over the second-to-last axis of the input)."""
    z_loss_coef: float = 0.0
    """Router z-loss, mean of logsumexp(logits)^2 (ST-MoE)."""
    bias_update_rate: float = 0.0
    """Auxiliary-loss-free balancing (DeepSeek-V3): > 0 adds a per-expert bias to the scores used
    for selection, moved by this rate * sign(mean load - load) at each `update_expert_bias()`."""

    # --- execution
    backend: str = "auto"
    """'grouped' (sort tokens by expert, grouped GEMMs), 'sparse' (plain matmuls on the weight slices
    of the experts hit, no padding), 'loop' (per-expert loop, the reference), 'dense' (every expert on
    every token), 'auto' (dense for soft routing; sparse for a few tokens in CPU bf16/fp16, below
    `moe.sparse_crossover`; else grouped)."""

    def __post_init__(self) -> None:
        for name in ("d_model", "d_ff", "num_experts"):
            check_int(name, getattr(self, name), 1)
        if self.d_out is not None:
            check_int("d_out", self.d_out, 1)
        check_choice("expert_type", self.expert_type, EXPERT_TYPES)
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("router", self.router, ROUTERS)
        check_choice("backend", self.backend, BACKENDS)
        check_choice("group_score", self.group_score, GROUP_SCORES)
        for name in ("expert_bias", "router_bias", "normalize_topk", "selection_bias", "shared_expert_gate"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false (got {getattr(self, name)!r})")
        check_number("swiglu_alpha", self.swiglu_alpha, 0, strict_min=True)
        check_number("swiglu_limit", self.swiglu_limit, 0, strict_min=True)
        check_int("top_k", self.top_k, 1)
        if self.router != "soft" and self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} > num_experts={self.num_experts}")
        check_int("num_expert_groups", self.num_expert_groups, 1)
        check_int("topk_groups", self.topk_groups, 1)
        if self.num_experts % self.num_expert_groups:
            raise ValueError(
                f"num_expert_groups={self.num_expert_groups} must divide num_experts={self.num_experts}"
            )
        if self.topk_groups > self.num_expert_groups:
            raise ValueError(
                f"topk_groups={self.topk_groups} must be in 1..num_expert_groups={self.num_expert_groups}"
            )
        if self.num_expert_groups > 1:
            if self.router in ("expert_choice", "soft"):
                raise ValueError(f"group-limited routing does not apply to router={self.router!r}")
            reachable = self.topk_groups * (self.num_experts // self.num_expert_groups)
            if self.top_k > reachable:
                raise ValueError(
                    f"top_k={self.top_k} > experts in the chosen groups "
                    f"({self.topk_groups} groups x {self.num_experts // self.num_expert_groups} experts)"
                )
        check_number("routed_scaling_factor", self.routed_scaling_factor, 0, strict_min=True)
        if self.capacity_factor is not None:
            if isinstance(self.capacity_factor, bool) or not isinstance(self.capacity_factor, int | float) \
                    or not (self.capacity_factor > 0 and math.isfinite(self.capacity_factor)):
                raise ValueError(f"capacity_factor must be a positive number or None (got {self.capacity_factor!r})")
            if self.router == "soft":
                raise ValueError("capacity_factor does not apply to router='soft' (every token uses every expert)")
        check_int("num_shared_experts", self.num_shared_experts, 0)
        if self.shared_d_ff is not None:
            check_int("shared_d_ff", self.shared_d_ff, 1)
        for name in ("aux_loss_coef", "seq_aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            check_number(name, getattr(self, name), 0)
        if (self.bias_update_rate > 0 or self.selection_bias) and self.router in ("expert_choice", "soft"):
            raise ValueError(f"bias_update_rate / selection_bias (a selection bias) needs a token-choice "
                             f"router, not router={self.router!r}")
        if self.router_bias and self.router == "expert_choice":
            raise ValueError("router_bias is not supported with router='expert_choice'")

    @property
    def output_width(self) -> int:
        """Width of the layer's output: d_out, or d_model."""
        return self.d_out or self.d_model

    @property
    def has_selection_bias(self) -> bool:
        """The router holds an `expert_bias` buffer shifting selection (fixed or updated)."""
        return self.selection_bias or self.bias_update_rate > 0

    @property
    def experts_per_token(self) -> int:
        """k for token-choice routing; every expert for soft routing."""
        return self.num_experts if self.router == "soft" else self.top_k

    @property
    def shared_width(self) -> int:
        """Hidden width of all shared experts fused into one FFN (the sum of their outputs)."""
        return self.num_shared_experts * (self.shared_d_ff or self.d_ff)

    def expert_capacity(self, num_tokens: int) -> int | None:
        """Most assignments one expert takes for `num_tokens` tokens; None when dropless."""
        factor = self.capacity_factor
        if factor is None and self.router == "expert_choice":
            factor = 1.0
        if factor is None:
            return None
        return math.ceil(factor * num_tokens * self.top_k / self.num_experts)
