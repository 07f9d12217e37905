"""Checkpoints: model, optimizer, RNG and trainer state as safetensors + JSON, written atomically.

Layout of a run folder::

    checkpoints/step_0000500/model.safetensors      weights and buffers (e.g. loss-free expert biases)
    checkpoints/step_0000500/trainer_state.safetensors   optimizer moments, RNG states
    checkpoints/step_0000500/trainer_state.json     step, optimizer hyperparameters, schedule, data position
    checkpoints/step_0000500/config.json, tokenizer.json  what is needed to rebuild the model alone
    checkpoints/latest.json                         {"step": 500, "dir": "step_0000500"}

A step folder is written under a temporary name and renamed into place; `latest.json` is replaced
atomically afterwards, so a crash at any point leaves the previous checkpoint usable.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moekit.io import atomic_write_json, load_tensors, save_tensors

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
    """Write checkpoint `step` under `root` (e.g. run/checkpoints) and keep the newest `keep`.

    `state` (JSON) and `tensors` (e.g. RNG states) are saved with the optimizer; `files` maps
    extra file names to JSON objects or raw bytes (config, tokenizer).
    """
    root = Path(root)
    name = f"step_{step:07d}"
    tmp = root / f".tmp_{name}"
    shutil.rmtree(tmp, ignore_errors=True)
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
            (tmp / file_name).write_bytes(content)
        else:
            atomic_write_json(tmp / file_name, content)
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
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
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"checkpoint file {path} is corrupt: {error}") from error


def load_model_weights(ckpt_dir: str | os.PathLike, model: nn.Module) -> None:
    """Load model.safetensors into `model`; a mismatch names the file and the differing keys."""
    path = Path(ckpt_dir) / "model.safetensors"
    tensors = load_tensors(path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if k in tensors and tensors[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {_preview(missing)}")
        if unexpected:
            parts.append(f"unexpected {_preview(unexpected)}")
        if wrong:
            parts.append(f"shape mismatch {_preview(wrong)}")
        raise ValueError(f"checkpoint {path} does not match the model: {'; '.join(parts)}")
    model.load_state_dict(tensors)


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


def _preview(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


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
