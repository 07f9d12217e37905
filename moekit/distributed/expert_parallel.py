"""Expert parallelism: each rank of a group of P holds E/P experts, and tokens travel to them.

Shape suffixes: T local tokens, K experts per token, E experts, L = E/P experts on this rank,
A = T*K local assignments (sorted by expert, so grouped by destination rank), N assignments this
rank's experts receive from the whole group, P ranks of the expert-parallel group, D d_model.

Applied to an already-built model (torchtitan's layering): `parallelize_experts(model, groups)`
slices every `MoE`'s `GroupedExperts` on dim 0 and installs an `AllToAllDispatcher`, which
replaces the layer's local capacity -> sort -> experts -> combine path with

    counts:  all_gather of each rank's (E,) assignment counts and token count (one small message;
             it gives the all-to-all split sizes *and* the group-wide statistics)
    tokens:  sort by expert -> all_to_all_single -> group by local expert -> GroupedExperts
             (the same grouped_mm kernel) -> all_to_all_single back -> weighted combine.

Equivalence with one device holding the group's tokens concatenated in rank order:
- capacity = expert_capacity(all the group's tokens), and each expert keeps its best assignments
  over the whole group (the owner sees them all, in global token order, so ties break the same);
- `expert_counts`, `dropped_tokens`, the loss-free bias loads and the aux/seq-aux/z losses are the
  group-wide ones on every rank;
- gradients: after `sync_gradients` (dense: mean over all ranks; experts: sum over the replicas of
  the shard / world size) they are those of the mean of the ranks' losses, i.e. of the
  single-device loss when every rank holds the same number of tokens.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.nn.parallel import DistributedDataParallel

from moekit.layers.dispatch import capacity_keep_mask, combine_token_choice, sort_by_expert
from moekit.layers.experts import GroupedExperts
from moekit.layers.moe import MoE, group_align
from moekit.layers.routers import Routing, expert_counts_per_group, load_balancing_loss

_EXPERT_PARAMS = ("w_in", "b_in", "w_out", "b_out")


# ---------------------------------------------------------------------------------------------
# Process groups


@dataclass
class ExpertParallelGroups:
    """The process groups of expert parallelism inside a data-parallel world.

    Ranks are laid out as R replicas of P consecutive ranks: rank = replica * P + ep_rank. The
    expert-parallel group {replica*P .. replica*P + P-1} shares one copy of all experts; the replica
    group {ep_rank, ep_rank + P, ...} holds copies of the same shard and averages its gradients.
    """

    world_size: int
    rank: int
    ep_size: int
    ep_group: dist.ProcessGroup | None
    replica_group: dist.ProcessGroup | None

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep_size

    @property
    def num_replicas(self) -> int:
        return self.world_size // self.ep_size

    @property
    def replica_rank(self) -> int:
        return self.rank // self.ep_size


def init_expert_parallel(ep_size: int) -> ExpertParallelGroups:
    """Build the expert-parallel and replica groups; call on every rank after `init_process_group`."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("expert parallelism needs torch.distributed: call init_process_group first "
                           "(or launch with torchrun)")
    world, rank = dist.get_world_size(), dist.get_rank()
    if not isinstance(ep_size, int) or ep_size < 1:
        raise ValueError(f"expert_parallel must be a positive integer (got {ep_size!r})")
    if world % ep_size:
        raise ValueError(f"world size {world} is not divisible by expert_parallel={ep_size}")
    ep_group = replica_group = None
    # new_group must be called by every rank for every group, in the same order.
    for replica in range(world // ep_size):
        group = dist.new_group(list(range(replica * ep_size, (replica + 1) * ep_size)))
        if rank // ep_size == replica:
            ep_group = group
    for shard in range(ep_size):
        group = dist.new_group(list(range(shard, world, ep_size)))
        if rank % ep_size == shard:
            replica_group = group
    return ExpertParallelGroups(world, rank, ep_size, ep_group, replica_group)


# ---------------------------------------------------------------------------------------------
# Differentiable collectives


def _exchange(x: Tensor, out_splits: list[int], in_splits: list[int], group, meter) -> Tensor:
    start = time.perf_counter()
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    if meter is not None:  # wall time, including waiting for the slowest rank
        meter.comm_seconds += time.perf_counter() - start
    return out


class _AllToAll(torch.autograd.Function):
    """all_to_all_single along dim 0; the backward sends the gradients back the way they came."""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int], group, meter) -> Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group, ctx.meter = out_splits, in_splits, group, meter
        return _exchange(x, out_splits, in_splits, group, meter)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _exchange(grad, ctx.in_splits, ctx.out_splits, ctx.group, ctx.meter), None, None, None, None


