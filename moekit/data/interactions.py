"""A user's own interaction log for sequential recommendation, retrieval and the RL simulator.

    read_interactions(path, ...)   user, item, timestamp[, rating] columns of a CSV/TSV/Parquet file
    read_item_metadata(path, ...)  titles and categories/tags per item (optional)
    read_user_features(path, ...)  categorical columns per user: age band, country, plan... (optional)

Ids are kept as the file spells them (strings): `user_42`, `B00ABC` or `42` alike. Timestamps may be
numbers (any unit; only their order matters) or dates pandas can parse. MovieLens and Amazon Beauty
are definitions on the same path (`moekit.data.sequences`, `moekit.data.movielens`): they produce the
same `Ratings` these readers do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moekit.config import documented
from moekit.data.table import TableError, numeric_values, read_table


@dataclass
class Ratings:
    """One row per interaction, in file order, with the dataset's own ids."""

    user: np.ndarray
    """(N,) raw user ids (integers or strings)."""
    item: np.ndarray
    """(N,) raw item ids."""
    rating: np.ndarray
    """(N,) float32 rating (1 where the log has none: implicit feedback)."""
    timestamp: np.ndarray
    """(N,) int64 or float64: only the order matters."""

    def __len__(self) -> int:
        return len(self.user)


@documented
@dataclass
class InteractionsConfig:
    """Your own interaction log (used when `dataset` is 'interactions'): a CSV, TSV or Parquet file with a
    user, an item and a time column (and optionally a rating), plus optional item metadata."""

    path: str | None = None
    """The interactions file."""
    user_column: str = "user"
    """Column of user ids."""
    item_column: str = "item"
    """Column of item ids."""
    time_column: str | None = "timestamp"
    """Column of times (numbers in any unit, or dates); null: the file's order is the time order."""
    rating_column: str | None = None
    """Column of ratings (explicit feedback; see min_rating); null: every row is one interaction."""
    delimiter: str | None = None
    """Delimiter of CSV/TSV files (None: tab for .tsv, else sniffed)."""
    items: str | None = None
    """Item metadata file: the item column, a title and categories or tags (printed by recommend / retrieve)."""
    title_column: str | None = "title"
    """Column of titles in the items file."""
    category_columns: tuple[str, ...] = ("category",)
    """Columns of categories or tags in the items file (several per cell, split by category_separator)."""
    category_separator: str = "|"
    """Separator of several categories in one cell."""
    min_rating: float | None = None
    """Keep interactions rated at least this (explicit feedback as implicit); None: every interaction."""
    users: str | None = None
    """User features file: the user column and categorical columns (age band, country, plan...), used by
    two-tower's user tower and the RL simulator's users."""
    user_feature_columns: tuple[str, ...] | None = None
    """Columns of the users file to use (None: every column but the user column)."""

    def read(self) -> tuple[Ratings, ItemMetadata]:
        """The log's interactions (filtered by min_rating) and the item metadata (empty without `items`)."""
        ratings = read_interactions(self.path, self.user_column, self.item_column, self.time_column,
                                    self.rating_column, self.delimiter)
        if self.min_rating is not None:
            keep = ratings.rating >= self.min_rating
            ratings = Ratings(ratings.user[keep], ratings.item[keep], ratings.rating[keep], ratings.timestamp[keep])
            if len(ratings) == 0:
                raise TableError(f"{self.path}: no interaction has a rating >= {self.min_rating}")
        meta = ItemMetadata()
        if self.items is not None:
            meta = read_item_metadata(self.items, self.item_column, self.title_column, self.category_columns,
                                      self.category_separator, self.delimiter)
        return ratings, meta

    def read_users(self) -> UserFeatures | None:
        """The users file's categorical features (None without `users`)."""
        if self.users is None:
            return None
        return read_user_features(self.users, self.user_column, self.user_feature_columns, self.delimiter)

    def absolute(self) -> dict:
        """The file fields as absolute paths (for a run folder that is evaluated from anywhere)."""
        return {k: str(Path(v).expanduser().resolve()) for k in ("path", "items", "users") if (v := getattr(self, k))}


@dataclass
class ItemMetadata:
    """What a user supplied about the items: titles and categories (or tags), by raw item id."""

    titles: dict[str, str] = field(default_factory=dict)
    categories: dict[str, tuple[str, ...]] = field(default_factory=dict)


