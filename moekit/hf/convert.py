"""Hugging Face checkpoints in and out: `from_hf`, `to_hf`, `upcycle`.

Import streams the checkpoint tensor by tensor into a model allocated once (built on the meta
device, then given uninitialised memory in the checkpoint's dtype), so peak memory stays near one
copy of the model. Export cuts the model back into the family's tensors, one shard at a time, after
checking that the family's config expresses the model exactly (config -> config.json -> config
gives the same model).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path

import torch

from moekit.config import config_dict
from moekit.hf import deepseek_v3, dense, gpt_oss, mixtral, olmoe, qwen_moe
from moekit.hf.checkpoint import (
    copy_tokenizer,
    iter_tensors,
    parse_size,
    read_config,
    save_model_folder,
    tensor_dtypes,
    weight_files,
    write_sharded,
)
from moekit.hf.common import Family, HFImportWarning, Options, Unsupported
from moekit.hf.mapping import Entry, expand
from moekit.io import atomic_write_json
from moekit.layers.config import MoEConfig
from moekit.models.transformer import Transformer, TransformerConfig

FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    mixtral.FAMILY, qwen_moe.QWEN2_MOE, qwen_moe.QWEN3_MOE, olmoe.FAMILY, gpt_oss.FAMILY, deepseek_v3.FAMILY,
    dense.LLAMA, dense.MISTRAL, dense.QWEN2, dense.QWEN3,
)}
MOE_FAMILIES = [name for name, f in FAMILIES.items() if f.moe]
DENSE_FAMILIES = [name for name, f in FAMILIES.items() if not f.moe]


def family_of(hf: dict, where: str = "config.json") -> Family:
    """The family of a config.json by its model_type; refuses a model_type moekit does not import."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise Unsupported(f"{where}: model_type={model_type!r} is not supported; moekit imports "
                          f"{', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def read_hf_config(folder: str | os.PathLike) -> tuple[Family, dict, TransformerConfig]:
    """(family, config.json, the moekit config) of a Hugging Face folder; refuses what moekit
    cannot reproduce exactly and warns about keys it did not read."""
    hf = read_config(folder)
    family = family_of(hf, f"{Path(folder) / 'config.json'}")
    options = Options(hf, family.model_type)
    try:
        config = family.config_from_hf(options)
    except Unsupported:
        raise
    except ValueError as error:  # a value moekit's own config checks refuse
        raise Unsupported(f"{Path(folder) / 'config.json'}: {error}") from None
    if options.unread():
        warnings.warn(f"{Path(folder) / 'config.json'}: moekit does not read {', '.join(options.unread())} "
                      f"(check that they do not change the {family.model_type} model)", HFImportWarning, stacklevel=3)
    return family, hf, config


def empty_model(config: TransformerConfig, dtype: torch.dtype, device: str | torch.device = "cpu") -> Transformer:
    """A Transformer with uninitialised weights in `dtype`: no time spent on an init that loading
    overwrites, and no second copy."""
    with torch.device("meta"):
        model = Transformer(config).to(dtype)
    model.to_empty(device=device)
    if config.tie_embeddings:  # to_empty gives each module its own tensor
        model.lm_head.weight = model.tok_emb.weight
    model.reset_rope()
    return model


def exported_keys(model: Transformer) -> list[str]:
    """State-dict keys that are model weights: not the tied LM head, not training state."""
    keys = [k for k in model.state_dict() if not k.endswith("tokens_per_expert")]
    if model.config.tie_embeddings:
        keys.remove("lm_head.weight")
    return keys


def num_experts(config: TransformerConfig) -> int:
    """Experts per MoE layer (0 for a dense model): how many per-expert tensors a rule expands to."""
    return config.moe.num_experts if config.moe is not None else 0


# --- import -----------------------------------------------------------------------------------


