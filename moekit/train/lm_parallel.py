"""The LM over several processes: `torchrun --nproc_per_node N -m moekit train lm [--expert-parallel P]`.

`moekit.train.lm.fit` runs the loop (data, model, optimizer, schedule, evaluation, logging);
`ExpertParallel` is the `Parallelism` it is given, supplying what changes when the experts are
spread over ranks (P = 1: plain data parallelism, every rank holds every expert):
- every rank draws the same global batch from the shared data generator and keeps its
  batch_size / world rows, so the run sees exactly the batches of the single-process run;
- after backward, `sync_gradients` (dense: mean over ranks; experts: replicas of the shard), and
  the gradient norm for clipping sums the expert shards' squares over the expert-parallel group,
  so every rank clips by the same factor as one device would;
- checkpoints are `moekit.distributed.checkpoint` folders (each rank's experts apart) under
  `<run>/checkpoints/ep_step_<7-digit step>`; resume needs the same P (re-shard otherwise); at the
  end rank 0 merges the last one into `<run>/model.safetensors`;
- only global rank 0 writes logs and results.
With the default gloo on CPU (nccl on CUDA, one GPU per local rank).
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from moekit.distributed.checkpoint import TRAINER, load_checkpoint, merge_checkpoint, save_checkpoint
from moekit.distributed.expert_parallel import (
    ExpertParallelGroups,
    attach_expert_bias_updates,
    expert_parameter_names,
    init_expert_parallel,
    parallelize_experts,
    sync_gradients,
)
from moekit.io import atomic_write_json, load_tensors, save_tensors
from moekit.train.lm import LMConfig, Parallelism, StepResult, check_step, forward_backward
from moekit.train.parallel import init_process_group
from moekit.train.run import Run, read_metrics

LATEST = "latest_ep.json"


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, groups: ExpertParallelGroups) -> float:
    """Clip to the global norm of the whole model (dense once + every expert shard); returns it.

    Call after `sync_gradients`: dense gradients are then equal on every rank.
    """
    experts = set(expert_parameter_names(model))
    dense, expert = [], []
    for name, param in model.named_parameters():
        if param.grad is not None:
            (expert if name in experts else dense).append(param.grad)
    grads = dense + expert
    if not grads:
        return 0.0
    norms = torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])
    dense_sq, expert_sq = norms[:len(dense)].square().sum(), norms[len(dense):].square().sum()
    if groups.ep_size > 1:
        dist.all_reduce(expert_sq, group=groups.ep_group)
    total = (dense_sq + expert_sq).sqrt()
    if max_norm > 0 and bool(torch.isfinite(total)):
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)  # as torch.nn.utils.clip_grad_norm_
        torch._foreach_mul_(grads, coef)
    return float(total)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batches: list, grad_clip: float,
               groups: ExpertParallelGroups, autocast=nullcontext, step: int = 0,
               last_good: str = "") -> StepResult:
    """`moekit.train.lm.train_step` for an expert-parallel model; losses are means over all ranks."""
    n = len(batches)
    acc = forward_backward(model, batches, autocast)  # expert counts: already summed over the EP group
    sums = torch.zeros(3, dtype=torch.float64)  # loss, lm_loss, aux_loss
    for losses in acc.losses:
        sums += torch.stack(losses).double().cpu()
    sync_gradients(model, groups)
    dist.all_reduce(sums)
    loss, lm_loss, aux_loss = (sums / (n * groups.world_size)).tolist()
    grad_norm = clip_grad_norm_(model, grad_clip, groups)
    check_step(loss, grad_norm, step, last_good, optimizer)  # the same verdict on every rank
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, lm_loss, aux_loss, grad_norm if grad_clip > 0 else 0.0, acc.expert_counts,
                      acc.dropped_tokens)


def _latest(root: Path) -> Path:
    path = root / LATEST
    if not path.is_file():
        raise FileNotFoundError(f"no expert-parallel checkpoint in {root} (expected {LATEST})")
    return root / json.loads(path.read_text())["dir"]


class ExpertParallel(Parallelism):
    """`fit` over torchrun's ranks with each MoE layer's experts spread over groups of `expert_parallel`."""

    def __init__(self, expert_parallel: int = 1) -> None:
        self.expert_parallel = expert_parallel
        self.groups: ExpertParallelGroups | None = None  # set by setup, as the rest
        self.rows = slice(None)

    def setup(self, config: LMConfig) -> torch.device:
        settings = config.train
        device_type = "cuda" if settings.device == "auto" and torch.cuda.is_available() else settings.device
        device_type = "cpu" if device_type == "auto" else torch.device(device_type).type
        init_process_group(device_type)
        self.groups = init_expert_parallel(self.expert_parallel)
        world = self.groups.world_size
        if config.model.moe is None and self.expert_parallel > 1:
            raise ValueError("--expert-parallel needs an MoE model (model.moe is not set)")
        if settings.batch_size % world:
            raise ValueError(f"train.batch_size={settings.batch_size} must be divisible by the world size {world}: "
                             "every rank takes an equal share of each batch")
        rank = self.groups.rank
        self.is_main_process = rank == 0  # global rank 0 writes the files
        self.rows = slice(rank * settings.batch_size // world, (rank + 1) * settings.batch_size // world)
        if device_type == "cuda":
            return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        return torch.device("cpu")

    def barrier(self) -> None:
        dist.barrier()

    def parallelize(self, model: nn.Module) -> nn.Module:
        return parallelize_experts(model, self.groups)

    def attach_expert_bias_updates(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        attach_expert_bias_updates(model, optimizer, self.groups)

    def local_rows(self, batch_BT: torch.Tensor) -> torch.Tensor:
        return batch_BT[self.rows]

    def train_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, batches: list, grad_clip: float,
                   autocast=nullcontext, step: int = 0, last_good: str = "") -> StepResult:
        return train_step(model, optimizer, batches, grad_clip, self.groups, autocast, step, last_good)

    def save_checkpoint(self, run: Run, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                        state: dict, tensors: dict[str, torch.Tensor], keep: int) -> str:
        """A `moekit.distributed.checkpoint` folder `ep_step_<7-digit step>` (collective); `LATEST` names it.

        The CUDA RNG state differs per rank and is not kept (rank 0 writes the RNG tensors)."""
        root = run.path / "checkpoints"
        name = f"ep_step_{step:07d}"
        rng = {k: tensors[k] for k in ("rng.torch", "rng.data")}
        folder = save_checkpoint(root / name, model, self.groups, optimizer,
                                 extra={"step": step, "tokens": state["tokens"]}, tensors=rng)
        if self.is_main_process:
            atomic_write_json(root / LATEST, {"step": step, "dir": name})
            old = sorted(p for p in root.glob("ep_step_*") if p.is_dir() and p.name != name)
            for path in old[:max(len(old) - (keep - 1), 0)]:
                shutil.rmtree(path, ignore_errors=True)
        dist.barrier()
        self.last = folder
        return str(folder)

    def load_checkpoint(self, run: Run, model: nn.Module,
                        optimizer: torch.optim.Optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
        ckpt = _latest(run.path / "checkpoints")
        extra = load_checkpoint(ckpt, model, self.groups, optimizer)
        run.last_checkpoint = self.last = ckpt
        state = {"step": extra["step"], "tokens": extra["tokens"]}
        run.metrics = [row for row in read_metrics(run.path / "metrics.csv") if int(row["step"]) <= state["step"]]
        return state, load_tensors(ckpt / TRAINER)

    def save_final_model(self, run: Run, model: nn.Module) -> None:
        """Rank 0 merges the last checkpoint's expert shards into RUN/model.safetensors."""
        if self.is_main_process and run.path is not None:
            state = {k: v.clone() for k, v in merge_checkpoint(self.last).items()}
            save_tensors(run.path / "model.safetensors", state)
        dist.barrier()

    def results_extra(self) -> dict:
        return {"expert_parallel": self.expert_parallel, "world_size": self.groups.world_size}
