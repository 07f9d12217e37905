"""Training and evaluating the DQN recommender in the user simulator, as small plain functions.

`train_dqn(cfg)` = `load_data` -> `build_simulator` -> `build_q_network` -> a loop of `collect_step`
(epsilon-greedy sessions of the simulator's training users, n-step transitions into the replay)
and `learn_step` (one Double-DQN gradient step every `train_every` env steps once the replay
holds `learning_starts` transitions; the target network copied every `target_update` steps) ->
`evaluate_policy` on the test users -> `save_run`. With `gamma = 0` the same loop trains the
myopic greedy ranker: a Q-network that predicts the immediate reward from the same observation and
data. `evaluate_run(run_dir)` rebuilds the simulator from a run folder's config and evaluates its
saved Q-network on the test users: it reproduces the reported test numbers exactly.

Evaluation plays one greedy session per user, `env.reset(seed=seed + k)` for the k-th user, and
reports the mean return per session, the mean session length, the hit rate (share of
recommendations with a reaction of 4 stars or more), the share of reactions that were real
held-out ratings and the mean reaction in stars.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from moekit.io import atomic_write_json
from moekit.rl.dqn import QNetwork, QNetworkConfig, dqn_loss, masked_argmax, obs_to_tensors, q_targets
from moekit.rl.policies import Policy, q_policy
from moekit.rl.replay import NStepCollector, ReplayBuffer
from moekit.rl.simulator import LoggedRatings, RecommendationEnv, SimulatorConfig, UserSimulator
from moekit.train.reproducibility import check_finite, seed_everything


@dataclass
class DQNTrainConfig:
    """Everything one training run of the DQN (or, with gamma 0, the myopic ranker) depends on."""

    data_dir: str | None = None
    """MovieLens folder (default: $MOEKIT_DATA/<dataset>)."""
    dataset: str = "ml-100k"
    out_dir: str | None = None
    """Run folder for the Q-network, config, metrics and curves; None: nothing written."""
    seed: int = 0
    """Seeds the simulator (test users, MF init), the network init, exploration and replay sampling."""
    dynamics: bool = True
    """The simulator's long-term dynamics on (SimulatorConfig()) or off (SimulatorConfig.memoryless())."""
    sim: dict = field(default_factory=dict)
    """SimulatorConfig fields overriding the chosen preset (episode_length, boredom, ...)."""
    q: dict = field(default_factory=dict)
    """QNetworkConfig fields other than those the simulator fixes (q_net, dim, num_experts, ...)."""
    total_steps: int = 30_000
    """Environment steps (recommendations) of training."""
    batch_size: int = 64
    buffer_size: int = 50_000
    learning_starts: int = 1_000
    lr: float = 1e-3
    gamma: float = 0.8
    """Discount; 0 trains the myopic greedy ranker (Q = predicted immediate reward). 0.8 (with
    n_step 10) had the best greedy return on ML-100K training users among 0.95/0.9/0.8 (see
    docs/results/dqn.md): higher discounts over-estimate more and rank worse."""
    n_step: int = 10
    """Steps of real reward before bootstrapping (n-step returns)."""
    target_update: int = 1_000
    """Copy the online network into the target network every this many env steps."""
    eps_start: float = 1.0
    eps_end: float = 0.05
    eps_decay_steps: int = 15_000
    """Epsilon decays linearly from eps_start to eps_end over this many env steps."""
    double: bool = True
    """Double-DQN targets (the online network picks the next action); False: plain DQN."""
    explore: str = "uniform"
    """Exploratory actions: 'uniform' over the allowed items, or 'popular' (proportional to the
    number of known ratings + 1, i.e. exploring what users tend to watch)."""
    train_every: int = 1
    """Env steps per gradient step."""
    init_from_mf: bool = False
    """Warm-start the item embeddings and biases from the simulator's MF item factors (fitted on the
    known ratings; `QNetwork.init_items_from_mf`). This hands the agent the item half of the
    simulator's taste model, so results with it must say so."""
    huber_delta: float = 1.0
    grad_clip: float = 10.0
    eval_every: int = 0
    """Greedy evaluation on `eval_users` training users every this many env steps (the learning
    curve); 0: none."""
    eval_users: int = 100
    checkpoint_every: int = 0
    """Save the run folder every this many env steps (0: only at the end)."""
    progress: bool = True

    def __post_init__(self) -> None:
        if self.explore not in ("uniform", "popular"):
            raise ValueError(f"explore must be 'uniform' or 'popular' (got {self.explore!r})")
        if not 0 <= self.gamma <= 1:
            raise ValueError(f"gamma must lie in [0, 1] (got {self.gamma})")
        if self.n_step < 1 or self.total_steps < 1 or self.batch_size < 1:
            raise ValueError(f"n_step, total_steps and batch_size must be >= 1 "
                             f"(got {self.n_step}, {self.total_steps}, {self.batch_size})")

    @property
    def policy_name(self) -> str:
        """'DQN (mlp)', 'myopic greedy (mlp, γ = 0)', ...: how results name this run's policy."""
        q_net = self.q.get("q_net", "mlp")
        return f"myopic greedy ({q_net}, γ = 0)" if self.gamma == 0 else f"DQN ({q_net})"