def from_hf(path: str | os.PathLike, dtype: torch.dtype | None = None,
            device: str | torch.device = "cpu") -> Transformer:
    """The Hugging Face checkpoint in folder `path` (config.json and safetensors, sharded or not) as a
    moekit `Transformer` in eval mode, with the same function. `dtype` None keeps the checkpoint's."""
    folder = Path(path)
    family, hf, config = read_hf_config(folder)
    files = weight_files(folder)
    dtypes = tensor_dtypes(files)
    if dtype is None:
        dtype = dtypes.get("model.embed_tokens.weight") or next(
            (d for d in dtypes.values() if d.is_floating_point), torch.float32)
    if not dtype.is_floating_point or dtype.itemsize < 2:
        raise Unsupported(f"{folder}: weights of dtype {dtype} (quantised?) are not supported; moekit imports "
                          f"float32, bfloat16 and float16")
    model = empty_model(config, dtype, device)
    entries = {e.hf: e for e in expand(exported_keys(model), family.rules(config, hf), num_experts(config),
                                       family.model_type)}
    load_streamed(model, entries, family, hf, files)
    return model.eval()


@torch.no_grad()
def load_streamed(model: Transformer, entries: dict[str, Entry], family: Family, hf: dict, files: list[Path]) -> None:
    """Copy each checkpoint tensor, as it is read, into its place in the model's tensors."""
    state = model.state_dict()
    done: set[str] = set()
    skipped: list[str] = []
    for name, tensor in iter_tensors(files):
        entry = entries.get(name)
        if entry is None:
            if name == "lm_head.weight" and model.config.tie_embeddings or name.endswith("rotary_emb.inv_freq"):
                continue
            if family.skip_tensor(name, hf):
                skipped.append(name)
                continue
            raise ValueError(f"checkpoint tensor {name} has no place in a moekit {family.model_type} model "
                             f"(does config.json match the weights?)")
        target = entry.region(state[entry.key])
        value = entry.from_hf(tensor)
        if value.shape != target.shape:
            raise ValueError(f"checkpoint tensor {name} has shape {tuple(tensor.shape)}; config.json implies "
                             f"{tuple(entry.to_hf(state[entry.key]).shape)}")
        target.copy_(value)
        done.add(name)
    missing = [name for name in entries if name not in done]
    if missing:
        more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ValueError(f"the checkpoint lacks {', '.join(missing[:3])}{more}")
    if skipped:
        layers = sorted({".".join(n.split(".")[:3]) for n in skipped})
        warnings.warn(f"left out the multi-token-prediction layer(s) {', '.join(layers)} ({len(skipped)} tensors): "
                      f"moekit imports the next-token model only", HFImportWarning, stacklevel=3)


def import_folder(path: str | os.PathLike, out: str | os.PathLike, dtype: torch.dtype | None = None) -> Transformer:
    """`moekit hf import`: the checkpoint as a moekit model folder `out` (config.json,
    model.safetensors) with the tokenizer files beside it; returns the model."""
    model = from_hf(path, dtype)
    save_model_folder(model, out)
    copy_tokenizer(path, out)
    return model


# --- export -----------------------------------------------------------------------------------

TRAINING_ONLY = ("dropout", "init_std", "moe.aux_loss_coef", "moe.seq_aux_loss_coef", "moe.z_loss_coef",
                 "moe.bias_update_rate", "moe.backend")


