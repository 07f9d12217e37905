"""A user simulator with long-term dynamics, built from logged ratings, as a Gymnasium env.

Recommendation earns RL only where today's recommendation changes tomorrow's user. Each simulated
user keeps a fixed taste, fitted on logged ratings, and a session state that the recommendations
change: boredom with a genre shown too often, patience that poor recommendations use up, and a
small chance of leaving after every recommendation. A long satisfying session is then worth more
than a few high ratings, and the best policy is no longer the myopic one.

Shape suffixes: U users, I items (the catalogue), G genres, H history window, W session window.

Data and split
--------------
The simulator is built from plain arrays (`LoggedRatings`: user, item, rating, timestamp and the
item-genre matrix; optional categorical user features), so any explicit-rating log with item
genres can feed it; `LoggedRatings.from_movielens` adapts MovieLens-100K/1M. Each user's ratings
are split in time: the first `known_fraction` are known (they fit the taste model and seed the
observation), the rest are held out. `test_user_fraction` of the users (drawn with the seed) are
test users; policies learn on sessions of the other (training) users only.

Taste (the memoryless reaction)
-------------------------------
    x0(u, i) = the real held-out rating of u for i            if there is one
             = clip(rint(MF(u, i) + eps), 1, 5), eps ~ N(0, noise_std)   otherwise

MF is a biased matrix factorisation fitted by ALS on the known ratings (`RatingMF`). With every
dynamic off (`SimulatorConfig.memoryless()`), the reaction is x0, the session has exactly
`episode_length` = 10 recommendations: the memoryless simulator moekit had before the dynamics.

Dynamics (t = 0, 1, ... counts the recommendations a_t of a session)
--------------------------------------------------------------------
1. Boredom (satiation by genre repetition; Deffayet et al., GeMS, WSDM 2023 and SARDINE, 2024:
   users get bored of a topic shown too often and recover later; Krauth et al., RecLab, 2020:
   a rating penalty once a topic repeats in recent memory). With g_i the genre vector of item i
   and ĝ_i = g_i / |g_i|, the user carries a genre exposure e (G,):

       e_0 = 0,    e_{t+1} = λ e_t + ĝ_{a_t}
       x_t = clip(x0(u, a_t) - β ĝ_{a_t} · e_t, 1, 5)

   ĝ_i · e_t = Σ_{k<t} λ^(t-1-k) cos(g_i, g_{a_k}) counts the earlier recommendations that shared
   i's genres, the older ones less: a movie of exactly the genres of the previous one loses β
   stars, after two such movies β(1 + λ), and a genre recovers geometrically (by λ per step) once
   it is no longer shown.
2. Patience and leaving (Zhao et al., KuaiSim, NeurIPS 2023 Datasets and Benchmarks: a user
   "temper" that each poor response lowers, the user leaving when it runs out; Ie et al., RecSim,
   2019: a per-session time budget):

       P_0 = P,    P_{t+1} = P_t - clip(τ - x_t, 0, d)
       the session ends after a_t when P_{t+1} <= 0, or else with probability h,
       and in any case after `episode_length` recommendations.

Reward r_t = (x_t - 3) / 2 in [-1, 1]; a reaction x_t >= 4 is a hit and the movie joins the
user's history window (the latest liked movies).

Parameters (fixed before any agent was trained; `moekit.rl.calibration` measures what MovieLens-100K
can say, on the known ratings only)
-------------------------------------------------------------------------------------------------
- h = 0.023 (leave_prob), from the data: in ML-100K rating sessions of the known ratings (a gap of
  more than 30 minutes starts a new session) the chance that a session ends right after a rating of
  3 stars or more (0.0232; 1,914 sessions, 79,619 ratings).
- β = 0.5 stars, λ = 0.8 (boredom, boredom_decay): the data cannot identify boredom. Within a user,
  ML-100K ratings do not fall with genre repetition (slope +0.004 ± 0.002 stars per unit of
  exposure at λ = 0.8), because a
  rating session logs movies seen long before, not a sequence consumed in that order. The values
  follow RecLab's published `topics-dynamic-v1` environment (19 topics like ML-100K's 19 genres;
  1 star off once a topic was seen more than twice in the last 5): here the fourth same-genre movie
  in a row loses β(1 + λ + λ²) = 1.22 stars and a genre is back within 0.1 star of fresh
  (β λ^k < 0.1) 8 recommendations after it was last shown.
- P = 10, τ = 3 stars, d = 2 (patience, patience_threshold, patience_max_drop): KuaiSim's leave
  model (initial temper 10, each step's drop between 0 and 2, 2 for a response worth nothing). A
  1-star movie costs 2, a 2-star movie 1, anything from 3 stars up nothing. The data cannot
  identify it: in ML-100K a rating of 1-2 stars raises the chance the rating session ends by only
  0.5 points (0.0285 vs 0.0232), but a low rating of a film seen years ago is not a disappointing
  recommendation.
- episode_length = 100 with the dynamics (KuaiSim's max_step_per_episode), 10 without.
"""

