"""Training and evaluation of sequential recommenders (SASRec, FAME) with leave-one-out splits.

Protocol (the default, `eval_protocol='full'`): the validation target is each user's second-to-last
item, the test target the last; the model ranks *every* item, the user's earlier items are removed
from the candidates (the target always stays one), and HR/NDCG/MRR@{5,10,20} are averaged over
users. `eval_protocol='sampled'` is the SASRec paper's protocol instead: the target is ranked
against `num_negatives` (100) random items the user never interacted with. Sampled numbers are far
higher and are not comparable with full-ranking ones.

Training: every position of the training part of a sequence predicts the next item, with full
softmax cross-entropy over all items (`loss='ce'`) or one sampled negative and binary
cross-entropy (`loss='bce'`, the SASRec paper); every target weighs the same in the loss, however
the length-bucketed batches are cut (see `train_loss`). Early stopping on validation NDCG@10.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moekit.config import ConfigError, check_choice, check_int, check_number, config_dict, documented
from moekit.data.interactions import InteractionsConfig
from moekit.data.sequences import (
    DATASETS,
    LeaveOneOut,
    SequenceDataset,
    leave_one_out,
    load_interactions,
    load_sequences,
    pad_left,
)
from moekit.models.sequential import FAME, FAMEConfig, SASRec, SASRecConfig, build_model
from moekit.train import loop
from moekit.train.metrics import (
    chunked_target_ranks,
    mask_history,
    ranking_metrics,
    sampled_target_ranks,
    target_ranks,
)
from moekit.train.parallel import begin_fit
from moekit.train.results import Stopwatch, TrainResult
from moekit.train.run import Run

KS = (5, 10, 20)
DEFAULT_HEADS = {"sasrec": 4, "fame": 2}  # see SeqRecModelOptions.num_heads
ARCHITECTURES = ("sasrec", "fame")


@documented
@dataclass
class SeqRecModelOptions:
    """Architecture and sizes of a sequential recommender (the `model` section; the catalogue size
    comes from the data)."""

    architecture: str = "sasrec"
    """'sasrec' (Kang & McAuley 2018) or 'fame' (facet-aware multi-head MoE, Liu et al. 2025)."""
    max_len: int = 50
    """Most recent items the model sees (the SASRec paper's 50 for Amazon data)."""
    hidden: int = 64
    """Width of item embeddings and hidden states."""
    num_layers: int = 2
    """Transformer blocks."""
    num_heads: int | None = None
    """Attention heads; None: each model's best on Beauty (docs/results/seqrec_variants.md): SASRec 4
    (NDCG@10 +0.0023 over 2 heads, 3 seeds), FAME 2 (with 4 its facets are 16 wide: NDCG@10 -0.0023)."""
    positions: str = "end"
    """Position index counted back from the newest item ('end', SASRec paper) or from the oldest item
    in the window ('start', RecBole)."""
    num_experts: int = 4
    """FAME: query experts per head."""
    head_mixing: str = "logits"
    """FAME: 'logits' (gate-weighted head scores) or 'probability' (mixture of the heads' softmaxes)."""
    dropout: float = 0.3
    """Dropout on embeddings and block outputs. 0.3 and lr 3e-3: SASRec's best Beauty validation
    NDCG@10 after 6-13 epochs (docs/results/seqrec.md)."""
    attn_dropout: float = 0.3
    """Dropout on attention weights."""

    def __post_init__(self) -> None:
        check_choice("model.architecture", self.architecture, ARCHITECTURES)
        check_choice("model.positions", self.positions, ("end", "start"))
        check_choice("model.head_mixing", self.head_mixing, ("logits", "probability"))
        for name in ("max_len", "hidden", "num_layers", "num_experts"):
            check_int(f"model.{name}", getattr(self, name), 1)
        if self.num_heads is not None:
            check_int("model.num_heads", self.num_heads, 1)
        for name in ("dropout", "attn_dropout"):
            check_number(f"model.{name}", getattr(self, name), 0.0, 1.0, strict_max=True)

    @property
    def heads(self) -> int:
        return self.num_heads if self.num_heads is not None else DEFAULT_HEADS[self.architecture]

    def model_config(self, num_items: int) -> SASRecConfig:
        common = dict(num_items=num_items, max_len=self.max_len, hidden=self.hidden, num_layers=self.num_layers,
                      num_heads=self.heads, positions=self.positions, dropout=self.dropout,
                      attn_dropout=self.attn_dropout)
        if self.architecture == "fame":
            return FAMEConfig(**common, num_experts=self.num_experts, head_mixing=self.head_mixing)
        return SASRecConfig(**common)


@documented
@dataclass
class SequenceDataConfig(InteractionsConfig):
    """Which interaction sequences to train on (the `data` section): your own log (`path`, with its
    column names and an optional items file) or a public dataset by name."""

    dataset: str | None = None
    """'interactions' (your log: `path`), 'beauty' (Amazon Beauty, 5-core), 'ml-100k' or 'ml-1m'
    (MovieLens); None: 'interactions' when `path` is set, else 'beauty'."""
    data_dir: str | None = None
    """A public dataset's folder (None: $MOEKIT_DATA/<folder>)."""
    core: int | None = None
    """k-core filtering (None: 0 for Beauty, which is 5-core already, and your log; 5 for MovieLens)."""

    def __post_init__(self) -> None:
        if self.dataset is None:
            self.dataset = "interactions" if self.path is not None else "beauty"
        check_choice("data.dataset", self.dataset, DATASETS)
        if self.dataset == "interactions" and self.path is None:
            raise ConfigError("data.dataset='interactions' needs data.path (--data FILE)")
        if self.min_rating is not None:
            check_number("data.min_rating", self.min_rating)
        if self.core is not None:
            check_int("data.core", self.core, 0)


@documented
@dataclass
class SeqRecTrainSettings(loop.TrainSettings):
    """How `moekit train seqrec` trains and evaluates (the `train` section)."""

    lr: float = 3e-3
    """Adam learning rate."""
    batch_size: int = 256
    """Training windows per optimizer step."""
    loss: str = "ce"
    """'ce' (full softmax over all items) or 'bce' (one sampled negative, the SASRec paper)."""
    epochs: int = 200
    """Most epochs; early stopping ends sooner."""
    patience: int = 10
    """Epochs without a better validation NDCG@10 before stopping."""
    lr_decay: float | None = None
    """Multiply the learning rate by this after `lr_patience` epochs without a better validation
    NDCG@10 (ReduceLROnPlateau); None: constant."""
    lr_patience: int = 2
    """Epochs without improvement before the learning rate decays."""
    eval_protocol: str = "full"
    """'full' (rank every item, history masked) or 'sampled' (the SASRec paper's target vs 100 random
    unseen items; far higher numbers, not comparable with full ranking)."""
    num_negatives: int = 100
    """Negatives per user for eval_protocol='sampled'."""
    eval_batch_size: int = 1024
    """Users per batch when ranking."""
    valid_users: int | None = None
    """Read early stopping's validation metrics on this many users (a fixed random subset; None: all)."""
    eval_by_length: bool = False
    """Rank users in batches of similar history length (each batch cut to its longest history): on Beauty
    ~3x faster evaluation; scores then differ in the last bits, so a recorded run with it off would not
    come out to the last digit. False: users in their order."""
    loss_chunk: int | None = None
    """loss='ce' with SASRec: score this many positions at a time (the logits computed again in the
    backward pass), so a step holds (loss_chunk x items) floats instead of ~3 x (positions x items): on
    Beauty 12,800 x 12,101 in the longest batches, ~1.9 GB. Equal up to rounding; None: all at once."""

    RUNTIME_KEYS: ClassVar[tuple[str, ...]] = loop.TrainSettings.RUNTIME_KEYS + ("eval_batch_size",)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("train.loss", self.loss, ("ce", "bce"))
        check_choice("train.eval_protocol", self.eval_protocol, ("full", "sampled"))
        for name in ("epochs", "patience", "lr_patience", "num_negatives", "eval_batch_size"):
            check_int(f"train.{name}", getattr(self, name), 1)
        if self.lr_decay is not None:
            check_number("train.lr_decay", self.lr_decay, 0.0, 1.0, strict_min=True, strict_max=True)
        if self.valid_users is not None:
            check_int("train.valid_users", self.valid_users, 1)
        if self.loss_chunk is not None:
            check_int("train.loss_chunk", self.loss_chunk, 1)
            if self.loss != "ce":
                raise ConfigError("train.loss_chunk chunks the full-softmax loss: it needs train.loss='ce'")


def _check_sections(config) -> None:
    if config.train.loss_chunk is not None and config.model.architecture != "sasrec":
        raise ConfigError("train.loss_chunk is for SASRec (FAME scores all its heads' items at once)")
    if config.model.head_mixing == "probability" and config.train.loss == "bce" and \
            config.model.architecture == "fame":
        raise ConfigError("model.head_mixing='probability' needs train.loss='ce' (sampled negatives have no "
                          "full softmax per head); use head_mixing='logits' with loss='bce'")


SeqRecConfig = loop.run_config_class(
    "SeqRecConfig", SeqRecModelOptions, SequenceDataConfig, SeqRecTrainSettings,
    "Everything one `moekit train seqrec` run needs: `model` (architecture and sizes), `data` (the "
    "interaction sequences), `train` (optimisation, early stopping, evaluation protocol).", _check_sections)


def training_windows(train: list[list[int]], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and next-item targets, (W, max_len) each, left-padded. A sequence longer than
    max_len + 1 is cut into consecutive windows from its end, so every item is a target once."""
    inputs, targets = [], []
    for seq in train:
        end = len(seq)
        while end >= 2:
            start = max(0, end - max_len - 1)
            window = seq[start:end]
            inputs.append(window[:-1])
            targets.append(window[1:])
            end = start + 1 if start > 0 else 0
    if not inputs:
        raise ValueError("no training pairs: every user's training part has fewer than 2 items")
    return pad_left(inputs, max_len), pad_left(targets, max_len)


def length_bucketed_batches(lengths: torch.Tensor, batch_size: int, generator: torch.Generator) -> list:
    """Batches of similar length in random order: shuffle, sort by length (ties stay shuffled), cut
    into batches, shuffle the batches. Short Amazon sequences then cost ~7 positions, not max_len."""
    order = torch.randperm(len(lengths), generator=generator)
    order = order[torch.sort(lengths[order], stable=True).indices]
    batches = list(order.split(batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def _trim(items_BT: torch.Tensor) -> int:
    """Index of the first column that is not all padding (left-padded batches)."""
    nonpad_T = (items_BT != 0).any(0)
    return int(nonpad_T.float().argmax()) if bool(nonpad_T.any()) else items_BT.shape[1] - 1


def train_loss(model: SASRec, inputs_BT: torch.Tensor, targets_BT: torch.Tensor, loss: str,
               negatives_BT: torch.Tensor | None, targets_per_batch: float,
               loss_chunk: int | None = None) -> torch.Tensor:
    """One batch's next-item loss: the sum over its targets divided by `targets_per_batch` (the
    epoch's mean number of targets per batch), so every target weighs the same. A plain batch mean
    would not: length-bucketed batches of 3-item sequences hold ~17x fewer targets than batches of
    50-item windows, and each of their targets would weigh ~17x more (a per-user, not a per-target,
    objective; on Beauty it cost SASRec ~0.012 test HR@10, docs/results/seqrec_variants.md).
    `negatives_BT` (loss 'bce'): one sampled negative per position (`sample_unseen_negatives`);
    `loss_chunk` (loss 'ce'): positions scored at a time (`SeqRecTrainSettings.loss_chunk`)."""
    start = _trim(inputs_BT)
    inputs_BT, targets_BT = inputs_BT[:, start:], targets_BT[:, start:]
    h_BTD = model(inputs_BT)
    keep_BT = targets_BT != 0
    h_PD, target_P = h_BTD[keep_BT], targets_BT[keep_BT]  # only real positions are scored
    if loss == "ce":
        mean = model.next_item_loss(h_PD, target_P) if loss_chunk is None else \
            model.next_item_loss(h_PD, target_P, chunk=loss_chunk)
    else:
        negative_P = negatives_BT[:, start:][keep_BT]
        scores_P2 = model.logits(h_PD, torch.stack([target_P, negative_P], 1))
        labels_P2 = torch.zeros_like(scores_P2)
        labels_P2[:, 0] = 1.0
        mean = F.binary_cross_entropy_with_logits(scores_P2, labels_P2)
    return mean * (len(target_P) / targets_per_batch)


class NextItemObjective(nn.Module):
    """`train_loss` as a module, so data parallelism (DDP) wraps the model with its loss."""

    def __init__(self, model: SASRec, loss: str, targets_per_batch: float, loss_chunk: int | None = None) -> None:
        super().__init__()
        self.model, self.loss, self.targets_per_batch, self.loss_chunk = model, loss, targets_per_batch, loss_chunk

    def forward(self, inputs_BT: torch.Tensor, targets_BT: torch.Tensor,
                negatives_BT: torch.Tensor | None = None) -> torch.Tensor:
        return train_loss(self.model, inputs_BT, targets_BT, self.loss, negatives_BT, self.targets_per_batch,
                          self.loss_chunk)


def sample_unseen_negatives(inputs_BT: torch.Tensor, targets_BT: torch.Tensor, num_items: int,
                            generator: torch.Generator, rounds: int = 10) -> torch.Tensor:
    """(B, T) uniform random items avoiding the items of their row's window (the SASRec paper's
    negatives avoid the user's items). Clashes are redrawn up to `rounds` times; one still left (only
    likely when a row holds a large share of the catalogue) is kept."""
    seen_BS = torch.cat([inputs_BT, targets_BT[:, -1:]], dim=1)  # the window's items (0 = padding)
    negative_BT = torch.randint(1, num_items + 1, targets_BT.shape, generator=generator)
    for _ in range(rounds):
        clash_BT = (negative_BT.unsqueeze(-1) == seen_BS.unsqueeze(1)).any(-1)
        if not bool(clash_BT.any()):
            break
        redraw_BT = torch.randint(1, num_items + 1, targets_BT.shape, generator=generator)
        negative_BT = torch.where(clash_BT, redraw_BT, negative_BT)
    return negative_BT


def sample_negatives(histories: list[list[int]], targets: np.ndarray, num_items: int, n: int,
                     rng: np.random.Generator) -> np.ndarray:
    """(U, n) items drawn uniformly without replacement from those the user never interacted with."""
    out = np.empty((len(histories), n), dtype=np.int64)
    for row, (history, target) in enumerate(zip(histories, targets, strict=True)):
        seen = set(history) | {int(target)}
        if num_items - len(seen) < n:
            raise ValueError(f"user row {row} has only {num_items - len(seen)} unseen items, need {n}")
        picked: list[int] = []
        while len(picked) < n:
            for item in rng.integers(1, num_items + 1, size=2 * n).tolist():
                if item not in seen:
                    seen.add(item)
                    picked.append(item)
                    if len(picked) == n:
                        break
        out[row] = picked
    return out


@torch.no_grad()
def evaluate(model: SASRec, histories: list[list[int]], targets: np.ndarray, *, protocol: str = "full",
             negatives: np.ndarray | None = None, batch_size: int = 1024, ks=KS,
             item_chunk: int = 8192, by_length: bool = False) -> tuple[dict, torch.Tensor]:
    """Metrics and per-user 0-based target ranks. Full protocol: all items, history masked; a SASRec
    or FAME ('logits' mixing) is scored `item_chunk` items at a time (`chunked_target_ranks`: memory
    (batch_size x item_chunk), flat in the catalogue size, the same ranks as the whole score matrix).
    `by_length`: batch users of similar history length (each batch is cut to its longest history, so
    short histories cost little); the ranks come back in the users' order."""
    model.eval()
    max_len, device = model.config.max_len, next((p.device for p in model.parameters()), torch.device("cpu"))
    chunked = protocol == "full" and isinstance(model, SASRec) and \
        getattr(model.config, "head_mixing", "logits") == "logits"
    order = np.argsort([min(len(h), max_len) for h in histories], kind="stable") if by_length else \
        np.arange(len(histories))
    ranks = []
    for lo in range(0, len(histories), batch_size):
        rows = order[lo:lo + batch_size]
        hist = [histories[u] for u in rows]
        items_BT = torch.from_numpy(pad_left(hist, max_len))
        items_BT = items_BT[:, _trim(items_BT):]
        target_B = torch.from_numpy(np.asarray(targets)[rows])
        if chunked:
            h_BD = model(items_BT.to(device))[:, -1]
            approx_B = model.logits(h_BD, target_B.view(-1, 1).to(device)).squeeze(1).cpu()
            ranks.append(chunked_target_ranks(lambda a, b: model.logits(h_BD, slice(a, b)),  # noqa: B023
                                              model.config.num_items + 1, target_B, approx_B, hist, item_chunk))
            continue
        scores_BI = model.scores(items_BT.to(device)).float().cpu()
        if protocol == "full":
            ranks.append(target_ranks(mask_history(scores_BI, hist, target_B), target_B))
        else:
            negatives_BC = torch.from_numpy(negatives[rows])
            ranks.append(sampled_target_ranks(scores_BI, target_B, negatives_BC))
    ranks_U = torch.empty(len(histories), dtype=torch.long)
    ranks_U[torch.from_numpy(order)] = torch.cat(ranks).long() if ranks else ranks_U
    return ranking_metrics(ranks_U, ks), ranks_U


def _fmt(metrics: dict, keys=("HR@10", "NDCG@10")) -> str:
    return " ".join(f"{k} {metrics[k]:.4f}" for k in keys)


def resolve_data(config: SequenceDataConfig) -> SequenceDataConfig:
    """`config` with its files and folders made absolute, so the run folder names the data from anywhere."""
    from moekit.data.paths import resolve_data_dir
    from moekit.data.sequences import dataset_folder

    if config.dataset == "interactions":
        return dataclasses.replace(config, **config.absolute())
    folder = resolve_data_dir(config.data_dir, dataset_folder(config.dataset))
    return dataclasses.replace(config, data_dir=str(folder))


def load_data(config: SequenceDataConfig) -> SequenceDataset:
    """The interaction sequences `config` names, preprocessed as it says."""
    if config.dataset == "interactions":
        return load_interactions(config, core=config.core or 0)
    return load_sequences(config.dataset, config.data_dir, min_rating=config.min_rating, core=config.core)


def fit(config: SeqRecConfig, out: str | Path | None = None, *, mode: str = "new",
        data: SequenceDataset | None = None, model_factory: Callable[[str, SASRecConfig], SASRec] = build_model,
        log=print) -> TrainResult:
    """Train with early stopping on validation NDCG@10, restore the best epoch, test it, into the run
    folder `out` (None: write nothing). `mode`: 'new', 'resume' or 'overwrite'.

    `model_factory(architecture, model_config)` builds the model after seeding (an experiment's variant
    of SASRec/FAME; the run folder then loads back only through the same factory). Under torchrun
    every process calls this (data parallelism: see `moekit.train.parallel`).
    """
    settings, options = config.train, config.model
    parallel, generator = begin_fit(settings, out, mode)
    device = parallel.device
    rng = np.random.default_rng(settings.seed)
    if data is None:
        config = dataclasses.replace(config, data=resolve_data(config.data))
        data = load_data(config.data)
    split = leave_one_out(data.sequences)
    inputs_WT, targets_WT = (torch.from_numpy(a) for a in training_windows(split.train, options.max_len))
    lengths_W = (inputs_WT != 0).sum(1)
    num_targets = int((targets_WT != 0).sum())
    targets_per_batch = num_targets / math.ceil(len(inputs_WT) / settings.batch_size)
    model = model_factory(options.architecture, options.model_config(data.num_items)).to(device)
    trained = parallel.wrap(NextItemObjective(model, settings.loss, targets_per_batch, settings.loss_chunk))
    optimizer = loop.build_optimizer(model, settings, kind="adam")
    scheduler = None
    if settings.lr_decay is not None:
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=settings.lr_decay,
                                                               patience=settings.lr_patience)
    n_valid = len(split.users) if settings.valid_users is None else min(settings.valid_users, len(split.users))
    valid_rows = np.sort(rng.permutation(len(split.users))[:n_valid])
    valid_history = [split.valid_history[u] for u in valid_rows]
    valid_target = split.valid_target[valid_rows]
    valid_neg = test_neg = None
    if settings.eval_protocol == "sampled":
        n, items = settings.num_negatives, data.num_items
        valid_neg = sample_negatives(split.valid_history, split.valid_target, items, n, rng)
        test_neg = sample_negatives(split.test_history, split.test_target, items, n, rng)
    eval_kw = dict(protocol=settings.eval_protocol, batch_size=settings.eval_batch_size,
                   by_length=settings.eval_by_length)
    stopper = loop.EarlyStopping("validation NDCG@10", settings.patience)
    state_rng = loop.RNGState(generator, rng)

    run = Run(out, "seqrec", mode, writer=parallel.is_main, tensorboard=True)
    with run:
        run.write_config(model, {"data": config_dict(config.data), "train": config_dict(settings)},
                         settings.RUNTIME_KEYS)
        run.write_artifact("items.json", item_catalogue(data))
        done_epochs, step = 0, 0
        if mode == "resume":
            done_epochs, step, state = run.resume_epoch(model, optimizer, state_rng, stopper)
            if scheduler is not None:
                scheduler.load_state_dict(state["scheduler"])
        watch = Stopwatch()
        bar = loop.progress_bar(settings.progress and parallel.is_main, total=settings.epochs, initial=done_epochs,
                           unit="epoch", desc=f"{options.architecture} {data.name}")
        for epoch in range(done_epochs + 1, settings.epochs + 1):
            if stopper.should_stop:
                break
            trained.train()
            t0 = time.perf_counter()
            total, batches = 0.0, length_bucketed_batches(lengths_W, settings.batch_size, generator)
            inner = loop.progress_bar(settings.progress and parallel.is_main, total=len(batches), unit="batch",
                                 desc=f"epoch {epoch}", leave=False)
            with watch:
                for idx in batches:
                    inputs_BT, targets_BT = inputs_WT[idx], targets_WT[idx]
                    first = _trim(inputs_BT)  # no column of only padding: short sequences cost little
                    inputs_BT, targets_BT = inputs_BT[:, first:], targets_BT[:, first:]
                    negatives_BT = None
                    if settings.loss == "bce":  # drawn for the whole batch, so every process draws alike
                        negatives_BT = sample_unseen_negatives(inputs_BT, targets_BT, data.num_items, generator)
                    local = parallel.shard(torch.arange(len(idx)))
                    loss = trained(inputs_BT[local].to(device), targets_BT[local].to(device),
                                   None if negatives_BT is None else negatives_BT[local].to(device))
                    loss = loss * parallel.world  # DDP averages: world x (local sum / global targets per batch)
                    loss.backward()
                    step += 1
                    loop.optimizer_step(optimizer, loss, step, run.last_good, settings.grad_clip)
                    total += parallel.global_loss(loss)
                    inner.update(1)
            inner.close()
            train_s = time.perf_counter() - t0
            valid, _ = evaluate(model, valid_history, valid_target,
                                negatives=None if valid_neg is None else valid_neg[valid_rows], **eval_kw)
            lr = optimizer.param_groups[0]["lr"]
            if scheduler is not None:
                scheduler.step(valid["NDCG@10"])
            if stopper.update(epoch, valid["NDCG@10"], model):
                run.save_model(model)
            run.log({"epoch": epoch, "step": step, "loss": total / len(batches), "lr": lr, "train_s": train_s,
                     "valid HR@10": valid["HR@10"], "valid NDCG@10": valid["NDCG@10"]})
            scheduler_state = {"scheduler": scheduler.state_dict()} if scheduler is not None else {}
            run.checkpoint_epoch(epoch, model, optimizer, step, state_rng, settings.keep_checkpoints, stopper,
                                 **scheduler_state)
            bar.update(1)
            bar.set_postfix_str(f"loss {total / len(batches):.3f} val {_fmt(valid)} best@{stopper.best_epoch} "
                                f"{len(inputs_WT) / train_s:,.0f} seq/s")
        bar.close()
        stopper.restore(model)
        run.save_model(model)
        valid, _ = evaluate(model, split.valid_history, split.valid_target, negatives=valid_neg, **eval_kw)
        test, test_ranks = evaluate(model, split.test_history, split.test_target, negatives=test_neg, **eval_kw)
        extra = {"data": {"name": data.name, "users": data.num_users, "items": data.num_items,
                          "interactions": data.num_interactions, "eval_users": len(split.users)},
                 "protocol": protocol_description(settings), "architecture": options.architecture}
        result = TrainResult("seqrec", model, test, valid, run.metrics, stopper.best_epoch or None, step,
                             watch.seconds, run.path, extra)
        run.write_results(result.to_json())
    result.extra["split"], result.extra["test_ranks"] = split, test_ranks  # for analyses, not results.json
    return result


