"""Replay buffer: capacity, overwrite order, uniform sampling, mask round trip."""

from __future__ import annotations

import numpy as np
import pytest

from moekit.rl.replay import ReplayBuffer


def _fill(buf: ReplayBuffer, n: int, num_items: int = 11) -> None:
    for t in range(n):
        mask = np.zeros(num_items, dtype=bool)
        mask[t % num_items] = True
        buf.add(np.full(3, t), action=t, reward=float(t), next_state=np.full(3, t + 1), done=t % 2 == 0,
                next_mask=mask)


def test_capacity_is_respected_and_oldest_are_overwritten():
    buf = ReplayBuffer(capacity=5, state_len=3, num_items=11)
    _fill(buf, 3)
    assert len(buf) == 3
    _fill(buf, 8)  # actions 0..7 after 0..2: the 5 newest are 3..7
    assert len(buf) == 5
    assert sorted(buf.action.tolist()) == [3, 4, 5, 6, 7]
    batch = buf.sample(200, np.random.default_rng(0))
    assert set(batch.action.tolist()) <= {3, 4, 5, 6, 7}
    # every field of a sampled transition belongs to the same stored transition
    np.testing.assert_array_equal(batch.state[:, 0], batch.action)
    np.testing.assert_array_equal(batch.next_state[:, 0], batch.action + 1)
    np.testing.assert_array_equal(batch.reward, batch.action.astype(np.float32))
    np.testing.assert_array_equal(batch.done, batch.action % 2 == 0)
    np.testing.assert_array_equal(batch.next_mask.argmax(1), batch.action % 11)
    assert batch.next_mask.sum(1).tolist() == [1] * 200


def test_sampling_is_uniform_over_stored_transitions():
    buf = ReplayBuffer(capacity=10, state_len=3, num_items=11)
    _fill(buf, 10)
    n = 100_000
    counts = np.bincount(buf.sample(n, np.random.default_rng(1)).action, minlength=10)
    # each count is Binomial(n, 1/10): sd = sqrt(n * .1 * .9) ~ 95; allow 5 sd
    assert np.abs(counts - n / 10).max() < 5 * np.sqrt(n * 0.1 * 0.9)
    # and a chi-square statistic well inside its 9-dof distribution (99.9% quantile 27.9)
    assert ((counts - n / 10) ** 2 / (n / 10)).sum() < 27.9


def test_bad_use_is_rejected():
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        ReplayBuffer(0, 3, 5)
    buf = ReplayBuffer(4, 3, 5)
    with pytest.raises(ValueError, match="empty replay buffer"):
        buf.sample(1, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"next_mask must have shape \(5,\)"):
        buf.add(np.zeros(3), 0, 0.0, np.zeros(3), False, np.ones(4, dtype=bool))
