"""Ranking evaluation (hand-computed), history masking, sampled protocol, training windows, a tiny
end-to-end run, checkpoints and recommendations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moekit.config import ConfigError, build_dataclass
from moekit.data.sequences import SequenceDataset
from moekit.models.sequential import SASRec, SASRecConfig, build_model
from moekit.train.metrics import mask_history, ranking_metrics, sampled_target_ranks, target_ranks
from moekit.train.seqrec import (
    SeqRecConfig,
    SeqRecModelOptions,
    SeqRecTrainSettings,
    evaluate,
    fit,
    head_gate_by_category,
    length_bucketed_batches,
    load_run,
    recommend,
    sample_negatives,
    sample_unseen_negatives,
    train_loss,
    training_windows,
)


def seqrec_config(**flat) -> SeqRecConfig:
    """A SeqRecConfig from flat keys (each goes to the section that has it)."""
    sections = {"model": {}, "data": {}, "train": {}}
    model_keys = {f for f in SeqRecModelOptions.__dataclass_fields__}
    for key, value in flat.items():
        sections["model" if key in model_keys else "train"][key] = value
    return build_dataclass(SeqRecConfig, sections)


def quiet(message: str) -> None:
    pass


def test_ranking_metrics_on_a_tiny_ranking_by_hand():
    ranks = torch.tensor([0, 3, 12])  # ranked 1st, 4th and 13th
    m = ranking_metrics(ranks, ks=(5, 10, 20))
    assert m["HR@5"] == pytest.approx(2 / 3)
    assert m["NDCG@5"] == pytest.approx((1 + 1 / math.log2(5)) / 3)
    assert m["MRR@5"] == pytest.approx((1 + 1 / 4) / 3)
    assert m["HR@20"] == pytest.approx(1.0)
    assert m["NDCG@20"] == pytest.approx((1 + 1 / math.log2(5) + 1 / math.log2(14)) / 3)  # 1/log2(r+2)


def test_history_items_are_excluded_from_ranking():
    scores = torch.tensor([[float("-inf"), 0.9, 0.8, 0.7, 0.6, 0.5]])  # item 0 is padding
    target = torch.tensor([4])
    assert target_ranks(scores.clone(), target).item() == 3  # items 1, 2, 3 beat it
    masked = mask_history(scores.clone(), [[1, 3, 4]], target)  # 4 was seen before, but is the target
    expected = torch.tensor([[float("-inf"), float("-inf"), 0.8, float("-inf"), 0.6, 0.5]])
    assert torch.equal(masked, expected)
    assert target_ranks(masked, target).item() == 1  # only item 2 is left above it


def test_sampled_protocol_ranks_against_the_negatives_only():
    scores = torch.tensor([[0.0, 0.1, 0.9, 0.5, 0.7, 0.3]])
    negatives = torch.tensor([[1, 5, 4]])  # scores 0.1, 0.3, 0.7
    assert sampled_target_ranks(scores, torch.tensor([3]), negatives).item() == 1


def test_training_negatives_avoid_the_rows_items():
    g = torch.Generator().manual_seed(0)
    inputs = torch.tensor([[0, 0, 1, 2, 3], [4, 5, 6, 7, 8]])
    targets = torch.tensor([[0, 1, 2, 3, 9], [5, 6, 7, 8, 10]])
    for _ in range(20):
        neg = sample_unseen_negatives(inputs, targets, num_items=14, generator=g)
        assert neg.shape == (2, 5) and neg.min() >= 1 and neg.max() <= 14
        for row in range(2):
            seen = set(inputs[row].tolist()) | set(targets[row].tolist())
            assert not seen & set(neg[row].tolist())


def test_sample_negatives_avoid_seen_items_and_repeat_nothing():
    rng = np.random.default_rng(0)
    histories = [[1, 2, 3], [4]]
    neg = sample_negatives(histories, np.array([5, 6]), num_items=12, n=7, rng=rng)
    for row, (h, t) in enumerate(zip(histories, [5, 6], strict=True)):
        assert len(set(neg[row])) == 7 and not set(neg[row]) & (set(h) | {t})
    with pytest.raises(ValueError, match="unseen items"):
        sample_negatives([[1, 2, 3, 4]], np.array([5]), num_items=6, n=3, rng=rng)


def test_training_windows_cover_every_target_once():
    inputs, targets = training_windows([[1, 2, 3, 4, 5, 6, 7], [8, 9]], max_len=3)
    # 7 items, windows of 4 from the end: [4 5 6 7], [1 2 3 4]; then [8 9].
    assert inputs.tolist() == [[4, 5, 6], [1, 2, 3], [0, 0, 8]]
    assert targets.tolist() == [[5, 6, 7], [2, 3, 4], [0, 0, 9]]


def test_length_buckets_are_a_permutation():
    lengths = torch.tensor([5, 1, 3, 3, 2, 8, 1])
    batches = length_bucketed_batches(lengths, 3, torch.Generator().manual_seed(0))
    assert sorted(torch.cat(batches).tolist()) == list(range(7))


def test_every_training_target_weighs_the_same_however_batches_are_cut():
    """The batches' losses add up to (number of batches) x the mean loss over all targets, computed
    target by target in a plain loop: a target in a batch of short sequences does not count more."""
    torch.manual_seed(0)
    sequences = [[1, 2, 3], [4, 5, 6], [2, 7], [1, 3, 5, 7, 9, 2, 4, 6, 8], [9, 8, 7, 6, 5, 4, 3, 2, 1]]
    inputs, targets = (torch.from_numpy(a) for a in training_windows(sequences, max_len=8))
    batches = length_bucketed_batches((inputs != 0).sum(1), 2, torch.Generator().manual_seed(0))
    sizes = [int((targets[idx] != 0).sum()) for idx in batches]
    assert len(set(sizes)) > 1  # 2 + 2 + 1 + 8 + 8 targets: batches of very different sizes
    # Positions from the start: a prefix fed alone gets the states it has inside its window.
    config = SASRecConfig(num_items=9, max_len=8, hidden=8, num_heads=2, num_layers=1, positions="start")
    model = SASRec(config).eval()
    torch.nn.init.normal_(model.item_emb.weight, std=1.0)  # targets with clearly different losses
    per_batch = sum(sizes) / len(batches)
    nll = []
    with torch.no_grad():
        losses = [float(train_loss(model, inputs[idx], targets[idx], "ce", None, per_batch)) for idx in batches]
        for seq in sequences:
            for t in range(1, len(seq)):  # predict seq[t] from seq[:t]
                h = model(torch.tensor([seq[:t]]))[0, -1]
                nll.append(-float(torch.log_softmax(h @ model.item_emb.weight[1:].T, -1)[seq[t] - 1]))
    assert sum(losses) / len(batches) == pytest.approx(np.mean(nll), rel=1e-5)
    # The plain batch mean this replaces weighs the short batches' targets up, and differs.
    batch_means = [loss * per_batch / n for loss, n in zip(losses, sizes, strict=True)]
    assert abs(np.mean(batch_means) - np.mean(nll)) > 0.05


class _FixedScores(torch.nn.Module):
    """Scores every item by a fixed table row chosen by the last item; stands in for a model."""

    def __init__(self, table):
        super().__init__()
        self.table = table
        self.config = type("C", (), {"max_len": 4})()

    def scores(self, items_BT):
        return self.table[items_BT[:, -1]].clone()


def test_evaluate_equals_a_plain_loop():
    torch.manual_seed(0)
    table = torch.randn(7, 7)
    table[:, 0] = float("-inf")
    model = _FixedScores(table)
    histories = [[1, 2], [3], [6, 5, 4], [2, 2, 1]]
    targets = np.array([3, 5, 1, 6])
    metrics, ranks = evaluate(model, histories, targets, batch_size=3)
    expected = []
    for h, t in zip(histories, targets, strict=True):
        s = table[h[-1]]
        candidates = [i for i in range(1, 7) if i not in h or i == t]
        expected.append(sum(1 for i in candidates if i != t and s[i] >= s[t]))
    assert ranks.tolist() == expected
    ndcg = [1 / math.log2(r + 2) if r < 5 else 0 for r in expected]
    assert metrics["NDCG@5"] == pytest.approx(np.mean(ndcg))


def _cyclic_data(num_users=32, num_items=12, length=8, seed=0):
    """Each user walks the items in a cycle from a random start: the next item is always last+1."""
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(num_users):
        start = int(rng.integers(num_items))
        seqs.append([(start + j) % num_items + 1 for j in range(length)])
    cats = {i: (("odd",) if i % 2 else ("even",)) for i in range(1, num_items + 1)}
    return SequenceDataset("cyclic", seqs, num_items, list(range(num_users)), [-1] + list(range(num_items)),
                           item_categories=cats)


def test_lr_decays_after_epochs_without_a_better_validation_ndcg():
    data = _cyclic_data()
    cfg = seqrec_config(max_len=8, hidden=16, num_layers=1, dropout=0.0, attn_dropout=0.0, epochs=14,
                        patience=14, batch_size=32, lr=2e-2, lr_decay=0.5, lr_patience=1, seed=3, progress=False)
    history = fit(cfg, data=data, log=quiet).history
    best, stale, lr = -1.0, 0, 2e-2
    for h in history:  # ReduceLROnPlateau by hand: halve after more than lr_patience stale epochs
        assert h["lr"] == pytest.approx(lr)
        if h["valid NDCG@10"] > best * (1 + 1e-4):
            best, stale = h["valid NDCG@10"], 0
        else:
            stale += 1
        if stale > 1:
            lr, stale = lr * 0.5, 0
    assert history[-1]["lr"] < 2e-2  # the cycle is learnt early, so validation stops improving


@pytest.mark.parametrize("model,loss", [("sasrec", "ce"), ("fame", "ce"), ("sasrec", "bce"), ("fame", "bce")])
def test_tiny_training_learns_the_next_item_and_repeats(model, loss, tmp_path):
    data = _cyclic_data()
    # The cycle is never in the history (length 8 < 12 items), so it is a fair ranking check.
    cfg = seqrec_config(architecture=model, loss=loss, max_len=8, hidden=16, num_layers=1, num_experts=2,
                        dropout=0.0, attn_dropout=0.0, epochs=12, patience=12, batch_size=32, lr=2e-2,
                        seed=3, progress=False)
    result = fit(cfg, tmp_path / "run", data=data, log=quiet)
    assert result.test["HR@5"] == 1.0
    assert result.test["MRR@5"] > 0.9
    if (model, loss) == ("fame", "ce"):
        again = fit(cfg, data=data, log=quiet)
        assert again.test == result.test  # same seed, same numbers
    # The run folder round trip and recommendations.
    loaded = load_run(tmp_path / "run")
    assert loaded.config.model.architecture == model and type(loaded.model).__name__ == model.upper().replace(
        "SASREC", "SASRec")
    history = data.sequences[0]
    top = recommend(loaded.model, history, k=3)
    assert top[0][0] == history[-1] % 12 + 1 and not {i for i, _ in top} & set(history)
    if model == "fame":
        names, table, n = head_gate_by_category(loaded.model, result.extra["split"], data)
        assert sorted(names) == ["even", "odd"] and n.sum() == 32
        np.testing.assert_allclose(table.sum(1), 1.0, rtol=1e-5)


def test_model_factory_builds_the_trained_model():
    """fit() trains and tests the factory's model: a SASRec whose ranking scores are negated (its
    training loss is the plain one) ranks the cycle's next item at the bottom of the 5 candidates left
    after masking the 7 history items, where the plain model ranks it first."""

    class Negated(SASRec):
        def logits(self, h_PD, items=None):
            return -super().logits(h_PD, items)

    built = []

    def factory(kind, config):
        built.append((kind, config.hidden))
        return build_model(kind, config)

    data = _cyclic_data()
    cfg = seqrec_config(max_len=8, hidden=16, num_layers=1, dropout=0.0, attn_dropout=0.0, epochs=8,
                        patience=8, batch_size=32, lr=2e-2, seed=3, progress=False)
    assert fit(cfg, data=data, model_factory=factory, log=quiet).test["MRR@5"] > 0.9
    assert built == [("sasrec", 16)]
    assert fit(cfg, data=data, model_factory=lambda kind, config: Negated(config), log=quiet).test["MRR@5"] < 0.25


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="train.loss must be one of ce, bce"):
        SeqRecTrainSettings(loss="bpr")
    with pytest.raises(ValueError, match="train.lr_decay must be < 1"):
        SeqRecTrainSettings(lr_decay=1.5)
    with pytest.raises(ConfigError, match="head_mixing='probability' needs train.loss='ce'"):
        seqrec_config(architecture="fame", loss="bce", head_mixing="probability")
    assert SeqRecModelOptions(architecture="fame", head_mixing="probability").model_config(5).head_mixing == \
        "probability"
    # Heads: each model's own default unless given; the model gets what the config says.
    assert SeqRecModelOptions(architecture="sasrec").model_config(5).num_heads == 4
    assert SeqRecModelOptions(architecture="fame").model_config(5).num_heads == 2
    assert SeqRecModelOptions(architecture="fame", num_heads=4, positions="start").model_config(5).positions == \
        "start"
    with pytest.raises(ValueError, match="model.positions must be one of end, start"):
        SeqRecModelOptions(positions="middle")
    with pytest.raises(ValueError, match="model.max_len must be >= 1"):
        SeqRecModelOptions(max_len=0)
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        load_run(tmp_path)


def test_evaluate_sampled_protocol_equals_a_plain_loop():
    torch.manual_seed(1)
    table = torch.randn(9, 9)
    model = _FixedScores(table)
    histories, targets = [[1, 2], [3, 4, 5]], np.array([3, 8])
    negatives = sample_negatives(histories, targets, num_items=8, n=4, rng=np.random.default_rng(0))
    _, ranks = evaluate(model, histories, targets, protocol="sampled", negatives=negatives)
    for row, (h, t) in enumerate(zip(histories, targets, strict=True)):
        s = table[h[-1]]
        assert ranks[row] == sum(1 for i in negatives[row] if s[i] >= s[t])
