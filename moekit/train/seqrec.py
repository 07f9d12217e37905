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

import numpy as np
import torch
import torch.nn.functional as F

from moekit.data.sequences import LeaveOneOut, SequenceDataset, leave_one_out, load_sequences, pad_left
from moekit.io import atomic_write_json, load_tensors, read_checkpoint_config, save_tensors
from moekit.models.sequential import FAME, FAMEConfig, SASRec, SASRecConfig, build_model
from moekit.train.metrics import mask_history, ranking_metrics, sampled_target_ranks, target_ranks
from moekit.train.reproducibility import check_finite, seed_everything

KS = (5, 10, 20)
DEFAULT_HEADS = {"sasrec": 4, "fame": 2}  # see SeqRecTrainConfig.num_heads


@dataclass
class SeqRecTrainConfig:
    dataset: str = "beauty"  # beauty | ml-100k | ml-1m
    data_dir: str | None = None  # the dataset's folder; None: $MOEKIT_DATA/<folder>
    min_rating: float | None = None  # MovieLens: keep ratings >= this (None: all, implicit)
    core: int | None = None  # k-core filtering (None: 0 for Beauty, which is 5-core already; 5 for MovieLens)
    model: str = "sasrec"  # sasrec | fame
    loss: str = "ce"  # ce (full softmax) | bce (one sampled negative, as the SASRec paper)
    max_len: int = 50
    hidden: int = 64
    num_layers: int = 2
    # None: each model's best on Beauty (docs/results/seqrec_variants.md): SASRec 4 (NDCG@10 +0.0023
    # over 2 heads, 3 seeds; on ML-100K -0.0019, inside its 0.006 seed std), FAME 2 (with 4 its
    # facets are 16 wide: NDCG@10 -0.0023). These and the settings below were chosen with the
    # per-batch mean loss that moekit trained with before every target weighed the same.
    num_heads: int | None = None
    positions: str = "end"  # end | start (see SASRecConfig.positions)
    num_experts: int = 4
    head_mixing: str = "logits"  # FAME: 'logits' (gate-weighted head scores) | 'probability' (see FAMEConfig)
    # lr 3e-3 and dropout 0.3: SASRec's best Beauty validation NDCG@10 comes after 6-13 epochs
    # (docs/results/seqrec.md). The SASRec paper's lr 1e-3 or dropout 0.5, hidden 128, weight decay
    # and other single changes land within ~2 seed stds of this on Beauty's test set
    # (docs/results/seqrec_variants.md).
    dropout: float = 0.3
    attn_dropout: float = 0.3
    epochs: int = 200
    patience: int = 10  # epochs without a better validation NDCG@10 before stopping
    # Multiply the learning rate by this after `lr_patience` epochs without a better validation
    # NDCG@10 (ReduceLROnPlateau); None: constant learning rate.
    lr_decay: float | None = None
    lr_patience: int = 2
    batch_size: int = 256
    lr: float = 3e-3
    weight_decay: float = 0.0
    eval_protocol: str = "full"  # full | sampled
    num_negatives: int = 100  # for eval_protocol='sampled'
    eval_batch_size: int = 1024
    # Early stopping reads validation metrics on this many users (a fixed random subset; None: all).
    # Full ranking of every user each epoch costs about as much as a training epoch on a small CPU.
    valid_users: int | None = None
    seed: int = 0
    out_dir: str | None = None  # checkpoint + metrics; None: nothing written
    progress: bool = True
    threads: int | None = None  # torch CPU threads (None: leave torch's default)

    def __post_init__(self) -> None:
        choices = {"model": ("sasrec", "fame"), "loss": ("ce", "bce"), "eval_protocol": ("full", "sampled"),
                   "positions": ("end", "start")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)} (got {getattr(self, name)!r})")
        if self.num_heads is None:
            self.num_heads = DEFAULT_HEADS[self.model]
        for name in ("epochs", "batch_size", "eval_batch_size", "num_negatives", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0 (got {self.lr})")
        if self.lr_decay is not None and not 0 < self.lr_decay < 1:
            raise ValueError(f"lr_decay must be in (0, 1) or None (got {self.lr_decay})")
        if self.head_mixing not in ("probability", "logits"):
            raise ValueError(f"head_mixing must be 'probability' or 'logits' (got {self.head_mixing!r})")
        if self.head_mixing == "probability" and self.loss == "bce":
            raise ValueError("head_mixing='probability' needs loss='ce' (sampled negatives have no full "
                             "softmax per head); use head_mixing='logits' with loss='bce'")

    def model_config(self, num_items: int) -> SASRecConfig:
        common = dict(num_items=num_items, max_len=self.max_len, hidden=self.hidden, num_layers=self.num_layers,
                      num_heads=self.num_heads, positions=self.positions, dropout=self.dropout,
                      attn_dropout=self.attn_dropout)
        if self.model == "fame":
            return FAMEConfig(**common, num_experts=self.num_experts, head_mixing=self.head_mixing)
        return SASRecConfig(**common)


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
               num_items: int, generator: torch.Generator, targets_per_batch: float) -> torch.Tensor:
    """One batch's next-item loss: the sum over its targets divided by `targets_per_batch` (the
    epoch's mean number of targets per batch), so every target weighs the same. A plain batch mean
    would not: length-bucketed batches of 3-item sequences hold ~17x fewer targets than batches of
    50-item windows, and each of their targets would weigh ~17x more (a per-user, not a per-target,
    objective; on Beauty it cost SASRec ~0.012 test HR@10, docs/results/seqrec_variants.md)."""
    start = _trim(inputs_BT)
    inputs_BT, targets_BT = inputs_BT[:, start:], targets_BT[:, start:]
    h_BTD = model(inputs_BT)
    keep_BT = targets_BT != 0
    h_PD, target_P = h_BTD[keep_BT], targets_BT[keep_BT]  # only real positions are scored
    if loss == "ce":
        mean = model.next_item_loss(h_PD, target_P)
    else:
        negative_P = sample_unseen_negatives(inputs_BT, targets_BT, num_items, generator)[keep_BT]
        scores_P2 = model.logits(h_PD, torch.stack([target_P, negative_P], 1))
        labels_P2 = torch.zeros_like(scores_P2)
        labels_P2[:, 0] = 1.0
        mean = F.binary_cross_entropy_with_logits(scores_P2, labels_P2)
    return mean * (len(target_P) / targets_per_batch)


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
             negatives: np.ndarray | None = None, batch_size: int = 1024, ks=KS) -> tuple[dict, torch.Tensor]:
    """Metrics and per-user 0-based target ranks. Full protocol: all items, history masked."""
    model.eval()
    max_len = model.config.max_len
    ranks = []
    for lo in range(0, len(histories), batch_size):
        hist = histories[lo:lo + batch_size]
        items_BT = torch.from_numpy(pad_left(hist, max_len))
        items_BT = items_BT[:, _trim(items_BT):]
        target_B = torch.from_numpy(targets[lo:lo + batch_size])
        scores_BI = model.scores(items_BT).float()
        if protocol == "full":
            ranks.append(target_ranks(mask_history(scores_BI, hist, target_B), target_B))
        else:
            negatives_BC = torch.from_numpy(negatives[lo:lo + batch_size])
            ranks.append(sampled_target_ranks(scores_BI, target_B, negatives_BC))
    ranks_U = torch.cat(ranks)
    return ranking_metrics(ranks_U, ks), ranks_U


