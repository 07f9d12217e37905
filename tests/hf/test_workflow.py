"""The checkpoint workflow of the README through the CLI: import -> generate (the same greedy tokens as
transformers) -> fine-tune with `train lm --init` -> eval; upcycle -> train --init."""

from __future__ import annotations

import torch

from moekit.cli import main
from moekit.train.lm import load_run
from tests.hf.tiny import CHARS, build

TEXT = "".join(CHARS[(i * 7 + i // 5) % len(CHARS)] for i in range(6000))


def test_import_generate_finetune_eval(tmp_path, capsys):
    reference = build("qwen3_moe", tmp_path / "hf")
    assert main(["hf", "import", str(tmp_path / "hf"), "--out", str(tmp_path / "imported")]) == 0
    tokenizer = load_run(tmp_path / "imported").tokenizer
    prompt = CHARS[:5]
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(tmp_path / "imported"), "--prompt", prompt, "--max-new-tokens", "6",
                 "--temperature", "0"]) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    ids = torch.tensor([tokenizer.encode(prompt)])
    expected = reference.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:]
    assert printed == prompt + tokenizer.decode(expected.tolist())

    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    args = ["train", "lm", "--init", str(tmp_path / "imported"), "--data-dir", str(text), "--out",
            str(tmp_path / "tuned"), "train.max_steps=3", "train.batch_size=2", "train.eval_interval=3",
            "train.eval_tokens=128", "train.final_eval_tokens=256", "train.warmup_steps=1", "--no-progress",
            "model.block_size=32"]
    assert main(args) == 0
    tuned = load_run(tmp_path / "tuned")
    assert tuned.config.data.tokenizer == str((tmp_path / "imported").resolve())  # the imported tokenizer
    start = load_run(tmp_path / "imported").model.state_dict()
    moved = [k for k, v in tuned.model.state_dict().items() if not torch.equal(v, start[k])]
    assert moved  # it trained from the imported weights ...
    assert main(["eval", "lm", "--ckpt", str(tmp_path / "tuned"), "--max-tokens", "256"]) == 0
    assert "loss (nats/token)" in capsys.readouterr().out


def test_upcycle_then_continue_training(tmp_path, capsys):
    build("llama", tmp_path / "dense")
    assert main(["hf", "upcycle", str(tmp_path / "dense"), "--experts", "4", "--top-k", "2", "--out",
                 str(tmp_path / "moe")]) == 0
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    assert main(["train", "lm", "--init", str(tmp_path / "moe"), "--data-dir", str(text), "--out",
                 str(tmp_path / "run"), "train.max_steps=2", "train.batch_size=2", "train.eval_interval=2",
                 "train.eval_tokens=128", "train.final_eval_tokens=128", "train.warmup_steps=1", "--no-progress",
                 "model.block_size=32"]) == 0
    run = load_run(tmp_path / "run")
    assert run.model.config.moe.num_experts == 4 and run.model.moe_layers == [0, 1]
