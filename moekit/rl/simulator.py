"""A MovieLens user simulator for recommendation as a sequential decision problem, as a Gymnasium env.

Each user's ratings are split in time: the first part is what the recommender knows (it fits
the rating model and seeds the state), the rest is held out. Users are split too: policies train
on sessions of training users and are evaluated on sessions of test users. In a session the
agent recommends `episode_length` movies, never one twice and never one the user already rated
in the known part; the user's reaction is their real held-out rating of that movie where it
exists, otherwise the rating a biased matrix-factorisation model (fitted on the known ratings of
all users) predicts, rounded to whole stars. Reward = (stars - 3) / 2, in [-1, 1]; a movie rated
4 or 5 joins the state, the user's most recent positively-rated movies.

This follows the offline-simulator protocol of e.g. Zhao et al., "Deep Reinforcement Learning for
Page-wise Recommendations", RecSys 2018, with an MF user model in place of their memory-based one.
"""

from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from moekit.data.movielens import MovieLens, user_sequences


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


@dataclass
class SimulatorConfig:
    episode_length: int = 10
    state_len: int = 10
    """How many recent positively-rated movies make up the state."""
    positive_rating: float = 4.0
    known_fraction: float = 0.8
    """The first 80% of each user's ratings (by time) are known; the rest are held out."""
    test_user_fraction: float = 0.2
    noise_std: float = 0.0
    """Gaussian noise added to MF-predicted ratings before rounding (0: deterministic users)."""
    num_candidates: int | None = None
    """Restrict every session to the N most-rated movies (a candidate-generation stage, as in a
    retrieval -> re-ranking pipeline); None: the whole catalogue."""
    mf_factors: int = 32
    mf_reg: float = 5.0
    mf_iterations: int = 10

    def __post_init__(self) -> None:
        if self.episode_length < 1 or self.state_len < 1:
            raise ValueError(f"episode_length and state_len must be >= 1 (got {self.episode_length}, "
                             f"{self.state_len})")
        if not 0 < self.known_fraction < 1 or not 0 < self.test_user_fraction < 1:
            raise ValueError("known_fraction and test_user_fraction must lie in (0, 1) "
                             f"(got {self.known_fraction}, {self.test_user_fraction})")


class MovieLensSimulator:
    """The split, the fitted user model and the per-user facts every episode needs."""

    def __init__(self, ml: MovieLens, config: SimulatorConfig | None = None, seed: int = 0) -> None:
        self.config = c = config or SimulatorConfig()
        self.num_items, self.num_users = ml.num_items, ml.num_users
        self.titles = ml.titles
        seqs = user_sequences(ml.user, np.arange(len(ml.user)), ml.timestamp, ml.num_users)  # row ids by time
        known_rows, self.held_out = [], []
        self.known_positives: list[np.ndarray] = []  # per user, positively rated known items, by time
        self.known_mask = np.zeros((ml.num_users, ml.num_items), dtype=bool)
        for u, rows in enumerate(seqs):
            cut = int(np.floor(len(rows) * c.known_fraction))
            known, held = rows[:cut], rows[cut:]
            known_rows.append(known)
            self.known_mask[u, ml.item[known]] = True
            self.known_positives.append(ml.item[known][ml.rating[known] >= c.positive_rating])
            self.held_out.append(dict(zip(ml.item[held].tolist(), ml.rating[held].tolist(), strict=True)))
        known = np.concatenate(known_rows)
        self.mf = RatingMF.fit(ml.user[known], ml.item[known], ml.rating[known], ml.num_users, ml.num_items,
                               c.mf_factors, c.mf_reg, c.mf_iterations, seed)
        self.item_count = np.bincount(ml.item[known], minlength=ml.num_items)  # popularity in known data
        self.candidates = np.ones(ml.num_items, dtype=bool)
        if c.num_candidates is not None:
            if not 1 <= c.num_candidates <= ml.num_items:
                raise ValueError(f"num_candidates must lie in 1..{ml.num_items} (got {c.num_candidates})")
            self.candidates[:] = False
            self.candidates[np.argsort(-self.item_count, kind="stable")[:c.num_candidates]] = True
        users = np.random.default_rng(seed).permutation(ml.num_users)
        n_test = max(1, int(round(ml.num_users * c.test_user_fraction)))
        self.test_users, self.train_users = np.sort(users[:n_test]), np.sort(users[n_test:])

    def initial_state(self, user: int) -> np.ndarray:
        """(state_len,) most recent known positives, most recent last, left-padded with num_items."""
        return _push(np.full(self.config.state_len, self.num_items, dtype=np.int64),
                     self.known_positives[user][-self.config.state_len:])

    def react(self, user: int, item: int, rng: np.random.Generator) -> tuple[float, bool]:
        """(stars, whether they are the user's real held-out rating)."""
        real = self.held_out[user].get(item)
        if real is not None:
            return float(real), True
        pred = float(self.mf.predict(user, item))
        if self.config.noise_std > 0:
            pred += rng.normal(0.0, self.config.noise_std)
        return float(np.clip(np.rint(pred), 1, 5)), False


def _push(state: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Append `items` to a fixed-length, left-padded window, dropping the oldest."""
    items = np.asarray(items, dtype=np.int64)
    if len(items) == 0:
        return state
    return np.concatenate([state, items])[-len(state):]


class RecommendationEnv(gym.Env):
    """Gymnasium env: observation = (state_len,) item indices (padding = num_items); action = an
    item index. `info['action_mask']` marks the items still allowed; an action outside it raises.
    `reset(options={'user': u})` starts a session for a given user, else one is drawn at random."""

    metadata = {"render_modes": []}

    def __init__(self, simulator: MovieLensSimulator, users: str | np.ndarray = "train") -> None:
        self.sim = simulator
        if isinstance(users, str):
            if users not in ("train", "test"):
                raise ValueError(f"users must be 'train', 'test' or an array of user indices (got {users!r})")
            users = simulator.train_users if users == "train" else simulator.test_users
        self.users = np.asarray(users, dtype=np.int64)
        n, s = simulator.num_items, simulator.config.state_len
        self.observation_space = spaces.MultiDiscrete(np.full(s, n + 1))
        self.action_space = spaces.Discrete(n)
        self.user = -1

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if options and "user" in options:
            self.user = int(options["user"])
            if not 0 <= self.user < self.sim.num_users:
                raise ValueError(f"user {self.user} outside 0..{self.sim.num_users - 1}")
        else:
            self.user = int(self.users[self.np_random.integers(len(self.users))])
        self.mask = ~self.sim.known_mask[self.user] & self.sim.candidates
        self.state = self.sim.initial_state(self.user)
        self.t = 0
        return self.state.copy(), self._info()

    def step(self, action):
        item = int(action)
        if self.user < 0:
            raise RuntimeError("call reset() before step()")
        if not 0 <= item < self.sim.num_items or not self.mask[item]:
            why = "outside the catalogue" if not 0 <= item < self.sim.num_items else (
                "already recommended in this session or already rated by the user")
            raise ValueError(f"action {item} is not allowed: {why}")
        stars, real = self.sim.react(self.user, item, self.np_random)
        self.mask[item] = False
        hit = stars >= self.sim.config.positive_rating
        if hit:
            self.state = _push(self.state, [item])
        self.t += 1
        terminated = self.t >= self.sim.config.episode_length
        info = self._info() | {"stars": stars, "real": real, "hit": hit, "item": item}
        return self.state.copy(), (stars - 3.0) / 2.0, terminated, False, info

    def _info(self) -> dict:
        return {"user": self.user, "action_mask": self.mask.copy()}