def protocol_description(settings: SeqRecTrainSettings) -> str:
    """One line saying how the run was trained and evaluated."""
    loss = "full softmax CE" if settings.loss == "ce" else "BCE, 1 sampled negative"
    if settings.eval_protocol == "full":
        ev = "full ranking over all items, history masked"
    else:
        ev = f"SAMPLED: target vs {settings.num_negatives} random unseen items (not comparable to full ranking)"
    return f"leave-one-out; {ev}; trained with {loss}; early stopping on validation NDCG@10"


# ---------------------------------------------------------------------------------------------
# A finished run


CONFIG = SeqRecConfig


def item_catalogue(data: SequenceDataset) -> dict:
    """items.json: each internal item id's raw id, title and categories (what `recommend` prints)."""
    return {"dataset": data.name, "raw_item_ids": list(map(_plain, data.raw_item_ids)),
            "titles": {str(k): v for k, v in data.item_titles.items()},
            "categories": {str(k): list(v) for k, v in data.item_categories.items()}}


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def config_from_run(header: dict) -> SeqRecConfig:
    """The run config of a seqrec run folder's config.json."""
    from moekit.train.families import run_config

    options = dict(header["model"], architecture=header["architecture"].lower())
    return run_config(SeqRecConfig, header, SeqRecModelOptions, options)


