"""Per-user item sequences for next-item recommendation: Amazon Beauty, MovieLens-100K and -1M.

Item ids in a `SequenceDataset` run 1..num_items (0 is padding); users and sequences are kept in a
fixed order, so the same files and options always give the same tensors.

MovieLens files are parsed by `moekit.data.movielens` (the one MovieLens parser); this module only
turns its rows into sequences (min_rating, k-core, chronological order, leave-one-out).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moekit.data.interactions import InteractionsConfig, ItemMetadata, Ratings
from moekit.data.movielens import GENRES, movielens_file, read_movies, read_ratings
from moekit.data.paths import find_file, open_text, read_json_file, resolve_data_dir

BEAUTY_URL = "https://github.com/RUCAIBox/CIKM2020-S3Rec/tree/master/data (Beauty.txt)"
DATASETS = ("interactions", "beauty", "ml-100k", "ml-1m")
_FOLDERS = {"beauty": "amazon-beauty", "ml-100k": "ml-100k", "ml-1m": "ml-1m"}


# ---------------------------------------------------------------------------------------------
# Interactions


# ---------------------------------------------------------------------------------------------
# Sequences


@dataclass
class SequenceDataset:
    """Chronological item sequences, one per user; items are 1..num_items (0 is padding).

    `raw_user_ids[u]` and `raw_item_ids[i]` map back to the source ids (`raw_item_ids[0]` is -1 for
    padding); `item_titles` and `item_categories` (genres, or Beauty attribute ids) are keyed by the
    remapped item id and may be empty where the source has none.
    """

    name: str
    sequences: list[list[int]]
    num_items: int
    raw_user_ids: list[int]
    raw_item_ids: list[int]
    item_titles: dict[int, str] = field(default_factory=dict)
    item_categories: dict[int, tuple[str, ...]] = field(default_factory=dict)

    @property
    def num_users(self) -> int:
        return len(self.sequences)

    @property
    def num_interactions(self) -> int:
        return sum(len(s) for s in self.sequences)

    def summary(self) -> str:
        lengths = [len(s) for s in self.sequences]
        return (f"{self.name}: {self.num_users:,} users, {self.num_items:,} items, "
                f"{self.num_interactions:,} interactions, length {min(lengths)}..{max(lengths)} "
                f"(mean {np.mean(lengths):.1f})")


def k_core(users: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the interactions kept by iterative k-core filtering: drop users and items with
    fewer than k interactions, repeatedly, until every remaining user and item has at least k."""
    keep = np.ones(len(users), dtype=bool)
    if k <= 1:
        return keep
    while True:
        _, u_inv, u_cnt = np.unique(users[keep], return_inverse=True, return_counts=True)
        _, i_inv, i_cnt = np.unique(items[keep], return_inverse=True, return_counts=True)
        ok = (u_cnt[u_inv] >= k) & (i_cnt[i_inv] >= k)
        if ok.all():
            return keep
        idx = np.flatnonzero(keep)
        keep[idx[~ok]] = False


def sequences_from_ratings(ratings: Ratings, *, min_rating: float | None = None, core: int = 5,
                           name: str = "ratings") -> SequenceDataset:
    """Per-user sequences from ratings: keep rating >= min_rating (None: every rating counts as an
    implicit interaction), apply k-core filtering, order each user's items by timestamp.

    Equal timestamps keep their order in the file (a stable sort), so the result never depends on
    hashing or sort internals. Users are listed by raw id; items are renumbered 1..n by raw id."""
    keep = np.ones(len(ratings), dtype=bool)
    if min_rating is not None:
        keep &= ratings.rating >= min_rating
    users, items, times = ratings.user[keep], ratings.item[keep], ratings.timestamp[keep]
    core_keep = k_core(users, items, core)
    users, items, times = users[core_keep], items[core_keep], times[core_keep]
    if len(users) == 0:
        raise ValueError(f"{name}: no interactions left after min_rating={min_rating} and "
                         f"{core}-core filtering")
    raw_items = np.unique(items)
    item_ids = np.searchsorted(raw_items, items) + 1
    # Stable sort by (user, timestamp): lexsort is stable, so ties keep file order.
    order = np.lexsort((times, users))
    users_sorted, item_ids = users[order], item_ids[order]
    raw_users, starts = np.unique(users_sorted, return_index=True)
    bounds = list(starts[1:]) + [len(users_sorted)]
    sequences = [item_ids[a:b].tolist() for a, b in zip(starts, bounds, strict=True)]
    return SequenceDataset(name, sequences, len(raw_items), raw_users.tolist(), [-1] + raw_items.tolist())


