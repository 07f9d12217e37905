"""Balancing losses against hand-computed values, loss-free bias balancing, and config errors."""

from __future__ import annotations

import math

import pytest
import torch

from moekit import MoE, MoEConfig
from moekit.layers.routers import expert_counts_per_group, load_balancing_loss, router_z_loss
from moekit.train.balancing import attach_expert_bias_updates


def test_switch_loss_is_exactly_one_for_uniform_routing():
    E, T = 4, 8
    probs = torch.full((T, E), 1 / E)
    counts = torch.tensor([[4, 4, 4, 4]])  # T*K = 16 assignments, 4 each
    assert load_balancing_loss(probs, counts).item() == pytest.approx(1.0, abs=1e-7)


def test_switch_loss_hand_computed():
    # f = [1, 0] (both tokens to expert 0), P = mean probs = [0.75, 0.25]: 2 * (1*0.75 + 0*0.25) = 1.5
    probs = torch.tensor([[0.75, 0.25], [0.75, 0.25]])
    assert load_balancing_loss(probs, torch.tensor([[2, 0]])).item() == pytest.approx(1.5)
    # f = [0.5, 0.5], P = [0.6, 0.4]: 2 * (0.3 + 0.2) = 1.0
    probs = torch.tensor([[0.8, 0.2], [0.4, 0.6]])
    assert load_balancing_loss(probs, torch.tensor([[1, 1]])).item() == pytest.approx(1.0)


def test_sequence_wise_loss_averages_per_sequence_values():
    # Two sequences of two tokens, E=2, K=1.
    probs = torch.tensor([[0.9, 0.1], [0.7, 0.3], [0.2, 0.8], [0.5, 0.5]])
    ids = torch.tensor([[0], [0], [1], [0]])
    counts = expert_counts_per_group(ids, 2, 2)
    assert counts.tolist() == [[2, 0], [1, 1]]
    seq1 = 2 * (1.0 * 0.8 + 0.0 * 0.2)  # f=[1,0], P=[0.8,0.2]
    seq2 = 2 * (0.5 * 0.35 + 0.5 * 0.65)  # f=[.5,.5], P=[0.35,0.65]
    assert load_balancing_loss(probs, counts).item() == pytest.approx((seq1 + seq2) / 2)


def test_z_loss_hand_computed():
    logits = torch.zeros(3, 4)
    assert router_z_loss(logits).item() == pytest.approx(math.log(4) ** 2)
    logits = torch.tensor([[1.0, 2.0]])
    assert router_z_loss(logits).item() == pytest.approx(math.log(math.e + math.e**2) ** 2)


def test_moe_aux_loss_is_the_weighted_sum_of_enabled_losses():
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=2, aux_loss_coef=0.1, seq_aux_loss_coef=0.2,
                    z_loss_coef=0.01)
    moe = MoE(cfg)
    x = torch.randn(3, 5, 8)
    out = moe(x)
    logits = x.reshape(-1, 8) @ moe.router.weight.t()
    probs = logits.softmax(-1)
    ids = probs.topk(2, dim=-1).indices
    # Hand-written: Switch over all 15 tokens, sequence-wise over the 3 rows of 5, z-loss.
    f = torch.bincount(ids.reshape(-1), minlength=4).float() / 30
    switch = 4 * (f * probs.mean(0)).sum()
    seq = 0.0
    for b in range(3):
        f_b = torch.bincount(ids[5 * b : 5 * b + 5].reshape(-1), minlength=4).float() / 10
        seq += 4 * (f_b * probs[5 * b : 5 * b + 5].mean(0)).sum() / 3
    z = (torch.logsumexp(logits, -1) ** 2).mean()
    torch.testing.assert_close(out.losses["aux_loss"], switch)
    torch.testing.assert_close(out.losses["seq_aux_loss"], seq)
    torch.testing.assert_close(out.losses["z_loss"], z)
    torch.testing.assert_close(out.aux_loss, 0.1 * switch + 0.2 * seq + 0.01 * z)


def test_uniform_router_gives_switch_loss_one_through_the_layer():
    cfg = MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=4, aux_loss_coef=1.0)
    moe = MoE(cfg)
    with torch.no_grad():
        moe.router.weight.zero_()  # every token: uniform probabilities, all 4 experts chosen
    out = moe(torch.randn(16, 8))
    assert out.aux_loss.item() == pytest.approx(1.0, abs=1e-6)


