"""Checkpoints of expert-parallel models: each rank's experts in its own file, plus tools to merge
them into a single-device checkpoint or re-shard them for another expert-parallel size.

A checkpoint folder:

    layout.json                       {"format", "expert_parallel": P, "experts": {key: num_experts}}
    dense.safetensors                 everything replicated (written by global rank 0)
    experts-00000-of-00002.safetensors  rank 0's slice [0, E/P) of every expert tensor (dim 0)
    experts-00001-of-00002.safetensors  ...
    optimizer-ep00000.pt (optional)   each expert-parallel rank's optimizer state (same P only)
    trainer.safetensors (optional)    trainer tensors such as RNG states

Only the first replica of each shard writes, so data-parallel copies do not race on one file.
Every file is written atomically (moekit.io).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moekit.distributed.expert_parallel import ExpertParallelGroups, expert_parameter_names, moe_layers
from moekit.io import atomic_write_bytes, atomic_write_json, load_tensors, save_tensors

FORMAT = "moekit-expert-parallel/1"
LAYOUT, DENSE, TRAINER = "layout.json", "dense.safetensors", "trainer.safetensors"


def shard_file(ep_rank: int, ep_size: int) -> str:
    """The file holding expert-parallel rank `ep_rank`'s experts."""
    return f"experts-{ep_rank:05d}-of-{ep_size:05d}.safetensors"


def optimizer_file(ep_rank: int) -> str:
    """The file holding expert-parallel rank `ep_rank`'s optimizer state."""
    return f"optimizer-ep{ep_rank:05d}.pt"


def _expert_sizes(model: nn.Module) -> dict[str, int]:
    """Each sharded expert tensor's name -> total number of experts (dim 0 of the full tensor)."""
    total = {}
    for name, moe in moe_layers(model):
        prefix = f"{name}.experts." if name else "experts."
        for key in expert_parameter_names(model):
            if key.startswith(prefix):
                total[key] = moe.config.num_experts
    return total


def save_checkpoint(folder: str | Path, model: nn.Module, groups: ExpertParallelGroups,
                    optimizer: torch.optim.Optimizer | None = None, extra: dict | None = None,
                    tensors: dict[str, Tensor] | None = None) -> Path:
    """Save an expert-parallel model (collective: call on every rank).

    `extra` (JSON) goes in layout.json and `tensors` (e.g. RNG states) in trainer.safetensors,
    both written by global rank 0.
    """
    folder = Path(folder)
    state = model.state_dict()
    sizes = _expert_sizes(model)
    if groups.replica_rank == 0:
        metadata = {"expert_parallel": str(groups.ep_size), "ep_rank": str(groups.ep_rank)}
        shard = {k: state[k] for k in sizes}
        save_tensors(folder / shard_file(groups.ep_rank, groups.ep_size), shard, metadata)
        if optimizer is not None:
            buffer = io.BytesIO()
            torch.save(optimizer.state_dict(), buffer)
            atomic_write_bytes(folder / optimizer_file(groups.ep_rank), buffer.getvalue())
    if groups.rank == 0:
        # clone(): safetensors refuses tensors sharing memory (tied embeddings).
        save_tensors(folder / DENSE, {k: v.clone() for k, v in state.items() if k not in sizes})
        if tensors:
            save_tensors(folder / TRAINER, tensors)
        _write_layout(folder, groups.ep_size, sizes, extra)
    if dist.is_initialized():
        dist.barrier()
    return folder


def _write_layout(folder: Path, ep_size: int, sizes: dict[str, int], extra: dict | None) -> None:
    atomic_write_json(folder / LAYOUT, {"format": FORMAT, "expert_parallel": ep_size, "experts": sizes,
                                        "extra": extra or {}})


def read_layout(folder: str | Path) -> dict:
    """layout.json of an expert-parallel checkpoint, checked to be one."""
    path = Path(folder) / LAYOUT
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {folder} is not an expert-parallel checkpoint "
                                "(written by moekit.distributed.checkpoint.save_checkpoint)")
    layout = json.loads(path.read_text())
    if layout.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown checkpoint format {layout.get('format')!r} (expected {FORMAT!r})")
    return layout


