"""`moekit train lm`, `moekit eval lm` and `moekit generate`, run in-process through the CLI."""

from __future__ import annotations

import math

import torch

from moekit.cli import main
from moekit.train.lm import load_run

TEXT = "".join(f"Enter {i}: speak, friend, and enter the hall of {i % 7} kings.\n" for i in range(200))


def test_train_eval_generate(tmp_path, capsys):
    src = tmp_path / "t.txt"
    src.write_text(TEXT)
    out = tmp_path / "run"
    args = ["train", "lm", f"data.path={src}", "model.d_model=16", "model.n_layer=1", "model.n_head=2",
            "model.block_size=16", "model.moe.num_experts=2", "model.moe.d_ff=8", "max_steps=3",
            "batch_size=2", "eval_interval=3", "eval_tokens=64", "final_eval_tokens=256",
            "tensorboard=false", "--no-progress", "--seed", "3", "--out", str(out)]
    assert main(["--no-malloc-tuning", *args]) == 0
    assert "val loss (nats/token)" in capsys.readouterr().out

    assert main(["eval", "lm", "--ckpt", str(out), "--max-tokens", "256"]) == 0
    report = dict(line.split("  ", 1) for line in capsys.readouterr().out.splitlines())
    loss = float(report["loss (nats/token)"].strip())
    assert math.isclose(float(report["perplexity"].strip()), math.exp(loss), rel_tol=1e-3)
    assert math.isclose(float(report["bits per byte"].strip()), loss / math.log(2), rel_tol=1e-3)  # bytes

    assert main(["generate", "--ckpt", str(out), "--prompt", "Enter", "--max-new-tokens", "8",
                 "--temperature", "0"]) == 0
    printed = capsys.readouterr().out
    loaded = load_run(out)
    model, tok = loaded.model, loaded.tokenizer
    seq = torch.tensor([tok.encode("Enter")])
    for _ in range(8):  # greedy reference without a KV cache
        seq = torch.cat((seq, model(seq)[0][:, -1].argmax(-1, keepdim=True)), dim=1)
    assert printed == tok.decode(seq[0].tolist()) + "\n"


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    assert main(["train", "lm", "model.n_layers=2", "--out", str(tmp_path / "x")]) == 2
    assert "unknown key(s) config.model.n_layers" in capsys.readouterr().err
    assert main(["generate", "--ckpt", str(tmp_path)]) == 2
    assert f"{tmp_path / 'config.json'} not found" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
