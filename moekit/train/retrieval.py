"""Two-tower retrieval on MovieLens: data preparation, training, leave-last-out evaluation, FAISS
serving and the most-popular baseline evaluated on the same protocol (ALS lives in benchmarks/).

Protocol: each user's latest rating is the test item ('test' split); for the 'valid' split the
latest is dropped and the second latest is the target. The user is scored against the whole
catalogue with every item of their training history excluded; Recall@K / Hit@K for K in
{10, 20, 50, 100}. Every rating counts as a positive interaction.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from moekit.config import ConfigError, check_choice, check_int, config_dict, documented
from moekit.data.interactions import InteractionsConfig
from moekit.data.movielens import MovieLens, from_interactions, leave_last_out, load_movielens, user_sequences
from moekit.models.two_tower import TwoTower, TwoTowerConfig, TwoTowerOptions, in_batch_softmax_loss
from moekit.train import loop
from moekit.train.metrics import chunked_top_k, recall_hit_at_k, top_k_excluding
from moekit.train.parallel import begin_fit
from moekit.train.results import Stopwatch, TrainResult
from moekit.train.run import Run

KS = (10, 20, 50, 100)
YEAR_MIN, YEAR_BUCKET = 1920, 5  # 5-year buckets from 1920 on; bucket 0 = unknown or earlier


def year_buckets(years: np.ndarray, num_buckets: int) -> np.ndarray:
    """0 for unknown years, else 1 + (year - 1920) // 5, clipped into [1, num_buckets)."""
    b = 1 + (np.asarray(years) - YEAR_MIN) // YEAR_BUCKET
    return np.where(np.asarray(years) > 0, np.clip(b, 1, num_buckets - 1), 0).astype(np.int64)


@dataclass
class RetrievalData:
    """Tensors for training and evaluating retrieval. N train interactions, U' evaluated users."""

    num_users: int
    num_items: int
    history_len: int
    train_user: torch.Tensor  # (N,)
    train_item: torch.Tensor  # (N,)
    train_history: torch.Tensor  # (N, L) items rated before this one, most recent last, padded with num_items
    item_count: torch.Tensor  # (I,) training interactions per item
    eval_user: torch.Tensor  # (U',)
    eval_target: torch.Tensor  # (U',)
    eval_history: torch.Tensor  # (U', L) the user's last L training items
    seen: torch.Tensor  # (U, I) bool: the user's training items, excluded at evaluation
    sequences: list = field(default_factory=list)  # per user, training items in time order
    side: dict = field(default_factory=dict)  # side features for TwoTower.set_side_features


