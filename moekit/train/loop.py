"""The pieces every training loop in moekit is made of.

Each family's `fit` (lm, mtl, seqrec, two-tower, dqn) reads top to bottom and calls these:

    settings   `TrainSettings`: the `train` section every family shares (seed, device, lr, ...)
    seeding    `seed_everything`, `RNGState` (captured into checkpoints for an exact resume)
    device     `resolve_device` ('auto' | 'cpu' | 'cuda', with one clear line when CUDA is absent)
    optimizer  `build_optimizer` (Adam/AdamW, weight decay on matrices only), `cosine_lr`
    step       `optimizer_step`: the non-finite guard (loss and gradients checked before the
               update), clipping, the update
    stopping   `EarlyStopping`: keeps the best state, restores it, survives a resume
    progress   `progress_bar` (tqdm with rates)

The run folder around a loop (checkpoints, metrics, results, locking) is `moekit.train.run`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from moekit.config import ConfigError, check_choice, check_int, check_number

DEVICES = ("auto", "cpu", "cuda")


@dataclass
class TrainSettings:
    """The `train` section every family shares. Families subclass it to add their own keys and to
    set their own defaults (a subclass may redeclare a field with another default)."""

    seed: int = 0
    """Seeds Python, NumPy and torch; the same seed gives the same numbers."""
    device: str = "auto"
    """'auto' (cuda when available, else cpu), 'cpu' or 'cuda'."""
    threads: int | None = None
    """torch CPU threads (None: torch's default)."""
    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay on weight matrices and embeddings (none on norms and biases)."""
    batch_size: int = 256
    """Training rows (sequences, interactions) per optimizer step, over all processes."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this (0: no clipping)."""
    keep_checkpoints: int = 2
    """How many step checkpoints a run folder keeps (the newest)."""
    progress: bool = True
    """Show progress bars."""

    RUNTIME_KEYS: ClassVar[tuple[str, ...]] = ("device", "threads", "keep_checkpoints", "progress")
    """Keys that may change on `--resume` without changing what is trained."""

    def __post_init__(self) -> None:
        check_int("train.seed", self.seed, 0)
        check_choice("train.device", self.device, DEVICES)
        if self.threads is not None:
            check_int("train.threads", self.threads, 1)
        check_number("train.lr", self.lr, 0, strict_min=True)
        check_number("train.weight_decay", self.weight_decay, 0)
        check_int("train.batch_size", self.batch_size, 1)
        check_number("train.grad_clip", self.grad_clip, 0)
        check_int("train.keep_checkpoints", self.keep_checkpoints, 1)
        if not isinstance(self.progress, bool):
            raise ConfigError(f"train.progress must be true or false (got {self.progress!r})")


def run_config_class(name: str, model: type, data: type, train: type, doc: str,
                     check: Callable[[Any], None] | None = None) -> type:
    """A family's run config: a dataclass with the sections `model`, `data` and `train` (each defaulting
    to its class's defaults), documented, and `check(config)` run across sections at construction."""
    import dataclasses
    import inspect

    fields = [(section, cls, dataclasses.field(default_factory=cls))
              for section, cls in (("model", model), ("data", data), ("train", train))]
    namespace = {"__doc__": doc}
    if check is not None:
        namespace["__post_init__"] = lambda self: check(self)
    cls = dataclasses.make_dataclass(name, fields, namespace=namespace)
    cls.__module__ = inspect.stack()[1].frame.f_globals["__name__"]
    from moekit.config import documented

    return documented(cls)


# --- seeding and devices --------------------------------------------------------------------


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (CPU and CUDA); returns a CPU generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@dataclass
class RNGState:
    """Every random stream a loop draws from, saved with a checkpoint and restored on resume, so a
    resumed run takes exactly the batches and samples the uninterrupted run would have taken."""

    generator: torch.Generator | None = None
    """The loop's data-order generator."""
    numpy: np.random.Generator | None = None
    """The loop's NumPy generator (negative sampling, environments)."""

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"rng.torch": torch.get_rng_state()}
        if self.generator is not None:
            out["rng.data"] = self.generator.get_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out["rng.cuda"] = torch.cuda.get_rng_state()
        return out

    def json(self) -> dict:
        return {"numpy": self.numpy.bit_generator.state} if self.numpy is not None else {}

    def restore(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        torch.set_rng_state(tensors["rng.torch"])
        if self.generator is not None:
            self.generator.set_state(tensors["rng.data"])
        if "rng.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.cuda"])
        if self.numpy is not None and "numpy" in state:
            self.numpy.bit_generator.state = state["numpy"]


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available else cpu; 'cuda' without a usable GPU is one clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build of torch" if torch.version.cuda is None else "no visible GPU"
        raise ConfigError(f"device={name!r} but CUDA is not available ({build}); use --device cpu or auto")
    return device


def set_threads(threads: int | None) -> None:
    """torch's CPU threads, when given."""
    if threads is not None:
        torch.set_num_threads(threads)


# --- optimizer and schedule -----------------------------------------------------------------


