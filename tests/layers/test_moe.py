"""The MoE layer against the per-token reference in tests/layers/reference.py."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from moekit import MoE, MoEConfig
from tests.layers.reference import reference_moe

ROUTERS = ["softmax_topk", "topk_softmax", "noisy_topk", "sigmoid_topk", "expert_choice", "soft"]
EXPERT_TYPES = ["swiglu", "geglu", "mlp", "linear"]
BACKENDS = ["grouped", "sparse", "loop", "dense"]
D, F, E, K, T = 8, 6, 4, 2, 10


def make_moe(seed: int = 0, **overrides) -> MoE:
    torch.manual_seed(seed)
    fields = dict(d_model=D, d_ff=F, num_experts=E, top_k=K)
    fields.update(overrides)
    moe = MoE(MoEConfig(**fields))
    # Spread the router so no two scores tie (ties would make top-k choices arbitrary).
    with torch.no_grad():
        moe.router.weight.mul_(3.0)
    return moe.eval()


def assert_matches_reference(moe: MoE, x: torch.Tensor, atol: float = 1e-5) -> None:
    """Forward and gradients (input, router, every parameter) equal the per-token reference."""
    x_lib = x.clone().requires_grad_(True)
    x_ref = x.clone().requires_grad_(True)
    out = moe(x_lib)
    ref, ref_counts, ref_dropped = reference_moe(moe, x_ref)
    torch.testing.assert_close(out.hidden_states, ref, atol=atol, rtol=1e-5)
    assert out.expert_counts.tolist() == ref_counts
    assert out.dropped_tokens == ref_dropped

    upstream = torch.randn_like(ref)
    params = [p for p in moe.parameters() if p.requires_grad]
    grads_lib = torch.autograd.grad(out.hidden_states, [x_lib, *params], upstream, allow_unused=True)
    grads_ref = torch.autograd.grad(ref, [x_ref, *params], upstream, allow_unused=True)
    names = ["input"] + [n for n, p in moe.named_parameters() if p.requires_grad]
    for name, g_lib, g_ref in zip(names, grads_lib, grads_ref, strict=True):
        g_lib = torch.zeros(()) if g_lib is None else g_lib
        g_ref = torch.zeros(()) if g_ref is None else g_ref
        torch.testing.assert_close(g_lib.expand_as(g_ref) if g_lib.dim() == 0 else g_lib,
                                   g_ref.expand_as(g_lib) if g_ref.dim() == 0 else g_ref,
                                   atol=atol, rtol=1e-5, msg=lambda m, name=name: f"grad of {name}: {m}")


@pytest.mark.parametrize("router,expert_type,backend", list(itertools.product(ROUTERS, EXPERT_TYPES, BACKENDS)))
def test_every_router_expert_backend_matches_reference(router, expert_type, backend):
    moe = make_moe(router=router, expert_type=expert_type, backend=backend, activation="silu")
    assert_matches_reference(moe, torch.randn(2, T // 2, D))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("router", ["softmax_topk", "sigmoid_topk", "topk_softmax"])
def test_capacity_drops_keep_highest_scores(router, backend):
    moe = make_moe(router=router, backend=backend, capacity_factor=0.6)
    x = torch.randn(3, 8, D)
    with torch.no_grad():  # skew the router so some experts overflow
        moe.router.weight[0] += 2 * x.reshape(-1, D).mean(0)
    out = moe(x)
    capacity = math.ceil(0.6 * 24 * K / E)
    assert out.dropped_tokens > 0
    assert out.expert_counts.max().item() <= capacity
    assert out.expert_counts.sum().item() + out.dropped_tokens == 24 * K
    assert_matches_reference(moe, x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_experts_with_gate_bias_groups_and_scaling(backend):
    moe = make_moe(
        num_experts=8, top_k=3, router="sigmoid_topk", num_expert_groups=4, topk_groups=2,
        routed_scaling_factor=2.5, num_shared_experts=2, shared_d_ff=5, shared_expert_gate=True,
        expert_bias=True, backend=backend,
    )
    assert_matches_reference(moe, torch.randn(T, D))


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_limited_softmax_routing(backend):
    moe = make_moe(num_experts=8, top_k=2, num_expert_groups=4, topk_groups=1, backend=backend)
    x = torch.randn(T, D)
    assert_matches_reference(moe, x)
    # With one group allowed, both chosen experts of every token share a group.
    logits = x @ moe.router.weight.t()
    ids = logits.softmax(-1).topk(8, dim=-1).indices  # noqa: F841 (documenting the unrestricted order)
    out = moe(x)
    assert out.expert_counts.sum().item() == T * 2


def test_expert_choice_capacity_factor_and_dropped_tokens():
    moe = make_moe(router="expert_choice", capacity_factor=0.5)
    x = torch.randn(12, D)
    out = moe(x)
    assert out.expert_counts.tolist() == [math.ceil(0.5 * 12 * K / E)] * E
    assert_matches_reference(moe, x)


def test_top_k_equals_num_experts_and_k1():
    assert_matches_reference(make_moe(top_k=E), torch.randn(T, D))
    assert_matches_reference(make_moe(top_k=1), torch.randn(T, D))


def test_normalize_topk_off():
    assert_matches_reference(make_moe(normalize_topk=False), torch.randn(T, D))


def test_expert_receiving_no_tokens():
    moe = make_moe()
    with torch.no_grad():
        moe.router.weight[3] = -100 * moe.router.weight[3].abs().sum() / D  # never chosen
    x = torch.randn(T, D).abs()
    out = moe(x)
    assert out.expert_counts[3].item() == 0
    assert_matches_reference(moe, x)


def test_gradients_reach_router_only_through_chosen_weights():
    # Renormalised softmax-top-k weights are softmax(logits of the chosen experts): an expert no
    # token chose gets exactly zero router gradient, since the top-k choice is not differentiable.
    moe = make_moe(backend="grouped")
    with torch.no_grad():
        moe.router.weight[3] = -50.0
    x = torch.rand(T, D) + 0.1
    out = moe(x)
    assert out.expert_counts[3].item() == 0
    out.hidden_states.square().sum().backward()
    assert torch.all(moe.router.weight.grad[3] == 0)
    assert moe.router.weight.grad[:3].abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, D), (2, 0, D)])
def test_zero_tokens(backend, shape):
    moe = make_moe(backend=backend, aux_loss_coef=0.01, z_loss_coef=0.001, seq_aux_loss_coef=0.01,
                   num_shared_experts=1)
    x = torch.zeros(shape, requires_grad=True)
    out = moe(x)
    assert out.hidden_states.shape == shape
    assert out.aux_loss.item() == 0.0
    assert out.expert_counts.tolist() == [0] * E
    out.hidden_states.sum().backward()


def test_hierarchical_moe_matches_reference_and_adds_inner_aux_loss():
    torch.manual_seed(0)
    inner = [MoE(MoEConfig(d_model=D, d_ff=F, num_experts=3, top_k=1, aux_loss_coef=0.1)) for _ in range(E)]
    moe = MoE(MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=K), experts=inner).eval()
    x = torch.randn(T, D)
    assert moe.backend == "loop"
    assert_matches_reference(moe, x)
    assert moe(x).aux_loss.item() > 0  # the outer layer has no loss of its own: these are the inner ones


def test_arbitrary_module_experts():
    torch.manual_seed(0)
    experts = [torch.nn.Sequential(torch.nn.Linear(D, 5), torch.nn.Tanh(), torch.nn.Linear(5, D)) for _ in range(E)]
    moe = MoE(MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=K), experts=experts)
    assert_matches_reference(moe, torch.randn(T, D))


def test_noisy_routing_adds_noise_only_in_training_and_is_seeded():
    moe = make_moe(router="noisy_topk")
    x = torch.randn(64, D)
    clean = moe(x).hidden_states
    moe.train()
    torch.manual_seed(1)
    noisy_a = moe(x).hidden_states
    torch.manual_seed(1)
    noisy_b = moe(x).hidden_states
    assert not torch.allclose(clean, noisy_a)
    torch.testing.assert_close(noisy_a, noisy_b, rtol=0, atol=0)
    moe.eval()
    torch.testing.assert_close(moe(x).hidden_states, clean, rtol=0, atol=0)


def test_same_seed_same_result():
    x = torch.randn(4, 6, D)
    a = make_moe(seed=3, num_shared_experts=1)(x).hidden_states
    b = make_moe(seed=3, num_shared_experts=1)(x).hidden_states
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_and_autocast_keep_router_in_float32(backend):
    moe = make_moe(backend=backend, num_shared_experts=1)
    x = torch.randn(16, D)
    ref = moe(x).hidden_states
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = moe(x)
    assert out.hidden_states.dtype == torch.float32  # same dtype as the input
    assert out.router_logits.dtype == torch.float32
    torch.testing.assert_close(out.hidden_states, ref, atol=0.1, rtol=0.1)
    moe_bf16 = make_moe(backend=backend, num_shared_experts=1).to(torch.bfloat16)
    out16 = moe_bf16(x.to(torch.bfloat16))
    assert out16.hidden_states.dtype == torch.bfloat16
    assert out16.router_logits.dtype == torch.float32
    torch.testing.assert_close(out16.hidden_states.float(), ref, atol=0.1, rtol=0.1)


def test_grouped_backend_pads_bf16_groups_on_cpu_without_changing_results():
    moe = make_moe(num_experts=8, top_k=2, backend="grouped").to(torch.bfloat16)
    loop = make_moe(num_experts=8, top_k=2, backend="loop").to(torch.bfloat16)
    x = torch.randn(50, D, dtype=torch.bfloat16)
    torch.testing.assert_close(moe(x).hidden_states, loop(x).hidden_states, atol=2e-2, rtol=2e-2)


def test_torch_compile_gives_the_same_output():
    moe = make_moe(backend="grouped", num_shared_experts=1)
    x = torch.randn(2, 8, D)
    eager = moe(x).hidden_states
    compiled = torch.compile(moe)
    torch.testing.assert_close(compiled(x).hidden_states, eager, atol=1e-5, rtol=1e-5)


def test_output_fields_and_shapes():
    moe = make_moe(aux_loss_coef=0.01, z_loss_coef=0.001)
    out = moe(torch.randn(3, 5, D))
    assert out.router_logits.shape == (15, E)
    assert out.expert_counts.dtype == torch.int64 and out.expert_counts.shape == (E,)
    assert out.expert_counts.sum().item() == 15 * K
    assert isinstance(out.dropped_tokens, int) and out.dropped_tokens == 0
    assert out.aux_loss.dim() == 0
    assert set(out.losses) == {"aux_loss", "z_loss"}


@pytest.mark.parametrize("expert_type,act", [("swiglu", torch.nn.functional.silu), ("geglu", torch.nn.functional.gelu)])
def test_gated_activation_matches_autograd_of_the_formula(expert_type, act):
    from moekit.layers.experts import activate

    h = torch.randn(7, 3, 2 * 5, dtype=torch.float64, requires_grad=True)
    h_ref = h.detach().clone().requires_grad_(True)
    out = activate(h, expert_type, "gelu")
    ref = act(h_ref[..., :5]) * h_ref[..., 5:]
    torch.testing.assert_close(out, ref)
    upstream = torch.randn_like(ref)
    out.backward(upstream)
    ref.backward(upstream)
    torch.testing.assert_close(h.grad, h_ref.grad)
    assert torch.autograd.gradcheck(lambda t: activate(t, expert_type, "gelu"), (h.detach().requires_grad_(),))
