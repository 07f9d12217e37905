"""Training a (MoE) transformer language model: `train_lm(config) -> LMResults`.

The pieces are separate functions: `build_data` -> `build_model` -> `build_optimizer` ->
`train_step` in a loop, with `evaluate` and checkpoints around it. Nothing here touches process
groups: what changes with several processes (which rows of a batch are this rank's, gradient
sync and clipping, checkpoint format, who writes files) is a `Parallelism` passed to `train_lm`;
`moekit.distributed.lm.ExpertParallel` is the expert-parallel one.
"""

from __future__ import annotations

import csv
import io
import math
import time
import types
import typing
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moekit.data.text import TokenData, prepare_text_data
from moekit.io import atomic_write_json, atomic_write_text
from moekit.models.transformer import Transformer, TransformerConfig
from moekit.train.balancing import attach_expert_bias_updates
from moekit.train.checkpoint import find_checkpoint, load_model_weights, load_trainer_state, save_checkpoint
from moekit.train.reproducibility import check_finite, seed_everything


@dataclass
class LMDataConfig:
    path: str = "../shared/data/text/tinyshakespeare.txt"
    """A text file, or a folder of .txt/.raw files."""
    tokenizer: str = "byte"
    """'byte' (256 ids, nothing to train) or 'bpe' (trained on the training split, saved with the run)."""
    bpe_vocab_size: int = 4096
    val_fraction: float = 0.1
    """The last fraction of the text is held out for validation."""
    cache_dir: str | None = None
    """Where token ids are memory-mapped; default <out_dir>/data."""


@dataclass
class LMTrainConfig:
    model: TransformerConfig = field(default_factory=TransformerConfig)
    data: LMDataConfig = field(default_factory=LMDataConfig)
    out_dir: str = "runs/lm"
    seed: int = 1337
    device: str = "auto"
    """'auto' = cuda if available, else cpu."""
    dtype: str = "auto"
    """Autocast dtype: 'auto' = bfloat16 where the device runs it fast (CUDA sm80+), else float32."""
    threads: int | None = None
    """torch CPU threads (None: torch's default)."""

    batch_size: int = 32
    grad_accum: int = 1
    """Micro-batches per optimizer step (tokens per step = batch_size * grad_accum * block_size)."""
    max_tokens: int = 5_000_000
    """Training length in tokens, rounded up to whole steps ..."""
    max_steps: int | None = None
    """... unless this is set."""

    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    """The cosine decays to lr * min_lr_ratio."""
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""

    log_interval: int = 10
    eval_interval: int = 200
    eval_tokens: int = 32768
    """Validation tokens per periodic evaluation (0 = the whole split)."""
    final_eval_tokens: int = 0
    """Validation tokens for the final evaluation (0 = the whole split)."""
    checkpoint_interval: int = 500
    keep_checkpoints: int = 2
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "log_interval", "eval_interval", "checkpoint_interval",
                     "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype must be auto, float32 or bfloat16 (got {self.dtype!r})")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"need lr > 0 and 0 <= min_lr_ratio <= 1 (got {self.lr}, {self.min_lr_ratio})")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.model.block_size

    @property
    def total_steps(self) -> int:
        return self.max_steps or math.ceil(self.max_tokens / self.tokens_per_step)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LMResults:
    out_dir: str
    steps: int
    tokens: int
    val_loss: float
    """Final mean validation cross-entropy (nats per token)."""
    val_bits_per_byte: float
    train_tokens_per_s: float
    """Training throughput of this session (forward, backward and optimizer; no eval or checkpoints)."""
    peak_memory_mb: float
    parameters: dict[str, int]
    train_seconds: float
    history: list[dict] = field(default_factory=list, repr=False)


# --- config files ---------------------------------------------------------------------------


def load_lm_config(path: str | None = None, overrides: Iterable[str] = ()) -> LMTrainConfig:
    """A YAML file (sections `model`, `data`, plus training keys) with `a.b=value` overrides on top.

    Unknown keys fail; an override must match its field's type (`lr=1e-3`, `model.moe=null`).
    """
    import yaml

    data: dict = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError as error:
            raise FileNotFoundError(f"config file {path} does not exist") from error
        except yaml.YAMLError as error:
            raise ValueError(f"config file {path} is not valid YAML: {error}") from error
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold a mapping of keys, not {type(data).__name__}")
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like key=value (e.g. model.n_layer=6)")
        value = yaml.safe_load(text) if text else ""
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
            try:
                value = float(value)
            except ValueError:
                pass
        target = data
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(target.get(part), dict):
                target[part] = {}
            target = target[part]
        target[leaf] = value
    return build_dataclass(LMTrainConfig, data, "config")


