"""The LM trainer: exact resume, checkpoints (round trip, corrupt, mismatched), the non-finite guard,
configs, the token cache."""

from __future__ import annotations

import csv
import math

import pytest
import torch

import moekit.train.lm as lm
from moekit.commands.shared import SECTIONS
from moekit.config import ConfigError, apply_overrides, build_dataclass, read_yaml
from moekit.train.checkpoint import find_checkpoint, load_model_weights, load_trainer_state, save_checkpoint
from moekit.train.lm import LMConfig, fit, load_run
from moekit.train.loop import NonFiniteError, cosine_lr

TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * i % 97}.\n" for i in range(300))


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def config(overrides: list[str], path=None) -> LMConfig:
    data = read_yaml(path) if path else {}
    return build_dataclass(LMConfig, apply_overrides(data, overrides, "train", SECTIONS), "config")


def tiny_config(text_file, **overrides) -> LMConfig:
    items = [f"data.path={text_file}", "model.d_model=16", "model.n_layer=2",
             "model.n_head=2", "model.block_size=16", "model.d_ff=32", "model.moe.num_experts=4",
             "model.moe.top_k=2", "model.moe.d_ff=16", "model.moe.aux_loss_coef=0.01",
             "model.moe.bias_update_rate=0.01", "model.dropout=0.1", "batch_size=4", "grad_accum=2",
             "max_steps=6", "warmup_steps=2", "eval_interval=3", "eval_tokens=256", "final_eval_tokens=512",
             "log_interval=1", "checkpoint_interval=2", "tensorboard=false", "progress=false", "threads=1"]
    items += [f"{k}={v}" for k, v in overrides.items()]
    return config(items)


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_resume_reproduces_the_uninterrupted_run(tmp_path, text_file):
    full = fit(tiny_config(text_file), tmp_path / "full")
    split_cfg = tiny_config(text_file)
    fit(split_cfg, tmp_path / "split", stop_at_step=3)
    assert not (tmp_path / "split/model.safetensors").exists()  # unfinished: only step checkpoints
    resumed = fit(split_cfg, tmp_path / "split", mode="resume")

    full_rows = read_rows(tmp_path / "full/metrics.csv")
    split_rows = read_rows(tmp_path / "split/metrics.csv")
    assert [r["step"] for r in split_rows] == [str(s) for s in range(1, 7)]
    for a, b in zip(full_rows, split_rows, strict=True):
        for key in ("loss", "lm_loss", "aux_loss", "grad_norm", "val_loss", "lr", "tokens"):
            assert a[key] == b[key], (a["step"], key)  # bit-exact, not approximately equal
    assert resumed.test == full.test
    a = load_run(tmp_path / "full").model.state_dict()
    b = load_run(tmp_path / "split").model.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # The loss-free expert bias moved (the optimizer hook ran) and travelled through the checkpoint.
    assert a["blocks.0.ffn.router.expert_bias"].abs().sum() > 0


def test_resume_refuses_a_changed_schedule(tmp_path, text_file):
    fit(tiny_config(text_file), tmp_path / "run", stop_at_step=2)
    with pytest.raises(ConfigError, match=r"config differs in train.lr \(0.002 -> 0.001\)"):
        fit(tiny_config(text_file, lr=1e-3), tmp_path / "run", mode="resume")
    with pytest.raises(ConfigError, match=r"config differs in model.d_model"):
        fit(tiny_config(text_file, **{"model.d_model": 32}), tmp_path / "run", mode="resume")
    # Runtime keys may change: progress, threads, log interval.
    fit(tiny_config(text_file, log_interval=2), tmp_path / "run", mode="resume")


