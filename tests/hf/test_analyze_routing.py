"""`moekit analyze routing` on an imported checkpoint and on a moekit model, checked against the
model's own expert counts, its capacity drops and plain loops over the router's decisions."""

from __future__ import annotations

import json
import math

import pytest
import torch

from moekit import MoEConfig
from moekit.cli import main
from moekit.commands.analyze_routing import collect_routing
from moekit.models.transformer import Transformer, TransformerConfig
from tests.hf.tiny import CHARS, build

TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness; it was the epoch of belief, it was the epoch of incredulity.\n") * 4


def tiny_moe(**moe) -> Transformer:
    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=64, block_size=32, n_layer=3, d_model=16, n_head=2, first_dense_layers=1,
                               moe=MoEConfig(d_model=16, d_ff=8, **{"num_experts": 6, "top_k": 2, **moe}))
    model = Transformer(config).eval()
    with torch.no_grad():
        for block in model.blocks[1:]:
            block.ffn.router.weight.mul_(4.0)  # spread the routing
    return model


@pytest.mark.parametrize("router", ["softmax_topk", "sigmoid_topk", "expert_choice"])
def test_statistics_match_the_model_and_plain_loops(router):
    model = tiny_moe(router=router, **({"capacity_factor": 1.0} if router == "expert_choice" else {}))
    ids = torch.randint(0, 64, (5 * 16,), generator=torch.Generator().manual_seed(0))
    layers = collect_routing(model, ids, context=16, batch_size=2, capacity_factors=[0.5, 1.0])
    assert [s.layer for s in layers] == [1, 2]

    # counts: the model's own per-layer counts, summed over the same forward passes
    counts = {i: torch.zeros(6, dtype=torch.long) for i in (1, 2)}
    sequences = ids.view(5, 16)
    captured = []
    hook = model.blocks[1].ffn.router.register_forward_hook(lambda m, a, r: captured.append(r))
    with torch.no_grad():
        for start in range(0, 5, 2):
            out = model(sequences[start:start + 2])[1]
            for i in (1, 2):
                counts[i] += out.expert_counts[i]
    hook.remove()
    for s in layers:
        assert s.counts == counts[s.layer].tolist() and s.tokens == 80
    first = layers[0]

    # co-selection and entropy of layer 1: plain loops over each token's chosen experts and distribution
    chosen_sets, entropy = [], 0.0
    for routing in captured:
        if routing.expert_choice:
            per_token = [set() for _ in range(routing.probs_TE.shape[0])]
            for e, tokens in enumerate(routing.ids.tolist()):
                for t in tokens:
                    per_token[t].add(e)
            chosen_sets += per_token
        else:
            chosen_sets += [set(row) for row in routing.ids.tolist()]
        for p in routing.probs_TE.tolist():
            entropy -= sum(x * math.log(x) for x in p if x > 0)
    for a in range(6):
        for b in range(6):
            assert first.coselection[a][b] == sum(1 for c in chosen_sets if a in c and b in c)
    assert first.entropy == pytest.approx(entropy / 80)
    assert first.share == pytest.approx([c / sum(first.counts) for c in first.counts])

    if router == "expert_choice":
        assert first.dropped == {0.5: None, 1.0: None}
        return
    # drops at a capacity factor: what the layer itself drops when given that capacity
    for cf in (0.5, 1.0):
        capped = tiny_moe(router=router, capacity_factor=cf)
        dropped = 0
        with torch.no_grad():
            for start in range(0, 5, 2):
                dropped += capped(sequences[start:start + 2])[1].dropped_tokens[1]
        assert first.dropped[cf] == dropped > 0


def test_idle_expert_is_reported():
    model = tiny_moe(router_bias=True)
    with torch.no_grad():
        model.blocks[1].ffn.router.bias[5] = -1e4  # expert 5 never wins
    ids = torch.randint(0, 64, (64,), generator=torch.Generator().manual_seed(1))
    layers = collect_routing(model, ids, context=32, batch_size=4, capacity_factors=[1.0])
    assert 5 in layers[0].idle_experts and layers[0].counts[5] == 0


def test_cli_on_an_imported_checkpoint_writes_tables_json_and_heatmaps(tmp_path, capsys):
    build("olmoe", tmp_path / "hf")
    assert main(["hf", "import", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    (tmp_path / "tale.txt").write_text(TEXT)
    capsys.readouterr()
    code = main(["analyze", "routing", "--ckpt", str(tmp_path / "run"), "--text", str(tmp_path / "tale.txt"),
                 "--context", "32", "--capacity-factor", "1.0", "1.5", "--out", str(tmp_path / "routing")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "max/mean load" in printed and "dropped @ cf 1.5" in printed
    report = json.loads((tmp_path / "routing" / "routing.json").read_text())
    tokens = len([c for c in TEXT if c in CHARS]) // 32 * 32
    assert report["tokens"] == tokens and [layer["layer"] for layer in report["layers"]] == [0, 1]
    for layer in report["layers"]:
        assert sum(layer["counts"]) == tokens * 3 and len(layer["coselection"]) == 8
        assert 0 < layer["entropy_over_log_e"] <= 1
    markdown = (tmp_path / "routing" / "routing.md").read_text()
    assert "| layer | experts | k |" in markdown and "![expert_load.png](expert_load.png)" in markdown
    for name in ("expert_load.png", "coselection_layer0.png", "coselection_layer1.png"):
        assert (tmp_path / "routing" / name).read_bytes()[:4] == b"\x89PNG"
    assert not list((tmp_path / "routing").glob(".*.tmp"))


def test_cli_refuses_a_dense_model_and_bad_flags(tmp_path, capsys):
    build("llama", tmp_path / "hf")
    assert main(["hf", "import", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    (tmp_path / "t.txt").write_text("abc")
    capsys.readouterr()
    assert main(["analyze", "routing", "--ckpt", str(tmp_path / "run"), "--text", str(tmp_path / "t.txt")]) != 0
    assert "holds a dense model: it has no MoE layers" in capsys.readouterr().err
    assert main(["analyze", "routing", "--ckpt", str(tmp_path / "run"), "--text", str(tmp_path / "t.txt"),
                 "--capacity-factor", "0"]) != 0
    assert "--capacity-factor must be positive" in capsys.readouterr().err
