"""Experience replay (Lin 1992; Mnih et al. 2015): a fixed-capacity ring buffer sampled uniformly.

Transitions of the recommendation env: state and next state are item windows (S,), the action an
item, and `next_mask` the items still allowed in the next state (stored bit-packed: the Double-DQN
argmax must not pick an item the env would refuse).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Batch:
    state: np.ndarray  # (B, S) int64
    action: np.ndarray  # (B,) int64
    reward: np.ndarray  # (B,) float32
    next_state: np.ndarray  # (B, S) int64
    done: np.ndarray  # (B,) bool
    next_mask: np.ndarray  # (B, I) bool


class ReplayBuffer:
    def __init__(self, capacity: int, state_len: int, num_items: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1 (got {capacity})")
        self.capacity, self.num_items = capacity, num_items
        self.state = np.zeros((capacity, state_len), dtype=np.int64)
        self.next_state = np.zeros((capacity, state_len), dtype=np.int64)
        self.action = np.zeros(capacity, dtype=np.int64)
        self.reward = np.zeros(capacity, dtype=np.float32)
        self.done = np.zeros(capacity, dtype=bool)
        self.next_mask = np.zeros((capacity, (num_items + 7) // 8), dtype=np.uint8)
        self.size, self.pos = 0, 0

    def __len__(self) -> int:
        return self.size

    def add(self, state, action: int, reward: float, next_state, done: bool, next_mask) -> None:
        """Store one transition, overwriting the oldest once full."""
        next_mask = np.asarray(next_mask, dtype=bool)
        if next_mask.shape != (self.num_items,):
            raise ValueError(f"next_mask must have shape ({self.num_items},), got {next_mask.shape}")
        i = self.pos
        self.state[i], self.action[i], self.reward[i] = state, action, reward
        self.next_state[i], self.done[i] = next_state, done
        self.next_mask[i] = np.packbits(next_mask)
        self.pos = (self.pos + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int, rng: np.random.Generator) -> Batch:
        """`batch_size` transitions drawn uniformly with replacement from those stored."""
        if self.size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        idx = rng.integers(0, self.size, size=batch_size)
        mask = np.unpackbits(self.next_mask[idx], axis=1, count=self.num_items).astype(bool)
        return Batch(self.state[idx], self.action[idx], self.reward[idx], self.next_state[idx],
                     self.done[idx], mask)
