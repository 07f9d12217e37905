"""The run folder every `moekit train <family>` writes, the same for every family::

    RUN/config.json           {"format", "family", "architecture", "model": full model config,
                               "data": ..., "train": ..., "moekit_version"}
    RUN/model.safetensors     the run's model: the best state so far (early stopping) or the last one
    RUN/<artifacts>           what serving needs besides the weights: feature_spec.json (mtl),
                              items.json (seqrec, two-tower), tokenizer.json (lm)
    RUN/checkpoints/step_N/   model + trainer state (optimizer, RNG, loop counters) for --resume;
    RUN/checkpoints/latest.json   the newest N are kept, `latest.json` names the newest
    RUN/metrics.csv           one row per logged step or epoch; TensorBoard events in RUN/tensorboard/
    RUN/results.json          the final metrics (what `moekit eval <family>` reproduces)
    RUN/.lock                 held while a process trains into the folder

`model.safetensors` + `config.json` make a run folder a model folder too, so
`SASRec.from_pretrained(RUN)` and `moekit.load(RUN)` read it directly.

A new run refuses a folder that holds another run unless it resumes it (`mode='resume'`) or
replaces it (`mode='overwrite'`); the lock makes a second process training into the same folder
fail at once. Only the main process of a multi-process run writes (`writer=False` elsewhere).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moekit.config import ConfigError
from moekit.io import atomic_write_bytes, atomic_write_json, atomic_write_text, load_tensors
from moekit.models.pretrained import CONFIG_FILE, FORMAT, WEIGHTS_FILE, read_model_header
from moekit.train.checkpoint import find_checkpoint, load_trainer_state, save_checkpoint
from moekit.train.loop import EarlyStopping, RNGState

MODES = ("new", "resume", "overwrite")
RUN_FILES = (CONFIG_FILE, WEIGHTS_FILE, "results.json", "metrics.csv", "checkpoints")


class RunFolderError(ConfigError):
    """The run folder cannot be used as asked (holds another run, is locked, is not a run)."""


def is_run_folder(path: str | os.PathLike) -> bool:
    """Whether `path` holds a run (a config, a model, results, metrics or checkpoints)."""
    path = Path(path)
    return path.is_dir() and any((path / name).exists() for name in RUN_FILES)


class Run:
    """A run folder being written by a training loop (or nothing at all when `path` is None).

    Methods that write do nothing when the run has no folder or this process is not the writer,
    so a loop calls them unconditionally.
    """

    def __init__(self, path: str | os.PathLike | None, family: str, mode: str = "new",
                 writer: bool = True, tensorboard: bool = False) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES} (got {mode!r})")
        self.path = Path(path).resolve() if path is not None else None
        self.family, self.mode = family, mode
        self.writer = writer and self.path is not None
        self.metrics: list[dict] = []
        self.last_checkpoint: Path | None = None
        self._lock_fd: int | None = None
        self._created = False
        self._tensorboard = None
        self._want_tensorboard = tensorboard and self.writer
        self._purge_step: int | None = None
        if self.writer:
            self._claim()

    # --- claiming the folder -------------------------------------------------------------------

    @staticmethod
    def check_target(path: str | os.PathLike | None, mode: str) -> None:
        """Whether a run may go into `path` as `mode` says, without touching anything: call it before
        loading data, so a refused folder costs nothing."""
        if path is None:
            return
        path = Path(path)
        exists = is_run_folder(path)
        if mode == "resume" and not exists:
            raise RunFolderError(f"cannot resume: {path} holds no run (no {CONFIG_FILE} or checkpoints)")
        if mode == "new" and exists:
            raise RunFolderError(f"{path} already holds a run; pass --resume to continue it or --overwrite "
                                 f"to replace it (or choose another --out)")
        if path.exists() and not path.is_dir():
            raise RunFolderError(f"--out {path} is a file, not a folder")
        if path.is_dir() and not exists and any(p.name != ".lock" for p in path.iterdir()):
            raise RunFolderError(f"{path} is not empty and holds no moekit run; choose another --out")

    def _claim(self) -> None:
        path = self.path
        assert path is not None
        self.check_target(path, self.mode)
        exists = is_run_folder(path)
        self._created = not path.exists()
        path.mkdir(parents=True, exist_ok=True)
        self._lock()
        if self.mode == "overwrite" and exists:
            for child in path.iterdir():
                if child.name == ".lock":
                    continue
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()

    def _lock(self) -> None:
        import fcntl

        assert self.path is not None
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunFolderError(f"{self.path} is in use by {holder} (lock {self.path / '.lock'}); "
                                 f"wait for it to finish or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"moekit pid {os.getpid()}".encode())
        self._lock_fd = fd

    def close(self) -> None:
        """Flush logs and release the lock (also on errors: use the run as a context manager)."""
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.close()
        # A run that failed before it wrote its config (bad data, bad config) leaves no folder behind.
        if exc_type is not None and self._created and self.path is not None and \
                not (self.path / CONFIG_FILE).exists():
            shutil.rmtree(self.path, ignore_errors=True)

    # --- config and artifacts ------------------------------------------------------------------

    def write_config(self, model: nn.Module, sections: dict[str, Any], runtime_keys: tuple[str, ...] = ()) -> None:
        """config.json: the model header (family, architecture, full model config) + run sections.

        On resume, the saved config must equal the new one except for `runtime_keys` of the train
        section: changing lr, batch size, steps, seed, data or model is refused with the keys named.
        """
        if self.path is None:
            return
        header = model.model_header()  # type: ignore[attr-defined]
        content = {**header, **sections, "moekit_version": _version()}
        if self.mode == "resume":
            differing = config_differences(read_run_config(self.path), content, runtime_keys)
            if differing:
                raise RunFolderError(f"cannot resume {self.path}: the config differs in {'; '.join(differing)} "
                                     f"(start a new run with --out, or --overwrite this one)")
        if self.writer:
            atomic_write_json(self.path / CONFIG_FILE, content)

    def write_artifact(self, name: str, content: dict | list | bytes | str) -> None:
        """A file serving needs besides the weights (feature spec, item map, tokenizer), atomically."""
        if not self.writer:
            return
        assert self.path is not None
        if isinstance(content, bytes):
            atomic_write_bytes(self.path / name, content)
        elif isinstance(content, str):
            atomic_write_text(self.path / name, content)
        else:
            atomic_write_json(self.path / name, content)

    def save_model(self, model: nn.Module) -> None:
        """RUN/model.safetensors: the run's model as it stands (the best state, for early stopping)."""
        if self.writer:
            assert self.path is not None
            model.save_weights(self.path / WEIGHTS_FILE)  # type: ignore[attr-defined]

    def model_tensors(self) -> dict[str, torch.Tensor] | None:
        """The tensors of RUN/model.safetensors (the best state so far), or None before the first save."""
        if self.path is None or not (self.path / WEIGHTS_FILE).is_file():
            return None
        return load_tensors(self.path / WEIGHTS_FILE)

    # --- checkpoints for --resume --------------------------------------------------------------

    def checkpoint(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                   state: dict, tensors: dict[str, torch.Tensor] | None = None, keep: int = 2) -> None:
        """Write RUN/checkpoints/step_N atomically (model, optimizer, `state`, RNG `tensors`)."""
        if self.writer:
            assert self.path is not None
            self.last_checkpoint = save_checkpoint(self.path / "checkpoints", step, model, optimizer, state,
                                                   tensors, keep=keep)

    def resume_state(self, model: nn.Module, optimizer: torch.optim.Optimizer | None
                     ) -> tuple[dict, dict[str, torch.Tensor]]:
        """Load the newest checkpoint into `model` and `optimizer`; returns (state, RNG tensors)."""
        from moekit.train.checkpoint import load_model_weights

        assert self.path is not None
        ckpt = find_checkpoint(self.path / "checkpoints")
        load_model_weights(ckpt, model)
        state, tensors = load_trainer_state(ckpt, optimizer)
        self.last_checkpoint = ckpt
        self._purge_step = state["step"]
        self.metrics = [row for row in read_metrics(self.path / "metrics.csv") if _row_step(row) <= state["step"]]
        return state, tensors

    def checkpoint_epoch(self, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer, optimizer_steps: int,
                         rng: RNGState, keep: int, stopper: EarlyStopping | None = None, **state) -> None:
        """The checkpoint an epoch-based loop writes after `epoch`: weights, optimizer, its step count,
        every random stream and early stopping's record (plus `state`, e.g. a scheduler's)."""
        if stopper is not None:
            state["stopper"] = stopper.state()
        self.checkpoint(epoch, model, optimizer, {"optimizer_steps": optimizer_steps, **state, **rng.json()},
                        rng.tensors(), keep)

    def resume_epoch(self, model: nn.Module, optimizer: torch.optim.Optimizer, rng: RNGState,
                     stopper: EarlyStopping | None = None) -> tuple[int, int, dict]:
        """Restore what `checkpoint_epoch` wrote (early stopping's best state from RUN/model.safetensors);
        returns (epochs done, optimizer steps, the checkpoint's state)."""
        state, tensors = self.resume_state(model, optimizer)
        rng.restore(tensors, state)
        if stopper is not None:
            stopper.load_state(state["stopper"], self.model_tensors())
        return state["step"], state["optimizer_steps"], state

    def last_good(self) -> str:
        """The newest checkpoint or model file that exists (named by the non-finite guard)."""
        if self.last_checkpoint is not None and self.last_checkpoint.exists():
            return str(self.last_checkpoint)
        if self.path is not None and (self.path / WEIGHTS_FILE).is_file():
            return str(self.path / WEIGHTS_FILE)
        return ""

    # --- metrics and results -------------------------------------------------------------------

    def log(self, row: dict, step: int | None = None) -> None:
        """Append a row to metrics.csv (rewritten atomically) and its numbers to TensorBoard."""
        self.metrics.append(row)
        if not self.writer:
            return
        assert self.path is not None
        self.write_table("metrics.csv", self.metrics)
        if self._want_tensorboard and self._tensorboard is None:
            self._tensorboard = _summary_writer(self.path / "tensorboard", self._purge_step)
            self._want_tensorboard = self._tensorboard is not None
        if self._tensorboard is not None:
            at = step if step is not None else _row_step(row)
            for key, value in row.items():
                if isinstance(value, int | float) and not isinstance(value, bool) and key not in ("step", "epoch"):
                    self._tensorboard.add_scalar(key.replace(" ", "_"), float(value), at)
            self._tensorboard.flush()

    def write_table(self, name: str, rows: list[dict]) -> None:
        """Another CSV of the run (e.g. the LM's per-layer expert load), rewritten atomically."""
        if not self.writer or not rows:
            return
        assert self.path is not None
        columns: list[str] = []
        for r in rows:
            columns.extend(k for k in r if k not in columns)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.path / name, buffer.getvalue())

    def write_results(self, results: dict) -> None:
        if self.writer:
            assert self.path is not None
            atomic_write_json(self.path / "results.json", results)

    def file(self, name: str) -> Path | None:
        """RUN/name for a file the caller writes itself (plots), or None when nothing is written."""
        return self.path / name if self.writer and self.path is not None else None


