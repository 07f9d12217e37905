"""Two-tower model and its logQ-corrected in-batch softmax, against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from moekit.models.two_tower import TwoTower, TwoTowerConfig, in_batch_softmax_loss


def _hand_loss(u, v, ids, log_q, temp, neg=None, neg_ids=None, neg_log_q=None):
    """Plain-loop softmax cross-entropy: row b against every other distinct batch item and the negatives."""
    total = 0.0
    for b in range(len(u)):
        def logit(vec, lq, b=b):
            return sum(x * y for x, y in zip(u[b].tolist(), vec.tolist(), strict=True)) / temp - lq
        pos = logit(v[b], float(log_q[b]))
        terms = [pos]
        for j in range(len(v)):
            if j != b and int(ids[j]) != int(ids[b]):
                terms.append(logit(v[j], float(log_q[j])))
        if neg is not None:
            for m in range(len(neg)):
                if int(neg_ids[m]) != int(ids[b]):
                    terms.append(logit(neg[m], float(neg_log_q[m])))
        total += -(pos - math.log(sum(math.exp(t) for t in terms)))
    return total / len(u)


def test_logq_in_batch_loss_equals_hand_computed_value():
    u = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    v = torch.tensor([[0.8, 0.6], [1.0, 0.0], [0.6, -0.8]])
    ids = torch.tensor([4, 7, 9])
    q = [0.5, 0.25, 0.125]
    got = in_batch_softmax_loss(u, v, ids, torch.log(torch.tensor(q)), temperature=0.5)
    # written out by hand: logits[b][j] = <u_b, v_j> / 0.5 - ln q_j
    dots = [[0.8, 1.0, 0.6], [0.96, 0.6, -0.28], [0.6, 0.0, -0.8]]
    expected = 0.0
    for b in range(3):
        logits = [dots[b][j] / 0.5 - math.log(q[j]) for j in range(3)]
        expected += -(logits[b] - math.log(sum(math.exp(x) for x in logits))) / 3
    assert got.item() == pytest.approx(expected, abs=1e-5)
    assert _hand_loss(u, v, ids, torch.log(torch.tensor(q)), 0.5) == pytest.approx(expected, abs=1e-5)
    # without the correction the loss differs: the correction is really applied
    plain = in_batch_softmax_loss(u, v, ids, torch.zeros(3), temperature=0.5)
    assert abs(plain.item() - expected) > 1e-2


def test_duplicate_positive_is_not_a_negative_and_extra_negatives_count():
    g = torch.Generator().manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(4, 3, generator=g), dim=-1)
    v = torch.nn.functional.normalize(torch.randn(4, 3, generator=g), dim=-1)
    ids = torch.tensor([2, 5, 2, 8])  # item 2 twice
    log_q = torch.randn(4, generator=g)
    neg = torch.nn.functional.normalize(torch.randn(3, 3, generator=g), dim=-1)
    neg_ids = torch.tensor([5, 11, 2])
    neg_log_q = torch.full((3,), math.log(3 / 20))
    got = in_batch_softmax_loss(u, v, ids, log_q, 0.1, neg, neg_ids, neg_log_q)
    assert got.item() == pytest.approx(_hand_loss(u, v, ids, log_q, 0.1, neg, neg_ids, neg_log_q), rel=1e-5)
    with pytest.raises(ValueError, match="extra negatives need"):
        in_batch_softmax_loss(u, v, ids, log_q, 0.1, neg)


def _model(**kw) -> TwoTower:
    torch.manual_seed(0)
    return TwoTower(TwoTowerConfig(num_users=5, num_items=9, num_genres=4, num_year_buckets=3,
                                   user_feature_sizes=(2, 2, 3), dim=8, hidden=16, ffn_hidden=16,
                                   history_len=4, **kw))


@pytest.mark.parametrize("tower", ["mlp", "moe"])
@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_towers_give_unit_embeddings_and_ignore_padding(tower, pooling):
    m = _model(tower=tower, pooling=pooling, dropout=0.0).eval()
    users = torch.tensor([0, 1, 2])
    hist = torch.tensor([[1, 2, 9, 9], [9, 9, 9, 9], [3, 3, 3, 4]])  # 9 = padding; row 1 has no history
    out = m.user_forward(users, hist)
    assert out.embedding.shape == (3, 8)
    torch.testing.assert_close(out.embedding.norm(dim=-1), torch.ones(3))
    # where the padding sits does not matter
    moved = m.user_forward(users, torch.tensor([[9, 1, 9, 2], [9, 9, 9, 9], [3, 3, 3, 4]])).embedding
    torch.testing.assert_close(moved, out.embedding)
    items = m.item_forward(torch.arange(9))
    torch.testing.assert_close(items.embedding, m.all_item_embeddings(batch_size=4))
    if tower == "moe":
        assert out.aux_loss.item() > 0 and int(out.expert_counts.sum()) == 3 * 2
    else:
        assert out.aux_loss.item() == 0


def test_mean_pooling_is_the_mean_of_history_embeddings():
    m = _model(dropout=0.0).eval()
    seen = {}
    m.user_tower.register_forward_hook(lambda mod, inp, out: seen.setdefault("x", inp[0]))
    m.user_forward(torch.tensor([0]), torch.tensor([[1, 2, 9, 9]]))
    pooled = seen["x"][0, 8:16]  # input = [profile, pooled history, user id]
    torch.testing.assert_close(pooled, (m.item_emb.weight[1] + m.item_emb.weight[2]) / 2)


def test_bad_config_and_side_features_are_rejected():
    with pytest.raises(ValueError, match=r"tower must be one of mlp, moe \(got 'cnn'\)"):
        TwoTowerConfig(num_users=1, num_items=1, tower="cnn")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        TwoTowerConfig(num_users=1, num_items=1, temperature=0)
    m = _model()
    features = torch.tensor([[0, 1, 2], [1, 1, 0], [0, 0, 1], [1, 0, 2], [0, 1, 0]])
    ok = dict(item_genres_IG=torch.zeros(9, 4), item_year_I=torch.zeros(9, dtype=torch.long),
              user_features_UF=features)
    m.set_side_features(**ok)
    assert m.user_features.tolist() == features.tolist()
    with pytest.raises(ValueError, match=r"item_genres must have shape \(9, 4\)"):
        m.set_side_features(**{**ok, "item_genres_IG": torch.zeros(8, 4)})
    with pytest.raises(ValueError, match=r"user_features must have shape \(5, 3\)"):
        m.set_side_features(**{**ok, "user_features_UF": features[:, :2]})
    with pytest.raises(ValueError, match=r"user feature 2 values must lie in \[0, 3\)"):
        m.set_side_features(**{**ok, "user_features_UF": features + torch.tensor([0, 0, 1])})
    with pytest.raises(ValueError, match="user_feature_sizes must list at least one feature"):
        TwoTowerConfig(num_users=1, num_items=1, user_feature_sizes=())


def test_user_profile_is_the_sum_of_its_feature_embeddings():
    m = _model(dropout=0.0).eval()
    m.set_side_features(torch.zeros(9, 4), torch.zeros(9, dtype=torch.long),
                        torch.tensor([[0, 1, 2], [1, 1, 0], [0, 0, 1], [1, 0, 2], [0, 1, 0]]))
    seen = {}
    m.user_tower.register_forward_hook(lambda mod, inp, out: seen.setdefault("x", inp[0]))
    m.user_forward(torch.tensor([3]), torch.tensor([[1, 9, 9, 9]]))
    e = m.user_feature_emb
    torch.testing.assert_close(seen["x"][0, :8], e[0].weight[1] + e[1].weight[0] + e[2].weight[2])
