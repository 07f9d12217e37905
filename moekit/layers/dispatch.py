"""Token reordering: sort token-expert assignments by expert for grouped GEMMs, then put them back.

Shape suffixes: T tokens, K experts per token, A = T*K assignments, P grouped rows (kept
assignments sorted by expert, each expert's rows padded to a multiple of `align`), D width,
E experts, C tokens per expert (expert choice).

Nothing here builds a (T, E, D) tensor or a (T, E, C) dispatch mask: the cost is a sort of A
integers and gathers of A rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def capacity_keep_mask(weights_TK: Tensor, ids_TK: Tensor, num_experts: int, capacity: int) -> Tensor:
    """(T, K) bool: the assignments each expert keeps when it takes at most `capacity`.

    Each expert keeps its highest-weight assignments; ties go to the earlier token.
    """
    A = ids_TK.numel()
    ids_A = ids_TK.reshape(-1)
    by_weight_A = weights_TK.detach().reshape(-1).argsort(descending=True, stable=True)
    perm_A = by_weight_A[ids_A[by_weight_A].argsort(stable=True)]  # by expert, then weight desc
    counts_E = torch.bincount(ids_A, minlength=num_experts)
    starts_E = counts_E.cumsum(0) - counts_E
    rank_A = torch.arange(A, device=ids_A.device) - starts_E[ids_A[perm_A]]
    kept_A = torch.empty(A, dtype=torch.bool, device=ids_A.device)
    kept_A[perm_A] = rank_A < capacity
    return kept_A.view_as(ids_TK)


@dataclass
class Dispatch:
    """Where each assignment goes in the expert-sorted row layout."""

    token_P: Tensor
    """(P,) the token feeding each grouped row (padding rows repeat token 0)."""
    row_A: Tensor
    """(A,) the grouped row holding each assignment (a dropped one points at row 0)."""
    offsets_E: Tensor
    """(E,) int32 end row of each expert's (padded) group, for grouped_mm."""
    counts_E: Tensor
    """(E,) int64 assignments each expert processes, without padding."""
    dropless: bool = True
    """Every assignment kept: each grouped row serves at most one assignment."""


