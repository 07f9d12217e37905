"""The user simulator: each dynamic does what its equation says, all off is the memoryless
simulator (checked against an independent re-implementation), Gymnasium's env checker passes,
same seed same episode."""

from __future__ import annotations

import math

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from moekit.data.movielens import synthetic_movielens
from moekit.rl.simulator import LoggedRatings, RatingMF, RecommendationEnv, SimulatorConfig, UserSimulator

DRAMA, COMEDY, HORROR = 0, 1, 2


def _movielens_sim(config: SimulatorConfig | None = None, seed: int = 0) -> UserSimulator:
    ml = synthetic_movielens(num_users=25, num_items=40, ratings_per_user=15, seed=2)
    config = config or SimulatorConfig(episode_length=6, state_len=4, session_window=3, mf_factors=4,
                                       mf_iterations=5)
    return UserSimulator(LoggedRatings.from_movielens(ml), config, seed=seed)


def _hand_sim(**overrides) -> UserSimulator:
    """User 0 rated items 0..5 with the stars below (real ratings, so x0 is exact); items 6..7 unrated.
    Genres: 0-3 Drama, 4 Comedy, 5 Drama+Comedy, 6 Horror, 7 none. Other users make the MF fit."""
    stars0 = [5, 5, 5, 5, 5, 5]
    user = [0] * 6 + [1, 1, 1, 2, 2, 2]
    item = list(range(6)) + [0, 4, 6, 1, 5, 7]
    rating = stars0 + [4, 3, 2, 5, 4, 3]
    genres = np.zeros((8, 3), dtype=bool)
    genres[[0, 1, 2, 3, 5], DRAMA] = True
    genres[[4, 5], COMEDY] = True
    genres[6, HORROR] = True
    data = LoggedRatings(user=np.array(user), item=np.array(item), rating=np.array(rating, dtype=float),
                         timestamp=np.arange(len(user)), item_genres=genres, num_users=3)
    config = dict(episode_length=20, exclude_known=False, leave_prob=0.0, patience=None, mf_factors=2,
                  mf_iterations=2, test_user_fraction=0.34) | overrides
    return UserSimulator(data, SimulatorConfig(**config), seed=0)


def _play(sim: UserSimulator, user: int, items: list[int], seed: int = 0) -> list[dict]:
    env = RecommendationEnv(sim, np.array([user]))
    env.reset(seed=seed, options={"user": user})
    out = []
    for item in items:
        _, reward, terminated, truncated, info = env.step(item)
        out.append(info | {"reward": reward, "terminated": terminated})
        if terminated:
            break
    return out


# ---------------------------------------------------------------------------- boredom


def test_repeating_a_genre_lowers_the_reaction_by_the_stated_amount():
    beta, lam = 0.5, 0.8
    sim = _hand_sim(boredom=beta, boredom_decay=lam)
    # Drama, Drama, Drama, Comedy, Drama, Drama+Comedy: every base reaction is 5 stars
    got = [r["stars"] for r in _play(sim, 0, [0, 1, 2, 4, 3, 5])]
    # Drama exposure before each Drama: 0, 1, 1 + λ; the Comedy shares no genre
    expected = [5.0, 5 - beta * 1, 5 - beta * (1 + lam), 5.0]
    drama_before_item3 = lam * (1 + lam + lam ** 2)  # after Drama x3 then Comedy
    expected.append(5 - beta * drama_before_item3)
    # Drama+Comedy: ĝ = (1, 1)/√2 against exposure Drama = λ drama_before_item3 + 1, Comedy = λ
    drama_now, comedy_now = lam * drama_before_item3 + 1, lam
    expected.append(5 - beta * (drama_now + comedy_now) / math.sqrt(2))
    assert got == pytest.approx(expected)
    # defaults: the 4th same-genre movie in a row loses β(1 + λ + λ²) = 1.22 stars
    d = SimulatorConfig()
    assert (d.boredom, d.boredom_decay) == (0.5, 0.8)
    got = [r["stars"] for r in _play(_hand_sim(boredom=d.boredom, boredom_decay=d.boredom_decay), 0, [0, 1, 2, 3])]
    assert 5 - got[3] == pytest.approx(1.22)


