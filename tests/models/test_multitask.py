"""Multi-task models against plain reference computations written here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moekit.models.multitask import ARCHITECTURES, ExpertBank, MultiTaskConfig, MultiTaskModel

VOCAB = (5, 3, 7)
NUM = 2
TASKS = ("click", "buy")


def tiny(architecture: str, **kw) -> MultiTaskModel:
    sizes = dict(embed_dim=3, num_experts=4, expert_hidden=6, expert_dim=5, num_specific_experts=2,
                 num_shared_experts=3, num_levels=2, bottom_widths=(8, 5), tower_widths=(4,))
    cfg = MultiTaskConfig(vocab_sizes=VOCAB, num_numeric=NUM, tasks=TASKS, architecture=architecture,
                          **(sizes | kw))
    return MultiTaskModel(cfg).eval()


def batch(n: int = 9, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cat = torch.stack([torch.randint(0, v, (n,), generator=g) for v in VOCAB], dim=1)
    return cat, torch.randn(n, NUM, generator=g)


@pytest.mark.parametrize("gate", ["softmax", "attention"])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_shapes_and_gates_sum_to_one(architecture, gate):
    torch.manual_seed(0)
    model = tiny(architecture, gate=gate, residual_experts=True)
    out = model(*batch())
    assert set(out.logits) == set(TASKS)
    assert all(v.shape == (9,) for v in out.logits.values())
    if architecture == "shared_bottom":
        assert out.gates == {} and out.expert_load is None
        return
    assert set(out.gates) == set(TASKS)
    for g in out.gates.values():
        assert g.shape == (9, len(model.expert_names))
        assert (g >= 0).all()
        torch.testing.assert_close(g.sum(-1), torch.ones(9))
    torch.testing.assert_close(out.expert_load.sum(), torch.tensor(1.0))


def test_expert_bank_matches_a_loop_of_linears():
    torch.manual_seed(0)
    bank = ExpertBank(groups=2, experts=3, d_in=4, d_hidden=5, d_out=6)
    x = torch.randn(2, 7, 4)
    y = bank(x)
    for g in range(2):
        for e in range(3):
            h = F.relu(x[g] @ bank.w1_GEHD[g, e].T + bank.b1_GEH[g, e])
            ref = F.relu(h @ bank.w2_GEOH[g, e].T + bank.b2_GEO[g, e])
            torch.testing.assert_close(y[g, e], ref)


def test_expert_batchnorm_normalises_each_expert_unit():
    torch.manual_seed(7)
    bank = ExpertBank(groups=2, experts=3, d_in=4, d_hidden=5, d_out=6, batchnorm=True).eval()
    for norm in [*bank.norm1, *bank.norm2]:
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 7, 4)
    y = bank(x)

    def bn(h, norm, e, width):
        sl = slice(e * width, (e + 1) * width)
        return (h - norm.running_mean[sl]) / torch.sqrt(norm.running_var[sl] + norm.eps)

    for g in range(2):
        for e in range(3):
            h = F.relu(bn(x[g] @ bank.w1_GEHD[g, e].T + bank.b1_GEH[g, e], bank.norm1[g], e, 5))
            ref = F.relu(bn(h @ bank.w2_GEOH[g, e].T + bank.b2_GEO[g, e], bank.norm2[g], e, 6))
            torch.testing.assert_close(y[g, e], ref)


def test_mmoe_matches_a_plain_reference():
    torch.manual_seed(1)
    model = tiny("mmoe", input_batchnorm=True)
    # Move the BatchNorm statistics off their defaults so the reference must apply them.
    model.input_norm.running_mean.uniform_(-1, 1)
    model.input_norm.running_var.uniform_(0.5, 2)
    cat, num = batch()
    out = model(cat, num)

    table = model.embedding.table.weight
    offsets = [0, VOCAB[0], VOCAB[0] + VOCAB[1]]
    rows = []
    for n in range(cat.shape[0]):
        parts = [table[offsets[j] + cat[n, j]] for j in range(len(VOCAB))] + [num[n]]
        rows.append(torch.cat(parts))
    x = torch.stack(rows)
    bn = model.input_norm
    x = (x - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    bank = model.experts
    experts = []
    for e in range(4):
        h = torch.relu(x @ bank.w1_GEHD[0, e].T + bank.b1_GEH[0, e])
        experts.append(torch.relu(h @ bank.w2_GEOH[0, e].T + bank.b2_GEO[0, e]))
    for t, task in enumerate(TASKS):
        gate = torch.softmax(x @ model.gates[t].proj.weight.T + model.gates[t].proj.bias, dim=-1)
        mixed = sum(gate[:, e:e + 1] * experts[e] for e in range(4))
        tower = model.towers[t]
        hidden = torch.relu(tower[0][0](mixed))
        torch.testing.assert_close(out.logits[task], tower[1](hidden).squeeze(-1))
        torch.testing.assert_close(out.gates[task], gate)


def test_omoe_equals_mmoe_with_tied_gates():
    torch.manual_seed(2)
    mmoe = tiny("mmoe")
    mmoe.gates[1].load_state_dict(mmoe.gates[0].state_dict())  # tie the gates
    omoe = tiny("omoe")
    state = {k: v for k, v in mmoe.state_dict().items() if not k.startswith("gates.1.")}
    omoe.load_state_dict(state)
    cat, num = batch()
    a, b = mmoe(cat, num), omoe(cat, num)
    for task in TASKS:
        torch.testing.assert_close(a.logits[task], b.logits[task])
        torch.testing.assert_close(a.gates[task], b.gates[task])


def test_ple_without_specific_experts_is_an_mmoe_like_cgc():
    torch.manual_seed(3)
    ple = tiny("ple", num_specific_experts=0, num_levels=1)
    cfg = MultiTaskConfig(vocab_sizes=VOCAB, num_numeric=NUM, tasks=TASKS, architecture="mmoe", embed_dim=3,
                          num_experts=3, expert_hidden=6, expert_dim=5, tower_widths=(4,))
    mmoe = MultiTaskModel(cfg).eval()
    mapped = {}
    for k, v in ple.state_dict().items():
        k = k.replace("levels.0.shared.", "experts.").replace("levels.0.task_gates.", "gates.")
        mapped[k] = v
    mmoe.load_state_dict(mapped)
    cat, num = batch()
    a, b = ple(cat, num), mmoe(cat, num)
    assert ple.expert_names == ["shared 0", "shared 1", "shared 2"]
    for task in TASKS:
        torch.testing.assert_close(a.logits[task], b.logits[task])
        torch.testing.assert_close(a.gates[task], b.gates[task])


def _expert(bank: ExpertBank, g: int, e: int, x: torch.Tensor) -> torch.Tensor:
    h = torch.relu(x @ bank.w1_GEHD[g, e].T + bank.b1_GEH[g, e])
    return torch.relu(h @ bank.w2_GEOH[g, e].T + bank.b2_GEO[g, e])


def _softmax_gate(gate, x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x @ gate.proj.weight.T + gate.proj.bias, dim=-1)


def test_ple_matches_a_plain_reference():
    # Two extraction levels, 2 specific experts per task and 3 shared: the first level runs every bank
    # and gate on the one input row as fused GEMMs, the second on separate branches; the reference
    # computes each expert and gate on its own branch, one at a time.
    torch.manual_seed(5)
    model = tiny("ple")
    cat, num = batch()
    out = model(cat, num)
    x = model.embedding(cat, num)
    branches = [x, x, x]  # task 0, task 1, shared
    for level in model.levels:
        specific = [[_expert(level.specific, t, e, branches[t]) for e in range(2)] for t in range(2)]
        shared = [_expert(level.shared, 0, e, branches[2]) for e in range(3)]
        new = []
        for t in range(2):
            gate = _softmax_gate(level.task_gates[t], branches[t])
            new.append(sum(gate[:, e:e + 1] * y for e, y in enumerate(specific[t] + shared)))
        if level.shared_gate is not None:
            gate = _softmax_gate(level.shared_gate, branches[2])
            new.append(sum(gate[:, e:e + 1] * y for e, y in enumerate(specific[0] + specific[1] + shared)))
        branches = new
    for t, task in enumerate(TASKS):
        tower = model.towers[t]
        ref = tower[1](torch.relu(tower[0][0](branches[t]))).squeeze(-1)
        torch.testing.assert_close(out.logits[task], ref)
    # Gradients flow through the fused GEMMs to every bank and gate of the first level.
    sum(out.logits.values()).sum().backward()
    first = model.levels[0]
    for param in (first.specific.w1_GEHD, first.shared.w2_GEOH, first.task_gates[1].proj.weight,
                  first.shared_gate.proj.weight):
        assert param.grad is not None and param.grad.abs().sum() > 0


def test_ple_task_gate_never_sees_the_other_tasks_experts():
    torch.manual_seed(4)
    model = tiny("ple")
    out = model(*batch())
    names = model.expert_names
    assert names[:4] == ["click 0", "click 1", "buy 0", "buy 1"]
    assert (out.gates["click"][:, 2:4] == 0).all() and (out.gates["buy"][:, 0:2] == 0).all()


def test_attention_gate_matches_its_formula():
    torch.manual_seed(5)
    model = tiny("mmoe", gate="attention")
    cat, num = batch()
    x = model.input_norm(model.embedding(cat, num))
    experts = model.experts(x.unsqueeze(0))[0]
    gate = model.gates[0]
    q = gate.query + x @ gate.q_proj.weight.T + gate.q_proj.bias
    k = experts @ gate.k_proj.weight.T  # (E, N, A)
    scores = torch.stack([(q * k[e]).sum(-1) for e in range(k.shape[0])], dim=1)
    ref = torch.softmax(scores / k.shape[-1] ** 0.5, dim=-1)
    torch.testing.assert_close(model(cat, num).gates[TASKS[0]], ref)


def test_predictions_apply_task_output_activations():
    model = tiny("mmoe", task_types=("binary", "regression"))
    out = model(*batch())
    pred = out.predictions(model.task_types)
    torch.testing.assert_close(pred["click"], torch.sigmoid(out.logits["click"]))
    torch.testing.assert_close(pred["buy"], out.logits["buy"])


def test_residual_experts_add_the_input_projection():
    torch.manual_seed(6)
    bank = ExpertBank(1, 2, d_in=5, d_hidden=3, d_out=5, residual=True)
    x = torch.randn(1, 4, 5)
    plain = ExpertBank(1, 2, d_in=5, d_hidden=3, d_out=5)
    plain.load_state_dict(bank.state_dict())
    torch.testing.assert_close(bank(x), plain(x) + x.unsqueeze(1))


def test_bad_config_and_inputs_fail_clearly():
    with pytest.raises(ValueError, match="architecture must be one of"):
        MultiTaskConfig(vocab_sizes=VOCAB, num_numeric=NUM, architecture="mmo")
    with pytest.raises(ValueError, match="num_shared_experts"):
        MultiTaskConfig(vocab_sizes=VOCAB, num_numeric=NUM, architecture="ple", num_shared_experts=0)
    with pytest.raises(ValueError, match="task_types has 1 entries for 2 tasks"):
        MultiTaskConfig(vocab_sizes=VOCAB, num_numeric=NUM, tasks=TASKS, task_types=("binary",))
    model = tiny("mmoe")
    cat, num = batch()
    with pytest.raises(ValueError, match="expected 3 categorical and 2 numeric features, got 2 and 2"):
        model(cat[:, :2], num)