def _all_gather(x_N: Tensor, group, size: int) -> Tensor:
    """(N,) from each of the `size` ranks -> (size, N), in rank order (not differentiable)."""
    out = x_N.new_empty(size * x_N.numel())
    dist.all_gather_single(out, x_N.contiguous(), group=group)
    return out.view(size, -1)


def all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group, meter=None) -> Tensor:
    """Send rows in_splits[i] of x to rank i; receive out_splits[i] rows from rank i (differentiable).

    `meter`, if given, gets the seconds spent, forward and backward, added to its `comm_seconds`.
    """
    return _AllToAll.apply(x, out_splits, in_splits, group, meter)


class _GroupSum(torch.autograd.Function):
    """Sum over the group in the forward; the backward multiplies by the group size.

    Every rank uses the summed statistic in the same loss, so every rank receives the same
    incoming gradient and an all-reduce of it would be P times that: no communication needed.
    The factor P cancels the 1/world of the data-parallel gradient mean (see `sync_gradients`).
    """

    @staticmethod
    def forward(ctx, x: Tensor, group, size: int) -> Tensor:
        ctx.size = size
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.size, None, None


# ---------------------------------------------------------------------------------------------
# The token dispatcher


class AllToAllDispatcher:
    """Runs a token-choice `MoE`'s routed experts across an expert-parallel group.

    Meters its traffic for benchmarks: `bytes_sent` (the forward payload handed to all_to_all:
    tokens out, results back, and routing weights under a capacity), `bytes_sent_remote` (the part
    that leaves this rank) and `comm_seconds` (time in all_to_all, forward and backward).
    """

    def __init__(self, groups: ExpertParallelGroups, num_experts: int) -> None:
        self.group, self.size, self.rank = groups.ep_group, groups.ep_size, groups.ep_rank
        self.num_experts = num_experts
        self.num_local = num_experts // groups.ep_size
        self.first_expert = self.rank * self.num_local
        self.bytes_sent = 0
        self.bytes_sent_remote = 0
        self.comm_seconds = 0.0

    def _count(self, x: Tensor, splits: list[int]) -> None:
        row = math.prod(x.shape[1:]) * x.element_size()
        self.bytes_sent += sum(splits) * row
        self.bytes_sent_remote += (sum(splits) - splits[self.rank]) * row

    def token_choice(self, moe: MoE, x_TD: Tensor, routing: Routing) -> tuple[Tensor, Tensor, int, None]:
        cfg, E, P, L = moe.config, self.num_experts, self.size, self.num_local
        weights_TK, ids_TK = routing.weights, routing.ids
        T, device = ids_TK.shape[0], ids_TK.device
        lo, hi = self.first_expert, self.first_expert + L

        # Counts first: every rank learns every rank's per-expert counts and token count.
        local_E1 = torch.cat([torch.bincount(ids_TK.reshape(-1), minlength=E), ids_TK.new_tensor([T])])
        table_PE1 = _all_gather(local_E1, self.group, P)
        counts_PE, num_tokens = table_PE1[:, :E], int(table_PE1[:, E].sum())
        recv_PL = counts_PE[:, lo:hi]
        send_splits = counts_PE[self.rank].view(P, L).sum(1).tolist()
        recv_splits = recv_PL.sum(1).tolist()  # host sync: the all-to-all needs sizes

        # Tokens: local assignments sorted by expert are grouped by destination rank.
        dispatch = sort_by_expert(ids_TK, None, E)
        x_AD = x_TD.index_select(0, dispatch.token_P)
        self._count(x_AD, send_splits)
        x_ND = all_to_all(x_AD, recv_splits, send_splits, self.group, self)
        # Received rows come by source rank, then local expert, then token order.
        expert_N = torch.repeat_interleave(torch.arange(L, device=device).repeat(P), recv_PL.reshape(-1))

        kept_N = None
        capacity = cfg.expert_capacity(num_tokens)
        if capacity is not None:
            # The owner decides with the group's assignments of its experts, in global token order.
            w_A = torch.empty_like(weights_TK.reshape(-1)).index_put_(
                (dispatch.row_A,), weights_TK.detach().reshape(-1)
            )
            self._count(w_A, send_splits)
            w_N = all_to_all(w_A, recv_splits, send_splits, self.group, self)
            kept_N = capacity_keep_mask(w_N.unsqueeze(1), expert_N.unsqueeze(1), L, capacity).squeeze(1)

        # Local grouped compute, with the same kernel and padding as on one device.
        local = sort_by_expert(expert_N.unsqueeze(1), None if kept_N is None else kept_N.unsqueeze(1),
                               L, align=group_align(x_ND))
        y_PD = moe.experts(x_ND.index_select(0, local.token_P), local.offsets_E)
        y_ND = y_PD.index_select(0, local.row_A)
        if kept_N is not None:  # a dropped assignment returns zeros: its token keeps only the residual
            y_ND = torch.where(kept_N.unsqueeze(1), y_ND, y_ND.new_zeros(()))

        self._count(y_ND, recv_splits)
        y_AD = all_to_all(y_ND, send_splits, recv_splits, self.group, self)
        out_TD = combine_token_choice(y_AD, dispatch, weights_TK)

        if kept_N is None:
            counts_E = counts_PE.sum(0)
        else:
            kept_L = torch.bincount(expert_N[kept_N], minlength=L)
            counts_E = _all_gather(kept_L, self.group, P).view(E)
        dropped = int(counts_PE.sum() - counts_E.sum())
        return out_TD, counts_E, dropped, None

    def balancing_losses(self, moe: MoE, routing: Routing, input_shape: torch.Size) -> dict[str, Tensor]:
        """The layer's balancing losses over the group's tokens, by one all-reduce of their sums."""
        cfg, E = moe.config, self.num_experts
        probs_TE, logits_TE, ids_TK = routing.probs_TE, routing.logits_TE, routing.ids
        T = probs_TE.shape[0]
        per_seq = cfg.seq_aux_loss_coef > 0 and len(input_shape) >= 3
        num_seqs = T // input_shape[-2] if per_seq and input_shape[-2] else 0
        if not (cfg.aux_loss_coef > 0 or cfg.seq_aux_loss_coef > 0 or cfg.z_loss_coef > 0):
            return {}

        # Sums, not means, so they add over ranks; float64 keeps the counts exact.
        f64 = torch.float64
        parts = [probs_TE.sum(0).to(f64), torch.bincount(ids_TK.reshape(-1), minlength=E).to(f64),
                 torch.tensor([T, num_seqs], dtype=f64, device=probs_TE.device)]
        if cfg.z_loss_coef > 0:
            parts.append(torch.logsumexp(logits_TE, dim=-1).square().sum().to(f64).unsqueeze(0))
        if per_seq:
            if num_seqs > 0:
                counts_BE = expert_counts_per_group(ids_TK, E, num_seqs)
                seq_sum = load_balancing_loss(probs_TE, counts_BE) * num_seqs
            else:
                seq_sum = probs_TE.sum() * 0  # keeps the graph the same on a rank without tokens
            parts.append(seq_sum.to(f64).unsqueeze(0))
        sums = _GroupSum.apply(torch.cat(parts), self.group, self.size).to(probs_TE.dtype)

        probs_sum_E, counts_E = sums[:E], sums[E:2 * E]
        num_tokens, total_seqs, rest = sums[2 * E], sums[2 * E + 1], sums[2 * E + 2:]
        losses: dict[str, Tensor] = {}
        if cfg.aux_loss_coef > 0 or (cfg.seq_aux_loss_coef > 0 and not per_seq):
            # Switch loss E * sum_e f_e P_e; a 2-D input is one sequence, so its seq loss is this too.
            f_E = counts_E / counts_E.sum().clamp_min(1)
            aux = E * (f_E * probs_sum_E / num_tokens.clamp_min(1)).sum()
            if cfg.aux_loss_coef > 0:
                losses["aux_loss"] = aux
            if cfg.seq_aux_loss_coef > 0 and not per_seq:
                losses["seq_aux_loss"] = aux
        if cfg.z_loss_coef > 0:
            z_sum, rest = rest[0], rest[1:]
            losses["z_loss"] = z_sum / num_tokens.clamp_min(1)
        if per_seq:
            losses["seq_aux_loss"] = rest[0] / total_seqs.clamp_min(1)
        return {name: losses[name] for name in ("aux_loss", "seq_aux_loss", "z_loss") if name in losses}