def attach_item_metadata(data: SequenceDataset, meta: ItemMetadata) -> SequenceDataset:
    """Titles and categories from a user's item file, by raw item id, onto the remapped items."""
    for i, raw in enumerate(data.raw_item_ids[1:], 1):
        if str(raw) in meta.titles:
            data.item_titles[i] = meta.titles[str(raw)]
        if str(raw) in meta.categories:
            data.item_categories[i] = meta.categories[str(raw)]
    return data


def load_interactions(config: InteractionsConfig, core: int = 0) -> SequenceDataset:
    """Sequences from your own log (`InteractionsConfig`), k-core filtered when `core` > 1."""
    ratings, meta = config.read()
    data = sequences_from_ratings(ratings, core=core, name=Path(config.path).name)
    return attach_item_metadata(data, meta)


def load_beauty(data_dir: str | os.PathLike | None = None, core: int = 0) -> SequenceDataset:
    """Amazon Beauty in the S3-Rec preprocessed form: `Beauty.txt` (`user item1 item2 ...`, items in
    time order, already 5-core) and, if present, `Beauty_item2attributes.json` (category and brand
    attribute ids, used as item categories). `core` > 0 applies k-core filtering again."""
    folder = resolve_data_dir(data_dir, "amazon-beauty")
    path = find_file(folder, ("Beauty.txt", "Beauty.txt.gz"), "amazon-beauty", BEAUTY_URL)
    users, items, times = [], [], []
    with open_text(path) as f:
        for line_no, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2:
                raise ValueError(f"{path}, line {line_no}: a user with no items: {line.strip()!r}")
            try:
                ids = [int(p) for p in parts]
            except ValueError as error:
                raise ValueError(f"{path}, line {line_no}: {error}") from None
            users += [ids[0]] * (len(ids) - 1)
            items += ids[1:]
            times += range(len(ids) - 1)  # the file's order is the time order
    ratings = Ratings(np.array(users, dtype=np.int64), np.array(items, dtype=np.int64),
                      np.ones(len(users), dtype=np.float32), np.array(times, dtype=np.int64))
    data = sequences_from_ratings(ratings, core=core, name="beauty")
    attr_path = next((folder / n for n in ("Beauty_item2attributes.json", "Beauty_item2attributes.json.gz")
                      if (folder / n).is_file()), None)
    if attr_path is not None:
        raw = read_json_file(attr_path)
        if not isinstance(raw, dict):
            raise ValueError(f"{attr_path}: expected an object of item id -> attribute ids")
        index = {raw_id: i for i, raw_id in enumerate(data.raw_item_ids)}
        try:
            data.item_categories = {index[int(k)]: tuple(f"attr {a}" for a in v)
                                    for k, v in raw.items() if int(k) in index}
        except (ValueError, TypeError) as error:
            raise ValueError(f"{attr_path}: expected item ids mapping to lists of attribute ids ({error})") from None
    return data


