"""The trainable families and what the CLI and `moekit.load` need of each.

Each family module (`moekit.train.lm`, `.mtl`, `.seqrec`, `.retrieval`, `.dqn`) defines:

    CONFIG            the run config dataclass (sections model / data / train)
    fit(config, out, mode=..., log=...) -> TrainResult
    config_from_run(header) -> CONFIG          the run config back from a run folder's config.json
    evaluate_run(path, device, data_dir) -> dict   the test metrics again, from a finished run
    load_run(path, device) -> LoadedRun        the model and what serving needs beside it

Modules are imported only when a family is used, so `moekit --help` stays fast.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from moekit.config import build_dataclass, config_dict

MODULES = {
    "lm": "moekit.train.lm",
    "mtl": "moekit.train.mtl",
    "seqrec": "moekit.train.seqrec",
    "two-tower": "moekit.train.retrieval",
    "dqn": "moekit.train.dqn",
}
USE = {  # what a user does with a run of each family, for "this is an X run" messages
    "lm": "moekit eval lm / moekit generate",
    "mtl": "moekit eval mtl",
    "seqrec": "moekit eval seqrec / moekit recommend",
    "two-tower": "moekit eval two-tower / moekit retrieve",
    "dqn": "moekit eval dqn",
}


def family_module(family: str) -> ModuleType:
    """The training module of a family ('lm', 'mtl', 'seqrec', 'two-tower', 'dqn')."""
    if family not in MODULES:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(MODULES)}")
    return importlib.import_module(MODULES[family])


@dataclass
class LoadedRun:
    """A trained model and what using it needs: `moekit.load(RUN)` returns one."""

    family: str
    model: nn.Module
    """The model, in eval mode."""
    path: Path
    config: Any = None
    """The run config (sections model / data / train), or None for a model folder without them."""
    artifacts: dict[str, Any] = field(default_factory=dict)
    """feature_spec (mtl), items (seqrec, two-tower), tokenizer (lm), ..."""

    def data_config(self, data_dir: str | os.PathLike | None = None, needed_for: str = "evaluate") -> Any:
        """The run's data config; `data_dir` (`eval --data-dir`) takes the place of the file (`path`) or
        folder (`data_dir`) it names, for a run folder moved away from its data."""
        if self.config is None:
            raise ValueError(f"{self.path} is a saved model without its training config: nothing to {needed_for} "
                             f"it on")
        data = self.config.data
        if data_dir is None:
            return data
        uses_file = getattr(data, "path", None) is not None or not hasattr(data, "data_dir")
        return dataclasses.replace(data, **{"path" if uses_file else "data_dir": str(data_dir)})

    def __getattr__(self, name: str) -> Any:
        artifacts = self.__dict__.get("artifacts", {})
        if name in artifacts:
            return artifacts[name]
        raise AttributeError(f"{type(self).__name__} of a {self.__dict__.get('family')} run has no {name!r}")


def run_family(path: str | os.PathLike) -> tuple[str, dict]:
    """(family, config.json) of a run or model folder, with errors that say what the folder is."""
    from moekit.models.pretrained import read_model_header

    path = Path(path)
    if path.is_dir() and not (path / "config.json").is_file():
        steps = sorted(p.name for p in (path / "checkpoints").glob("step_*")) if (path / "checkpoints").is_dir() \
            else []
        seeds = sorted(p.name for p in path.glob("seed-*") if (p / "config.json").is_file())
        if seeds:
            raise FileNotFoundError(f"{path} holds several seeds' runs; pass one of them: "
                                    + ", ".join(str(path / s) for s in seeds))
        if steps:
            raise FileNotFoundError(f"{path} holds no finished model (no config.json); its step folders are "
                                    + ", ".join(steps))
    header = read_model_header(path)
    return header["family"], header


def expect_family(path: str | os.PathLike, family: str, command: str) -> dict:
    """config.json of `path`, which must be a `family` run: else one line saying what it is."""
    actual, header = run_family(path)
    if actual != family:
        raise ValueError(f"{path} is {_a(actual)} run, not {_a(family)} run: use {USE.get(actual, 'its own commands')} "
                         f"(`{command}` needs a `moekit train {family}` run)")
    return header


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiolmx" else f"a {word}"  # an mtl, an lm, a seqrec


def run_config(config_class: type, header: dict, options_class: type, options: dict) -> Any:
    """Rebuild a family's run config from config.json: its data and train sections as saved, its
    model section from the saved options (`options`: the model-config keys the options class has)."""
    where = "config.json"
    known = {f.name for f in dataclasses.fields(options_class)}
    model = build_dataclass(options_class, {k: v for k, v in options.items() if k in known}, f"{where}: model")
    hints = {f.name: f.type for f in dataclasses.fields(config_class)}
    sections = {"model": config_dict(model)}
    for name in hints:
        if name != "model" and name in header:
            sections[name] = header[name]
    return build_dataclass(config_class, sections, where)


def load(path: str | os.PathLike, device: str = "cpu") -> LoadedRun:
    """The model of a run folder (or of a folder written by `save_pretrained`), with its feature
    spec, item catalogue or tokenizer where its family has one."""
    family, _ = run_family(path)
    return family_module(family).load_run(Path(path), device)