def test_boredom_recovers_and_a_genre_free_item_is_never_penalised():
    sim = _hand_sim(boredom=0.5, boredom_decay=0.8)
    env = RecommendationEnv(sim, np.array([0]))
    env.reset(options={"user": 0})
    env.step(0)  # Drama
    penalties = []
    for item in (6, 7, 4):  # Horror, no genre, Comedy: the Drama exposure decays by λ each step
        penalties.append(float(sim.boredom_penalty(env.session, 1)))
        env.step(item)
    assert penalties == pytest.approx([0.5, 0.5 * 0.8, 0.5 * 0.8 ** 2])
    assert float(sim.boredom_penalty(env.session, 7)) == 0.0


def test_expected_stars_match_the_reactions():
    sim = _movielens_sim(SimulatorConfig(episode_length=8, mf_factors=4, mf_iterations=5, leave_prob=0.0))
    env = RecommendationEnv(sim, "test")
    rng = np.random.default_rng(0)
    for seed in range(3):
        _, info = env.reset(seed=seed)
        base = sim.base_stars(env.user)
        for _ in range(5):
            x = sim.expected_stars(env.session, base)
            item = int(rng.choice(np.flatnonzero(info["action_mask"])))
            _, _, done, _, info = env.step(item)
            assert info["stars"] == pytest.approx(x[item])
            if done:
                break


# --------------------------------------------------------------------------- patience


def test_patience_falls_after_poor_items_and_the_session_ends_at_zero():
    # user 1 rated item 0: 4, item 4: 3, item 6: 2 stars; the unrated items get the rounded MF
    sim = _hand_sim(patience=3.0, patience_threshold=3.0, patience_max_drop=2.0)
    assert sim.config.leave_prob == 0
    steps = _play(sim, 1, [0, 4, 6])
    assert [s["stars"] for s in steps] == [4.0, 3.0, 2.0]
    assert [s["patience"] for s in steps] == [3.0, 3.0, 2.0]  # only the 2-star item costs: τ - 2 = 1
    assert not any(s["terminated"] for s in steps)
    # a 1-star reaction costs at most d = 2: build one with boredom (a 2-star item after Horror x2)
    sim = _hand_sim(patience=2.0, boredom=1.0, boredom_decay=1.0)
    env = RecommendationEnv(sim, np.array([1]))
    env.reset(options={"user": 1})
    env.session.exposure[HORROR] = 5.0  # as if five horror movies had been shown: item 6 -> 2 - 5 -> 1 star
    _, reward, terminated, _, info = env.step(6)
    assert info["stars"] == 1.0 and reward == -1.0
    assert info["patience"] == 0.0 and terminated and info["why"] == "patience"
    with pytest.raises(RuntimeError, match="the session has ended"):
        env.step(0)


def test_patience_counts_the_shortfall_below_the_threshold():
    sim = _hand_sim(patience=10.0, patience_threshold=4.0, patience_max_drop=2.0)
    steps = _play(sim, 1, [0, 4, 6])  # 4, 3, 2 stars -> drops 0, 1, 2
    assert [s["patience"] for s in steps] == [10.0, 9.0, 7.0]


def test_sessions_end_by_the_base_leave_rate():
    h, L, n = 0.2, 6, 3000
    sim = _movielens_sim(SimulatorConfig(episode_length=L, leave_prob=h, boredom=0.0, patience=None,
                                         mf_factors=4, mf_iterations=5))
    env = RecommendationEnv(sim, "train")
    rng = np.random.default_rng(1)
    lengths = []
    for seed in range(n):
        _, info = env.reset(seed=seed)
        t, done = 0, False
        while not done:
            _, _, done, _, info = env.step(int(rng.choice(np.flatnonzero(info["action_mask"]))))
            t += 1
        lengths.append(t)
    lengths = np.array(lengths)
    # length = min(Geometric(h), L): P(length > t) = (1 - h)^t
    expected_mean = sum((1 - h) ** t for t in range(L))
    sd = lengths.std() / np.sqrt(n)
    assert abs(lengths.mean() - expected_mean) < 4 * sd
    assert abs((lengths == 1).mean() - h) < 4 * np.sqrt(h * (1 - h) / n)


# ------------------------------------------------------------------ dynamics off == memoryless