def test_bias_update_moves_by_rate_times_sign():
    moe = MoE(MoEConfig(d_model=4, d_ff=4, num_experts=4, top_k=1, bias_update_rate=0.1)).train()
    moe.router.tokens_per_expert.copy_(torch.tensor([5.0, 1.0, 2.0, 0.0]))  # mean 2
    moe.update_expert_bias()
    assert moe.router.expert_bias.tolist() == pytest.approx([-0.1, 0.1, 0.0, 0.1])
    assert moe.router.tokens_per_expert.sum().item() == 0


def test_bias_steers_selection_but_not_weights():
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=1, normalize_topk=False,
                        bias_update_rate=0.1)).eval()
    x = torch.randn(32, 8)
    with torch.no_grad():
        moe.router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))
    out = moe(x)
    assert out.expert_counts.tolist() == [0, 0, 0, 32]  # the bias decided the choice ...
    probs = (x @ moe.router.weight.t()).softmax(-1)
    expected = probs[:, 3:4] * torch.stack([_expert(moe, 3, xt) for xt in x])
    torch.testing.assert_close(out.hidden_states, expected)  # ... the unbiased score weighs it


def _expert(moe, e, x_D):
    ex = moe.experts
    gate, up = (ex.w_in[e] @ x_D).chunk(2)
    return ex.w_out[e] @ (torch.nn.functional.silu(gate) * up)


def test_loss_free_bias_balances_a_skewed_router_on_a_toy_task():
    torch.manual_seed(0)
    E, D = 8, 16
    moe = MoE(MoEConfig(d_model=D, d_ff=16, num_experts=E, top_k=2, bias_update_rate=2e-3))
    target = torch.nn.Linear(D, D)
    with torch.no_grad():
        moe.router.weight[0] += 0.15  # inputs have positive mean: expert 0 wins most tokens
        moe.router.weight[1] += 0.1
    opt = torch.optim.Adam(moe.parameters(), lr=1e-3)
    attach_expert_bias_updates(moe, opt)

    def imbalance() -> float:
        with torch.no_grad():
            moe.eval()
            counts = moe(torch.randn(2048, D) + 1.0).expert_counts.float()
            moe.train()
        return (counts.max() / counts.mean()).item()

    start = imbalance()
    for _ in range(300):
        x = torch.randn(256, D) + 1.0
        loss = (moe(x).hidden_states - target(x).detach()).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = imbalance()
    assert start > 2.0
    assert end < 1.35, f"max/mean expert load {start:.2f} -> {end:.2f}"


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(top_k=3, num_experts=2), "top_k=3 > num_experts=2"),
        (dict(top_k=0), "top_k must be >= 1"),
        (dict(router="nope"), "router must be one of"),
        (dict(expert_type="moe"), "expert_type must be one of"),
        (dict(activation="tanh"), "activation must be one of"),
        (dict(backend="cuda"), "backend must be one of"),
        (dict(capacity_factor=0.0), "capacity_factor must be a positive number"),
        (dict(capacity_factor=-1.0), "capacity_factor must be a positive number"),
        (dict(num_experts=8, num_expert_groups=3), "num_expert_groups=3 must divide num_experts=8"),
        (dict(num_experts=8, num_expert_groups=4, topk_groups=5), "topk_groups=5 must be in 1..num_expert_groups=4"),
        (dict(num_experts=8, top_k=3, num_expert_groups=4, topk_groups=1), "top_k=3 > experts in the chosen groups"),
        (dict(d_model=0), "d_model must be >= 1 (got 0)"),
        (dict(router="soft", bias_update_rate=0.1), "needs a token-choice router"),
    ],
)
def test_bad_config_names_the_problem(fields, message):
    base = dict(d_model=8, d_ff=8, num_experts=4, top_k=2)
    base.update(fields)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        MoEConfig(**base)


def test_wrong_last_dimension_names_the_shapes():
    moe = MoE(MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=2))
    with pytest.raises(ValueError, match=r"expected input of shape \(\.\.\., d_model=8\), got \(2, 3, 7\)"):
        moe(torch.randn(2, 3, 7))


def test_wrong_number_of_expert_modules():
    with pytest.raises(ValueError, match="got 3 expert modules for num_experts=4"):
        MoE(MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=2), experts=[torch.nn.Identity()] * 3)