from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from moekit.config import check_int, check_number
from moekit.data.movielens import user_sequences

# --------------------------------------------------------------------------------------- data


@dataclass
class LoggedRatings:
    """Explicit ratings and item genres as plain arrays: what the simulator is built from.
    N ratings, U users, I items, G genres, F user features."""

    user: np.ndarray
    """(N,) int64 user index in [0, U)."""
    item: np.ndarray
    """(N,) int64 item index in [0, I)."""
    rating: np.ndarray
    """(N,) float stars (1..5 for MovieLens)."""
    timestamp: np.ndarray
    """(N,) int64 time of each rating (orders each user's ratings; ties keep the input order)."""
    item_genres: np.ndarray
    """(I, G) bool genre (or any category) membership of each item; a row may be all False."""
    num_users: int
    """U; users without ratings are allowed."""
    user_features: np.ndarray | None = None
    """(U, F) int64 categorical user features (MovieLens: gender, age group, occupation), or None."""
    titles: list[str] | None = None
    """Item names for printing, or None."""
    name: str = "ratings"

    def __post_init__(self) -> None:
        n = len(self.user)
        for key in ("item", "rating", "timestamp"):
            if len(getattr(self, key)) != n:
                raise ValueError(f"{self.name}: user has {n} rows but {key} has {len(getattr(self, key))}")
        if self.item_genres.ndim != 2:
            raise ValueError(f"{self.name}: item_genres must be (items, genres), got shape {self.item_genres.shape}")
        if n and (self.user.min() < 0 or self.user.max() >= self.num_users):
            raise ValueError(f"{self.name}: user indices must lie in 0..{self.num_users - 1}")
        if n and (self.item.min() < 0 or self.item.max() >= self.num_items):
            raise ValueError(f"{self.name}: item indices must lie in 0..{self.num_items - 1} "
                             f"(item_genres has {self.num_items} rows)")
        if self.user_features is not None and (self.user_features.ndim != 2
                                               or len(self.user_features) != self.num_users):
            raise ValueError(f"{self.name}: user_features must be ({self.num_users}, F), "
                             f"got shape {self.user_features.shape}")

    @property
    def num_items(self) -> int:
        """I: rows of the item-genre matrix (the catalogue, rated or not)."""
        return len(self.item_genres)

    @classmethod
    def from_raw(cls, user_ids, item_ids, rating, timestamp, item_categories: dict | None = None,
                 name: str = "ratings", users=None) -> LoggedRatings:
        """From a log with the dataset's own ids (strings or integers, e.g. the columns of
        `moekit.data.interactions.Ratings`) and optional categories per raw item id (e.g.
        `ItemMetadata.categories`): ids become contiguous indices in sorted order, the categories the
        genre columns (items without any get an all-False row, so boredom never touches them); `users`
        (`moekit.data.interactions.UserFeatures`) gives the users' categorical features."""
        raw_users, user = np.unique(np.asarray(user_ids).astype(str), return_inverse=True)
        items, item = np.unique(np.asarray(item_ids).astype(str), return_inverse=True)
        cats = item_categories or {}
        names = sorted({c for i in items for c in cats.get(i, ())})
        column = {c: k for k, c in enumerate(names)}
        genres = np.zeros((len(items), len(names)), dtype=bool)
        for k, i in enumerate(items):
            genres[k, [column[c] for c in cats.get(i, ())]] = True
        return cls(user=user.astype(np.int64), item=item.astype(np.int64), rating=np.asarray(rating, dtype=np.float64),
                   timestamp=np.asarray(timestamp), item_genres=genres, num_users=len(raw_users),
                   titles=[str(i) for i in items], name=name,
                   user_features=users.matrix(raw_users) if users is not None else None)

    @classmethod
    def from_movielens(cls, ml) -> LoggedRatings:
        """A `moekit.data.movielens.MovieLens` as arrays, with its user features (gender, age group,
        occupation, or your users file's)."""
        return cls(user=ml.user, item=ml.item, rating=ml.rating, timestamp=ml.timestamp,
                   item_genres=ml.genres.astype(bool), num_users=ml.num_users,
                   user_features=ml.user_features()[0],
                   titles=ml.titles, name=ml.name)