def canonical(config: TransformerConfig) -> dict:
    """What decides the model's function, each thing spelled one way: equal for two configs that
    compute the same (training-only settings dropped, defaults resolved, unused fields cleared)."""
    c = config_dict(config)
    moe_layers = [i for i in range(config.n_layer) if config.is_moe_layer(i)]
    dense_layers = config.n_layer - len(moe_layers)
    sliding = [i for i in range(config.n_layer) if config.window_of_layer(i) is not None]
    c.update(moe_layers=moe_layers, first_dense_layers=0, moe_every=1, sliding_window_layers=sliding,
             sliding_window=config.sliding_window if sliding else None, head_dim=config.attn_head_dim,
             qkv_bias=config.qkv_bias_on, attn_out_bias=config.attn_out_bias_on, n_kv_head=config.n_kv_head)
    if config.mla is not None:
        c.update(head_dim=None, n_kv_head=None)
    if not dense_layers:  # the dense FFN fields describe nothing
        c.update(d_ff=None, ffn_type=None, activation=None, bias=False)
    elif config.ffn_type != "mlp":
        c["activation"] = None
    if config.moe is not None and moe_layers:
        moe: MoEConfig = config.moe
        m = c["moe"]
        m.update(d_out=moe.output_width, selection_bias=moe.has_selection_bias)
        if moe.router == "topk_softmax" or (moe.router == "softmax_topk" and moe.normalize_topk and moe.top_k > 1):
            m.update(router="topk_softmax", normalize_topk=None)  # the same weights
        if moe.num_expert_groups == 1:
            m.update(topk_groups=None, group_score=None)
        if moe.num_shared_experts == 0:
            m.update(shared_d_ff=None, shared_expert_gate=None)
        elif m["shared_d_ff"] is None:
            m["shared_d_ff"] = moe.d_ff
        if moe.expert_type != "clamped_swiglu":
            m.update(swiglu_alpha=None, swiglu_limit=None)
        if moe.expert_type != "mlp":
            m["activation"] = None
    else:
        c["moe"] = None
    for dotted in TRAINING_ONLY:
        *parents, leaf = dotted.split(".")
        target = c
        for p in parents:
            target = target.get(p) or {}
        target.pop(leaf, None)
    return c


def differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """'key=a would become b' for every (dotted) key where two nested dicts differ."""
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += differences(x, y, f"{prefix}{key}.")
        elif x != y:
            out.append(f"{prefix}{key}={x!r} would become {y!r}")
    return out


def hf_config_for(config: TransformerConfig, family: Family) -> dict:
    """The family's config.json for `config`; raises naming the fields the family cannot hold."""
    try:
        hf = json.loads(json.dumps(family.config_to_hf(config)))
        back = family.config_from_hf(Options(hf, family.model_type))
    except (ValueError, TypeError, AttributeError, KeyError) as error:
        raise Unsupported(f"{family.model_type}: {error}") from None
    diff = differences(canonical(config), canonical(back))
    if diff:
        raise Unsupported(f"{family.model_type} cannot hold {'; '.join(diff[:3])}")
    return hf


def choose_family(config: TransformerConfig, family: str | None = None) -> tuple[Family, dict]:
    """The family (given, or the first that fits) and its config.json for `config`."""
    if family is not None:
        if family not in FAMILIES:
            raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
        return FAMILIES[family], hf_config_for(config, FAMILIES[family])
    is_moe = any(config.is_moe_layer(i) for i in range(config.n_layer))
    reasons = []
    for name in MOE_FAMILIES if is_moe else DENSE_FAMILIES:
        try:
            return FAMILIES[name], hf_config_for(config, FAMILIES[name])
        except Unsupported as why:
            reasons.append(str(why))
    raise Unsupported(f"no Hugging Face family expresses this model exactly: {' | '.join(reasons)}")


def special_token_ids(folder: str | os.PathLike | None) -> dict:
    """bos/eos/pad token ids from the generation_config.json an import copied, else None (rather
    than the family class's defaults, which belong to another vocabulary)."""
    ids = dict.fromkeys(("bos_token_id", "eos_token_id", "pad_token_id"))
    path = Path(folder) / "generation_config.json" if folder is not None else None
    if path is not None and path.is_file():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from None
        ids.update({k: saved[k] for k in ids if saved.get(k) is not None})
    return ids