def prepare_retrieval_data(ml: MovieLens, split: str = "test", history_len: int = 50,
                           num_year_buckets: int = 20) -> RetrievalData:
    """Leave-last-out split of `ml` with per-interaction history windows and side features."""
    if split not in ("test", "valid"):
        raise ValueError(f"split must be 'test' or 'valid' (got {split!r})")
    user, item, ts = ml.user, ml.item, ml.timestamp
    test_rows, train_mask = leave_last_out(ml)
    if split == "valid":  # drop the test item, hold out the one before it
        keep = train_mask
        sub = MovieLens(**{**ml.__dict__, "user": user[keep], "item": item[keep], "rating": ml.rating[keep],
                           "timestamp": ts[keep]})
        valid_rows, sub_train = leave_last_out(sub)
        user, item, ts = sub.user, sub.item, sub.timestamp
        test_rows, train_mask = valid_rows, sub_train
    eval_user, eval_target = user[test_rows], item[test_rows]
    # a user whose only rating is the held-out one has no history: still evaluated (profile only)
    seqs = user_sequences(user[train_mask], item[train_mask], ts[train_mask], ml.num_users)
    L, pad = history_len, ml.num_items
    hist_rows, tr_user, tr_item = [], [], []
    for u, seq in enumerate(seqs):
        if len(seq) == 0:
            continue
        padded = np.concatenate([np.full(L, pad, dtype=np.int64), seq])
        # history of position t = seq[t-L:t], i.e. padded[t:t+L]; most recent last
        idx = np.arange(len(seq))[:, None] + np.arange(L)[None, :]
        hist_rows.append(padded[idx])
        tr_user.append(np.full(len(seq), u, dtype=np.int64))
        tr_item.append(seq)
    seen = torch.zeros(ml.num_users, ml.num_items, dtype=torch.bool)
    seen[torch.from_numpy(user[train_mask]), torch.from_numpy(item[train_mask])] = True
    eval_hist = np.stack([
        np.concatenate([np.full(L, pad, dtype=np.int64), seqs[u]])[-L:] for u in eval_user
    ]) if len(eval_user) else np.zeros((0, L), dtype=np.int64)
    data = RetrievalData(
        num_users=ml.num_users, num_items=ml.num_items, history_len=L,
        train_user=torch.from_numpy(np.concatenate(tr_user)),
        train_item=torch.from_numpy(np.concatenate(tr_item)),
        train_history=torch.from_numpy(np.concatenate(hist_rows)),
        item_count=torch.bincount(torch.from_numpy(item[train_mask]), minlength=ml.num_items),
        eval_user=torch.from_numpy(eval_user), eval_target=torch.from_numpy(eval_target),
        eval_history=torch.from_numpy(eval_hist), seen=seen, sequences=seqs,
        side={"item_genres_IG": torch.from_numpy(ml.genres.astype(np.float32)),
              "item_year_I": torch.from_numpy(year_buckets(ml.years, num_year_buckets)),
              "user_features_UF": torch.from_numpy(ml.user_features()[0])},
    )
    return data


def recent_history(data: RetrievalData, user: int) -> torch.Tensor:
    """(L,) the last `history_len` training items of `user` (most recent last), padded."""
    seq = data.sequences[user]
    L = data.history_len
    return torch.from_numpy(np.concatenate([np.full(L, data.num_items, dtype=np.int64), seq])[-L:])


# ----------------------------------------------------------------------------- evaluation


def evaluate_scores(scores_UI: torch.Tensor, data: RetrievalData, ks=KS) -> dict[str, float]:
    """Recall@K / Hit@K of a full (eval users x catalogue) score matrix, history excluded."""
    topk = top_k_excluding(scores_UI.float(), max(ks), data.seen[data.eval_user])
    return recall_hit_at_k(topk.numpy(), data.eval_target.numpy(), ks)


@torch.no_grad()
def two_tower_scores(model: TwoTower, data: RetrievalData, batch_size: int = 1024) -> torch.Tensor:
    """(U', I) scores of the evaluated users against every item."""
    model.eval()
    items_ID = model.all_item_embeddings()
    users = [model.user_forward(u, h).embedding for u, h in
             zip(data.eval_user.split(batch_size), data.eval_history.split(batch_size), strict=True)]
    return torch.cat(users) @ items_ID.T


@torch.no_grad()
def evaluate_model(model: TwoTower, data: RetrievalData, ks=KS, batch_size: int = 1024,
                   item_chunk: int = 8192) -> dict[str, float]:
    """`evaluate_scores(two_tower_scores(model, data), data, ks)` without the (users x items) matrix: each
    batch of users walks the catalogue `item_chunk` items at a time keeping a running top-K
    (`chunked_top_k`), so memory is (batch_size x item_chunk) beyond the item embeddings."""
    model.eval()
    items_ID = model.all_item_embeddings()
    topk = []
    for lo in range(0, len(data.eval_user), batch_size):
        user_B = data.eval_user[lo:lo + batch_size]
        u_BD = model.user_forward(user_B, data.eval_history[lo:lo + batch_size]).embedding
        seen_BI = data.seen[user_B]
        topk.append(chunked_top_k(lambda a, b: (u_BD @ items_ID[a:b].T).float(), len(items_ID), max(ks),  # noqa: B023
                                  lambda a, b: seen_BI[:, a:b], item_chunk).cpu())  # noqa: B023
    topk_UK = torch.cat(topk) if topk else torch.zeros(0, max(ks), dtype=torch.long)
    return recall_hit_at_k(topk_UK.numpy(), data.eval_target.numpy(), ks)


