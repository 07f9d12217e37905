"""Sequence loaders: parsing, k-core filtering, tie order, leave-one-out, errors, real-file counts."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from moekit.data.movielens import GENRES, movielens_file, read_movies, read_ratings
from moekit.data.sequences import (
    Ratings,
    k_core,
    leave_one_out,
    load_beauty,
    load_movielens,
    load_sequences,
    pad_left,
    sequences_from_ratings,
)


def _genre_names(genres_IG, ids_I, movie_id):
    return tuple(GENRES[g] for g in np.flatnonzero(genres_IG[ids_I.tolist().index(movie_id)]))


def _ratings(rows):
    u, i, r, t = zip(*rows, strict=True)
    return Ratings(np.array(u), np.array(i), np.array(r, dtype=np.float32), np.array(t))


def test_k_core_cascades_until_stable():
    # 2-core. User 3 has one rating -> dropped; that leaves item 30 with one rating -> dropped,
    # which leaves user 2 with one rating (item 10) -> dropped. Users 1 and 4 survive.
    rows = [(1, 10, 5, 0), (1, 20, 5, 1), (2, 10, 5, 0), (2, 30, 5, 1), (3, 30, 5, 0),
            (4, 10, 5, 0), (4, 20, 5, 1)]
    r = _ratings(rows)
    keep = k_core(r.user, r.item, 2)
    kept = sorted(zip(r.user[keep].tolist(), r.item[keep].tolist(), strict=True))
    assert kept == [(1, 10), (1, 20), (4, 10), (4, 20)]


def test_users_below_core_threshold_are_dropped_and_items_renumbered():
    # 2-core: user 9 has a single rating and goes; every item keeps >= 2 ratings from users 7 and 8.
    rows = [(7, 300, 4, 3), (7, 100, 4, 1), (8, 100, 4, 2), (8, 300, 4, 0), (9, 100, 4, 0)]
    data = sequences_from_ratings(_ratings(rows), core=2)
    assert data.raw_user_ids == [7, 8]
    assert data.raw_item_ids == [-1, 100, 300]
    assert data.sequences == [[1, 2], [2, 1]]  # by timestamp: user 7 saw 100 then 300
    with pytest.raises(ValueError, match="no interactions left"):
        sequences_from_ratings(_ratings(rows), core=3)


def test_equal_timestamps_keep_file_order_and_are_deterministic():
    rows = [(1, 5, 4, 10), (1, 3, 4, 10), (1, 9, 4, 5), (1, 1, 4, 10)]
    data = sequences_from_ratings(_ratings(rows), core=0)
    raw = [data.raw_item_ids[i] for i in data.sequences[0]]
    assert raw == [9, 5, 3, 1]  # t=5 first, then the three t=10 ratings in file order
    again = sequences_from_ratings(_ratings(rows), core=0)
    assert again.sequences == data.sequences


def test_min_rating_keeps_only_high_ratings():
    rows = [(1, 1, 5, 0), (1, 2, 2, 1), (1, 3, 3, 2)]
    data = sequences_from_ratings(_ratings(rows), min_rating=3, core=0)
    assert [data.raw_item_ids[i] for i in data.sequences[0]] == [1, 3]


def test_leave_one_out_split_and_short_users():
    split = leave_one_out([[1, 2, 3, 4], [5, 6], [7, 8, 9]])
    assert split.users.tolist() == [0, 2]  # the 2-item user has nothing to train on
    assert split.train == [[1, 2], [7]]
    assert split.valid_target.tolist() == [3, 8] and split.valid_history == [[1, 2], [7]]
    assert split.test_target.tolist() == [4, 9] and split.test_history == [[1, 2, 3], [7, 8]]


def test_pad_left_keeps_the_most_recent_items():
    assert pad_left([[1, 2, 3, 4], [5]], 3).tolist() == [[2, 3, 4], [0, 0, 5]]


def test_movielens_files_parse(tmp_path):
    ml = tmp_path / "ml-1m"
    ml.mkdir()
    (ml / "ratings.dat").write_text("1::10::5::978300760\n1::20::3::978300750\n2::10::4::978300000\n")
    with gzip.open(ml / "movies.dat.gz", "wt", encoding="latin-1") as f:
        f.write("10::Misérables, Les (1995)::Drama|Musical\n20::Heat (1995)::Action\n")
    ratings = read_ratings(movielens_file(ml, "ml-1m", "ratings"))
    assert ratings[:, 0].tolist() == [1, 1, 2] and ratings[:, 2].tolist() == [5, 3, 4]
    ids, titles, _, genres = read_movies(movielens_file(ml, "ml-1m", "movies"))
    assert titles[ids.tolist().index(10)] == "Misérables, Les (1995)"
    assert _genre_names(genres, ids, 10) == ("Drama", "Musical")
    data = load_movielens(ml, "ml-1m", core=0)
    assert [data.item_titles[i] for i in data.sequences[0]] == ["Heat (1995)", "Misérables, Les (1995)"]


def test_ml100k_item_genres(tmp_path):
    ml = tmp_path / "ml-100k"
    ml.mkdir()
    flags = ["0"] * 19
    flags[1] = flags[16] = "1"  # Action, Thriller
    (ml / "u.item").write_text("1|Heat (1995)|01-Jan-1995||http://x|" + "|".join(flags) + "\n")
    ids, _, _, genres = read_movies(movielens_file(ml, "ml-100k", "movies"))
    assert _genre_names(genres, ids, 1) == ("Action", "Thriller")


def test_missing_file_names_file_and_download_address(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"u\.data.*grouplens\.org"):
        load_sequences("ml-100k", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"ratings\.dat.*ml-1m\.zip"):
        load_sequences("ml-1m", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"Beauty\.txt.*S3Rec"):
        load_beauty(tmp_path)


def test_bad_line_names_file_and_line(tmp_path):
    (tmp_path / "u.data").write_text("1\t2\t3\t4\n1\t2\t3\n")
    with pytest.raises(ValueError, match=r"u\.data:2: expected 4 fields"):
        load_sequences("ml-100k", tmp_path)
    with pytest.raises(ValueError, match="unknown dataset"):
        load_sequences("netflix", tmp_path)


def test_real_beauty_counts(shared_data):
    data = load_beauty(shared_data / "amazon-beauty")
    assert (data.num_users, data.num_items, data.num_interactions) == (22363, 12101, 198502)
    with gzip.open(shared_data / "amazon-beauty" / "Beauty.txt.gz", "rt") as f:
        first = f.readline().split()
    assert [data.raw_item_ids[i] for i in data.sequences[0]] == [int(x) for x in first[1:]]
    assert len(data.item_categories) == 12101


def test_real_ml100k_counts(shared_data):
    data = load_sequences("ml-100k", shared_data / "ml-100k", core=0)
    assert (data.num_users, data.num_items, data.num_interactions) == (943, 1682, 100000)
    assert data.item_titles[1] == "Toy Story (1995)"
    positive = load_sequences("ml-100k", shared_data / "ml-100k", min_rating=4, core=0)
    ratings = read_ratings(movielens_file(shared_data / "ml-100k", "ml-100k", "ratings"))
    assert positive.num_interactions == int((ratings[:, 2] >= 4).sum())


def test_movielens_and_beauty_read_through_the_generic_log_give_the_same_sequences(shared_data, tmp_path):
    """The public datasets are definitions on the generic path: the same ratings written as a plain
    interactions file (with a header) give the same sequences, ids and order."""
    import gzip

    from moekit.data.interactions import InteractionsConfig
    from moekit.data.sequences import load_beauty, load_interactions, load_movielens

    lines = gzip.open(shared_data / "ml-100k/u.data.gz", "rt").read()
    (tmp_path / "ml.tsv").write_text("user\titem\trating\ttimestamp\n" + lines)
    config = InteractionsConfig(path=str(tmp_path / "ml.tsv"), rating_column="rating")
    generic, public = load_interactions(config, core=5), load_movielens(shared_data / "ml-100k")
    assert generic.sequences == public.sequences and generic.raw_user_ids == public.raw_user_ids
    assert generic.raw_item_ids == public.raw_item_ids

    rows = [line.split() for line in gzip.open(shared_data / "amazon-beauty/Beauty.txt.gz", "rt").read().splitlines()]
    log = ["user,item"] + [f"{r[0]},{item}" for r in rows[:3000] for item in r[1:]]
    (tmp_path / "beauty.csv").write_text("\n".join(log) + "\n")
    generic = load_interactions(InteractionsConfig(path=str(tmp_path / "beauty.csv"), time_column=None))
    public = load_beauty(shared_data / "amazon-beauty")
    kept = set(generic.raw_user_ids)
    expected = [[public.raw_item_ids[i] for i in seq] for u, seq in zip(public.raw_user_ids, public.sequences,
                                                                          strict=True) if u in kept]
    assert [[generic.raw_item_ids[i] for i in seq] for seq in generic.sequences] == expected