def load_movielens(data_dir: str | os.PathLike | None = None, variant: str = "ml-100k", *,
                   min_rating: float | None = None, core: int = 5) -> SequenceDataset:
    """MovieLens-100K or -1M as sequences (defaults: every rating is an implicit interaction, 5-core),
    with titles and genres. The files are parsed by `moekit.data.movielens` (the user file is not needed)."""
    path = movielens_file(data_dir, variant, "ratings")
    raw = read_ratings(path)  # (N, 4): user id, movie id, stars, timestamp, in file order
    if len(raw) == 0:
        raise ValueError(f"{path} holds no ratings")
    ratings = Ratings(raw[:, 0], raw[:, 1], raw[:, 2].astype(np.float32), raw[:, 3])
    data = sequences_from_ratings(ratings, min_rating=min_rating, core=core, name=variant)
    movie_ids, titles, _years, genres_IG = read_movies(movielens_file(data_dir, variant, "movies"))
    row_of = {int(movie): row for row, movie in enumerate(movie_ids)}
    for i, raw_item in enumerate(data.raw_item_ids[1:], 1):
        row = row_of.get(raw_item)
        if row is not None:
            data.item_titles[i] = titles[row]
            data.item_categories[i] = tuple(GENRES[g] for g in np.flatnonzero(genres_IG[row]))
    return data


def load_sequences(dataset: str, data_dir: str | os.PathLike | None = None, *,
                   min_rating: float | None = None, core: int | None = None) -> SequenceDataset:
    """Any supported dataset by name: 'beauty', 'ml-100k' or 'ml-1m'. `data_dir` is the dataset's
    folder; None looks under $MOEKIT_DATA (amazon-beauty/, ml-100k/, ml-1m/)."""
    if dataset == "beauty":
        if min_rating is not None:
            raise ValueError("beauty has no ratings (Beauty.txt is implicit feedback): drop min_rating")
        return load_beauty(data_dir, core=0 if core is None else core)
    if dataset in ("ml-100k", "ml-1m"):
        return load_movielens(data_dir, dataset, min_rating=min_rating, core=5 if core is None else core)
    raise ValueError(f"unknown dataset {dataset!r}: expected one of {', '.join(DATASETS)}")


def dataset_folder(dataset: str) -> str:
    """The folder name of `dataset` under a data root (e.g. 'amazon-beauty' for 'beauty')."""
    return _FOLDERS[dataset]


# ---------------------------------------------------------------------------------------------
# Leave-one-out split


@dataclass
class LeaveOneOut:
    """Leave-one-out split: for user u, `train[u]` is the sequence without its last two items, the
    validation target is the second-to-last item (history `train[u]`), the test target is the last
    item (history = everything before it)."""

    train: list[list[int]]
    valid_history: list[list[int]]
    valid_target: np.ndarray  # (U,)
    test_history: list[list[int]]
    test_target: np.ndarray  # (U,)
    users: np.ndarray  # (U,) index into SequenceDataset.sequences


def leave_one_out(sequences: list[list[int]], min_length: int = 3) -> LeaveOneOut:
    """Split every user with at least `min_length` (>= 3) items; shorter users are left out
    (they have no training item)."""
    if min_length < 3:
        raise ValueError(f"min_length must be >= 3 (one train, one validation, one test item), "
                         f"got {min_length}")
    users = [u for u, s in enumerate(sequences) if len(s) >= min_length]
    if not users:
        raise ValueError(f"no user has at least {min_length} items")
    seqs = [sequences[u] for u in users]
    return LeaveOneOut(
        train=[s[:-2] for s in seqs],
        valid_history=[s[:-2] for s in seqs],
        valid_target=np.array([s[-2] for s in seqs], dtype=np.int64),
        test_history=[s[:-1] for s in seqs],
        test_target=np.array([s[-1] for s in seqs], dtype=np.int64),
        users=np.array(users, dtype=np.int64),
    )


def pad_left(sequences: list[list[int]], length: int) -> np.ndarray:
    """The last `length` items of each sequence, left-padded with 0: (U, length) int64."""
    out = np.zeros((len(sequences), length), dtype=np.int64)
    for row, seq in enumerate(sequences):
        tail = seq[-length:]
        if tail:
            out[row, length - len(tail):] = tail
    return out


def category_counts(data: SequenceDataset) -> Counter:
    """How many items carry each category (genre or attribute)."""
    return Counter(c for cats in data.item_categories.values() for c in cats)


def default_data_dir(dataset: str, root: str | os.PathLike | None) -> Path | None:
    """`root/<dataset folder>` when a data root is given (e.g. ../shared/data), else None."""
    return None if root is None else Path(root) / dataset_folder(dataset)
