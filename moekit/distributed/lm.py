"""`train_lm` with expert parallelism: `torchrun --nproc_per_node N -m moekit train lm --expert-parallel P`.

`moekit.train.lm.train_lm` runs the loop (data, model, optimizer, schedule, evaluation, logger);
`ExpertParallel` is the `Parallelism` it is given, supplying what changes when the experts are
spread over ranks:
- every rank draws the same global batch from the shared data generator and keeps its
  batch_size / world rows, so the run sees exactly the batches of the single-process run;
- after backward, `sync_gradients` (dense: mean over ranks; experts: replicas of the shard), and
  the gradient norm for clipping sums the expert shards' squares over the expert-parallel group,
  so every rank clips by the same factor as one device would;
- checkpoints are `moekit.distributed.checkpoint` folders (each rank's experts apart) under
  `<out_dir>/checkpoints/ep_step_<7-digit step>`; resume needs the same P (re-shard otherwise);
- only global rank 0 writes logs, plots and results.
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

from moekit.distributed.checkpoint import TRAINER, load_checkpoint, save_checkpoint
from moekit.distributed.expert_parallel import (
    ExpertParallelGroups,
    attach_expert_bias_updates,
    expert_parameter_names,
    init_expert_parallel,
    parallelize_experts,
    sync_gradients,
)
from moekit.io import atomic_write_json, load_tensors
from moekit.train.lm import LMResults, LMTrainConfig, Parallelism, StepResult, forward_backward, train_lm
from moekit.train.reproducibility import check_finite

LATEST = "latest_ep.json"


def init_from_env(device_type: str) -> None:
    """init_process_group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...)."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ValueError("--expert-parallel needs a torchrun launch, e.g. "
                         "torchrun --nproc_per_node 2 -m moekit train lm --expert-parallel 2 ...")
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")


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
    if max_norm > 0:
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)  # as torch.nn.utils.clip_grad_norm_
        torch._foreach_mul_(grads, coef)
    return float(total)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batches: list, grad_clip: float,
               groups: ExpertParallelGroups, autocast=nullcontext, step: int = 0,
               checkpoint_hint: str = "") -> StepResult:
    """`moekit.train.lm.train_step` for an expert-parallel model; losses are means over all ranks."""
    n = len(batches)
    acc = forward_backward(model, batches, autocast)  # expert counts: already summed over the EP group
    sums = torch.zeros(3, dtype=torch.float64)  # loss, lm_loss, aux_loss
    for losses in acc.losses:
        sums += torch.stack(losses).double().cpu()
    sync_gradients(model, groups)
    dist.all_reduce(sums)
    loss, lm_loss, aux_loss = (sums / (n * groups.world_size)).tolist()
    check_finite(torch.tensor(loss), step, checkpoint_hint)
    grad_norm = clip_grad_norm_(model, grad_clip, groups)
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
    """`train_lm` over torchrun's ranks with each MoE layer's experts spread over groups of `expert_parallel`."""

    def __init__(self, expert_parallel: int) -> None:
        self.expert_parallel = expert_parallel
        self.groups: ExpertParallelGroups | None = None  # set by setup, as the rest
        self.rows = slice(None)

    def setup(self, config: LMTrainConfig) -> torch.device:
        device_type = "cuda" if config.device == "auto" and torch.cuda.is_available() else config.device
        device_type = "cpu" if device_type == "auto" else torch.device(device_type).type
        init_from_env(device_type)
        self.groups = init_expert_parallel(self.expert_parallel)
        world = self.groups.world_size
        if config.model.moe is None:
            raise ValueError("--expert-parallel needs an MoE model (model.moe is not set)")
        if config.batch_size % world:
            raise ValueError(f"batch_size={config.batch_size} must be divisible by the world size {world}: "
                             "every rank takes an equal share of each batch")
        rank = self.groups.rank
        self.is_main_process = rank == 0  # global rank 0 writes the files
        self.rows = slice(rank * config.batch_size // world, (rank + 1) * config.batch_size // world)
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
                   autocast=nullcontext, step: int = 0, checkpoint_hint: str = "") -> StepResult:
        return train_step(model, optimizer, batches, grad_clip, self.groups, autocast, step, checkpoint_hint)

    def find_checkpoint(self, ckpt_root: Path) -> Path:
        return _latest(ckpt_root)

    def save_checkpoint(self, ckpt_root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                        state: dict, tensors: dict[str, torch.Tensor], files: dict, keep: int) -> Path:
        """A `moekit.distributed.checkpoint` folder `ep_step_<7-digit step>` (collective); `LATEST` names it.

        The CUDA RNG state differs per rank and is not kept (rank 0 writes the RNG tensors).
        """
        name = f"ep_step_{step:07d}"
        rng = {k: tensors[k] for k in ("rng.torch", "rng.data")}
        folder = save_checkpoint(ckpt_root / name, model, self.groups, optimizer,
                                 extra={"step": step, "tokens": state["tokens"]}, tensors=rng)
        if self.is_main_process:
            atomic_write_json(folder / "config.json", files["config.json"])
            (folder / "tokenizer.json").write_bytes(files["tokenizer.json"])
            atomic_write_json(ckpt_root / LATEST, {"step": step, "dir": name})
            old = sorted(p for p in ckpt_root.glob("ep_step_*") if p.is_dir() and p.name != name)
            for path in old[:max(len(old) - (keep - 1), 0)]:
                shutil.rmtree(path, ignore_errors=True)
        dist.barrier()
        return folder

    def load_checkpoint(self, ckpt: Path, model: nn.Module,
                        optimizer: torch.optim.Optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
        extra = load_checkpoint(ckpt, model, self.groups, optimizer)
        return {"step": extra["step"], "tokens": extra["tokens"]}, load_tensors(ckpt / TRAINER)

    def results_extra(self) -> dict:
        return {"expert_parallel": self.expert_parallel, "world_size": self.groups.world_size}


def train_lm_expert_parallel(config: LMTrainConfig, expert_parallel: int, *, resume: bool = False,
                             stop_at_step: int | None = None) -> LMResults:
    """Train `config` with experts spread over groups of `expert_parallel` ranks (call on every rank)."""
    return train_lm(config, resume=resume, stop_at_step=stop_at_step, parallelism=ExpertParallel(expert_parallel))