def load_run(path: Path, device: str = "cpu"):
    """`moekit.load` for a seqrec run: the model and its item catalogue (`loaded.items`)."""
    import json

    from moekit.models.pretrained import read_model_header
    from moekit.train.families import LoadedRun

    header = read_model_header(path)
    model = SASRec.from_pretrained(path, device=loop.resolve_device(device))
    items_path = Path(path) / "items.json"
    items = json.loads(items_path.read_text(encoding="utf-8")) if items_path.is_file() else None
    config = config_from_run(header) if "train" in header else None
    return LoadedRun("seqrec", model, Path(path), config, {"items": items})


def evaluate_run(path: str | Path, device: str = "auto", data_dir: str | None = None) -> dict[str, float]:
    """The test metrics of a finished seqrec run, computed again from its folder and its data."""
    loaded = load_run(Path(path), device)
    data_config = loaded.data_config(data_dir)
    data = load_data(data_config)
    if data.num_items != loaded.model.config.num_items:
        raise ValueError(f"the data in {data_config.path or data_config.data_dir} has {data.num_items} items but "
                         f"the run was trained on {loaded.model.config.num_items}: is it the data it was trained on?")
    settings = loaded.config.train
    split = leave_one_out(data.sequences)
    test_neg = None
    if settings.eval_protocol == "sampled":  # the negatives fit() drew: same seed, same draws
        rng = np.random.default_rng(settings.seed)
        n_valid = len(split.users) if settings.valid_users is None else min(settings.valid_users, len(split.users))
        rng.permutation(len(split.users))[:n_valid]
        sample_negatives(split.valid_history, split.valid_target, data.num_items, settings.num_negatives, rng)
        test_neg = sample_negatives(split.test_history, split.test_target, data.num_items, settings.num_negatives,
                                    rng)
    test, _ = evaluate(loaded.model, split.test_history, split.test_target, protocol=settings.eval_protocol,
                       negatives=test_neg, batch_size=settings.eval_batch_size, by_length=settings.eval_by_length)
    return test


