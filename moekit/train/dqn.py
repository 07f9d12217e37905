"""Training and evaluating the DQN recommender in the MovieLens simulator, and its baselines.

Training runs epsilon-greedy sessions of the simulator's training users, one gradient step per
env step once the replay buffer holds `learning_starts` transitions; the target network is
copied every `target_update` steps. Evaluation plays one session per test user per policy
(greedy, no exploration) and reports the average return, the hit rate (share of recommendations
rated 4 or 5) and the share of recommendations whose reaction came from a real held-out rating.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from moekit.data.movielens import MovieLens, load_movielens
from moekit.io import atomic_write_json, load_tensors, read_checkpoint_config, save_tensors
from moekit.rl.dqn import QNetwork, QNetworkConfig, dqn_loss, masked_argmax, q_targets
from moekit.rl.replay import ReplayBuffer
from moekit.rl.simulator import MovieLensSimulator, RecommendationEnv, SimulatorConfig
from moekit.train.reproducibility import check_finite, seed_everything

# A policy maps (user, state, action mask) to an item; the user is used only by greedy-MF.
Policy = Callable[[int, np.ndarray, np.ndarray], int]


@dataclass
class DQNTrainConfig:
    data_dir: str | None = None
    dataset: str = "ml-100k"
    out_dir: str | None = None
    seed: int = 0
    total_steps: int = 20_000
    batch_size: int = 64
    buffer_size: int = 20_000
    learning_starts: int = 500
    lr: float = 1e-3
    gamma: float = 0.9
    target_update: int = 500
    eps_start: float = 1.0
    eps_end: float = 0.05
    eps_decay_steps: int = 10_000
    """Epsilon decays linearly from eps_start to eps_end over this many env steps."""
    double: bool = True
    explore: str = "uniform"
    """Exploratory actions: 'uniform' over the allowed items, or 'popular' (proportional to the
    number of known ratings + 1, i.e. exploring what users tend to watch)."""
    train_every: int = 1
    """Env steps per gradient step."""
    init_from_mf: bool = False
    """Warm-start the item embeddings and biases from the simulator's MF item factors (fitted on the
    known ratings; `QNetwork.init_items_from_mf`). This hands the agent the item half of the
    simulator's user model, so results with it must say so."""
    huber_delta: float = 1.0
    checkpoint_every: int = 5_000
    sim: dict = field(default_factory=dict)
    """SimulatorConfig fields (episode_length, state_len, noise_std, ...)."""
    q: dict = field(default_factory=dict)
    """QNetworkConfig fields other than num_items (q_net, dim, num_experts, ...)."""
    progress: bool = True


def epsilon(step: int, cfg: DQNTrainConfig) -> float:
    frac = min(1.0, step / max(1, cfg.eps_decay_steps))
    return cfg.eps_start + frac * (cfg.eps_end - cfg.eps_start)


