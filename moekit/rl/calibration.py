"""What logged ratings can say about the simulator's dynamics (`moekit.rl.simulator`).

A user's ratings are cut into sessions wherever more than `gap_seconds` pass between two ratings.
Three things are measured, on whichever rows are given (the simulator's known ratings, so nothing
held out is used):

- the leave rate: the chance that a session ends right after a rating of at least `threshold`
  stars (h in the simulator), and after a disappointing one (below `threshold`);
- boredom: the within-user slope of the rating residual (rating minus a biased-MF prediction fitted
  on the same rows) on the decayed genre exposure ĝ_i · e_t of the simulator, with its standard
  error. A negative slope would say ratings fall with genre repetition (β = -slope); MovieLens
  gives a slightly positive one, because a rating session logs movies seen long before rather
  than a sequence consumed in that order, so boredom is not identified by these data.

Everything takes plain arrays, so any interactions log with timestamps and item genres works.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from moekit.rl.simulator import LoggedRatings, RatingMF


@dataclass
class DynamicsEstimate:
    """What `estimate_dynamics` measured (see the module docstring)."""

    sessions: int
    """Number of sessions (a gap of more than gap_seconds starts a new one)."""
    mean_session_length: float
    median_session_length: float
    leave_rate: float
    """P(session ends right after a rating >= threshold)."""
    leave_rate_disappointed: float
    """P(session ends right after a rating < threshold)."""
    boredom_slope: float
    """Stars per unit of decayed genre exposure (negative = boredom), within users."""
    boredom_slope_se: float
    ratings: int
    gap_seconds: int
    threshold: float
    decay: float

    def as_dict(self) -> dict:
        """The fields as a JSON-ready dict."""
        return asdict(self)


def session_ids(user: np.ndarray, timestamp: np.ndarray, gap_seconds: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, session id per row of `order`): rows sorted by user then time (ties by input order);
    a new session starts at each user's first rating and after every gap longer than gap_seconds."""
    order = np.lexsort((np.arange(len(user)), timestamp, user))
    u, t = user[order], timestamp[order]
    new = np.r_[True, (u[1:] != u[:-1]) | (t[1:] - t[:-1] > gap_seconds)] if len(u) else np.zeros(0, bool)
    return order, np.cumsum(new) - 1


def genre_exposure(items: np.ndarray, sid: np.ndarray, genre_unit_IG: np.ndarray, decay: float) -> np.ndarray:
    """(N,) ĝ_{i_n} · e_n for the n-th rating of a session sequence: e restarts at each session and
    follows e <- decay * e + ĝ after every rating, as in the simulator."""
    out = np.zeros(len(items))
    e = np.zeros(genre_unit_IG.shape[1])
    for n in range(len(items)):
        if n == 0 or sid[n] != sid[n - 1]:
            e[:] = 0.0
        g = genre_unit_IG[items[n]]
        out[n] = g @ e
        e = decay * e + g
    return out


def estimate_dynamics(data: LoggedRatings, rows: np.ndarray | None = None, gap_seconds: int = 1800,
                      threshold: float = 3.0, decay: float = 0.8, mf_factors: int = 32, seed: int = 0
                      ) -> DynamicsEstimate:
    """Measure leave rates and the genre-repetition effect on `rows` of `data` (default: all)."""
    rows = np.arange(len(data.user)) if rows is None else np.asarray(rows)
    if len(rows) < 2:
        raise ValueError(f"need at least 2 ratings to estimate dynamics (got {len(rows)})")
    user, item = data.user[rows], data.item[rows]
    rating, ts = data.rating[rows].astype(np.float64), data.timestamp[rows]
    order, sid = session_ids(user, ts, gap_seconds)
    u, i, r = user[order], item[order], rating[order]
    last = np.r_[sid[1:] != sid[:-1], True]
    lengths = np.bincount(sid)
    ok = r >= threshold
    g = data.item_genres.astype(np.float64)
    norm = np.linalg.norm(g, axis=1, keepdims=True)
    unit = np.divide(g, norm, out=np.zeros_like(g), where=norm > 0)
    exposure = genre_exposure(i, sid, unit, decay)
    mf = RatingMF.fit(u, i, r, data.num_users, data.num_items, factors=mf_factors, seed=seed)
    residual = r - mf.predict(u, i)
    slope, se = _within_user_slope(residual, exposure, u, data.num_users)
    return DynamicsEstimate(
        sessions=len(lengths), mean_session_length=float(lengths.mean()),
        median_session_length=float(np.median(lengths)),
        leave_rate=float(last[ok].mean()) if ok.any() else float("nan"),
        leave_rate_disappointed=float(last[~ok].mean()) if (~ok).any() else float("nan"),
        boredom_slope=slope, boredom_slope_se=se, ratings=len(rows), gap_seconds=gap_seconds,
        threshold=threshold, decay=decay)


def _within_user_slope(y: np.ndarray, x: np.ndarray, group: np.ndarray, num_groups: int) -> tuple[float, float]:
    """OLS slope of y on x with a fixed effect per group (both demeaned within group), and its
    standard error."""
    count = np.maximum(np.bincount(group, minlength=num_groups), 1)
    yd = y - (np.bincount(group, y, num_groups) / count)[group]
    xd = x - (np.bincount(group, x, num_groups) / count)[group]
    sxx = float((xd * xd).sum())
    if sxx == 0:
        return float("nan"), float("nan")
    slope = float((xd * yd).sum() / sxx)
    dof = max(len(y) - num_groups - 1, 1)
    se = float(np.sqrt(((yd - slope * xd) ** 2).sum() / dof / sxx))
    return slope, se