class MemorylessReference:
    """The simulator before the dynamics, written out independently: real held-out rating, else
    the MF prediction (+ noise) rounded and clipped; 10 recommendations; liked movies join the state."""

    def __init__(self, sim: UserSimulator, ml, known_fraction: float = 0.8) -> None:
        self.sim, self.held = sim, {}
        for u in range(ml.num_users):
            rows = np.flatnonzero(ml.user == u)
            rows = rows[np.lexsort((rows, ml.timestamp[rows]))]
            cut = int(np.floor(len(rows) * known_fraction))
            self.held[u] = {int(ml.item[r]): float(ml.rating[r]) for r in rows[cut:]}

    def react(self, user: int, item: int, rng) -> tuple[float, bool]:
        if item in self.held[user]:
            return self.held[user][item], True
        pred = float(self.sim.mf.predict(user, item))
        if self.sim.config.noise_std > 0:
            pred += rng.normal(0.0, self.sim.config.noise_std)
        return float(np.clip(np.rint(pred), 1, 5)), False


@pytest.mark.parametrize("noise", [0.0, 0.7])
def test_all_dynamics_off_is_the_memoryless_simulator(noise):
    ml = synthetic_movielens(num_users=25, num_items=40, ratings_per_user=15, seed=2)
    config = SimulatorConfig.memoryless(state_len=4, noise_std=noise, mf_factors=4, mf_iterations=5)
    assert not config.has_dynamics and config.episode_length == 10
    sim = UserSimulator(LoggedRatings.from_movielens(ml), config, seed=0)
    ref = MemorylessReference(sim, ml)
    env = RecommendationEnv(sim, "train")
    pick = np.random.default_rng(3)
    for seed in range(8):
        user = int(sim.train_users[seed])
        obs, info = env.reset(seed=seed, options={"user": user})
        ref_rng = np.random.default_rng(seed)  # what reset(seed) gives the env
        state = ([ml.num_items] * 4 + [int(i) for i in sim.known_positives[user]])[-4:]
        assert obs["history"].tolist() == state
        for t in range(10):
            item = int(pick.choice(np.flatnonzero(info["action_mask"])))
            stars, real = ref.react(user, item, ref_rng)
            obs, reward, terminated, truncated, info = env.step(item)
            assert (info["stars"], info["real"], reward) == (stars, real, (stars - 3) / 2)
            if stars >= 4:
                state = (state + [item])[-4:]
            assert obs["history"].tolist() == state
            assert terminated == (t == 9) and not truncated
    assert sim.config.patience is None and env.session.patience == math.inf


# ------------------------------------------------------------------- gymnasium and seeding


def test_gymnasium_env_checker_passes():
    ml = synthetic_movielens(num_users=25, num_items=40, ratings_per_user=15, seed=2)
    sim = UserSimulator(LoggedRatings.from_movielens(ml), SimulatorConfig(
        episode_length=6, state_len=4, session_window=3, exclude_known=False, mf_factors=4, mf_iterations=5))
    check_env(RecommendationEnv(sim, "train"), skip_render_check=True)


def _rollout(env: RecommendationEnv, seed: int) -> list:
    rng = np.random.default_rng(seed)
    obs, info = env.reset(seed=seed)
    trace = [info["user"], {k: v.tolist() for k, v in obs.items()}]
    done = False
    while not done:
        action = int(rng.choice(np.flatnonzero(info["action_mask"])))
        obs, reward, done, _, info = env.step(action)
        trace.append((action, reward, info["stars"], info["why"], {k: v.tolist() for k, v in obs.items()}))
    return trace


def test_same_seed_same_episode_other_seed_other_episode():
    config = SimulatorConfig(episode_length=12, state_len=4, session_window=3, noise_std=0.5, leave_prob=0.1,
                             mf_factors=4, mf_iterations=5)
    a = [_rollout(RecommendationEnv(_movielens_sim(config), "train"), s) for s in range(6)]
    b = [_rollout(RecommendationEnv(_movielens_sim(config), "train"), s) for s in range(6)]
    assert a == b
    c = [_rollout(RecommendationEnv(_movielens_sim(config), "train"), s + 100) for s in range(6)]
    assert a != c
    assert not np.array_equal(_movielens_sim(seed=0).test_users, _movielens_sim(seed=1).test_users)


