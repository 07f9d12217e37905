"""The multi-task training loop: losses by formula, determinism, checkpoints, the CLI."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from moekit.cli import main
from moekit.data.tabular import FeatureSpec
from moekit.models.multitask import MultiTaskOptions
from moekit.train.mtl import (
    MTLTrainConfig,
    UncertaintyWeighting,
    load_checkpoint,
    task_losses,
    train_mtl,
)


def synthetic(n: int = 600, seed: int = 0):
    """Two learnable tasks: task a depends on the category, task b on the numeric value."""
    rng = np.random.default_rng(seed)
    color = rng.choice(["red", "green", "blue"], size=n)
    size = rng.normal(size=n)
    a = (color == "red").astype(np.float32)
    b = (size + 0.3 * rng.normal(size=n) > 0).astype(np.float32)
    spec = FeatureSpec.fit({"color": color[: n // 2], "size": size[: n // 2]}, ["color"], ["size"])

    def part(lo, hi):
        batch = spec.transform({"color": color[lo:hi], "size": size[lo:hi]})
        batch.labels_NT = torch.from_numpy(np.stack([a[lo:hi], b[lo:hi]], 1))
        return batch

    return SimpleNamespace(train=part(0, n // 2), valid=part(n // 2, 3 * n // 4), test=part(3 * n // 4, n),
                           spec=spec, tasks=("a", "b"), group=1, protocol="synthetic")


def small(model: str = "mmoe", **kw) -> MTLTrainConfig:
    options = MultiTaskOptions(architecture=model, embed_dim=2, num_experts=3, expert_hidden=8, expert_dim=4,
                               tower_widths=(4,), num_specific_experts=1, num_shared_experts=2, num_levels=1)
    base = dict(epochs=10, patience=10, batch_size=64, lr=1e-2, progress=False)
    return MTLTrainConfig(model=options, **(base | kw))


def test_task_losses_match_the_formulas():
    logits = {"a": torch.tensor([0.5, -1.0]), "b": torch.tensor([2.0, 0.0])}
    labels = torch.tensor([[1.0, 3.0], [0.0, 1.0]])
    losses = task_losses(logits, labels, {"a": "binary", "b": "regression"})
    bce = -(math.log(1 / (1 + math.exp(-0.5))) + math.log(1 - 1 / (1 + math.exp(1.0)))) / 2
    torch.testing.assert_close(losses, torch.tensor([bce, ((2 - 3) ** 2 + (0 - 1) ** 2) / 2]))


def test_uncertainty_weighting_matches_kendall_et_al():
    weighting = UncertaintyWeighting(("binary", "regression"))
    with torch.no_grad():
        weighting.log_var_T.copy_(torch.tensor([0.4, -0.2]))
    losses = torch.tensor([1.5, 2.0])
    expected = math.exp(-0.4) * 1.5 + 0.2 + 0.5 * math.exp(0.2) * 2.0 - 0.1
    torch.testing.assert_close(weighting(losses), torch.tensor(expected))


@pytest.mark.parametrize("model", ["shared_bottom", "omoe", "mmoe", "ple"])
def test_models_learn_the_synthetic_tasks(model):
    results = train_mtl(small(model=model), data=synthetic(), log=lambda m: None)
    auc = results["summary"]
    # Chance is 0.5; task a is a function of the category (AUC 1 reachable), b of a noisy numeric.
    assert auc["a"]["mean"] > 0.9 and auc["b"]["mean"] > 0.85, auc
    if model != "shared_bottom":
        for weights in results["gates"].values():
            assert math.isclose(sum(weights), 1.0, rel_tol=1e-5)


def test_same_seed_same_numbers_and_checkpoint_round_trip(tmp_path):
    data = synthetic()
    first = train_mtl(small(model="ple", seeds=2, out_dir=str(tmp_path), loss_weighting="uncertainty"),
                      data=data, log=lambda m: None)
    cfg = small(model="ple", seeds=2, loss_weighting="uncertainty")
    second = train_mtl(cfg, data=data, log=lambda m: None)
    assert [r["test_auc"] for r in first["runs"]] == [r["test_auc"] for r in second["runs"]]
    assert first["summary"]["a"]["std"] == pytest.approx(np.std(first["summary"]["a"]["values"], ddof=1))
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(first["summary"]))
    model, spec = load_checkpoint(tmp_path / "ple-group1-seed0.safetensors")
    assert spec == data.spec
    out = model(data.test.cat_NC, data.test.num_NF)
    from moekit.train.metrics import roc_auc

    auc = roc_auc(data.test.labels_NT[:, 0].numpy(), out.logits["a"].detach().numpy())
    assert auc == pytest.approx(first["runs"][0]["test_auc"]["a"])


def test_bad_config_fails_clearly():
    with pytest.raises(ValueError, match="loss_weighting must be one of"):
        MTLTrainConfig(loss_weighting="gradnorm")
    with pytest.raises(ValueError, match="task_weights has 3 entries"):
        train_mtl(small(task_weights=(1.0, 1.0, 1.0)), data=synthetic(), log=lambda m: None)


@pytest.mark.filterwarnings("ignore:census-income")
def test_cli_trains_on_a_slice_of_census(shared_data, tmp_path, capsys):
    code = main(["train", "mtl", "--data-dir", str(shared_data / "census-income"), "--max-rows", "600",
                 "--epochs", "1", "--model", "mmoe", "--num-experts", "2", "--no-progress",
                 "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert "test AUC: income" in out and "test-file-only fallback" in out
    assert (tmp_path / "gates.png").stat().st_size > 0 and (tmp_path / "metrics.json").is_file()


def test_cli_missing_data_is_a_one_line_error(tmp_path, capsys):
    code = main(["train", "mtl", "--data-dir", str(tmp_path), "--no-progress"])
    assert code == 1
    assert "moekit: error: census-income: none of census-income.test" in capsys.readouterr().err
