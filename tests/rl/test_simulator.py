"""The MovieLens simulator: its MF user model, determinism per seed, no repeats, reactions."""

from __future__ import annotations

import numpy as np
import pytest

from moekit.data.movielens import synthetic_movielens
from moekit.rl.simulator import MovieLensSimulator, RatingMF, RecommendationEnv, SimulatorConfig


def _sim(noise: float = 0.5, seed: int = 0, **kw) -> MovieLensSimulator:
    ml = synthetic_movielens(num_users=25, num_items=40, ratings_per_user=15, seed=2)
    config = SimulatorConfig(episode_length=6, state_len=4, noise_std=noise, mf_factors=4, mf_iterations=5,
                             **kw)
    return MovieLensSimulator(ml, config, seed=seed)


def _rollout(env: RecommendationEnv, seed: int) -> list:
    rng = np.random.default_rng(seed)
    state, info = env.reset(seed=seed)
    trace = [info["user"], state.tolist()]
    done = False
    while not done:
        action = int(rng.choice(np.flatnonzero(info["action_mask"])))
        state, reward, done, _, info = env.step(action)
        trace.append((action, reward, info["stars"], info["real"], state.tolist()))
    return trace


def test_same_seed_same_sessions_other_seed_other_sessions():
    a = [_rollout(RecommendationEnv(_sim(), "train"), s) for s in range(5)]
    b = [_rollout(RecommendationEnv(_sim(), "train"), s) for s in range(5)]
    assert a == b
    c = [_rollout(RecommendationEnv(_sim(), "train"), s + 100) for s in range(5)]
    assert a != c
    assert not np.array_equal(_sim(seed=0).test_users, _sim(seed=1).test_users)


def test_never_recommends_an_item_twice_nor_a_known_one():
    sim = _sim()
    env = RecommendationEnv(sim, "test")
    for seed in range(10):
        state, info = env.reset(seed=seed)
        user = info["user"]
        assert user in sim.test_users
        np.testing.assert_array_equal(info["action_mask"], ~sim.known_mask[user])
        shown = []
        for _ in range(sim.config.episode_length):
            action = int(np.random.default_rng(seed).choice(np.flatnonzero(info["action_mask"])))
            _, _, done, _, info = env.step(action)
            shown.append(action)
            assert not info["action_mask"][action]
        assert done and len(set(shown)) == len(shown)
        assert not sim.known_mask[user, shown].any()
        with pytest.raises(ValueError, match="already recommended"):
            env.step(shown[0])
    with pytest.raises(ValueError, match="outside the catalogue"):
        env.reset(options={"user": 0})
        env.step(sim.num_items)


def test_reactions_use_held_out_ratings_then_the_rounded_mf_prediction():
    sim = _sim(noise=0.0)
    env = RecommendationEnv(sim, "test")
    user = int(sim.test_users[0])
    held_item, held_stars = next(iter(sim.held_out[user].items()))
    env.reset(options={"user": user})
    _, reward, _, _, info = env.step(held_item)
    assert info["real"] and info["stars"] == held_stars and reward == (held_stars - 3) / 2
    other = next(i for i in np.flatnonzero(info["action_mask"]) if i not in sim.held_out[user])
    state, reward, _, _, info = env.step(int(other))
    expected = float(np.clip(np.rint(sim.mf.predict(user, other)), 1, 5))
    assert not info["real"] and info["stars"] == expected and reward == (expected - 3) / 2
    assert (other in state) == (expected >= 4)  # only a liked item enters the state


def test_initial_state_is_the_latest_known_positives():
    sim = _sim()
    for u in range(5):
        pos = sim.known_positives[u].tolist()
        expected = ([sim.num_items] * 4 + pos)[-4:]
        assert sim.initial_state(u).tolist() == expected


def test_rating_mf_half_step_is_the_ridge_solution():
    rng = np.random.default_rng(0)
    user, item = rng.integers(0, 6, 60), rng.integers(0, 9, 60)
    rating = rng.integers(1, 6, 60).astype(float)
    mf = RatingMF.fit(user, item, rating, 6, 9, factors=3, reg=2.0, iterations=3, seed=0)
    # the last half-step solved the items given the users: check item 4 with numpy's least squares
    rows = item == 4
    X = np.c_[mf.user_factors[user[rows]], np.ones(rows.sum())]
    y = rating[rows] - mf.mu - mf.user_bias[user[rows]]
    A = np.r_[X, np.sqrt(2.0) * np.eye(4)]
    w = np.linalg.lstsq(A, np.r_[y, np.zeros(4)], rcond=None)[0]
    np.testing.assert_allclose(np.r_[mf.item_factors[4], mf.item_bias[4]], w, atol=1e-8)
    # and it fits better than the global mean
    rmse = np.sqrt(np.mean((mf.predict(user, item) - rating) ** 2))
    assert rmse < np.std(rating)
    np.testing.assert_allclose(mf.predict_all(2), mf.predict(2, np.arange(9)))


def test_candidates_restrict_sessions_to_the_most_rated_movies():
    sim = _sim(num_candidates=10)
    top = set(np.argsort(-sim.item_count, kind="stable")[:10].tolist())
    env = RecommendationEnv(sim, "train")
    _, info = env.reset(seed=0)
    known = set(np.flatnonzero(sim.known_mask[info["user"]]).tolist())
    assert set(np.flatnonzero(info["action_mask"]).tolist()) == top - known
    with pytest.raises(ValueError, match="num_candidates must lie in"):
        _sim(num_candidates=0)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="known_fraction"):
        SimulatorConfig(known_fraction=1.0)
    with pytest.raises(ValueError, match="users must be 'train', 'test'"):
        RecommendationEnv(_sim(), "valid")
