"""Two-tower retrieval on MovieLens: data preparation, training, leave-last-out evaluation, FAISS
serving and the most-popular / ALS baselines evaluated on the same protocol.

Protocol: each user's latest rating is the test item ('test' split); for the 'valid' split the
latest is dropped and the second latest is the target. The user is scored against the whole
catalogue with every item of their training history excluded; Recall@K / Hit@K for K in
{10, 20, 50, 100}. Every rating counts as a positive interaction.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from moekit.data.movielens import MovieLens, leave_last_out, load_movielens, user_sequences
from moekit.io import atomic_write_json, load_tensors, read_checkpoint_config, save_tensors
from moekit.models.two_tower import TwoTower, TwoTowerConfig, in_batch_softmax_loss
from moekit.train.metrics import recall_hit_at_k, top_k_excluding
from moekit.train.reproducibility import check_finite, seed_everything

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
              "user_gender_U": torch.from_numpy(ml.gender), "user_age_U": torch.from_numpy(ml.age_group),
              "user_occupation_U": torch.from_numpy(ml.occupation)},
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
    model.eval()
    items_ID = model.all_item_embeddings()
    users = [model.user_forward(u, h).embedding for u, h in
             zip(data.eval_user.split(batch_size), data.eval_history.split(batch_size), strict=True)]
    return torch.cat(users) @ items_ID.T


def popularity_scores(data: RetrievalData) -> torch.Tensor:
    """Most-popular baseline: every user gets the training interaction counts."""
    return data.item_count.float().expand(len(data.eval_user), -1)


def als_scores(data: RetrievalData, factors: int = 64, regularization: float = 0.05, alpha: float = 1.0,
               iterations: int = 15, seed: int = 0) -> torch.Tensor:
    """Matrix-factorisation baseline: implicit-feedback ALS (Hu, Koren & Volinsky 2008) from the
    `implicit` library, on the binary training matrix scaled by `alpha`."""
    import scipy.sparse as sp
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    ui = sp.csr_matrix((np.full(len(data.train_user), alpha, dtype=np.float32),
                        (data.train_user.numpy(), data.train_item.numpy())),
                       shape=(data.num_users, data.num_items))
    ui.sum_duplicates()
    with threadpool_limits(1, "blas"):
        model = AlternatingLeastSquares(factors=factors, regularization=regularization, iterations=iterations,
                                        random_state=seed, num_threads=torch.get_num_threads())
        model.fit(ui, show_progress=False)
    users = torch.from_numpy(np.asarray(model.user_factors))[data.eval_user]
    return users @ torch.from_numpy(np.asarray(model.item_factors)).T


# ----------------------------------------------------------------------------- training


@dataclass
class RetrievalTrainConfig:
    data_dir: str | None = None
    dataset: str = "ml-100k"
    split: str = "test"
    out_dir: str | None = None
    seed: int = 0
    epochs: int = 20
    batch_size: int = 512
    lr: float = 2e-3
    weight_decay: float = 0.0
    logq: bool = True
    """Subtract log(expected count in the sample) from each logit (Yi et al. 2019)."""
    extra_negatives: int = 0
    """Uniformly drawn catalogue items added to every batch's negatives (mixed negative sampling)."""
    ks: tuple = KS
    """Cut-offs of the final Recall@K / Hit@K."""
    model: dict = field(default_factory=dict)
    """TwoTowerConfig fields other than the dataset sizes (tower, dim, pooling, ...)."""
    progress: bool = True