# ------------------------------------------------------------------------------ taste model


@dataclass
class RatingMF:
    """Biased matrix factorisation r(u, i) = mu + b_u + b_i + p_u . q_i, fitted by alternating
    least squares on explicit ratings (Koren, Bell & Volinsky, "Matrix Factorization Techniques for
    Recommender Systems", IEEE Computer 2009). Each half-step solves, for one user,
    min_w ||X w - y||^2 + reg ||w||^2 with X = [q_i, 1] and y = r - mu - b_i (and symmetrically
    for items), so it is exact and deterministic given the seed of the initial factors."""

    mu: float
    user_factors: np.ndarray  # (U, F)
    user_bias: np.ndarray  # (U,)
    item_factors: np.ndarray  # (I, F)
    item_bias: np.ndarray  # (I,)

    @classmethod
    def fit(cls, user: np.ndarray, item: np.ndarray, rating: np.ndarray, num_users: int, num_items: int,
            factors: int = 32, reg: float = 5.0, iterations: int = 10, seed: int = 0) -> RatingMF:
        rng = np.random.default_rng(seed)
        rating = rating.astype(np.float64)
        mu = float(rating.mean()) if len(rating) else 3.0
        P, Q = rng.normal(0, 0.1, (num_users, factors)), rng.normal(0, 0.1, (num_items, factors))
        bu, bi = np.zeros(num_users), np.zeros(num_items)
        by_user = _groups(user, num_users)
        by_item = _groups(item, num_items)
        for _ in range(iterations):
            for u, rows in enumerate(by_user):
                P[u], bu[u] = _ridge(Q[item[rows]], rating[rows] - mu - bi[item[rows]], reg)
            for i, rows in enumerate(by_item):
                Q[i], bi[i] = _ridge(P[user[rows]], rating[rows] - mu - bu[user[rows]], reg)
        return cls(mu, P, bu, Q, bi)

    def predict(self, user: int | np.ndarray, item: int | np.ndarray) -> np.ndarray:
        """Predicted stars of `user` for `item` (broadcasting)."""
        return (self.mu + self.user_bias[user] + self.item_bias[item]
                + (self.user_factors[user] * self.item_factors[item]).sum(-1))

    def predict_all(self, user: int) -> np.ndarray:
        """(I,) predicted stars of one user for the whole catalogue."""
        return self.mu + self.user_bias[user] + self.item_bias + self.item_factors @ self.user_factors[user]


def _groups(keys: np.ndarray, n: int) -> list[np.ndarray]:
    order = np.argsort(keys, kind="stable")
    bounds = np.searchsorted(keys[order], np.arange(n + 1))
    return [order[bounds[k]:bounds[k + 1]] for k in range(n)]


