"""Evaluation metrics. AUC comes from scikit-learn; ranking metrics follow their textbook definitions.

Ranking metrics take the 0-based rank of the one held-out target item among all candidates
(0 = ranked first), as in leave-one-out evaluation.

Full ranking at scale: `chunked_target_ranks` and `chunked_top_k` take a `score_chunk(lo, hi)` callable
that scores every row against items lo..hi-1 and walk the catalogue a chunk at a time, so memory is
(rows x chunk), flat in the number of items; they give the ranks / top-K of the whole-matrix functions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch


def roc_auc(labels, scores, sample_weight=None) -> float:
    """Area under the ROC curve (scikit-learn); NaN when only one class is present."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels)
    if labels.size == 0 or np.unique(labels).size < 2:
        return float("nan")
    return float(roc_auc_score(labels, np.asarray(scores), sample_weight=sample_weight))


def target_ranks(scores_NI: torch.Tensor, target_N: torch.Tensor) -> torch.Tensor:
    """0-based rank of each row's target among its scores (ties count against the target:
    an item scoring equal to the target ranks ahead of it, so constant scores give no credit).
    Exclude items by setting their score to -inf before calling."""
    target_scores_N1 = scores_NI.gather(1, target_N.view(-1, 1))
    return (scores_NI >= target_scores_N1).sum(dim=1) - 1


def ranking_metrics(ranks: torch.Tensor | np.ndarray, ks: Iterable[int] = (5, 10, 20)) -> dict[str, float]:
    """HR@K (hit rate = recall with one target), NDCG@K = 1/log2(rank+2) if rank < K, MRR@K."""
    ranks = torch.as_tensor(ranks, dtype=torch.float64)
    out: dict[str, float] = {}
    if ranks.numel() == 0:
        return {f"{m}@{k}": float("nan") for k in ks for m in ("HR", "NDCG", "MRR")}
    for k in ks:
        hit = ranks < k
        out[f"HR@{k}"] = hit.double().mean().item()
        out[f"NDCG@{k}"] = torch.where(hit, 1.0 / torch.log2(ranks + 2), 0.0).mean().item()
        out[f"MRR@{k}"] = torch.where(hit, 1.0 / (ranks + 1), 0.0).mean().item()
    return out


def top_k_excluding(scores_NI: torch.Tensor, k: int, exclude_NI: torch.Tensor | None = None) -> torch.Tensor:
    """(N, k) indices of each row's k best scores, skipping the items where `exclude_NI` is True
    (e.g. a user's history). Raises if a row has fewer than k allowed items."""
    if exclude_NI is not None:
        if exclude_NI.shape != scores_NI.shape:
            raise ValueError(
                f"exclude mask shape {tuple(exclude_NI.shape)} != scores shape {tuple(scores_NI.shape)}"
            )
        allowed = (~exclude_NI).sum(dim=1).min().item() if exclude_NI.numel() else scores_NI.shape[1]
        if allowed < k:
            raise ValueError(f"k={k} but a row has only {allowed} items left after exclusion")
        scores_NI = scores_NI.masked_fill(exclude_NI, float("-inf"))
    return scores_NI.topk(k, dim=1).indices


def recall_hit_at_k(topk_NK, targets, ks: Iterable[int] = (10, 20, 50, 100)) -> dict[str, float]:
    """Recall@K = |top-K ∩ targets| / |targets| and Hit@K = 1[top-K ∩ targets non-empty], averaged
    over rows (rows with no target are skipped). `targets`: an (N,) array (one item per row) or a
    sequence of N collections of items. With a
    single target per row (leave-last-out) the two coincide."""
    topk_NK = np.asarray(topk_NK)
    if isinstance(targets, (np.ndarray, torch.Tensor)) and targets.ndim == 1:
        targets = [[t] for t in targets.tolist()]
    if len(targets) != len(topk_NK):
        raise ValueError(f"{len(topk_NK)} ranked lists but {len(targets)} target sets")
    out: dict[str, float] = {}
    for k in ks:
        if k > topk_NK.shape[1]:
            raise ValueError(f"K={k} exceeds the {topk_NK.shape[1]} ranked items given")
        recall, hit = [], []
        for row, target in zip(topk_NK[:, :k], targets, strict=True):
            target = set(np.asarray(target).tolist())
            if not target:
                continue
            found = len(target.intersection(row.tolist()))
            recall.append(found / len(target))
            hit.append(float(found > 0))
        out[f"Recall@{k}"] = float(np.mean(recall)) if recall else float("nan")
        out[f"Hit@{k}"] = float(np.mean(hit)) if hit else float("nan")
    return out