def _fmt(metrics: dict, keys=("HR@10", "NDCG@10")) -> str:
    return " ".join(f"{k} {metrics[k]:.4f}" for k in keys)


def train(cfg: SeqRecTrainConfig, data: SequenceDataset | None = None,
          model_factory: Callable[[str, SASRecConfig], SASRec] = build_model) -> dict:
    """Train with early stopping on validation NDCG@10, restore the best epoch, test it.
    Returns a result dict (config, epochs, best epoch, validation and test metrics, history).
    `model_factory(kind, model_config)` builds the model after seeding (an experiment's variant of
    SASRec/FAME; its checkpoints load back only through the same factory)."""
    from tqdm import tqdm

    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    generator = seed_everything(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    if data is None:
        data = load_sequences(cfg.dataset, cfg.data_dir, min_rating=cfg.min_rating, core=cfg.core)
    split = leave_one_out(data.sequences)
    inputs_WT, targets_WT = (torch.from_numpy(a) for a in training_windows(split.train, cfg.max_len))
    lengths_W = (inputs_WT != 0).sum(1)
    num_targets = int((targets_WT != 0).sum())
    targets_per_batch = num_targets / math.ceil(len(inputs_WT) / cfg.batch_size)
    model = model_factory(cfg.model, cfg.model_config(data.num_items))
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    scheduler = None
    if cfg.lr_decay is not None:
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=cfg.lr_decay,
                                                               patience=cfg.lr_patience)
    n_valid = len(split.users) if cfg.valid_users is None else min(cfg.valid_users, len(split.users))
    valid_rows = np.sort(rng.permutation(len(split.users))[:n_valid])
    valid_history = [split.valid_history[u] for u in valid_rows]
    valid_target = split.valid_target[valid_rows]
    valid_neg = test_neg = None
    if cfg.eval_protocol == "sampled":
        n, items = cfg.num_negatives, data.num_items
        valid_neg = sample_negatives(split.valid_history, split.valid_target, items, n, rng)
        test_neg = sample_negatives(split.test_history, split.test_target, items, n, rng)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else None
    ckpt = out_dir / "model.safetensors" if out_dir else None

    best, best_epoch, best_state, history, step = -1.0, 0, None, [], 0
    start_time = time.perf_counter()
    bar = tqdm(range(1, cfg.epochs + 1), desc=f"{cfg.model} {data.name}", unit="epoch",
               disable=not cfg.progress)
    for epoch in bar:
        model.train()
        t0 = time.perf_counter()
        total, batches = 0.0, 0
        for idx in length_bucketed_batches(lengths_W, cfg.batch_size, generator):
            loss = train_loss(model, inputs_WT[idx], targets_WT[idx], cfg.loss, data.num_items, generator,
                              targets_per_batch)
            check_finite(loss, step, str(ckpt) if ckpt else "")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, batches, step = total + loss.item(), batches + 1, step + 1
        train_s = time.perf_counter() - t0
        valid, _ = evaluate(model, valid_history, valid_target, protocol=cfg.eval_protocol,
                            negatives=None if valid_neg is None else valid_neg[valid_rows],
                            batch_size=cfg.eval_batch_size)
        history.append({"epoch": epoch, "loss": total / batches, "train_s": train_s,
                        "lr": optimizer.param_groups[0]["lr"],
                        "valid": {k: valid[k] for k in ("HR@10", "NDCG@10")}})
        if scheduler is not None:
            scheduler.step(valid["NDCG@10"])
        if valid["NDCG@10"] > best:
            best, best_epoch = valid["NDCG@10"], epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if out_dir:
                save_checkpoint(out_dir, model, cfg, data)
        bar.set_postfix_str(f"loss {total / batches:.3f} val {_fmt(valid)} best@{best_epoch} "
                            f"{len(inputs_WT) / train_s:,.0f} seq/s")
        if epoch - best_epoch >= cfg.patience:
            break
    model.load_state_dict(best_state)
    valid, _ = evaluate(model, split.valid_history, split.valid_target, protocol=cfg.eval_protocol,
                        negatives=valid_neg, batch_size=cfg.eval_batch_size)
    test, test_ranks = evaluate(model, split.test_history, split.test_target, protocol=cfg.eval_protocol,
                                negatives=test_neg, batch_size=cfg.eval_batch_size)
    result = {
        "config": dataclasses.asdict(cfg),
        "data": {"name": data.name, "users": data.num_users, "items": data.num_items,
                 "interactions": data.num_interactions, "eval_users": len(split.users)},
        "protocol": protocol_description(cfg),
        "epochs_run": len(history),
        "best_epoch": best_epoch,
        "train_seconds": time.perf_counter() - start_time,
        "valid": valid,
        "test": test,
        "history": history,
    }
    if out_dir:
        atomic_write_json(out_dir / "metrics.json", result)
    result["model"] = model
    result["split"] = split
    result["test_ranks"] = test_ranks
    return result


