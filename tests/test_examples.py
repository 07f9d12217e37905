"""Every script in examples/ runs on small data the test writes (not on the scripts' own examples)."""

from __future__ import annotations

import importlib.util
import sys

import pandas as pd
import pytest

from tests.conftest import REPO_ROOT


def example(name: str):
    path = REPO_ROOT / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_every_example_is_tested():
    tested = {"moe_layer_in_a_model", "mmoe_on_a_dataframe", "sasrec_on_interactions", "two_tower_with_faiss"}
    assert {p.stem for p in (REPO_ROOT / "examples").glob("*.py")} == tested


def test_moe_layer_in_a_model_learns_the_piecewise_target():
    assert example("moe_layer_in_a_model").main(["--steps", "150"]) < 1.5  # the target's variance is ~6.7


def test_mmoe_on_a_dataframe(tmp_path):
    from tests.commands.test_own_data import make_table

    make_table(2000, seed=3).rename(columns={"row_id": "user"}).to_csv(tmp_path / "mine.csv", index=False)
    test = example("mmoe_on_a_dataframe").main(["--data", str(tmp_path / "mine.csv"), "--tasks", "click,purchase",
                                                "--out", str(tmp_path), "--epochs", "25"])
    assert test["click/auc"] > 0.8 and test["purchase/auc"] > 0.8


@pytest.fixture
def log(tmp_path):
    rows = [{"uid": f"u{u}", "sku": f"s{(u + j) % 12}", "t": j} for u in range(50) for j in range(8)]
    pd.DataFrame(rows).to_csv(tmp_path / "log.csv", index=False)
    pd.DataFrame({"sku": [f"s{k}" for k in range(12)], "title": [f"Thing {k}" for k in range(12)]}).to_csv(
        tmp_path / "items.csv", index=False)
    return tmp_path


def test_sasrec_on_interactions(log, capsys):
    test = example("sasrec_on_interactions").main([
        "--data", str(log / "log.csv"), "--items", str(log / "items.csv"), "--user-column", "uid", "--item-column",
        "sku", "--time-column", "t", "--out", str(log / "run"), "--epochs", "6"])
    assert test["HR@10"] > 0.5
    assert capsys.readouterr().out.count("Thing ") == 3


def test_two_tower_with_faiss(log, capsys):
    pd.read_csv(log / "log.csv").rename(columns={"uid": "user", "sku": "item", "t": "timestamp"}).to_csv(
        log / "plain.csv", index=False)
    test = example("two_tower_with_faiss").main(["--data", str(log / "plain.csv"), "--out", str(log / "run"),
                                                 "--epochs", "2", "--ks", "1,3"])
    assert set(test) == {"Recall@1", "Hit@1", "Recall@3", "Hit@3"}
    assert len(capsys.readouterr().out.strip().splitlines()) >= 5
