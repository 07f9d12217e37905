"""Every family against transformers itself: a tiny random checkpoint saved by transformers, imported
by moekit, gives the same logits (float32, 1e-5) and the same greedy continuation with the KV
cache; exported again, transformers loads it with its own classes and gives the same logits."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from moekit.cli import main
from moekit.hf import HFImportWarning, Unsupported, from_hf, to_hf
from moekit.models.transformer import Transformer
from tests.hf.tiny import DENSE_FAMILIES, MOE_FAMILIES, VOCAB, build


def hf_logits(model, idx):
    with torch.no_grad():
        return model(idx).logits


@pytest.fixture(scope="module", params=MOE_FAMILIES + DENSE_FAMILIES)
def checkpoint(request, tmp_path_factory):
    """(family, transformers model, its folder)."""
    folder = tmp_path_factory.mktemp(request.param)
    return request.param, build(request.param, folder), folder


def test_import_gives_the_same_logits(checkpoint):
    family, hf_model, folder = checkpoint
    with warnings.catch_warnings():
        warnings.simplefilter("error", HFImportWarning)  # every config key is read or known harmless
        model = from_hf(folder)
    assert model.tok_emb.weight.dtype == torch.float32
    idx = torch.randint(0, VOCAB, (3, 17), generator=torch.Generator().manual_seed(1))
    logits, _ = model(idx)
    torch.testing.assert_close(logits, hf_logits(hf_model, idx), rtol=1e-5, atol=1e-5)
    if model.moe_layers:  # the routing options were exercised: experts differ in load
        counts = model(idx)[1].expert_counts[model.moe_layers[-1]]
        assert (counts > 0).sum() > model.config.moe.top_k


def test_greedy_generation_with_kv_cache_matches_transformers(checkpoint):
    family, hf_model, folder = checkpoint
    model = from_hf(folder)
    prompt = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(2))
    ours = torch.stack(list(model.generate(prompt, 12, temperature=0)), dim=1)
    with torch.no_grad():
        theirs = hf_model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)[:, 5:]
    assert torch.equal(ours, theirs)


def test_export_loads_in_transformers_with_the_same_logits(checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    family, hf_model, folder = checkpoint
    model = from_hf(folder)
    out = to_hf(model, tmp_path / "hf", tokenizer_from=folder, max_shard_size="20KB")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == family
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # the source's ids, not the class defaults
        assert config[key] == getattr(hf_model.generation_config, key)
    assert (out / "model.safetensors.index.json").is_file()  # sharded
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded) is type(hf_model)
    idx = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(hf_logits(reloaded, idx), hf_logits(hf_model, idx), rtol=1e-5, atol=1e-5)
    assert AutoTokenizer.from_pretrained(out)("abc")["input_ids"] == [2, 3, 4]
    # ... and the sharded export imports back into the same model
    torch.testing.assert_close(from_hf(out)(idx)[0], model(idx)[0], rtol=0, atol=0)


def test_cli_import_writes_a_moekit_model_folder(checkpoint, tmp_path, capsys):
    from moekit.data.text import load_tokenizer

    family, hf_model, folder = checkpoint
    assert main(["hf", "import", str(folder), "--out", str(tmp_path / "run")]) == 0
    assert "wrote" in capsys.readouterr().out
    model = Transformer.from_pretrained(tmp_path / "run")
    idx = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(model(idx)[0], hf_logits(hf_model, idx), rtol=1e-5, atol=1e-5)
    tokenizer = load_tokenizer(tmp_path / "run")
    assert tokenizer.decode(tokenizer.encode("hello world")) == "hello world"
    assert main(["hf", "export", str(tmp_path / "run"), "--out", str(tmp_path / "back")]) == 0
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == family


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_bfloat16_checkpoint_stays_bfloat16(family, tmp_path):
    hf_model = build(family, tmp_path, dtype=torch.bfloat16)
    model = from_hf(tmp_path)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    if family == "deepseek_v3":  # the selection bias stays float32, as in transformers
        assert model.blocks[1].ffn.router.expert_bias.dtype == torch.float32
    idx = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(5))
    logits = model(idx)[0].float()
    reference = hf_logits(hf_model.float(), idx)  # the same bf16 weights, computed in float32
    assert (logits - reference).abs().max() < 0.1 * reference.abs().max()


def test_deepseek_without_query_bottleneck_and_interleave(tmp_path):
    hf_model = build("deepseek_v3", tmp_path, q_lora_rank=None, rope_interleave=False)
    idx = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(from_hf(tmp_path)(idx)[0], hf_logits(hf_model, idx), rtol=1e-5, atol=1e-5)


def test_multi_token_prediction_layer_is_left_out_with_a_warning(tmp_path):
    from safetensors.torch import load_file, save_file

    build("deepseek_v3", tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.2.eh_proj.weight"] = torch.randn(32, 64)  # MTP layer = num_hidden_layers
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.warns(HFImportWarning, match=r"left out the multi-token-prediction layer\(s\) model.layers.2"):
        from_hf(tmp_path)


def edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("family, changes, message", [
    ("mixtral", dict(quantization_config={"quant_method": "mxfp4"}),
     "option quantization_config (quant_method='mxfp4') is not supported"),
    ("mixtral", dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}),
     "option rope_parameters.rope_type='dynamic' is not supported for mixtral"),
    ("mixtral", dict(hidden_act="gelu"), "option hidden_act='gelu' is not supported for mixtral"),
    ("qwen3_moe", dict(partial_rotary_factor=0.5), "option partial_rotary_factor=0.5 is not supported"),
    ("deepseek_v3", dict(scoring_func="softmax"), "option scoring_func='softmax' is not supported for deepseek_v3"),
    ("gpt_oss", dict(layer_types=["sliding_attention", "chunked_attention"]), "option layer_types="),
    ("mixtral", dict(model_type="jamba"), "model_type='jamba' is not supported"),
    ("mixtral", dict(num_local_experts=None), "config.json has no 'num_local_experts'"),
])
def test_unsupported_option_is_refused_in_one_line(family, changes, message, tmp_path, capsys):
    build(family, tmp_path)
    edit_config(tmp_path, **changes)
    with pytest.raises(Unsupported) as info:
        from_hf(tmp_path)
    assert message in str(info.value) and "\n" not in str(info.value)
    capsys.readouterr()
    assert main(["hf", "import", str(tmp_path), "--out", str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err
    assert not (tmp_path / "out").exists()


def test_unknown_config_key_is_reported(tmp_path):
    build("olmoe", tmp_path)
    edit_config(tmp_path, new_fancy_option=3)
    with pytest.warns(HFImportWarning, match="moekit does not read new_fancy_option"):
        from_hf(tmp_path)


def test_weights_that_do_not_match_the_config_are_named(tmp_path):
    build("mixtral", tmp_path)
    edit_config(tmp_path, intermediate_size=20)
    with pytest.raises(ValueError, match=r"checkpoint tensor model.layers.0.block_sparse_moe.experts.0.w\d.weight "
                                         r"has shape \((24, 32|32, 24)\); config.json implies"):
        from_hf(tmp_path)


def test_export_refuses_a_model_no_family_expresses(tmp_path):
    from moekit import MoEConfig
    from moekit.models.transformer import TransformerConfig

    config = TransformerConfig(vocab_size=VOCAB, d_model=16, n_head=2, moe=MoEConfig(d_model=16, d_ff=8,
                                                                                     expert_type="mlp"))
    with pytest.raises(Unsupported, match="no Hugging Face family expresses this model exactly"):
        to_hf(Transformer(config), tmp_path)
    with pytest.raises(Unsupported, match=r"mixtral cannot hold .*moe.expert_type='mlp' would become 'swiglu'"):
        to_hf(Transformer(config), tmp_path, family="mixtral")


def test_a_moekit_trained_model_exports_to_the_first_family_that_holds_it(tmp_path):
    from transformers import AutoModelForCausalLM

    from moekit import MoEConfig
    from moekit.models.transformer import TransformerConfig

    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=VOCAB, block_size=32, n_layer=3, d_model=16, n_head=2,
                               moe=MoEConfig(d_model=16, d_ff=8, num_experts=4, top_k=2, aux_loss_coef=0.01))
    model = Transformer(config).eval()
    out = to_hf(model, tmp_path)
    assert json.loads((out / "config.json").read_text())["model_type"] == "mixtral"  # tied embeddings too
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    idx = torch.randint(0, VOCAB, (2, 10))
    torch.testing.assert_close(hf_logits(reloaded, idx), model(idx)[0], rtol=1e-5, atol=1e-5)


def test_export_family_names_in_the_cli_match_the_library():
    from moekit.commands.hf_export import FAMILIES as CLI_FAMILIES
    from moekit.hf import FAMILIES

    assert list(CLI_FAMILIES) == list(FAMILIES)