def _ridge(X_nF: np.ndarray, y_n: np.ndarray, reg: float) -> tuple[np.ndarray, float]:
    """Ridge solution of [X, 1] w = y; returns (factors, bias). No rows: zeros."""
    F = X_nF.shape[1]
    if len(y_n) == 0:
        return np.zeros(F), 0.0
    A = np.concatenate([X_nF, np.ones((len(y_n), 1))], axis=1)
    w = np.linalg.solve(A.T @ A + reg * np.eye(F + 1), A.T @ y_n)
    return w[:F], float(w[F])


# ----------------------------------------------------------------------------------- config


@dataclass
class SimulatorConfig:
    """The split, the taste model and the session dynamics (see the module docstring for the
    equations and where each default comes from). The defaults have every dynamic on;
    `SimulatorConfig.memoryless()` turns them all off."""

    episode_length: int = 100
    """Most recommendations in a session (RecSim's time budget; KuaiSim's max_step_per_episode 100).
    With every dynamic off each session has exactly this many (the memoryless simulator: 10)."""
    boredom: float = 0.5
    """β: stars lost per unit of genre exposure (ĝ_i · e_t); 0 turns boredom off."""
    boredom_decay: float = 0.8
    """λ: the genre exposure kept from one recommendation to the next (recovery: 1 - λ per step)."""
    patience: float | None = 10.0
    """P: the user's patience at the start of a session (KuaiSim's initial temper); None: no patience."""
    patience_threshold: float = 3.0
    """τ: a reaction below this many stars is a disappointment and costs τ - x_t patience."""
    patience_max_drop: float = 2.0
    """d: the most patience one recommendation can cost (KuaiSim: 2)."""
    leave_prob: float = 0.023
    """h: chance the user leaves after any recommendation (estimated on ML-100K rating sessions); 0: never."""
    state_len: int = 10
    """H: how many recent positively-rated movies the observation's history window holds."""
    session_window: int = 10
    """W: how many of the session's latest recommendations (with their reactions) the observation holds."""
    positive_rating: float = 4.0
    """A reaction of at least this many stars is a hit and joins the history window."""
    known_fraction: float = 0.8
    """The first 80% of each user's ratings (by time) are known; the rest are held out."""
    test_user_fraction: float = 0.2
    noise_std: float = 0.0
    """Gaussian noise added to MF-predicted ratings before rounding (0: deterministic tastes)."""
    exclude_known: bool = True
    """Never recommend a movie the user rated in the known part (if False, its reaction is that rating)."""
    num_candidates: int | None = None
    """Restrict every session to the N most-rated movies (a candidate-generation stage, as in a
    retrieval -> re-ranking pipeline); None: the whole catalogue."""
    mf_factors: int = 32
    mf_reg: float = 5.0
    mf_iterations: int = 10

    def __post_init__(self) -> None:
        check_int("episode_length", self.episode_length, 1)
        check_int("state_len", self.state_len, 1)
        check_int("session_window", self.session_window, 1)
        check_number("boredom", self.boredom, 0)
        check_number("boredom_decay", self.boredom_decay, 0, 1)
        if self.patience is not None:
            check_number("patience", self.patience, 0, strict_min=True)
        check_number("patience_max_drop", self.patience_max_drop, 0)
        check_number("leave_prob", self.leave_prob, 0, 1, strict_max=True)
        check_number("noise_std", self.noise_std, 0)
        check_number("known_fraction", self.known_fraction, 0, 1, strict_min=True, strict_max=True)
        check_number("test_user_fraction", self.test_user_fraction, 0, 1, strict_min=True, strict_max=True)

    @classmethod
    def memoryless(cls, **overrides) -> SimulatorConfig:
        """Every dynamic off: 10 recommendations, reactions that ignore the session (the old simulator)."""
        return cls(**{"episode_length": 10, "boredom": 0.0, "patience": None, "leave_prob": 0.0} | overrides)

    @property
    def has_dynamics(self) -> bool:
        """Whether any dynamic is on (boredom, patience or leaving)."""
        return self.boredom > 0 or self.patience is not None or self.leave_prob > 0


# ---------------------------------------------------------------------------------- session