def protocol_description(cfg: SeqRecTrainConfig) -> str:
    loss = "full softmax CE" if cfg.loss == "ce" else "BCE, 1 sampled negative"
    if cfg.eval_protocol == "full":
        ev = "full ranking over all items, history masked"
    else:
        ev = f"SAMPLED: target vs {cfg.num_negatives} random unseen items (not comparable to full ranking)"
    return f"leave-one-out; {ev}; trained with {loss}; early stopping on validation NDCG@10"


# ---------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(out_dir: Path, model: SASRec, cfg: SeqRecTrainConfig, data: SequenceDataset) -> None:
    """model.safetensors (weights) + config.json (model/training config, dataset and id maps)."""
    save_tensors(out_dir / "model.safetensors", model.state_dict())
    atomic_write_json(out_dir / "config.json", {
        "model": cfg.model,
        "model_config": dataclasses.asdict(model.config),
        "train_config": dataclasses.asdict(cfg),
        "dataset": data.name,
    })


def load_checkpoint(ckpt_dir: str | Path) -> tuple[SASRec, dict]:
    """The model (eval mode) and the saved config.json of a `moekit train seqrec` run."""
    ckpt_dir, meta = read_checkpoint_config(ckpt_dir, "train seqrec")
    config_cls = FAMEConfig if meta["model"] == "fame" else SASRecConfig
    model = build_model(meta["model"], config_cls(**meta["model_config"]))
    model.load_state_dict(load_tensors(ckpt_dir / "model.safetensors"))
    return model.eval(), meta


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


def seconds_per_epoch(result: dict) -> float:
    return float(np.mean([h["train_s"] for h in result["history"]])) if result["history"] else math.nan
