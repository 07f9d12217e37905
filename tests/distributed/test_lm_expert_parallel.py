"""`train lm --expert-parallel 2` on 2 gloo processes vs `fit` on one process.

A tiny MoE transformer (2 layers, 4 experts, top-2, aux loss, loss-free bias update, AdamW with
warm-up, cosine schedule and gradient clipping) trains 4 steps on a small synthetic text. The
per-step losses, gradient norms and the final validation loss must agree at 1e-5; a run stopped at
step 2 and resumed from its expert-parallel checkpoint must continue identically; the merged
checkpoint must load into the single-device model and give its validation loss.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import torch

from moekit import MoEConfig
from moekit.distributed.launch import spawn
from moekit.models.transformer import Transformer, TransformerConfig
from moekit.train.lm import LMConfig, LMDataConfig, LMTrainSettings, build_data, evaluate, fit


def _config(text: Path) -> LMConfig:
    moe = MoEConfig(16, 16, num_experts=4, top_k=2, aux_loss_coef=0.01, bias_update_rate=0.01)
    model = TransformerConfig(vocab_size=256, block_size=16, n_layer=2, n_head=2, d_model=16, moe=moe)
    train = LMTrainSettings(seed=3, device="cpu", dtype="float32", threads=1, batch_size=4, max_steps=4, lr=1e-2,
                            warmup_steps=1, grad_clip=0.05, log_interval=1, eval_interval=100, eval_tokens=256,
                            final_eval_tokens=512, checkpoint_interval=2, tensorboard=False, progress=False)
    return LMConfig(model=model, data=LMDataConfig(path=str(text)), train=train)


def _worker(rank: int, world: int, folder: str) -> None:
    from moekit.train.lm_parallel import ExpertParallel

    folder = Path(folder)
    config = _config(folder / "text.txt")
    fit(config, folder / "ep", parallelism=ExpertParallel(2))
    fit(config, folder / "ep_resumed", parallelism=ExpertParallel(2), stop_at_step=2)
    fit(config, folder / "ep_resumed", parallelism=ExpertParallel(2), mode="resume")


def _metrics(run: Path) -> dict[str, torch.Tensor]:
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {key: torch.tensor([float(r[key]) for r in rows], dtype=torch.float64)
            for key in ("step", "loss", "lm_loss", "aux_loss", "grad_norm")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lm_ep")
    rng = random.Random(0)
    words = ["to", "be", "or", "not", "the", "king", "shall", "die", "love", "night", "and", "we"]
    (folder / "text.txt").write_text(" ".join(rng.choice(words) for _ in range(3000)))
    spawn(_worker, 2, str(folder), threads=1, start_method="fork")
    fit(_config(folder / "text.txt"), folder / "single")
    return folder


def _close(actual, expected, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{what}: {m}")


def test_expert_parallel_run_matches_single_process(runs: Path) -> None:
    single, ep = _metrics(runs / "single"), _metrics(runs / "ep")
    assert single["step"].tolist() == [1, 2, 3, 4]
    assert (single["grad_norm"] > 0.05).all()  # clipping is active, so the global norm matters
    for key in ("loss", "lm_loss", "aux_loss", "grad_norm"):
        _close(ep[key], single[key], key)
    val = [json.loads((runs / run / "results.json").read_text())["test"]["val_loss"] for run in ("ep", "single")]
    _close(torch.tensor(val[0]), torch.tensor(val[1]), "final validation loss")


def test_resumed_run_continues_exactly(runs: Path) -> None:
    full, resumed = _metrics(runs / "ep"), _metrics(runs / "ep_resumed")
    assert resumed["step"].tolist() == [1, 2, 3, 4]
    for key in ("loss", "grad_norm"):
        _close(resumed[key], full[key], key)


def test_merged_checkpoint_evaluates_on_one_device(runs: Path, tmp_path: Path, capsys) -> None:
    from moekit.cli import main
    from moekit.train.checkpoint import find_checkpoint, load_model_weights

    latest = json.loads((runs / "ep" / "checkpoints" / "latest_ep.json").read_text())
    assert main(["checkpoint", "merge", "--input", str(runs / "ep" / "checkpoints" / latest["dir"]),
                 "--output", str(tmp_path / "merged")]) == 0
    config = _config(runs / "text.txt")
    model = Transformer(config.model)
    load_model_weights(find_checkpoint(tmp_path / "merged"), model)
    loss, _ = evaluate(model, build_data(config, tmp_path), 16, 4, 512)
    expected = json.loads((runs / "ep" / "results.json").read_text())["test"]["val_loss"]
    _close(torch.tensor(loss), torch.tensor(expected), "merged model's validation loss")
    # The run folder holds the merged model too, and the merged folder is one `moekit eval lm` reads as it is.
    merged_at_end = Transformer(config.model)
    load_model_weights(runs / "ep", merged_at_end)
    for key, value in model.state_dict().items():
        assert torch.equal(merged_at_end.state_dict()[key], value), key
    capsys.readouterr()
    assert main(["eval", "lm", "--ckpt", str(tmp_path / "merged"), "--max-tokens", "512"]) == 0
    printed = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("loss"))
    assert abs(float(printed.split()[-1]) - expected) < 1e-4, printed
