"""`moekit train seqrec` and `moekit recommend` in-process on a tiny MovieLens-format folder."""

from __future__ import annotations

import json

from moekit.cli import main


def _tiny_movielens(folder, users=12, items=9):
    folder.mkdir()
    lines = []
    for u in range(1, users + 1):
        for j in range(6):  # user u watches items u, u+1, ... (cyclic), one per day
            lines.append(f"{u}\t{(u + j) % items + 1}\t4\t{1000 + 86400 * j}")
    (folder / "u.data").write_text("\n".join(lines) + "\n")
    flags = "|".join(["0"] * 8 + ["1"] + ["0"] * 10)  # Drama
    (folder / "u.item").write_text("".join(f"{i}|Movie {i} (1999)|01-Jan-1999||http://x|{flags}\n"
                                           for i in range(1, items + 1)))


def test_train_then_recommend_and_eval(tmp_path, capsys):
    data = tmp_path / "ml-100k"
    _tiny_movielens(data)
    out = tmp_path / "run"
    code = main(["train", "seqrec", "--dataset", "ml-100k", "--data-dir", str(data), "--model", "fame",
                 "--max-len", "8", "--hidden", "8", "--num-layers", "1", "--epochs", "2", "--core", "0",
                 "--seed", "1", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["data"]["users"] == 12 and len(results["history"]) == 2
    assert "NDCG@10" in capsys.readouterr().out
    assert main(["recommend", "--ckpt", str(out), "--user", "3", "-k", "3"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("(1999)") == 3 + 5 and "[Drama]" in printed  # 5 history lines + 3 picks
    assert "latest 5" in printed and "score" in printed.splitlines()[7]  # the header it promises
    assert main(["recommend", "--ckpt", str(out), "--user", "99"]) == 2
    assert "user 99 is not in ml-100k" in capsys.readouterr().err
    assert main(["eval", "seqrec", "--ckpt", str(out)]) == 0
    assert capsys.readouterr().out.count("= reported") == 9  # HR, NDCG, MRR at 5, 10, 20
    # Several seeds: a run folder each, and mean ± std.
    assert main(["train", "seqrec", "--dataset", "ml-100k", "--data-dir", str(data), "--max-len", "8",
                 "--hidden", "8", "--num-layers", "1", "--epochs", "1", "--core", "0", "--seeds", "0", "1",
                 "--out", str(tmp_path / "seeds"), "--no-progress"]) == 0
    assert "± " in capsys.readouterr().out
    summary = json.loads((tmp_path / "seeds/summary.json").read_text())
    assert summary["seeds"] == [0, 1] and len(summary["test"]["HR@10"]["values"]) == 2
    assert (tmp_path / "seeds/seed-1/model.safetensors").is_file()


def test_cli_defaults_are_the_training_config_defaults():
    """`moekit train seqrec` with no options trains what SeqRecConfig() describes: every flag is
    generated from a config field and sets nothing unless given."""
    from moekit.cli import build_parser
    from moekit.commands.shared import config_from_args
    from moekit.train.seqrec import SeqRecConfig

    args = build_parser().parse_args(["train", "seqrec"])
    assert config_from_args(args, SeqRecConfig) == SeqRecConfig()
    args = build_parser().parse_args(["train", "seqrec", "--lr", "1e-3", "--model", "fame", "--dropout", "0.1",
                                      "train.epochs=3"])
    config = config_from_args(args, SeqRecConfig)
    assert (config.train.lr, config.model.architecture, config.model.dropout, config.train.epochs) == \
        (1e-3, "fame", 0.1, 3)
