"""Training multi-task recommenders (Shared-Bottom, OMoE, MMoE, PLE) on tabular data.

`train_mtl(MTLTrainConfig(...))` loads the data, trains one model per seed with Adam and early stopping
on the mean validation AUC (best weights restored), evaluates on the test split and returns a results
dict (per-epoch history, test AUC per task, mean gate weight per expert, mean +- std over seeds).

The loop is built for speed on small rows: the whole split lives as tensors on the device and batches
are index slices of a seeded permutation (no DataLoader, no per-row dicts, no host copies per step).

Loss weighting: fixed per-task weights, or uncertainty weighting (Kendall, Gal and Cipolla, "Multi-Task
Learning Using Uncertainty to Weigh Losses", CVPR 2018) with one learned log-variance per task.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.data.tabular import FeatureSpec, TabularBatch
from moekit.io import atomic_write_json, load_tensors, save_tensors
from moekit.models.multitask import MultiTaskConfig, MultiTaskModel, MultiTaskOptions
from moekit.train.metrics import roc_auc
from moekit.train.reproducibility import check_finite, seed_everything

LOSS_WEIGHTINGS = ("fixed", "uncertainty")
DATASETS = ("census-income",)


@dataclass
class MTLTrainConfig:
    """Everything one `moekit train mtl` run needs; `model` is the architecture and its sizes
    (the features and tasks are filled in from the data by `model_config`)."""

    dataset: str = "census-income"
    data_dir: str | None = None
    group: int = 1
    model: MultiTaskOptions = field(default_factory=MultiTaskOptions)
    seed: int = 0
    seeds: int = 1  # runs seed, seed + 1, ..., reported as mean +- std
    split_seed: int = 0  # fixed split: seeds vary only the model's initialisation and batch order
    max_rows: int | None = None  # read only the first rows (demos, smoke runs)
    epochs: int = 20
    batch_size: int = 1024
    eval_batch_size: int = 16384
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 3  # epochs without a better mean validation AUC before stopping
    loss_weighting: str = "fixed"
    task_weights: tuple[float, ...] | None = None  # fixed weights; default 1 per task
    # Running.
    device: str = "cpu"
    threads: int | None = None  # torch intra-op threads; None keeps torch's default
    out_dir: str | None = None  # checkpoints and metrics.json; None writes nothing
    progress: bool = True

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, got {self.loss_weighting!r}")
        for name in ("seeds", "epochs", "batch_size", "eval_batch_size", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 2 and self.model.input_batchnorm:
            raise ValueError("batch_size must be >= 2 with input_batchnorm (BatchNorm needs 2 rows)")
        if not (self.lr > 0):
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.max_rows is not None and self.max_rows < 8:
            raise ValueError(f"max_rows must be >= 8 to leave rows in every split, got {self.max_rows}")

    def model_config(self, spec: FeatureSpec, tasks: tuple[str, ...]) -> MultiTaskConfig:
        return MultiTaskConfig.from_options(self.model, spec.vocab_sizes, spec.num_numeric, tasks)


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


@torch.no_grad()
def evaluate(model: MultiTaskModel, data: TabularBatch, batch_size: int = 16384) -> dict:
    """Per-task AUC (scikit-learn) and loss, and the mean gate weight per expert, over `data`."""
    model.eval()
    tasks, types = model.config.tasks, model.task_types
    logits = {t: [] for t in tasks}
    gate_sums = {t: 0.0 for t in tasks}
    for start in range(0, len(data), batch_size):
        out = model(data.cat_NC[start:start + batch_size], data.num_NF[start:start + batch_size])
        for t in tasks:
            logits[t].append(out.logits[t].float())
            if out.gates:
                gate_sums[t] = gate_sums[t] + out.gates[t].double().sum(0)
    logits = {t: torch.cat(v) for t, v in logits.items()}
    losses = task_losses(logits, data.labels_NT, types)
    labels = data.labels_NT.cpu().numpy()
    result = {"auc": {}, "loss": {}, "gates": {}}
    for i, t in enumerate(tasks):
        result["loss"][t] = float(losses[i])
        scores = logits[t].cpu().numpy()
        result["auc"][t] = roc_auc(labels[:, i], scores) if types[t] == "binary" else float("nan")
        if isinstance(gate_sums[t], Tensor):
            result["gates"][t] = (gate_sums[t] / len(data)).tolist()
    return result


def make_adam(params, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    # The fused kernel updates all parameters in one pass (CPU and CUDA); fall back where unsupported.
    try:
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, foreach=True)


def train_epoch(model: MultiTaskModel, optimizer: torch.optim.Optimizer, train: TabularBatch,
                batch_size: int, generator: torch.Generator, combine, progress: bool = False,
                desc: str = "") -> tuple[float, int]:
    """One pass over `train` (tensors already on the device) in a seeded random order: index slices,
    no DataLoader. `combine` maps the (T,) task losses to the scalar to minimise. Returns (mean loss,
    steps); the loss is read back once per epoch, not per step, so the device never waits on the host."""
    from tqdm.auto import tqdm

    model.train()
    n, types = len(train), model.task_types
    order = torch.randperm(n, generator=generator).to(train.cat_NC.device)
    bar = tqdm(total=n, unit="row", unit_scale=True, desc=desc, leave=False, disable=not progress,
               mininterval=0.5)
    loss_sum, steps = torch.zeros((), device=train.cat_NC.device), 0
    for lo in range(0, n, batch_size):
        idx = order[lo:lo + batch_size]
        if idx.numel() < 2:  # BatchNorm cannot train on one row
            continue
        # index_select, not advanced indexing: the same gather at a fraction of the per-call overhead.
        out = model(train.cat_NC.index_select(0, idx), train.num_NF.index_select(0, idx))
        loss = combine(task_losses(out.logits, train.labels_NT.index_select(0, idx), types))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach()
        steps += 1
        bar.update(idx.numel())
    bar.close()
    return (loss_sum / max(steps, 1)).item(), steps


def _mean_auc(aucs: dict[str, float]) -> float:
    values = [v for v in aucs.values() if not math.isnan(v)]
    return float(np.mean(values)) if values else float("-inf")


def fit_one(cfg: MTLTrainConfig, data, seed: int, log=print) -> tuple[MultiTaskModel, dict]:
    """Train one model on `data` (a CensusIncome-like object with train/valid/test, spec, tasks)."""
    device = torch.device(cfg.device)
    generator = seed_everything(seed)
    model = MultiTaskModel(cfg.model_config(data.spec, tuple(data.tasks))).to(device)
    weighting = UncertaintyWeighting(model.config.task_types).to(device) \
        if cfg.loss_weighting == "uncertainty" else None
    weights_T = torch.tensor(cfg.task_weights or [1.0] * len(data.tasks), device=device)
    if weights_T.numel() != len(data.tasks):
        raise ValueError(f"task_weights has {weights_T.numel()} entries for tasks {list(data.tasks)}")
    params = list(model.parameters()) + (list(weighting.parameters()) if weighting is not None else [])
    optimizer = make_adam(params, cfg.lr, cfg.weight_decay)
    combine = weighting if weighting is not None else (lambda losses_T: (weights_T * losses_T).sum())
    train, valid = data.train.to(device), data.valid.to(device)
    n = len(train)
    history, best, best_state, best_epoch, stale = [], float("-inf"), None, -1, 0
    header = ["epoch", "train loss"] + [f"val {k} {t}" for t in data.tasks for k in ("AUC", "loss")]
    header.append("samples/s")
    log(" | ".join(header))
    step, train_seconds, train_samples = 0, 0.0, 0
    for epoch in range(1, cfg.epochs + 1):
        start = time.perf_counter()
        train_loss, steps = train_epoch(model, optimizer, train, cfg.batch_size, generator, combine,
                                        progress=cfg.progress, desc=f"epoch {epoch}")
        step += steps
        seconds = time.perf_counter() - start
        check_finite(torch.tensor(train_loss), step, cfg.out_dir or "")
        train_seconds += seconds
        train_samples += n
        val = evaluate(model, valid, cfg.eval_batch_size)
        record = {"epoch": epoch, "train_loss": train_loss, "val_auc": val["auc"], "val_loss": val["loss"],
                  "samples_per_s": n / seconds}
        history.append(record)
        row = [f"{epoch:5d}", f"{train_loss:10.4f}"]
        row += [f"{val[k][t]:.4f}" for t in data.tasks for k in ("auc", "loss")]
        log(" | ".join(row + [f"{n / seconds:,.0f}"]))
        score = _mean_auc(val["auc"])
        if score > best:
            best, best_epoch, stale = score, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= cfg.patience:
                log(f"early stop: mean validation AUC has not improved for {cfg.patience} epochs")
                break
    model.load_state_dict(best_state)
    test = evaluate(model, data.test.to(device), cfg.eval_batch_size)
    run = {
        "seed": seed,
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "val_auc": history[best_epoch - 1]["val_auc"],
        "test_auc": test["auc"],
        "test_loss": test["loss"],
        "gates": test["gates"],
        "expert_names": model.expert_names,
        "train_samples_per_s": train_samples / train_seconds,
        "history": history,
    }
    if weighting is not None:
        run["log_variances"] = dict(zip(data.tasks, weighting.log_var_T.tolist(), strict=True))
    return model, run


def summarize(runs: list[dict], tasks) -> dict:
    """Mean and sample std over seeds of the test AUC per task (std 0 for a single seed)."""
    out = {}
    for task in tasks:
        values = np.array([r["test_auc"][task] for r in runs], dtype=np.float64)
        std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        out[task] = {"mean": float(values.mean()), "std": std, "values": values.tolist()}
    return out


def load_data(cfg: MTLTrainConfig):
    from moekit.data.census import load_census_income

    return load_census_income(cfg.data_dir, group=cfg.group, split_seed=cfg.split_seed, max_rows=cfg.max_rows)


def train_mtl(cfg: MTLTrainConfig, data=None, log=print) -> dict:
    """Train `cfg.seeds` models and return the results dict (see the module docstring).

    `data` (from `moekit.data.census.load_census_income`) may be passed to reuse a loaded split.
    With `cfg.out_dir`, each seed's best checkpoint and `metrics.json` are written atomically.
    """
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    data = data if data is not None else load_data(cfg)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else None
    results = {
        "dataset": cfg.dataset,
        "group": data.group,
        "protocol": data.protocol,
        "tasks": list(data.tasks),
        "model": cfg.model.architecture,
        "rows": {"train": len(data.train), "valid": len(data.valid), "test": len(data.test)},
        "config": asdict(cfg),
        "runs": [],
    }
    log(f"census-income group {data.group} ({', '.join(data.tasks)}), model {cfg.model.architecture}; "
        f"protocol: {data.protocol}; rows train/valid/test = {len(data.train)}/{len(data.valid)}/{len(data.test)}")
    for seed in range(cfg.seed, cfg.seed + cfg.seeds):
        log(f"--- seed {seed}")
        model, run = fit_one(cfg, data, seed, log)
        results["runs"].append(run)
        results["summary"] = summarize(results["runs"], data.tasks)
        if out_dir is not None:
            ckpt = out_dir / f"{cfg.model.architecture}-group{data.group}-seed{seed}.safetensors"
            save_checkpoint(ckpt, model, data.spec)
            run["checkpoint"] = ckpt.name
            atomic_write_json(out_dir / "metrics.json", results)
        log("test AUC: " + ", ".join(f"{t} {run['test_auc'][t]:.4f}" for t in data.tasks)
            + f" (best epoch {run['best_epoch']})")
    results["expert_names"] = results["runs"][-1]["expert_names"]
    # Gates of the first seed: experts are exchangeable between seeds, so averaging them means nothing.
    results["gates"] = results["runs"][0]["gates"]
    if out_dir is not None:
        atomic_write_json(out_dir / "metrics.json", results)
    return results


def save_checkpoint(path: str | Path, model: MultiTaskModel, spec: FeatureSpec) -> Path:
    """Weights plus the model config and the feature spec (vocabularies, statistics) in one file."""
    cfg = asdict(model.config)
    metadata = {"format": "moekit.multitask/1", "config": json.dumps(cfg),
                "feature_spec": json.dumps(spec.to_dict())}
    return save_tensors(path, model.state_dict(), metadata)


def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[MultiTaskModel, FeatureSpec]:
    """The model and the feature spec saved by `save_checkpoint` (serving maps raw values with the spec)."""
    from safetensors import safe_open

    tensors = load_tensors(path, device)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != "moekit.multitask/1":
        raise ValueError(f"checkpoint {path} is not a moekit multi-task checkpoint")
    model = MultiTaskModel(MultiTaskConfig(**json.loads(metadata["config"]))).to(device)
    model.load_state_dict(tensors)
    return model.eval(), FeatureSpec.from_dict(json.loads(metadata["feature_spec"]))


def gate_table(gates: dict[str, list[float]], expert_names: list[str]) -> str:
    """Markdown table: a row per task, a column per expert, mean gate weight."""
    lines = ["| task | " + " | ".join(expert_names) + " |", "|---" * (len(expert_names) + 1) + "|"]
    for task, weights in gates.items():
        lines.append(f"| {task} | " + " | ".join(f"{w:.3f}" for w in weights) + " |")
    return "\n".join(lines)


def plot_gate_heatmap(panels: dict[str, tuple[dict[str, list[float]], list[str]]], path: str | Path,
                      title: str = "") -> Path:
    """One heatmap per panel (e.g. per model): tasks x experts, colour = mean gate weight (atomic write)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moekit.io import atomic_write_bytes

    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 1.3 + 1.1 * len(panels) * 1.6), squeeze=False)
    for ax, (name, (gates, experts)) in zip(axes[:, 0], panels.items(), strict=True):
        matrix = np.array(list(gates.values()))
        image = ax.imshow(matrix, cmap="viridis", vmin=0, vmax=max(matrix.max(), 1e-6), aspect="auto")
        ax.set_yticks(range(len(gates)), list(gates))
        ax.set_xticks(range(len(experts)), experts, rotation=30, ha="right", fontsize=8)
        for i in range(matrix.shape[0]):
            for j in range(matrix.shape[1]):
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if matrix[i, j] < 0.6 * matrix.max() else "black")
        ax.set_title(name, fontsize=10)
        fig.colorbar(image, ax=ax, fraction=0.02)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())