def test_checkpoint_round_trip(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    folder = save_checkpoint(tmp_path / "checkpoints", 7, model, optimizer, {"tokens": 12},
                             {"rng": torch.arange(3)})
    assert folder.name == "step_0000007" and not list((tmp_path / "checkpoints").glob(".tmp_*"))
    assert find_checkpoint(tmp_path) == folder
    clone = torch.nn.Linear(3, 2)
    clone_opt = torch.optim.AdamW(clone.parameters(), lr=0.5)
    load_model_weights(folder, clone)
    state, tensors = load_trainer_state(folder, clone_opt)
    assert state["step"] == 7 and state["tokens"] == 12 and torch.equal(tensors["rng"], torch.arange(3))
    assert torch.equal(clone.weight, model.weight)
    original, loaded = optimizer.state_dict(), clone_opt.state_dict()
    assert loaded["param_groups"][0]["lr"] == 0.1
    for idx, per_param in original["state"].items():
        for key, value in per_param.items():
            assert torch.equal(loaded["state"][idx][key], value)


def test_corrupt_and_mismatched_checkpoints_give_clear_errors(tmp_path, text_file):
    cfg = tiny_config(text_file, max_steps=2)
    fit(cfg, tmp_path / "run")
    ckpt = find_checkpoint(tmp_path / "run/checkpoints")
    other_model = lm.Transformer(tiny_config(text_file, **{"model.d_model": 32}).model)
    with pytest.raises(ValueError, match=r"do not match the model: shape mismatch tok_emb.weight"):
        load_model_weights(ckpt, other_model)
    (ckpt / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"model.safetensors is corrupt"):
        fit(cfg, tmp_path / "run", mode="resume")
    (ckpt / "trainer_state.json").write_text("{ truncated")
    with pytest.raises(ValueError, match=r"trainer_state.json is corrupt"):
        load_trainer_state(ckpt)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        find_checkpoint(tmp_path / "nowhere")


def _poisoned(monkeypatch, what: str, after_steps: int):
    """Make the Transformer's training loss (what='loss') or one gradient (what='grad') NaN from
    optimizer step `after_steps + 1` on (grad_accum=2: two forwards per step)."""
    forward = lm.Transformer.forward
    calls = {"n": 0}

    def poisoned(self, idx, targets=None, cache=None):
        logits, out = forward(self, idx, targets, cache)
        if self.training:
            calls["n"] += 1
            if calls["n"] > 2 * after_steps:
                if what == "loss":
                    out.loss = out.loss * float("nan")
                else:  # a finite loss whose backward puts NaN into the embedding's gradient
                    hook = self.tok_emb.weight.register_hook(lambda g: g * float("nan"))
                    out.loss = out.loss + 0.0
                    calls.setdefault("hooks", []).append(hook)
        return logits, out

    monkeypatch.setattr(lm.Transformer, "forward", poisoned)


@pytest.mark.parametrize("what", ["loss", "grad"])
def test_non_finite_loss_or_gradient_stops_before_the_update_and_keeps_finite_checkpoints(
        tmp_path, text_file, monkeypatch, what):
    _poisoned(monkeypatch, what, after_steps=3)
    cfg = tiny_config(text_file)
    pattern = ("loss became nan" if what == "loss" else r"gradient norm became nan \(loss [0-9.]+\)") + \
        r" at step 4; stopped before the update; the last good checkpoint is .*step_0+2"
    with pytest.raises(NonFiniteError, match=pattern):
        fit(cfg, tmp_path / "run")
    monkeypatch.undo()
    kept = sorted((tmp_path / "run/checkpoints").glob("step_*"))
    assert [p.name for p in kept] == ["step_0000002"]
    for folder in kept:
        model = lm.Transformer(cfg.model)
        load_model_weights(folder, model)
        assert all(torch.isfinite(p).all() for p in model.state_dict().values())


def test_lr_schedule_is_warmup_then_cosine():
    assert cosine_lr(0, 1.0, 10, 110, 0.1) == pytest.approx(0.1)
    assert cosine_lr(9, 1.0, 10, 110, 0.1) == pytest.approx(1.0)
    assert cosine_lr(60, 1.0, 10, 110, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cosine_lr(110, 1.0, 10, 110, 0.1) == pytest.approx(0.1)


def test_config_file_and_overrides_are_type_checked(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {d_model: 32, n_head: 4, moe: {num_experts: 4, d_ff: 16}}\ntrain: {lr: 0.001}\n")
    cfg = config(["lr=1e-3", "model.moe.top_k=1", "train.batch_size=8"], path)
    assert cfg.train.lr == 0.001 and cfg.train.batch_size == 8
    assert cfg.model.moe.d_model == 32 and cfg.model.moe.top_k == 1
    assert config(["model.moe=null"], path).model.moe is None
    with pytest.raises(ValueError, match=r"unknown key\(s\) config.model.n_layers"):
        config(["model.n_layers=3"], path)
    with pytest.raises(ValueError, match="config.train.batch_size must be an integer"):
        config(["batch_size=eight"], path)
    with pytest.raises(ValueError, match="must look like key=value"):
        config(["batch_size"], path)
    with pytest.raises(ValueError, match="top_k=9 > num_experts=4"):
        config(["model.moe.top_k=9"], path)
    for bad, message in (("max_steps=0", "train.max_steps must be >= 1"), ("grad_clip=-1", "train.grad_clip"),
                         ("warmup_steps=-1", "train.warmup_steps must be >= 0"),
                         ("lr=.inf", "train.lr must be a finite number")):
        with pytest.raises(ConfigError, match=message):
            config([bad], path)


def test_token_cache_follows_the_content(tmp_path, capsys):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text(TEXT)
    cache = tmp_path / "cache"
    first = lm.prepare_text_data(folder, cache)
    assert len(first.train) + len(first.val) == len(TEXT)
    assert lm.prepare_text_data(folder, cache) is not None and "again" not in capsys.readouterr().err
    (folder / "b.txt").write_text("more text " * 50)  # a new file in the folder: the folder's size is unchanged
    second = lm.prepare_text_data(folder, cache)
    assert len(second.train) + len(second.val) == len(TEXT) + 500
    assert "tokenizing" in capsys.readouterr().err
    (folder / "b.txt").write_text("MORE TEXT " * 50)  # same size, other bytes
    third = lm.prepare_text_data(folder, cache)
    assert bytes(third.val[-10:].tolist()) == b"MORE TEXT "


def test_text_errors_name_the_file(tmp_path, text_file):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match=f"text data {empty} is empty"):
        lm.prepare_text_data(empty, tmp_path / "c1")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"abc\xff\xfe\x00")
    with pytest.raises(ValueError, match=f"text data {binary} is not UTF-8 text \\(byte 3"):
        lm.prepare_text_data(binary, tmp_path / "c2")
    short = tiny_config(text_file, **{"model.block_size": 2000, "model.n_head": 2})
    with pytest.raises(ConfigError, match="validation split .* has .* tokens, fewer than model.block_size"):
        fit(short, tmp_path / "run")
    assert not (tmp_path / "run/checkpoints").exists()
