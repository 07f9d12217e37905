"""Training and evaluating the DQN recommender in the user simulator: `fit(DQNConfig(...), out=RUN)`.

`fit` = `load_data` -> `build_simulator` -> `build_q_network` -> a loop of epsilon-greedy sessions of
the simulator's training users (n-step transitions into the replay) and `learn_step` (one Double-DQN
gradient step through the non-finite guard every `train_every` env steps once the replay holds
`learning_starts` transitions; the target network copied every `target_update` steps) ->
`evaluate_policy` on the held-out users. With gamma 0 the same loop trains the myopic greedy ranker:
a Q-network that predicts the immediate reward from the same observation and data.
`evaluate_run(RUN)` rebuilds the simulator from a run folder and reproduces its test numbers.

Evaluation plays one greedy session per user, `env.reset(seed=seed + k)` for the k-th user, and
reports the mean return per session, the mean session length, the hit rate (share of
recommendations with a reaction of 4 stars or more), the share of reactions that were real
held-out ratings and the mean reaction in stars.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from moekit.config import ConfigError, check_choice, check_int, check_number, config_dict, documented
from moekit.data.interactions import InteractionsConfig
from moekit.rl.dqn import (
    QNetwork,
    QNetworkConfig,
    QNetworkOptions,
    dqn_loss,
    masked_argmax,
    obs_to_tensors,
    q_targets,
)
from moekit.rl.policies import Policy, q_policy
from moekit.rl.replay import NStepCollector, ReplayBuffer
from moekit.rl.simulator import LoggedRatings, RecommendationEnv, SimulatorConfig, UserSimulator
from moekit.train import loop
from moekit.train.parallel import launched_by_torchrun
from moekit.train.results import Stopwatch, TrainResult
from moekit.train.run import Run


@documented
@dataclass
class DQNDataConfig(InteractionsConfig):
    """The ratings the simulator is built from and its session dynamics (the `data` section): MovieLens
    by name, or your own log (`path`, with a rating column and an items file whose categories play the
    genres' part)."""

    dataset: str | None = None
    """'ml-100k' or 'ml-1m' (MovieLens, with genres and user features), or 'interactions' (your log:
    `path`); None: 'interactions' when `path` is set, else 'ml-100k'."""
    data_dir: str | None = None
    """MovieLens's folder (None: $MOEKIT_DATA/<dataset>)."""
    dynamics: bool = True
    """The simulator's long-term dynamics (boredom, patience, leaving: SimulatorConfig()); false: the
    memoryless simulator (SimulatorConfig.memoryless())."""
    simulator: dict = field(default_factory=dict)
    """SimulatorConfig fields over the preset, e.g. {episode_length: 20, boredom: 0.3}."""

    def __post_init__(self) -> None:
        if self.dataset is None:
            self.dataset = "interactions" if self.path is not None else "ml-100k"
        check_choice("data.dataset", self.dataset, ("ml-100k", "ml-1m", "interactions"))
        if self.dataset == "interactions" and (self.path is None or self.rating_column is None):
            raise ConfigError("data.dataset='interactions' needs data.path and data.rating_column: the simulator "
                              "learns the users' tastes from their ratings")
        self.simulator_config()  # unknown keys and bad values fail here, not after training

    def simulator_config(self) -> SimulatorConfig:
        """The preset (dynamics on or off) with `simulator`'s fields on top."""
        from moekit.config import build_dataclass

        base = asdict(SimulatorConfig() if self.dynamics else SimulatorConfig.memoryless())
        return build_dataclass(SimulatorConfig, base | self.simulator, "data.simulator")


@documented
@dataclass
class DQNTrainSettings(loop.TrainSettings):
    """How `moekit train dqn` trains (the `train` section). With gamma 0 the same loop trains the myopic
    greedy ranker: a Q-network that predicts the immediate reward from the same observation and data."""

    threads: int | None = 1
    """torch CPU threads: the Q-network is small, so more threads mostly add synchronisation."""
    lr: float = 1e-3
    """Adam learning rate."""
    batch_size: int = 64
    """Replay transitions per gradient step."""
    grad_clip: float = 10.0
    """Clip the global gradient norm to this (0: no clipping)."""
    total_steps: int = 30_000
    """Environment steps (recommendations) of training."""
    buffer_size: int = 50_000
    """Replay capacity (transitions)."""
    learning_starts: int = 1_000
    """Transitions in the replay before the first gradient step."""
    gamma: float = 0.8
    """Discount; 0 trains the myopic greedy ranker. 0.8 (with n_step 10) had the best greedy return on
    ML-100K training users among 0.95 / 0.9 / 0.8 (docs/results/dqn.md): higher discounts over-estimate."""
    n_step: int = 10
    """Steps of real reward before bootstrapping (n-step returns)."""
    target_update: int = 1_000
    """Copy the online network into the target network every this many env steps."""
    eps_start: float = 1.0
    """Exploration rate at the first step."""
    eps_end: float = 0.05
    """Exploration rate after `eps_decay_steps`."""
    eps_decay_steps: int = 15_000
    """Epsilon decays linearly from eps_start to eps_end over this many env steps."""
    double: bool = True
    """Double-DQN targets (the online network picks the next action); false: plain DQN."""
    explore: str = "uniform"
    """Exploratory actions: 'uniform' over the allowed items, or 'popular' (proportional to the number of
    known ratings + 1: exploring what users tend to watch)."""
    train_every: int = 1
    """Env steps per gradient step."""
    init_from_mf: bool = False
    """Warm-start the item embeddings and biases from the simulator's MF item factors (fitted on the known
    ratings). This hands the agent the item half of the simulator's taste model: results with it say so."""
    huber_delta: float = 1.0
    """Huber loss threshold."""
    eval_every: int = 0
    """Greedy evaluation on `eval_users` training users every this many env steps (the learning curve);
    0: none."""
    eval_users: int = 100
    """Training users in each learning-curve evaluation."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("train.explore", self.explore, ("uniform", "popular"))
        check_number("train.gamma", self.gamma, 0.0, 1.0)
        for name in ("total_steps", "buffer_size", "n_step", "target_update", "train_every", "eval_users"):
            check_int(f"train.{name}", getattr(self, name), 1)
        for name in ("learning_starts", "eps_decay_steps", "eval_every"):
            check_int(f"train.{name}", getattr(self, name), 0)
        for name in ("eps_start", "eps_end"):
            check_number(f"train.{name}", getattr(self, name), 0.0, 1.0)
        check_number("train.huber_delta", self.huber_delta, 0.0, strict_min=True)


DQNConfig = loop.run_config_class(
    "DQNConfig", QNetworkOptions, DQNDataConfig, DQNTrainSettings,
    "Everything one `moekit train dqn` run needs: `model` (the Q-network), `data` (the ratings the "
    "simulator learns tastes from, and its dynamics), `train` (DQN's schedule).")


def policy_name(config: DQNConfig) -> str:
    """'DQN (mlp)', 'myopic greedy (mlp, γ = 0)', ...: how results name a run's policy."""
    q_net = config.model.q_net
    return f"myopic greedy ({q_net}, γ = 0)" if config.train.gamma == 0 else f"DQN ({q_net})"


def epsilon(step: int, settings: DQNTrainSettings) -> float:
    """Exploration rate at env step `step`: linear from eps_start to eps_end, then constant."""
    frac = min(1.0, step / max(1, settings.eps_decay_steps))
    return settings.eps_start + frac * (settings.eps_end - settings.eps_start)


# ----------------------------------------------------------------------------- building blocks


def resolve_data(config: DQNDataConfig) -> DQNDataConfig:
    """`config` with its files and folders made absolute, so the run folder names the data from anywhere."""
    from moekit.data.paths import resolve_data_dir

    if config.dataset == "interactions":
        return dataclasses.replace(config, **config.absolute())
    return dataclasses.replace(config, data_dir=str(resolve_data_dir(config.data_dir, config.dataset)))


def load_data(config: DQNDataConfig) -> LoggedRatings:
    """The ratings `config` names as the simulator's plain arrays (MovieLens, or your own log)."""
    if config.dataset == "interactions":
        ratings, meta = config.read()
        return LoggedRatings.from_raw(ratings.user, ratings.item, ratings.rating, ratings.timestamp,
                                      meta.categories, name=Path(config.path).name, users=config.read_users())
    from moekit.data.movielens import load_movielens

    return LoggedRatings.from_movielens(load_movielens(config.data_dir, config.dataset))


def build_simulator(config: DQNConfig, data: LoggedRatings | None = None) -> UserSimulator:
    """The simulator of a run: its data (loaded unless given), its dynamics and the run's seed."""
    data = data if data is not None else load_data(config.data)
    return UserSimulator(data, config.data.simulator_config(), seed=config.train.seed)


def build_q_network(config: DQNConfig, sim: UserSimulator) -> QNetwork:
    """A freshly initialised Q-network sized for `sim` (uses torch's global RNG)."""
    c = sim.config
    net = QNetwork(QNetworkConfig(num_items=sim.num_items, num_genres=sim.item_genres.shape[1],
                                  user_feature_sizes=list(sim.user_feature_sizes), session_window=c.session_window,
                                  max_steps=float(c.episode_length), **asdict(config.model)))
    net.set_item_genres(sim.item_genres)
    if config.train.init_from_mf:
        net.init_items_from_mf(torch.from_numpy(sim.mf.item_factors), torch.from_numpy(sim.mf.item_bias))
    return net


def explore_action(mask: np.ndarray, weight_I: np.ndarray, rng: np.random.Generator) -> int:
    """An exploratory item: an allowed one drawn with probability proportional to `weight_I`."""
    allowed = np.flatnonzero(mask)
    w = weight_I[allowed]
    return int(rng.choice(allowed, p=w / w.sum()))


def learn_step(online: QNetwork, target: QNetwork, opt: torch.optim.Optimizer, batch, settings: DQNTrainSettings,
               step: int = 0, last_good: str | Callable[[], str] = "") -> float:
    """One gradient step on a replay batch; returns the loss. The loss and the gradients go through the
    non-finite guard before the weights change."""
    obs = {k: torch.from_numpy(v) for k, v in batch.obs.items()}
    nxt = {k: torch.from_numpy(v) for k, v in batch.next_obs.items()}
    B = len(batch.action)
    both = {k: torch.cat([obs[k], nxt[k]]) for k in obs}
    q_both, aux = online(both)  # one pass for Q(s) and the Double-DQN argmax on s'
    q_BI, q_next_online = q_both[:B], q_both[B:].detach()
    with torch.no_grad():
        q_next_target, _ = target(nxt)
        y = q_targets(q_next_online, q_next_target, torch.from_numpy(batch.ret), torch.from_numpy(batch.discount),
                      torch.from_numpy(batch.next_mask), settings.double)
    loss = dqn_loss(q_BI, torch.from_numpy(batch.action), y, settings.huber_delta) + aux
    loss.backward()
    loop.optimizer_step(opt, loss, step, last_good, settings.grad_clip)
    return float(loss.detach())


# ----------------------------------------------------------------------------------- training


def fit(config: DQNConfig, out: str | Path | None = None, *, mode: str = "new", data: LoggedRatings | None = None,
        sim: UserSimulator | None = None, log=print) -> TrainResult:
    """Train a DQN (or, with gamma 0, the myopic ranker) into the run folder `out` (None: write nothing);
    its test metrics are one greedy session per held-out user. A given `sim` must be the one
    `build_simulator(config)` would build (same data, dynamics and seed).

    A DQN run is not resumed (its replay and the simulator's sessions are not checkpointed) and does not
    spread over processes: both are refused in one line."""
    settings = config.train
    if mode == "resume":
        raise ConfigError("--resume is not supported for dqn runs: the replay buffer and the simulator's "
                          "sessions are not checkpointed (start a new run or --overwrite)")
    if launched_by_torchrun():
        raise ConfigError("moekit train dqn runs in one process: the simulator's sessions are sequential "
                          "(launch it without torchrun)")
    loop.set_threads(settings.threads)
    Run.check_target(out, mode)
    loop.resolve_device("cpu" if settings.device == "auto" else settings.device)  # the Q-network runs on the CPU
    loop.seed_everything(settings.seed)  # torch's global stream initialises the network
    rng = np.random.default_rng(settings.seed)  # exploration and replay sampling
    if sim is None:
        if data is None:
            config = dataclasses.replace(config, data=resolve_data(config.data))
        sim = build_simulator(config, data)
    if len(sim.train_users) == 0 or len(sim.test_users) == 0:
        raise ConfigError(f"{sim.data_name}: the simulator has {len(sim.train_users)} training and "
                          f"{len(sim.test_users)} test users; it needs some of each (more ratings, or another "
                          f"test_user_fraction)")
    env = RecommendationEnv(sim, "train")
    online = build_q_network(config, sim)
    target = copy.deepcopy(online).requires_grad_(False)
    opt = loop.build_optimizer(online, settings, kind="adam", fused=False)
    obs, info = env.reset(seed=settings.seed)
    buffer = ReplayBuffer(settings.buffer_size, obs, sim.num_items)
    collector = NStepCollector(buffer, settings.n_step if settings.gamma > 0 else 1, settings.gamma)
    explore_weight = (sim.item_count + 1.0) if settings.explore == "popular" else np.ones(sim.num_items)
    eval_users = sim.train_users[: settings.eval_users]
    name = policy_name(config)

    run = Run(out, "dqn", mode, tensorboard=True)
    with run:
        run.write_config(online, {"data": config_dict(config.data), "train": config_dict(settings),
                                  "simulator": asdict(sim.config)}, settings.RUNTIME_KEYS)
        episode_return, episode_len, returns, lengths, losses = 0.0, 0, [], [], []
        curve: dict[str, list] = {"step": [], "return": [], "session_length": [], "hit_rate": []}
        bar = loop.progress_bar(settings.progress, total=settings.total_steps, desc=name)
        watch = Stopwatch()
        with watch:
            for step in range(settings.total_steps):
                mask = info["action_mask"]
                if rng.random() < epsilon(step, settings):
                    action = explore_action(mask, explore_weight, rng)
                else:
                    with torch.no_grad():
                        q, _ = online(obs_to_tensors(obs))
                    action = int(masked_argmax(q, torch.from_numpy(mask)[None])[0])
                next_obs, reward, terminated, truncated, info = env.step(action)
                collector.add(obs, action, reward, next_obs, info["action_mask"], terminated, truncated)
                episode_return += reward
                episode_len += 1
                obs = next_obs
                if terminated or truncated:
                    returns.append(episode_return)
                    lengths.append(episode_len)
                    if len(returns) % 20 == 0:  # metrics.csv: every 20th training session
                        run.log({"episode": len(returns), "step": step + 1, "return": episode_return,
                                 "session_length": episode_len, "epsilon": epsilon(step, settings),
                                 "loss": losses[-1] if losses else ""})
                    episode_return, episode_len = 0.0, 0
                    obs, info = env.reset()
                    if len(returns) % 20 == 0:
                        bar.set_postfix(ret=f"{np.mean(returns[-100:]):.2f}", len=f"{np.mean(lengths[-100:]):.1f}",
                                        eps=f"{epsilon(step, settings):.2f}")
                if len(buffer) >= settings.learning_starts and step % settings.train_every == 0:
                    losses.append(learn_step(online, target, opt, buffer.sample(settings.batch_size, rng), settings,
                                             step + 1, run.last_good))
                if (step + 1) % settings.target_update == 0:
                    target.load_state_dict(online.state_dict())
                if settings.eval_every and (step + 1) % settings.eval_every == 0:
                    online.eval()
                    m = evaluate_policy(sim, q_policy(online), eval_users, seed=settings.seed)
                    online.train()
                    curve["step"].append(step + 1)
                    for k in ("return", "session_length", "hit_rate"):
                        curve[k].append(m[k])
                bar.update(1)
        bar.close()
        online.eval()
        run.save_model(online)
        test = evaluate_policy(sim, q_policy(online), sim.test_users, seed=settings.seed)
        extra = {"policy": name, "seed": settings.seed, "simulator": sim.data_name, "dynamics": sim.config.has_dynamics,
                 "test_users": len(sim.test_users), "ended_by": test.pop("ended_by"), "train_returns": returns,
                 "train_lengths": lengths, "curve": curve,
                 "final_loss": float(np.mean(losses[-500:])) if losses else float("nan")}
        result = TrainResult("dqn", online, test, {}, [], None, settings.total_steps, watch.seconds, run.path, extra)
        result.sim = sim  # for the command's baselines; not part of results.json
        run.write_results(result.to_json())
    return result


# --------------------------------------------------------------------------------- evaluation


def evaluate_policy(sim: UserSimulator, policy: Policy, users: np.ndarray, seed: int = 0) -> dict[str, float]:
    """One greedy session per user (the k-th with env seed `seed + k`): mean return per session,
    mean session length, hit rate, real-feedback share, mean stars, and how sessions ended."""
    env = RecommendationEnv(sim, users)
    returns, session_lengths, hits, real, stars, ends = [], [], [], [], [], {}
    for k, user in enumerate(users):
        obs, info = env.reset(seed=seed + k, options={"user": int(user)})
        total, done, n = 0.0, False, 0
        while not done:
            action = policy(obs, info["action_mask"], env)
            obs, reward, terminated, truncated, info = env.step(action)
            done = terminated or truncated
            total += reward
            n += 1
            hits.append(info["hit"])
            real.append(info["real"])
            stars.append(info["stars"])
        ends[info["why"]] = ends.get(info["why"], 0) + 1
        returns.append(total)
        session_lengths.append(n)
    return {"return": float(np.mean(returns)), "session_length": float(np.mean(session_lengths)),
            "hit_rate": float(np.mean(hits)), "real_share": float(np.mean(real)),
            "mean_stars": float(np.mean(stars)), "users": len(users), "ended_by": dict(sorted(ends.items()))}


def value_calibration(sim: UserSimulator, net: QNetwork, users: np.ndarray, gamma: float, seed: int = 0
                      ) -> dict[str, float]:
    """Greedy sessions of `users`: the mean Q(s, a) of the chosen actions against the mean realised
    discounted return from those steps (Σ_k γ^k r_{t+k} to the end of the session). A Q above the
    realised return is overestimation (the max over ~I noisy values, fed back by bootstrapping)."""
    env = RecommendationEnv(sim, users)
    q_taken, realised = [], []
    for k, user in enumerate(users):
        obs, info = env.reset(seed=seed + k, options={"user": int(user)})
        rewards, done = [], False
        while not done:
            with torch.no_grad():
                q, _ = net(obs_to_tensors(obs))
            action = int(masked_argmax(q, torch.from_numpy(info["action_mask"])[None])[0])
            q_taken.append(float(q[0, action]))
            obs, reward, terminated, truncated, info = env.step(action)
            rewards.append(reward)
            done = terminated or truncated
        g, returns = 0.0, []
        for r in reversed(rewards):
            g = r + gamma * g
            returns.append(g)
        realised.extend(reversed(returns))
    return {"mean_q": float(np.mean(q_taken)), "mean_discounted_return": float(np.mean(realised))}


CONFIG = DQNConfig


def config_from_run(header: dict) -> DQNConfig:
    """The run config of a dqn run folder's config.json."""
    from moekit.train.families import run_config

    return run_config(DQNConfig, header, QNetworkOptions, header["model"])


def load_run(path: Path, device: str = "cpu"):
    """`moekit.load` for a dqn run: the Q-network (CPU) and the run config."""
    from moekit.models.pretrained import read_model_header
    from moekit.train.families import LoadedRun

    header = read_model_header(path)
    net = QNetwork.from_pretrained(path)
    config = config_from_run(header) if "train" in header else None
    return LoadedRun("dqn", net, Path(path), config, {"simulator": header.get("simulator")})


def evaluate_run(path: str | Path, device: str = "auto", data_dir: str | None = None,
                 data: LoggedRatings | None = None) -> dict[str, float]:
    """The test metrics of a finished dqn run, computed again: the simulator rebuilt from the run's saved
    data, dynamics and seed, the saved Q-network playing one greedy session per held-out user."""
    loaded = load_run(Path(path))
    config = dataclasses.replace(loaded.config, data=loaded.data_config(data_dir))
    data = data if data is not None else load_data(config.data)
    sim = UserSimulator(data, SimulatorConfig(**loaded.simulator), seed=config.train.seed)
    metrics = evaluate_policy(sim, q_policy(loaded.model), sim.test_users, seed=config.train.seed)
    metrics.pop("ended_by")
    return metrics
