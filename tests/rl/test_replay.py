"""Replay buffer: capacity, overwrite order, uniform sampling, mask round trip; the n-step collector."""

from __future__ import annotations

import numpy as np
import pytest

from moekit.rl.dqn import n_step_transitions
from moekit.rl.replay import NStepCollector, ReplayBuffer


def _obs(t: int) -> dict:
    return {"history": np.full(3, t, dtype=np.int64), "stars": np.float32([t, t])}


def _fill(buf: ReplayBuffer, n: int, num_items: int = 11) -> None:
    for t in range(n):
        mask = np.zeros(num_items, dtype=bool)
        mask[t % num_items] = True
        buf.add(_obs(t), action=t, ret=float(t), discount=0.5 * (t % 2), next_obs=_obs(t + 1), next_mask=mask)


def test_capacity_is_respected_and_oldest_are_overwritten():
    buf = ReplayBuffer(capacity=5, obs_example=_obs(0), num_items=11)
    _fill(buf, 3)
    assert len(buf) == 3
    _fill(buf, 8)  # actions 0..7 after 0..2: the 5 newest are 3..7
    assert len(buf) == 5
    assert sorted(buf.action.tolist()) == [3, 4, 5, 6, 7]
    batch = buf.sample(200, np.random.default_rng(0))
    assert set(batch.action.tolist()) <= {3, 4, 5, 6, 7}
    # every field of a sampled transition belongs to the same stored transition
    np.testing.assert_array_equal(batch.obs["history"][:, 0], batch.action)
    np.testing.assert_array_equal(batch.obs["stars"][:, 1], batch.action.astype(np.float32))
    np.testing.assert_array_equal(batch.next_obs["history"][:, 0], batch.action + 1)
    np.testing.assert_array_equal(batch.ret, batch.action.astype(np.float32))
    np.testing.assert_array_equal(batch.discount, 0.5 * (batch.action % 2))
    np.testing.assert_array_equal(batch.next_mask.argmax(1), batch.action % 11)
    assert batch.next_mask.sum(1).tolist() == [1] * 200
    assert batch.obs["stars"].dtype == np.float32 and batch.obs["history"].dtype == np.int64


def test_sampling_is_uniform_over_stored_transitions():
    buf = ReplayBuffer(capacity=10, obs_example=_obs(0), num_items=11)
    _fill(buf, 10)
    n = 100_000
    counts = np.bincount(buf.sample(n, np.random.default_rng(1)).action, minlength=10)
    # each count is Binomial(n, 1/10): a chi-square statistic well inside its 9-dof distribution
    assert ((counts - n / 10) ** 2 / (n / 10)).sum() < 27.9  # 99.9% quantile


def test_n_step_collector_matches_the_hand_computed_returns():
    gamma, n = 0.5, 3
    buf = ReplayBuffer(capacity=20, obs_example=_obs(0), num_items=4)
    col = NStepCollector(buf, n, gamma)
    rewards = [1.0, 2.0, -1.0, 4.0, 0.5]
    mask = np.ones(4, dtype=bool)
    for t, r in enumerate(rewards):
        col.add(_obs(t), t, r, _obs(t + 1), mask, terminated=t == len(rewards) - 1)
    assert len(buf) == 5 and not col.pending
    got = {int(a): (float(r), float(d), int(o)) for a, r, d, o in
           zip(buf.action[:5], buf.ret[:5], buf.discount[:5], buf.next_obs["history"][:5, 0], strict=True)}
    # t=0: 1 + .5*2 + .25*(-1) = 1.75, bootstrap from s_3 with .5^3; t=1: 2 - .5 + .25*4 = 2.5 from s_4
    # t=2: -1 + 2 + .25*.5 = 1.125, ends at the terminal: discount 0; t=3: 4 + .25 = 4.25; t=4: .5
    assert got == {0: (1.75, 0.125, 3), 1: (2.5, 0.125, 4), 2: (1.125, 0.0, 5), 3: (4.25, 0.0, 5), 4: (0.5, 0.0, 5)}
    # the pure function says the same, and a cut (not terminated) episode bootstraps at its end
    assert n_step_transitions(rewards, gamma, n, terminated=True) == [
        (1.75, 3, 0.125), (2.5, 3, 0.125), (1.125, 3, 0.0), (4.25, 2, 0.0), (0.5, 1, 0.0)]
    assert n_step_transitions([1.0, 1.0], 0.9, 3, terminated=False) == [
        (pytest.approx(1.9), 2, pytest.approx(0.81)), (1.0, 1, 0.9)]


def test_bad_use_is_rejected():
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        ReplayBuffer(0, _obs(0), 5)
    buf = ReplayBuffer(4, _obs(0), 5)
    with pytest.raises(ValueError, match="empty replay buffer"):
        buf.sample(1, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"next_mask must have shape \(5,\)"):
        buf.add(_obs(0), 0, 0.0, 1.0, _obs(1), np.ones(4, dtype=bool))
    with pytest.raises(ValueError, match="n_step must be >= 1"):
        NStepCollector(buf, 0, 0.9)