def popularity_scores(data: RetrievalData) -> torch.Tensor:
    """Most-popular baseline: every user gets the training interaction counts."""
    return data.item_count.float().expand(len(data.eval_user), -1)


# ----------------------------------------------------------------------------- training


def model_config(options: TwoTowerOptions, ml: MovieLens) -> TwoTowerConfig:
    """The options plus the data's user, item and side-feature counts."""
    return TwoTowerConfig(num_users=ml.num_users, num_items=ml.num_items, num_genres=ml.genres.shape[1],
                          user_feature_sizes=ml.user_features()[1], **dataclasses.asdict(options))


@documented
@dataclass
class RetrievalDataConfig(InteractionsConfig):
    """Which interactions to train on and which to hold out (the `data` section): your own log (`path`,
    its column names, an optional items file whose categories become the item tower's tags) or
    MovieLens by name."""

    dataset: str | None = None
    """'interactions' (your log: `path`), 'ml-100k' or 'ml-1m' (MovieLens, with genres, years and user
    demographics); None: 'interactions' when `path` is set, else 'ml-100k'."""
    data_dir: str | None = None
    """MovieLens's folder (None: $MOEKIT_DATA/<dataset>)."""
    split: str = "test"
    """Evaluate on each user's last interaction ('test') or the one before it ('valid', the last dropped)."""

    def __post_init__(self) -> None:
        if self.dataset is None:
            self.dataset = "interactions" if self.path is not None else "ml-100k"
        check_choice("data.dataset", self.dataset, ("interactions", "ml-100k", "ml-1m"))
        check_choice("data.split", self.split, ("test", "valid"))
        if self.dataset == "interactions" and self.path is None:
            raise ConfigError("data.dataset='interactions' needs data.path (--data FILE)")