@torch.no_grad()
def recommend(model: SASRec, history: list[int], k: int = 10,
              exclude_history: bool = True) -> list[tuple[int, float]]:
    """Top-k (item, score) for the next step after `history` (remapped item ids)."""
    if not history:
        raise ValueError("the user has no history to recommend from")
    items_1T = torch.tensor([history[-model.config.max_len:]])
    scores_I = model.scores(items_1T)[0].float()
    if exclude_history:
        scores_I[torch.tensor(history)] = float("-inf")
    top = torch.topk(scores_I, min(k, int(torch.isfinite(scores_I).sum())))
    return [(int(i), float(s)) for i, s in zip(top.indices, top.values, strict=True)]


@torch.no_grad()
def head_gate_by_category(model: FAME, split: LeaveOneOut, data: SequenceDataset, top: int = 12,
                          batch_size: int = 1024) -> tuple[list[str], np.ndarray, np.ndarray]:
    """FAME facet analysis: the mean head gate at the test step, grouped by the category of the test
    target (an item with several categories counts in each). Returns the `top` most frequent
    categories, their (C, H) mean gates and user counts."""
    if not isinstance(model, FAME):
        raise ValueError("facet analysis needs a FAME model")
    model.eval()
    gates = []
    for lo in range(0, len(split.test_history), batch_size):
        items_BT = torch.from_numpy(pad_left(split.test_history[lo:lo + batch_size], model.config.max_len))
        h_BD = model(items_BT[:, _trim(items_BT):])[:, -1]
        gates.append(model.head_gate(h_BD).float())
    gate_UH = torch.cat(gates).numpy()
    from collections import Counter

    counts = Counter(c for t in split.test_target for c in data.item_categories.get(int(t), ()))
    names = [c for c, _ in counts.most_common(top)]
    if not names:
        raise ValueError(f"{data.name} has no item categories for the facet analysis")
    table = np.zeros((len(names), gate_UH.shape[1]))
    n = np.zeros(len(names), dtype=np.int64)
    index = {c: j for j, c in enumerate(names)}
    for u, t in enumerate(split.test_target):
        for c in data.item_categories.get(int(t), ()):
            if c in index:
                table[index[c]] += gate_UH[u]
                n[index[c]] += 1
    return names, table / np.maximum(n, 1)[:, None], n


def seconds_per_epoch(result: TrainResult) -> float:
    """Mean training seconds per epoch of a run (evaluation excluded)."""
    return float(np.mean([float(h["train_s"]) for h in result.history])) if result.history else math.nan