def build_optimizer(model: nn.Module | list[nn.Module], settings: TrainSettings, kind: str = "adamw",
                    betas: tuple[float, float] = (0.9, 0.999), decay_all: bool = False,
                    fused: bool = True) -> torch.optim.Optimizer:
    """Adam or AdamW over the trainable parameters of `model` (one module or several).

    AdamW decays only matrices and embeddings (dim >= 2), never norms and biases (`decay_all`: every
    parameter); plain Adam adds `weight_decay * w` to the gradient of every parameter (the L2 penalty
    torch's Adam implements). `fused`: the fused kernel (one pass over all parameters, CPU and CUDA)
    where torch has it, else torch's default one (numerically a hair apart: kept where recorded
    results were made with it).
    """
    modules = model if isinstance(model, list) else [model]
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    if kind == "adamw" and decay_all:
        groups: Any = params
        make = torch.optim.AdamW
    elif kind == "adamw":
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": settings.weight_decay},
                       {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        make = torch.optim.AdamW
    elif kind == "adam":
        groups, make = params, torch.optim.Adam
    else:
        raise ValueError(f"unknown optimizer {kind!r}; expected adamw or adam")
    kwargs = {"lr": settings.lr, "betas": betas}
    if kind == "adam" or decay_all:
        kwargs["weight_decay"] = settings.weight_decay
    if fused:
        try:
            return make(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError):  # no fused kernel for this device / dtype
            pass
    return make(groups, **kwargs)  # torch's default implementation for the device


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def cosine_lr(step: int, lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay to lr * min_lr_ratio at `total_steps`."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    min_lr = lr * min_lr_ratio
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


# --- the guarded step -----------------------------------------------------------------------


class NonFiniteError(RuntimeError):
    """A loss or gradient became NaN or infinite; the step was not taken, the last good checkpoint is kept."""


def gradient_norm(parameters: list[torch.Tensor], max_norm: float = 0.0) -> torch.Tensor:
    """The global L2 norm of the gradients; clips them to `max_norm` when it is > 0 (and finite)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(grads)
    if max_norm > 0 and bool(torch.isfinite(norm)):
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor | float, step: int,
                   last_good: str | Callable[[], str] = "", grad_clip: float = 0.0,
                   parameters: list[torch.Tensor] | None = None) -> float:
    """Check the (already back-propagated) loss and the gradients, clip, update, zero the gradients.

    A non-finite loss or gradient norm raises `NonFiniteError` before the update, so no weight
    ever becomes NaN and no checkpoint with a non-finite weight is written. `last_good` (a string,
    or a function asked only on failure) names the checkpoint the message points at. Returns the
    gradient norm (before clipping).
    """
    if parameters is None:
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
    norm = gradient_norm(parameters, grad_clip)
    loss_value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
    if not (math.isfinite(loss_value) and bool(torch.isfinite(norm))):
        optimizer.zero_grad(set_to_none=True)
        what = f"loss became {loss_value}" if not math.isfinite(loss_value) else \
            f"gradient norm became {float(norm)} (loss {loss_value:.6g})"
        last_good = last_good() if callable(last_good) else last_good
        kept = f"; the last good checkpoint is {last_good}" if last_good else "; no checkpoint had been written yet"
        raise NonFiniteError(f"{what} at step {step}; stopped before the update{kept}")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


# --- early stopping -------------------------------------------------------------------------


class EarlyStopping:
    """Stop after `patience` evaluations without a better `metric`; keep the best state to restore.

    `update(epoch, value, model)` returns True when `value` is the best so far (the caller saves the
    model then). `state()` / `load_state()` carry the counters through a checkpoint; the best
    weights themselves are the run folder's model file.
    """

    def __init__(self, metric: str, patience: int, mode: str = "max") -> None:
        check_choice("mode", mode, ("max", "min"))
        self.metric, self.patience, self.mode = metric, patience, mode
        self.best = -math.inf if mode == "max" else math.inf
        self.best_epoch = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.stale = 0

    def is_better(self, value: float) -> bool:
        if math.isnan(value):
            return False
        return value > self.best if self.mode == "max" else value < self.best

    def update(self, epoch: int, value: float, model: nn.Module) -> bool:
        if self.is_better(value):
            self.best, self.best_epoch, self.stale = value, epoch, 0
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return True
        self.stale += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.stale >= self.patience

    def restore(self, model: nn.Module) -> None:
        """Load the best state into `model` (the last state when no evaluation improved, e.g. all NaN)."""
        if self.best_state is not None:
            model.load_state_dict(self.best_state)

    def state(self) -> dict:
        return {"metric": self.metric, "best": self.best, "best_epoch": self.best_epoch, "stale": self.stale}

    def load_state(self, state: dict, best_state: dict[str, torch.Tensor] | None) -> None:
        self.best, self.best_epoch, self.stale = state["best"], state["best_epoch"], state["stale"]
        self.best_state = best_state


# --- progress -------------------------------------------------------------------------------


def progress_bar(enabled: bool, total: int | None = None, initial: int = 0, unit: str = "step",
                 desc: str = "", leave: bool = True, unit_scale: bool = False):
    """A tqdm bar with rates (disabled: a no-op bar with the same methods)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit=unit, desc=desc or None, disable=not enabled, leave=leave,
                dynamic_ncols=True, mininterval=0.5, unit_scale=unit_scale)
