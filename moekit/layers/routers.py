"""Routers and the balancing losses they feed.

Shape suffixes: T tokens, D d_model, E experts, K experts per token, C tokens per expert
(expert choice), G expert groups, B sequences, S tokens per sequence.

All router math runs in float32 (float64 for a float64 model), even under bf16/fp16 autocast:
top-k over nearly-equal low-precision scores flips choices between runs and devices, and
softmax/logsumexp lose the small probabilities the balancing losses depend on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.layers.config import MoEConfig


@dataclass
class Routing:
    """What a router decided for T tokens.

    Token choice: `weights` and `ids` are (T, K): token t goes to experts ids[t] with weights[t].
    Expert choice: `weights` and `ids` are (E, C): expert e takes tokens ids[e] with weights[e].
    """

    weights: Tensor
    ids: Tensor
    logits_TE: Tensor
    """Router logits (float32; float64 for a float64 model), with the router's learned bias but
    before noise and the selection bias; used by the z-loss."""
    probs_TE: Tensor
    """Each token's distribution over experts (float32 or float64), the P of the balancing losses."""
    expert_choice: bool = False


def router_dtype(x: Tensor) -> torch.dtype:
    """float32 for every input but float64, which keeps its precision."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _router_logits(x_TD: Tensor, weight_ED: Tensor, bias_E: Tensor | None = None) -> Tensor:
    dtype = router_dtype(x_TD)
    if torch.is_autocast_enabled(x_TD.device.type):
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return _router_logits(x_TD, weight_ED, bias_E)
    return F.linear(x_TD.to(dtype), weight_ED.to(dtype), None if bias_E is None else bias_E.to(dtype))  # (T, E)


class TokenChoiceRouter(nn.Module):
    """Each token picks its top-k experts (every router except expert choice)."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.d_model))
        self.bias = nn.Parameter(torch.zeros(config.num_experts)) if config.router_bias else None
        if config.router == "noisy_topk":
            # Shazeer et al. 2017: noise std softplus(x W_noise); zero init as in the paper.
            self.noise_weight = nn.Parameter(torch.zeros(config.num_experts, config.d_model))
        if config.has_selection_bias:
            # The bias shifts selection only. Loss-free balancing moves it: `tokens_per_expert`
            # accumulates loads between updates so gradient accumulation sees the whole step.
            self.register_buffer("expert_bias", torch.zeros(config.num_experts))
        if config.bias_update_rate > 0:
            self.register_buffer("tokens_per_expert", torch.zeros(config.num_experts))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.config.d_model**-0.5)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x_TD: Tensor) -> Routing:
        cfg = self.config
        logits_TE = _router_logits(x_TD, self.weight, self.bias)
        if cfg.router == "soft":
            probs_TE = logits_TE.softmax(dim=-1)
            ids_TE = torch.arange(cfg.num_experts, device=x_TD.device).expand_as(probs_TE)
            return Routing(probs_TE, ids_TE, logits_TE, probs_TE)

        if cfg.router == "sigmoid_topk":
            scores_TE = logits_TE.sigmoid()
            probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
        elif cfg.router in ("topk_softmax", "noisy_topk"):
            scores_TE = logits_TE
            if cfg.router == "noisy_topk" and self.training:
                noise_std_TE = F.softplus(_router_logits(x_TD, self.noise_weight))
                scores_TE = logits_TE + torch.randn_like(logits_TE) * noise_std_TE
            probs_TE = logits_TE.softmax(dim=-1)
        else:  # softmax_topk
            scores_TE = logits_TE.softmax(dim=-1)
            probs_TE = scores_TE

        # Selection may use biased / group-masked scores; the weights always come from the
        # unbiased scores, so the bias steers load without entering the model's function.
        choice_TE = scores_TE.detach()
        if cfg.has_selection_bias:
            choice_TE = choice_TE + self.expert_bias
        if cfg.num_expert_groups > 1:
            choice_TE = self._mask_to_top_groups(choice_TE)
        ids_TK = choice_TE.topk(cfg.top_k, dim=-1).indices

        if cfg.router in ("topk_softmax", "noisy_topk"):
            weights_TK = scores_TE.gather(1, ids_TK).softmax(dim=-1)
        else:
            weights_TK = scores_TE.gather(1, ids_TK)
            if cfg.normalize_topk and cfg.top_k > 1:
                weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        if cfg.routed_scaling_factor != 1.0:
            weights_TK = weights_TK * cfg.routed_scaling_factor
        return Routing(weights_TK, ids_TK, logits_TE, probs_TE)

    def _mask_to_top_groups(self, choice_TE: Tensor) -> Tensor:
        """Keep only the experts of each token's `topk_groups` best groups (DeepSeek-V3).

        A group's score is the sum of its two best experts' scores ('top2_sum', DeepSeek-V3; 'auto'
        for sigmoid routing) or its best expert's score ('max', DeepSeek-V2; 'auto' otherwise), over
        whatever scores the router selects by (biased, for any scoring function).
        """
        cfg = self.config
        T, E, G = choice_TE.shape[0], cfg.num_experts, cfg.num_expert_groups
        grouped_TGe = choice_TE.view(T, G, E // G)
        top2 = cfg.group_score == "top2_sum" or (cfg.group_score == "auto" and cfg.router == "sigmoid_topk")
        if top2 and E // G >= 2:
            group_scores_TG = grouped_TGe.topk(2, dim=-1).values.sum(dim=-1)
        else:
            group_scores_TG = grouped_TGe.amax(dim=-1)
        top_groups_TG = group_scores_TG.topk(cfg.topk_groups, dim=-1).indices
        keep_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool).scatter_(1, top_groups_TG, True)
        keep_TE = keep_TG.unsqueeze(-1).expand(T, G, E // G).reshape(T, E)
        return choice_TE.masked_fill(~keep_TE, float("-inf"))

    def _apply(self, fn, recurse: bool = True):
        """`.to(bfloat16)` / `.half()` leave the balancing buffers in float32 (or wider): a selection
        bias rounded to bf16 flips near-tied choices (transformers keeps DeepSeek-V3's in float32
        too), and a bf16 token count stops counting at 256."""
        kept = {name: getattr(self, name) for name in ("expert_bias", "tokens_per_expert") if hasattr(self, name)}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = getattr(self, name)
            if after.dtype in (torch.float16, torch.bfloat16):
                wide = torch.empty_like(after, dtype=torch.float32) if before.is_meta or after.is_meta \
                    else before.to(device=after.device, dtype=torch.float32)
                setattr(self, name, wide)
        return self

    @torch.no_grad()
    def record_load(self, counts_E: Tensor) -> None:
        """Add one forward's per-expert assignment counts to the loss-free balancing state."""
        if self.config.bias_update_rate > 0 and self.training:
            self.tokens_per_expert += counts_E.to(self.tokens_per_expert.dtype)

    @torch.no_grad()
    def update_expert_bias(self) -> None:
        """bias += rate * sign(mean load - load), then reset the load (DeepSeek-V3, Wang et al. 2024)."""
        if self.config.bias_update_rate <= 0:
            return  # no bias, or a fixed one (selection_bias)
        load_E = self.tokens_per_expert
        if load_E.sum() > 0:
            self.expert_bias += self.config.bias_update_rate * torch.sign(load_E.mean() - load_E)
        load_E.zero_()


class ExpertChoiceRouter(nn.Module):
    """Each expert picks its top-C tokens by softmax score (Zhou et al. 2022, "Mixture-of-Experts
    with Expert Choice Routing"); C = ceil(capacity_factor * T * k / E), at most T."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.d_model))
        self.bias = None
        nn.init.normal_(self.weight, std=config.d_model**-0.5)

    def forward(self, x_TD: Tensor) -> Routing:
        logits_TE = _router_logits(x_TD, self.weight)
        probs_TE = logits_TE.softmax(dim=-1)
        capacity = min(self.config.expert_capacity(x_TD.shape[0]), x_TD.shape[0])
        weights_EC, ids_EC = probs_TE.t().topk(capacity, dim=-1)
        return Routing(weights_EC, ids_EC, logits_TE, probs_TE, expert_choice=True)


def build_router(config: MoEConfig) -> TokenChoiceRouter | ExpertChoiceRouter:
    """The router `config.router` names: expert choice, or a token-choice router."""
    if config.router == "expert_choice":
        return ExpertChoiceRouter(config)
    return TokenChoiceRouter(config)


# ---------------------------------------------------------------------------------------------
# Balancing losses: free functions of the router's outputs, so they can be tested by hand.


def load_balancing_loss(probs_TE: Tensor, counts_BE: Tensor) -> Tensor:
    """E * sum_e f_e * P_e, averaged over B groups of consecutive tokens.

    f_e is the fraction of the group's assignments that went to expert e, P_e the mean router
    probability of expert e over the group's tokens. With one group this is the Switch/GShard
    auxiliary loss (Fedus et al. 2021); with one group per sequence it is DeepSeek-V3's
    sequence-wise balance loss. It equals 1 for perfectly uniform routing.
    counts_BE must not carry gradient: only P_e does.
    """
    B, E = counts_BE.shape
    if probs_TE.shape[0] == 0:
        return probs_TE.new_zeros(())
    P_BE = probs_TE.view(B, -1, E).mean(dim=1)
    f_BE = counts_BE.float() / counts_BE.sum(dim=-1, keepdim=True).clamp_min(1)
    return E * (f_BE * P_BE).sum(dim=-1).mean()


def expert_counts_per_group(ids_TK: Tensor, num_experts: int, num_groups: int) -> Tensor:
    """(B, E) number of assignments of each group of T/B consecutive tokens to each expert."""
    T = ids_TK.shape[0]
    group_T = torch.arange(T, device=ids_TK.device) // max(T // num_groups, 1)
    flat = (group_T.unsqueeze(1) * num_experts + ids_TK).reshape(-1)
    return torch.bincount(flat, minlength=num_groups * num_experts).view(num_groups, num_experts)


def router_z_loss(logits_TE: Tensor) -> Tensor:
    """Mean squared log-partition of the router logits (Zoph et al. 2022, ST-MoE)."""
    if logits_TE.shape[0] == 0:
        return logits_TE.new_zeros(())
    return torch.logsumexp(logits_TE, dim=-1).square().mean()
