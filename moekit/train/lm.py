"""Training a (MoE) transformer language model: `fit(LMConfig(...), out=RUN) -> TrainResult`.

The pieces are separate functions: `build_data` -> `Transformer` -> `build_optimizer` -> `train_step`
in a loop, with `evaluate` and checkpoints around it. Nothing here touches process groups: what
changes with several processes (which rows of a batch are this rank's, gradient sync and clipping,
checkpoint format, who writes files) is a `Parallelism` passed to `fit`;
`moekit.train.lm_parallel.ExpertParallel` is the expert- and data-parallel one (torchrun).

The run folder (see `moekit.train.run`) holds config.json, tokenizer.json, a step checkpoint every
`checkpoint_interval` steps (exact `--resume`: the same loss curve as an uninterrupted run),
metrics.csv, expert_load.csv, TensorBoard events, results.json and, at the end, model.safetensors.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from moekit.config import ConfigError, check_choice, check_int, check_number, config_dict, documented
from moekit.data.text import TokenData, prepare_text_data
from moekit.models.transformer import Transformer, TransformerConfig
from moekit.train import loop
from moekit.train.balancing import attach_expert_bias_updates
from moekit.train.checkpoint import find_checkpoint
from moekit.train.results import TrainResult
from moekit.train.run import Run

DTYPES = ("auto", "float32", "bfloat16")


@documented
@dataclass
class LMDataConfig:
    """The text to train on (the `data` section of `moekit train lm`)."""

    path: str | None = None
    """A text file (or .gz) or a folder of .txt/.raw files. None: $MOEKIT_DATA/text/tinyshakespeare.txt,
    else TinyShakespeare as shipped with moekit."""
    tokenizer: str = "byte"
    """'byte' (256 ids, nothing to train), 'bpe' (trained on the training split, saved with the run) or the
    path of a tokenizer.json (or of a model folder holding one, e.g. an imported checkpoint)."""
    bpe_vocab_size: int = 4096
    """Vocabulary size of a trained BPE tokenizer."""
    val_fraction: float = 0.1
    """The last fraction of the text is held out for validation."""
    cache_dir: str | None = None
    """Where token ids are memory-mapped; default <run folder>/data."""

    def __post_init__(self) -> None:
        check_int("data.bpe_vocab_size", self.bpe_vocab_size, 257)
        check_number("data.val_fraction", self.val_fraction, 0.0, 1.0, strict_min=True, strict_max=True)


@documented
@dataclass
class LMTrainSettings(loop.TrainSettings):
    """How `moekit train lm` trains (the `train` section)."""

    seed: int = 1337
    """Seeds the initialisation and the order of training windows."""
    lr: float = 2e-3
    """Peak learning rate (after warm-up)."""
    weight_decay: float = 0.1
    """AdamW decay on matrices and embeddings."""
    batch_size: int = 32
    """Sequences per micro-batch."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    dtype: str = "auto"
    """Autocast dtype: 'auto' = bfloat16 where the device runs it fast (CUDA sm80+), else float32."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (tokens per step = batch_size * grad_accum * block_size)."""
    max_tokens: int = 5_000_000
    """Training length in tokens, rounded up to whole steps ..."""
    max_steps: int | None = None
    """... unless this is set."""
    min_lr_ratio: float = 0.1
    """The cosine decays to lr * min_lr_ratio."""
    warmup_steps: int = 100
    """Linear warm-up steps."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    log_interval: int = 10
    """Steps between rows of metrics.csv."""
    eval_interval: int = 200
    """Steps between validation evaluations."""
    eval_tokens: int = 32768
    """Validation tokens per periodic evaluation (0 = the whole split)."""
    final_eval_tokens: int = 0
    """Validation tokens for the final evaluation (0 = the whole split)."""
    checkpoint_interval: int = 500
    """Steps between checkpoints (one is always written at the last step)."""
    tensorboard: bool = True
    """Write TensorBoard events to <run>/tensorboard."""
    init: str | None = None
    """Start from the weights of this model folder (an imported, upcycled or trained model) instead of a
    random initialisation; its model config must match `model`."""

    RUNTIME_KEYS: ClassVar[tuple[str, ...]] = loop.TrainSettings.RUNTIME_KEYS + (
        "log_interval", "eval_tokens", "tensorboard", "checkpoint_interval")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("train.dtype", self.dtype, DTYPES)
        for name in ("grad_accum", "log_interval", "eval_interval", "checkpoint_interval", "max_tokens"):
            check_int(f"train.{name}", getattr(self, name), 1)
        if self.max_steps is not None:
            check_int("train.max_steps", self.max_steps, 1)
        check_int("train.warmup_steps", self.warmup_steps, 0)
        for name in ("eval_tokens", "final_eval_tokens"):
            check_int(f"train.{name}", getattr(self, name), 0)
        check_number("train.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        for name in ("beta1", "beta2"):
            check_number(f"train.{name}", getattr(self, name), 0.0, 1.0, strict_max=True)


@documented
@dataclass
class LMConfig:
    """Everything one `moekit train lm` run needs."""

    model: TransformerConfig = field(default_factory=TransformerConfig)
    """The transformer (set `model.moe` for MoE FFNs)."""
    data: LMDataConfig = field(default_factory=LMDataConfig)
    """The text and its tokenizer."""
    train: LMTrainSettings = field(default_factory=LMTrainSettings)
    """Optimisation, schedule, evaluation and checkpoint cadence."""

    @property
    def tokens_per_step(self) -> int:
        return self.train.batch_size * self.train.grad_accum * self.model.block_size

    @property
    def total_steps(self) -> int:
        return self.train.max_steps or math.ceil(self.train.max_tokens / self.tokens_per_step)


# --- setup ----------------------------------------------------------------------------------


def autocast_context(device: torch.device, dtype: str):
    """bf16 autocast where it pays off; float32 (no autocast) otherwise."""
    if dtype == "auto":
        fast_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        dtype = "bfloat16" if fast_bf16 else "float32"
    if dtype == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def resolve_data(config: LMDataConfig) -> LMDataConfig:
    """`config` with an absolute text path (from data.path, $MOEKIT_DATA or the shipped TinyShakespeare)."""
    import os

    from moekit.data.paths import resolve_data_dir

    path = config.path
    if path is None and os.environ.get("MOEKIT_DATA"):
        path = str(Path(os.environ["MOEKIT_DATA"]).expanduser() / "text" / "tinyshakespeare.txt")
    resolved = resolve_data_dir(path, "text")
    tokenizer = config.tokenizer
    if tokenizer not in ("byte", "bpe"):
        tokenizer = str(Path(tokenizer).expanduser().resolve())
    return dataclasses.replace(config, path=str(resolved), tokenizer=tokenizer)


def build_data(config: LMConfig, out: Path | None) -> TokenData:
    """The config's text, tokenized into the run's data cache (or `data.cache_dir`)."""
    data = config.data
    cache = Path(data.cache_dir) if data.cache_dir else (out / "data" if out is not None else None)
    if cache is None:
        import tempfile

        cache = Path(tempfile.mkdtemp(prefix="moekit-tokens-"))
    return prepare_text_data(data.path, cache, data.tokenizer, data.bpe_vocab_size, data.val_fraction)


def check_data(data: TokenData, config: LMConfig) -> None:
    """Fail before training, not at the first evaluation: both splits must hold a window and the
    tokenizer must fit the model."""
    if data.tokenizer.vocab_size > config.model.vocab_size:
        raise ConfigError(f"the {data.tokenizer.kind} tokenizer has {data.tokenizer.vocab_size} ids but "
                          f"model.vocab_size={config.model.vocab_size}; set model.vocab_size to at least that")
    for split, ids in (("training", data.train), ("validation", data.val)):
        if len(ids) <= config.model.block_size:
            raise ConfigError(f"the {split} split of {config.data.path} has {len(ids)} tokens, fewer than "
                              f"model.block_size + 1 = {config.model.block_size + 1}: use more text, a smaller "
                              f"block_size or another data.val_fraction")


# --- steps ----------------------------------------------------------------------------------


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


def check_step(loss: float, grad_norm: torch.Tensor | float, step: int, last_good: str,
               optimizer: torch.optim.Optimizer) -> None:
    """The non-finite guard of an LM step: the loss and the gradient norm, before the update."""
    if not (math.isfinite(loss) and math.isfinite(float(grad_norm))):
        optimizer.zero_grad(set_to_none=True)
        what = f"loss became {loss}" if not math.isfinite(loss) else \
            f"gradient norm became {float(grad_norm)} (loss {loss:.6g})"
        kept = f"; the last good checkpoint is {last_good}" if last_good else "; no checkpoint had been written yet"
        raise loop.NonFiniteError(f"{what} at step {step}; stopped before the update{kept}")


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer,
               batches: Iterable[tuple[torch.Tensor, torch.Tensor]], grad_clip: float,
               autocast=nullcontext, step: int = 0, last_good: str = "") -> StepResult:
    """One optimizer step over the given micro-batches (gradient accumulation). The loss and the
    gradients are checked before the update, so a NaN never reaches the weights."""
    batches = list(batches)
    acc = forward_backward(model, batches, autocast)
    n = len(batches)
    loss = sum(float(a[0]) for a in acc.losses) / n
    params = [p for p in model.parameters()]
    norm = loop.gradient_norm(params, grad_clip)
    check_step(loss, norm, step, last_good, optimizer)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, sum(a[1].item() for a in acc.losses) / n, sum(float(a[2]) for a in acc.losses) / n,
                      float(norm) if grad_clip > 0 else 0.0, acc.expert_counts, acc.dropped_tokens)


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
    """Peak memory of this process so far: CUDA allocations, or the resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def expert_load_rows(step: int, counts: dict[int, torch.Tensor], dropped: dict[int, int]) -> list[dict]:
    """expert_load.csv rows: per MoE layer, each expert's share of the assignments since the last row."""
    rows = []
    for layer, c in counts.items():
        total = float(c.sum())
        frac = (c.double() / max(total, 1)).tolist()
        row = {"step": step, "layer": layer, "max_over_mean": max(frac) * len(frac),
               "dropped_fraction": dropped.get(layer, 0) / max(total + dropped.get(layer, 0), 1)}
        row.update({f"e{e}": f for e, f in enumerate(frac)})
        rows.append(row)
    return rows


