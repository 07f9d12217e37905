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
    code = main(["bench", "layer", "--tokens", "64", "--reps", "1", "--warmup", "0", "--no-transformers",
                 "--workloads", "W1", "--dtypes", "float32", "--json", str(out_json)])
    assert code == 0
    rows = json.loads(out_json.read_text())["rows"]
    by_name = {r["implementation"]: r for r in rows}
    assert set(by_name) == {"floor (dense matmuls)", "moekit grouped", "moekit loop"}
    assert by_name["floor (dense matmuls)"]["fwd_bwd_vs_floor"] == 1.0
    for r in rows:
        assert r["fwd_bwd_ms"] > 0 and r["fwd_bwd_vs_floor"] == pytest.approx(
            r["fwd_bwd_ms"] / by_name["floor (dense matmuls)"]["fwd_bwd_ms"])
    assert "moekit grouped" in capsys.readouterr().out
