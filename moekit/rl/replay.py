"""Experience replay (Lin 1992; Mnih et al. 2015) with n-step transitions: a fixed-capacity ring
buffer sampled uniformly, fed by `NStepCollector`.

A stored transition is (s_t, a_t, R_t, discount_t, s_{t+m}, mask_{t+m}): the n-step return
R_t = Σ_{k<m} γ^k r_{t+k}, the bootstrap factor γ^m (0 when the episode terminated within the m
steps) and the observation and allowed items m steps later (stored bit-packed: the Double-DQN
argmax must not pick an item the env would refuse). Observations are dicts of fixed-shape arrays.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np


@dataclass
class Batch:
    """A sample of n-step transitions, every field batched along its first dimension."""

    obs: dict[str, np.ndarray]  # each (B, ...)
    action: np.ndarray  # (B,) int64
    ret: np.ndarray  # (B,) float32 n-step return
    discount: np.ndarray  # (B,) float32 γ^m, 0 at a terminal
    next_obs: dict[str, np.ndarray]
    next_mask: np.ndarray  # (B, I) bool


class ReplayBuffer:
    """Fixed-capacity ring buffer of n-step transitions with dict observations, sampled uniformly."""

    def __init__(self, capacity: int, obs_example: dict[str, np.ndarray], num_items: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1 (got {capacity})")
        self.capacity, self.num_items = capacity, num_items
        self.obs = {k: np.zeros((capacity, *np.shape(v)), dtype=np.asarray(v).dtype) for k, v in obs_example.items()}
        self.next_obs = {k: np.zeros_like(v) for k, v in self.obs.items()}
        self.action = np.zeros(capacity, dtype=np.int64)
        self.ret = np.zeros(capacity, dtype=np.float32)
        self.discount = np.zeros(capacity, dtype=np.float32)
        self.next_mask = np.zeros((capacity, (num_items + 7) // 8), dtype=np.uint8)
        self.size, self.pos = 0, 0

    def __len__(self) -> int:
        return self.size

    def add(self, obs: dict, action: int, ret: float, discount: float, next_obs: dict, next_mask) -> None:
        """Store one transition, overwriting the oldest once full."""
        next_mask = np.asarray(next_mask, dtype=bool)
        if next_mask.shape != (self.num_items,):
            raise ValueError(f"next_mask must have shape ({self.num_items},), got {next_mask.shape}")
        i = self.pos
        for k in self.obs:
            self.obs[k][i], self.next_obs[k][i] = obs[k], next_obs[k]
        self.action[i], self.ret[i], self.discount[i] = action, ret, discount
        self.next_mask[i] = np.packbits(next_mask)
        self.pos = (self.pos + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int, rng: np.random.Generator) -> Batch:
        """`batch_size` transitions drawn uniformly with replacement from those stored."""
        if self.size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        idx = rng.integers(0, self.size, size=batch_size)
        mask = np.unpackbits(self.next_mask[idx], axis=1, count=self.num_items).astype(bool)
        return Batch({k: v[idx] for k, v in self.obs.items()}, self.action[idx], self.ret[idx],
                     self.discount[idx], {k: v[idx] for k, v in self.next_obs.items()}, mask)


class NStepCollector:
    """Turns an episode's one-step transitions into n-step ones and adds them to a `ReplayBuffer`.

    `add(obs, action, reward, next_obs, next_mask, terminated, truncated)` after every env step:
    once n steps are pending the oldest becomes an n-step transition; at the end of an episode
    every pending one is flushed (discount 0 if it terminated, γ^m if it was cut)."""

    def __init__(self, buffer: ReplayBuffer, n: int, gamma: float) -> None:
        if n < 1:
            raise ValueError(f"n_step must be >= 1 (got {n})")
        self.buffer, self.n, self.gamma = buffer, n, gamma
        self.pending: deque = deque()

    def add(self, obs, action: int, reward: float, next_obs, next_mask, terminated: bool,
            truncated: bool = False) -> None:
        self.pending.append((obs, action, reward))
        if terminated or truncated:
            while self.pending:
                self._emit(next_obs, next_mask, 0.0 if terminated else None)
        elif len(self.pending) == self.n:
            self._emit(next_obs, next_mask, None)

    def _emit(self, next_obs, next_mask, end_discount: float | None) -> None:
        m = len(self.pending)
        ret = sum(self.gamma ** k * r for k, (_, _, r) in enumerate(self.pending))
        obs, action, _ = self.pending.popleft()
        self.buffer.add(obs, action, ret, self.gamma ** m if end_discount is None else end_discount, next_obs,
                        next_mask)