def build_dataclass(cls, data: dict, where: str):
    """Construct dataclass `cls` from a dict, checking keys and value types recursively."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(f'{where}.{k}' for k in unknown)}; "
                         f"expected some of {', '.join(names)}")
    data = dict(data)
    if cls is TransformerConfig and isinstance(data.get("moe"), dict):
        # The MoE layers take the model's width unless the file says otherwise.
        data["moe"] = {"d_model": data.get("d_model", TransformerConfig.d_model), **data["moe"]}
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as error:
        raise ValueError(f"{where}: {error}") from error


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, where)
            except ValueError as error:
                errors.append(str(error))
        raise ValueError(errors[0] if len(errors) == 1 else f"{where}={value!r} matches none of {hint}")
    if is_dataclass(hint):
        return value if isinstance(value, hint) else build_dataclass(hint, value, where)
    if hint is bool and not isinstance(value, bool):
        raise ValueError(f"{where} must be true or false (got {value!r})")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"{where} must be an integer (got {value!r})")
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{where} must be a number (got {value!r})")
        return float(value)
    if hint is str and not isinstance(value, str):
        raise ValueError(f"{where} must be a string (got {value!r})")
    return value


# --- setup ----------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_context(device: torch.device, dtype: str):
    """bf16 autocast where it pays off; float32 (no autocast) otherwise."""
    if dtype == "auto":
        fast_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        dtype = "bfloat16" if fast_bf16 else "float32"
    if dtype == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def build_data(config: LMTrainConfig) -> TokenData:
    data_cfg = config.data
    return prepare_text_data(data_cfg.path, _data_cache(config), data_cfg.tokenizer, data_cfg.bpe_vocab_size,
                             data_cfg.val_fraction)


def build_model(model_config: TransformerConfig, device: torch.device) -> Transformer:
    return Transformer(model_config).to(device)


def build_optimizer(model: nn.Module, config: LMTrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (weights, embeddings, experts), none on norms and biases."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2))


def lr_at(step: int, config: LMTrainConfig) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay to lr * min_lr_ratio at the last step."""
    total, warmup = config.total_steps, config.warmup_steps
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    min_lr = config.lr * config.min_lr_ratio
    return min_lr + 0.5 * (config.lr - min_lr) * (1 + math.cos(math.pi * progress))


@dataclass
class StepResult:
    loss: float
    lm_loss: float
    aux_loss: float
    grad_norm: float
    expert_counts: dict[int, torch.Tensor]
    dropped_tokens: dict[int, int]


@dataclass
class Accumulated:
    """What `forward_backward` gathered over the micro-batches of one optimizer step."""
    losses: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    """Per micro-batch (loss, lm_loss, aux_loss), detached."""
    expert_counts: dict[int, torch.Tensor]
    dropped_tokens: dict[int, int]


def forward_backward(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
                     autocast=nullcontext) -> Accumulated:
    """Forward and backward over the micro-batches, each loss scaled by 1/len(batches) (accumulation)."""
    losses = []
    counts: dict[int, torch.Tensor] = {}
    dropped: dict[int, int] = {}
    for x, y in batches:
        with autocast():
            _, out = model(x, y)
        (out.loss / len(batches)).backward()
        losses.append((out.loss.detach(), out.lm_loss.detach(), out.aux_loss.detach()))
        for layer, c in out.expert_counts.items():
            counts[layer] = counts[layer] + c if layer in counts else c.detach().clone()
            dropped[layer] = dropped.get(layer, 0) + out.dropped_tokens[layer]
    return Accumulated(losses, counts, dropped)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer,
               batches: Iterable[tuple[torch.Tensor, torch.Tensor]], grad_clip: float,
               autocast=nullcontext, step: int = 0, checkpoint_hint: str = "") -> StepResult:
    """One optimizer step over the given micro-batches (gradient accumulation).

    The loss is checked before the optimizer step, so a NaN never reaches the weights.
    """
    batches = list(batches)
    acc = forward_backward(model, batches, autocast)
    total = None
    lm_sum = aux_sum = 0.0
    for loss, lm_loss, aux_loss in acc.losses:
        total = loss if total is None else total + loss
        lm_sum += lm_loss.item()
        aux_sum += float(aux_loss)
    n = len(batches)
    loss_sum = float(total) / n
    check_finite(total, step, checkpoint_hint)
    grad_norm = 0.0
    if grad_clip > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_sum, lm_sum / n, aux_sum / n, grad_norm, acc.expert_counts, acc.dropped_tokens)