def mask_history(scores_NI: torch.Tensor, histories: list[list[int]], target_N: torch.Tensor) -> torch.Tensor:
    """Set each row's already-seen items to -inf in place (they are not candidates), keeping the
    row's target a candidate even if it was seen before. Returns `scores_NI`."""
    if len(histories) != scores_NI.shape[0]:
        raise ValueError(f"{len(histories)} histories for {scores_NI.shape[0]} score rows")
    rows = torch.repeat_interleave(torch.arange(len(histories)), torch.tensor([len(h) for h in histories]))
    cols = torch.tensor([i for h in histories for i in h], dtype=torch.long)
    target_scores_N = scores_NI.gather(1, target_N.view(-1, 1)).squeeze(1).clone()
    scores_NI[rows.to(scores_NI.device), cols.to(scores_NI.device)] = float("-inf")
    scores_NI.scatter_(1, target_N.view(-1, 1), target_scores_N.view(-1, 1))
    return scores_NI


def sampled_target_ranks(scores_NI: torch.Tensor, target_N: torch.Tensor,
                         negatives_NC: torch.Tensor) -> torch.Tensor:
    """0-based rank of the target among itself and C sampled negatives (the SASRec paper's protocol
    with C = 100), ties counting against the target as in `target_ranks`."""
    candidates_NC1 = torch.cat([target_N.view(-1, 1), negatives_NC], dim=1)
    return target_ranks(scores_NI.gather(1, candidates_NC1), torch.zeros_like(target_N))


ScoreChunk = Callable[[int, int], torch.Tensor]
"""`score_chunk(lo, hi)`: (N, hi - lo) scores of every row against items lo..hi-1."""


def _history_by_item(histories: list[list[int]], target_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, item) pairs of every history entry except the row's own target, sorted by item."""
    if len(histories) != len(target_N):
        raise ValueError(f"{len(histories)} histories for {len(target_N)} targets")
    rows = torch.repeat_interleave(torch.arange(len(histories)), torch.tensor([len(h) for h in histories],
                                                                               dtype=torch.long))
    cols = torch.tensor([i for h in histories for i in h], dtype=torch.long)
    keep = cols != target_N.cpu()[rows]
    rows, cols = rows[keep], cols[keep]
    order = torch.argsort(cols, stable=True)
    return rows[order], cols[order]


def chunked_target_ranks(score_chunk: ScoreChunk, num_items: int, target_N: torch.Tensor,
                         approx_target_N: torch.Tensor, histories: list[list[int]] | None = None,
                         chunk_size: int = 8192, tolerance: float = 1e-4) -> torch.Tensor:
    """`target_ranks(mask_history(scores, histories, target), target)` without the (N, items) matrix.

    Each row's target score is only known once its item's chunk is scored, so the walk counts against
    `approx_target_N` (the same scores by another route, e.g. a dot product instead of a matmul, off in
    the last bits): items clearly above it count at once, the few within `tolerance` (relative) are kept
    and compared with the exact target score at the end. A row whose exact score lies outside the band
    (never seen; a guard) is counted again in a second walk. Memory: (N, chunk_size)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (got {chunk_size})")
    N = len(target_N)
    target_N = target_N.long()
    hist_rows, hist_cols = _history_by_item(histories, target_N) if histories is not None else (None, None)
    approx_N = approx_target_N.detach().float().reshape(N)
    band_N = tolerance * approx_N.abs().clamp(min=1.0)
    low_N1, high_N1 = (approx_N - band_N).unsqueeze(1), (approx_N + band_N).unsqueeze(1)
    exact_N = torch.full((N,), float("nan"))
    above_N = torch.zeros(N, dtype=torch.long)
    # Working memory is allocated once and reused: fresh (N, chunk) temporaries per chunk, freed between
    # small tensors that live on, fragment glibc's heap (1.5 GB more at 1M items in 8,192-item chunks).
    flags = torch.empty(N * min(chunk_size, num_items), dtype=torch.bool)
    band = torch.empty_like(flags)
    near = _Growing()  # (row, score) of the items within the band of their row's approximate target score

    def masked(lo: int, hi: int) -> torch.Tensor:
        """Scores of items lo..hi-1 with history items and each row's own target at -inf."""
        raw_NC = score_chunk(lo, hi)
        s_NC = raw_NC.detach().float().cpu()
        if raw_NC._is_view() and s_NC.data_ptr() == raw_NC.data_ptr():  # the caller's matrix: written below
            s_NC = s_NC.clone()
        if hist_rows is not None:
            a, b = torch.searchsorted(hist_cols, torch.tensor([lo, hi])).tolist()
            s_NC[hist_rows[a:b], hist_cols[a:b] - lo] = float("-inf")
        here = ((target_N >= lo) & (target_N < hi)).nonzero().squeeze(1)
        exact_N[here] = s_NC[here, target_N[here] - lo]
        s_NC[here, target_N[here] - lo] = float("-inf")  # the target does not count against itself
        return s_NC

    for lo in range(0, num_items, chunk_size):
        s_NC = masked(lo, min(lo + chunk_size, num_items))
        above_NC = torch.gt(s_NC, high_N1, out=flags[:s_NC.numel()].view(s_NC.shape))
        above_N += above_NC.sum(1)
        near_NC = torch.ge(s_NC, low_N1, out=band[:s_NC.numel()].view(s_NC.shape))
        near_NC.logical_and_(above_NC.logical_not_())  # low <= s <= high
        r, c = near_NC.nonzero(as_tuple=True)
        near.extend(r, s_NC[r, c])
        del s_NC
    rows, scores = near.values()
    ranks_N = above_N + torch.bincount(rows[scores >= exact_N[rows]], minlength=N)
    outside = ((exact_N < low_N1.squeeze(1)) | (exact_N > high_N1.squeeze(1))).nonzero().squeeze(1)
    if len(outside):  # the approximation was off by more than the band: count these rows exactly
        ranks_N[outside] = 0
        for lo in range(0, num_items, chunk_size):
            s_NC = masked(lo, min(lo + chunk_size, num_items))[outside]
            ranks_N[outside] += (s_NC >= exact_N[outside].unsqueeze(1)).sum(1)
    return ranks_N


