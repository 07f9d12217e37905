"""Readers of a user's own interaction log, item metadata and user features, checked against values
written by hand for small files."""

import numpy as np
import pytest

from moekit.data.interactions import InteractionsConfig, read_interactions, read_item_metadata, read_user_features
from moekit.data.movielens import from_interactions
from moekit.data.table import TableError


def test_dates_become_seconds_and_numeric_ids_become_integers(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("user,item,timestamp,stars\n7,B1,2024-01-02,4\n7,B2,2024-01-01 00:00:10,2\n8,B1,1970-01-01,5\n")
    log = read_interactions(path, rating_column="stars")
    assert log.user.tolist() == [7, 7, 8] and log.item.tolist() == ["B1", "B2", "B1"]
    assert log.timestamp.tolist() == [1704153600, 1704067210, 0]  # date -> seconds since 1970 (UTC)
    assert log.rating.tolist() == [4.0, 2.0, 5.0]


def test_item_metadata_splits_tags_and_drops_repeats(tmp_path):
    path = tmp_path / "items.csv"
    path.write_text("item,title,genre,mood\nB1,One,drama|comedy,dark\nB2,Two,,drama|drama\n")
    meta = read_item_metadata(path, category_columns=("genre", "mood"))
    assert meta.titles == {"B1": "One", "B2": "Two"}
    assert meta.categories == {"B1": ("drama", "comedy", "dark"), "B2": ("drama",)}


def test_user_features_are_coded_in_sorted_order_with_zero_for_unknown(tmp_path):
    path = tmp_path / "users.csv"
    path.write_text("user,plan,country,ignored\nu1,pro,FR,x\nu2,free,,y\nu3,pro,DE,z\n")
    users = read_user_features(path, columns=("plan", "country"))
    # plan: <unknown>, free, pro; country: <unknown>, DE, FR (u2's empty cell is unknown)
    assert users.vocab == [["<unknown>", "free", "pro"], ["<unknown>", "DE", "FR"]] and users.sizes == (3, 3)
    assert users.matrix(["u3", "u1", "u2", "nobody"]).tolist() == [[2, 1], [2, 2], [1, 0], [0, 0]]
    assert read_user_features(path).columns == ["plan", "country", "ignored"]
    path.write_text("user,plan\nu1,pro\nu2,free\nu1,free\n")
    with pytest.raises(TableError, match=r"users.csv, line 4: user 'u1' appears twice"):
        read_user_features(path)
    path.write_text("user\nu1\n")
    with pytest.raises(TableError, match="no feature column besides 'user'"):
        read_user_features(path)


def test_retrieval_arrays_carry_the_users_file(tmp_path):
    (tmp_path / "log.csv").write_text("user,item,timestamp\nb,x,1\na,y,2\nc,x,3\n")
    (tmp_path / "users.csv").write_text("user,plan\na,pro\nb,free\n")
    config = InteractionsConfig(path=str(tmp_path / "log.csv"), users=str(tmp_path / "users.csv"))
    ratings, meta = config.read()
    ml = from_interactions(ratings, meta, "log", config.read_users())
    table, sizes = ml.user_features()
    # users numbered a, b, c; c is not in the users file
    assert sizes == (3,) and table.tolist() == [[2], [1], [0]]
    plain, plain_sizes = from_interactions(ratings, meta, "log").user_features()
    assert plain_sizes == (1,) and np.all(plain == 0)