def test_observation_shows_the_session_window_and_never_repeats():
    sim = _movielens_sim()
    env = RecommendationEnv(sim, "test")
    obs, info = env.reset(seed=0)
    user = info["user"]
    np.testing.assert_array_equal(info["action_mask"], ~sim.known_mask[user])
    shown, stars = [], []
    done = False
    while not done:
        action = int(np.flatnonzero(info["action_mask"])[0])
        obs, _, done, _, info = env.step(action)
        shown.append(action)
        stars.append(info["stars"])
        assert not info["action_mask"][action]
        k = min(len(shown), 3)
        assert obs["items"][-k:].tolist() == shown[-k:] and obs["stars"][-k:].tolist() == pytest.approx(stars[-k:])
        assert obs["step"][0] == len(shown) and obs in env.observation_space
    assert len(set(shown)) == len(shown) and not sim.known_mask[user, shown].any()
    with pytest.raises(ValueError, match="already recommended"):
        env.reset(options={"user": user})
        env.step(int(np.flatnonzero(sim.known_mask[user])[0]))
    with pytest.raises(ValueError, match="outside the catalogue"):
        env.step(sim.num_items)


def test_catalogue_exhaustion_ends_the_session():
    sim = _hand_sim(episode_length=50)
    steps = _play(sim, 0, list(range(8)))
    assert len(steps) == 8 and steps[-1]["why"] == "catalogue" and steps[-1]["terminated"]


# -------------------------------------------------------------------------- the taste model


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
    rmse = np.sqrt(np.mean((mf.predict(user, item) - rating) ** 2))
    assert rmse < np.std(rating)
    np.testing.assert_allclose(mf.predict_all(2), mf.predict(2, np.arange(9)))


def test_candidates_restrict_sessions_to_the_most_rated_movies():
    sim = _movielens_sim(SimulatorConfig(num_candidates=10, mf_factors=4, mf_iterations=5))
    top = set(np.argsort(-sim.item_count, kind="stable")[:10].tolist())
    env = RecommendationEnv(sim, "train")
    _, info = env.reset(seed=0)
    known = set(np.flatnonzero(sim.known_mask[info["user"]]).tolist())
    assert set(np.flatnonzero(info["action_mask"]).tolist()) == top - known
    with pytest.raises(ValueError, match="num_candidates must lie in"):
        _movielens_sim(SimulatorConfig(num_candidates=0))


def test_bad_input_is_rejected_in_one_line():
    with pytest.raises(ValueError, match="known_fraction must be < 1"):
        SimulatorConfig(known_fraction=1.0)
    with pytest.raises(ValueError, match="boredom_decay must be <= 1"):
        SimulatorConfig(boredom_decay=1.5)
    with pytest.raises(ValueError, match="leave_prob must be < 1"):
        SimulatorConfig(leave_prob=1.0)
    with pytest.raises(ValueError, match="users must be 'train', 'test'"):
        RecommendationEnv(_movielens_sim(), "valid")
    with pytest.raises(ValueError, match="item indices must lie in 0..7"):
        LoggedRatings(user=np.array([0]), item=np.array([8]), rating=np.array([3.0]), timestamp=np.array([0]),
                      item_genres=np.zeros((8, 2), bool), num_users=1)


def test_a_raw_log_with_string_ids_and_categories_feeds_the_simulator():
    users = ["ann", "ann", "ann", "bob", "bob", "cy", "cy", "cy"]
    items = ["B07", "A01", "C3", "A01", "B07", "C3", "D9", "A01"]
    cats = {"A01": ("drama",), "B07": ("comedy", "drama"), "D9": ("horror",)}  # C3 has none
    data = LoggedRatings.from_raw(users, items, [5, 4, 3, 2, 5, 4, 1, 3], [3, 1, 2, 1, 2, 5, 4, 6],
                                  item_categories=cats, name="mine")
    assert data.num_users == 3 and data.num_items == 4 and data.titles == ["A01", "B07", "C3", "D9"]
    # categories in sorted order: comedy, drama, horror
    assert data.item_genres.tolist() == [[False, True, False], [True, True, False], [False, False, False],
                                         [False, False, True]]
    assert data.user.tolist() == [0, 0, 0, 1, 1, 2, 2, 2] and data.item.tolist() == [1, 0, 2, 0, 1, 2, 3, 0]
    sim = UserSimulator(data, SimulatorConfig(exclude_known=False, leave_prob=0.0, mf_factors=2, mf_iterations=2,
                                              test_user_fraction=0.34), seed=0)
    steps = _play(sim, 0, [0, 1])
    # ann's real ratings: A01 4, B07 5; B07 shares drama with A01: cos = 1/√2 -> 5 - 0.5/√2
    assert [s["stars"] for s in steps] == pytest.approx([4.0, 5 - 0.5 / math.sqrt(2)])
