"""The multi-task training loop: losses by formula, determinism, checkpoints, the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from moekit.cli import main
from moekit.config import ConfigError
from moekit.data.tabular import FeatureSpec, MultiTaskData
from moekit.models.multitask import MultiTaskModel, MultiTaskOptions
from moekit.train.metrics import roc_auc
from moekit.train.mtl import (
    MTLConfig,
    MTLTrainSettings,
    UncertaintyWeighting,
    evaluate,
    fit,
    task_losses,
)


def synthetic(n: int = 600, seed: int = 0) -> MultiTaskData:
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

    return MultiTaskData(train=part(0, n // 2), valid=part(n // 2, 3 * n // 4), test=part(3 * n // 4, n),
                         spec=spec, tasks=("a", "b"), task_types=("binary", "binary"), name="synthetic",
                         protocol="synthetic")


def small(model: str = "mmoe", **kw) -> MTLConfig:
    options = MultiTaskOptions(architecture=model, embed_dim=2, num_experts=3, expert_hidden=8, expert_dim=4,
                               tower_widths=(4,), num_specific_experts=1, num_shared_experts=2, num_levels=1)
    base = dict(epochs=10, patience=10, batch_size=64, lr=1e-2, progress=False)
    return MTLConfig(model=options, train=MTLTrainSettings(**(base | kw)))


def quiet(message: str) -> None:
    pass


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
    result = fit(small(model=model), data=synthetic(), log=quiet)
    # Chance is 0.5; task a is a function of the category (AUC 1 reachable), b of a noisy numeric.
    assert result.test["a/auc"] > 0.9 and result.test["b/auc"] > 0.85, result.test
    if model != "shared_bottom":
        for weights in result.extra["gates"].values():
            assert math.isclose(sum(weights), 1.0, rel_tol=1e-5)


def test_same_seed_same_numbers_and_run_folder_round_trip(tmp_path):
    data = synthetic()
    first = fit(small(model="ple", loss_weighting="uncertainty"), tmp_path / "run", data=data, log=quiet)
    second = fit(small(model="ple", loss_weighting="uncertainty"), data=data, log=quiet)
    assert first.test == second.test
    saved = json.loads((tmp_path / "run/results.json").read_text())
    assert saved["test"] == pytest.approx(first.test)
    model = MultiTaskModel.from_pretrained(tmp_path / "run")
    assert FeatureSpec.from_dict(json.loads((tmp_path / "run/feature_spec.json").read_text())) == data.spec
    out = model(data.test.cat_NC, data.test.num_NF)
    auc = roc_auc(data.test.labels_NT[:, 0].numpy(), out.logits["a"].detach().numpy())
    assert auc == pytest.approx(first.test["a/auc"])
    assert evaluate(model, data.test) == first.test


def test_resume_continues_exactly(tmp_path):
    data = synthetic()
    full = fit(small(epochs=6, patience=6), tmp_path / "full", data=data, log=quiet)
    fit(small(epochs=3, patience=6), tmp_path / "part", data=data, log=quiet)
    # A longer schedule is a changed config: refused, the run untouched.
    with pytest.raises(ConfigError, match="train.epochs"):
        fit(small(epochs=6, patience=6), tmp_path / "part", mode="resume", data=data, log=quiet)
    config = json.loads((tmp_path / "part/config.json").read_text())
    config["train"]["epochs"] = 6  # as if the first session had been asked for 6 epochs and stopped at 3
    (tmp_path / "part/config.json").write_text(json.dumps(config))
    resumed = fit(small(epochs=6, patience=6), tmp_path / "part", mode="resume", data=data, log=quiet)
    assert resumed.test == full.test
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in full.history]


def test_regression_task_beats_the_mean_and_a_one_class_validation_split_falls_back(capsys):
    rng = np.random.default_rng(1)
    n = 800
    x = rng.normal(size=n)
    y = (2 * x + 0.1 * rng.normal(size=n)).astype(np.float32)
    one_class = np.zeros(n, dtype=np.float32)
    spec = FeatureSpec.fit({"x": x[: n // 2]}, [], ["x"])

    def part(lo, hi):
        batch = spec.transform({"x": x[lo:hi]})
        batch.labels_NT = torch.from_numpy(np.stack([y[lo:hi], one_class[lo:hi]], 1))
        return batch

    data = MultiTaskData(part(0, 400), part(400, 600), part(600, 800), spec, ("y", "flag"),
                         ("regression", "binary"), "synthetic", "synthetic")
    messages = []
    result = fit(small(model="mmoe", epochs=15, patience=15), data=data, log=messages.append)
    assert any("AUC undefined" in m for m in messages)
    mean_rmse = float(np.sqrt(((y[600:] - y[:400].mean()) ** 2).mean()))
    assert result.test["y/rmse"] < 0.5 * mean_rmse and math.isnan(result.test["flag/auc"])


def test_bad_config_fails_clearly():
    with pytest.raises(ValueError, match="train.loss_weighting must be one of fixed, uncertainty"):
        MTLTrainSettings(loss_weighting="gradnorm")
    with pytest.raises(ValueError, match=r"task_weights names unknown task\(s\) \['c'\]"):
        fit(small(task_weights={"a": 1.0, "c": 1.0}), data=synthetic(), log=quiet)
    with pytest.raises(ValueError, match="train.epochs must be >= 1"):
        MTLTrainSettings(epochs=0)


def test_cli_trains_on_a_slice_of_census(shared_data, tmp_path, capsys):
    code = main(["train", "mtl", "--data-dir", str(shared_data / "census-income"), "--max-rows", "600",
                 "--epochs", "1", "--model", "mmoe", "--num-experts", "2", "--no-progress",
                 "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert code == 0
    assert "income/auc" in out and "± " not in out  # one seed: no spread to print
    assert (tmp_path / "run/gates.png").stat().st_size > 0 and (tmp_path / "run/results.json").is_file()
    assert main(["eval", "mtl", "--ckpt", str(tmp_path / "run")]) == 0
    evaluated = capsys.readouterr().out
    assert evaluated.count("= reported") == 4  # AUC and log-loss of both tasks, equal to results.json


def test_cli_missing_data_is_a_one_line_error(tmp_path, capsys):
    code = main(["train", "mtl", "--data-dir", str(tmp_path), "--no-progress", "--out", str(tmp_path / "run")])
    assert code == 2
    assert "moekit: error: census-income: none of census-income.test" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