def epsilon(step: int, cfg: DQNTrainConfig) -> float:
    """Exploration rate at env step `step`: linear from eps_start to eps_end, then constant."""
    frac = min(1.0, step / max(1, cfg.eps_decay_steps))
    return cfg.eps_start + frac * (cfg.eps_end - cfg.eps_start)


# ----------------------------------------------------------------------------- building blocks


def load_data(data_dir: str | None, dataset: str = "ml-100k") -> LoggedRatings:
    """MovieLens-100K/1M as the simulator's plain arrays."""
    from moekit.data.movielens import load_movielens

    return LoggedRatings.from_movielens(load_movielens(data_dir, dataset))


def simulator_config(cfg: DQNTrainConfig) -> SimulatorConfig:
    """The preset (dynamics on or off) with cfg.sim's fields on top."""
    base = SimulatorConfig() if cfg.dynamics else SimulatorConfig.memoryless()
    return SimulatorConfig(**(asdict(base) | cfg.sim))


def build_simulator(cfg: DQNTrainConfig, data: LoggedRatings | None = None) -> UserSimulator:
    """The simulator of a run: its data (loaded from cfg.data_dir unless given), config and seed."""
    data = data if data is not None else load_data(cfg.data_dir, cfg.dataset)
    return UserSimulator(data, simulator_config(cfg), seed=cfg.seed)


def build_q_network(cfg: DQNTrainConfig, sim: UserSimulator) -> QNetwork:
    """A freshly initialised Q-network sized for `sim` (uses torch's global RNG)."""
    c = sim.config
    net = QNetwork(QNetworkConfig(num_items=sim.num_items, num_genres=sim.item_genres.shape[1],
                                  user_feature_sizes=list(sim.user_feature_sizes), session_window=c.session_window,
                                  max_steps=float(c.episode_length), **cfg.q))
    net.set_item_genres(sim.item_genres)
    if cfg.init_from_mf:
        net.init_items_from_mf(torch.from_numpy(sim.mf.item_factors), torch.from_numpy(sim.mf.item_bias))
    return net


def explore_action(mask: np.ndarray, weight_I: np.ndarray, rng: np.random.Generator) -> int:
    """An exploratory item: an allowed one drawn with probability proportional to `weight_I`."""
    allowed = np.flatnonzero(mask)
    w = weight_I[allowed]
    return int(rng.choice(allowed, p=w / w.sum()))