@documented
@dataclass
class TwoTowerTrainSettings(loop.TrainSettings):
    """How `moekit train two-tower` trains (the `train` section)."""

    lr: float = 2e-3
    """AdamW learning rate."""
    batch_size: int = 512
    """Interactions per step; the other items of the batch are each row's negatives."""
    epochs: int = 20
    """Passes over the training interactions."""
    logq: bool = True
    """Subtract log(expected count in the sample) from each logit (Yi et al. 2019)."""
    extra_negatives: int = 0
    """Uniformly drawn catalogue items added to every batch's negatives (mixed negative sampling)."""
    ks: tuple[int, ...] = KS
    """Cut-offs of the final Recall@K / Hit@K."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("train.epochs", self.epochs, 1)
        check_int("train.extra_negatives", self.extra_negatives, 0)
        self.ks = tuple(self.ks)
        if not self.ks:
            raise ConfigError("train.ks must list at least one cut-off")
        for k in self.ks:
            check_int("train.ks", k, 1)


TwoTowerRunConfig = loop.run_config_class(
    "TwoTowerRunConfig", TwoTowerOptions, RetrievalDataConfig, TwoTowerTrainSettings,
    "Everything one `moekit train two-tower` run needs: `model` (the towers), `data` (the interactions "
    "and the held-out split), `train` (optimisation).")


def resolve_data(config: RetrievalDataConfig) -> RetrievalDataConfig:
    """`config` with its files and folders made absolute, so the run folder names the data from anywhere."""
    from moekit.data.paths import resolve_data_dir

    if config.dataset == "interactions":
        return dataclasses.replace(config, **config.absolute())
    return dataclasses.replace(config, data_dir=str(resolve_data_dir(config.data_dir, config.dataset)))


def load_interactions(config: RetrievalDataConfig, data_dir: str | None = None) -> MovieLens:
    """The interactions `config` names, as retrieval reads them (MovieLens, or your log)."""
    if config.dataset == "interactions":
        ratings, meta = config.read()
        return from_interactions(ratings, meta, Path(config.path).name, config.read_users())
    ml = load_movielens(data_dir or config.data_dir, config.dataset)
    if config.min_rating is not None:
        keep = ml.rating >= config.min_rating
        ml = dataclasses.replace(ml, user=ml.user[keep], item=ml.item[keep], rating=ml.rating[keep],
                                 timestamp=ml.timestamp[keep])
    return ml


def check_cutoffs(ks: tuple[int, ...], data: RetrievalData) -> None:
    """Every K must leave K unseen items for every evaluated user: fail before training, not after."""
    most_seen = int(data.seen[data.eval_user].sum(1).max()) if len(data.eval_user) else 0
    room = data.num_items - most_seen
    if max(ks) > room:
        raise ConfigError(f"train.ks: k={max(ks)} but a user has only {room} unseen items out of {data.num_items} "
                          f"(pass cut-offs up to {room}, e.g. --ks {','.join(str(k) for k in ks if k <= room) or 1})")


class InBatchObjective(nn.Module):
    """The in-batch softmax loss (+ the towers' MoE aux losses) as a module, so data parallelism wraps it.

    Every process encodes the whole global batch's items (the negatives each row is scored against)
    and its own rows' users, and returns its rows' loss as their share of the global batch's mean."""

    def __init__(self, model: TwoTower, settings: TwoTowerTrainSettings, log_q_I: torch.Tensor,
                 neg_log_q: float, world: int = 1) -> None:
        super().__init__()
        self.model, self.settings, self.world = model, settings, world
        self.register_buffer("log_q_I", log_q_I, persistent=False)
        self.neg_log_q = neg_log_q

    def forward(self, user_B: torch.Tensor, history_BL: torch.Tensor, item_B: torch.Tensor, rows: torch.Tensor,
                neg_ids: torch.Tensor | None = None) -> torch.Tensor:
        model, settings = self.model, self.settings
        u_out = model.user_forward(user_B[rows], history_BL[rows])
        i_out = model.item_forward(item_B)
        log_q = self.log_q_I[item_B] if settings.logq else torch.zeros(len(item_B))
        neg = {}
        if neg_ids is not None:
            neg = {"neg_item_MD": model.item_forward(neg_ids).embedding, "neg_ids_M": neg_ids,
                   "neg_log_q_M": torch.full((len(neg_ids),), self.neg_log_q if settings.logq else 0.0)}
        loss = in_batch_softmax_loss(u_out.embedding, i_out.embedding, item_B, log_q, model.config.temperature,
                                     rows=None if len(rows) == len(item_B) else rows, **neg)
        # Shares of the global batch: the rows' losses (the user tower's balancing loss too, over the rows
        # this process encodes) by their count; the item tower's, the same on every process, by 1 / world.
        share = len(rows) / len(item_B)
        return (loss + u_out.aux_loss) * share + i_out.aux_loss / self.world


def fit(config: TwoTowerRunConfig, out: str | Path | None = None, *, mode: str = "new", ml: MovieLens | None = None,
        data: RetrievalData | None = None, log=print) -> TrainResult:
    """Train a two-tower model into the run folder `out` (None: write nothing); Recall/Hit@K at the end.

    Under torchrun every process calls this (data parallelism: each process takes its share of each
    batch's rows; the in-batch negatives stay the global batch's items)."""
    settings, options = config.train, config.model
    parallel, gen = begin_fit(settings, out, mode)
    if ml is None:
        config = dataclasses.replace(config, data=resolve_data(config.data))
        ml = load_interactions(config.data)
    model_cfg = model_config(options, ml)
    if data is None:
        data = prepare_retrieval_data(ml, config.data.split, model_cfg.history_len, model_cfg.num_year_buckets)
    if data.history_len != model_cfg.history_len:
        raise ValueError(f"data history_len={data.history_len} != model history_len={model_cfg.history_len}")
    check_cutoffs(settings.ks, data)
    model = TwoTower(model_cfg)
    model.set_side_features(**data.side)
    N, B = len(data.train_user), settings.batch_size
    # expected count of item j among the B in-batch samples, and of a uniform extra negative
    p_I = data.item_count.double() / N
    log_q_I = torch.log((B * p_I).clamp(min=1e-12)).float()
    neg_log_q = float(np.log(max(settings.extra_negatives, 1) / data.num_items))
    trained = parallel.wrap(InBatchObjective(model, settings, log_q_I, neg_log_q, parallel.world))
    # AdamW on every parameter (norms and biases too), non-fused: the optimizer docs/results/retrieval.md ran.
    opt = loop.build_optimizer(model, settings, kind="adamw", decay_all=True, fused=False)
    steps_per_epoch = (N + B - 1) // B
    rng = loop.RNGState(gen)
    run = Run(out, "two-tower", mode, writer=parallel.is_main, tensorboard=True)
    with run:
        run.write_config(model, {"data": config_dict(config.data), "train": config_dict(settings)},
                         settings.RUNTIME_KEYS)
        run.write_artifact("items.json", {"dataset": ml.name, "raw_item_ids": ml.item_ids.tolist(),
                                          "titles": list(ml.titles)})
        done, step = 0, 0
        if mode == "resume":
            done, step, _ = run.resume_epoch(model, opt, rng)
        bar = loop.progress_bar(settings.progress and parallel.is_main, total=settings.epochs * steps_per_epoch,
                           initial=done * steps_per_epoch, desc=f"two-tower[{model_cfg.tower}]")
        watch = Stopwatch()
        for epoch in range(done, settings.epochs):
            model.train()
            perm = torch.randperm(N, generator=gen)
            total = 0.0
            with watch:
                for idx in perm.split(B):
                    neg_ids = None
                    if settings.extra_negatives:  # drawn for the global batch, so every process draws alike
                        neg_ids = torch.randint(data.num_items, (settings.extra_negatives,), generator=gen)
                    rows = parallel.shard(torch.arange(len(idx)))
                    loss = trained(data.train_user[idx], data.train_history[idx], data.train_item[idx], rows,
                                   neg_ids) * parallel.world
                    loss.backward()
                    step += 1
                    loop.optimizer_step(opt, loss, step, run.last_good, settings.grad_clip)
                    total += parallel.global_loss(loss) * len(idx)
                    bar.update(1)
            run.log({"epoch": epoch + 1, "step": step, "loss": total / N})
            bar.set_postfix(loss=f"{total / N:.4f}")
            run.checkpoint_epoch(epoch + 1, model, opt, step, rng, settings.keep_checkpoints)
        bar.close()
        model.eval()  # no dropout in the exported embeddings
        run.save_model(model)
        run.write_artifact("item_embeddings.safetensors", _tensor_bytes(model.all_item_embeddings()))
        metrics = evaluate_model(model, data, tuple(settings.ks))
        extra = {"split": config.data.split, "num_eval_users": len(data.eval_user), "tower": model_cfg.tower}
        result = TrainResult("two-tower", model, metrics, {}, run.metrics, None, step, watch.seconds, run.path, extra)
        run.write_results(result.to_json())
    return result


def _tensor_bytes(items_ID: torch.Tensor) -> bytes:
    from safetensors.torch import save

    return save({"item_embeddings": items_ID.detach().contiguous().cpu()})


# ----------------------------------------------------------------------------- a finished run


CONFIG = TwoTowerRunConfig


def config_from_run(header: dict) -> TwoTowerRunConfig:
    """The run config of a two-tower run folder's config.json."""
    from moekit.train.families import run_config

    return run_config(TwoTowerRunConfig, header, TwoTowerOptions, header["model"])


def load_run(path: Path, device: str = "cpu"):
    """`moekit.load` for a two-tower run: the model, `loaded.items` (raw ids, titles) and
    `loaded.item_embeddings` (I, D), ready for an `ItemIndex`."""
    import json

    from moekit.io import load_tensors
    from moekit.models.pretrained import read_model_header
    from moekit.train.families import LoadedRun

    path = Path(path)
    header = read_model_header(path)
    model = TwoTower.from_pretrained(path, device=loop.resolve_device(device))
    items = json.loads((path / "items.json").read_text(encoding="utf-8")) if (path / "items.json").is_file() else None
    emb_path = path / "item_embeddings.safetensors"
    embeddings = load_tensors(emb_path)["item_embeddings"] if emb_path.is_file() else model.all_item_embeddings()
    config = config_from_run(header) if "train" in header else None
    return LoadedRun("two-tower", model, path, config, {"items": items, "item_embeddings": embeddings})


def load_run_data(loaded, data_dir: str | None = None) -> tuple[MovieLens, RetrievalData]:
    """The interactions a two-tower run was trained on, split as it was (checked to match the model)."""
    data_config = loaded.data_config(data_dir)
    ml = load_interactions(data_config)
    model = loaded.model
    if ml.num_items != model.config.num_items or ml.num_users != model.config.num_users:
        raise ValueError(f"{ml.name} has {ml.num_users} users and {ml.num_items} items; the run was trained on "
                         f"{model.config.num_users} and {model.config.num_items}: is it the data it was trained on?")
    data = prepare_retrieval_data(ml, data_config.split, model.config.history_len, model.config.num_year_buckets)
    return ml, data


def evaluate_run(path: str | Path, device: str = "auto", data_dir: str | None = None) -> dict[str, float]:
    """The test metrics of a finished two-tower run, computed again from its folder and its data."""
    loaded = load_run(Path(path), device)
    _, data = load_run_data(loaded, data_dir)
    return evaluate_model(loaded.model, data, tuple(loaded.config.train.ks))


class ItemIndex:
    """Nearest-neighbour search over item embeddings with FAISS.

    'flat' (default) is exact maximum inner product; 'hnsw' is the approximate HNSW graph
    (Malkov & Yashunin 2018) for catalogues where exact search is too slow."""

    def __init__(self, item_embeddings_ID, kind: str = "flat", hnsw_m: int = 32) -> None:
        import faiss

        x = np.ascontiguousarray(np.asarray(item_embeddings_ID, dtype=np.float32))
        if x.ndim != 2:
            raise ValueError(f"item embeddings must be 2-D (items, dim), got shape {x.shape}")
        if kind == "flat":
            self.index = faiss.IndexFlatIP(x.shape[1])
        elif kind == "hnsw":
            self.index = faiss.IndexHNSWFlat(x.shape[1], hnsw_m, faiss.METRIC_INNER_PRODUCT)
        else:
            raise ValueError(f"unknown index kind {kind!r}; expected 'flat' or 'hnsw'")
        self.index.add(x)
        self.num_items = x.shape[0]

    def search(self, query_BD, k: int, exclude: list | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (B, k), best first; `exclude[b]` lists items row b must not get."""
        q = np.ascontiguousarray(np.asarray(query_BD, dtype=np.float32).reshape(-1, self.index.d))
        extra = max((len(e) for e in exclude), default=0) if exclude is not None else 0
        if k + extra > self.num_items and exclude is not None:
            extra = self.num_items - k
        if k > self.num_items:
            raise ValueError(f"k={k} exceeds the {self.num_items} indexed items")
        scores, ids = self.index.search(q, k + extra)
        if exclude is None:
            return scores, ids
        if len(exclude) != len(q):
            raise ValueError(f"{len(q)} queries but {len(exclude)} exclusion lists")
        out_s, out_i = np.empty((len(q), k), np.float32), np.empty((len(q), k), np.int64)
        for b, banned in enumerate(exclude):
            keep = ~np.isin(ids[b], np.asarray(banned, dtype=np.int64)) & (ids[b] >= 0)
            if keep.sum() < k:
                raise ValueError(f"only {keep.sum()} items left for query {b} after excluding {len(banned)}")
            out_s[b], out_i[b] = scores[b][keep][:k], ids[b][keep][:k]
        return out_s, out_i
