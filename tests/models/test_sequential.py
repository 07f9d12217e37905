"""SASRec and FAME: causality, padding, FAME's reduction to SASRec, mixing formulas, config errors."""

from __future__ import annotations

import pytest
import torch

from moekit.models.sequential import FAME, FAMEConfig, SASRec, SASRecConfig, build_model

NUM_ITEMS = 30


def _models(**kw):
    torch.manual_seed(0)
    sas = SASRec(SASRecConfig(NUM_ITEMS, max_len=8, hidden=16, num_heads=2, **kw)).eval()
    fame = FAME(FAMEConfig(NUM_ITEMS, max_len=8, hidden=16, num_heads=2, num_experts=3,
                           head_mixing="probability", **kw)).eval()
    # Non-zero router and gate, so the tests exercise them (they start at zero).
    with torch.no_grad():
        fame.last.attn.router_HNKN.normal_(std=0.5)
        fame.gate.weight.normal_(std=0.5)
    return sas, fame


@pytest.mark.parametrize("positions", ["end", "start"])
@pytest.mark.parametrize("which", [0, 1])
def test_later_items_never_change_earlier_outputs(which, positions):
    model = _models(positions=positions)[which]
    items = torch.tensor([[0, 0, 3, 7, 1, 9, 4, 2]])
    changed = items.clone()
    changed[0, 5:] = torch.tensor([11, 12, 13])
    h, h_changed = model(items), model(changed)
    torch.testing.assert_close(h[:, :5], h_changed[:, :5])
    assert not torch.allclose(h[:, 5:], h_changed[:, 5:])


@pytest.mark.parametrize("positions", ["end", "start"])
@pytest.mark.parametrize("which", [0, 1])
def test_padding_never_affects_scores(which, positions):
    model = _models(positions=positions)[which]
    seq = [3, 7, 1, 9]
    short = model.scores(torch.tensor([seq]))
    padded = model.scores(torch.tensor([[0, 0, 0, 0] + seq]))
    torch.testing.assert_close(short, padded)
    # Whatever sits in the padding row of the embedding table is never read.
    with torch.no_grad():
        model.item_emb.weight[0] = 5.0
    torch.testing.assert_close(model.scores(torch.tensor([[0, 0, 0, 0] + seq])), padded)
    assert torch.isneginf(padded[:, 0]).all()  # padding is never recommended


@pytest.mark.parametrize("positions", ["end", "start"])
@pytest.mark.parametrize("which", [0, 1])
def test_batch_rows_are_independent(which, positions):
    model = _models(positions=positions)[which]
    a, b = torch.tensor([[0, 0, 5, 6, 7]]), torch.tensor([[1, 2, 3, 4, 8]])
    both = model.scores(torch.cat([a, b]))
    torch.testing.assert_close(both, torch.cat([model.scores(a), model.scores(b)]))


@pytest.mark.parametrize("which", [0, 1])
def test_positions_from_start_make_a_prefix_score_as_a_history(which):
    """With positions='start' the output after item t of a training window equals the output of the
    history that ends at t, fed alone (left-padded); with 'end' the two differ (positions shift)."""
    window = torch.tensor([[0, 0, 3, 7, 1, 9, 4, 2]])
    for positions, same in (("start", True), ("end", False)):
        model = _models(positions=positions)[which]
        h_window = model(window)[0, 4]  # after items 3, 7, 1
        h_alone = model(torch.tensor([[0, 0, 0, 0, 0, 3, 7, 1]]))[0, -1]
        assert torch.allclose(h_window, h_alone, atol=1e-6) is same, positions


def test_fame_with_one_head_and_one_expert_is_sasrec():
    torch.manual_seed(1)
    cfg = dict(num_items=NUM_ITEMS, max_len=8, hidden=16, num_layers=2, num_heads=1)
    sas = SASRec(SASRecConfig(**cfg)).eval()
    fame = FAME(FAMEConfig(**cfg, num_experts=1)).eval()
    D = 16
    last = sas.blocks[1]
    with torch.no_grad():
        fame.item_emb.weight.copy_(sas.item_emb.weight)
        fame.pos_emb.weight.copy_(sas.pos_emb.weight)
        fame.blocks[0].load_state_dict(sas.blocks[0].state_dict())
        fame.last.ln1.load_state_dict(last.ln1.state_dict())
        fame.last.attn.q.weight.copy_(last.attn.qkv.weight[:D])
        fame.last.attn.q.bias.copy_(last.attn.qkv.bias[:D])
        fame.last.attn.kv.weight.copy_(last.attn.qkv.weight[D:])
        fame.last.attn.kv.bias.copy_(last.attn.qkv.bias[D:])
        fame.last.attn.proj_HKK[0].copy_(last.attn.proj.weight)
        fame.last.attn.proj_bias_HK[0].copy_(last.attn.proj.bias)
        fame.last.ln2.load_state_dict(last.ln2.state_dict())
        fame.last.ffn.load_state_dict(last.ffn.state_dict())
        fame.last.ln_f.load_state_dict(sas.ln_f.state_dict())
    assert torch.equal(fame.item_proj_HDK[0], torch.eye(D))  # W_f starts as the identity slice
    items = torch.tensor([[0, 0, 3, 7, 1, 9], [2, 4, 6, 8, 10, 12]])
    torch.testing.assert_close(fame(items), sas(items))
    # One head, gate 1: FAME's scores are SASRec's ('logits' mixing) or their log softmax (same ranking).
    torch.testing.assert_close(fame.scores(items), sas.scores(items))
    fame.config.head_mixing = "probability"
    torch.testing.assert_close(fame.scores(items), sas.scores(items).log_softmax(-1), rtol=1e-5, atol=1e-5)