@torch.no_grad()
def evaluate(model: nn.Module, data: TokenData, block_size: int, batch_size: int, max_tokens: int = 0,
             autocast=nullcontext, split: str = "val") -> tuple[float, int]:
    """Mean cross-entropy (nats/token) over consecutive windows of a split, and the tokens scored."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for x, y in data.sequential_batches(split, batch_size, block_size, max_tokens or None):
        with autocast():
            _, out = model(x.to(device), y.to(device))
        nll += float(out.lm_loss) * y.numel()
        count += y.numel()
    model.train(was_training)
    return nll / count, count


def bits_per_byte(loss: float, tokens: int, data: TokenData) -> float:
    """nats/token -> bits/byte, for the validation text covered by `tokens` of its tokens."""
    bytes_covered = data.val_bytes * tokens / len(data.val)
    return loss * tokens / bytes_covered / math.log(2)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# --- logging --------------------------------------------------------------------------------

METRIC_COLUMNS = ["step", "tokens", "lr", "loss", "lm_loss", "aux_loss", "grad_norm", "val_loss",
                  "tokens_per_s", "elapsed_s"]


class RunLogger:
    """metrics.csv and expert_load.csv (rewritten atomically) plus TensorBoard, if installed."""

    def __init__(self, out_dir: Path, resume_step: int | None, use_tensorboard: bool) -> None:
        self.out_dir = out_dir
        self.metrics = self._read(out_dir / "metrics.csv", resume_step)
        self.load_rows = self._read(out_dir / "expert_load.csv", resume_step)
        self.writer = None
        if use_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("moekit: tensorboard is not installed (pip install 'moekit[train]'); logging CSV only")
            else:
                self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resume_step)

    @staticmethod
    def _read(path: Path, resume_step: int | None) -> list[dict]:
        if resume_step is None or not path.is_file():
            return []
        with open(path, newline="") as f:
            return [row for row in csv.DictReader(f) if int(row["step"]) <= resume_step]

    def log(self, row: dict) -> None:
        self.metrics.append(row)
        if self.writer is not None:
            for key in ("loss", "lm_loss", "aux_loss", "lr", "grad_norm", "val_loss", "tokens_per_s"):
                if row.get(key) not in (None, ""):
                    self.writer.add_scalar(f"train/{key}" if key != "val_loss" else "val/loss",
                                           float(row[key]), row["step"])

    def log_expert_load(self, step: int, counts: dict[int, torch.Tensor], dropped: dict[int, int]) -> None:
        for layer, c in counts.items():
            total = float(c.sum())
            frac = (c.double() / max(total, 1)).tolist()
            mean = 1 / len(frac)
            row = {"step": step, "layer": layer, "max_over_mean": max(frac) / mean,
                   "dropped_fraction": dropped.get(layer, 0) / max(total + dropped.get(layer, 0), 1)}
            row.update({f"e{e}": f for e, f in enumerate(frac)})
            self.load_rows.append(row)
            if self.writer is not None:
                self.writer.add_scalar(f"experts/layer{layer}_max_over_mean", row["max_over_mean"], step)
                self.writer.add_scalar(f"experts/layer{layer}_dropped_fraction", row["dropped_fraction"],
                                       step)

    def flush(self) -> None:
        self._write(self.out_dir / "metrics.csv", self.metrics, METRIC_COLUMNS)
        if self.load_rows:
            columns = list(self.load_rows[-1].keys())
            self._write(self.out_dir / "expert_load.csv", self.load_rows, columns)
        if self.writer is not None:
            self.writer.flush()

    @staticmethod
    def _write(path: Path, rows: list[dict], columns: list[str]) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(path, buffer.getvalue())

    def close(self) -> None:
        self.flush()
        if self.writer is not None:
            self.writer.close()


# --- the loop -------------------------------------------------------------------------------


class Parallelism:
    """How `train_lm` runs across processes; this base class is one process on one device.

    `moekit.distributed.lm.ExpertParallel` overrides these methods; the loop itself (schedule,
    data order, evaluation, logging, resume) is the same for both, so a multi-process run sees the
    batches and takes the steps of the single-process one.
    """

    is_main_process = True
    """Only the main process writes config, logs, plots and results (every process trains and evaluates);
    read after `setup`."""

    def setup(self, config: LMTrainConfig) -> torch.device:
        """Check the config, start whatever the processes need; returns this process's device."""
        return resolve_device(config.device)

    def barrier(self) -> None:
        """Wait until every process gets here (the main one tokenizes the data before the others read it)."""

    def parallelize(self, model: nn.Module) -> nn.Module:
        """Wrap the built model, before the optimizer sees its parameters."""
        return model

    def attach_expert_bias_updates(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        attach_expert_bias_updates(model, optimizer)  # loss-free balancing: a no-op without bias_update_rate

    def local_rows(self, batch_BT: torch.Tensor) -> torch.Tensor:
        """This process's rows of a global batch (every process draws the same global batch)."""
        return batch_BT

    def train_step(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                   batches: list[tuple[torch.Tensor, torch.Tensor]], grad_clip: float, autocast=nullcontext,
                   step: int = 0, checkpoint_hint: str = "") -> StepResult:
        """One optimizer step; losses and the clipped gradient norm are those of the global batch."""
        return train_step(model, optimizer, batches, grad_clip, autocast, step, checkpoint_hint)

    def find_checkpoint(self, ckpt_root: Path) -> Path:
        return find_checkpoint(ckpt_root)

    def save_checkpoint(self, ckpt_root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                        state: dict, tensors: dict[str, torch.Tensor], files: dict, keep: int) -> Path:
        """Save the model, optimizer, JSON `state` (with "tokens"), RNG `tensors` and `files`; returns the folder."""
        return save_checkpoint(ckpt_root, step, model, optimizer, state, tensors, files, keep)

    def load_checkpoint(self, ckpt: Path, model: nn.Module,
                        optimizer: torch.optim.Optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
        """Load the weights and optimizer; returns (state with "step" and "tokens", RNG tensors)."""
        load_model_weights(ckpt, model)
        return load_trainer_state(ckpt, optimizer)

    def results_extra(self) -> dict:
        """Extra keys for results.json."""
        return {}


def train_lm(config: LMTrainConfig, *, resume: bool = False, stop_at_step: int | None = None,
             parallelism: Parallelism | None = None) -> LMResults:
    """Train (or, with `resume`, continue) a language model as `config` says; returns its results.

    `stop_at_step` ends the session early (after saving a checkpoint) without changing the
    schedule, so a later `resume=True` continues exactly. `parallelism` says how the run spreads
    over processes (default: one process); call on every process.
    """
    par = parallelism or Parallelism()
    out_dir = Path(config.out_dir)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = par.setup(config)
    main = par.is_main_process
    generator = seed_everything(config.seed)  # the data order: random windows drawn from this
    if main:  # the main process tokenizes into the cache; the others then open it
        out_dir.mkdir(parents=True, exist_ok=True)
        data = build_data(config)
    par.barrier()
    if not main:
        data = build_data(config)
    if data.tokenizer.vocab_size > config.model.vocab_size:
        raise ValueError(f"the {data.tokenizer.kind} tokenizer has {data.tokenizer.vocab_size} ids but "
                         f"model.vocab_size={config.model.vocab_size}; set model.vocab_size to at least that")
    model = build_model(config.model, device)
    # Of the whole model, before parallelize may shard its experts.
    params = model.num_parameters() if isinstance(model, Transformer) else {}
    model = par.parallelize(model)
    optimizer = build_optimizer(model, config)
    par.attach_expert_bias_updates(model, optimizer)
    autocast = lambda: autocast_context(device, config.dtype)  # noqa: E731

    config_json = config.to_dict()
    tokenizer_bytes = (Path(_data_cache(config)) / "tokenizer.json").read_bytes()
    ckpt_root = out_dir / "checkpoints"
    step, tokens = 0, 0
    resume_step = None
    last_ckpt = ["(none saved yet)"]
    if resume:
        ckpt = par.find_checkpoint(ckpt_root)
        _check_same_config(ckpt / "config.json", config_json)
        state, tensors = par.load_checkpoint(ckpt, model, optimizer)
        torch.set_rng_state(tensors["rng.torch"])
        generator.set_state(tensors["rng.data"])
        if device.type == "cuda" and "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"], device)
        step, tokens = state["step"], state["tokens"]
        resume_step = step
        last_ckpt[0] = str(ckpt)
    elif main:
        atomic_write_json(out_dir / "config.json", config_json)
        (out_dir / "tokenizer.json").write_bytes(tokenizer_bytes)
    logger = RunLogger(out_dir, resume_step, config.tensorboard) if main else None

    def checkpoint() -> None:
        tensors = {"rng.torch": torch.get_rng_state(), "rng.data": generator.get_state()}
        if device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
        schedule = {"lr": config.lr, "warmup_steps": config.warmup_steps, "total_steps": total_steps,
                    "min_lr_ratio": config.min_lr_ratio}
        state = {"tokens": tokens, "schedule": schedule,
                 "data_position": "rng.data holds the window sampler's state after this step"}
        last_ckpt[0] = str(par.save_checkpoint(ckpt_root, step, model, optimizer, state, tensors,
                                               {"config.json": config_json, "tokenizer.json": tokenizer_bytes},
                                               config.keep_checkpoints))

    total_steps = config.total_steps
    end_step = min(total_steps, stop_at_step) if stop_at_step is not None else total_steps
    train_seconds, session_tokens = 0.0, 0
    started = time.perf_counter()
    load_counts: dict[int, torch.Tensor] = {}
    load_dropped: dict[int, int] = {}
    bar = _progress(config.progress and main, step, total_steps)
    model.train()
    try:
        while step < end_step:
            lr = lr_at(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            t0 = time.perf_counter()
            batches = [tuple(par.local_rows(t).to(device)
                             for t in data.get_batch("train", config.batch_size, config.model.block_size,
                                                     generator))
                       for _ in range(config.grad_accum)]
            result = par.train_step(model, optimizer, batches, config.grad_clip, autocast, step + 1,
                                    last_ckpt[0])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
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
                # Every process evaluates the same windows (expert parallelism needs all of them in a forward).
                val_loss, _ = evaluate(model, data, config.model.block_size, config.batch_size,
                                       config.eval_tokens, autocast)
                if main:
                    bar.write(f"step {step}: train loss {result.lm_loss:.4f}, val loss {val_loss:.4f}")
            if main and (step % config.log_interval == 0 or val_loss is not None or step == end_step):
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
        peak_memory_mb=peak_memory_mb(device), parameters=params, train_seconds=train_seconds,
        history=logger.metrics if logger is not None else [],
    )
    if main:
        summary = {k: v for k, v in asdict(results).items() if k != "history"}
        atomic_write_json(out_dir / "results.json", dict(summary, **par.results_extra()))
        _save_plots(out_dir, logger)
    par.barrier()
    return results


