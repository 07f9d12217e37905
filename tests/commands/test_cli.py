"""The command line: help, info, errors, and a tiny `bench layer` run."""

from __future__ import annotations

import pytest

from moekit.cli import COMMANDS, main


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for words in COMMANDS:
        assert words[0] in out


@pytest.mark.parametrize("words", list(COMMANDS))
def test_every_subcommand_has_help(words, capsys):
    assert main([*words, "--help"]) == 0
    assert "usage: moekit " + " ".join(words) in capsys.readouterr().out


def test_unknown_option_is_a_usage_error(capsys):
    assert main(["info", "--no-such-option"]) == 2
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err


def test_info_prints_versions(capsys):
    import torch

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert torch.__version__ in out and "torch_threads" in out


def test_bench_layer_tiny_run(tmp_path, capsys):
    import json

    out_json = tmp_path / "bench.json"
    code = main(["bench", "layer", "--tokens", "1", "64", "--reps", "1", "--warmup", "0", "--workloads", "W1",
                 "--dtypes", "float32", "--json", str(out_json)])
    assert code == 0
    rows = json.loads(out_json.read_text())["rows"]
    assert {(r["tokens"], r["implementation"]) for r in rows} == {
        (t, name) for t in (1, 64) for name in ("floor (dense matmuls)", "moekit grouped", "moekit loop",
                                                 "moekit dense")}
    for tokens in (1, 64):
        by_name = {r["implementation"]: r for r in rows if r["tokens"] == tokens}
        floor = by_name["floor (dense matmuls)"]
        assert floor["fwd_vs_floor"] == floor["fwd_bwd_vs_floor"] == 1.0
        for r in by_name.values():
            assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0
            assert r["fwd_bwd_vs_floor"] == pytest.approx(r["fwd_bwd_ms"] / floor["fwd_bwd_ms"])
    assert "moekit grouped" in capsys.readouterr().out


def test_bench_layer_skips_the_dense_backend_on_large_workloads(tmp_path):
    import json

    out_json = tmp_path / "bench.json"
    assert main(["bench", "layer", "--tokens", "512", "--reps", "1", "--warmup", "0", "--workloads", "W2",
                 "--dtypes", "float32", "--backends", "dense", "--json", str(out_json)]) == 0
    rows = {r["implementation"]: r for r in json.loads(out_json.read_text())["rows"]}
    assert set(rows) == {"floor (dense matmuls)", "moekit dense"}
    assert rows["moekit dense"]["skipped"].startswith("not run: computes all 64 experts")
