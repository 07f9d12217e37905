"""The execution paths of the MoE layer against the plain per-expert loop (backend='loop').

'sparse' (decode-sized work: plain matmuls on the weight slices of the experts hit) and 'grouped'
(large batches: sort, grouped GEMM) must compute the loop's function and gradients for every router
and expert type, at decode sizes (1, 2, 7 tokens) and a training batch (4096 tokens); 'auto' picks
between them by the number of token-expert assignments.
"""

from __future__ import annotations

import pytest
import torch

from moekit import MoE, MoEConfig
from moekit.layers.moe import sparse_crossover

D, F, E, K = 8, 6, 4, 2
TOKENS = (1, 2, 7, 4096)
ROUTERS = {  # every router, each with the options that change its routing
    "softmax_topk": dict(router="softmax_topk"),
    "topk_softmax": dict(router="topk_softmax"),
    "noisy_topk": dict(router="noisy_topk"),  # in eval mode: no noise
    "sigmoid_topk_groups": dict(router="sigmoid_topk", num_expert_groups=2, topk_groups=1,
                                routed_scaling_factor=2.5),
    "expert_choice": dict(router="expert_choice"),
    "soft": dict(router="soft"),
}
# (expert type, biases): every type with biases in both projections, and the default without.
EXPERTS = [("swiglu", False), ("swiglu", True), ("geglu", True), ("mlp", True), ("linear", True),
           ("clamped_swiglu", True)]
PATHS = ("sparse", "grouped", "auto")


def build(backend: str, dtype: torch.dtype, router: str, expert_type: str, bias: bool) -> MoE:
    torch.manual_seed(0)
    config = MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=K, expert_type=expert_type, expert_bias=bias,
                       activation="silu", swiglu_limit=1.0, backend=backend, **ROUTERS[router])
    moe = MoE(config)
    with torch.no_grad():
        moe.router.weight.mul_(3.0)  # spread the scores: no near-ties in the top-k choice
        for name, p in moe.named_parameters():
            if name.startswith("experts.b_"):
                p.copy_(torch.randn_like(p))  # biases start at zero: make them matter
    return moe.to(dtype).eval()


def run(moe: MoE, x: torch.Tensor, upstream: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The output, and the gradients of <output, upstream> for the input and every parameter."""
    x = x.clone().requires_grad_(True)
    out = moe(x).hidden_states
    params = [p for p in moe.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out, [x, *params], upstream, allow_unused=True)
    return out.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip([x, *params], grads, strict=True)]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str, tokens: int) -> None:
    if dtype == torch.float32:
        # A weight gradient sums over every token: float32 rounding grows with the count.
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=2e-5 * tokens**0.5, msg=lambda m: f"{what}: {m}")
        return
    # bf16: both sides round every product and sum; compare the error against the tensor's size.
    error = (actual.float() - expected.float()).norm()
    assert error <= 2e-2 * expected.float().norm() + 1e-3, f"{what}: relative error {error / expected.float().norm()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("expert_type,bias", EXPERTS, ids=[f"{t}{'-bias' if b else ''}" for t, b in EXPERTS])
@pytest.mark.parametrize("router", list(ROUTERS))
def test_paths_match_the_loop_at_decode_and_training_sizes(router, expert_type, bias, dtype):
    reference = build("loop", dtype, router, expert_type, bias)
    paths = {path: build(path, dtype, router, expert_type, bias) for path in PATHS}
    names = ["input"] + [n for n, p in reference.named_parameters() if p.requires_grad]
    for T in TOKENS:
        x = torch.randn(T, D, dtype=dtype)
        upstream = torch.randn(T, D, dtype=dtype)
        expected, expected_grads = run(reference, x, upstream)
        for path, moe in paths.items():
            out, grads = run(moe, x, upstream)
            assert out.dtype == dtype
            assert_close(out, expected, dtype, f"{path} T={T} output", T)
            for name, g, g_ref in zip(names, grads, expected_grads, strict=True):
                assert_close(g, g_ref, dtype, f"{path} T={T} grad of {name}", T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_auto_runs_sparse_for_decoding_and_grouped_for_large_batches(dtype):
    moe = build("auto", dtype, "topk_softmax", "swiglu", False)
    x = torch.zeros(1, D, dtype=dtype)
    crossover = sparse_crossover(x, E)
    if dtype == torch.bfloat16:  # grouped pads each expert's rows to 32 here: decoding goes sparse
        assert crossover > K  # one decoded token is always below it
        assert moe.path(1 * K, x) == "sparse"
        assert moe.path(crossover - 1, x) == "sparse"
    else:  # grouped pads nothing in float32 and was as fast or faster at every size
        assert crossover == 0
        assert moe.path(1 * K, x) == "grouped"
    assert moe.path(crossover, x) == "grouped"
    assert moe.path(4096 * K, x) == "grouped"
    assert moe.backend == "grouped"  # what expert parallelism and large batches use
    soft = build("auto", dtype, "soft", "swiglu", False)
    assert soft.path(1, x) == soft.path(4096 * E, x) == "dense"
    for forced in ("grouped", "sparse", "loop", "dense"):
        assert build(forced, dtype, "topk_softmax", "swiglu", False).path(1, x) == forced


def test_sparse_path_skips_experts_without_tokens():
    """An expert no token chose costs nothing and gets a zero weight gradient."""
    moe = build("sparse", torch.float32, "topk_softmax", "swiglu", True)
    with torch.no_grad():
        moe.router.weight[3] = -100.0
    x = torch.rand(5, D) + 0.1
    out = moe(x)
    assert out.expert_counts[3].item() == 0
    out.hidden_states.sum().backward()
    assert torch.all(moe.experts.w_in.grad[3] == 0) and torch.all(moe.experts.w_out.grad[3] == 0)
    assert moe.experts.w_in.grad[:3].abs().sum() > 0


def test_sparse_path_with_capacity_drops_matches_the_loop():
    x = torch.randn(24, D)
    outs = {}
    for backend in ("sparse", "loop"):
        torch.manual_seed(0)
        moe = MoE(MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=K, capacity_factor=0.5,
                            backend=backend)).eval()
        outs[backend] = moe(x)
    assert outs["sparse"].dropped_tokens == outs["loop"].dropped_tokens > 0
    torch.testing.assert_close(outs["sparse"].hidden_states, outs["loop"].hidden_states)
    assert outs["sparse"].expert_counts.tolist() == outs["loop"].expert_counts.tolist()
