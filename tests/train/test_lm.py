"""The LM trainer: exact resume, checkpoints (round trip, corrupt, mismatched), NaN stop, configs."""

from __future__ import annotations

import csv
import math

import pytest
import torch

import moekit.train.lm as lm
from moekit.train.checkpoint import find_checkpoint, load_model_weights, load_trainer_state, save_checkpoint
from moekit.train.lm import LMTrainConfig, load_lm_config, lr_at, train_lm
from moekit.train.reproducibility import NonFiniteLossError

TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * i % 97}.\n" for i in range(300))


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def tiny_config(text_file, out_dir, **overrides) -> LMTrainConfig:
    items = [f"data.path={text_file}", f"out_dir={out_dir}", "model.d_model=16", "model.n_layer=2",
             "model.n_head=2", "model.block_size=16", "model.d_ff=32", "model.moe.num_experts=4",
             "model.moe.top_k=2", "model.moe.d_ff=16", "model.moe.aux_loss_coef=0.01",
             "model.moe.bias_update_rate=0.01", "model.dropout=0.1", "batch_size=4", "grad_accum=2",
             "max_steps=6", "warmup_steps=2", "eval_interval=3", "eval_tokens=256", "final_eval_tokens=512",
             "log_interval=1", "checkpoint_interval=2", "tensorboard=false", "progress=false", "threads=1"]
    items += [f"{k}={v}" for k, v in overrides.items()]
    return load_lm_config(None, items)


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_resume_reproduces_the_uninterrupted_run(tmp_path, text_file):
    full = train_lm(tiny_config(text_file, tmp_path / "full"))
    split_cfg = tiny_config(text_file, tmp_path / "split")
    train_lm(split_cfg, stop_at_step=3)
    resumed = train_lm(split_cfg, resume=True)

    full_rows = read_rows(tmp_path / "full/metrics.csv")
    split_rows = read_rows(tmp_path / "split/metrics.csv")
    assert [r["step"] for r in split_rows] == [str(s) for s in range(1, 7)]
    for a, b in zip(full_rows, split_rows, strict=True):
        for key in ("loss", "lm_loss", "aux_loss", "grad_norm", "val_loss", "lr", "tokens"):
            assert a[key] == b[key], (a["step"], key)  # bit-exact, not approximately equal
    assert resumed.val_loss == full.val_loss
    a = lm.load_trained_lm(str(tmp_path / "full"), "cpu")[0].state_dict()
    b = lm.load_trained_lm(str(tmp_path / "split"), "cpu")[0].state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # The loss-free expert bias moved (the optimizer hook ran) and travelled through the checkpoint.
    assert a["blocks.0.ffn.router.expert_bias"].abs().sum() > 0


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    rng = {"rng.torch": torch.get_rng_state()}
    for step in (1, 2, 3):
        files = {"config.json": {"a": 1}}
        save_checkpoint(tmp_path, step, model, optimizer, {"tokens": 7 * step}, rng, files)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_0000002", "step_0000003"]  # keep=2
    ckpt = find_checkpoint(tmp_path)
    assert ckpt.name == "step_0000003"

    clone = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    clone_opt = torch.optim.AdamW(clone.parameters(), lr=0.5)
    load_model_weights(ckpt, clone)
    state, tensors = load_trainer_state(ckpt, clone_opt)
    assert state["step"] == 3 and state["tokens"] == 21
    assert torch.equal(tensors["rng.torch"], rng["rng.torch"])
    for p, q in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(p, q)
    original, loaded = optimizer.state_dict(), clone_opt.state_dict()
    assert loaded["param_groups"][0]["lr"] == 0.1
    for idx, per_param in original["state"].items():
        for key, value in per_param.items():
            assert torch.equal(loaded["state"][idx][key], value)


def test_corrupt_and_mismatched_checkpoints_give_clear_errors(tmp_path, text_file):
    cfg = tiny_config(text_file, tmp_path / "run", max_steps=2)
    train_lm(cfg)
    ckpt = find_checkpoint(tmp_path / "run")

    bigger = tiny_config(text_file, tmp_path / "run", **{"model.d_model": 32})
    with pytest.raises(ValueError, match="config differs in model.d_model"):
        train_lm(bigger, resume=True)
    other_model = lm.build_model(bigger.model, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"does not match the model: shape mismatch tok_emb.weight"):
        load_model_weights(ckpt, other_model)

    (ckpt / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"model.safetensors is corrupt"):
        train_lm(cfg, resume=True)
    (ckpt / "trainer_state.json").write_text("{ truncated")
    with pytest.raises(ValueError, match=r"trainer_state.json is corrupt"):
        load_trainer_state(ckpt)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        find_checkpoint(tmp_path / "nowhere")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, text_file, monkeypatch):
    build = lm.build_model

    def build_poisoned(config, device):
        model = build(config, device)
        forward, calls = model.forward, {"n": 0}

        def poisoned(idx, targets=None, cache=None):
            logits, out = forward(idx, targets, cache)
            if model.training:
                calls["n"] += 1
                if calls["n"] > 2 * 3:  # grad_accum=2: the 4th optimizer step sees NaN
                    out.loss = out.loss * float("nan")
            return logits, out

        model.forward = poisoned
        return model

    monkeypatch.setattr(lm, "build_model", build_poisoned)
    cfg = tiny_config(text_file, tmp_path / "run")
    kept = r"at step 4; the last good checkpoint is kept at .*step_0+2"
    with pytest.raises(NonFiniteLossError, match=kept):
        train_lm(cfg)
    ckpt = find_checkpoint(tmp_path / "run")
    assert ckpt.name == "step_0000002"
    monkeypatch.setattr(lm, "build_model", build)
    model = lm.load_trained_lm(str(ckpt), "cpu")[0]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_lr_schedule_is_warmup_then_cosine():
    cfg = LMTrainConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, cfg) == pytest.approx(0.1)


def test_config_file_and_overrides_are_type_checked(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {d_model: 32, n_head: 4, moe: {num_experts: 4, d_ff: 16}}\nlr: 0.001\n")
    cfg = load_lm_config(path, ["lr=1e-3", "model.moe.top_k=1", "batch_size=8"])
    assert cfg.lr == 0.001 and cfg.batch_size == 8
    assert cfg.model.moe.d_model == 32 and cfg.model.moe.top_k == 1
    assert load_lm_config(path, ["model.moe=null"]).model.moe is None
    with pytest.raises(ValueError, match=r"unknown key\(s\) config.model.n_layers"):
        load_lm_config(path, ["model.n_layers=3"])
    with pytest.raises(ValueError, match="config.batch_size must be an integer"):
        load_lm_config(path, ["batch_size=eight"])
    with pytest.raises(ValueError, match="must look like key=value"):
        load_lm_config(path, ["batch_size"])
    with pytest.raises(ValueError, match="top_k=9 > num_experts=4"):
        load_lm_config(path, ["model.moe.top_k=9"])
