"""Expert parallelism on 2 gloo processes vs the same model on one process (fp32, 1e-5).

The reference is the unmodified single-device `MoE` run on the ranks' inputs concatenated in rank
order. Each case builds the layer from a seed, so both sides start from the same weights. Rank r's
loss is sum(out_r * G_r) + aux_loss; after `sync_gradients` the gradients must equal those of
(1/P) * sum(out * G) + aux_loss on one device (see moekit.distributed.expert_parallel).

All cases run in one spawn (process start-up dominates on a 2-core machine).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from moekit import MoE, MoEConfig
from moekit.distributed import init_expert_parallel, parallelize_experts, sync_gradients
from moekit.distributed.launch import spawn

P = 2
D = 8


def _cfg(**kw) -> MoEConfig:
    base = dict(d_model=D, d_ff=12, num_experts=4, top_k=2)
    base.update(kw)
    return MoEConfig(**base)


# name -> (config, per-rank input shapes (without D), optional expert bias to preset)
CASES: dict[str, tuple[MoEConfig, list[tuple[int, ...]], list[float] | None]] = {
    # uneven loads, every balancing loss, a shared expert, expert biases
    "uneven": (_cfg(aux_loss_coef=0.1, seq_aux_loss_coef=0.05, z_loss_coef=0.01, num_shared_experts=1,
                    expert_bias=True), [(3, 4), (2, 4)], None),
    # expert 3 never chosen: its (pre-set) loss-free bias is far below the others
    "empty_expert": (_cfg(bias_update_rate=0.01, aux_loss_coef=0.1), [(9,), (6,)], [0.0, 0.0, 0.0, -100.0]),
    # rank 1 routes no tokens at all
    "empty_rank": (_cfg(aux_loss_coef=0.1, z_loss_coef=0.01, seq_aux_loss_coef=0.1), [(2, 5), (0, 5)], None),
    # capacity drops; top-1 topk_softmax gives every assignment weight 1: ties break by token order
    "capacity_ties": (_cfg(router="topk_softmax", top_k=1, capacity_factor=0.5, aux_loss_coef=0.1),
                      [(11,), (7,)], None),
    "capacity": (_cfg(capacity_factor=0.75, expert_type="mlp", activation="relu", expert_bias=True,
                      num_experts=6, top_k=3), [(10,), (13,)], None),
    "sigmoid_groups": (_cfg(router="sigmoid_topk", num_experts=8, num_expert_groups=4, topk_groups=2,
                            routed_scaling_factor=2.0, bias_update_rate=0.1), [(12,), (5,)], None),
}


def _build(name: str) -> tuple[MoE, list[torch.Tensor], list[torch.Tensor]]:
    cfg, shapes, bias = CASES[name]
    torch.manual_seed(list(CASES).index(name))
    moe = MoE(cfg)
    if bias is not None:
        moe.router.expert_bias.copy_(torch.tensor(bias))
    xs = [torch.randn(*shape, D) for shape in shapes]
    gs = [torch.randn(*shape, D) for shape in shapes]
    return moe, xs, gs


def _run_single(name: str) -> dict:
    """The reference: one device, all ranks' tokens concatenated in rank order."""
    moe, xs, gs = _build(name)
    moe.train()
    x = torch.cat(xs).requires_grad_()
    out = moe(x)
    loss = (out.hidden_states * torch.cat(gs)).sum() / P + out.aux_loss
    loss.backward()
    moe.update_expert_bias()
    result = _summary(moe, out, x.grad)
    result["x_grads"] = list(x.grad.split([len(t) for t in xs]))
    return result


def _summary(moe: MoE, out, x_grad) -> dict:
    return {
        "out": out.hidden_states.detach(),
        "aux_loss": out.aux_loss.detach(),
        "losses": {k: v.detach() for k, v in out.losses.items()},
        "counts": out.expert_counts,
        "dropped": out.dropped_tokens,
        "grads": {n: p.grad.clone() for n, p in moe.named_parameters()},
        "buffers": {n: b.clone() for n, b in moe.named_buffers()},
    }