@dataclass
class Session:
    """Everything a session's future depends on: the user's hidden state (exposure, patience) and
    what the observation shows (history window, latest recommendations and reactions)."""

    user: int
    mask: np.ndarray
    """(I,) bool items still allowed (not yet recommended, not known when exclude_known)."""
    history: np.ndarray
    """(H,) int64 latest liked movies, most recent last, left-padded with I."""
    items: np.ndarray
    """(W,) int64 latest recommendations, most recent last, left-padded with I."""
    stars: np.ndarray
    """(W,) float32 their reactions, 0 where padded."""
    exposure: np.ndarray
    """(G,) float64 genre exposure e_t (hidden)."""
    patience: float
    """P_t (hidden); inf without patience."""
    t: int = 0
    """Recommendations so far."""
    ended: bool = False
    """Whether the session is over (no more recommendations)."""

    def copy(self) -> Session:
        """An independent copy (for looking ahead without touching the real session)."""
        return Session(self.user, self.mask.copy(), self.history.copy(), self.items.copy(), self.stars.copy(),
                       self.exposure.copy(), self.patience, self.t, self.ended)


@dataclass
class Reaction:
    """What one recommendation did: the user's reaction and whether the session ended."""

    stars: float
    """x_t after boredom, in [1, 5]."""
    real: bool
    """Whether x0 was the user's real held-out rating."""
    reward: float
    hit: bool
    left: bool = False
    """Whether the user ended the session after it (patience, leaving or the time budget)."""
    why: str = ""
    """'patience', 'leave', 'budget', 'catalogue' or '' (session goes on)."""


# -------------------------------------------------------------------------------- simulator