# --- how the loop spreads over processes ----------------------------------------------------


class Parallelism:
    """How `fit` runs across processes; this base class is one process on one device.

    `moekit.train.lm_parallel.ExpertParallel` overrides these methods; the loop itself (schedule,
    data order, evaluation, logging, resume) is the same for both, so a multi-process run sees the
    batches and takes the steps of the single-process one.
    """

    is_main_process = True
    """Only the main process writes config, logs and results (every process trains and evaluates)."""

    def setup(self, config: LMConfig) -> torch.device:
        """Check the config, start whatever the processes need; returns this process's device."""
        return loop.resolve_device(config.train.device)

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
                   step: int = 0, last_good: str = "") -> StepResult:
        """One optimizer step; losses and the clipped gradient norm are those of the global batch."""
        return train_step(model, optimizer, batches, grad_clip, autocast, step, last_good)

    def save_checkpoint(self, run: Run, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                        state: dict, tensors: dict[str, torch.Tensor], keep: int) -> str:
        """Save the model, optimizer, JSON `state` and RNG `tensors`; returns the checkpoint's path."""
        run.checkpoint(step, model, optimizer, state, tensors, keep)
        return str(run.last_checkpoint or "")

    def load_checkpoint(self, run: Run, model: nn.Module,
                        optimizer: torch.optim.Optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
        """Load the newest checkpoint; returns (state with "step" and "tokens", RNG tensors)."""
        return run.resume_state(model, optimizer)

    def save_final_model(self, run: Run, model: nn.Module) -> None:
        """RUN/model.safetensors: the trained model as one file (what eval, generate and load read)."""
        run.save_model(model)

    def results_extra(self) -> dict:
        return {}


# --- the loop -------------------------------------------------------------------------------


def fit(config: LMConfig, out: str | Path | None = None, *, mode: str = "new", stop_at_step: int | None = None,
        parallelism: Parallelism | None = None, log=print) -> TrainResult:
    """Train (or, with mode='resume', continue) a language model as `config` says, into the run
    folder `out`; returns the final validation metrics as `test`.

    `stop_at_step` ends the session early (after saving a checkpoint) without changing the
    schedule, so a later resume continues exactly. `parallelism` says how the run spreads over
    processes (default: one process); call on every process.
    """
    par = parallelism or Parallelism()
    settings = config.train
    loop.set_threads(settings.threads)
    device = par.setup(config)
    main = par.is_main_process
    if main:  # before any data is read: a refused folder costs nothing
        Run.check_target(out, mode)
    config = dataclasses.replace(config, data=resolve_data(config.data))
    generator = loop.seed_everything(settings.seed)  # the data order: random windows drawn from this
    run = Run(out, "lm", mode, writer=main, tensorboard=settings.tensorboard)
    with run:
        if main:  # the main process tokenizes into the cache; the others then open it
            data = build_data(config, run.path)
        par.barrier()
        if not main:
            data = build_data(config, run.path)
        check_data(data, config)
        model = Transformer(config.model).to(device)
        if settings.init is not None and mode != "resume":
            load_weights_from(model, settings.init)
        params = model.num_parameters()  # of the whole model, before parallelize may shard its experts
        model = par.parallelize(model)
        optimizer = loop.build_optimizer(model, settings, kind="adamw", betas=(settings.beta1, settings.beta2),
                                    fused=False)
        par.attach_expert_bias_updates(model, optimizer)
        autocast = lambda: autocast_context(device, settings.dtype)  # noqa: E731

        run.write_config(model, {"data": config_dict(config.data), "train": config_dict(settings)},
                         settings.RUNTIME_KEYS)
        tokenizer_file = (Path(config.data.cache_dir) if config.data.cache_dir else
                          (run.path / "data" if run.path else None))
        if tokenizer_file is not None and main:
            run.write_artifact("tokenizer.json", (tokenizer_file / "tokenizer.json").read_bytes())
        step, tokens, load_rows = 0, 0, []
        rng = loop.RNGState(generator)
        last_good = ""
        if mode == "resume":
            state, tensors = par.load_checkpoint(run, model, optimizer)
            rng.restore(tensors, state)
            step, tokens = state["step"], state["tokens"]
            last_good = str(run.last_checkpoint or "")
            load_rows = [r for r in _read_table(run.path / "expert_load.csv") if int(r["step"]) <= step]

        total_steps = config.total_steps
        end_step = min(total_steps, stop_at_step) if stop_at_step is not None else total_steps
        train_seconds, session_tokens = 0.0, 0
        started = time.perf_counter()
        load_counts: dict[int, torch.Tensor] = {}
        load_dropped: dict[int, int] = {}
        bar = loop.progress_bar(settings.progress and main, total=total_steps, initial=step)
        model.train()
        while step < end_step:
            lr = loop.cosine_lr(step, settings.lr, settings.warmup_steps, total_steps, settings.min_lr_ratio)
            loop.set_lr(optimizer, lr)
            t0 = time.perf_counter()
            batches = [tuple(par.local_rows(t).to(device)
                             for t in data.get_batch("train", settings.batch_size, config.model.block_size,
                                                     generator))
                       for _ in range(settings.grad_accum)]
            result = par.train_step(model, optimizer, batches, settings.grad_clip, autocast, step + 1,
                                    last_good or run.last_good())
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
            bar.set_postfix(loss=f"{result.loss:.4f}", tok_s=f"{rate:,.0f}", refresh=False)  # drawn by update
            bar.update(1)

            val_loss = None
            if step % settings.eval_interval == 0 or step == total_steps:
                # Every process evaluates the same windows (expert parallelism needs all of them in a forward).
                val_loss, _ = evaluate(model, data, config.model.block_size, settings.batch_size,
                                       settings.eval_tokens, autocast)
                if main:
                    bar.write(f"step {step}: train loss {result.lm_loss:.4f}, val loss {val_loss:.4f}")
            if step % settings.log_interval == 0 or val_loss is not None or step == end_step:
                run.log({"step": step, "tokens": tokens, "lr": lr, "loss": result.loss, "lm_loss": result.lm_loss,
                         "aux_loss": result.aux_loss, "grad_norm": result.grad_norm,
                         "val_loss": "" if val_loss is None else val_loss, "tokens_per_s": rate,
                         "elapsed_s": time.perf_counter() - started})
                if load_counts:
                    load_rows += expert_load_rows(step, load_counts, load_dropped)
                    run.write_table("expert_load.csv", load_rows)
                    load_counts, load_dropped = {}, {}
            if step % settings.checkpoint_interval == 0 or step == end_step:
                state = {"tokens": tokens, "schedule": {"lr": settings.lr, "warmup_steps": settings.warmup_steps,
                                                        "total_steps": total_steps,
                                                        "min_lr_ratio": settings.min_lr_ratio},
                         "data_position": "rng.data holds the window sampler's state after this step"}
                last_good = par.save_checkpoint(run, step, model, optimizer, state, rng.tensors(),
                                                settings.keep_checkpoints)
        bar.close()

        final_loss, scored = evaluate(model, data, config.model.block_size, settings.batch_size,
                                      settings.final_eval_tokens, autocast)
        if step == total_steps:
            par.save_final_model(run, model)
        test = {"val_loss": final_loss, "val_bits_per_byte": bits_per_byte(final_loss, scored, data),
                "val_perplexity": math.exp(min(final_loss, 700.0))}
        extra = {"tokens": tokens, "train_tokens_per_s": session_tokens / max(train_seconds, 1e-9),
                 "peak_memory_mb": peak_memory_mb(device), "parameters": params, "load_rows": load_rows,
                 "val_tokens_scored": scored, **par.results_extra()}
        result = TrainResult("lm", model, test, {}, run.metrics, None, step, train_seconds, run.path, extra)
        run.write_results({k: v for k, v in result.to_json().items() if k not in ("history", "load_rows")})
    par.barrier()
    return result


def _read_table(path: Path | None) -> list[dict]:
    from moekit.train.run import read_metrics

    return read_metrics(path) if path is not None else []


def load_weights_from(model: Transformer, folder: str) -> None:
    """`train.init`: the weights of a model folder (or a run's newest checkpoint), checked to fit."""
    from moekit.io import load_tensors
    from moekit.models.pretrained import load_weights, read_model_header

    header = read_model_header(folder)
    if header["family"] != "lm":
        raise ConfigError(f"train.init={folder} holds {header['family']} model, not a language model")
    weights = _weights_file(Path(folder))
    load_weights(model, load_tensors(weights), weights)


def _weights_file(folder: Path) -> Path:
    if (folder / "model.safetensors").is_file():
        return folder / "model.safetensors"
    return find_checkpoint(folder) / "model.safetensors"


# --- a finished run -------------------------------------------------------------------------


CONFIG = LMConfig


def config_from_run(header: dict) -> LMConfig:
    """The run config of an LM run folder's config.json."""
    from moekit.config import build_dataclass

    return build_dataclass(LMConfig, {"model": header["model"], "data": header.get("data", {}),
                                      "train": header.get("train", {})}, "config.json")


def load_run(path: Path, device: str = "cpu"):
    """`moekit.load` for a language model: the model (from a run, a step checkpoint, an imported or
    upcycled model folder) and its tokenizer (`loaded.tokenizer`)."""
    from moekit.config import build_dataclass
    from moekit.data.text import load_tokenizer
    from moekit.io import load_tensors
    from moekit.models.pretrained import load_weights, read_model_header
    from moekit.train.families import LoadedRun

    path = Path(path)
    folder = path
    if not (path / "config.json").is_file() and (path / "trainer_state.json").is_file():
        folder = path.parent.parent  # a step folder: RUN/checkpoints/step_N
    header = read_model_header(folder)
    config = config_from_run(header) if "train" in header else None
    model_config = config.model if config is not None else \
        build_dataclass(TransformerConfig, header["model"], f"{folder / 'config.json'}: model")
    weights = path / "model.safetensors" if (path / "model.safetensors").is_file() else _weights_file(path)
    tensors = load_tensors(weights)
    model = Transformer(model_config)
    stored = next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)
    model = model.to(device=loop.resolve_device(device), dtype=stored)
    load_weights(model, tensors, weights)
    tokenizer = load_tokenizer(folder) if (folder / "tokenizer.json").is_file() else None
    return LoadedRun("lm", model.eval(), folder, config, {"tokenizer": tokenizer, "weights": weights})


def evaluate_run(path: str | Path, device: str = "auto", data_dir: str | None = None) -> dict[str, float]:
    """The final validation metrics of a finished LM run, computed again from its folder."""
    loaded = load_run(Path(path), device)
    if loaded.config is None:
        raise ValueError(f"{path} is a model folder without a training config: pass --text to evaluate it")
    config = dataclasses.replace(loaded.config, data=loaded.data_config(data_dir))
    data = build_data(config, loaded.path)
    device_ = next(loaded.model.parameters()).device
    autocast = lambda: autocast_context(device_, config.train.dtype)  # noqa: E731
    loss, scored = evaluate(loaded.model, data, config.model.block_size, config.train.batch_size,
                            config.train.final_eval_tokens, autocast)
    return {"val_loss": loss, "val_bits_per_byte": bits_per_byte(loss, scored, data),
            "val_perplexity": math.exp(min(loss, 700.0))}
