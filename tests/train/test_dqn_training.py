"""DQN training loop, evaluation and run folders on a tiny synthetic MovieLens."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moekit.config import ConfigError
from moekit.data.movielens import synthetic_movielens
from moekit.rl.dqn import QNetwork, QNetworkOptions
from moekit.rl.policies import random_policy
from moekit.rl.simulator import LoggedRatings
from moekit.train.dqn import (
    DQNConfig,
    DQNDataConfig,
    DQNTrainSettings,
    build_simulator,
    epsilon,
    evaluate_policy,
    evaluate_run,
    fit,
    load_run,
    value_calibration,
)
from moekit.train.run import RunFolderError


def _data() -> LoggedRatings:
    return LoggedRatings.from_movielens(synthetic_movielens(num_users=20, num_items=30, ratings_per_user=10, seed=4))


def _cfg(q: dict | None = None, sim: dict | None = None, dynamics: bool = True, **train) -> DQNConfig:
    base = dict(total_steps=120, learning_starts=20, batch_size=8, buffer_size=50, target_update=30,
                eps_decay_steps=60, eval_every=60, eval_users=5, progress=False)
    simulator = sim or {"episode_length": 6, "state_len": 3, "session_window": 3, "mf_factors": 4, "mf_iterations": 3}
    return DQNConfig(model=QNetworkOptions(**({"dim": 8, "ffn_hidden": 8} | (q or {}))),
                     data=DQNDataConfig(dynamics=dynamics, simulator=simulator),
                     train=DQNTrainSettings(**(base | train)))


def quiet(message: str) -> None:
    pass


def test_epsilon_decays_linearly_then_stays():
    settings = DQNTrainSettings(eps_start=1.0, eps_end=0.1, eps_decay_steps=100)
    assert [epsilon(s, settings) for s in (0, 50, 100, 1000)] == pytest.approx([1.0, 0.55, 0.1, 0.1])


@pytest.mark.parametrize("q_net,dynamics,gamma", [("mlp", True, 0.9), ("moe", False, 0.9), ("mlp", True, 0.0)])
def test_training_is_seeded_and_the_run_folder_reproduces_the_test_numbers(tmp_path, q_net, dynamics, gamma):
    data = _data()
    cfg = _cfg(q={"q_net": q_net}, dynamics=dynamics, gamma=gamma, explore="popular")
    result = fit(cfg, tmp_path / "run", data=data, log=quiet)
    assert sum(result.extra["train_lengths"]) <= 120 and result.extra["curve"]["step"] == [60, 120]
    assert result.extra["policy"] == (f"DQN ({q_net})" if gamma else f"myopic greedy ({q_net}, γ = 0)")
    again = fit(cfg, data=data, log=quiet)
    assert again.extra["train_returns"] == result.extra["train_returns"] and again.test == result.test
    # the run folder: rebuild the simulator from config.json, evaluate the saved weights -> same numbers
    assert evaluate_run(tmp_path / "run", data=data) == result.test
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["test"] == json.loads(json.dumps(result.test))
    loaded = load_run(tmp_path / "run")
    assert loaded.config.train.total_steps == 120 and loaded.simulator["boredom"] == (0.5 if dynamics else 0.0)
    assert isinstance(QNetwork.from_pretrained(tmp_path / "run"), QNetwork)
    assert (tmp_path / "run" / "model.safetensors").stat().st_size > 1000
    with pytest.raises(ConfigError, match="--resume is not supported for dqn runs"):
        fit(cfg, tmp_path / "run", mode="resume", data=data)
    with pytest.raises(RunFolderError, match="already holds a run"):
        fit(cfg, tmp_path / "run", data=data)


def test_evaluation_reports_every_metric_and_how_sessions_end():
    sim = build_simulator(_cfg(sim={"episode_length": 40, "mf_factors": 4, "mf_iterations": 3}), _data())
    m = evaluate_policy(sim, random_policy(0), sim.test_users, seed=3)
    assert m["users"] == len(sim.test_users) and sum(m["ended_by"].values()) == len(sim.test_users)
    assert set(m["ended_by"]) <= {"patience", "leave", "budget", "catalogue"}
    assert 1 <= m["session_length"] <= 40 and 0 <= m["hit_rate"] <= 1 and 1 <= m["mean_stars"] <= 5
    assert m == evaluate_policy(sim, random_policy(0), sim.test_users, seed=3)


def test_myopic_ranker_learns_the_immediate_reward():
    """With gamma 0 the targets are the rewards: on a fixed batch the loss must fall towards 0."""
    cfg = _cfg(gamma=0.0, total_steps=400, learning_starts=50, batch_size=32, lr=3e-3, eval_every=0,
               eps_decay_steps=400, eps_end=1.0)
    result = fit(cfg, data=_data(), log=quiet)
    assert result.extra["final_loss"] < 0.1
    assert np.isfinite(result.test["return"])


def test_value_calibration_compares_q_with_the_realised_discounted_return():
    from moekit.rl.policies import q_policy

    data = _data()
    cfg = _cfg(gamma=0.0, eval_every=0)
    net = fit(cfg, data=data, log=quiet).model
    sim = build_simulator(cfg, data)
    m = evaluate_policy(sim, q_policy(net), sim.test_users, seed=1)
    c = value_calibration(sim, net, sim.test_users, gamma=0.0, seed=1)
    # gamma 0: the realised "return" of a step is its reward, so its mean is return / session length
    assert c["mean_discounted_return"] == pytest.approx(m["return"] / m["session_length"])
    c1 = value_calibration(sim, net, sim.test_users, gamma=1.0, seed=1)
    assert c1["mean_q"] == c["mean_q"] and c1["mean_discounted_return"] != c["mean_discounted_return"]


def test_bad_config_is_rejected_in_one_line():
    with pytest.raises(ValueError, match="train.explore must be one of uniform, popular"):
        DQNTrainSettings(explore="boltzmann")
    with pytest.raises(ValueError, match=r"train.gamma must be <= 1.0 \(got 1.5\)"):
        DQNTrainSettings(gamma=1.5)
    with pytest.raises(ValueError, match=r"unknown key\(s\) data.simulator.boredum"):
        DQNDataConfig(simulator={"boredum": 0.3})
    with pytest.raises(FileNotFoundError, match="/nonexistent/run does not exist"):
        evaluate_run("/nonexistent/run")
