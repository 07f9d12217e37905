"""Layer features for real checkpoints against the per-token reference (tests/layers/reference.py):
router bias, GPT-OSS's clamped SwiGLU with expert biases, an output width other than the input's,
a fixed selection bias, the top-2-sum group score for any scoring function, float64, and
`MoEConfig`'s checks of types and ranges."""

from __future__ import annotations

import math

import pytest
import torch

from moekit import MoE, MoEConfig
from tests.layers.test_moe import BACKENDS, D, E, T, assert_matches_reference, make_moe


def randomize(moe: MoE, scale: float = 1.0) -> MoE:
    """Give every parameter and buffer (biases start at zero) random values."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in list(moe.named_parameters()) + list(moe.named_buffers()):
            if "bias" in name:
                p.copy_(torch.randn_like(p) * scale)
    return moe


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("router", ["topk_softmax", "softmax_topk", "sigmoid_topk", "soft"])
def test_router_bias(router, backend):
    moe = randomize(make_moe(router=router, router_bias=True, backend=backend))
    assert moe.router.bias is not None and moe.router.bias.abs().sum() > 0
    x = torch.randn(T, D)
    assert_matches_reference(moe, x)
    out = moe(x)
    torch.testing.assert_close(out.router_logits, x @ moe.router.weight.t() + moe.router.bias)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clamped_swiglu_experts_with_biases(backend):
    """GPT-OSS's expert: router bias, expert biases, gate/up clamped at the limit."""
    moe = randomize(make_moe(router="topk_softmax", router_bias=True, expert_type="clamped_swiglu",
                             expert_bias=True, swiglu_limit=1.5, num_shared_experts=1, backend=backend))
    x = 3 * torch.randn(2, T // 2, D)
    h = torch.einsum("td,ehd->teh", x.reshape(-1, D), moe.experts.w_in) + moe.experts.b_in
    assert (h.abs() > 1.5).any()  # the clamp is exercised
    assert_matches_reference(moe, x)


def test_clamped_swiglu_is_the_gpt_oss_formula():
    from moekit.layers.experts import activate

    h = torch.randn(5, 8, dtype=torch.float64) * 4
    gate, up = h[:, :4], h[:, 4:]
    g = torch.where(gate > 7.0, torch.full_like(gate, 7.0), gate)
    u = torch.where(up > 7.0, torch.full_like(up, 7.0), torch.where(up < -7.0, torch.full_like(up, -7.0), up))
    expected = g / (1 + torch.exp(-1.702 * g)) * (u + 1)
    torch.testing.assert_close(activate(h, "clamped_swiglu", "gelu"), expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("expert_type", ["swiglu", "mlp", "linear", "clamped_swiglu"])
def test_output_width_differs_from_input(expert_type, backend):
    moe = make_moe(d_out=3, expert_type=expert_type, backend=backend, num_shared_experts=1, expert_bias=True)
    x = torch.randn(2, 5, D)
    assert moe(x).hidden_states.shape == (2, 5, 3)
    assert_matches_reference(moe, x)


def test_dense_soft_moe_maps_four_features_to_three():
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=4, d_ff=6, d_out=3, num_experts=3, router="soft", expert_type="mlp",
                        activation="relu", expert_bias=True)).eval()
    x = torch.randn(7, 4)
    assert moe(x).hidden_states.shape == (7, 3)
    assert_matches_reference(moe, x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fixed_selection_bias_steers_choice_and_stays_fixed(backend):
    """DeepSeek-V3's e_score_correction_bias: selection only, loaded, never updated."""
    moe = make_moe(num_experts=8, top_k=2, router="sigmoid_topk", num_expert_groups=4, topk_groups=2,
                   routed_scaling_factor=2.5, selection_bias=True, backend=backend)
    assert "router.expert_bias" in moe.state_dict() and "router.tokens_per_expert" not in moe.state_dict()
    x = torch.randn(T, D)
    before = moe(x).expert_counts
    with torch.no_grad():
        moe.router.expert_bias.copy_(torch.tensor([5.0, 0, 0, 0, 0, 0, 0, 0]))
    out = moe(x)
    assert out.expert_counts[0] == T and not torch.equal(out.expert_counts, before)
    assert_matches_reference(moe, x)
    moe.train()
    moe(x)
    moe.update_expert_bias()
    assert moe.router.expert_bias.tolist() == [5.0, 0, 0, 0, 0, 0, 0, 0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("router,group_score", [("softmax_topk", "top2_sum"), ("topk_softmax", "top2_sum"),
                                                ("sigmoid_topk", "max"), ("sigmoid_topk", "top2_sum")])
def test_group_score_for_any_scoring_function(router, group_score, backend):
    moe = make_moe(num_experts=8, top_k=2, router=router, num_expert_groups=4, topk_groups=1,
                   group_score=group_score, backend=backend)
    x = torch.randn(3 * T, D)
    assert_matches_reference(moe, x)


def test_top2_sum_and_max_group_scores_choose_differently():
    """A group with one strong expert against one with two good ones: the two rules disagree."""
    def chosen(group_score):
        moe = make_moe(num_experts=4, top_k=1, router="sigmoid_topk", num_expert_groups=2, topk_groups=1,
                       group_score=group_score, selection_bias=True)
        with torch.no_grad():
            moe.router.weight.zero_()
            moe.router.expert_bias.copy_(torch.tensor([0.9, -0.9, 0.6, 0.6]))  # sigmoid(0) = 0.5 each
        return moe(torch.randn(1, D)).expert_counts.nonzero().item()
    assert chosen("max") == 0       # group 0 holds the single best expert
    assert chosen("top2_sum") in (2, 3)  # group 1's two experts sum higher


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("router", ["softmax_topk", "sigmoid_topk", "expert_choice", "soft"])
def test_float64_model_runs_in_float64(router, backend):
    moe = make_moe(router=router, backend=backend, num_shared_experts=1).double()
    x = torch.randn(2, T // 2, D, dtype=torch.float64)
    out = moe(x)
    assert out.hidden_states.dtype == torch.float64 and out.router_logits.dtype == torch.float64
    assert_matches_reference(moe, x, atol=1e-10)


@pytest.mark.parametrize("fields, message", [
    (dict(top_k=2.5), "top_k must be an integer (got 2.5)"),
    (dict(top_k="2"), "top_k must be an integer (got '2')"),
    (dict(num_shared_experts=1.5), "num_shared_experts must be an integer (got 1.5)"),
    (dict(aux_loss_coef=float("nan")), "aux_loss_coef must be a finite number (got nan)"),
    (dict(routed_scaling_factor=-2), "routed_scaling_factor must be > 0 (got -2)"),
    (dict(routed_scaling_factor=float("inf")), "routed_scaling_factor must be a finite number (got inf)"),
    (dict(d_out=0), "d_out must be >= 1 (got 0)"),
    (dict(group_score="mean"), "group_score must be one of auto, max, top2_sum (got 'mean')"),
    (dict(swiglu_limit=0.0), "swiglu_limit must be > 0 (got 0.0)"),
    (dict(router_bias=1), "router_bias must be true or false (got 1)"),
    (dict(capacity_factor=math.inf), "capacity_factor must be a positive number or None (got inf)"),
    (dict(router="soft", selection_bias=True), "needs a token-choice router"),
])
def test_bad_values_are_named_at_construction(fields, message):
    base = dict(d_model=8, d_ff=8, num_experts=E, top_k=2)
    base.update(fields)
    with pytest.raises(ValueError) as info:
        MoEConfig(**base)
    assert message in str(info.value)


def test_balancing_buffers_stay_float32_in_a_bfloat16_layer():
    """A bf16 selection bias would round 0.1234567 to 0.1235 and flip near-tied choices."""
    moe = make_moe(router="sigmoid_topk", selection_bias=True, bias_update_rate=0.01)
    with torch.no_grad():
        moe.router.expert_bias.copy_(torch.tensor([0.1234567, 0.0, 0.0, 0.0]))
    moe = moe.to(torch.bfloat16)
    assert moe.router.expert_bias.dtype == torch.float32 and moe.router.tokens_per_expert.dtype == torch.float32
    assert moe.router.expert_bias[0].item() == pytest.approx(0.1234567, abs=1e-8)
    assert moe.router.weight.dtype == torch.bfloat16
    assert moe(torch.randn(5, D, dtype=torch.bfloat16)).hidden_states.dtype == torch.bfloat16
