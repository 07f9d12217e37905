"""Full ranking a chunk of items at a time gives the ranks and top-K of the whole score matrix: against a
plain loop and against the whole-matrix functions, for chunks of 1 item up to more than the catalogue,
histories holding the target or repeats, tied scores, a target score known only approximately, and the
SASRec / FAME / two-tower evaluation paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moekit.models.sequential import FAME, FAMEConfig, SASRec, SASRecConfig
from moekit.train.metrics import (
    chunked_target_ranks,
    chunked_top_k,
    mask_history,
    target_ranks,
    top_k_excluding,
)
from moekit.train.seqrec import evaluate

CHUNKS = (1, 3, 7, 50, 64, 1000)


def _whole_matrix_ranks(scores_NI, histories, target_N):
    return target_ranks(mask_history(scores_NI.clone(), histories, target_N), target_N)


def _loop_ranks(scores_NI, histories, target_N):
    ranks = []
    for s, h, t in zip(scores_NI.tolist(), histories, target_N.tolist(), strict=True):
        banned = set(h) - {t}
        ranks.append(sum(1 for i, v in enumerate(s) if i != t and i not in banned and v >= s[t]))
    return ranks


def _problem(seed=0, N=9, I=64, ties=False):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 5, (N, I), generator=g).float() if ties else torch.randn(N, I, generator=g)
    scores[:, 0] = float("-inf")  # padding item
    target = torch.randint(1, I, (N,), generator=g)
    histories = [torch.randint(1, I, (int(n),), generator=g).tolist() for n in torch.randint(0, 12, (N,),
                                                                                                generator=g)]
    histories[0] = histories[0] + [int(target[0]), int(target[0])]  # a repeat of the target stays a candidate
    histories[1] = []
    return scores, target, histories


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("ties", [False, True])
def test_chunked_ranks_equal_the_whole_matrix_and_a_loop(chunk, ties):
    scores, target, histories = _problem(ties=ties)
    exact = scores.gather(1, target.view(-1, 1)).squeeze(1)
    ranks = chunked_target_ranks(lambda lo, hi: scores[:, lo:hi], scores.shape[1], target, exact, histories, chunk)
    assert ranks.tolist() == _whole_matrix_ranks(scores, histories, target).tolist()
    assert ranks.tolist() == _loop_ranks(scores, histories, target)


@pytest.mark.parametrize("offset", [3e-7, 1e-5, 10.0, -10.0])
def test_an_approximate_target_score_gives_the_exact_ranks(offset):
    """Within the band the kept near scores decide; far outside it (a guard) the row is walked again."""
    scores, target, histories = _problem(seed=1, ties=True)
    approx = scores.gather(1, target.view(-1, 1)).squeeze(1) + offset
    ranks = chunked_target_ranks(lambda lo, hi: scores[:, lo:hi], scores.shape[1], target, approx, histories, 5)
    assert ranks.tolist() == _loop_ranks(scores, histories, target)


def test_chunked_ranks_need_a_positive_chunk():
    scores, target, histories = _problem()
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_target_ranks(lambda lo, hi: scores[:, lo:hi], 64, target, target.float(), histories, 0)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_chunked_top_k_equals_top_k_excluding(chunk):
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(11, 64, generator=g)
    exclude = torch.rand(11, 64, generator=g) < 0.3
    top = chunked_top_k(lambda lo, hi: scores[:, lo:hi], 64, 10, lambda lo, hi: exclude[:, lo:hi], chunk)
    assert torch.equal(top, top_k_excluding(scores, 10, exclude))


def test_chunked_top_k_refuses_rows_without_k_candidates():
    scores = torch.randn(2, 8)
    exclude = torch.zeros(2, 8, dtype=torch.bool)
    exclude[1, 2:] = True  # row 1 keeps 2 items
    with pytest.raises(ValueError, match="fewer than 3"):
        chunked_top_k(lambda lo, hi: scores[:, lo:hi], 8, 3, lambda lo, hi: exclude[:, lo:hi], 3)
    with pytest.raises(ValueError, match="exceeds"):
        chunked_top_k(lambda lo, hi: scores[:, lo:hi], 8, 9)


def _model(kind: str, mixing: str = "logits") -> SASRec:
    torch.manual_seed(0)
    common = dict(num_items=40, max_len=6, hidden=16, num_layers=1, num_heads=2, dropout=0.0, attn_dropout=0.0)
    if kind == "fame":
        return FAME(FAMEConfig(**common, num_experts=2, head_mixing=mixing)).eval()
    return SASRec(SASRecConfig(**common)).eval()


@pytest.mark.parametrize("kind", ["sasrec", "fame"])
def test_item_slices_score_like_the_whole_catalogue(kind):
    model = _model(kind)
    h_PD = torch.randn(5, 16)
    whole = model.logits(h_PD)
    for lo, hi in ((0, 7), (7, 41), (40, 41)):
        # equal up to rounding (a matmul's kernel may depend on its width; ranks are checked exactly below)
        torch.testing.assert_close(model.logits(h_PD, slice(lo, hi)), whole[:, lo:hi])
    with pytest.raises(ValueError, match="contiguous"):
        model.logits(h_PD, slice(0, 10, 2))


def test_fame_probability_mixing_refuses_slices():
    with pytest.raises(ValueError, match="full item set"):
        _model("fame", "probability").logits(torch.randn(2, 16), slice(0, 5))


def _whole_matrix_evaluate(model, histories, targets):
    """evaluate() as it was: the (users x items) score matrix, history masked, then target_ranks."""
    from moekit.data.sequences import pad_left

    items = torch.from_numpy(pad_left(histories, model.config.max_len))
    scores = model.scores(items).float()
    return _whole_matrix_ranks(scores, histories, torch.from_numpy(targets))


@pytest.mark.parametrize("kind,mixing", [("sasrec", "logits"), ("fame", "logits"), ("fame", "probability")])
@pytest.mark.parametrize("item_chunk", [1, 6, 8192])
def test_evaluate_in_item_chunks_equals_the_score_matrix(kind, mixing, item_chunk):
    model = _model(kind, mixing)
    rng = np.random.default_rng(0)
    histories = [rng.integers(1, 41, size=n).tolist() for n in rng.integers(1, 9, size=13)]
    targets = rng.integers(1, 41, size=13)
    histories[2].append(int(targets[2]))
    _, ranks = evaluate(model, histories, targets, batch_size=4, item_chunk=item_chunk)
    assert ranks.tolist() == _whole_matrix_evaluate(model, histories, targets).tolist()


def test_two_tower_chunked_evaluation():
    from moekit.data.movielens import MovieLens
    from moekit.models.two_tower import TwoTower
    from moekit.train.retrieval import (
        TwoTowerOptions,
        evaluate_model,
        evaluate_scores,
        model_config,
        prepare_retrieval_data,
        two_tower_scores,
    )

    rng = np.random.default_rng(0)
    n_users, n_items, n = 30, 50, 600
    ml = MovieLens(name="tiny", user=np.arange(n) % n_users, item=rng.integers(0, n_items, n),
                   rating=np.full(n, 4.0), timestamp=np.arange(n), item_ids=np.arange(n_items),
                   user_ids=np.arange(n_users), titles=[str(i) for i in range(n_items)],
                   genres=rng.integers(0, 2, (n_items, 3)), years=rng.integers(1950, 2000, n_items),
                   gender=rng.integers(0, 2, n_users), age_group=rng.integers(0, 7, n_users),
                   occupation=rng.integers(0, 4, n_users), occupations=["a", "b", "c", "d"])
    options = TwoTowerOptions(dim=8, hidden=16, ffn_hidden=16, history_len=5)
    data = prepare_retrieval_data(ml, "test", options.history_len)
    torch.manual_seed(0)
    model = TwoTower(model_config(options, ml))
    model.set_side_features(**data.side)
    model.eval()
    ks = (1, 5, 10)
    whole = evaluate_scores(two_tower_scores(model, data), data, ks)
    for chunk in (1, 7, 1000):
        assert evaluate_model(model, data, ks, batch_size=8, item_chunk=chunk) == whole


# ----------------------------------------------------------------------------- the chunked training loss


@pytest.mark.parametrize("chunk", [1, 4, 7, 100])
def test_chunked_cross_entropy_equals_the_plain_loss_and_its_gradients(chunk):
    from moekit.models.sequential import chunked_cross_entropy

    g = torch.Generator().manual_seed(0)
    h = torch.randn(13, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(21, 8, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 21, (13,), generator=g)
    plain = torch.nn.functional.cross_entropy(h @ w.T, target)
    grads = torch.autograd.grad(plain, (h, w))
    chunked = chunked_cross_entropy(h, w, target, chunk)
    torch.testing.assert_close(chunked, plain)
    for a, b in zip(torch.autograd.grad(chunked, (h, w)), grads, strict=True):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda h_, w_: chunked_cross_entropy(h_, w_, target, chunk), (h, w))
    with pytest.raises(ValueError, match="chunk"):
        chunked_cross_entropy(h, w, target, 0)


def test_sasrec_training_with_a_chunked_loss_matches_the_plain_one():
    """One training loss and its gradient on a SASRec: `loss_chunk` changes memory, not the objective."""
    from moekit.train.seqrec import train_loss

    model = _model("sasrec")
    model.train()
    torch.manual_seed(1)
    inputs = torch.randint(0, 41, (6, 6))
    targets = torch.randint(1, 41, (6, 6))
    plain = train_loss(model, inputs, targets, "ce", None, 20.0)
    grad_plain = torch.autograd.grad(plain, model.item_emb.weight)[0]
    chunked = train_loss(model, inputs, targets, "ce", None, 20.0, loss_chunk=5)
    grad_chunked = torch.autograd.grad(chunked, model.item_emb.weight)[0]
    torch.testing.assert_close(chunked, plain)
    torch.testing.assert_close(grad_chunked, grad_plain)


def test_loss_chunk_is_for_sasrec_with_cross_entropy():
    from moekit.config import ConfigError, build_dataclass
    from moekit.train.seqrec import SeqRecConfig

    with pytest.raises(ConfigError, match="loss_chunk"):
        build_dataclass(SeqRecConfig, {"model": {"architecture": "fame"}, "train": {"loss_chunk": 64}})
    with pytest.raises(ConfigError, match="loss_chunk"):
        build_dataclass(SeqRecConfig, {"train": {"loss": "bce", "loss_chunk": 64}})
    with pytest.raises(ValueError, match="chunked loss"):
        _model("fame").next_item_loss(torch.randn(3, 16), torch.tensor([1, 2, 3]), chunk=2)


@pytest.mark.parametrize("protocol", ["full", "sampled"])
def test_evaluating_users_by_history_length_keeps_their_ranks_and_order(protocol):
    model = _model("sasrec")
    rng = np.random.default_rng(3)
    histories = [rng.integers(1, 41, size=n).tolist() for n in rng.integers(1, 9, size=17)]
    targets = rng.integers(1, 41, size=17)
    negatives = rng.integers(1, 41, size=(17, 5))
    kw = dict(protocol=protocol, negatives=negatives, batch_size=4)
    metrics, ranks = evaluate(model, histories, targets, **kw)
    by_length, ranks_by_length = evaluate(model, histories, targets, by_length=True, **kw)
    assert ranks_by_length.tolist() == ranks.tolist()
    assert by_length == metrics