class UserSimulator:
    """The split, the fitted taste model, the per-user facts and the session dynamics."""

    def __init__(self, data: LoggedRatings, config: SimulatorConfig | None = None, seed: int = 0) -> None:
        self.config = c = config or SimulatorConfig()
        self.data_name = data.name
        self.num_items, self.num_users = data.num_items, data.num_users
        self.titles = data.titles
        genres_IG = data.item_genres.astype(np.float64)
        norm_I1 = np.linalg.norm(genres_IG, axis=1, keepdims=True)
        self.item_genres = data.item_genres.astype(bool)
        self.genre_unit = np.divide(genres_IG, norm_I1, out=np.zeros_like(genres_IG), where=norm_I1 > 0)  # ĝ
        self.user_features = (data.user_features if data.user_features is not None
                              else np.zeros((data.num_users, 1), dtype=np.int64)).astype(np.int64)
        self.user_feature_sizes = [int(v) + 1 for v in self.user_features.max(0)] if data.num_users else [1]

        seqs = user_sequences(data.user, np.arange(len(data.user)), data.timestamp, data.num_users)  # rows by time
        known_rows = []
        self.known_positives: list[np.ndarray] = []  # per user, positively rated known items, by time
        self.known_mask = np.zeros((data.num_users, data.num_items), dtype=bool)
        self.real_items: list[np.ndarray] = []  # per user, items with a real rating the simulator may use
        self.real_stars: list[np.ndarray] = []
        for u, rows in enumerate(seqs):
            cut = int(np.floor(len(rows) * c.known_fraction))
            known, held = rows[:cut], rows[cut:]
            known_rows.append(known)
            self.known_mask[u, data.item[known]] = True
            self.known_positives.append(data.item[known][data.rating[known] >= c.positive_rating])
            real = held if c.exclude_known else rows  # a held-out rating wins over a known one (later in time)
            self.real_items.append(data.item[real])
            self.real_stars.append(data.rating[real].astype(np.float64))
        self.known_rows = np.concatenate(known_rows) if known_rows else np.zeros(0, dtype=np.int64)
        k = self.known_rows
        self.mf = RatingMF.fit(data.user[k], data.item[k], data.rating[k], data.num_users, data.num_items,
                               c.mf_factors, c.mf_reg, c.mf_iterations, seed)
        self.item_count = np.bincount(data.item[k], minlength=data.num_items)  # popularity in known data
        self.candidates = np.ones(data.num_items, dtype=bool)
        if c.num_candidates is not None:
            if not 1 <= c.num_candidates <= data.num_items:
                raise ValueError(f"num_candidates must lie in 1..{data.num_items} (got {c.num_candidates})")
            self.candidates[:] = False
            self.candidates[np.argsort(-self.item_count, kind="stable")[:c.num_candidates]] = True
        users = np.random.default_rng(seed).permutation(data.num_users)
        n_test = max(1, int(round(data.num_users * c.test_user_fraction)))
        self.test_users, self.train_users = np.sort(users[:n_test]), np.sort(users[n_test:])

    # ---- taste

    def base_stars(self, user: int) -> np.ndarray:
        """(I,) x0 without noise: real ratings where the simulator has them, else the rounded MF prediction."""
        x0 = np.clip(np.rint(self.mf.predict_all(user)), 1, 5)
        x0[self.real_items[user]] = self.real_stars[user]
        return x0

    def boredom_penalty(self, session: Session, items: np.ndarray | slice = slice(None)) -> np.ndarray:
        """β ĝ_i · e_t for the given items (stars to subtract from x0)."""
        if self.config.boredom == 0:
            return np.zeros(self.num_items)[items]
        return self.config.boredom * (self.genre_unit[items] @ session.exposure)

    def expected_stars(self, session: Session, base_I: np.ndarray) -> np.ndarray:
        """(I,) reactions x_t every item would get now (exact when noise_std is 0)."""
        return np.clip(base_I - self.boredom_penalty(session), 1.0, 5.0)

    # ---- sessions

    def start(self, user: int) -> Session:
        """A fresh session of `user`: no exposure, full patience, the known liked movies as history."""
        c = self.config
        mask = self.candidates.copy()
        if c.exclude_known:
            mask &= ~self.known_mask[user]
        pad = self.num_items
        return Session(
            user=user, mask=mask,
            history=_push(np.full(c.state_len, pad, dtype=np.int64), self.known_positives[user][-c.state_len:]),
            items=np.full(c.session_window, pad, dtype=np.int64),
            stars=np.zeros(c.session_window, dtype=np.float32),
            exposure=np.zeros(self.item_genres.shape[1]),
            patience=float(c.patience) if c.patience is not None else float("inf"),
        )

    def react(self, session: Session, item: int, rng: np.random.Generator) -> float:
        """x_t of the session's user for `item` now; draws noise only for an MF reaction with noise_std > 0."""
        user = session.user
        hits = np.flatnonzero(self.real_items[user] == item)
        if len(hits):
            x0 = float(self.real_stars[user][hits[-1]])
        else:
            pred = float(self.mf.predict(user, item))
            if self.config.noise_std > 0:
                pred += rng.normal(0.0, self.config.noise_std)
            x0 = float(np.clip(np.rint(pred), 1, 5))
        return float(np.clip(x0 - float(self.boredom_penalty(session, item)), 1.0, 5.0))

    def advance(self, session: Session, item: int, stars: float) -> str:
        """Apply one recommendation and its reaction to `session` (in place), except the random
        leave. Returns why the session ends ('patience', 'budget', 'catalogue') or ''."""
        c = self.config
        session.mask[item] = False
        if stars >= c.positive_rating:
            session.history = _push(session.history, [item])
        session.items = _push(session.items, [item])
        session.stars = np.concatenate([session.stars, np.float32([stars])])[-c.session_window:]
        if c.boredom > 0:
            session.exposure = c.boredom_decay * session.exposure + self.genre_unit[item]
        if c.patience is not None:
            session.patience -= min(max(c.patience_threshold - stars, 0.0), c.patience_max_drop)
        session.t += 1
        if session.patience <= 0:
            return "patience"
        if session.t >= c.episode_length:
            return "budget"
        if not session.mask.any():
            return "catalogue"
        return ""

    def step(self, session: Session, item: int, rng: np.random.Generator) -> Reaction:
        """Recommend `item`: the reaction, then the session update (in place) and the end check.
        The leave draw uses one uniform from `rng` per recommendation that did not end the session
        otherwise (none when leave_prob is 0), so the memoryless simulator draws nothing."""
        stars = self.react(session, item, rng)
        real = bool((self.real_items[session.user] == item).any())
        why = self.advance(session, item, stars)
        if not why and self.config.leave_prob > 0 and rng.random() < self.config.leave_prob:
            why = "leave"
        session.ended = bool(why)
        return Reaction(stars=stars, real=real, reward=(stars - 3.0) / 2.0,
                        hit=stars >= self.config.positive_rating, left=session.ended, why=why)