def sort_by_expert(ids_TK: Tensor, kept_TK: Tensor | None, num_experts: int, align: int = 1) -> Dispatch:
    """Group the kept assignments by expert (stable: token order within an expert).

    `align` > 1 pads each expert's group to a multiple of `align` rows: on CPU, grouped_mm runs one
    matmul per group and low-precision kernels are re-planned for every new row count.
    """
    T, K = ids_TK.shape
    A, E, device = T * K, num_experts, ids_TK.device
    key_A = ids_TK.reshape(-1)
    if kept_TK is not None:
        key_A = key_A.masked_fill(~kept_TK.reshape(-1), E)  # dropped: a bucket past the last expert
    perm_A = key_A.argsort(stable=True)
    counts_E = torch.bincount(key_A, minlength=E + 1)[:E]

    if align == 1 and kept_TK is None:
        # Dropless, unpadded: the grouped rows are exactly the sorted assignments.
        row_A = torch.empty_like(perm_A).scatter_(0, perm_A, torch.arange(A, device=device))
        return Dispatch(perm_A // K, row_A, counts_E.cumsum(0).to(torch.int32), counts_E)

    padded_E = (counts_E + align - 1) // align * align
    padded_end_E = padded_E.cumsum(0)
    num_rows = int(padded_end_E[-1]) if E else 0  # one host sync: grouped_mm needs exact rows
    sorted_key_A = key_A[perm_A]
    kept_sorted_A = sorted_key_A < E
    safe_key_A = sorted_key_A.clamp_max(E - 1)
    rank_A = torch.arange(A, device=device) - (counts_E.cumsum(0) - counts_E)[safe_key_A]
    row_sorted_A = torch.where(kept_sorted_A, (padded_end_E - padded_E)[safe_key_A] + rank_A, 0)
    token_P = torch.zeros(num_rows, dtype=torch.long, device=device)
    token_P[row_sorted_A[kept_sorted_A]] = (perm_A // K)[kept_sorted_A]
    row_A = torch.empty_like(perm_A).scatter_(0, perm_A, row_sorted_A)
    return Dispatch(token_P, row_A, padded_end_E.to(torch.int32), counts_E, dropless=kept_TK is None)


# Autograd's backward of a row gather is a scatter-add through a (rows x D) index tensor: ~4x slower
# on CPU than the two gathers below, which use what a dropless dispatch guarantees (each grouped row
# serves one assignment, each token K of them). Both are exact, and deterministic on every device.


class _GatherTokenRows(torch.autograd.Function):
    """x_P = x[token_P]; backward: grad_x[t] = sum_k grad_P[row of (t, k)] (padding rows unused)."""

    @staticmethod
    def forward(ctx, x_TD: Tensor, token_P: Tensor, row_A: Tensor) -> Tensor:
        ctx.save_for_backward(row_A)
        ctx.num_tokens = x_TD.shape[0]
        return x_TD.index_select(0, token_P)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_PD: Tensor):
        (row_A,) = ctx.saved_tensors
        T, D = ctx.num_tokens, grad_PD.shape[-1]
        grad_TD = grad_PD.index_select(0, row_A).view(T, -1 if T else 1, D).sum(dim=1)
        return grad_TD, None, None


class _GatherAssignmentRows(torch.autograd.Function):
    """y_A = y[row_A] with row_A injective; backward: grad_y[row_A] = grad_A, zero elsewhere."""

    @staticmethod
    def forward(ctx, y_PD: Tensor, row_A: Tensor) -> Tensor:
        ctx.save_for_backward(row_A)
        ctx.num_rows = y_PD.shape[0]
        return y_PD.index_select(0, row_A)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_AD: Tensor):
        (row_A,) = ctx.saved_tensors
        return grad_AD.new_zeros(ctx.num_rows, grad_AD.shape[-1]).index_copy_(0, row_A, grad_AD), None


def _needs_grad(x: Tensor) -> bool:
    return x.requires_grad and torch.is_grad_enabled()


def gather_tokens(x_TD: Tensor, dispatch: Dispatch) -> Tensor:
    """(T, D) -> (P, D): each grouped row's token."""
    if dispatch.dropless and _needs_grad(x_TD):
        return _GatherTokenRows.apply(x_TD, dispatch.token_P, dispatch.row_A)
    return x_TD.index_select(0, dispatch.token_P)


def combine_token_choice(y_PD: Tensor, dispatch: Dispatch, weights_TK: Tensor) -> Tensor:
    """out[t] = sum_k weights[t, k] * y[row of (t, k)]: (P, D) -> (T, D).

    A gather and a batched (1 x K) @ (K x D) product rather than a scatter-add, so the sum order is
    fixed and the result deterministic on every device. Dropped assignments must have weight 0.
    """
    T, K = weights_TK.shape
    if dispatch.dropless and _needs_grad(y_PD):
        y_AD = _GatherAssignmentRows.apply(y_PD, dispatch.row_A)
    else:
        y_AD = y_PD.index_select(0, dispatch.row_A)
    y_TKD = y_AD.view(T, K, y_PD.shape[-1])  # not -1: T may be 0
    return torch.bmm(weights_TK.to(y_PD.dtype).unsqueeze(1), y_TKD).squeeze(1)


def combine_expert_choice(y_PD: Tensor, token_P: Tensor, weights_P: Tensor, num_tokens: int) -> Tensor:
    """out[t] = sum over the rows p of token t of weights[p] * y[p]: (P, D) -> (T, D).

    Under expert choice a token may be picked by any number of experts, so this one scatters.
    """
    out_TD = y_PD.new_zeros(num_tokens, y_PD.shape[-1])
    return out_TD.index_add(0, token_P, y_PD * weights_P.to(y_PD.dtype).unsqueeze(-1))