def to_hf(model: Transformer, folder: str | os.PathLike, family: str | None = None,
          tokenizer_from: str | os.PathLike | None = None, max_shard_size: str | int = "5GB") -> Path:
    """Write `model` as a Hugging Face checkpoint folder that transformers loads with the family's own
    classes: config.json, safetensors shards (with an index when more than one) and, from folder
    `tokenizer_from`, the tokenizer files. `family` None picks the first family that holds the
    model exactly."""
    config = model.config
    chosen, hf = choose_family(config, family)
    hf["dtype"] = hf["torch_dtype"] = str(model.tok_emb.weight.dtype).removeprefix("torch.")  # transformers 5, 4
    hf.update(special_token_ids(tokenizer_from))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    entries = expand(exported_keys(model), chosen.rules(config, hf), num_experts(config), chosen.model_type)
    # clone(): a region of a fused tensor shares its storage, which safetensors refuses.
    write_sharded(((e.hf, e.to_hf(state[e.key]).clone()) for e in entries), folder, parse_size(max_shard_size))
    atomic_write_json(folder / "config.json", hf)
    if tokenizer_from is not None:
        copied = copy_tokenizer(tokenizer_from, folder)
        if "tokenizer.json" in copied and "tokenizer_config.json" not in copied:
            atomic_write_json(folder / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast"})
    return folder


# --- sparse upcycling -------------------------------------------------------------------------


@torch.no_grad()
def upcycle(dense_model: Transformer, num_experts: int, top_k: int, seed: int = 0) -> Transformer:
    """Sparse upcycling (Komatsuzaki et al. 2022): the dense model with every FFN replaced by an MoE
    of `num_experts` copies of it and a new router (N(0, init_std), seeded). The chosen experts'
    weights sum to 1 (softmax over the chosen logits), so at initialisation every MoE layer computes
    its FFN exactly and the logits equal the dense model's."""
    cfg = dense_model.config
    if cfg.moe is not None:
        raise ValueError("the model already has MoE layers; upcycling starts from a dense model")
    moe = MoEConfig(d_model=cfg.d_model, d_ff=cfg.d_ff, num_experts=num_experts, top_k=top_k, router="topk_softmax",
                    expert_type=cfg.ffn_type, activation=cfg.activation, expert_bias=cfg.bias)
    config = dataclasses.replace(cfg, moe=moe, moe_layers=None, moe_every=1, first_dense_layers=0)
    weight = dense_model.tok_emb.weight
    model = empty_model(config, weight.dtype, weight.device)
    target = model.state_dict()
    generator = torch.Generator().manual_seed(seed)
    for key, value in dense_model.state_dict().items():
        parts = key.split(".")
        if len(parts) > 3 and parts[2] == "ffn":  # blocks.{i}.ffn.w_in.weight -> every expert's w_in
            i, name, kind = parts[1], parts[3], parts[4]
            experts = f"blocks.{i}.ffn.experts.{'w' if kind == 'weight' else 'b'}_{name[2:]}"
            target[experts].copy_(value.unsqueeze(0).expand_as(target[experts]))
        else:
            target[key].copy_(value)
    for i in range(config.n_layer):
        router = target[f"blocks.{i}.ffn.router.weight"]
        router.copy_(torch.randn(router.shape, generator=generator) * cfg.init_std)
    return model.eval()


def upcycle_folder(path: str | os.PathLike, out: str | os.PathLike, num_experts: int, top_k: int,
                   seed: int = 0) -> Transformer:
    """`moekit hf upcycle`: a dense Hugging Face checkpoint -> an upcycled moekit model folder
    (with the tokenizer files); returns the upcycled model."""
    hf = read_config(path)
    if family_of(hf).moe:
        raise ValueError(f"{path} is a {hf['model_type']} MoE checkpoint; upcycling starts from a dense "
                         f"{', '.join(DENSE_FAMILIES)} checkpoint")
    model = upcycle(from_hf(path), num_experts, top_k, seed)
    save_model_folder(model, out)
    copy_tokenizer(path, out)
    return model