def read_interactions(path: str | os.PathLike, user_column: str = "user", item_column: str = "item",
                      time_column: str | None = "timestamp", rating_column: str | None = None,
                      delimiter: str | None = None) -> Ratings:
    """The interactions of a log file. Without `time_column`, the file's order is the time order;
    without `rating_column`, every row is one implicit interaction (rating 1)."""
    import pandas as pd

    path = Path(path)
    columns = [c for c in (user_column, item_column, time_column, rating_column) if c]
    frame = read_table(path, columns, delimiter)
    for column in (user_column, item_column):
        empty = np.flatnonzero(frame[column].astype(str).str.strip().to_numpy() == "")
        if empty.size:
            raise TableError(f"{path}, line {int(empty[0]) + 2}: column {column!r} is empty")
    if time_column is None:
        timestamp = np.arange(len(frame), dtype=np.int64)
    else:
        numbers = pd.to_numeric(frame[time_column], errors="coerce")
        if numbers.notna().all():
            timestamp = numbers.to_numpy(dtype=np.float64)
        else:
            dates = pd.to_datetime(frame[time_column], errors="coerce", utc=True, format="mixed")
            bad = np.flatnonzero(dates.isna().to_numpy())
            if bad.size:
                row = int(bad[0])
                raise TableError(f"{path}, line {row + 2}: column {time_column!r} is neither a number nor a date: "
                                 f"{frame[time_column].iloc[row]!r}")
            # seconds since 1970 whatever the parsed unit (pandas may give ns or us)
            timestamp = ((dates - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)).to_numpy(dtype=np.int64)
    rating = numeric_values(frame, rating_column, path).astype(np.float32) if rating_column \
        else np.ones(len(frame), dtype=np.float32)
    return Ratings(_ids(frame[user_column]), _ids(frame[item_column]), rating, timestamp)


def _ids(column) -> np.ndarray:
    """Raw ids as the file spells them; integers when every id is one (so 42 and '42' are the same)."""
    text = column.astype(str).str.strip().to_numpy()
    try:
        return text.astype(np.int64)
    except ValueError:
        return text.astype(str)


def read_item_metadata(path: str | os.PathLike, item_column: str = "item", title_column: str | None = "title",
                       category_columns: tuple[str, ...] = ("category",), separator: str = "|",
                       delimiter: str | None = None) -> ItemMetadata:
    """Titles and categories per raw item id; a category cell may hold several, split by `separator`."""
    path = Path(path)
    frame = read_table(path, [item_column], delimiter)
    present = [c for c in category_columns if c in frame.columns]
    if title_column and title_column not in frame.columns:
        raise TableError(f"{path}: no column {title_column!r} for titles; its columns are "
                         f"{', '.join(map(repr, frame.columns))}")
    ids = _ids(frame[item_column])
    meta = ItemMetadata()
    for row, item in enumerate(ids.tolist()):
        if title_column:
            meta.titles[str(item)] = str(frame[title_column].iloc[row])
        tags: list[str] = []
        for column in present:
            tags += [t.strip() for t in str(frame[column].iloc[row]).split(separator) if t.strip()]
        if tags:
            meta.categories[str(item)] = tuple(dict.fromkeys(tags))
    return meta


@dataclass
class UserFeatures:
    """Categorical user features from a users file: per column its values (index 0: unknown, for users the
    file does not list or values not seen), and each user's codes by raw id."""

    columns: list[str]
    vocab: list[list[str]]
    """Per column, the values in code order (code 0 is 'unknown')."""
    codes: dict[str, list[int]]
    """Raw user id (as text) -> one code per column."""

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(len(v) for v in self.vocab)

    def matrix(self, user_ids) -> np.ndarray:
        """(U, F) int64 codes for the given raw ids, in that order (0 for users the file does not list)."""
        unknown = [0] * len(self.columns)
        return np.array([self.codes.get(str(u), unknown) for u in np.asarray(user_ids).tolist()],
                        dtype=np.int64).reshape(-1, len(self.columns))


def read_user_features(path: str | os.PathLike, user_column: str = "user", columns: tuple[str, ...] | None = None,
                       delimiter: str | None = None) -> UserFeatures:
    """A users file's categorical columns, each value coded 1.. in sorted order (0: unknown, for empty
    cells, users the file does not list and values not seen)."""
    path = Path(path)
    frame = read_table(path, [user_column, *(columns or ())], delimiter)
    chosen = list(columns) if columns else [c for c in frame.columns if c != user_column]
    if not chosen:
        raise TableError(f"{path}: no feature column besides {user_column!r}")
    ids = _ids(frame[user_column])
    duplicated = frame[user_column].astype(str).str.strip().duplicated().to_numpy()
    if duplicated.any():
        row = int(np.flatnonzero(duplicated)[0])
        raise TableError(f"{path}, line {row + 2}: user {ids.tolist()[row]!r} appears twice")
    vocab, coded = [], []
    for column in chosen:
        text = frame[column].astype(str).str.strip().where(frame[column].notna(), "")
        values = sorted(set(text) - {""})
        index = {"": 0, **{v: k for k, v in enumerate(values, 1)}}
        vocab.append(["<unknown>", *values])
        coded.append([index[v] for v in text])
    codes = {str(u): [c[row] for c in coded] for row, u in enumerate(ids.tolist())}
    return UserFeatures(chosen, vocab, codes)