def read_run_config(path: str | os.PathLike) -> dict:
    """config.json of a run folder (checked to be a moekit run)."""
    header = read_model_header(path)
    if header.get("format") != FORMAT:
        raise ValueError(f"{Path(path) / CONFIG_FILE} is not a moekit run config (format {header.get('format')!r})")
    return header


def config_differences(saved: dict, new: dict, runtime_keys: tuple[str, ...] = ()) -> list[str]:
    """Dotted keys whose values differ between two run configs (runtime keys and versions ignored)."""
    ignored = {"moekit_version", "runtime_keys"} | {f"train.{k}" for k in runtime_keys}
    out: list[str] = []

    def walk(a: Any, b: Any, prefix: str) -> None:
        if prefix in ignored:
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else key)
        elif a != b:
            out.append(f"{prefix} ({a!r} -> {b!r})")

    walk(json.loads(json.dumps(saved)), json.loads(json.dumps(new)), "")
    return out


def read_metrics(path: Path) -> list[dict]:
    """The rows of a run's CSV, numbers as numbers (a resumed run's history reads like a fresh one's)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _number(text: str):
    if text in ("", None):
        return text
    try:
        value = float(text)
    except ValueError:
        return text
    return int(text) if value.is_integer() and text.lstrip("-").isdigit() else value


def _row_step(row: dict) -> int:
    for key in ("epoch", "step"):
        if row.get(key) not in (None, ""):
            return int(float(row[key]))
    return 0


def _summary_writer(folder: Path, purge_step: int | None = None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("moekit: tensorboard is not installed (pip install 'moekit[train]'); logging CSV only",
              file=sys.stderr)
        return None
    return SummaryWriter(str(folder), purge_step=purge_step)


def _version() -> str:
    from moekit import __version__

    return __version__