# ---------------------------------------------------------------------------------------------
# Applying it to a model


def _check_parallelizable(name: str, moe: MoE, ep_size: int) -> None:
    cfg = moe.config
    where = f"MoE layer '{name or '<root>'}': expert parallelism"
    if moe.dispatcher is not None:
        raise ValueError(f"MoE layer '{name or '<root>'}' is already expert-parallel")
    if cfg.router in ("expert_choice", "soft"):
        raise ValueError(f"{where} needs a token-choice router (got router={cfg.router!r})")
    if not isinstance(moe.experts, GroupedExperts):
        raise ValueError(f"{where} shards GroupedExperts, not a list of expert modules")
    if moe.backend != "grouped":
        raise ValueError(f"{where} runs the grouped backend (got backend={cfg.backend!r})")
    if cfg.num_experts % ep_size:
        raise ValueError(f"{where} needs num_experts divisible by expert_parallel "
                         f"(got num_experts={cfg.num_experts}, expert_parallel={ep_size})")


def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    """(name, layer) of every MoE layer in `model`."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, MoE)]


@torch.no_grad()
def parallelize_experts(model: nn.Module, groups: ExpertParallelGroups, broadcast: bool = True) -> nn.Module:
    """Make every MoE layer of `model` expert-parallel over `groups.ep_group`, in place.

    With `broadcast`, every parameter and buffer is first copied from global rank 0, so all ranks
    start from the same weights whatever their seeds. Build the optimizer afterwards: the expert
    parameters are replaced by their shards.
    """
    layers = moe_layers(model)
    if not layers:
        raise ValueError("parallelize_experts: the model has no MoE layer")
    for name, moe in layers:
        _check_parallelizable(name, moe, groups.ep_size)
    if broadcast and groups.world_size > 1:
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)
    for _, moe in layers:
        experts, L = moe.experts, moe.config.num_experts // groups.ep_size
        lo = groups.ep_rank * L
        for pname in _EXPERT_PARAMS:
            param = getattr(experts, pname)
            if param is not None:
                shard = nn.Parameter(param[lo:lo + L].clone(), requires_grad=param.requires_grad)
                setattr(experts, pname, shard)
        experts.num_experts = L
        moe.dispatcher = AllToAllDispatcher(groups, moe.config.num_experts)
    return model


def expert_parameter_names(model: nn.Module) -> list[str]:
    """Names of the sharded expert parameters of an expert-parallel model."""
    names = []
    for name, moe in moe_layers(model):
        if isinstance(moe.dispatcher, AllToAllDispatcher):
            prefix = f"{name}.experts." if name else "experts."
            names += [prefix + pname for pname in _EXPERT_PARAMS if getattr(moe.experts, pname) is not None]
    return names


# ---------------------------------------------------------------------------------------------
# Gradients and loss-free balancing


def _all_reduce_flat(tensors: list[Tensor], group, scale: float) -> None:
    if not tensors:
        return
    flat = _flatten_dense_tensors(tensors)
    dist.all_reduce(flat, group=group)
    flat.mul_(scale)
    for tensor, reduced in zip(tensors, _unflatten_dense_tensors(flat, tensors), strict=True):
        tensor.copy_(reduced)


@torch.no_grad()
def sync_gradients(model: nn.Module, groups: ExpertParallelGroups, dense: bool = True) -> None:
    """Data-parallel gradient reduction for an expert-parallel model; call between backward and step.

    Dense parameters are replicated everywhere: mean over all ranks. Expert shards already hold the
    gradient of every rank of their expert-parallel group (the all-to-all backward brought it):
    sum over the replicas of the same shard and divide by the world size, so both kinds end up with
    the gradient of the mean of all ranks' losses. One flat all-reduce per kind. `dense=False`
    leaves the dense gradients to DDP (see `data_parallel`).
    """
    if isinstance(model, DistributedDataParallel):
        model = model.module
    expert_names = set(expert_parameter_names(model))
    dense_grads, expert = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.grad is None:  # unused on this rank: every rank must reduce the same tensors
            param.grad = torch.zeros_like(param)
        (expert if name in expert_names else dense_grads).append(param.grad)
    scale = 1.0 / groups.world_size
    if groups.world_size > 1 and dense:
        _all_reduce_flat(dense_grads, None, scale)
    if groups.num_replicas > 1:
        _all_reduce_flat(expert, groups.replica_group, scale)
    elif groups.world_size > 1:
        for grad in expert:
            grad.mul_(scale)


def data_parallel(model: nn.Module, groups: ExpertParallelGroups, **ddp_kwargs) -> DistributedDataParallel:
    """Wrap an expert-parallel model in torch DDP for its dense parameters.

    DDP averages the dense gradients over all ranks while backward runs; the expert shards are
    hidden from it (it would average them across different shards) and still need
    `sync_gradients(ddp_model, groups, dense=False)` before the optimizer step.
    """
    names = expert_parameter_names(model)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    ddp_kwargs.setdefault("broadcast_buffers", False)  # expert biases and loads are already in sync
    return DistributedDataParallel(model, **ddp_kwargs)


@torch.no_grad()
def update_expert_biases(model: nn.Module, groups: ExpertParallelGroups) -> None:
    """Loss-free balancing step for an expert-parallel model.

    The recorded loads are already group-wide; replicas sum theirs so every rank moves its bias
    the same way, as one device seeing all the world's tokens would.
    """
    for _, moe in moe_layers(model):
        load = getattr(moe.router, "tokens_per_expert", None)
        if load is not None and groups.num_replicas > 1:
            dist.all_reduce(load, group=groups.replica_group)
        moe.update_expert_bias()


def attach_expert_bias_updates(model: nn.Module, optimizer: torch.optim.Optimizer,
                               groups: ExpertParallelGroups):
    """Call `update_expert_biases(model, groups)` after every `optimizer.step()`; returns the handle."""
    return optimizer.register_step_post_hook(lambda *_: update_expert_biases(model, groups))
