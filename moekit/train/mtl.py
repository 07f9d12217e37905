"""Training multi-task rankers (Shared-Bottom, OMoE, MMoE, PLE) on a table: `fit(MTLConfig(...), out=RUN)`.

One model per call, Adam, early stopping on the mean validation AUC of the binary tasks (the mean
validation loss when no binary task has both classes in its validation split), best weights
restored, then evaluated on the test split: AUC and log-loss per binary task, RMSE and MAE per
regression task, and the mean gate weight per expert. The run folder (see `moekit.train.run`) holds
the model, `feature_spec.json` (vocabularies and statistics, so serving encodes rows as training
did), a checkpoint per epoch for `--resume`, metrics.csv and results.json.

The loop is built for speed on small rows: the whole split lives as tensors on the device and
batches are index slices of a seeded permutation (no DataLoader, no per-row dicts, no host copies).

Loss weighting: fixed per-task weights by task name, or uncertainty weighting (Kendall, Gal and
Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses", CVPR 2018) with one learned
log-variance per task.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import ConfigError, check_choice, check_int, config_dict, documented
from moekit.data.tabular import MultiTaskData, TabularBatch
from moekit.models.multitask import MultiTaskConfig, MultiTaskModel, MultiTaskOptions
from moekit.train import loop
from moekit.train.metrics import roc_auc
from moekit.train.parallel import DataParallel, begin_fit
from moekit.train.results import Stopwatch, TrainResult
from moekit.train.run import Run

LOSS_WEIGHTINGS = ("fixed", "uncertainty")
DATASETS = ("table", "census-income")


@documented
@dataclass
class MTLDataConfig:
    """Where the table comes from and how it is split (the `data` section of `moekit train mtl`).

    Your own table: `path` (CSV, TSV or Parquet; .gz allowed), the label columns in `tasks`, and either
    `valid` and `test` files or a `split`. Feature kinds are inferred when `categorical` / `numeric`
    are not given, and printed."""

    dataset: str | None = None
    """'table' (your own file: `path`) or 'census-income' (UCI Census-Income KDD, the MMoE paper's tasks);
    None: 'table' when `path` is set, else 'census-income'."""
    path: str | None = None
    """The training table (or the whole table, cut by `split`)."""
    valid: str | None = None
    """A validation table with the same columns (else cut from `path` by `split`)."""
    test: str | None = None
    """A test table with the same columns (else cut from `path` by `split`)."""
    split: tuple[float, ...] = (0.8, 0.1, 0.1)
    """Train / validation / test fractions of `path` when `valid` and `test` are not given."""
    tasks: tuple[str, ...] = ()
    """The label columns, one task each."""
    task_types: dict[str, str] | None = None
    """'binary' or 'regression' per task name (default: binary when the labels are all 0/1)."""
    categorical: tuple[str, ...] | None = None
    """Categorical feature columns (None: inferred; see `numeric`)."""
    numeric: tuple[str, ...] | None = None
    """Numeric feature columns, standardised with training statistics (None: inferred: every cell a
    number and more than 20 distinct values, or non-integer ones)."""
    id_column: str | None = None
    """A column that identifies rows: never a feature; `moekit predict mtl` writes it beside the scores."""
    drop: tuple[str, ...] = ()
    """Columns that are neither features nor labels."""
    delimiter: str | None = None
    """Delimiter of CSV/TSV files (None: tab for .tsv, else sniffed)."""
    data_dir: str | None = None
    """census-income: the folder with its files (None: $MOEKIT_DATA/census-income, else the 4,000-row
    sample shipped with moekit)."""
    group: int = 1
    """census-income task group: 1 = income + never married, 2 = education + never married."""
    split_seed: int = 0
    """Seed of the train/validation/test shuffle (kept apart from the training seed)."""
    max_rows: int | None = None
    """Read only the first rows (quick runs)."""

    def __post_init__(self) -> None:
        if self.dataset is None:
            self.dataset = "table" if self.path is not None else "census-income"
        check_choice("data.dataset", self.dataset, DATASETS)
        check_choice("data.group", self.group, (1, 2))
        check_int("data.split_seed", self.split_seed, 0)
        if self.max_rows is not None:
            check_int("data.max_rows", self.max_rows, 8)
        self.split = tuple(self.split)
        if len(self.split) != 3 or any(not (0 <= f <= 1) for f in self.split) or abs(sum(self.split) - 1) > 1e-6 \
                or self.split[0] == 0:
            raise ConfigError(f"data.split must be three fractions train,valid,test summing to 1 (got "
                              f"{','.join(map(str, self.split))})")
        if self.dataset == "table":
            if self.path is None:
                raise ConfigError("data.dataset='table' needs data.path (--data FILE)")
            if not self.tasks:
                raise ConfigError("a table needs its label columns: --tasks click,purchase (data.tasks)")
            if (self.valid is None) != (self.test is None):
                raise ConfigError("pass both --valid and --test, or neither (then --split cuts them from --data)")
            if self.valid is None and min(self.split[1:]) == 0:
                raise ConfigError(f"data.split={self.split} leaves no validation or test rows")
        self.tasks = tuple(self.tasks)
        for task, kind in (self.task_types or {}).items():
            check_choice(f"data.task_types.{task}", kind, ("binary", "regression"))
        overlap = set(self.categorical or ()) & set(self.numeric or ())
        if overlap:
            raise ConfigError(f"columns listed as both categorical and numeric: {sorted(overlap)}")
        clash = set(self.tasks) & (set(self.categorical or ()) | set(self.numeric or ()))
        if clash:
            raise ConfigError(f"label columns cannot be features: {sorted(clash)}")


@documented
@dataclass
class MTLTrainSettings(loop.TrainSettings):
    """How `moekit train mtl` trains (the `train` section)."""

    lr: float = 1e-3
    """Adam learning rate."""
    batch_size: int = 1024
    """Rows per optimizer step."""
    epochs: int = 20
    """Most epochs; early stopping usually ends sooner."""
    patience: int = 3
    """Epochs without a better validation score before stopping."""
    eval_batch_size: int = 16384
    """Rows per forward pass when evaluating."""
    loss_weighting: str = "fixed"
    """'fixed' (task_weights) or 'uncertainty' (learned, Kendall et al. 2018)."""
    task_weights: dict[str, float] | None = None
    """Fixed loss weight per task name, e.g. {income: 1.0, marital: 0.5} (default 1 each)."""

    RUNTIME_KEYS: ClassVar[tuple[str, ...]] = loop.TrainSettings.RUNTIME_KEYS + ("eval_batch_size",)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("train.epochs", self.epochs, 1)
        check_int("train.patience", self.patience, 1)
        check_int("train.eval_batch_size", self.eval_batch_size, 1)
        check_choice("train.loss_weighting", self.loss_weighting, LOSS_WEIGHTINGS)
        for task, weight in (self.task_weights or {}).items():
            if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight >= 0:
                raise ConfigError(f"train.task_weights.{task} must be a number >= 0 (got {weight!r})")


MTLConfig = loop.run_config_class(
    "MTLConfig", MultiTaskOptions, MTLDataConfig, MTLTrainSettings,
    "Everything one `moekit train mtl` run needs: `model` (architecture and sizes; the features and tasks "
    "come from the data), `data` (the table and its split), `train` (optimisation, early stopping, device).")


def model_config(config: MTLConfig, data: MultiTaskData) -> MultiTaskConfig:
    """The model's full config: the options plus the features and tasks of the data."""
    return MultiTaskConfig.from_options(config.model, data.spec.vocab_sizes, data.spec.num_numeric,
                                        tuple(data.tasks), tuple(data.task_types))


# --- losses ---------------------------------------------------------------------------------


class UncertaintyWeighting(nn.Module):
    """Kendall et al. 2018 with s_t = log sigma_t^2 learned per task:
    binary: exp(-s) L + s / 2 (their eq. 10 up to the constant); regression: exp(-s) L / 2 + s / 2."""

    def __init__(self, task_types: tuple[str, ...]) -> None:
        super().__init__()
        self.log_var_T = nn.Parameter(torch.zeros(len(task_types)))
        self.register_buffer("scale_T", torch.tensor([1.0 if t == "binary" else 0.5 for t in task_types]),
                             persistent=False)

    def forward(self, losses_T: Tensor) -> Tensor:
        return (self.scale_T * torch.exp(-self.log_var_T) * losses_T + 0.5 * self.log_var_T).sum()


def task_losses(logits: dict[str, Tensor], labels_NT: Tensor, task_types: dict[str, str]) -> Tensor:
    """(T,) mean loss per task: BCE on logits for binary tasks (stabler than sigmoid + BCELoss), else MSE."""
    out = []
    for t, (task, logit_N) in enumerate(logits.items()):
        y_N = labels_NT[:, t]
        if task_types[task] == "binary":
            out.append(F.binary_cross_entropy_with_logits(logit_N, y_N))
        else:
            out.append(F.mse_loss(logit_N, y_N))
    return torch.stack(out)


class MultiTaskObjective(nn.Module):
    """The model and its task-loss combination as one module, so data parallelism averages the
    gradients of both (the learned log-variances of uncertainty weighting included)."""

    def __init__(self, model: MultiTaskModel, settings: MTLTrainSettings) -> None:
        super().__init__()
        self.model = model
        tasks = model.config.tasks
        unknown = sorted(set(settings.task_weights or {}) - set(tasks))
        if unknown:
            raise ConfigError(f"train.task_weights names unknown task(s) {unknown}; the tasks are {list(tasks)}")
        weights = [float((settings.task_weights or {}).get(t, 1.0)) for t in tasks]
        self.register_buffer("weights_T", torch.tensor(weights), persistent=False)
        self.weighting = UncertaintyWeighting(model.config.task_types) \
            if settings.loss_weighting == "uncertainty" else None

    def forward(self, cat_NC: Tensor, num_NF: Tensor, labels_NT: Tensor, scale: float = 1.0) -> Tensor:
        """The scalar to minimise for these rows, times `scale` (see `DataParallel.loss_scale`)."""
        out = self.model(cat_NC, num_NF)
        losses_T = task_losses(out.logits, labels_NT, self.model.task_types)
        loss = self.weighting(losses_T) if self.weighting is not None else (self.weights_T * losses_T).sum()
        return loss * scale


# --- evaluation -----------------------------------------------------------------------------


@torch.no_grad()
def predict_logits(model: MultiTaskModel, data: TabularBatch, batch_size: int = 16384) -> dict[str, Tensor]:
    """(N,) float32 logits per task over `data`, in row order."""
    was_training = model.training
    model.eval()
    parts: dict[str, list[Tensor]] = {t: [] for t in model.config.tasks}
    for start in range(0, len(data), batch_size):
        out = model(data.cat_NC[start:start + batch_size], data.num_NF[start:start + batch_size])
        for t in parts:
            parts[t].append(out.logits[t].float())
    model.train(was_training)
    return {t: torch.cat(v) if v else torch.zeros(0) for t, v in parts.items()}


@torch.no_grad()
def evaluate(model: MultiTaskModel, data: TabularBatch, batch_size: int = 16384,
             targets: dict[str, tuple[float, float]] | None = None) -> dict[str, float]:
    """Metrics by name over `data`: `<task>/auc` and `<task>/logloss` (binary tasks; AUC from
    scikit-learn, NaN when the split has one class), `<task>/rmse` and `<task>/mae` (regression, in the
    label's own units: `targets` holds the (mean, std) the labels were standardised with)."""
    logits = predict_logits(model, data, batch_size)
    labels = data.labels_NT.cpu()
    metrics: dict[str, float] = {}
    for t, (task, kind) in enumerate(model.task_types.items()):
        y_N, z_N = labels[:, t], logits[task].cpu()
        if kind == "binary":
            metrics[f"{task}/auc"] = roc_auc(y_N.numpy(), z_N.numpy())
            metrics[f"{task}/logloss"] = float(F.binary_cross_entropy_with_logits(z_N, y_N))
        else:
            std = (targets or {}).get(task, (0.0, 1.0))[1]
            metrics[f"{task}/rmse"] = float((z_N - y_N).square().mean().sqrt()) * std
            metrics[f"{task}/mae"] = float((z_N - y_N).abs().mean()) * std
    return metrics


@torch.no_grad()
def mean_gates(model: MultiTaskModel, data: TabularBatch, batch_size: int = 16384) -> dict[str, list[float]]:
    """Mean gate weight per expert over `data`, per task (empty for Shared-Bottom)."""
    was_training = model.training
    model.eval()
    sums: dict[str, Tensor] = {}
    for start in range(0, len(data), batch_size):
        out = model(data.cat_NC[start:start + batch_size], data.num_NF[start:start + batch_size])
        for task, gate_NE in out.gates.items():
            sums[task] = sums.get(task, 0) + gate_NE.double().sum(0)
    model.train(was_training)
    return {task: (s / max(len(data), 1)).tolist() for task, s in sums.items()}


def selection_metric(model: MultiTaskModel, valid: TabularBatch) -> tuple[str, str, list[str]]:
    """(name, mode, tasks) of the early-stopping score: the mean validation AUC over the binary tasks
    whose validation labels hold both classes, else the mean validation loss over all tasks."""
    labels = valid.labels_NT.cpu()
    auc_tasks = [task for t, (task, kind) in enumerate(model.task_types.items())
                 if kind == "binary" and labels[:, t].unique().numel() == 2]
    if auc_tasks:
        return "mean validation AUC", "max", auc_tasks
    return "mean validation loss", "min", list(model.task_types)


def selection_score(metrics: dict[str, float], mode: str, tasks: list[str], task_types: dict[str, str],
                    targets: dict[str, tuple[float, float]] | None = None) -> float:
    """The early-stopping score of `selection_metric` from validation metrics (regression tasks count
    by their standardised squared error, so a task's units do not decide)."""
    if mode == "max":
        return float(np.mean([metrics[f"{t}/auc"] for t in tasks]))
    scale = {t: (targets or {}).get(t, (0.0, 1.0))[1] for t in tasks}
    losses = [metrics[f"{t}/logloss"] if task_types[t] == "binary" else (metrics[f"{t}/rmse"] / scale[t]) ** 2
              for t in tasks]
    return float(np.mean(losses))


# --- training -------------------------------------------------------------------------------


def train_epoch(objective: nn.Module, optimizer: torch.optim.Optimizer, train: TabularBatch,
                settings: loop.TrainSettings, generator: torch.Generator, parallel: DataParallel | None = None,
                first_step: int = 0, last_good: str | Callable[[], str] = "", progress: bool = False,
                desc: str = "") -> tuple[float, int]:
    """One pass over `train` (tensors on the device) in a seeded random order: index slices, no
    DataLoader. Every process draws the same order and takes its share of each batch. Each step
    goes through the non-finite guard. Returns (mean loss over the epoch's batches, optimizer steps)."""
    parallel = parallel or DataParallel(train.cat_NC.device)
    objective.train()
    n, batch_size = len(train), settings.batch_size
    order = torch.randperm(n, generator=generator).to(train.cat_NC.device)
    bar = loop.progress_bar(progress, total=n, unit="row", desc=desc, leave=False, unit_scale=True)
    loss_sum, steps = 0.0, 0
    for lo in range(0, n, batch_size):
        idx = order[lo:lo + batch_size]
        if idx.numel() < max(2, parallel.world):  # BatchNorm cannot train on one row
            continue
        local = parallel.shard(idx)
        # index_select, not advanced indexing: the same gather at a fraction of the per-call overhead.
        loss = objective(train.cat_NC.index_select(0, local), train.num_NF.index_select(0, local),
                         train.labels_NT.index_select(0, local), parallel.loss_scale(local.numel(), idx.numel()))
        loss.backward()
        loop.optimizer_step(optimizer, loss, first_step + steps + 1, last_good, settings.grad_clip)
        loss_sum += parallel.global_loss(loss)
        steps += 1
        bar.update(idx.numel())
    bar.close()
    return loss_sum / max(steps, 1), steps


def resolve_data(config: MTLDataConfig) -> MTLDataConfig:
    """`config` with its files as absolute paths (census: from --data-dir, $MOEKIT_DATA or the shipped
    sample), so the run folder names the data wherever it is evaluated from."""
    from moekit.data.paths import resolve_data_dir

    if config.dataset == "census-income":
        return dataclasses.replace(config, data_dir=str(resolve_data_dir(config.data_dir, config.dataset)))
    absolute = {k: str(Path(v).expanduser().resolve()) for k in ("path", "valid", "test")
                if (v := getattr(config, k)) is not None}
    return dataclasses.replace(config, **absolute)


def load_data(config: MTLDataConfig, log=print) -> MultiTaskData:
    """The dataset `config` names, split and encoded (feature kinds inferred and printed when not given)."""
    import warnings

    if config.dataset == "census-income":
        from moekit.data.census import load_census_income

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the test-file-only protocol is named in MultiTaskData.protocol
            return load_census_income(config.data_dir, group=config.group, split_seed=config.split_seed,
                                      max_rows=config.max_rows)
    return load_table(config, log)


def load_table(config: MTLDataConfig, log=print) -> MultiTaskData:
    """Your own table (see `MTLDataConfig`) through `moekit.data.table.multitask_data`."""
    from moekit.data.table import infer_feature_kinds, infer_task_type, multitask_data, read_table, split_rows

    named = [*config.tasks, *(c for c in (config.id_column,) if c)]
    train = read_table(config.path, named, config.delimiter, config.max_rows)
    if config.valid is not None:
        frames = {"train": train, "valid": read_table(config.valid, named, config.delimiter, config.max_rows),
                  "test": read_table(config.test, named, config.delimiter, config.max_rows)}
        paths = {"train": Path(config.path), "valid": Path(config.valid), "test": Path(config.test)}
        protocol = (f"train {Path(config.path).name}, validation {Path(config.valid).name}, "
                    f"test {Path(config.test).name}")
    else:
        rows = split_rows(len(train), config.split, config.split_seed)
        frames = {name: train.iloc[np.sort(index)] for name, index in zip(("train", "valid", "test"), rows,
                                                                           strict=True)}
        paths = dict.fromkeys(frames, Path(config.path))
        protocol = (f"{Path(config.path).name} shuffled (split seed {config.split_seed}) and cut "
                    f"{'/'.join(f'{f:g}' for f in config.split)} into train/validation/test")
    listed = (*(config.categorical or ()), *(config.numeric or ()), *config.drop)
    unknown = [c for c in listed if c not in train.columns]
    if unknown:
        raise ConfigError(f"{config.path}: no column {', '.join(map(repr, unknown))}; its columns are "
                          f"{', '.join(map(repr, train.columns))}")
    task_types = [(config.task_types or {}).get(t) or infer_task_type(frames["train"], t) for t in config.tasks]
    excluded = {*config.tasks, *config.drop, *((config.id_column,) if config.id_column else ())}
    candidates = [c for c in train.columns if c not in excluded]
    categorical, numeric = list(config.categorical or ()), list(config.numeric or ())
    if config.categorical is None or config.numeric is None:  # the columns not listed are inferred
        rest = [c for c in candidates if c not in {*categorical, *numeric}]
        inferred_cat, inferred_num = infer_feature_kinds(frames["train"], rest)
        categorical, numeric = categorical + inferred_cat, numeric + inferred_num
        log(f"feature kinds (inferred where not given): categorical {', '.join(categorical) or '-'}; "
            f"numeric {', '.join(numeric) or '-'}")
    log("tasks: " + ", ".join(f"{t} ({k})" for t, k in zip(config.tasks, task_types, strict=True)))
    return multitask_data(frames, paths, config.tasks, task_types, categorical, numeric, Path(config.path).name,
                          protocol)


def fit(config: MTLConfig, out: str | Path | None = None, *, mode: str = "new", data: MultiTaskData | None = None,
        log=print) -> TrainResult:
    """Train one model as `config` says, into the run folder `out` (None: write nothing).

    `mode` is 'new', 'resume' (continue `out` from its last epoch, exactly) or 'overwrite'. `data`
    may be passed to reuse a loaded split. Under torchrun, every process calls this.
    """
    settings = config.train
    parallel, generator = begin_fit(settings, out, mode)
    device = parallel.device
    if data is None:
        config = dataclasses.replace(config, data=resolve_data(config.data))
        data = load_data(config.data, log)
    model = MultiTaskModel(model_config(config, data)).to(device)
    objective = MultiTaskObjective(model, settings).to(device)
    trained = parallel.wrap(objective)
    optimizer = loop.build_optimizer(objective, settings, kind="adam")
    train, valid = data.train.to(device), data.valid.to(device)
    metric, metric_mode, metric_tasks = selection_metric(model, valid)
    if metric_mode == "min":
        log(f"no binary task has both classes in the validation split (AUC undefined); "
            f"early stopping uses the {metric}")
    stopper = loop.EarlyStopping(metric, settings.patience, metric_mode)
    rng = loop.RNGState(generator)
    run = Run(out, "mtl", mode, writer=parallel.is_main, tensorboard=True)
    with run:
        run.write_config(model, {"data": config_dict(config.data), "train": config_dict(settings)},
                         settings.RUNTIME_KEYS)
        run.write_artifact("feature_spec.json", data.spec.to_dict())
        done_epochs, step = 0, 0
        if mode == "resume":
            done_epochs, step, _ = run.resume_epoch(objective, optimizer, rng, stopper)
        log(f"{data.name}: {', '.join(f'{t} ({k})' for t, k in zip(data.tasks, data.task_types, strict=True))}; "
            f"model {config.model.architecture}; protocol: {data.protocol}; rows train/valid/test = "
            f"{len(data.train)}/{len(data.valid)}/{len(data.test)}")
        watch, session_rows = Stopwatch(), 0
        for epoch in range(done_epochs + 1, settings.epochs + 1):
            if stopper.should_stop:  # a resumed run that had already stopped
                break
            start = time.perf_counter()
            with watch:
                train_loss, steps = train_epoch(trained, optimizer, train, settings, generator, parallel, step,
                                                run.last_good, settings.progress, f"epoch {epoch}")
            seconds = time.perf_counter() - start
            step += steps
            session_rows += len(train)
            val = evaluate(model, valid, settings.eval_batch_size, data.spec.targets)
            score = selection_score(val, metric_mode, metric_tasks, model.task_types, data.spec.targets)
            if stopper.update(epoch, score, model):
                run.save_model(model)
            row = {"epoch": epoch, "step": step, "train_loss": train_loss,
                   **{f"valid {k}": v for k, v in val.items()}, "samples_per_s": len(train) / seconds}
            run.log(row)
            log(f"epoch {epoch:3d}  train loss {train_loss:.4f}  " + "  ".join(f"{k} {v:.4f}" for k, v in val.items())
                + f"  {len(train) / seconds:,.0f} rows/s")
            run.checkpoint_epoch(epoch, objective, optimizer, step, rng, settings.keep_checkpoints, stopper)
            if stopper.should_stop:
                log(f"early stop: the {metric} has not improved for {settings.patience} epochs")
                break
        stopper.restore(model)
        run.save_model(model)
        test = evaluate(model, data.test.to(device), settings.eval_batch_size, data.spec.targets)
        valid_best = evaluate(model, valid, settings.eval_batch_size, data.spec.targets)
        extra = {"data": data.name, "protocol": data.protocol, "tasks": list(data.tasks),
                 "task_types": list(data.task_types), "architecture": config.model.architecture,
                 "selection": metric, "rows": {"train": len(data.train), "valid": len(data.valid),
                                               "test": len(data.test)},
                 "gates": mean_gates(model, data.test.to(device), settings.eval_batch_size),
                 "expert_names": model.expert_names, "unreachable": model.unreachable_experts(),
                 "train_samples_per_s": session_rows / max(watch.seconds, 1e-9)}
        if objective.weighting is not None:
            extra["log_variances"] = dict(zip(data.tasks, objective.weighting.log_var_T.tolist(), strict=True))
        result = TrainResult("mtl", model, test, valid_best, run.metrics, stopper.best_epoch or None, step,
                             watch.seconds, run.path, extra)
        run.write_results(result.to_json())
    return result


def gate_table(gates: dict[str, list[float]], expert_names: list[str]) -> str:
    """Markdown table: a row per task, a column per expert, mean gate weight."""
    lines = ["| task | " + " | ".join(expert_names) + " |", "|---" * (len(expert_names) + 1) + "|"]
    for task, weights in gates.items():
        lines.append(f"| {task} | " + " | ".join(f"{w:.3f}" for w in weights) + " |")
    return "\n".join(lines)


# --- a finished run -------------------------------------------------------------------------


CONFIG = MTLConfig


def config_from_run(header: dict) -> MTLConfig:
    """The run config of an mtl run folder's config.json."""
    from moekit.train.families import run_config

    return run_config(MTLConfig, header, MultiTaskOptions, header["model"])


def load_run(path: Path, device: str = "cpu"):
    """`moekit.load` for an mtl run: the model and its feature spec (`loaded.feature_spec`)."""
    from moekit.data.tabular import FeatureSpec
    from moekit.models.pretrained import read_model_header
    from moekit.train.families import LoadedRun

    header = read_model_header(path)
    model = MultiTaskModel.from_pretrained(path, device=loop.resolve_device(device))
    spec_path = Path(path) / "feature_spec.json"
    spec = FeatureSpec.from_dict(_read_json(spec_path)) if spec_path.is_file() else None
    config = config_from_run(header) if "train" in header else None
    id_column = config.data.id_column if config is not None else None

    def predict(rows, id_column: str | None = id_column):
        """Scores of a DataFrame (or a table file's path) with this model: a DataFrame, a column per task."""
        from moekit.data.table import read_table

        frame = read_table(rows) if isinstance(rows, str | Path) else rows
        return predict_frame(model, spec, frame, rows if isinstance(rows, str | Path) else "<rows>",
                             id_column if id_column in frame.columns else None)

    return LoadedRun("mtl", model, Path(path), config, {"feature_spec": spec, "predict": predict})


def evaluate_run(path: str | Path, device: str = "auto", data_dir: str | None = None) -> dict[str, float]:
    """The test metrics of a finished mtl run, computed again: its data config reloaded (the same
    split, encoded with the saved feature spec) and its model evaluated."""
    loaded = load_run(Path(path), device)
    data_config = loaded.data_config(data_dir)
    data = load_data(data_config)
    if data.spec != loaded.feature_spec:
        raise ValueError(f"the data in {data_config.path or data_config.data_dir} encodes differently from the run's "
                         f"feature spec "
                         f"({Path(path) / 'feature_spec.json'}): is it the data the run was trained on?")
    device_ = next(loaded.model.parameters()).device
    return evaluate(loaded.model, data.test.to(device_), loaded.config.train.eval_batch_size, data.spec.targets)


@torch.no_grad()
def predict_frame(model: MultiTaskModel, spec, frame, source: str | Path = "<rows>",
                  id_column: str | None = None):
    """Scores of the rows of a DataFrame: one column per task (the probability of a binary task, the
    value of a regression task in its own units), after `id_column` when given. Unseen categories
    map to the out-of-vocabulary index of `spec`; a missing or malformed feature column names itself."""
    import pandas as pd

    from moekit.data.table import columns_of, require_columns

    source = Path(source)
    require_columns(frame, [*spec.names, *((id_column,) if id_column else ())], source)
    batch = spec.transform(columns_of(frame, spec.names, [f.name for f in spec.numeric], source))
    device = next(model.parameters()).device
    logits = predict_logits(model, batch.to(device))
    out = pd.DataFrame({id_column: frame[id_column].to_numpy()}) if id_column else pd.DataFrame(index=range(len(frame)))
    for task, kind in model.task_types.items():
        z = logits[task].cpu().double().numpy()
        out[task] = 1 / (1 + np.exp(-z)) if kind == "binary" else spec.unscale(task, z)
    return out


def predict_file(model: MultiTaskModel, spec, path: str | Path, out: str | Path, id_column: str | None = None,
                 chunk_rows: int = 100_000, delimiter: str | None = None, progress: bool = False) -> int:
    """Score a table file chunk by chunk into the CSV `out` (written to a temporary file and renamed at
    the end, so a failure leaves nothing half-written); memory stays flat in the file's length.
    Returns the rows scored."""
    import os
    import tempfile

    from moekit.data.table import iter_table

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    rows, bar = 0, None
    try:
        with os.fdopen(fd, "w", newline="") as f:
            for chunk in iter_table(path, chunk_rows, spec.names, delimiter):
                scores = predict_frame(model, spec, chunk, path, id_column)
                scores.to_csv(f, index=False, header=rows == 0, float_format="%.6g")
                rows += len(chunk)
                if bar is None:
                    bar = loop.progress_bar(progress, unit="row", desc="scoring", unit_scale=True)
                bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    return rows


def _read_json(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
