"""`MoEConfig`: every routing recipe of the MoE layer as one validated dataclass.

A bad value fails here, at construction, with the field and the value in the message, rather than
deep inside a forward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

EXPERT_TYPES = ("swiglu", "geglu", "mlp", "linear")
ACTIVATIONS = ("relu", "gelu", "silu")
ROUTERS = ("softmax_topk", "topk_softmax", "noisy_topk", "sigmoid_topk", "expert_choice", "soft")
BACKENDS = ("auto", "grouped", "loop", "dense")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name}={value!r}; expected one of {', '.join(allowed)}")


@dataclass
class MoEConfig:
    """Configuration of one `moekit.MoE` layer.

    Defaults follow current practice: SwiGLU experts without bias, softmax-then-top-k routing
    renormalised over the chosen k, no shared experts, dropless, no balancing loss.
    """

    d_model: int
    """Width of the tokens going in and out."""
    d_ff: int
    """Hidden width of each routed expert (fine-grained experts: many experts, small d_ff)."""
    num_experts: int = 8
    top_k: int = 2
    """Experts per token (token-choice routers); for expert choice, the average experts per token
    that sets each expert's capacity. Ignored by the soft router, which uses every expert."""

    # --- experts
    expert_type: str = "swiglu"
    """'swiglu' / 'geglu' (gated FFN), 'mlp' (two layers with `activation`), 'linear' (one layer)."""
    activation: str = "gelu"
    """Activation of 'mlp' experts: relu, gelu or silu."""
    expert_bias: bool = False

    # --- router
    router: str = "softmax_topk"
    """softmax_topk: softmax over all experts, then top-k (GShard, DeepSeek-V2, Qwen).
    topk_softmax: top-k logits, then softmax over those k (Mixtral).
    noisy_topk: topk_softmax on logits plus learned-scale Gaussian noise in training (Shazeer 2017).
    sigmoid_topk: sigmoid affinities, top-k, normalised (DeepSeek-V3).
    expert_choice: each expert picks its top tokens (Zhou et al. 2022).
    soft: every expert, softmax weights (the classic dense MoE)."""
    normalize_topk: bool = True
    """Renormalise the chosen k weights to sum to 1 (softmax_topk and sigmoid_topk)."""
    num_expert_groups: int = 1
    """Group-limited routing (DeepSeek-V3): experts form this many equal groups ..."""
    topk_groups: int = 1
    """... and each token chooses its top-k experts only inside its `topk_groups` best groups."""
    routed_scaling_factor: float = 1.0
    """Multiplies the routed experts' weights (DeepSeek-V3 uses 2.5 with sigmoid routing)."""

    # --- shared experts (DeepSeek-MoE, Qwen-MoE)
    num_shared_experts: int = 0
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
    """'grouped' (sort tokens by expert, grouped GEMMs), 'loop' (per-expert loop, the reference),
    'dense' (every expert on every token), 'auto' (dense for soft routing, else grouped)."""

    def __post_init__(self) -> None:
        for name in ("d_model", "d_ff", "num_experts"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer (got {value!r})")
        _choice("expert_type", self.expert_type, EXPERT_TYPES)
        _choice("activation", self.activation, ACTIVATIONS)
        _choice("router", self.router, ROUTERS)
        _choice("backend", self.backend, BACKENDS)
        if self.router != "soft":
            if self.top_k < 1:
                raise ValueError(f"top_k must be >= 1 (got top_k={self.top_k})")
            if self.top_k > self.num_experts:
                raise ValueError(f"top_k={self.top_k} > num_experts={self.num_experts}")
        if self.num_expert_groups < 1 or self.num_experts % self.num_expert_groups:
            raise ValueError(
                f"num_expert_groups={self.num_expert_groups} must divide num_experts={self.num_experts}"
            )
        if not 1 <= self.topk_groups <= self.num_expert_groups:
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
        if self.capacity_factor is not None and not (
            self.capacity_factor > 0 and math.isfinite(self.capacity_factor)
        ):
            raise ValueError(f"capacity_factor must be a positive number or None (got {self.capacity_factor})")
        if self.capacity_factor is not None and self.router == "soft":
            raise ValueError("capacity_factor does not apply to router='soft' (every token uses every expert)")
        if self.num_shared_experts < 0:
            raise ValueError(f"num_shared_experts must be >= 0 (got {self.num_shared_experts})")
        if self.shared_d_ff is not None and self.shared_d_ff < 1:
            raise ValueError(f"shared_d_ff must be a positive integer (got {self.shared_d_ff})")
        for name in ("aux_loss_coef", "seq_aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (got {getattr(self, name)})")
        if self.bias_update_rate > 0 and self.router in ("expert_choice", "soft"):
            raise ValueError(f"bias_update_rate (loss-free balancing) needs a token-choice router, "
                             f"not router={self.router!r}")

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