def _push(window: np.ndarray, items) -> np.ndarray:
    """Append `items` to a fixed-length, left-padded window, dropping the oldest."""
    items = np.asarray(items, dtype=window.dtype)
    if len(items) == 0:
        return window
    return np.concatenate([window, items])[-len(window):]


# -------------------------------------------------------------------------------------- env


class RecommendationEnv(gym.Env):
    """Gymnasium env over a `UserSimulator`. Action: an item index. Observation (a dict):

    - ``history`` (H,) int64: the user's latest liked movies (known part, then liked recommendations);
    - ``user`` (F,) int64: the user's categorical features;
    - ``items`` (W,) int64 and ``stars`` (W,) float32: the session's latest recommendations and reactions;
    - ``step`` (1,) float32: recommendations so far.

    Padding is the item index I (= num_items), 0 stars. The hidden state (genre exposure, patience)
    is not observed. `info['action_mask']` marks the items still allowed; an action outside it
    raises. `reset(options={'user': u})` starts a session for user u, else one of `users` is drawn.
    """

    metadata = {"render_modes": []}

    def __init__(self, simulator: UserSimulator, users: str | np.ndarray = "train") -> None:
        self.sim = simulator
        if isinstance(users, str):
            if users not in ("train", "test"):
                raise ValueError(f"users must be 'train', 'test' or an array of user indices (got {users!r})")
            users = simulator.train_users if users == "train" else simulator.test_users
        self.users = np.asarray(users, dtype=np.int64)
        c, n = simulator.config, simulator.num_items
        self.observation_space = spaces.Dict({
            "history": spaces.MultiDiscrete(np.full(c.state_len, n + 1)),
            "user": spaces.MultiDiscrete(np.asarray(simulator.user_feature_sizes)),
            "items": spaces.MultiDiscrete(np.full(c.session_window, n + 1)),
            "stars": spaces.Box(0.0, 5.0, (c.session_window,), np.float32),
            "step": spaces.Box(0.0, float(c.episode_length), (1,), np.float32),
        })
        self.action_space = spaces.Discrete(n)
        self.session: Session | None = None

    @property
    def user(self) -> int:
        return -1 if self.session is None else self.session.user

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if options and "user" in options:
            user = int(options["user"])
            if not 0 <= user < self.sim.num_users:
                raise ValueError(f"user {user} outside 0..{self.sim.num_users - 1}")
        else:
            user = int(self.users[self.np_random.integers(len(self.users))])
        self.session = self.sim.start(user)
        return self._obs(), self._info()

    def step(self, action):
        s = self.session
        if s is None or s.ended:
            raise RuntimeError("call reset() before step()" if s is None else "the session has ended; call reset()")
        item = int(action)
        if not 0 <= item < self.sim.num_items or not s.mask[item]:
            why = "outside the catalogue" if not 0 <= item < self.sim.num_items else (
                "already recommended in this session, already rated by the user, or not a candidate")
            raise ValueError(f"action {item} is not allowed: {why}")
        r = self.sim.step(s, item, self.np_random)
        info = self._info() | {"stars": r.stars, "real": r.real, "hit": r.hit, "item": item, "why": r.why,
                               "patience": s.patience}
        return self._obs(), r.reward, r.left, False, info

    def _obs(self) -> dict:
        s = self.session
        return {"history": s.history.copy(), "user": self.sim.user_features[s.user].copy(),
                "items": s.items.copy(), "stars": s.stars.copy(), "step": np.float32([s.t])}

    def _info(self) -> dict:
        return {"user": self.session.user, "action_mask": self.session.mask.copy()}
