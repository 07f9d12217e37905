"""`moekit train two-tower`, `retrieve` and `train dqn` end to end on tiny ML-100K-format files."""

from __future__ import annotations

from pathlib import Path

from moekit.cli import main
from moekit.data.movielens import GENRES, synthetic_movielens


def _write_ml100k(folder: Path) -> None:
    ml = synthetic_movielens(num_users=12, num_items=25, ratings_per_user=10, seed=5)
    folder.mkdir()
    (folder / "u.data").write_text("".join(
        f"{ml.user_ids[u]}\t{ml.item_ids[i]}\t{int(r)}\t{t}\n"
        for u, i, r, t in zip(ml.user, ml.item, ml.rating, ml.timestamp, strict=True)))
    (folder / "u.item").write_text("".join(
        f"{ml.item_ids[i]}|{ml.titles[i]}|01-Jan-{ml.years[i]}||http://x|"
        + "|".join("1" if g else "0" for g in ml.genres[i]) + "\n" for i in range(ml.num_items)))
    assert ml.genres.shape[1] == len(GENRES)
    (folder / "u.user").write_text("".join(
        f"{ml.user_ids[u]}|{20 + u}|{'MF'[ml.gender[u]]}|job{u % 3}|00000\n" for u in range(ml.num_users)))


def test_train_then_retrieve_prints_titles_without_seen_movies(tmp_path, capsys):
    data = tmp_path / "ml-100k"
    _write_ml100k(data)
    ckpt = tmp_path / "tt"
    args = ["train", "two-tower", "--data-dir", str(data), "--out", str(ckpt), "--epochs", "1", "--batch-size", "16",
            "--dim", "8", "--history-len", "4", "--no-progress"]
    assert main([*args, "--tower", "moe"]) == 2  # the default cut-offs go up to K=100: refused before training
    assert "k=100 but a user has only" in capsys.readouterr().err and not ckpt.exists()
    assert main([*args, "--ks", "1,5"]) == 0
    assert "Hit@5" in capsys.readouterr().out
    assert main(["retrieve", "--ckpt", str(ckpt), "--user", "3", "-k", "5"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("user 3:") and out[1].split() == ["rank", "score", "title"] and len(out) == 7
    lines = (line.split("\t") for line in (data / "u.data").read_text().splitlines())
    rows = sorted((int(t), i) for u, i, _, t in lines if u == "3")
    rated = {i for _, i in rows[:-1]}  # the latest rating is the held-out test item, not history
    titles = {line.split("|")[1]: line.split("|")[0] for line in (data / "u.item").read_text().splitlines()}
    for line in out[2:]:
        title = line.split(maxsplit=2)[2].split("  [")[0]
        assert title in titles and titles[title] not in rated
    assert main(["retrieve", "--ckpt", str(ckpt), "--user", "999", "-k", "5"]) == 2
    assert "unknown user id 999" in capsys.readouterr().err
    assert main(["eval", "two-tower", "--ckpt", str(ckpt)]) == 0
    assert capsys.readouterr().out.count("= reported") == 4


def test_train_dqn_prints_the_comparison_and_writes_the_curve(tmp_path, capsys):
    data = tmp_path / "ml-100k"
    _write_ml100k(data)
    out = tmp_path / "dqn"
    assert main(["train", "dqn", "--data-dir", str(data), "--out", str(out), "--steps", "600", "--no-progress",
                 "data.simulator.episode_length=4", "data.simulator.state_len=3", "--eps-decay-steps", "300",
                 "--oracle-depth", "2"]) == 0
    text = capsys.readouterr().out
    for name in ("random", "most-popular", "greedy-MF", "DQN (mlp)", "myopic greedy (mlp, γ = 0)",
                 "lookahead oracle, depth 2"):
        assert name in text
    assert (out / "reward_curve.png").read_bytes()[:4] == b"\x89PNG" and (out / "model.safetensors").is_file()
    assert (out / "myopic" / "results.json").is_file()
    assert main(["eval", "dqn", "--ckpt", str(out)]) == 0
    assert capsys.readouterr().out.count("= reported") == 6
