"""`save_pretrained` / `from_pretrained` for every moekit model: `config.json` + `model.safetensors`.

A model folder holds::

    config.json         {"format": "moekit/1", "family": "seqrec", "architecture": "FAME", "model": {...}}
    model.safetensors   the state dict (weights and persistent buffers)

A run folder written by `moekit train` has the same two files (its `config.json` adds the `train`
and `data` sections), so `from_pretrained` reads a run folder as well as a saved model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from moekit.config import build_dataclass, config_dict
from moekit.io import atomic_write_json, load_tensors, save_tensors

FORMAT = "moekit/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

# architecture name -> class, filled as model classes are defined (see Pretrained.__init_subclass__).
ARCHITECTURES: dict[str, type[Pretrained]] = {}


class Pretrained:
    """Mixin for `nn.Module` models with a dataclass `config`: save and load a model folder.

    A subclass sets `config_class` (its config dataclass) and `family` (the `moekit train` family).
    """

    config_class: ClassVar[type]
    family: ClassVar[str]
    config: Any

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        ARCHITECTURES[cls.__name__] = cls

    def model_header(self) -> dict:
        """The model part of `config.json`: format, family, architecture and the model config."""
        return {"format": FORMAT, "family": self.family, "architecture": type(self).__name__,
                "model": config_dict(self.config)}

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write `config.json` and `model.safetensors` into `folder` (created if needed), each atomically."""
        folder = Path(folder)
        self.save_weights(folder / WEIGHTS_FILE)
        atomic_write_json(folder / CONFIG_FILE, self.model_header())
        return folder

    def save_weights(self, path: str | os.PathLike) -> Path:
        """The state dict as one safetensors file (tied weights are stored once per name)."""
        assert isinstance(self, nn.Module)
        # clone(): safetensors refuses tensors that share memory (tied embeddings); loading re-ties them.
        return save_tensors(path, {k: v.clone() for k, v in self.state_dict().items()})

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> Any:
        """The model saved in `folder` (a model folder or a run folder), in eval mode.

        Called on a base class (`SASRec`), it returns the saved subclass (`FAME`) when that is one
        of its subclasses. `dtype` None keeps the stored floating-point dtype.
        """
        folder = Path(folder)
        header = read_model_header(folder)
        klass = ARCHITECTURES.get(header["architecture"])
        if klass is None or not issubclass(klass, cls):
            raise ValueError(f"{folder / CONFIG_FILE} holds a {header['architecture']} ({header['family']}) "
                             f"model, not a {cls.__name__}")
        config = build_dataclass(klass.config_class, header["model"], f"{folder / CONFIG_FILE}: model")
        model = klass(config)
        tensors = load_tensors(folder / WEIGHTS_FILE, str(device))
        stored = next((t.dtype for t in tensors.values() if t.is_floating_point()), None)
        model = model.to(device=device, dtype=dtype or stored or torch.float32)
        load_weights(model, tensors, folder / WEIGHTS_FILE)
        return model.eval()


def read_model_header(folder: str | os.PathLike) -> dict:
    """`config.json` of a model or run folder, checked to name a family, an architecture and a model config."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        if not Path(folder).exists():
            raise FileNotFoundError(f"{folder} does not exist")
        raise FileNotFoundError(f"{path} not found: {folder} is not a moekit model or run folder")
    try:
        header = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    missing = [k for k in ("family", "architecture", "model") if k not in header] if isinstance(header, dict) \
        else ["family", "architecture", "model"]
    if missing:
        raise ValueError(f"{path} is not a moekit model config (missing {', '.join(missing)})")
    return header


def load_weights(model: nn.Module, tensors: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Load `tensors` into `model`; a mismatch names the file and the differing keys and shapes."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if k in tensors and tensors[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {_preview(missing)}")
        if unexpected:
            parts.append(f"unexpected {_preview(unexpected)}")
        if wrong:
            parts.append(f"shape mismatch {_preview(wrong)}")
        raise ValueError(f"weights in {source} do not match the model: {'; '.join(parts)}")
    model.load_state_dict(tensors)


def _preview(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")
