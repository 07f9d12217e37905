"""The sparse Mixture-of-Experts layer: router -> dispatch -> experts -> combine (+ shared experts).

Shape suffixes: T tokens (all leading dims flattened), D d_model, E experts, K experts per token,
C tokens per expert (expert choice), P grouped rows, B sequences.

References: Shazeer et al. 2017 (sparsely-gated MoE); Lepikhin et al. 2020 (GShard) and Fedus et
al. 2021 (Switch) for capacity and the auxiliary loss; Zoph et al. 2022 (ST-MoE) for the z-loss;
Dai et al. 2024 (DeepSeekMoE) for shared and fine-grained experts; DeepSeek-AI 2024 (DeepSeek-V3)
for sigmoid routing, group-limited routing and auxiliary-loss-free balancing; Zhou et al. 2022 for
expert-choice routing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor, nn

from moekit.layers.config import MoEConfig
from moekit.layers.dispatch import (
    capacity_keep_mask,
    combine_expert_choice,
    combine_token_choice,
    gather_tokens,
    sort_by_expert,
)
from moekit.layers.experts import FeedForward, GroupedExperts
from moekit.layers.routers import (
    Routing,
    build_router,
    expert_counts_per_group,
    load_balancing_loss,
    router_z_loss,
)


class TokenDispatcher(Protocol):
    """Where the routed experts of a token-choice `MoE` run, when not on this device.

    `token_choice` replaces the local capacity -> sort -> experts -> combine path and returns
    (out_TD, expert_counts_E, dropped_tokens, nested_aux_loss); `balancing_losses` returns the
    enabled balancing losses (unweighted, by name) computed over every token the dispatcher serves.
    """

    def token_choice(
        self, moe: MoE, x_TD: Tensor, routing: Routing
    ) -> tuple[Tensor, Tensor, int, Tensor | None]:
        ...

    def balancing_losses(self, moe: MoE, routing: Routing, input_shape: torch.Size) -> dict[str, Tensor]:
        ...


@dataclass
class MoEOutput:
    hidden_states: Tensor
    """Same shape and dtype as the input (last dim d_out when the config sets it)."""
    aux_loss: Tensor
    """Scalar: the coefficient-weighted sum of the enabled balancing losses (0 when none)."""
    router_logits: Tensor
    """(T, E) float32 router logits, T = number of input tokens."""
    expert_counts: Tensor
    """(E,) int64: token assignments each expert processed (after capacity drops)."""
    dropped_tokens: int
    """Token-expert assignments dropped by capacity (expert choice: tokens no expert chose)."""
    losses: dict[str, Tensor] = field(default_factory=dict)
    """The enabled balancing losses, unweighted, by name, for logging."""


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype experts compute in: the autocast dtype when autocast is on, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def group_align(x: Tensor) -> int:
    """Rows per expert group are padded to this multiple (see `sort_by_expert`)."""
    if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
        return 32
    return 1


def sparse_crossover(x: Tensor, num_experts: int) -> int:
    """Below this many token-expert assignments, backend 'auto' runs 'sparse' (plain matmuls on the
    weight slices of the experts hit) rather than 'grouped' (sort, grouped GEMM). Only CPU bf16/fp16
    has one: there the grouped path pads every expert's rows to 32 (`group_align`), which a few
    tokens pay for many times over. In float32 it pads nothing, and 'grouped' measured as fast as
    'sparse' or faster at every token count from 1 (docs/results/hf_speed.md, "Layer paths"); on
    accelerators 'grouped' runs without host syncs."""
    if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
        return SPARSE_CROSSOVER_LOW_PRECISION * num_experts
    return 0


SPARSE_CROSSOVER_LOW_PRECISION = 16  # assignments per expert, CPU bf16: below ~16 rows


class MoE(nn.Module):
    """A drop-in replacement for a transformer FFN: `MoE(MoEConfig(...))(x).hidden_states`.

    `experts`, if given, replaces the stacked experts with any modules mapping (n, D) -> (n, D),
    including other `MoE` layers (a hierarchical MoE; their aux losses are added to this one's).
    Such experts always run with the loop backend.
    """

    def __init__(self, config: MoEConfig, experts: Sequence[nn.Module] | None = None) -> None:
        super().__init__()
        self.config = config
        self.router = build_router(config)
        if experts is not None:
            if len(experts) != config.num_experts:
                raise ValueError(f"got {len(experts)} expert modules for num_experts={config.num_experts}")
            self.experts: nn.Module = nn.ModuleList(experts)
        else:
            self.experts = GroupedExperts(
                config.num_experts, config.d_model, config.d_ff, config.expert_type,
                config.activation, config.expert_bias, config.d_out, config.swiglu_alpha, config.swiglu_limit,
            )
        # None: the experts run here. `moekit.distributed.parallelize_experts` installs an
        # expert-parallel dispatcher (a plain object, not a module: it holds process groups).
        self.dispatcher: TokenDispatcher | None = None
        self.shared_experts = None
        self.shared_gate = None
        if config.num_shared_experts > 0:
            # N shared experts of width h sum to one FFN of width N*h: one matmul instead of N.
            self.shared_experts = FeedForward(
                config.d_model, config.shared_width, config.expert_type, config.activation, config.expert_bias,
                config.d_out, config.swiglu_alpha, config.swiglu_limit,
            )
            if config.shared_expert_gate:
                self.shared_gate = nn.Linear(config.d_model, 1, bias=False)

    @property
    def backend(self) -> str:
        """The backend for large batches: the configured one, with 'auto' resolved to 'dense' (soft
        routing) or 'grouped'. `path` gives the one a forward actually takes."""
        cfg = self.config
        if isinstance(self.experts, nn.ModuleList):
            return "loop"
        if cfg.backend != "auto":
            return cfg.backend
        return "dense" if cfg.router == "soft" else "grouped"

    def path(self, num_assignments: int, x: Tensor) -> str:
        """The backend a forward with `num_assignments` token-expert pairs (expert choice: E * C) takes:
        'auto' picks 'sparse' below the measured crossover of `sparse_crossover`, else `backend`."""
        backend = self.backend
        if self.config.backend == "auto" and backend == "grouped" \
                and num_assignments < sparse_crossover(x, self.config.num_experts):
            return "sparse"
        return backend

    def forward(self, x: Tensor) -> MoEOutput:
        cfg = self.config
        if x.dim() == 0 or x.shape[-1] != cfg.d_model:
            raise ValueError(f"MoE expected input of shape (..., d_model={cfg.d_model}), got {tuple(x.shape)}")
        x_TD = x.reshape(-1, cfg.d_model)
        routing = self.router(x_TD)
        x_TD = x_TD.to(_compute_dtype(x))

        if routing.expert_choice:
            out_TD, counts_E, dropped, nested_aux = self._experts_expert_choice(x_TD, routing)
        else:
            out_TD, counts_E, dropped, nested_aux = self._experts_token_choice(x_TD, routing)

        if self.shared_experts is not None:
            shared_TD = self.shared_experts(x_TD)
            if self.shared_gate is not None:
                shared_TD = shared_TD * torch.sigmoid(self.shared_gate(x_TD))
            out_TD = out_TD + shared_TD

        aux_loss, losses = self._balancing_losses(routing, x.shape)
        if nested_aux is not None:
            aux_loss = aux_loss + nested_aux
        if not routing.expert_choice:
            self.router.record_load(counts_E)
        return MoEOutput(
            hidden_states=out_TD.to(x.dtype).view(*x.shape[:-1], cfg.output_width),
            aux_loss=aux_loss,
            router_logits=routing.logits_TE,
            expert_counts=counts_E,
            dropped_tokens=dropped,
            losses=losses,
        )

    # --- expert computation -------------------------------------------------------------------

    def _experts_token_choice(self, x_TD: Tensor, routing: Routing) -> tuple[Tensor, Tensor, int, Tensor | None]:
        if self.dispatcher is not None:
            return self.dispatcher.token_choice(self, x_TD, routing)
        cfg, E = self.config, self.config.num_experts
        weights_TK, ids_TK = routing.weights, routing.ids
        capacity = cfg.expert_capacity(x_TD.shape[0])
        kept_TK = None
        dropped = 0
        if capacity is not None:
            kept_TK = capacity_keep_mask(weights_TK, ids_TK, E, capacity)
            weights_TK = weights_TK * kept_TK  # a dropped token keeps only its residual/shared path
            dropped = int((~kept_TK).sum())

        backend = self.path(ids_TK.numel(), x_TD)
        if backend == "grouped":
            dispatch = sort_by_expert(ids_TK, kept_TK, E, align=group_align(x_TD))
            y_PD = self.experts(gather_tokens(x_TD, dispatch), dispatch.offsets_E)
            return combine_token_choice(y_PD, dispatch, weights_TK), dispatch.counts_E, dropped, None
        if backend == "sparse":
            dispatch = sort_by_expert(ids_TK, kept_TK, E)
            y_PD = self.experts.forward_sparse(gather_tokens(x_TD, dispatch), dispatch.counts_E.tolist())
            return combine_token_choice(y_PD, dispatch, weights_TK), dispatch.counts_E, dropped, None

        kept_ids_TK = ids_TK if kept_TK is None else ids_TK.masked_fill(~kept_TK, E)
        counts_E = torch.bincount(kept_ids_TK.reshape(-1), minlength=E + 1)[:E]
        if backend == "dense":
            # (T, E) weights with zeros for unchosen (and dropped) experts.
            dense_TE = torch.zeros(x_TD.shape[0], E, dtype=weights_TK.dtype, device=x_TD.device)
            dense_TE = dense_TE.scatter_add(1, ids_TK, weights_TK)
            y_TED = self.experts.forward_dense(x_TD)
            return torch.einsum("te,ted->td", dense_TE.to(y_TED.dtype), y_TED), counts_E, dropped, None

        # loop: the plain per-expert loop, the reference the other backends are tested against.
        out_TD = x_TD.new_zeros(x_TD.shape[0], cfg.output_width)
        nested_aux = None
        for e, expert in enumerate(self._expert_callables(x_TD)):
            token_n, slot_n = torch.nonzero(kept_ids_TK == e, as_tuple=True)
            y_nD, aux = self._call_expert(expert, x_TD.index_select(0, token_n))
            nested_aux = aux if nested_aux is None else (nested_aux if aux is None else nested_aux + aux)
            weight_n1 = weights_TK[token_n, slot_n].unsqueeze(-1).to(y_nD.dtype)
            out_TD = out_TD.index_add(0, token_n, y_nD * weight_n1)
        return out_TD, counts_E, dropped, nested_aux

    def _experts_expert_choice(self, x_TD: Tensor, routing: Routing) -> tuple[Tensor, Tensor, int, Tensor | None]:
        E, T = self.config.num_experts, x_TD.shape[0]
        weights_EC, token_EC = routing.weights, routing.ids
        C = token_EC.shape[1]
        counts_E = torch.full((E,), C, dtype=torch.long, device=x_TD.device)
        chosen_T = torch.zeros(T, dtype=torch.bool, device=x_TD.device)
        dropped = T - int(chosen_T.index_fill_(0, token_EC.reshape(-1), True).sum())

        backend = self.path(token_EC.numel(), x_TD)
        if backend in ("grouped", "sparse"):
            token_P = token_EC.reshape(-1)
            x_PD = x_TD.index_select(0, token_P)
            if backend == "sparse":
                y_PD = self.experts.forward_sparse(x_PD, [C] * E)
            else:
                y_PD = self.experts(x_PD, torch.arange(1, E + 1, device=x_TD.device, dtype=torch.int32) * C)
            return combine_expert_choice(y_PD, token_P, weights_EC.reshape(-1), T), counts_E, dropped, None
        if backend == "dense":
            dense_TE = torch.zeros(T, E, dtype=weights_EC.dtype, device=x_TD.device)
            dense_TE = dense_TE.index_put(
                (token_EC, torch.arange(E, device=x_TD.device).unsqueeze(1).expand_as(token_EC)), weights_EC
            )
            y_TED = self.experts.forward_dense(x_TD)
            return torch.einsum("te,ted->td", dense_TE.to(y_TED.dtype), y_TED), counts_E, dropped, None

        out_TD = x_TD.new_zeros(T, self.config.output_width)
        nested_aux = None
        for e, expert in enumerate(self._expert_callables(x_TD)):
            y_CD, aux = self._call_expert(expert, x_TD.index_select(0, token_EC[e]))
            nested_aux = aux if nested_aux is None else (nested_aux if aux is None else nested_aux + aux)
            out_TD = out_TD.index_add(0, token_EC[e], y_CD * weights_EC[e].unsqueeze(-1).to(y_CD.dtype))
        return out_TD, counts_E, dropped, nested_aux

    def _expert_callables(self, x_TD: Tensor) -> Sequence:
        if isinstance(self.experts, nn.ModuleList):
            return list(self.experts)
        return self.experts.forward_each(x_TD)

    @staticmethod
    def _call_expert(expert, x_nD: Tensor) -> tuple[Tensor, Tensor | None]:
        y = expert(x_nD)
        if isinstance(y, MoEOutput):  # a nested MoE
            return y.hidden_states, y.aux_loss
        return y, None

    # --- balancing ----------------------------------------------------------------------------

    def _balancing_losses(self, routing: Routing, input_shape: torch.Size) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.config
        if self.dispatcher is not None:  # statistics over every token the dispatcher serves
            losses = self.dispatcher.balancing_losses(self, routing, input_shape)
        else:
            losses = self._local_balancing_losses(routing, input_shape)

        coefs = {"aux_loss": cfg.aux_loss_coef, "seq_aux_loss": cfg.seq_aux_loss_coef, "z_loss": cfg.z_loss_coef}
        aux_loss = routing.logits_TE.new_zeros(())
        for name, value in losses.items():
            aux_loss = aux_loss + coefs[name] * value
        return aux_loss, losses

    def _local_balancing_losses(self, routing: Routing, input_shape: torch.Size) -> dict[str, Tensor]:
        cfg, E = self.config, self.config.num_experts
        losses: dict[str, Tensor] = {}
        if cfg.aux_loss_coef > 0 or cfg.seq_aux_loss_coef > 0:
            if routing.expert_choice:
                ids_TK = None  # every expert takes exactly C tokens: f is uniform
                counts_1E = torch.full((1, E), routing.ids.shape[1], device=routing.ids.device)
            else:
                ids_TK = routing.ids
                counts_1E = torch.bincount(ids_TK.reshape(-1), minlength=E).unsqueeze(0)
            if cfg.aux_loss_coef > 0:
                losses["aux_loss"] = load_balancing_loss(routing.probs_TE, counts_1E)
            if cfg.seq_aux_loss_coef > 0:
                T = routing.probs_TE.shape[0]
                seq_len = input_shape[-2] if len(input_shape) >= 3 else T
                num_seqs = T // seq_len if seq_len else 0
                if ids_TK is None:
                    counts_BE = counts_1E.expand(max(num_seqs, 1), E)
                else:
                    counts_BE = expert_counts_per_group(ids_TK, E, max(num_seqs, 1))
                losses["seq_aux_loss"] = load_balancing_loss(routing.probs_TE, counts_BE)
        if cfg.z_loss_coef > 0:
            losses["z_loss"] = router_z_loss(routing.logits_TE)
        return losses

    @torch.no_grad()
    def update_expert_bias(self) -> None:
        """Loss-free balancing step: call after each optimizer step (see `moekit.train.balancing`)."""
        if hasattr(self.router, "update_expert_bias"):
            self.router.update_expert_bias()