def train_dqn(cfg: DQNTrainConfig, ml: MovieLens | None = None,
              sim: MovieLensSimulator | None = None) -> tuple[QNetwork, dict]:
    """Train a DQN agent; returns the online Q-network and a report (reward curve, test metrics)."""
    from tqdm import tqdm

    if cfg.explore not in ("uniform", "popular"):
        raise ValueError(f"explore must be 'uniform' or 'popular' (got {cfg.explore!r})")
    seed_everything(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    if sim is None:
        ml = ml if ml is not None else load_movielens(cfg.data_dir, cfg.dataset)
        sim = MovieLensSimulator(ml, SimulatorConfig(**cfg.sim), seed=cfg.seed)
    env = RecommendationEnv(sim, "train")
    q_cfg = QNetworkConfig(num_items=sim.num_items, **cfg.q)
    online = QNetwork(q_cfg)
    if cfg.init_from_mf:
        online.init_items_from_mf(torch.from_numpy(sim.mf.item_factors), torch.from_numpy(sim.mf.item_bias))
    target = copy.deepcopy(online).requires_grad_(False)
    opt = torch.optim.Adam(online.parameters(), lr=cfg.lr)
    buffer = ReplayBuffer(cfg.buffer_size, sim.config.state_len, sim.num_items)

    explore_weight = (sim.item_count + 1.0) if cfg.explore == "popular" else np.ones(sim.num_items)
    state, info = env.reset(seed=cfg.seed)
    episode_return, returns, losses = 0.0, [], []
    bar = tqdm(range(cfg.total_steps), desc=f"dqn[{q_cfg.q_net}]", unit="step", disable=not cfg.progress,
               dynamic_ncols=True)
    start = time.perf_counter()
    for step in bar:
        mask = info["action_mask"]
        if rng.random() < epsilon(step, cfg):
            allowed = np.flatnonzero(mask)
            w = explore_weight[allowed]
            action = int(rng.choice(allowed, p=w / w.sum()))
        else:
            with torch.no_grad():
                q, _ = online(torch.from_numpy(state)[None])
            action = int(masked_argmax(q, torch.from_numpy(mask)[None])[0])
        next_state, reward, terminated, truncated, info = env.step(action)
        buffer.add(state, action, reward, next_state, terminated, info["action_mask"])
        episode_return += reward
        state = next_state
        if terminated or truncated:
            returns.append(episode_return)
            episode_return = 0.0
            state, info = env.reset()
            if len(returns) % 50 == 0:
                bar.set_postfix(ret=f"{np.mean(returns[-200:]):.3f}", eps=f"{epsilon(step, cfg):.2f}")

        if len(buffer) >= cfg.learning_starts and step % cfg.train_every == 0:
            batch = buffer.sample(cfg.batch_size, rng)
            s, s2 = torch.from_numpy(batch.state), torch.from_numpy(batch.next_state)
            q_both, aux = online(torch.cat([s, s2]))  # one pass for Q(s) and the Double-DQN argmax on s'
            q_BI, q_next_online = q_both[: len(s)], q_both[len(s):].detach()
            with torch.no_grad():
                q_next_target, _ = target(s2)
                reward, done = torch.from_numpy(batch.reward), torch.from_numpy(batch.done)
                y = q_targets(q_next_online, q_next_target, reward, done, torch.from_numpy(batch.next_mask),
                              cfg.gamma, cfg.double)
            loss = dqn_loss(q_BI, torch.from_numpy(batch.action), y, cfg.huber_delta) + aux
            check_finite(loss, step, cfg.out_dir or "")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(online.parameters(), 10.0)
            opt.step()
            losses.append(loss.item())
        if (step + 1) % cfg.target_update == 0:
            target.load_state_dict(online.state_dict())
        if cfg.out_dir and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            save_dqn(cfg.out_dir, online, cfg, {"step": step + 1, "train_returns": returns})
    bar.close()
    online.eval()
    report = {
        "train_returns": returns,
        "train_seconds": time.perf_counter() - start,
        "final_loss": float(np.mean(losses[-500:])) if losses else float("nan"),
        "test": evaluate_policy(sim, dqn_policy(online), sim.test_users, seed=cfg.seed),
    }
    if cfg.out_dir:
        save_dqn(cfg.out_dir, online, cfg, report)
        plot_reward_curve(returns, Path(cfg.out_dir) / "reward_curve.png",
                          title=f"DQN ({q_cfg.q_net}) training")
    return online, report


# ----------------------------------------------------------------------------- policies and evaluation


def dqn_policy(net: QNetwork) -> Policy:
    def act(user: int, state: np.ndarray, mask: np.ndarray) -> int:
        with torch.no_grad():
            q, _ = net(torch.from_numpy(state)[None])
        return int(masked_argmax(q, torch.from_numpy(mask)[None])[0])
    return act


def random_policy(seed: int) -> Policy:
    rng = np.random.default_rng(seed)
    return lambda user, state, mask: int(rng.choice(np.flatnonzero(mask)))


def most_popular_policy(sim: MovieLensSimulator) -> Policy:
    """The most-rated allowed movie (counts from the known ratings; ties by lower index)."""
    order = np.argsort(-sim.item_count, kind="stable")
    return lambda user, state, mask: int(order[mask[order]][0])


def greedy_mf_policy(sim: MovieLensSimulator) -> Policy:
    """The allowed movie with the highest MF-predicted rating for this user. It reads the user's
    own MF factors, i.e. the simulator's user model: an oracle-like upper reference, not a fair
    competitor of a policy that sees only the state."""
    def act(user: int, state: np.ndarray, mask: np.ndarray) -> int:
        pred = sim.mf.predict_all(user)
        return int(np.flatnonzero(mask)[np.argmax(pred[mask])])
    return act


def evaluate_policy(
    sim: MovieLensSimulator, policy: Policy, users: np.ndarray, seed: int = 0
) -> dict[str, float]:
    """One greedy session per user: mean return, hit rate, real-feedback share, mean stars."""
    env = RecommendationEnv(sim, users)
    returns, hits, real, stars = [], [], [], []
    for k, user in enumerate(users):
        state, info = env.reset(seed=seed + k, options={"user": int(user)})
        total, done = 0.0, False
        while not done:
            action = policy(int(user), state, info["action_mask"])
            state, reward, done, _, info = env.step(action)
            total += reward
            hits.append(info["hit"])
            real.append(info["real"])
            stars.append(info["stars"])
        returns.append(total)
    return {"return": float(np.mean(returns)), "hit_rate": float(np.mean(hits)),
            "real_share": float(np.mean(real)), "mean_stars": float(np.mean(stars)), "users": len(users)}


# ----------------------------------------------------------------------------- checkpoints and plots


def save_dqn(out_dir: str | Path, net: QNetwork, cfg: DQNTrainConfig, report: dict) -> Path:
    out = Path(out_dir)
    save_tensors(out / "q_network.safetensors", net.state_dict())
    atomic_write_json(out / "config.json", {"q_network": asdict(net.config), "train": asdict(cfg)})
    atomic_write_json(out / "metrics.json", report)
    return out


def load_dqn(ckpt_dir: str | Path) -> tuple[QNetwork, dict]:
    ckpt, saved = read_checkpoint_config(ckpt_dir, "train dqn")
    net = QNetwork(QNetworkConfig(**saved["q_network"]))
    net.load_state_dict(load_tensors(ckpt / "q_network.safetensors"))
    return net.eval(), saved


def plot_reward_curve(curves: dict[str, list[float]] | list[float], path: str | Path, title: str = "",
                      window: int = 100, references: dict[str, float] | None = None) -> Path:
    """Moving-average episode return per training episode (one line per curve), PNG written atomically."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moekit.io import atomic_write_bytes

    if not isinstance(curves, dict):
        curves = {"DQN": curves}
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, returns in curves.items():
        r = np.asarray(returns, dtype=float)
        if len(r) == 0:
            continue
        w = max(1, min(window, len(r)))
        smooth = np.convolve(r, np.ones(w) / w, mode="valid")
        ax.plot(np.arange(w, len(r) + 1), smooth, label=name)
    colors = ("gray", "tab:orange", "tab:green", "tab:red", "tab:purple")
    for (name, value), color in zip((references or {}).items(), colors, strict=False):
        ax.axhline(value, linestyle="--", linewidth=1, label=name, color=color)
    ax.set_xlabel("training episode")
    ax.set_ylabel(f"episode return ({window}-episode moving average)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