def load_checkpoint(folder: str | Path, model: nn.Module, groups: ExpertParallelGroups,
                    optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Load this rank's experts and the dense weights; the layout must match. Returns `extra`."""
    folder = Path(folder)
    layout = read_layout(folder)
    saved = layout["expert_parallel"]
    if saved != groups.ep_size:
        raise ValueError(
            f"checkpoint {folder} was saved with expert_parallel={saved} but this run uses "
            f"expert_parallel={groups.ep_size}; re-shard it first: moekit checkpoint reshard "
            f"--input {folder} --output NEW_FOLDER --expert-parallel {groups.ep_size}"
        )
    sizes = _expert_sizes(model)
    if sizes != layout["experts"]:
        raise ValueError(f"checkpoint {folder} holds expert tensors {layout['experts']}, "
                         f"this model has {sizes}")
    path = folder / shard_file(groups.ep_rank, groups.ep_size)
    experts = load_tensors(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("ep_rank") != str(groups.ep_rank) or metadata.get("expert_parallel") != str(saved):
        raise ValueError(f"{path} holds the experts of rank {metadata.get('ep_rank')} of "
                         f"{metadata.get('expert_parallel')}, not rank {groups.ep_rank} of {groups.ep_size}")
    state = {**load_tensors(folder / DENSE), **experts}
    _load_state(model, state, str(folder))
    if optimizer is not None:
        opt_path = folder / optimizer_file(groups.ep_rank)
        if not opt_path.is_file():
            raise FileNotFoundError(f"{opt_path} does not exist: the checkpoint has no optimizer state")
        optimizer.load_state_dict(torch.load(opt_path, map_location="cpu", weights_only=True))
    return layout.get("extra", {})


def _load_state(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    own = model.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(f"{source} does not fit the model: missing keys {missing[:5]}, "
                         f"unexpected keys {unexpected[:5]}")
    for key, value in state.items():
        if value.shape != own[key].shape:
            raise ValueError(f"{source}: {key} has shape {tuple(value.shape)}, the model expects "
                             f"{tuple(own[key].shape)}")
    model.load_state_dict(state)


# ---------------------------------------------------------------------------------------------
# Offline tools (no process group needed)


def merge_checkpoint(folder: str | Path) -> dict[str, Tensor]:
    """The single-device state dict of an expert-parallel checkpoint (expert shards concatenated)."""
    folder = Path(folder)
    layout = read_layout(folder)
    P = layout["expert_parallel"]
    state = load_tensors(folder / DENSE)
    shards = [load_tensors(folder / shard_file(r, P)) for r in range(P)]
    for key, num_experts in layout["experts"].items():
        full = torch.cat([shard[key] for shard in shards])
        if full.shape[0] != num_experts:
            raise ValueError(f"{folder}: {key} has {full.shape[0]} experts over {P} shards, "
                             f"layout.json says {num_experts}")
        state[key] = full
    return state


def save_merged(folder: str | Path, output: str | Path) -> Path:
    """Write the single-device checkpoint of `folder` to one safetensors file.

    An `output` without the .safetensors suffix is a folder: it gets model.safetensors plus the run's
    config.json and tokenizer.json, if any (what `moekit eval lm` reads).
    """
    folder, output = Path(folder), Path(output)
    state = {k: v.clone() for k, v in merge_checkpoint(folder).items()}
    if output.suffix == ".safetensors":
        return save_tensors(output, state, {"format": "moekit-state-dict"})
    save_tensors(output / "model.safetensors", state, {"format": "moekit-state-dict"})
    run = folder.parent.parent  # RUN/checkpoints/ep_step_N: the run folder holds the config and tokenizer
    for name in ("config.json", "tokenizer.json"):
        source = folder / name if (folder / name).is_file() else run / name
        if source.is_file():
            atomic_write_bytes(output / name, source.read_bytes())
    return output


def shard_state_dict(state: dict[str, Tensor], expert_keys: dict[str, int] | list[str], ep_rank: int,
                     ep_size: int) -> dict[str, Tensor]:
    """Rank `ep_rank`'s view of a single-device state dict: every expert tensor sliced on dim 0."""
    out = dict(state)
    for key in expert_keys:
        full = state[key]
        if full.shape[0] % ep_size:
            raise ValueError(f"{key} has {full.shape[0]} experts, not divisible by expert_parallel={ep_size}")
        size = full.shape[0] // ep_size
        out[key] = full[ep_rank * size:(ep_rank + 1) * size].clone()
    return out


def reshard_checkpoint(folder: str | Path, output: str | Path, expert_parallel: int) -> Path:
    """Re-write an expert-parallel checkpoint for another expert-parallel size (model weights only)."""
    layout = read_layout(folder)
    if expert_parallel < 1:
        raise ValueError(f"expert_parallel must be >= 1 (got {expert_parallel})")
    state = merge_checkpoint(folder)
    experts = layout["experts"]
    output = Path(output)
    for r in range(expert_parallel):
        shard = shard_state_dict({k: state[k] for k in experts}, experts, r, expert_parallel)
        metadata = {"expert_parallel": str(expert_parallel), "ep_rank": str(r)}
        save_tensors(output / shard_file(r, expert_parallel), shard, metadata)
    save_tensors(output / DENSE, {k: v.clone() for k, v in state.items() if k not in experts})
    extra = dict(layout.get("extra", {}), resharded_from=layout["expert_parallel"])
    _write_layout(output, expert_parallel, experts, extra)
    return output
