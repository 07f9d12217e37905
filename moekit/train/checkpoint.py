"""Step checkpoints for --resume: model, optimizer, RNG and loop state as safetensors + JSON, atomically.

Layout under a run folder's `checkpoints/` (see `moekit.train.run` for the whole run folder)::

    step_0000500/model.safetensors            weights and buffers (e.g. loss-free expert biases)
    step_0000500/trainer_state.safetensors    optimizer moments, RNG states
    step_0000500/trainer_state.json           step, optimizer hyperparameters, loop counters
    latest.json                               {"step": 500, "dir": "step_0000500"}

A step folder is written under a temporary name and renamed into place; `latest.json` is replaced
atomically afterwards, so a crash (or a full disk) at any point leaves the previous checkpoint
usable and no temporary folder behind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moekit.io import atomic_write_bytes, atomic_write_json, load_tensors, save_tensors
from moekit.models.pretrained import load_weights

LATEST = "latest.json"


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
    tensors: dict[str, torch.Tensor] | None = None,
    files: dict[str, dict | bytes] | None = None,
    keep: int = 2,
) -> Path:
    """Write checkpoint `step` under `root` (a run's checkpoints/ folder) and keep the newest `keep`.

    `state` (JSON) and `tensors` (e.g. RNG states) are saved with the optimizer; `files` maps
    extra file names to JSON objects or raw bytes.
    """
    root = Path(root)
    name = f"step_{step:07d}"
    tmp = root / f".tmp_{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        # clone(): safetensors refuses tensors sharing memory (tied embeddings); loading re-ties them.
        save_tensors(tmp / "model.safetensors", {k: v.clone() for k, v in model.state_dict().items()})
        trainer_tensors = dict(tensors or {})
        trainer_state = dict(state, step=step)
        if optimizer is not None:
            opt_tensors, opt_json = _flatten_optimizer(optimizer.state_dict())
            trainer_tensors.update(opt_tensors)
            trainer_state["optimizer"] = opt_json
        save_tensors(tmp / "trainer_state.safetensors", trainer_tensors)
        atomic_write_json(tmp / "trainer_state.json", trainer_state)
        for file_name, content in (files or {}).items():
            if isinstance(content, bytes):
                atomic_write_bytes(tmp / file_name, content)
            else:
                atomic_write_json(tmp / file_name, content)
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_json(root / LATEST, {"step": step, "dir": name})
    others = sorted(p for p in root.glob("step_*") if p.is_dir() and p.name != name)
    for old in others[:max(len(others) - (keep - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint folder meant by `path`: a step folder, a checkpoints folder or a run folder."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return path
    for root in (path, path / "checkpoints"):
        latest = root / LATEST
        if latest.is_file():
            try:
                step_dir = root / json.loads(latest.read_text())["dir"]
            except (json.JSONDecodeError, KeyError) as error:
                raise ValueError(f"{latest} is corrupt: {error}") from error
            if not (step_dir / "model.safetensors").is_file():
                raise FileNotFoundError(f"{latest} points at {step_dir}, which holds no model.safetensors")
            return step_dir
    raise FileNotFoundError(f"no checkpoint in {path} (expected model.safetensors or checkpoints/{LATEST})")


def read_json(path: Path) -> dict:
    """A checkpoint's JSON file; missing or corrupt names the file."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"checkpoint file {path} is corrupt: {error}") from error


def load_model_weights(ckpt_dir: str | os.PathLike, model: nn.Module) -> None:
    """Load model.safetensors into `model`; a mismatch names the file and the differing keys."""
    path = Path(ckpt_dir) / "model.safetensors"
    load_weights(model, load_tensors(path), path)


def load_trainer_state(ckpt_dir: str | os.PathLike,
                       optimizer: torch.optim.Optimizer | None = None,
                       ) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read trainer_state.{json,safetensors}; load the optimizer if given. Returns (state, other tensors)."""
    ckpt_dir = Path(ckpt_dir)
    state = read_json(ckpt_dir / "trainer_state.json")
    tensors = load_tensors(ckpt_dir / "trainer_state.safetensors")
    if optimizer is not None:
        if "optimizer" not in state:
            raise ValueError(f"checkpoint {ckpt_dir} holds no optimizer state")
        opt_state = _unflatten_optimizer(tensors, state["optimizer"])
        try:
            optimizer.load_state_dict(opt_state)
        except (ValueError, KeyError) as error:
            raise ValueError(f"optimizer state in {ckpt_dir} does not match the model: {error}") from error
    rest = {k: v for k, v in tensors.items() if not k.startswith("optimizer.")}
    return state, rest


def _flatten_optimizer(opt_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, per_param in opt_state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.state.{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": opt_state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], opt_json: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer.state."):
            idx, key = name[len("optimizer.state."):].split(".", 1)
            state.setdefault(int(idx), {})[key] = value
    for name, value in opt_json.get("scalars", {}).items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": opt_json["param_groups"]}
