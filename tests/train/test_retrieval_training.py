"""Retrieval: FAISS against brute force, history exclusion, Recall/Hit@K, data windows, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moekit.config import ConfigError
from moekit.data.movielens import synthetic_movielens
from moekit.models.two_tower import TwoTower
from moekit.train.metrics import recall_hit_at_k, top_k_excluding
from moekit.train.retrieval import (
    ItemIndex,
    TwoTowerOptions,
    TwoTowerRunConfig,
    TwoTowerTrainSettings,
    evaluate_run,
    evaluate_scores,
    fit,
    load_run,
    popularity_scores,
    prepare_retrieval_data,
    recent_history,
    two_tower_scores,
)


def _brute_force_topk(q, items, k, exclude=None):
    out = []
    for b, qb in enumerate(q):
        scores = [(float(np.dot(qb, items[i])), i) for i in range(len(items))
                  if exclude is None or i not in set(exclude[b])]
        scores.sort(key=lambda t: -t[0])
        out.append([i for _, i in scores[:k]])
    return np.array(out)


def test_faiss_flat_search_equals_brute_force():
    rng = np.random.default_rng(0)
    items = rng.normal(size=(200, 16)).astype(np.float32)
    q = rng.normal(size=(5, 16)).astype(np.float32)
    index = ItemIndex(items)
    scores, ids = index.search(q, 10)
    np.testing.assert_array_equal(ids, _brute_force_topk(q, items, 10))
    np.testing.assert_allclose(scores, np.take_along_axis(q @ items.T, ids, 1), rtol=1e-5)
    exclude = [rng.choice(200, size=n, replace=False) for n in (0, 3, 50, 190, 7)]
    _, ids = index.search(q, 10, exclude=exclude)
    np.testing.assert_array_equal(ids, _brute_force_topk(q, items, 10, exclude))
    for row, banned in zip(ids, exclude, strict=True):
        assert not set(row) & set(banned.tolist())


def test_hnsw_index_finds_most_of_the_exact_neighbours():
    rng = np.random.default_rng(1)
    items = rng.normal(size=(500, 8)).astype(np.float32)
    q = rng.normal(size=(20, 8)).astype(np.float32)
    exact = _brute_force_topk(q, items, 10)
    _, approx = ItemIndex(items, kind="hnsw").search(q, 10)
    overlap = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact, strict=True)])
    assert overlap > 0.9


def test_index_rejects_bad_input():
    index = ItemIndex(np.eye(4, dtype=np.float32))
    with pytest.raises(ValueError, match="k=5 exceeds the 4 indexed items"):
        index.search(np.ones((1, 4)), 5)
    with pytest.raises(ValueError, match="only 1 items left"):
        index.search(np.ones((1, 4)), 2, exclude=[[0, 1, 2]])
    with pytest.raises(ValueError, match="unknown index kind"):
        ItemIndex(np.eye(4), kind="ivf")


def test_top_k_excluding_skips_history_like_a_loop():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 30, generator=g)
    exclude = torch.rand(6, 30, generator=g) < 0.4
    got = top_k_excluding(scores, 5, exclude)
    for r in range(6):
        allowed = [i for i in range(30) if not exclude[r, i]]
        assert got[r].tolist() == sorted(allowed, key=lambda i: -scores[r, i].item())[:5]
    with pytest.raises(ValueError, match="k=30 but a row has only"):
        top_k_excluding(scores, 30, exclude)


def test_recall_and_hit_at_k_by_hand():
    topk = np.array([[3, 1, 4, 5], [9, 2, 6, 5]])
    # one target per row: row 0's target 4 sits at rank 2, row 1's target 7 is missing
    m = recall_hit_at_k(topk, np.array([4, 7]), ks=(2, 3))
    assert m == {"Recall@2": 0.0, "Hit@2": 0.0, "Recall@3": 0.5, "Hit@3": 0.5}
    # several targets per row: recall counts the fraction found, hit any
    m = recall_hit_at_k(topk, [[1, 8], [9, 2, 5, 0]], ks=(2, 4))
    assert m["Recall@2"] == pytest.approx((1 / 2 + 2 / 4) / 2) and m["Hit@2"] == 1.0
    assert m["Recall@4"] == pytest.approx((1 / 2 + 3 / 4) / 2)
    with pytest.raises(ValueError, match="K=5 exceeds"):
        recall_hit_at_k(topk, np.array([4, 7]), ks=(5,))


def test_prepared_windows_targets_and_history_exclusion():
    ml = synthetic_movielens(num_users=8, num_items=20, ratings_per_user=6, seed=1)
    data = prepare_retrieval_data(ml, "test", history_len=3, num_year_buckets=5)
    pad = ml.num_items
    for u in range(ml.num_users):
        rows = sorted(np.flatnonzero(ml.user == u), key=lambda r: (ml.timestamp[r], r))
        seq = [int(ml.item[r]) for r in rows]
        assert int(data.eval_target[data.eval_user == u][0]) == seq[-1]
        assert set(np.flatnonzero(data.seen[u].numpy())) == set(seq[:-1])
        assert recent_history(data, u).tolist() == ([pad] * 3 + seq[:-1])[-3:]
        mine = (data.train_user == u).nonzero().flatten()
        for t, n in enumerate(mine.tolist()):  # history of the t-th training item = the 3 before it
            assert int(data.train_item[n]) == seq[t]
            assert data.train_history[n].tolist() == ([pad] * 3 + seq[:t])[-3:]
    valid = prepare_retrieval_data(ml, "valid", history_len=3, num_year_buckets=5)
    u0 = sorted(np.flatnonzero(ml.user == 0), key=lambda r: (ml.timestamp[r], r))
    assert int(valid.eval_target[0]) == int(ml.item[u0[-2]])
    assert not valid.seen[0, int(ml.item[u0[-1]])]  # the test item is out of the validation run entirely
    # evaluation never returns an item of the user's history, even one with the best score
    scores = data.seen[data.eval_user].float() * 100 + popularity_scores(data)
    topk = top_k_excluding(scores, 5, data.seen[data.eval_user])
    for row, u in zip(topk, data.eval_user, strict=True):
        assert not data.seen[u, row].any()
    metrics = evaluate_scores(popularity_scores(data), data, ks=(1, 5))
    assert 0 <= metrics["Hit@1"] <= metrics["Hit@5"] <= 1


@pytest.mark.parametrize("tower", ["mlp", "moe"])
def test_training_runs_is_seeded_and_run_folder_round_trips(tmp_path, tower):
    ml = synthetic_movielens(num_users=20, num_items=30, ratings_per_user=8, seed=0)
    cfg = TwoTowerRunConfig(
        model=TwoTowerOptions(tower=tower, dim=8, hidden=16, ffn_hidden=16, history_len=4),
        train=TwoTowerTrainSettings(epochs=2, batch_size=16, progress=False, extra_negatives=5, ks=(1, 5)))
    result = fit(cfg, tmp_path / "run", ml=ml)
    again = fit(cfg, ml=ml)
    assert result.test == again.test  # same seed, same numbers
    assert result.history[0]["loss"] > 0
    loaded = load_run(tmp_path / "run")
    assert loaded.config.model.tower == tower and isinstance(loaded.model, TwoTower)
    torch.testing.assert_close(loaded.item_embeddings, result.model.all_item_embeddings())
    data = prepare_retrieval_data(ml, "test", 4, 20)
    torch.testing.assert_close(two_tower_scores(loaded.model, data), two_tower_scores(result.model, data))
    with pytest.raises(FileNotFoundError, match="is not a moekit model or run folder"):
        load_run(tmp_path)
    with pytest.raises(ConfigError, match="train.ks: k=50 but a user has only"):
        fit(TwoTowerRunConfig(model=cfg.model, train=TwoTowerTrainSettings(epochs=1, ks=(50,), progress=False)),
            ml=ml)


def test_eval_reproduces_the_reported_metrics(tmp_path):
    """A run folder trained on files: `evaluate_run` reloads the files and gets the same numbers."""
    from tests.commands.test_retrieval_commands import _write_ml100k

    _write_ml100k(tmp_path / "ml-100k")
    cfg = TwoTowerRunConfig(model=TwoTowerOptions(dim=8, hidden=16, ffn_hidden=16, history_len=4),
                            train=TwoTowerTrainSettings(epochs=1, batch_size=16, progress=False, ks=(1, 5)))
    cfg.data.data_dir = str(tmp_path / "ml-100k")
    result = fit(cfg, tmp_path / "run")
    assert evaluate_run(tmp_path / "run") == result.test
