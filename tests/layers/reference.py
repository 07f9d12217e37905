"""A plain, per-token reference MoE written for the tests, independent of moekit's vectorised code.

It reads the parameters of a `moekit.MoE` and recomputes its function one token and one expert at a
time, with the routing rules written out the way the papers state them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def ffn_forward(x_D, w_in, b_in, w_out, b_out, kind: str, activation: str,
                alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """One feed-forward expert on one token, from the formulas (gated halves are [gate | up])."""
    h = w_in @ x_D
    if b_in is not None:
        h = h + b_in
    if w_out is None:
        return h
    if kind == "clamped_swiglu":  # GPT-OSS, element by element
        half = h.shape[0] // 2
        out = []
        for j in range(half):
            gate, up = torch.clamp(h[j], max=limit), torch.clamp(h[half + j], -limit, limit)
            out.append(gate * torch.sigmoid(alpha * gate) * (up + 1))
        h = torch.stack(out)
    elif kind in ("swiglu", "geglu"):
        half = h.shape[0] // 2
        gate = F.silu(h[:half]) if kind == "swiglu" else F.gelu(h[:half])
        h = gate * h[half:]
    else:
        h = {"relu": torch.relu, "gelu": F.gelu, "silu": F.silu}[activation](h)
    y = w_out @ h
    if b_out is not None:
        y = y + b_out
    return y


def expert_forward(moe, e: int, x_D: torch.Tensor) -> torch.Tensor:
    """Expert e of a moekit GroupedExperts on one token."""
    ex = moe.experts
    pick = lambda p: None if p is None else p[e]  # noqa: E731
    return ffn_forward(x_D, ex.w_in[e], pick(ex.b_in), pick(ex.w_out), pick(ex.b_out), ex.expert_type, ex.activation,
                       ex.swiglu_alpha, ex.swiglu_limit)


def shared_forward(moe, x_D: torch.Tensor) -> torch.Tensor:
    sh, cfg = moe.shared_experts, moe.config
    w_out = sh.w_out.weight if sh.w_out is not None else None
    b_out = sh.w_out.bias if sh.w_out is not None else None
    return ffn_forward(x_D, sh.w_in.weight, sh.w_in.bias, w_out, b_out, cfg.expert_type, cfg.activation,
                       cfg.swiglu_alpha, cfg.swiglu_limit)


def token_routing(moe, x_D: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """[(expert, weight)] chosen by one token under a token-choice router."""
    cfg = moe.config
    E, K = cfg.num_experts, cfg.top_k
    dtype = torch.float64 if x_D.dtype == torch.float64 else torch.float32
    logits = moe.router.weight.to(dtype) @ x_D.to(dtype)
    if getattr(moe.router, "bias", None) is not None:  # a learned router bias (GPT-OSS)
        logits = logits + moe.router.bias.to(dtype)
    bias = getattr(moe.router, "expert_bias", torch.zeros(E))  # selection only
    if cfg.router == "soft":
        probs = torch.softmax(logits, dim=0)
        return [(e, probs[e]) for e in range(E)]
    if cfg.router == "sigmoid_topk":
        scores = torch.sigmoid(logits)
    elif cfg.router == "softmax_topk":
        scores = torch.softmax(logits, dim=0)
    else:  # topk_softmax / noisy_topk in eval mode
        scores = logits
    choice = [float(scores[e].detach()) + float(bias[e]) for e in range(E)]
    allowed = set(range(E))
    if cfg.num_expert_groups > 1:
        size = E // cfg.num_expert_groups
        group_scores = []
        for g in range(cfg.num_expert_groups):
            members = sorted((choice[e] for e in range(g * size, (g + 1) * size)), reverse=True)
            top2 = cfg.group_score == "top2_sum" or (cfg.group_score == "auto" and cfg.router == "sigmoid_topk")
            best = members[0] + members[1] if top2 and size >= 2 else members[0]
            group_scores.append((best, g))
        top_groups = [g for _, g in sorted(group_scores, key=lambda s: -s[0])[: cfg.topk_groups]]
        allowed = {e for g in top_groups for e in range(g * size, (g + 1) * size)}
    chosen = sorted(allowed, key=lambda e: -choice[e])[:K]
    if cfg.router in ("topk_softmax", "noisy_topk"):
        weights = torch.softmax(torch.stack([scores[e] for e in chosen]), dim=0)
    else:
        weights = torch.stack([scores[e] for e in chosen])
        if cfg.normalize_topk and K > 1:
            weights = weights / (weights.sum() + 1e-20)
    weights = weights * cfg.routed_scaling_factor
    return list(zip(chosen, weights, strict=True))


def reference_moe(moe, x: torch.Tensor):
    """(output like x, expert counts list, dropped count) of `moe` computed token by token."""
    cfg = moe.config
    E = cfg.num_experts
    x_TD = x.reshape(-1, cfg.d_model)
    T = x_TD.shape[0]
    # assignments[e] = list of (token, weight, flat index t*K+k) for expert e
    assignments: list[list] = [[] for _ in range(E)]
    if cfg.router == "expert_choice":
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        logits = torch.stack([moe.router.weight.to(dtype) @ x_TD[t].to(dtype) for t in range(T)]) if T else None
        probs = torch.softmax(logits, dim=1) if T else None
        capacity = min(math.ceil((cfg.capacity_factor or 1.0) * T * cfg.top_k / E), T)
        for e in range(E):
            order = sorted(range(T), key=lambda t: (-float(probs[t, e].detach()), t))[:capacity]
            assignments[e] = [(t, probs[t, e], None) for t in order]
        chosen_tokens = {t for e in range(E) for t, _, _ in assignments[e]}
        dropped = T - len(chosen_tokens)
    else:
        for t in range(T):
            for k, (e, w) in enumerate(token_routing(moe, x_TD[t])):
                assignments[e].append((t, w, t * cfg.experts_per_token + k))
        dropped = 0
        if cfg.capacity_factor is not None:
            capacity = math.ceil(cfg.capacity_factor * T * cfg.top_k / E)
            for e in range(E):
                ranked = sorted(assignments[e], key=lambda a: (-float(a[1].detach()), a[2]))
                dropped += max(len(ranked) - capacity, 0)
                assignments[e] = ranked[:capacity]

    width = cfg.d_out or cfg.d_model
    rows = [torch.zeros(width, dtype=x.dtype) for _ in range(T)]
    for e in range(E):
        for t, w, _ in assignments[e]:
            if isinstance(moe.experts, torch.nn.ModuleList):
                y = moe.experts[e](x_TD[t : t + 1])
                y = (y.hidden_states if hasattr(y, "hidden_states") else y)[0]
            else:
                y = expert_forward(moe, e, x_TD[t])
            rows[t] = rows[t] + w.to(x.dtype) * y
    if moe.shared_experts is not None:
        for t in range(T):
            s = shared_forward(moe, x_TD[t])
            if moe.shared_gate is not None:
                s = s * torch.sigmoid(moe.shared_gate.weight[0] @ x_TD[t])
            rows[t] = rows[t] + s
    out = torch.stack(rows).view(*x.shape[:-1], width) if T else x.new_zeros(*x.shape[:-1], width)
    counts = [len(a) for a in assignments]
    return out, counts, dropped