def _data_cache(config: LMTrainConfig) -> str:
    return config.data.cache_dir or str(Path(config.out_dir) / "data")


def _check_same_config(path: Path, config_json: dict) -> None:
    """Resuming under a different model or data config would silently train something else."""
    from moekit.train.checkpoint import read_json

    saved = read_json(path)
    differing = [f"{section}.{k}" for section in ("model", "data")
                 for k in set(saved.get(section, {})) | set(config_json[section])
                 if saved.get(section, {}).get(k) != config_json[section].get(k)]
    if differing:
        raise ValueError(f"cannot resume from {path.parent}: "
                         f"its config differs in {', '.join(sorted(differing))}")


def _progress(enabled: bool, initial: int, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)


def _save_plots(out_dir: Path, logger: RunLogger) -> None:
    from moekit.train.lm_plots import plot_expert_load, plot_loss_curves

    plot_loss_curves({out_dir.name: logger.metrics}, out_dir / "loss_curve.png")
    if logger.load_rows:
        plot_expert_load(logger.load_rows, out_dir / "expert_load.png")


# --- loading a trained model ----------------------------------------------------------------


def load_trained_lm(ckpt: str, device: str = "auto") -> tuple[Transformer, LMTrainConfig, Any, Path]:
    """(model in eval mode, training config, tokenizer, checkpoint folder) from a run or step folder."""
    from moekit.data.text import load_tokenizer
    from moekit.train.checkpoint import read_json

    ckpt_dir = find_checkpoint(ckpt)
    config = build_dataclass(LMTrainConfig, read_json(ckpt_dir / "config.json"), f"{ckpt_dir}/config.json")
    model = build_model(config.model, resolve_device(device))
    load_model_weights(ckpt_dir, model)
    return model.eval(), config, load_tokenizer(ckpt_dir), ckpt_dir