def test_fame_mixtures_match_a_plain_loop():
    _, fame = _models()
    h_PD = fame(torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7], [0, 0, 0, 9, 8, 7, 6, 5]]))[:, -1]
    H, K = 2, 8
    gate = torch.softmax(fame.gate(h_PD), -1)
    prob = torch.zeros(2, NUM_ITEMS + 1)
    logit = torch.zeros(2, NUM_ITEMS + 1)
    for h in range(H):
        sub = fame.item_emb.weight @ fame.item_proj_HDK[h]  # (I+1, K): head h's item sub-embeddings
        s = h_PD[:, h * K:(h + 1) * K] @ sub.T
        s[:, 0] = float("-inf")
        prob += gate[:, h:h + 1] * torch.softmax(s, -1)
        logit += H * gate[:, h:h + 1] * s  # 'logits' mixing: weights H * gate, summing to H
    torch.testing.assert_close(fame.logits(h_PD), prob.log(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fame.heads(h_PD).gate_PH.sum(-1), torch.ones(2))
    fame.config.head_mixing = "logits"
    torch.testing.assert_close(fame.logits(h_PD)[:, 1:], logit[:, 1:])
    items = torch.tensor([[3, 4], [5, 1]])
    torch.testing.assert_close(fame.logits(h_PD, items), logit.gather(1, items))


def test_next_item_loss_is_the_mixture_nll_from_a_plain_loop():
    sas, fame = _models()
    h_PD = torch.randn(5, 16, requires_grad=True)
    target_P = torch.tensor([1, 7, 30, 12, 7])
    H, K = 2, 8
    gate = torch.softmax(fame.gate(h_PD), -1)
    nll = torch.zeros(())
    for p in range(5):  # -log sum_h g_h softmax_h[target], one row and one head at a time
        prob = torch.zeros(())
        for h in range(H):
            s = h_PD[p, h * K:(h + 1) * K] @ (fame.item_emb.weight[1:] @ fame.item_proj_HDK[h]).T
            prob = prob + gate[p, h] * torch.softmax(s, -1)[target_P[p] - 1]
        nll = nll - prob.log() / 5
    loss = fame.next_item_loss(h_PD, target_P)
    torch.testing.assert_close(loss, nll)
    for a, b in zip(torch.autograd.grad(loss, [h_PD, fame.gate.weight, fame.item_proj_HDK]),
                    torch.autograd.grad(nll, [h_PD, fame.gate.weight, fame.item_proj_HDK]), strict=True):
        torch.testing.assert_close(a, b)
    # 'logits' mixing: cross-entropy of the head scores weighted by H * gate.
    fame.config.head_mixing = "logits"
    gate = torch.softmax(fame.gate(h_PD), -1)
    mixed = sum(H * gate[:, h:h + 1]
                * (h_PD[:, h * K:(h + 1) * K] @ (fame.item_emb.weight[1:] @ fame.item_proj_HDK[h]).T)
                for h in range(H))
    loss = fame.next_item_loss(h_PD, target_P)
    reference = torch.nn.functional.cross_entropy(mixed, target_P - 1)
    torch.testing.assert_close(loss, reference)
    for a, b in zip(torch.autograd.grad(loss, [h_PD, fame.gate.weight]),
                    torch.autograd.grad(reference, [h_PD, fame.gate.weight]), strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)
    # SASRec: plain cross-entropy over items 1..I.
    torch.testing.assert_close(sas.next_item_loss(h_PD, target_P),
                               torch.nn.functional.cross_entropy((h_PD @ sas.item_emb.weight[1:].T), target_P - 1))


def test_fame_router_is_a_convex_mixture_of_experts():
    _, fame = _models()
    x = torch.randn(2, 5, 16)
    from moekit.models.sequential import attention_mask

    y, r = fame.last.attn(x, attention_mask(torch.ones(2, 5, dtype=torch.long)))
    assert y.shape == (2, 5, 2, 8) and r.shape == (2, 5, 2, 3)
    torch.testing.assert_close(r.sum(-1), torch.ones(2, 5, 2))


def test_sasrec_item_subset_scores_equal_full_scores():
    sas, _ = _models()
    h = sas(torch.tensor([[0, 0, 3, 4, 5]]))[:, -1]
    items = torch.tensor([[4, 17, 29]])
    torch.testing.assert_close(sas.logits(h, items), sas.logits(h)[:, [4, 17, 29]])


def test_config_and_input_errors():
    with pytest.raises(ValueError, match="hidden must be divisible by num_heads"):
        SASRecConfig(10, hidden=10, num_heads=3)
    with pytest.raises(ValueError, match="head_mixing"):
        FAMEConfig(10, head_mixing="max")
    with pytest.raises(ValueError, match="positions must be one of end, start"):
        SASRecConfig(10, positions="middle")
    with pytest.raises(ValueError, match="model 'fame' needs a FAMEConfig"):
        build_model("fame", SASRecConfig(10))
    sas, fame = _models()
    with pytest.raises(ValueError, match="item ids must be in 0..30"):
        sas(torch.tensor([[1, 31]]))
    with pytest.raises(ValueError, match="max_len=8"):
        sas(torch.ones(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="head_mixing='logits'"):
        fame.logits(torch.randn(1, 16), torch.tensor([[1, 2]]))