def _worker(rank: int, world: int, folder: str) -> None:
    groups = init_expert_parallel(P)
    results = {}
    for name in CASES:
        moe, xs, gs = _build(name)
        parallelize_experts(moe, groups)
        moe.train()
        x = xs[rank].clone().requires_grad_()
        out = moe(x)
        loss = (out.hidden_states * gs[rank]).sum() + out.aux_loss
        loss.backward()
        sync_gradients(moe, groups)
        moe.update_expert_bias()
        results[name] = _summary(moe, out, x.grad)
        results[name]["x_grad"] = x.grad.clone()
    torch.save(results, Path(folder) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ep_results(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("ep")
    spawn(_worker, P, str(folder), threads=1, start_method="fork")
    return [torch.load(folder / f"rank{r}.pt") for r in range(P)]


def _close(actual, expected, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("name", list(CASES))
def test_matches_single_device(ep_results: list[dict], name: str) -> None:
    ref = _run_single(name)
    E = CASES[name][0].num_experts
    L = E // P
    for rank in range(P):
        got = ep_results[rank][name]
        start = sum(len(t) for t in ref["x_grads"][:rank])
        rows = len(ref["x_grads"][rank])
        _close(got["out"], ref["out"][start:start + rows], f"{name} rank {rank} output")
        # Activations carry the gradient of the *sum* of the ranks' losses; parameters are divided by
        # the world size in sync_gradients.
        _close(got["x_grad"] / P, ref["x_grads"][rank], f"{name} rank {rank} input gradient")
        _close(got["aux_loss"], ref["aux_loss"], f"{name} rank {rank} aux_loss")
        assert got["losses"].keys() == ref["losses"].keys()
        for key in ref["losses"]:
            _close(got["losses"][key], ref["losses"][key], f"{name} rank {rank} {key}")
        assert torch.equal(got["counts"], ref["counts"]), (name, got["counts"], ref["counts"])
        assert got["dropped"] == ref["dropped"]
        for pname, grad in ref["grads"].items():
            expected = grad[rank * L:(rank + 1) * L] if pname.startswith("experts.") else grad
            _close(got["grads"][pname], expected, f"{name} rank {rank} grad {pname}")
        for bname, buf in ref["buffers"].items():
            _close(got["buffers"][bname], buf, f"{name} rank {rank} buffer {bname}")


def test_cases_exercise_their_edge() -> None:
    """The named edge cases really happen in the reference run (else the comparison proves little)."""
    assert _run_single("empty_expert")["counts"][3] == 0
    assert CASES["empty_rank"][1][1][0] == 0
    for name in ("capacity", "capacity_ties"):
        assert _run_single(name)["dropped"] > 0
    uneven = _run_single("uneven")["counts"]
    assert uneven.max() > uneven.min()
    assert _run_single("sigmoid_groups")["buffers"]["router.expert_bias"].abs().sum() > 0


def test_bad_configurations_fail_clearly() -> None:
    from moekit.distributed.expert_parallel import ExpertParallelGroups, _check_parallelizable

    with pytest.raises(ValueError, match=r"\(got num_experts=6, expert_parallel=4\)"):
        _check_parallelizable("layer", MoE(_cfg(num_experts=6)), 4)
    with pytest.raises(ValueError, match="token-choice router"):
        _check_parallelizable("layer", MoE(_cfg(router="expert_choice")), 2)
    with pytest.raises(ValueError, match="grouped backend"):
        _check_parallelizable("layer", MoE(_cfg(backend="loop")), 2)
    experts = [nn.Linear(D, D) for _ in range(4)]
    with pytest.raises(ValueError, match="not a list of expert modules"):
        _check_parallelizable("layer", MoE(_cfg(), experts=experts), 2)
    with pytest.raises(ValueError, match="no MoE layer"):
        parallelize_experts(nn.Linear(2, 2), ExpertParallelGroups(1, 0, 1, None, None))
    layer = MoE(_cfg())
    layer.dispatcher = object()
    with pytest.raises(ValueError, match="already expert-parallel"):
        _check_parallelizable("layer", layer, 2)
    assert copy.deepcopy(MoE(_cfg())).dispatcher is None