def learn_step(online: QNetwork, target: QNetwork, opt: torch.optim.Optimizer, batch, cfg: DQNTrainConfig,
               step: int = 0) -> torch.Tensor:
    """One gradient step on a replay batch; returns the (detached) loss. A non-finite loss stops
    training before the weights change."""
    obs = {k: torch.from_numpy(v) for k, v in batch.obs.items()}
    nxt = {k: torch.from_numpy(v) for k, v in batch.next_obs.items()}
    B = len(batch.action)
    both = {k: torch.cat([obs[k], nxt[k]]) for k in obs}
    q_both, aux = online(both)  # one pass for Q(s) and the Double-DQN argmax on s'
    q_BI, q_next_online = q_both[:B], q_both[B:].detach()
    with torch.no_grad():
        q_next_target, _ = target(nxt)
        y = q_targets(q_next_online, q_next_target, torch.from_numpy(batch.ret), torch.from_numpy(batch.discount),
                      torch.from_numpy(batch.next_mask), cfg.double)
    loss = dqn_loss(q_BI, torch.from_numpy(batch.action), y, cfg.huber_delta) + aux
    check_finite(loss, step, cfg.out_dir or "")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(online.parameters(), cfg.grad_clip)
    opt.step()
    return loss.detach()


# ----------------------------------------------------------------------------------- training


