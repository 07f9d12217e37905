"""Hugging Face checkpoint folders: config.json, (sharded) safetensors streamed tensor by tensor,
the tokenizer files; and writing them back, in shards, atomically."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from moekit.io import atomic_write_bytes, atomic_write_json, save_tensors

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Files copied as they are between a Hugging Face folder and a moekit model folder: the tokenizer
# (moekit reads tokenizer.json) and what transformers needs to tokenize and stop generating.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja")


def read_config(folder: str | os.PathLike) -> dict:
    """config.json of a Hugging Face model folder, with errors naming the file."""
    folder = Path(folder)
    path = folder / "config.json"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder (expected a Hugging Face model folder)")
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {folder} is not a Hugging Face model folder")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return config


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint: the shards its index names, or model.safetensors."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{index} is not a safetensors index (with a weight_map): {error}") from None
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) that do not exist: {', '.join(missing[:3])}")
        return files
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    if any(folder.glob("pytorch_model*.bin")):
        raise ValueError(f"{folder} holds pytorch_model*.bin weights; moekit reads safetensors only "
                         f"(convert them with transformers' save_pretrained(safe_serialization=True))")
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {folder}")


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) for every tensor of the files, one at a time: nothing else is kept in memory."""
    from safetensors import SafetensorError, safe_open

    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    yield name, f.get_tensor(name)
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{path} is corrupt or not a safetensors file: {error}") from None


def tensor_dtypes(files: list[Path]) -> dict[str, torch.dtype]:
    """Name -> dtype of every tensor, from the safetensors headers only (no data read)."""
    import struct

    names = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
    dtypes: dict[str, torch.dtype] = {}
    for path in files:
        with open(path, "rb") as f:
            try:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
            except (struct.error, json.JSONDecodeError, UnicodeDecodeError):
                raise ValueError(f"{path} is corrupt or not a safetensors file") from None
        for name, info in header.items():
            if name != "__metadata__":
                if info["dtype"] not in names:
                    raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}, which moekit does not load")
                dtypes[name] = names[info["dtype"]]
    return dtypes


def copy_tokenizer(source: str | os.PathLike, target: str | os.PathLike) -> list[str]:
    """Copy the tokenizer files present in `source` into `target`; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        path = Path(source) / name
        if path.is_file():
            atomic_write_bytes(Path(target) / name, path.read_bytes())
            copied.append(name)
    return copied


def parse_size(text: str | int) -> int:
    """'5GB', '200MB', '4KB' or a number of bytes."""
    if isinstance(text, int):
        return text
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    upper = text.strip().upper()
    for unit, scale in units.items():
        if upper.endswith(unit):
            try:
                return int(float(upper[: -len(unit)]) * scale)
            except ValueError:
                break
    try:
        return int(upper)
    except ValueError:
        raise ValueError(f"size {text!r} is not a size like 5GB, 200MB or a number of bytes") from None


def write_sharded(tensors: Iterator[tuple[str, Tensor]], folder: str | os.PathLike, max_shard_bytes: int) -> list[Path]:
    """Write (name, tensor) pairs as safetensors shards of at most `max_shard_bytes` (one file,
    model.safetensors, when they fit) plus the index Hugging Face reads. Only one shard is held in
    memory; shards are written to a temporary folder and moved into place at the end."""
    folder = Path(folder)
    temp = folder / ".moekit-shards.tmp"
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir(parents=True)
    written: list[Path] = []
    shard_of: dict[str, int] = {}
    current: dict[str, Tensor] = {}
    size = total = 0
    try:
        for name, tensor in tensors:
            nbytes = tensor.numel() * tensor.element_size()
            if current and size + nbytes > max_shard_bytes:
                written.append(save_tensors(temp / f"{len(written)}.safetensors", current))
                current, size = {}, 0
            current[name] = tensor
            shard_of[name] = len(written)
            size += nbytes
            total += nbytes
        written.append(save_tensors(temp / f"{len(written)}.safetensors", current))
        n = len(written)
        names = [SINGLE_FILE] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        for stale in [folder / INDEX_FILE, folder / SINGLE_FILE, *folder.glob("model-*-of-*.safetensors")]:
            stale.unlink(missing_ok=True)
        final = [folder / name for name in names]
        for path, target in zip(written, final, strict=True):
            os.replace(path, target)
        if n > 1:
            weight_map = {name: names[k] for name, k in sorted(shard_of.items())}
            atomic_write_json(folder / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
        return final
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def save_model_folder(model, folder: str | os.PathLike) -> Path:
    """`model.save_pretrained(folder)` (config.json + model.safetensors, the same files) without a
    second copy of the weights: safetensors writes straight from the model's tensors into a
    temporary file, which then replaces model.safetensors. For a checkpoint as large as memory."""
    from safetensors.torch import save_file

    from moekit.models.pretrained import CONFIG_FILE, WEIGHTS_FILE

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if state["lm_head.weight"].data_ptr() == state["tok_emb.weight"].data_ptr():
        state["lm_head.weight"] = state["lm_head.weight"].clone()  # safetensors refuses shared memory
    temp = folder / f".{WEIGHTS_FILE}.tmp"
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, str(temp))
        with open(temp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(temp, folder / WEIGHTS_FILE)
    finally:
        temp.unlink(missing_ok=True)
    atomic_write_json(folder / CONFIG_FILE, model.model_header())
    return folder
