"""Sparse upcycling: a dense Llama / Qwen3 / Qwen2 / Mistral checkpoint becomes an MoE whose experts
are copies of each FFN; at initialisation its logits equal the dense model's (transformers')."""

from __future__ import annotations

import json

import pytest
import torch

from moekit.cli import main
from moekit.hf import from_hf, to_hf, upcycle
from moekit.models.transformer import Transformer
from tests.hf.tiny import DENSE_FAMILIES, VOCAB, build


def hf_logits(model, idx):
    with torch.no_grad():
        return model(idx).logits


@pytest.mark.parametrize("family", DENSE_FAMILIES)
@pytest.mark.parametrize("experts, top_k", [(4, 2), (3, 1)])
def test_upcycled_logits_equal_the_dense_model(family, experts, top_k, tmp_path):
    hf_model = build(family, tmp_path)
    dense = from_hf(tmp_path)
    moe = upcycle(dense, experts, top_k, seed=1)
    assert moe.moe_layers == list(range(dense.config.n_layer))
    block = moe.blocks[0].ffn
    for e in range(experts):
        assert torch.equal(block.experts.w_in[e], dense.blocks[0].ffn.w_in.weight)
        assert torch.equal(block.experts.w_out[e], dense.blocks[0].ffn.w_out.weight)
    idx = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
    logits, out = moe(idx)
    torch.testing.assert_close(logits, hf_logits(hf_model, idx), rtol=1e-5, atol=1e-5)
    assert all((counts > 0).sum() > 1 for counts in out.expert_counts.values())  # the router spreads tokens


def test_cli_upcycle_then_export_to_the_moe_family(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, MixtralForCausalLM

    hf_model = build("llama", tmp_path / "llama")
    code = main(["hf", "upcycle", str(tmp_path / "llama"), "--experts", "4", "--top-k", "2",
                 "--out", str(tmp_path / "moe")])
    assert code == 0 and "2 MoE layers of 4 experts (top-2)" in capsys.readouterr().out
    model = Transformer.from_pretrained(tmp_path / "moe")
    assert (tmp_path / "moe" / "tokenizer.json").is_file()
    idx = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(idx)[0], hf_logits(hf_model, idx), rtol=1e-5, atol=1e-5)
    # An upcycled Llama is a Mixtral (its llama3 RoPE and tied embeddings included).
    to_hf(model, tmp_path / "mixtral")
    assert json.loads((tmp_path / "mixtral" / "config.json").read_text())["model_type"] == "mixtral"
    mixtral = AutoModelForCausalLM.from_pretrained(tmp_path / "mixtral").eval()
    assert isinstance(mixtral, MixtralForCausalLM)
    torch.testing.assert_close(hf_logits(mixtral, idx), hf_logits(hf_model, idx), rtol=1e-5, atol=1e-5)


def test_upcycling_refuses_an_moe_checkpoint_and_bad_counts(tmp_path, capsys):
    build("mixtral", tmp_path)
    assert main(["hf", "upcycle", str(tmp_path), "--out", str(tmp_path / "x")]) != 0
    assert "is a mixtral MoE checkpoint; upcycling starts from a dense" in capsys.readouterr().err
    assert main(["hf", "upcycle", str(tmp_path), "--experts", "2", "--top-k", "3", "--out", str(tmp_path / "x")]) != 0
    assert "top_k=3 > num_experts=2" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
