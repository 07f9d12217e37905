"""Baselines and the lookahead oracle do what they say; the calibration recovers a planted effect."""

from __future__ import annotations

import numpy as np
import pytest

from moekit.data.movielens import synthetic_movielens
from moekit.rl.calibration import estimate_dynamics, genre_exposure, session_ids
from moekit.rl.policies import LookaheadOracle, greedy_mf_policy, most_popular_policy, random_policy
from moekit.rl.simulator import LoggedRatings, RecommendationEnv, SimulatorConfig, UserSimulator


def _sim(**kw) -> UserSimulator:
    ml = synthetic_movielens(num_users=20, num_items=30, ratings_per_user=10, seed=4)
    config = SimulatorConfig(episode_length=8, state_len=3, session_window=3, mf_factors=4, mf_iterations=3,
                             **kw)
    return UserSimulator(LoggedRatings.from_movielens(ml), config)


def test_baselines_pick_what_they_say():
    sim = _sim()
    env = RecommendationEnv(sim, "test")
    obs, info = env.reset(options={"user": int(sim.test_users[0])})
    mask = info["action_mask"]
    allowed = np.flatnonzero(mask)
    assert most_popular_policy(sim)(obs, mask, env) == allowed[np.argmax(sim.item_count[allowed])]
    pred = sim.mf.predict(env.user, allowed)
    assert greedy_mf_policy(sim)(obs, mask, env) == allowed[int(np.argmax(pred))]
    assert mask[random_policy(0)(obs, mask, env)]


def test_depth_one_oracle_takes_the_best_immediate_reaction():
    sim = _sim()
    env = RecommendationEnv(sim, "train")
    oracle = LookaheadOracle(sim, depth=1)
    for seed in range(3):
        obs, info = env.reset(seed=seed)
        for _ in range(4):
            x = sim.expected_stars(env.session, sim.base_stars(env.user))
            item = oracle(obs, info["action_mask"], env)
            assert x[item] == x[info["action_mask"]].max()
            obs, _, done, _, info = env.step(item)
            if done:
                break


def test_lookahead_avoids_the_boredom_a_myopic_choice_causes():
    """Item 0 is Drama+Comedy (5 stars), 1 Horror (4.8), 2 Drama (5), 3 Comedy (5); boredom 1 star
    per unit without recovery, 3 recommendations. The myopic oracle opens with item 0 (a 5-star tie,
    lowest index), which makes both other 5-star movies 5 - 1/√2; the depth-3 search never shows item
    0 and keeps them fresh: 4.8 + 5 + 5 stars against 5 + 4.8 + (5 - 1/√2)."""
    genres = np.zeros((4, 3), dtype=bool)
    genres[[0, 2], 0] = True  # Drama
    genres[[0, 3], 1] = True  # Comedy
    genres[1, 2] = True  # Horror
    data = LoggedRatings(user=np.array([0, 0, 0, 0, 1]), item=np.array([0, 1, 2, 3, 0]),
                         rating=np.array([5.0, 4.8, 5.0, 5.0, 3.0]), timestamp=np.arange(5), item_genres=genres,
                         num_users=2)
    config = SimulatorConfig(episode_length=3, exclude_known=False, boredom=1.0, boredom_decay=1.0, patience=None,
                             leave_prob=0.0, mf_factors=1, mf_iterations=1)
    sim = UserSimulator(data, config)

    def play(depth):
        env = RecommendationEnv(sim, np.array([0]))
        obs, info = env.reset(options={"user": 0})
        oracle, stars, done, items = LookaheadOracle(sim, depth=depth, beam=4), [], False, []
        while not done:
            item = oracle(obs, info["action_mask"], env)
            obs, _, done, _, info = env.step(item)
            stars, items = stars + [info["stars"]], items + [item]
        return items, stars

    items, stars = play(1)
    assert items[:2] == [0, 1] and stars == pytest.approx([5.0, 4.8, 5 - 1 / np.sqrt(2)])
    items, stars = play(3)
    assert 0 not in items and sorted(stars) == pytest.approx([4.8, 5.0, 5.0])
    with pytest.raises(ValueError, match="depth and beam must be >= 1"):
        LookaheadOracle(sim, depth=0)


def test_calibration_recovers_a_planted_boredom_effect_and_the_leave_rate():
    rng = np.random.default_rng(0)
    num_users, num_items, G = 60, 50, 4
    genres = np.zeros((num_items, G), dtype=bool)
    genres[np.arange(num_items), rng.integers(0, G, num_items)] = True
    unit = genres / np.linalg.norm(genres, axis=1, keepdims=True)
    users, items, ratings, times = [], [], [], []
    beta = 0.4
    for u in range(num_users):
        t = 0
        for _ in range(4):  # 4 sessions of 10 ratings, 1 hour apart
            chosen = rng.choice(num_items, 10, replace=False)
            sid = np.zeros(10, dtype=int)
            e = genre_exposure(chosen, sid, unit, 0.8)
            stars = 3.5 - beta * e + rng.normal(0, 0.3, 10)
            users += [u] * 10
            items += chosen.tolist()
            ratings += stars.tolist()
            times += (t + 60 * np.arange(10)).tolist()
            t += 3600 * 5
    data = LoggedRatings(user=np.array(users), item=np.array(items), rating=np.array(ratings),
                         timestamp=np.array(times), item_genres=genres, num_users=num_users)
    est = estimate_dynamics(data, gap_seconds=1800, mf_factors=2)
    assert est.sessions == num_users * 4 and est.mean_session_length == 10
    assert abs(est.boredom_slope + beta) < 4 * est.boredom_slope_se + 0.05
    assert est.leave_rate + est.leave_rate_disappointed > 0
    order, sid = session_ids(data.user, data.timestamp, 1800)
    assert np.bincount(sid).tolist() == [10] * (num_users * 4)
    with pytest.raises(ValueError, match="at least 2 ratings"):
        estimate_dynamics(data, rows=np.array([0]))
