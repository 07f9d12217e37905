"""Policies for the recommendation env: baselines, Q-network policies and a lookahead oracle.

A policy is called as `policy(obs, mask, env)` and returns an allowed item. The fair ones use only
`obs` (the observation every policy gets) and `mask` (the allowed items): random, most-popular and
the Q-network policies (DQN, and the myopic greedy ranker, a Q-network trained with γ = 0). Two
references read the simulator through `env` and say so in their names:

- greedy-MF reads the user's MF factors (the taste model) and ranks by predicted stars, blind to the
  session dynamics;
- the lookahead oracle reads the whole hidden state (true reactions, genre exposure, patience) and
  searches a few steps ahead; with depth 1 it is the myopic oracle. It is an upper reference no
  learning policy can reach in general, not a competitor.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from moekit.rl.dqn import QNetwork, masked_argmax, obs_to_tensors
from moekit.rl.simulator import RecommendationEnv, Session, UserSimulator

Policy = Callable[[dict, np.ndarray, RecommendationEnv], int]


def random_policy(seed: int) -> Policy:
    """Uniform over the allowed items (its own generator, seeded)."""
    rng = np.random.default_rng(seed)
    return lambda obs, mask, env: int(rng.choice(np.flatnonzero(mask)))


def most_popular_policy(sim: UserSimulator) -> Policy:
    """The most-rated allowed movie (counts from the known ratings; ties by lower index)."""
    order = np.argsort(-sim.item_count, kind="stable")
    return lambda obs, mask, env: int(order[mask[order]][0])


def greedy_mf_policy(sim: UserSimulator) -> Policy:
    """The allowed movie with the highest MF-predicted rating for this user. Reads the user's MF
    factors (the simulator's taste model): a reference, not a policy that sees only the observation."""
    def act(obs, mask, env):
        pred = sim.mf.predict_all(env.user)
        return int(np.flatnonzero(mask)[np.argmax(pred[mask])])
    return act


def q_policy(net: QNetwork) -> Policy:
    """Greedy on the Q-network's values over the allowed items (DQN; with a γ = 0 network, the myopic ranker)."""
    def act(obs, mask, env):
        with torch.no_grad():
            q, _ = net(obs_to_tensors(obs))
        return int(masked_argmax(q, torch.from_numpy(mask)[None])[0])
    return act


class LookaheadOracle:
    """Tree search on the simulator's hidden state: the value of recommending a is

        Q_d(s, a) = r(s, a) + (1 - h) * [session goes on] * max_{a' in beam(s')} Q_{d-1}(s', a'),  Q_0 = 0

    with the exact reaction r (noise-free taste, boredom), the deterministic patience update and the
    leave probability h folded in as the chance to go on. beam(s) holds the `beam` allowed items with
    the best immediate reactions, taking at most one item per distinct genre set so the search also
    looks at other genres. depth 1 is the myopic oracle (the best immediate reaction)."""

    def __init__(self, sim: UserSimulator, depth: int = 3, beam: int = 6) -> None:
        if depth < 1 or beam < 1:
            raise ValueError(f"depth and beam must be >= 1 (got {depth}, {beam})")
        self.sim, self.depth, self.beam = sim, depth, beam
        self._user, self._base = -1, None
        # items with the same genre set get the same key, for the per-genre-set beam
        self._genre_key = np.unique(sim.item_genres, axis=0, return_inverse=True)[1].ravel()

    def __call__(self, obs, mask, env) -> int:
        s = env.session
        if s.user != self._user:
            self._user, self._base = s.user, self.sim.base_stars(s.user)
        value, item = self._search(s, self.depth)
        return item

    def _beam(self, session: Session) -> tuple[np.ndarray, np.ndarray]:
        x_I = self.sim.expected_stars(session, self._base)
        allowed = np.flatnonzero(session.mask)
        order = allowed[np.argsort(-x_I[allowed], kind="stable")]
        _, first = np.unique(self._genre_key[order], return_index=True)  # best item of each genre set
        chosen = order[np.sort(first)[: self.beam]]
        return chosen, x_I[chosen]

    def _search(self, session: Session, depth: int) -> tuple[float, int]:
        items, stars = self._beam(session)
        go_on = 1.0 - self.sim.config.leave_prob
        best, best_item = -np.inf, int(items[0])
        for item, x in zip(items.tolist(), stars.tolist(), strict=True):
            value = (x - 3.0) / 2.0
            if depth > 1:
                nxt = session.copy()
                if not self.sim.advance(nxt, item, x):
                    value += go_on * self._search(nxt, depth - 1)[0]
            if value > best:
                best, best_item = value, item
        return best, best_item
