"""The README's per-command examples run as written, from an empty folder, with small settings added.

The data is a tiny copy of `$MOEKIT_DATA`'s layout that the test writes; each command gets a few
extra `key=value` settings so it finishes in seconds, and nothing else changes.
"""

from __future__ import annotations

import gzip
import re
import shlex

import pytest

from moekit.cli import main
from moekit.data.paths import asset_path
from tests.commands.test_retrieval_commands import _write_ml100k
from tests.conftest import REPO_ROOT

SMALL = {  # command words -> settings that make it quick
    ("train", "lm"): ["train.max_tokens=2048", "model.n_layer=1", "model.block_size=32", "train.batch_size=4",
                      "train.eval_interval=4", "train.eval_tokens=256", "train.final_eval_tokens=512",
                      "train.warmup_steps=1", "--no-progress"],
    ("eval", "lm"): ["--max-tokens", "512"],
    ("generate",): ["--max-new-tokens", "5"],
    ("train", "mtl"): ["train.epochs=1", "--no-progress"],
    ("train", "seqrec"): ["train.epochs=1", "--hidden", "8", "--num-layers", "1", "--max-len", "8", "--core", "0",
                          "--no-progress"],
    ("recommend",): ["--user", "2"],
    ("train", "two-tower"): ["train.epochs=1", "--dim", "8", "--history-len", "4", "--ks", "1,5", "--no-progress"],
    ("retrieve",): ["--user", "2", "-k", "3"],
    ("train", "dqn"): ["--steps", "200", "data.simulator.episode_length=3", "data.simulator.state_len=3",
                       "--eps-decay-steps", "100", "--no-progress", "--oracle-depth", "1"],
}


def readme_examples() -> list[list[str]]:
    """The `moekit ...` lines of the README's "Examples, from any folder" block."""
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"Examples, from any folder.*?```bash\n(.*?)```", text, re.S).group(1)
    return [shlex.split(line)[1:] for line in block.splitlines() if line.startswith("moekit ")]


@pytest.fixture
def data_root(tmp_path):
    root = tmp_path / "data"
    (root / "text").mkdir(parents=True)
    (root / "text/tinyshakespeare.txt").write_text(gzip.open(asset_path("tinyshakespeare.txt.gz"), "rt").read()[:20000])
    (root / "census-income").mkdir()
    rows = gzip.open(asset_path("census-income.sample.gz"), "rt").read().splitlines()[:600]
    (root / "census-income/census-income.test").write_text("\n".join(rows) + "\n")
    (root / "amazon-beauty").mkdir()
    (root / "amazon-beauty/Beauty.txt").write_text(
        "".join(f"{u} " + " ".join(str((u + j) % 9 + 1) for j in range(6)) + "\n" for u in range(1, 13)))
    _write_ml100k(root / "ml-100k")
    return root


def test_readme_examples_run_from_an_empty_folder(data_root, tmp_path, monkeypatch, capsys):
    examples = readme_examples()
    assert len(examples) >= 10
    work = tmp_path / "elsewhere"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("MOEKIT_DATA", str(data_root))
    for argv in examples:
        words = tuple(a for a in argv[:2] if not a.startswith("-"))
        extra = SMALL.get(words, SMALL.get(words[:1], []))
        code = main(["--no-malloc-tuning", *argv, *extra])
        captured = capsys.readouterr()
        assert code == 0, f"moekit {' '.join(argv)}: {captured.err[-2000:]}"
    assert sorted(p.name for p in (work / "runs").iterdir()) == ["dqn", "fame-beauty", "lm-moe", "ple", "tt"]
