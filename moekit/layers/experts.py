"""Expert feed-forward networks, stored stacked over experts so they run as grouped GEMMs.

Shape suffixes: T tokens, P grouped rows (tokens sorted by expert, possibly padded), D d_model,
H hidden width, O output width, E experts, M = 2 for gated experts (gate and up halves), else 1.

Gated experts keep [gate | up] as the two halves of one projection (one GEMM instead of two).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}


class _GatedActivation(torch.autograd.Function):
    """act(gate) * up over h = [gate | up], writing both halves of the gradient into one buffer:
    autograd's backward of `chunk` concatenates them, a full extra copy of h every step."""

    @staticmethod
    def forward(ctx, h: Tensor, silu: bool) -> Tensor:
        gate, up = h.chunk(2, dim=-1)
        act = F.silu(gate) if silu else F.gelu(gate)
        ctx.save_for_backward(gate, up, act)
        ctx.silu = silu
        return act * up

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        gate, up, act = ctx.saved_tensors
        grad_h = grad.new_empty(*grad.shape[:-1], 2 * grad.shape[-1])
        grad_gate, grad_up = grad_h.chunk(2, dim=-1)
        torch.mul(grad, act, out=grad_up)
        if ctx.silu:
            torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=grad_gate)
        else:
            torch.ops.aten.gelu_backward.grad_input(grad * up, gate, grad_input=grad_gate)
        return grad_h, None


GATED = ("swiglu", "geglu", "clamped_swiglu")


def clamped_swiglu(h: Tensor, alpha: float, limit: float) -> Tensor:
    """GPT-OSS's gated activation over h = [gate | up]: gate clamped to <= limit, up to
    [-limit, limit], then gate * sigmoid(alpha * gate) * (up + 1)."""
    gate, up = h.chunk(2, dim=-1)
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(alpha * gate) * (up + 1)


def activate(h: Tensor, expert_type: str, activation: str, alpha: float = 1.702, limit: float = 7.0) -> Tensor:
    """The nonlinearity between the two projections. Gated types get [gate | up] along the last dim;
    `alpha` and `limit` are those of 'clamped_swiglu'."""
    if expert_type in ("swiglu", "geglu"):
        if not (h.requires_grad and torch.is_grad_enabled()):  # inference: the formula, no autograd node
            gate, up = h.chunk(2, dim=-1)
            return (F.silu(gate) if expert_type == "swiglu" else F.gelu(gate)) * up
        return _GatedActivation.apply(h, expert_type == "swiglu")
    if expert_type == "clamped_swiglu":
        return clamped_swiglu(h, alpha, limit)
    return _ACTIVATIONS[activation](h)


def _grouped_mm_supported(x: Tensor, w: Tensor) -> bool:
    # grouped_mm needs 16-byte aligned row strides for the input, weight and output.
    if any(dim * x.element_size() % 16 for dim in w.shape[1:]) or not x.is_contiguous():
        return False
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return False  # grouped_mm's meta kernel (used while tracing) accepts only bf16
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16, torch.float16)  # float64: the per-expert loop
    if x.device.type == "cuda":
        # The CUDA kernels take bf16 on sm80+ (see torch.nn.functional.grouped_mm).
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    return False


def grouped_matmul(x_PD: Tensor, w_EOD: Tensor, offsets_E: Tensor) -> Tensor:
    """Rows offsets[e-1]:offsets[e] of x times w[e].T, for every expert e: (P, D) -> (P, O).

    Every row of x must belong to a group (offsets[-1] == P): grouped_mm leaves rows past the
    last offset uninitialised.
    """
    if _grouped_mm_supported(x_PD, w_EOD):
        return F.grouped_mm(x_PD, w_EOD.transpose(-2, -1), offs=offsets_E)
    # Fallback (float32 on CUDA, odd widths): one matmul per expert. unbind() once, not w[e] in the loop,
    # so autograd does not build a full-size zero gradient for every expert slice.
    counts = torch.diff(offsets_E, prepend=offsets_E.new_zeros(1)).tolist()
    pieces = [x_e @ w_e.t() for x_e, w_e in zip(x_PD.split(counts), w_EOD.unbind(0), strict=True)]
    return torch.cat(pieces) if pieces else x_PD.new_zeros(0, w_EOD.shape[1])