def train_two_tower(cfg: RetrievalTrainConfig, ml: MovieLens | None = None,
                    data: RetrievalData | None = None) -> tuple[TwoTower, dict]:
    """Train a two-tower model; returns it and the final metrics (also written to out_dir)."""
    from tqdm import tqdm

    gen = seed_everything(cfg.seed)
    if ml is None:
        ml = load_movielens(cfg.data_dir, cfg.dataset)
    model_cfg = TwoTowerConfig(num_users=ml.num_users, num_items=ml.num_items, num_genres=ml.genres.shape[1],
                               num_occupations=len(ml.occupations), **cfg.model)
    if data is None:
        data = prepare_retrieval_data(ml, cfg.split, model_cfg.history_len, model_cfg.num_year_buckets)
    if data.history_len != model_cfg.history_len:
        raise ValueError(f"data history_len={data.history_len} != model history_len={model_cfg.history_len}")
    model = TwoTower(model_cfg)
    model.set_side_features(**data.side)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    N, B = len(data.train_user), cfg.batch_size
    # expected count of item j among the B in-batch samples, and of a uniform extra negative
    p_I = data.item_count.double() / N
    log_q_I = torch.log((B * p_I).clamp(min=1e-12)).float()
    neg_log_q = float(np.log(max(cfg.extra_negatives, 1) / data.num_items))
    steps_per_epoch = (N + B - 1) // B
    history: list[dict] = []
    bar = tqdm(total=cfg.epochs * steps_per_epoch, desc=f"two-tower[{model_cfg.tower}]", unit="step",
               disable=not cfg.progress, dynamic_ncols=True)
    start, step = time.perf_counter(), 0
    for epoch in range(cfg.epochs):
        model.train()
        perm = torch.randperm(N, generator=gen)
        total = 0.0
        for idx in perm.split(B):
            items = data.train_item[idx]
            u_out = model.user_forward(data.train_user[idx], data.train_history[idx])
            i_out = model.item_forward(items)
            log_q = log_q_I[items] if cfg.logq else torch.zeros(len(idx))
            neg = {}
            if cfg.extra_negatives:
                neg_ids = torch.randint(data.num_items, (cfg.extra_negatives,), generator=gen)
                neg = {"neg_item_MD": model.item_forward(neg_ids).embedding, "neg_ids_M": neg_ids,
                       "neg_log_q_M": torch.full((cfg.extra_negatives,), neg_log_q if cfg.logq else 0.0)}
            loss = in_batch_softmax_loss(u_out.embedding, i_out.embedding, items, log_q,
                                         model_cfg.temperature, **neg)
            loss = loss + u_out.aux_loss + i_out.aux_loss
            check_finite(loss, step, cfg.out_dir or "")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            step += 1
            bar.update(1)
        history.append({"epoch": epoch + 1, "loss": total / N})
        bar.set_postfix(loss=f"{total / N:.4f}")
    bar.close()
    metrics = evaluate_scores(two_tower_scores(model, data), data, tuple(cfg.ks))
    report = {"metrics": metrics, "history": history, "train_seconds": time.perf_counter() - start,
              "split": cfg.split, "num_eval_users": len(data.eval_user)}
    if cfg.out_dir:
        save_two_tower(cfg.out_dir, model, cfg, report)
    return model, report


# ----------------------------------------------------------------------------- checkpoints and serving


def save_two_tower(out_dir: str | Path, model: TwoTower, cfg: RetrievalTrainConfig, report: dict) -> Path:
    out = Path(out_dir)
    save_tensors(out / "model.safetensors", model.state_dict())
    save_tensors(out / "item_embeddings.safetensors", {"item_embeddings": model.all_item_embeddings()})
    atomic_write_json(out / "config.json", {"model": asdict(model.config), "train": asdict(cfg)})
    atomic_write_json(out / "metrics.json", report)
    return out


def load_two_tower(ckpt_dir: str | Path) -> tuple[TwoTower, dict, torch.Tensor]:
    """The model, the saved config dict and the exported (I, D) item embeddings of a checkpoint folder."""
    ckpt, saved = read_checkpoint_config(ckpt_dir, "train two-tower")
    model = TwoTower(TwoTowerConfig(**saved["model"]))
    model.load_state_dict(load_tensors(ckpt / "model.safetensors"))
    model.eval()
    items = load_tensors(ckpt / "item_embeddings.safetensors")["item_embeddings"]
    return model, saved, items


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
