"""Evaluation metrics. AUC comes from scikit-learn; ranking metrics follow their textbook definitions.

Ranking metrics take the 0-based rank of the one held-out target item among all candidates
(0 = ranked first), as in leave-one-out evaluation.
"""

from __future__ import annotations

from collections.abc import Iterable

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
