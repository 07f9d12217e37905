"""MovieLens parsing against the counts GroupLens documents and hand-made files."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from moekit.data.movielens import (
    leave_last_out,
    load_movielens,
    read_movies,
    read_ratings,
    read_users,
    user_sequences,
)


def test_ml100k_counts_match_the_readme(shared_data):
    ml = load_movielens(shared_data / "ml-100k", "ml-100k")
    assert (ml.num_users, ml.num_items, len(ml.rating)) == (943, 1682, 100_000)
    assert ml.titles[0] == "Toy Story (1995)" and ml.years[0] == 1995
    assert set(np.unique(ml.rating)) == {1, 2, 3, 4, 5}
    # u.data line 1: "196\t242\t3\t881250949"
    assert ml.user_ids[ml.user[0]] == 196 and ml.item_ids[ml.item[0]] == 242 and ml.rating[0] == 3
    assert ml.genres[0].nonzero()[0].tolist() == [3, 4, 5]  # Animation, Children's, Comedy
    assert ml.age_group[0] == 1 and ml.gender[0] == 1  # user 1: 24, M -> age group 18-24


def test_ml1m_format(tmp_path):
    (tmp_path / "ratings.dat").write_text("1::10::5::978300760\n2::20::3::978302109\n1::20::4::978300000\n")
    with gzip.open(tmp_path / "movies.dat.gz", "wt", encoding="latin-1") as f:
        f.write("10::GoldenEye (1995)::Action|Adventure|Thriller\n")
        f.write("20::Misérables, Les (1995)::Drama|Musical\n")
    (tmp_path / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n")
    ml = load_movielens(tmp_path, "ml-1m")
    assert ml.titles[1] == "Misérables, Les (1995)" and ml.years.tolist() == [1995, 1995]
    assert ml.user.tolist() == [0, 1, 0] and ml.item.tolist() == [0, 1, 1]
    assert ml.age_group.tolist() == [0, 6] and ml.gender.tolist() == [0, 1]
    assert ml.occupation.tolist() == [10, 16]
    assert ml.genres[0].nonzero()[0].tolist() == [1, 2, 16]


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "u.data"
    path.write_text("1\t2\t3\t4\n1\t2\t3\n")
    with pytest.raises(ValueError, match=r"u.data:2: expected 4 fields"):
        read_ratings(path)
    path.write_text("1\t2\t7\t4\n")
    with pytest.raises(ValueError, match="rating 7 outside 1..5"):
        read_ratings(path)
    (tmp_path / "users.dat").write_text("1::X::1::10::48067\n")
    with pytest.raises(ValueError, match="users.dat:1: gender"):
        read_users(tmp_path / "users.dat")
    (tmp_path / "movies.dat").write_text("1::A (1990)::Nope\n")
    with pytest.raises(ValueError, match="unknown genre 'Nope'"):
        read_movies(tmp_path / "movies.dat")


def test_missing_file_names_download_address(tmp_path):
    with pytest.raises(FileNotFoundError, match="grouplens.org"):
        load_movielens(tmp_path, "ml-1m")


def test_leave_last_out_and_sequences_match_a_loop():
    from moekit.data.movielens import synthetic_movielens

    ml = synthetic_movielens(num_users=6, num_items=15, ratings_per_user=5, seed=3)
    test_rows, train_mask = leave_last_out(ml)
    seqs = user_sequences(ml.user, ml.item, ml.timestamp, ml.num_users)
    for u in range(ml.num_users):
        rows = [r for r in range(len(ml.user)) if ml.user[r] == u]
        rows.sort(key=lambda r: (ml.timestamp[r], r))
        assert test_rows[u] == rows[-1]
        assert not train_mask[rows[-1]] and train_mask[rows[:-1]].all()
        assert seqs[u].tolist() == [ml.item[r] for r in rows]
