"""MovieLens-100K and MovieLens-1M: ratings, movies (title, genres, year) and users (gender, age, occupation).

The one MovieLens parser in moekit (two-tower retrieval, the DQN simulator and, through
`moekit.data.sequences`, sequential recommendation all read the files here).
`load_movielens(data_dir, "ml-100k")` reads `u.data`, `u.item`, `u.user` (tab / `|` separated);
`load_movielens(data_dir, "ml-1m")` reads `ratings.dat`, `movies.dat`, `users.dat` (`::` separated).
Files may be gzip-compressed (`u.data.gz`). Both are ISO-8859-1. `movielens_file` finds one file, and
`read_ratings` / `read_movies` / `read_users` parse one, for callers that need only some of them.

Raw ids are mapped to contiguous 0-based indices: items in the order of the movie file (the whole
catalogue, rated or not), users in the order of the user file. Ages are put in the seven ML-1M age
groups for both releases, so a model sees the same feature either way.

Harper & Konstan, "The MovieLens Datasets: History and Context", ACM TiiS 5(4), 2015.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moekit.data.interactions import ItemMetadata, Ratings, UserFeatures
from moekit.data.paths import find_file, open_text, resolve_data_dir

URLS = {
    "ml-100k": "https://files.grouplens.org/datasets/movielens/ml-100k.zip",
    "ml-1m": "https://files.grouplens.org/datasets/movielens/ml-1m.zip",
}
FILES = {  # dataset -> (ratings, items, users) file names
    "ml-100k": ("u.data", "u.item", "u.user"),
    "ml-1m": ("ratings.dat", "movies.dat", "users.dat"),
}
# ML-100K's u.genre, in the order of u.item's 19 genre flags; ML-1M uses the same names minus 'unknown'.
GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
# Lower bounds of the ML-1M age groups (its users.dat stores these codes instead of ages).
AGE_GROUPS = (1, 18, 25, 35, 45, 50, 56)
_YEAR_IN_TITLE = re.compile(r"\((\d{4})\)\s*$")


@dataclass
class MovieLens:
    """One MovieLens release as arrays. N ratings, I items (catalogue), U users, G genres."""

    name: str
    user: np.ndarray
    """(N,) int64 user index in [0, U)."""
    item: np.ndarray
    """(N,) int64 item index in [0, I)."""
    rating: np.ndarray
    """(N,) float32 stars, 1..5."""
    timestamp: np.ndarray
    """(N,) int64 seconds since the epoch."""
    item_ids: np.ndarray
    """(I,) raw movie id of each item index."""
    titles: list[str]
    years: np.ndarray
    """(I,) int64 release year, 0 where unknown."""
    genres: np.ndarray
    """(I, G) bool, genre membership (names in `GENRES`)."""
    user_ids: np.ndarray
    """(U,) raw user id of each user index."""
    gender: np.ndarray
    """(U,) int64: 0 = F, 1 = M."""
    age_group: np.ndarray
    """(U,) int64 index into `AGE_GROUPS`."""
    occupation: np.ndarray
    """(U,) int64 index into `occupations`."""
    occupations: list[str]
    genre_names: list[str] = field(default_factory=lambda: list(GENRES))
    """Names of the genre flags (MovieLens's genres, or the categories of your own items file)."""
    extra_user_features: np.ndarray | None = None
    """(U, F) int64 categorical user features from your own users file (replacing gender, age group and
    occupation), with `extra_user_feature_sizes`."""
    extra_user_feature_sizes: tuple[int, ...] | None = None

    def user_features(self) -> tuple[np.ndarray, tuple[int, ...]]:
        """(U, F) categorical user features and each one's number of values: your users file's, else
        MovieLens's gender, age group and occupation."""
        if self.extra_user_features is not None:
            return self.extra_user_features, tuple(self.extra_user_feature_sizes)
        table = np.stack([self.gender, self.age_group, self.occupation], axis=1).astype(np.int64)
        return table, (2, len(AGE_GROUPS), len(self.occupations))

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    def user_index(self, raw_user_id: int | str) -> int:
        """The 0-based index of a raw user id (as the file spells it), with a clear error for an unknown one."""
        hits = np.flatnonzero(self.user_ids.astype(str) == str(raw_user_id))
        if hits.size == 0:
            lo, hi = self.user_ids.min(), self.user_ids.max()
            raise ValueError(f"{self.name}: unknown user id {raw_user_id} (ids run {lo}..{hi})")
        return int(hits[0])


def from_interactions(ratings: Ratings, meta: ItemMetadata, name: str, users: UserFeatures | None = None
                      ) -> MovieLens:
    """Your own log as the arrays retrieval reads: ids numbered 0.. in sorted order; each item's
    categories (or tags) as its genre flags; the users file's columns as user features (without one, a
    single constant feature); release years unknown (zeros)."""
    user_ids, user = np.unique(ratings.user, return_inverse=True)
    item_ids, item = np.unique(ratings.item, return_inverse=True)
    categories = sorted({c for tags in meta.categories.values() for c in tags}) or ["none"]
    column = {c: j for j, c in enumerate(categories)}
    genres = np.zeros((len(item_ids), len(categories)), dtype=bool)
    for i, raw in enumerate(item_ids.tolist()):
        for tag in meta.categories.get(str(raw), ()):
            genres[i, column[tag]] = True
    zeros_U = np.zeros(len(user_ids), dtype=np.int64)
    return MovieLens(name=name, user=user.astype(np.int64), item=item.astype(np.int64), rating=ratings.rating,
                     timestamp=ratings.timestamp, item_ids=item_ids,
                     titles=[meta.titles.get(str(raw), str(raw)) for raw in item_ids.tolist()],
                     years=np.zeros(len(item_ids), dtype=np.int64), genres=genres, user_ids=user_ids,
                     gender=zeros_U, age_group=zeros_U.copy(), occupation=zeros_U.copy(), occupations=["unknown"],
                     genre_names=categories,
                     extra_user_features=users.matrix(user_ids) if users else zeros_U[:, None].copy(),
                     extra_user_feature_sizes=users.sizes if users else (1,))


def _fields(path: Path, sep: str, count: int, encoding: str = "latin-1"):
    """Yield (line number, fields) of a separated file, naming file and line on a malformed row."""
    with open_text(path, encoding=encoding) as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split(sep)
            if len(parts) != count:
                raise ValueError(
                    f"{path}:{lineno}: expected {count} fields separated by {sep!r}, got {len(parts)}"
                )
            yield lineno, parts


def _int(text: str, path: Path, lineno: int, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{path}:{lineno}: {what} must be an integer, got {text!r}") from None


def read_ratings(path: str | Path) -> np.ndarray:
    """Raw rating rows in file order as an (N, 4) int64 array: user id, movie id, stars, timestamp.

    The format follows the file name: `ratings.dat` is `::` separated, anything else (`u.data`,
    `u1.base`, ...) tab separated."""
    path = Path(path)
    sep = "\t" if not path.name.startswith("ratings") else "::"
    rows = []
    for lineno, parts in _fields(path, sep, 4):
        try:
            rows.append([int(p) for p in parts])
        except ValueError:
            raise ValueError(f"{path}:{lineno}: expected four integers, got {parts!r}") from None
    if not rows:
        raise ValueError(f"{path} holds no ratings")
    out = np.asarray(rows, dtype=np.int64).reshape(-1, 4)
    bad = np.flatnonzero((out[:, 2] < 1) | (out[:, 2] > 5))
    if bad.size:
        raise ValueError(f"{path}: rating {out[bad[0], 2]} outside 1..5 on data row {bad[0] + 1}")
    return out


def read_movies(path: str | Path) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
    """Movie ids, titles, years (0 if unknown) and the (I, 19) genre matrix of `u.item` or `movies.dat`."""
    path = Path(path)
    ids, titles, years, genres = [], [], [], []
    if path.name.startswith("u.item"):
        for lineno, parts in _fields(path, "|", 24):
            ids.append(_int(parts[0], path, lineno, "the movie id"))
            titles.append(parts[1])
            date = parts[2]  # '01-Jan-1995', empty for one movie
            flags = parts[5:]
            if any(f not in ("0", "1") for f in flags):
                raise ValueError(f"{path}:{lineno}: genre flags must be 0/1, got {flags!r}")
            genres.append([f == "1" for f in flags])
            years.append(int(date[-4:]) if len(date) >= 4 and date[-4:].isdigit() else _title_year(parts[1]))
    else:
        index = {g: i for i, g in enumerate(GENRES)}
        for lineno, parts in _fields(path, "::", 3):
            ids.append(_int(parts[0], path, lineno, "the movie id"))
            titles.append(parts[1])
            years.append(_title_year(parts[1]))
            row = [False] * len(GENRES)
            for g in parts[2].split("|"):
                if g not in index:
                    raise ValueError(f"{path}:{lineno}: unknown genre {g!r}")
                row[index[g]] = True
            genres.append(row)
    ids_I = np.asarray(ids, dtype=np.int64)
    if len(np.unique(ids_I)) != len(ids_I):
        raise ValueError(f"{path}: duplicate movie ids")
    genres_IG = np.asarray(genres, dtype=bool).reshape(-1, len(GENRES))
    return ids_I, titles, np.asarray(years, dtype=np.int64), genres_IG


def _title_year(title: str) -> int:
    match = _YEAR_IN_TITLE.search(title)
    return int(match.group(1)) if match else 0


def read_users(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """User ids, gender (0 F / 1 M), age group index, occupation index and occupation names."""
    path = Path(path)
    ids, gender, age, occ = [], [], [], []
    ml100k = path.name.startswith("u.user")
    for lineno, parts in _fields(path, "|" if ml100k else "::", 5):
        if ml100k:
            uid, a, g, o, _zip = parts
        else:
            uid, g, a, o, _zip = parts
        if g not in ("F", "M"):
            raise ValueError(f"{path}:{lineno}: gender must be F or M, got {g!r}")
        ids.append(_int(uid, path, lineno, "the user id"))
        gender.append(int(g == "M"))
        years_old = _int(a, path, lineno, "the age")
        age.append(int(np.searchsorted(AGE_GROUPS, years_old, side="right")) - 1 if years_old >= 1 else 0)
        if not ml100k:
            _int(o, path, lineno, "the occupation code")
        occ.append(o)
    if ml100k:
        names = sorted(set(occ))
    else:  # ML-1M codes 0..20, named in its README
        names = [str(i) for i in range(max(int(o) for o in occ) + 1)]
    lookup = {n: i for i, n in enumerate(names)}
    as_int = lambda values: np.asarray(values, dtype=np.int64)  # noqa: E731
    return as_int(ids), as_int(gender), as_int(age), as_int([lookup[o] for o in occ]), names


def movielens_file(data_dir: str | Path | None, dataset: str, kind: str) -> Path:
    """The path of `dataset`'s `kind` file ('ratings', 'movies' or 'users'), plain or `.gz`, in `data_dir`
    (else $MOEKIT_DATA/<dataset>); a missing file's error names it and the GroupLens download address."""
    if dataset not in FILES:
        raise ValueError(f"unknown MovieLens dataset {dataset!r}; expected one of {', '.join(FILES)}")
    kinds = ("ratings", "movies", "users")
    if kind not in kinds:
        raise ValueError(f"unknown MovieLens file kind {kind!r}; expected one of {', '.join(kinds)}")
    name = FILES[dataset][kinds.index(kind)]
    return find_file(resolve_data_dir(data_dir, dataset), (name, name + ".gz"), dataset, URLS[dataset])


def load_movielens(data_dir: str | Path | None = None, dataset: str = "ml-100k") -> MovieLens:
    """Load `dataset` ('ml-100k' or 'ml-1m') from `data_dir` (else $MOEKIT_DATA/<dataset>)."""
    paths = [movielens_file(data_dir, dataset, kind) for kind in ("ratings", "movies", "users")]
    raw = read_ratings(paths[0])
    item_ids, titles, years, genres = read_movies(paths[1])
    user_ids, gender, age, occupation, occupations = read_users(paths[2])
    user = _index_of(user_ids, raw[:, 0], paths[0], "user")
    item = _index_of(item_ids, raw[:, 1], paths[0], "movie")
    return MovieLens(
        name=dataset, user=user, item=item, rating=raw[:, 2].astype(np.float32), timestamp=raw[:, 3],
        item_ids=item_ids, titles=titles, years=years, genres=genres,
        user_ids=user_ids, gender=gender, age_group=age, occupation=occupation, occupations=occupations,
    )


def _index_of(ids: np.ndarray, raw: np.ndarray, path: Path, what: str) -> np.ndarray:
    order = np.argsort(ids)
    pos = np.searchsorted(ids[order], raw).clip(max=len(ids) - 1)
    found = ids[order][pos] == raw
    if not found.all():
        row = int(np.flatnonzero(~found)[0])
        raise ValueError(f"{path}: data row {row + 1} names {what} id {raw[row]}, not in the {what} file")
    return order[pos].astype(np.int64)


def leave_last_out(data: MovieLens) -> tuple[np.ndarray, np.ndarray]:
    """Per user, the index of the latest rating (test) and the mask of all the others (train).

    Ties in time are broken by position in the file, so the split is deterministic. Returns
    `(test_rows_U, train_mask_N)`; users with no ratings are absent from `test_rows_U`."""
    order = np.lexsort((np.arange(len(data.user)), data.timestamp, data.user))
    users = data.user[order]
    last = np.flatnonzero(np.r_[users[1:] != users[:-1], True])
    test_rows = order[last]
    train_mask = np.ones(len(data.user), dtype=bool)
    train_mask[test_rows] = False
    return test_rows, train_mask


def user_sequences(
    user: np.ndarray, item: np.ndarray, timestamp: np.ndarray, num_users: int
) -> list[np.ndarray]:
    """Each user's items in time order (ties by input order), as a list of int64 arrays."""
    order = np.lexsort((np.arange(len(user)), timestamp, user))
    bounds = np.searchsorted(user[order], np.arange(num_users + 1))
    items = item[order]
    return [items[bounds[u]:bounds[u + 1]] for u in range(num_users)]


def synthetic_movielens(
    num_users: int = 30, num_items: int = 40, ratings_per_user: int = 12, seed: int = 0
) -> MovieLens:
    """A small random MovieLens-shaped dataset (for tests and examples; no structure worth learning
    except that lower item indices are rated more often and more highly)."""
    rng = np.random.default_rng(seed)
    if ratings_per_user > num_items:
        raise ValueError(f"ratings_per_user={ratings_per_user} > num_items={num_items}")
    popularity = 1.0 / np.arange(1, num_items + 1)
    users, items, ratings, times = [], [], [], []
    for u in range(num_users):
        chosen = rng.choice(num_items, size=ratings_per_user, replace=False, p=popularity / popularity.sum())
        users.append(np.full(ratings_per_user, u))
        items.append(chosen)
        stars = 4.5 - 2.5 * chosen / num_items + rng.normal(0, 0.7, ratings_per_user)
        ratings.append(np.clip(np.rint(stars), 1, 5))
        times.append(rng.permutation(ratings_per_user) + 1000 * u)
    years = rng.integers(1930, 2000, num_items)
    return MovieLens(
        name="synthetic",
        user=np.concatenate(users).astype(np.int64),
        item=np.concatenate(items).astype(np.int64),
        rating=np.concatenate(ratings).astype(np.float32), timestamp=np.concatenate(times).astype(np.int64),
        item_ids=np.arange(1, num_items + 1),
        titles=[f"Movie {i + 1} ({y})" for i, y in enumerate(years)],
        years=years.astype(np.int64), genres=rng.random((num_items, len(GENRES))) < 0.2,
        user_ids=np.arange(1, num_users + 1), gender=rng.integers(0, 2, num_users),
        age_group=rng.integers(0, len(AGE_GROUPS), num_users), occupation=rng.integers(0, 3, num_users),
        occupations=["a", "b", "c"],
    )
