"""`train_lm` with expert parallelism: `torchrun --nproc_per_node N -m moekit train lm --expert-parallel P`.

The same pieces as `moekit.train.lm` (data, model, optimizer, schedule, evaluation, logger), with
what changes when the experts are spread over ranks:
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
import time
from contextlib import nullcontext
from dataclasses import asdict
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
from moekit.train.io import atomic_write_json, load_tensors
from moekit.train.lm import (
    LMResults,
    LMTrainConfig,
    RunLogger,
    StepResult,
    _check_same_config,
    _data_cache,
    _progress,
    _save_plots,
    autocast_context,
    bits_per_byte,
    build_data,
    build_model,
    build_optimizer,
    evaluate,
    lr_at,
    peak_memory_mb,
)
from moekit.train.reproducibility import check_finite, seed_everything

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
    sums = torch.zeros(3, dtype=torch.float64)  # loss, lm_loss, aux_loss
    counts: dict[int, torch.Tensor] = {}
    dropped: dict[int, int] = {}
    for x, y in batches:
        with autocast():
            _, out = model(x, y)
        (out.loss / n).backward()
        sums += torch.stack([out.loss.detach(), out.lm_loss.detach(), out.aux_loss.detach()]).double().cpu()
        for layer, c in out.expert_counts.items():  # already summed over the expert-parallel group
            counts[layer] = counts[layer] + c if layer in counts else c.detach().clone()
            dropped[layer] = dropped.get(layer, 0) + out.dropped_tokens[layer]
    sync_gradients(model, groups)
    dist.all_reduce(sums)
    loss, lm_loss, aux_loss = (sums / (n * groups.world_size)).tolist()
    check_finite(torch.tensor(loss), step, checkpoint_hint)
    grad_norm = clip_grad_norm_(model, grad_clip, groups)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, lm_loss, aux_loss, grad_norm if grad_clip > 0 else 0.0, counts, dropped)


def _latest(root: Path) -> Path:
    path = root / LATEST
    if not path.is_file():
        raise FileNotFoundError(f"no expert-parallel checkpoint in {root} (expected {LATEST})")
    return root / json.loads(path.read_text())["dir"]


def train_lm_expert_parallel(config: LMTrainConfig, expert_parallel: int, *, resume: bool = False,
                             stop_at_step: int | None = None) -> LMResults:
    """Train `config` with experts spread over groups of `expert_parallel` ranks (call on every rank)."""
    out_dir = Path(config.out_dir)
    if config.threads:
        torch.set_num_threads(config.threads)
    device_type = "cuda" if config.device == "auto" and torch.cuda.is_available() else config.device
    device_type = "cpu" if device_type == "auto" else torch.device(device_type).type
    init_from_env(device_type)
    groups = init_expert_parallel(expert_parallel)
    rank, world = groups.rank, groups.world_size
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if device_type == "cuda" else \
        torch.device("cpu")
    if config.model.moe is None:
        raise ValueError("--expert-parallel needs an MoE model (model.moe is not set)")
    if config.batch_size % world:
        raise ValueError(f"batch_size={config.batch_size} must be divisible by the world size {world}: "
                         "every rank takes an equal share of each batch")
    lead = rank == 0

    generator = seed_everything(config.seed)
    if lead:  # rank 0 tokenizes into the cache; the others then open it
        out_dir.mkdir(parents=True, exist_ok=True)
        data = build_data(config)
    dist.barrier()
    if not lead:
        data = build_data(config)
    if data.tokenizer.vocab_size > config.model.vocab_size:
        raise ValueError(f"the {data.tokenizer.kind} tokenizer has {data.tokenizer.vocab_size} ids but "
                         f"model.vocab_size={config.model.vocab_size}; set model.vocab_size to at least that")
    model = build_model(config.model, device)
    params = model.num_parameters()  # of the whole model, before its experts are sharded
    model = parallelize_experts(model, groups)
    optimizer = build_optimizer(model, config)
    attach_expert_bias_updates(model, optimizer, groups)
    autocast = lambda: autocast_context(device, config.dtype)  # noqa: E731

    config_json = config.to_dict()  # as train_lm writes it (eval lm reads it); P is in layout.json
    tokenizer_bytes = (Path(_data_cache(config)) / "tokenizer.json").read_bytes()
    ckpt_root = out_dir / "checkpoints"
    step, tokens, resume_step = 0, 0, None
    last_ckpt = ["(none saved yet)"]
    if resume:
        ckpt = _latest(ckpt_root)
        _check_same_config(ckpt / "config.json", config_json)
        extra = load_checkpoint(ckpt, model, groups, optimizer)
        trainer = load_tensors(ckpt / TRAINER)
        torch.set_rng_state(trainer["rng.torch"])
        generator.set_state(trainer["rng.data"])
        step, tokens = extra["step"], extra["tokens"]
        resume_step, last_ckpt[0] = step, str(ckpt)
    elif lead:
        atomic_write_json(out_dir / "config.json", config_json)
        (out_dir / "tokenizer.json").write_bytes(tokenizer_bytes)
    logger = RunLogger(out_dir, resume_step, config.tensorboard) if lead else None

    def checkpoint() -> None:
        name = f"ep_step_{step:07d}"
        rng = {"rng.torch": torch.get_rng_state(), "rng.data": generator.get_state()}
        folder = save_checkpoint(ckpt_root / name, model, groups, optimizer,
                                 extra={"step": step, "tokens": tokens}, tensors=rng)
        if lead:
            atomic_write_json(folder / "config.json", config_json)
            (folder / "tokenizer.json").write_bytes(tokenizer_bytes)
            atomic_write_json(ckpt_root / LATEST, {"step": step, "dir": name})
            old = sorted(p for p in ckpt_root.glob("ep_step_*") if p.is_dir() and p.name != name)
            for path in old[:max(len(old) - (config.keep_checkpoints - 1), 0)]:
                shutil.rmtree(path, ignore_errors=True)
        dist.barrier()
        last_ckpt[0] = str(folder)

    total_steps = config.total_steps
    end_step = min(total_steps, stop_at_step) if stop_at_step is not None else total_steps
    rows = slice(rank * config.batch_size // world, (rank + 1) * config.batch_size // world)
    train_seconds, session_tokens = 0.0, 0
    started = time.perf_counter()
    load_counts: dict[int, torch.Tensor] = {}
    load_dropped: dict[int, int] = {}
    bar = _progress(config.progress and lead, step, total_steps)
    model.train()
    try:
        while step < end_step:
            lr = lr_at(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            t0 = time.perf_counter()
            # The global batch, drawn identically on every rank; this rank keeps its rows.
            batches = [tuple(t[rows].to(device) for t in data.get_batch("train", config.batch_size,
                                                                         config.model.block_size, generator))
                       for _ in range(config.grad_accum)]
            result = train_step(model, optimizer, batches, config.grad_clip, groups, autocast, step + 1,
                                last_ckpt[0])
            train_seconds += time.perf_counter() - t0
            step += 1
            tokens += config.tokens_per_step
            session_tokens += config.tokens_per_step
            for layer, c in result.expert_counts.items():
                load_counts[layer] = load_counts[layer] + c if layer in load_counts else c.clone()
                load_dropped[layer] = load_dropped.get(layer, 0) + result.dropped_tokens[layer]
            rate = session_tokens / max(train_seconds, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{result.loss:.4f}", tok_s=f"{rate:,.0f}")

            val_loss = None
            if step % config.eval_interval == 0 or step == total_steps:
                # Every rank evaluates the same windows (the experts need all ranks in the forward).
                val_loss, _ = evaluate(model, data, config.model.block_size, config.batch_size,
                                       config.eval_tokens, autocast)
                if lead:
                    bar.write(f"step {step}: train loss {result.lm_loss:.4f}, val loss {val_loss:.4f}")
            if lead and (step % config.log_interval == 0 or val_loss is not None or step == end_step):
                logger.log({"step": step, "tokens": tokens, "lr": lr, "loss": result.loss,
                            "lm_loss": result.lm_loss, "aux_loss": result.aux_loss,
                            "grad_norm": result.grad_norm, "val_loss": "" if val_loss is None else val_loss,
                            "tokens_per_s": rate, "elapsed_s": time.perf_counter() - started})
                if load_counts:
                    logger.log_expert_load(step, load_counts, load_dropped)
                    load_counts, load_dropped = {}, {}
                logger.flush()
            if step % config.checkpoint_interval == 0 or step == end_step:
                checkpoint()
    finally:
        bar.close()
        if logger is not None:
            logger.close()

    final_loss, scored = evaluate(model, data, config.model.block_size, config.batch_size,
                                  config.final_eval_tokens, autocast)
    results = LMResults(
        out_dir=str(out_dir), steps=step, tokens=tokens, val_loss=final_loss,
        val_bits_per_byte=bits_per_byte(final_loss, scored, data),
        train_tokens_per_s=session_tokens / max(train_seconds, 1e-9),
        peak_memory_mb=peak_memory_mb(device),
        parameters=params,
        train_seconds=train_seconds, history=logger.metrics if logger else [],
    )
    if lead:
        summary = {k: v for k, v in asdict(results).items() if k != "history"}
        atomic_write_json(out_dir / "results.json", dict(summary, expert_parallel=expert_parallel,
                                                         world_size=world))
        _save_plots(out_dir, logger)
    dist.barrier()
    return results
