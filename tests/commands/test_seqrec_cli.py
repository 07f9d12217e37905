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


def test_train_then_recommend(tmp_path, capsys):
    data = tmp_path / "ml-100k"
    _tiny_movielens(data)
    out = tmp_path / "run"
    code = main(["train", "seqrec", "--dataset", "ml-100k", "--data-dir", str(data), "--model", "fame",
                 "--max-len", "8", "--hidden", "8", "--layers", "1", "--epochs", "2", "--core", "0",
                 "--seed", "1", "--out", str(out)])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["users"] == 12 and metrics["epochs_run"] == 2
    assert "NDCG@10" in capsys.readouterr().out
    assert main(["recommend", "--ckpt", str(out), "--user", "3", "-k", "3"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("(1999)") >= 3 + 5 and "[Drama]" in printed  # 5 history lines + 3 picks
    assert main(["recommend", "--ckpt", str(out), "--user", "99"]) == 1
    assert "user 99 is not in ml-100k" in capsys.readouterr().err


def test_cli_defaults_are_the_training_config_defaults():
    """`moekit train seqrec` with no options trains what SeqRecTrainConfig() describes (the CLI keeps
    its own numbers so that `--help` shows them without importing torch)."""
    import dataclasses

    from moekit.cli import build_parser
    from moekit.train.seqrec import SeqRecTrainConfig

    args = build_parser().parse_args(["train", "seqrec"])
    cli_to_config = {"layers": "num_layers", "heads": "num_heads", "experts": "num_experts", "out": "out_dir"}
    config = {f.name: f.default for f in dataclasses.fields(SeqRecTrainConfig)}
    checked = 0
    for dest, value in vars(args).items():
        name = cli_to_config.get(dest, dest)
        if name in config and name not in ("out_dir", "seed"):
            assert value == config[name], f"--{dest.replace('_', '-')} defaults to {value!r}, config {config[name]!r}"
            checked += 1
    assert config["dropout"] == config["attn_dropout"] == args.dropout  # one --dropout sets both
    assert checked >= 15