class GroupedExperts(nn.Module):
    """E independent feed-forward experts with stacked weights.

    w_in (E, M*H, D) and w_out (E, O, H) are laid out like nn.Linear weights (out, in), per expert.
    A 'linear' expert has only w_in (E, O, D).
    """

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_ff: int,
        expert_type: str = "swiglu",
        activation: str = "gelu",
        bias: bool = False,
        d_out: int | None = None,
        swiglu_alpha: float = 1.702,
        swiglu_limit: float = 7.0,
    ) -> None:
        super().__init__()
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        self.expert_type, self.activation = expert_type, activation
        self.swiglu_alpha, self.swiglu_limit = swiglu_alpha, swiglu_limit
        self.d_out = d_out or d_model
        gated = expert_type in GATED
        if expert_type == "linear":
            self.w_in = nn.Parameter(torch.empty(num_experts, self.d_out, d_model))
            self.w_out = None
        else:
            self.w_in = nn.Parameter(torch.empty(num_experts, (2 if gated else 1) * d_ff, d_model))
            self.w_out = nn.Parameter(torch.empty(num_experts, self.d_out, d_ff))
        self.b_in = nn.Parameter(torch.empty(num_experts, self.w_in.shape[1])) if bias else None
        self.b_out = nn.Parameter(torch.empty(num_experts, self.d_out)) if bias and self.w_out is not None else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default, per expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        for weight, bias in ((self.w_in, self.b_in), (self.w_out, self.b_out)):
            if weight is None:
                continue
            bound = 1 / math.sqrt(weight.shape[-1])
            nn.init.uniform_(weight, -bound, bound)
            if bias is not None:
                nn.init.uniform_(bias, -bound, bound)

    def _activate(self, h: Tensor) -> Tensor:
        return activate(h, self.expert_type, self.activation, self.swiglu_alpha, self.swiglu_limit)

    def _weights(self, dtype: torch.dtype) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
        cast = lambda t: t if t is None or t.dtype == dtype else t.to(dtype)  # noqa: E731 (autocast-style cast)
        return cast(self.w_in), cast(self.b_in), cast(self.w_out), cast(self.b_out)

    def forward(self, x_PD: Tensor, offsets_E: Tensor) -> Tensor:
        """Grouped compute: x sorted by expert, expert e owning rows offsets[e-1]:offsets[e]."""
        w_in, b_in, w_out, b_out = self._weights(x_PD.dtype)
        expert_P = None
        if b_in is not None:
            rows = torch.arange(x_PD.shape[0], device=x_PD.device, dtype=offsets_E.dtype)
            expert_P = torch.searchsorted(offsets_E, rows, right=True)
        h_PH = grouped_matmul(x_PD, w_in, offsets_E)
        if b_in is not None:
            h_PH = h_PH + b_in.index_select(0, expert_P)
        if w_out is None:
            return h_PH
        h_PH = self._activate(h_PH)
        y_PO = grouped_matmul(h_PH, w_out, offsets_E)
        if b_out is not None:
            y_PO = y_PO + b_out.index_select(0, expert_P)
        return y_PO

    def forward_sparse(self, x_PD: Tensor, counts_E: list[int]) -> Tensor:
        """Sorted compute as `forward` (no padding), but only over the experts with rows, each as plain
        matmuls on its own weight slices: for a few rows (decoding), where a grouped kernel's per-group
        cost and padding outweigh the work. counts_E[e] rows of x belong to expert e, in order."""
        w_in, b_in, w_out, b_out = self._weights(x_PD.dtype)
        if torch.is_grad_enabled() and w_in.requires_grad:
            # Autograd's backward of w[e] is a full-size zero tensor per slice; unbind()'s is one stack.
            w_in, b_in, w_out, b_out = (None if w is None else w.unbind(0) for w in (w_in, b_in, w_out, b_out))
        pieces, start = [], 0
        for e, n in enumerate(counts_E):
            if n == 0:
                continue
            h_nH = F.linear(x_PD[start:start + n], w_in[e], None if b_in is None else b_in[e])
            if w_out is not None:
                h_nH = F.linear(self._activate(h_nH), w_out[e], None if b_out is None else b_out[e])
            pieces.append(h_nH)
            start += n
        if len(pieces) == 1:
            return pieces[0]
        return torch.cat(pieces) if pieces else x_PD.new_zeros(0, self.d_out)

    def forward_each(self, x_TD: Tensor, dtype: torch.dtype | None = None) -> list:
        """Per-expert callables, for the loop backend: experts[e](x_nD) -> (n, O)."""
        w_in, b_in, w_out, b_out = self._weights(dtype or x_TD.dtype)
        E = self.num_experts
        w_in_e, w_out_e = w_in.unbind(0), (w_out.unbind(0) if w_out is not None else [None] * E)
        b_in_e = b_in.unbind(0) if b_in is not None else [None] * E
        b_out_e = b_out.unbind(0) if b_out is not None else [None] * E

        def expert(e: int, x_nD: Tensor) -> Tensor:
            h = F.linear(x_nD, w_in_e[e], b_in_e[e])
            if w_out_e[e] is None:
                return h
            return F.linear(self._activate(h), w_out_e[e], b_out_e[e])

        return [lambda x_nD, e=e: expert(e, x_nD) for e in range(E)]

    def forward_dense(self, x_TD: Tensor) -> Tensor:
        """Every expert on every token: (T, D) -> (T, E, O). For few experts or soft routing."""
        w_in, b_in, w_out, b_out = self._weights(x_TD.dtype)
        h_TEH = torch.einsum("td,ehd->teh", x_TD, w_in)
        if b_in is not None:
            h_TEH = h_TEH + b_in
        if w_out is None:
            return h_TEH
        h_TEH = self._activate(h_TEH)
        y_TEO = torch.einsum("teh,eoh->teo", h_TEH, w_out)
        if b_out is not None:
            y_TEO = y_TEO + b_out
        return y_TEO


class FeedForward(nn.Module):
    """One dense FFN of the same kinds as the experts: the shared experts, or a dense transformer FFN."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        expert_type: str = "swiglu",
        activation: str = "gelu",
        bias: bool = False,
        d_out: int | None = None,
        swiglu_alpha: float = 1.702,
        swiglu_limit: float = 7.0,
    ) -> None:
        super().__init__()
        self.expert_type, self.activation = expert_type, activation
        self.swiglu_alpha, self.swiglu_limit = swiglu_alpha, swiglu_limit
        gated = expert_type in GATED
        d_out = d_out or d_model
        if expert_type == "linear":
            self.w_in, self.w_out = nn.Linear(d_model, d_out, bias=bias), None
        else:
            self.w_in = nn.Linear(d_model, (2 if gated else 1) * d_ff, bias=bias)
            self.w_out = nn.Linear(d_ff, d_out, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.w_in(x)
        if self.w_out is None:
            return h
        return self.w_out(activate(h, self.expert_type, self.activation, self.swiglu_alpha, self.swiglu_limit))
