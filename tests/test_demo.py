"""`moekit demo --quick` end to end, and the data files it ships."""

from __future__ import annotations

import gzip
import json
import math

from moekit.cli import main
from moekit.data.paths import asset_path
from moekit.demo import CENSUS_ASSET, TEXT_ASSET


def test_shipped_data_files_are_in_the_installed_package():
    text = gzip.open(asset_path(TEXT_ASSET), "rt").read()
    assert len(text) == 1_115_394 and text.startswith("First Citizen:")
    rows = gzip.open(asset_path(CENSUS_ASSET), "rt").read().splitlines()
    assert len(rows) == 4000 and all(len(r.split(",")) == 42 for r in rows)
    assert asset_path("ATTRIBUTION.md").read_text().count("CC BY 4.0") == 1


def test_demo_quick_end_to_end(tmp_path, capsys):
    run_dir = tmp_path / "demo"
    assert main(["demo", "--quick", "--no-progress", "--out", str(run_dir), "--threads", "1"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    for kind in ("dense", "moe"):
        r = summary["language_models"]["results"][kind]
        assert math.isfinite(r["val_loss"]) and 0 < r["val_loss"] < math.log(256) + 1
        assert r["sample"].startswith("ROMEO:")
    moe_params = summary["language_models"]["results"]["moe"]["parameters"]
    assert moe_params["total"] > 2 * moe_params["active"]  # sparse: most experts idle per token
    for model in ("shared_bottom", "mmoe"):
        aucs = summary["multitask"]["results"][model]["test_auc"]
        assert set(aucs) == set(summary["multitask"]["tasks"])
        assert all(math.isfinite(a) and 0.5 < a <= 1 for a in aucs.values())
    report = (run_dir / "report.html").read_text()
    assert report.count("data:image/png;base64,") == 3  # loss curves, expert load, MMoE gates
    out = capsys.readouterr().out
    assert f"report: {run_dir / 'report.html'}" in out and "too few to separate the models" in out
    assert main(["demo", "--quick", "--out", str(run_dir)]) == 2  # never into a folder that holds a demo