def train_dqn(cfg: DQNTrainConfig, data: LoggedRatings | None = None, sim: UserSimulator | None = None
              ) -> tuple[QNetwork, dict]:
    """Train a DQN (or, with gamma 0, the myopic ranker); returns the online Q-network and a report
    (training returns, learning curve, test metrics). A given `sim` must be the one
    `build_simulator(cfg)` would build (same data, config and seed)."""
    from tqdm import tqdm

    seed_everything(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    sim = sim if sim is not None else build_simulator(cfg, data)
    env = RecommendationEnv(sim, "train")
    online = build_q_network(cfg, sim)
    target = copy.deepcopy(online).requires_grad_(False)
    opt = torch.optim.Adam(online.parameters(), lr=cfg.lr)
    obs, info = env.reset(seed=cfg.seed)
    buffer = ReplayBuffer(cfg.buffer_size, obs, sim.num_items)
    collector = NStepCollector(buffer, cfg.n_step if cfg.gamma > 0 else 1, cfg.gamma)
    explore_weight = (sim.item_count + 1.0) if cfg.explore == "popular" else np.ones(sim.num_items)
    eval_users = sim.train_users[: cfg.eval_users]

    episode_return, episode_len, returns, lengths, losses = 0.0, 0, [], [], []
    curve: dict[str, list] = {"step": [], "return": [], "session_length": [], "hit_rate": []}
    name = cfg.policy_name
    bar = tqdm(range(cfg.total_steps), desc=name, unit="step", disable=not cfg.progress, dynamic_ncols=True)
    start = time.perf_counter()
    for step in bar:
        mask = info["action_mask"]
        if rng.random() < epsilon(step, cfg):
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
            episode_return, episode_len = 0.0, 0
            obs, info = env.reset()
            if len(returns) % 20 == 0:
                bar.set_postfix(ret=f"{np.mean(returns[-100:]):.2f}", len=f"{np.mean(lengths[-100:]):.1f}",
                                eps=f"{epsilon(step, cfg):.2f}")
        if len(buffer) >= cfg.learning_starts and step % cfg.train_every == 0:
            loss = learn_step(online, target, opt, buffer.sample(cfg.batch_size, rng), cfg, step)
            losses.append(float(loss))
        if (step + 1) % cfg.target_update == 0:
            target.load_state_dict(online.state_dict())
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            online.eval()
            m = evaluate_policy(sim, q_policy(online), eval_users, seed=cfg.seed)
            online.train()
            curve["step"].append(step + 1)
            for k in ("return", "session_length", "hit_rate"):
                curve[k].append(m[k])
        if cfg.out_dir and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            save_run(cfg.out_dir, online, cfg, sim, {"step": step + 1, "train_returns": returns})
    bar.close()
    online.eval()
    report = {
        "policy": name,
        "train_returns": returns,
        "train_lengths": lengths,
        "curve": curve,
        "train_seconds": time.perf_counter() - start,
        "final_loss": float(np.mean(losses[-500:])) if losses else float("nan"),
        "test": evaluate_policy(sim, q_policy(online), sim.test_users, seed=cfg.seed),
    }
    if cfg.out_dir:
        save_run(cfg.out_dir, online, cfg, sim, report)
        plot_curves({name: (np.cumsum(lengths), returns)}, Path(cfg.out_dir) / "reward_curve.png",
                    xlabel="training env steps", ylabel="episode return (moving average)",
                    title=f"{name} training on {sim.data_name} ({'dynamics on' if cfg.dynamics else 'memoryless'})",
                    smooth=50)
    return online, report


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


def evaluate_run(run_dir: str | Path, data: LoggedRatings | None = None) -> dict[str, float]:
    """Rebuild the simulator from a run folder's saved config (data from its data_dir/dataset unless
    `data` is given) and evaluate the saved Q-network on the test users with the run's seed: the
    same numbers as the run's `metrics.json` "test" entry."""
    net, saved = load_run(run_dir)
    cfg = saved_train_config(saved)
    data = data if data is not None else load_data(cfg.data_dir, cfg.dataset)
    sim = UserSimulator(data, SimulatorConfig(**saved["simulator"]), seed=cfg.seed)
    return evaluate_policy(sim, q_policy(net), sim.test_users, seed=cfg.seed)


# ----------------------------------------------------------------------------------- run folder


def save_run(out_dir: str | Path, net: QNetwork, cfg: DQNTrainConfig, sim: UserSimulator, report: dict) -> Path:
    """`config.json` (model header + train, simulator and data sections; the data folder as an
    absolute path, so the run can be evaluated from anywhere) and `model.safetensors`
    (via `QNetwork.save_pretrained`), `q_network.safetensors` (the same weights under the file name
    earlier runs used) and `metrics.json`."""
    out = Path(out_dir)
    net.save_pretrained(out)
    net.save_weights(out / "q_network.safetensors")
    train = asdict(cfg) | {"data_dir": str(Path(cfg.data_dir).expanduser().resolve()) if cfg.data_dir else None}
    atomic_write_json(out / "config.json", net.model_header() | {
        "train": train, "simulator": asdict(sim.config),
        "data": {"name": sim.data_name, "num_users": sim.num_users, "num_items": sim.num_items}})
    atomic_write_json(out / "metrics.json", report)
    return out


def load_run(run_dir: str | Path) -> tuple[QNetwork, dict]:
    """(Q-network in eval mode, parsed config.json) of a run folder."""
    from moekit.io import read_checkpoint_config

    ckpt, saved = read_checkpoint_config(run_dir, "train dqn")
    if "train" not in saved or "simulator" not in saved:
        raise ValueError(f"{Path(ckpt) / 'config.json'} has no train/simulator sections: not a `moekit train dqn` run")
    net = QNetwork.from_pretrained(ckpt)
    return net, saved


def saved_train_config(saved: dict) -> DQNTrainConfig:
    """The DQNTrainConfig of a parsed run-folder config.json."""
    return DQNTrainConfig(**saved["train"])


# ---------------------------------------------------------------------------------------- plots


def plot_curves(curves: dict[str, tuple], path: str | Path, xlabel: str, ylabel: str, title: str = "",
                smooth: int = 1, references: dict[str, float] | None = None, bands: dict[str, tuple] | None = None
                ) -> Path:
    """One line per curve, (x, y) each (a moving average over `smooth` points where there are
    enough; a single point is drawn as a marker), dashed horizontal lines for `references`, optional
    (low, high) bands per curve; every line its own colour, the legend outside the axes. PNG
    written atomically."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moekit.io import atomic_write_bytes

    colors = plt.get_cmap("tab10").colors
    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    k = 0
    for name, (x, y) in curves.items():
        x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        if len(y) == 0:
            continue
        w = max(1, min(smooth, len(y)))
        ys = np.convolve(y, np.ones(w) / w, mode="valid")
        xs = x[w - 1:]
        color = colors[k % len(colors)]
        ax.plot(xs, ys, label=name, color=color, marker="o" if len(ys) < 3 else None)
        if bands and name in bands:
            lo, hi = (np.asarray(b, dtype=float)[w - 1:] for b in bands[name])
            ax.fill_between(xs, lo, hi, color=color, alpha=0.15, linewidth=0)
        k += 1
    for name, value in (references or {}).items():
        ax.axhline(value, linestyle="--", linewidth=1.2, label=name, color=colors[k % len(colors)])
        k += 1
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if k:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