class _Growing:
    """(row, score) pairs appended chunk by chunk into buffers that double when full (few allocations)."""

    def __init__(self, capacity: int = 4096) -> None:
        self.rows, self.scores, self.size = torch.empty(capacity, dtype=torch.long), torch.empty(capacity), 0

    def extend(self, rows: torch.Tensor, scores: torch.Tensor) -> None:
        end = self.size + len(rows)
        if end > len(self.rows):
            capacity = max(end, 2 * len(self.rows))
            self.rows = torch.cat([self.rows[:self.size], torch.empty(capacity - self.size, dtype=torch.long)])
            self.scores = torch.cat([self.scores[:self.size], torch.empty(capacity - self.size)])
        self.rows[self.size:end], self.scores[self.size:end] = rows, scores
        self.size = end

    def values(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rows[:self.size], self.scores[:self.size]


def chunked_top_k(score_chunk: ScoreChunk, num_items: int, k: int,
                  exclude_chunk: Callable[[int, int], torch.Tensor] | None = None,
                  chunk_size: int = 8192) -> torch.Tensor:
    """(N, k) indices of each row's k best scores over items 0..num_items-1, as `top_k_excluding` gives
    them, a chunk of items at a time: a running top-k merged with each chunk's. `exclude_chunk(lo, hi)`:
    (N, hi - lo) True where an item is not a candidate. Memory: (N, chunk_size + k)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (got {chunk_size})")
    if k > num_items:
        raise ValueError(f"k={k} exceeds the {num_items} items")
    best_vals = best_ids = None
    for lo in range(0, num_items, chunk_size):
        hi = min(lo + chunk_size, num_items)
        s_NC = score_chunk(lo, hi).detach().float()
        if exclude_chunk is not None:
            s_NC = s_NC.masked_fill(exclude_chunk(lo, hi).to(s_NC.device), float("-inf"))
        ids_NC = torch.arange(lo, hi, device=s_NC.device).expand_as(s_NC)
        if best_vals is not None:
            s_NC, ids_NC = torch.cat([best_vals, s_NC], 1), torch.cat([best_ids, ids_NC], 1)
        top = s_NC.topk(min(k, s_NC.shape[1]), dim=1)
        best_vals, best_ids = top.values, ids_NC.gather(1, top.indices)
    if best_vals is not None and best_vals.numel() and bool(torch.isneginf(best_vals[:, -1]).any()):
        raise ValueError(f"k={k} but a row has fewer than {k} items left after exclusion")
    return best_ids
