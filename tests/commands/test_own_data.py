"""Your own data end to end: a generated table trains a multi-task ranker (CLI and Python API), scores
new rows with `predict`, and every bad input is one line; a generated interaction log trains SASRec
and a two-tower (with a users file), and recommend / retrieve print the titles it came with; a rated log
with the same users file feeds the DQN's simulator."""

from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pandas as pd
import pytest

import moekit
from moekit.cli import main
from moekit.models.multitask import MultiTaskOptions
from moekit.train import dqn
from moekit.train.metrics import roc_auc
from moekit.train.mtl import MTLConfig, MTLDataConfig, MTLTrainSettings, fit, load_data

SMALL = ["--num-experts", "4", "--expert-hidden", "16", "--expert-dim", "8", "--tower-widths", "8",
         "--batch-size", "128", "--lr", "1e-2", "--epochs", "10", "--patience", "10", "--no-progress"]


def make_table(n: int = 3000, seed: int = 0) -> pd.DataFrame:
    """Two binary tasks on different features (click: country; purchase: age) and a regression task."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"row_id": [f"r{i}" for i in range(n)], "country": rng.choice(["fr", "de", "us", "jp"], n),
                          "age": rng.normal(40, 10, n).round(2), "device": rng.choice(["ios", "android"], n)})
    frame["click"] = (frame.country.isin(["fr", "de"]) ^ (rng.random(n) < 0.1)).astype(int)
    frame["purchase"] = ((frame.age > 40) ^ (rng.random(n) < 0.1)).astype(int)
    frame["spend"] = (frame.age * 2 + rng.normal(0, 1, n)).round(3)
    return frame


@pytest.fixture
def table(tmp_path):
    path = tmp_path / "train.csv"
    make_table().to_csv(path, index=False)
    return path


def test_cli_learns_both_tasks_and_predict_reproduces_the_evaluation(table, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "mtl", "--data", str(table), "--tasks", "click,purchase,spend", "--id-column", "row_id",
                 "--out", str(out), *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "categorical country, device; numeric age" in printed  # the inferred kinds are said
    run = moekit.load(out)
    results = json.loads((out / "results.json").read_text())["test"]
    assert results["click/auc"] > 0.85 and results["purchase/auc"] > 0.85  # chance is 0.5
    frame = pd.read_csv(table)
    mean_rmse = float(np.sqrt(((frame.spend - frame.spend.mean()) ** 2).mean()))
    assert results["spend/rmse"] < 0.2 * mean_rmse  # far better than predicting the mean

    assert main(["predict", "mtl", "--ckpt", str(out), "--data", str(table), "--out", str(tmp_path / "scores.csv"),
                 "--chunk-rows", "700", "--no-progress"]) == 0
    scores = pd.read_csv(tmp_path / "scores.csv")
    assert list(scores.columns) == ["row_id", "click", "purchase", "spend"] and len(scores) == len(frame)
    # The evaluation code path on the same rows: logits of the model on the spec-encoded file.
    from moekit.data.table import columns_of
    from moekit.train.mtl import predict_logits

    spec = run.feature_spec
    batch = spec.transform(columns_of(frame, spec.names, [f.name for f in spec.numeric], table))
    logits = predict_logits(run.model, batch)
    np.testing.assert_allclose(scores.click, 1 / (1 + np.exp(-logits["click"].double().numpy())), rtol=1e-5)
    np.testing.assert_allclose(scores.spend, spec.unscale("spend", logits["spend"].double().numpy()), rtol=1e-5)
    # The Python API gives the same scores; unseen categories go to the out-of-vocabulary index.
    api = run.predict(frame.head(50))
    np.testing.assert_allclose(api.click, scores.click.head(50), rtol=1e-5)
    unseen = frame.head(3).assign(country=["mars", "venus", "fr"])
    assert np.isfinite(run.predict(unseen)[["click", "purchase"]].to_numpy()).all()
    assert main(["predict", "mtl", "--ckpt", str(out), "--data", str(table), "--out", str(tmp_path / "scores.csv")]) \
        == 2  # an existing output is not overwritten silently
    assert "exists; pass --overwrite" in capsys.readouterr().err


def test_python_api_on_a_dataframe_file_with_explicit_splits(tmp_path):
    frame = make_table(2400, seed=1)
    for name, part in (("train", frame[:1600]), ("valid", frame[1600:2000]), ("test", frame[2000:])):
        part.to_parquet(tmp_path / f"{name}.parquet")
    config = MTLConfig(model=MultiTaskOptions(architecture="ple", num_shared_experts=2, num_specific_experts=1,
                                              num_levels=1, expert_hidden=16, expert_dim=8, tower_widths=(8,)),
                       data=MTLDataConfig(path=str(tmp_path / "train.parquet"), valid=str(tmp_path / "valid.parquet"),
                                          test=str(tmp_path / "test.parquet"), tasks=("click", "purchase"),
                                          categorical=("country", "device"), numeric=("age",), drop=("spend",),
                                          id_column="row_id"),
                       train=MTLTrainSettings(epochs=15, patience=15, batch_size=128, lr=1e-2, progress=False))
    result = fit(config, log=lambda m: None)
    assert result.test["click/auc"] > 0.85 and result.test["purchase/auc"] > 0.85
    # Independent of the evaluation code: scikit-learn's AUC of the model's test logits, rows in file order.
    data = load_data(config.data, log=lambda m: None)
    logits = result.model(data.test.cat_NC, data.test.num_NF).logits["click"].detach().numpy()
    assert roc_auc(frame[2000:].click.to_numpy(), logits) == pytest.approx(result.test["click/auc"])


BAD = [
    ("missing column", lambda f: f.drop(columns=["purchase"]), "no column 'purchase'"),
    ("binary label", lambda f: f.assign(click=["maybe"] + f.click.astype(str).tolist()[1:]),
     "line 2: task 'click' is binary but its label is 'maybe'"),
    ("non-numeric", lambda f: f.assign(age=f.age.astype(str).tolist()[:4] + ["old"] + f.age.astype(str).tolist()[5:]),
     "line 6: column 'age' is not a number: 'old'"),
]


@pytest.mark.parametrize("name,corrupt,message", BAD, ids=[b[0] for b in BAD])
def test_bad_tables_are_one_line_errors_that_name_file_and_line(table, tmp_path, capsys, name, corrupt, message):
    corrupt(pd.read_csv(table)).to_csv(table, index=False)
    code = main(["train", "mtl", "--data", str(table), "--tasks", "click,purchase", "--numeric", "age",
                 "--out", str(tmp_path / "run"), *SMALL])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and str(table) in err and message in err, err
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_empty_and_truncated_files(tmp_path, capsys):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    truncated = tmp_path / "cut.csv.gz"
    truncated.write_bytes(gzip.compress(make_table(500).to_csv(index=False).encode())[:1500])
    header_only = tmp_path / "header.csv"
    header_only.write_text("a,b,click\n")
    for path, message in ((empty, "is empty"), (truncated, "truncated or corrupt gzip"),
                          (header_only, "has a header but no rows")):
        assert main(["train", "mtl", "--data", str(path), "--tasks", "click", "--out", str(tmp_path / "r"),
                     "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert str(path) in err and message in err, err


def write_log(folder):
    rng = np.random.default_rng(0)
    rows = []
    for u in range(40):
        start = int(rng.integers(12))
        for j in range(7):
            rows.append({"uid": f"u{u}", "sku": f"S{(start + j) % 12:02d}", "when": f"2024-03-{j + 1:02d}",
                         "stars": int(rng.integers(1, 6))})
    pd.DataFrame(rows).to_csv(folder / "log.tsv", sep="\t", index=False)
    items = pd.DataFrame({"sku": [f"S{i:02d}" for i in range(12)], "title": [f"Thing number {i}" for i in range(12)],
                          "tags": ["red|round" if i % 2 else "blue" for i in range(12)]})
    items.to_csv(folder / "items.csv", index=False)
    # users u0..u29 only (the others are unknown); plan: free for even users, pro for odd ones
    pd.DataFrame({"uid": [f"u{u}" for u in range(30)], "plan": ["pro" if u % 2 else "free" for u in range(30)]}
                 ).to_csv(folder / "users.csv", index=False)


def test_an_interaction_log_trains_sasrec_and_two_tower_and_prints_its_titles(tmp_path, capsys):
    write_log(tmp_path)
    log = ["--data", str(tmp_path / "log.tsv"), "--user-column", "uid", "--item-column", "sku", "--time-column",
           "when", "--items", str(tmp_path / "items.csv"), "--category-columns", "tags", "--no-progress"]
    assert main(["train", "seqrec", *log, "--out", str(tmp_path / "sasrec"), "--epochs", "2", "--hidden", "8",
                 "--max-len", "6"]) == 0
    assert main(["recommend", "--ckpt", str(tmp_path / "sasrec"), "--user", "u3", "-k", "3"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("Thing number") == 3 + 5 and ("[red, round]" in printed or "[blue]" in printed)
    assert main(["train", "two-tower", *log, "--out", str(tmp_path / "tt"), "--epochs", "1", "--dim", "8",
                 "--history-len", "4", "--ks", "1,3", "--users", str(tmp_path / "users.csv")]) == 0
    tower = moekit.load(tmp_path / "tt").model
    # users sorted as text: u0, u1, u10, ..., u39; plan codes: 0 unknown, 1 free, 2 pro
    users = sorted(f"u{u}" for u in range(40))
    expected = [[0 if int(u[1:]) >= 30 else 1 + int(u[1:]) % 2] for u in users]
    assert tower.config.user_feature_sizes == (3,) and tower.user_features.tolist() == expected
    assert main(["retrieve", "--ckpt", str(tmp_path / "tt"), "--user", "u3", "-k", "2"]) == 0
    assert capsys.readouterr().out.count("Thing number") == 2
    assert main(["eval", "seqrec", "--ckpt", str(tmp_path / "sasrec")]) == 0
    assert capsys.readouterr().out.count("= reported") == 9
    assert main(["eval", "two-tower", "--ckpt", str(tmp_path / "tt")]) == 0


def test_a_rated_log_with_user_features_feeds_the_dqn_simulator(tmp_path):
    write_log(tmp_path)
    assert main(["train", "dqn", "--data", str(tmp_path / "log.tsv"), "--user-column", "uid", "--item-column", "sku",
                 "--time-column", "when", "--rating-column", "stars", "--users", str(tmp_path / "users.csv"),
                 "--out", str(tmp_path / "dqn"), "--steps", "100", "data.simulator.episode_length=3",
                 "data.simulator.state_len=3", "--eps-decay-steps", "50", "--no-progress", "--oracle-depth", "1"]) == 0
    loaded = moekit.load(tmp_path / "dqn")
    data = dqn.load_data(loaded.config.data)
    users = sorted(f"u{u}" for u in range(40))
    assert data.user_features[:, 0].tolist() == [0 if int(u[1:]) >= 30 else 1 + int(u[1:]) % 2 for u in users]


def test_bad_logs_are_one_line_errors(tmp_path, capsys):
    write_log(tmp_path)
    frame = pd.read_csv(tmp_path / "log.tsv", sep="\t")
    frame.loc[3, "when"] = "yesterday-ish"
    frame.to_csv(tmp_path / "bad.tsv", sep="\t", index=False)
    assert main(["train", "seqrec", "--data", str(tmp_path / "bad.tsv"), "--user-column", "uid", "--item-column",
                 "sku", "--time-column", "when", "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "bad.tsv, line 5: column 'when' is neither a number nor a date: 'yesterday-ish'" in err
    assert main(["train", "seqrec", "--data", str(tmp_path / "log.tsv"), "--out", str(tmp_path / "r"),
                 "--no-progress"]) == 2
    assert "no column 'user', 'item', 'timestamp'; its columns are 'uid', 'sku', 'when', 'stars'" in \
        capsys.readouterr().err
    assert math.isfinite(1.0)
