"""`moekit train dqn`: a DQN recommender trained in the MovieLens user simulator, against baselines."""

from __future__ import annotations

import argparse

HELP = "train a DQN recommender in a user simulator with long-term dynamics and compare it with baselines"
TUNE_MALLOC = True  # see moekit.cli.MALLOC_TUNABLES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help="MovieLens folder (default: $MOEKIT_DATA/<dataset>)")
    parser.add_argument("--dataset", default="ml-100k", choices=["ml-100k", "ml-1m"])
    parser.add_argument("--out", required=True,
                        help="run folder: the DQN's Q-network, config, metrics and reward curve (the myopic "
                             "ranker's run goes to OUT/myopic)")
    parser.add_argument("--dynamics", default="on", choices=["on", "off"],
                        help="the simulator's boredom, patience and leaving (off: the memoryless simulator)")
    parser.add_argument("--steps", type=int, default=30_000, help="environment steps per trained policy")
    parser.add_argument("--q-net", default="mlp", choices=["mlp", "moe"])
    parser.add_argument("--num-experts", type=int, default=4)
    parser.add_argument("--episode-length", type=int, default=None,
                        help="most recommendations per session (default: 100 with dynamics, 10 without)")
    parser.add_argument("--state-len", type=int, default=10, help="liked movies in the observation")
    parser.add_argument("--candidates", type=int, default=None,
                        help="restrict sessions to the N most-rated movies (default: whole catalogue)")
    parser.add_argument("--noise", type=float, default=0.0, help="std of the noise on simulated ratings")
    parser.add_argument("--gamma", type=float, default=0.8)
    parser.add_argument("--n-step", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--explore", default="popular", choices=["uniform", "popular"])
    parser.add_argument("--eps-decay-steps", type=int, default=None, help="default: half of --steps")
    parser.add_argument("--init-from-mf", action="store_true",
                        help="warm-start item embeddings from the simulator's MF item factors (not from scratch)")
    parser.add_argument("--no-double", action="store_true", help="plain DQN targets instead of Double DQN")
    parser.add_argument("--no-myopic", action="store_true", help="skip training the myopic greedy ranker")
    parser.add_argument("--oracle-depth", type=int, default=3,
                        help="depth of the lookahead oracle's tree search (0: skip the oracle)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (the Q-network is small: more threads mostly add overhead)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np
    import torch

    from moekit.io import atomic_write_json
    from moekit.rl.policies import LookaheadOracle, greedy_mf_policy, most_popular_policy, random_policy
    from moekit.train.dqn import (
        DQNTrainConfig,
        build_simulator,
        evaluate_policy,
        load_data,
        plot_curves,
        train_dqn,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    sim_kw: dict = {"state_len": args.state_len, "noise_std": args.noise, "num_candidates": args.candidates}
    if args.episode_length is not None:
        sim_kw["episode_length"] = args.episode_length
    cfg = DQNTrainConfig(
        data_dir=args.data_dir, dataset=args.dataset, out_dir=args.out, seed=args.seed,
        dynamics=args.dynamics == "on", sim=sim_kw, q={"q_net": args.q_net, "num_experts": args.num_experts},
        total_steps=args.steps, lr=args.lr, gamma=args.gamma, n_step=args.n_step, explore=args.explore,
        eps_decay_steps=args.eps_decay_steps or max(1, args.steps // 2), double=not args.no_double,
        init_from_mf=args.init_from_mf, learning_starts=min(1_000, max(1, args.steps // 10)),
    )
    data = load_data(args.data_dir, args.dataset)
    sim = build_simulator(cfg, data)
    users, seed = sim.test_users, args.seed
    rows = {"random": evaluate_policy(sim, random_policy(seed), users, seed),
            "most-popular": evaluate_policy(sim, most_popular_policy(sim), users, seed)}
    trained = {}
    if not args.no_myopic:
        myopic_cfg = DQNTrainConfig(**{**cfg.__dict__, "gamma": 0.0, "n_step": 1,
                                       "out_dir": str(Path(args.out) / "myopic")})
        _, trained[myopic_cfg.policy_name] = train_dqn(myopic_cfg, sim=sim)
    _, trained[cfg.policy_name] = train_dqn(cfg, sim=sim)
    rows |= {name: report["test"] for name, report in trained.items()}
    rows["greedy-MF (reads the user's MF factors)"] = evaluate_policy(sim, greedy_mf_policy(sim), users, seed)
    if args.oracle_depth > 0:
        rows["myopic oracle (reads the simulator state)"] = evaluate_policy(sim, LookaheadOracle(sim, 1), users, seed)
        if args.oracle_depth > 1:
            rows[f"lookahead oracle, depth {args.oracle_depth} (reads the simulator state)"] = evaluate_policy(
                sim, LookaheadOracle(sim, args.oracle_depth), users, seed)

    mode = "with long-term dynamics" if cfg.dynamics else "memoryless (dynamics off)"
    print(f"{sim.data_name} simulator {mode}: {len(users)} test users, one session each "
          f"(at most {sim.config.episode_length} recommendations); training "
          + ", ".join(f"{n} {r['train_seconds']:.0f} s" for n, r in trained.items()))
    width = max(len(n) for n in rows) + 2
    print(f"{'policy':<{width}} {'return':>8} {'session length':>15} {'hit rate':>9}")
    for name, m in rows.items():
        print(f"{name:<{width}} {m['return']:>8.3f} {m['session_length']:>15.2f} {m['hit_rate']:>9.3f}")
    curves = {n: (np.cumsum(r["train_lengths"]), r["train_returns"]) for n, r in trained.items()}
    refs = {f"{n} (test users)": m["return"] for n, m in rows.items() if n in ("random", "most-popular")}
    png = plot_curves(curves, Path(args.out) / "reward_curve.png", xlabel="training env steps (recommendations)",
                      ylabel="training episode return\n(moving average of 50 sessions)",
                      title=f"{sim.data_name} simulator, {mode}, seed {seed}", smooth=50, references=refs)
    atomic_write_json(Path(args.out) / "comparison.json", {"policies": rows, "seed": seed, "dynamics": cfg.dynamics})
    print(f"run folder (Q-network, config, metrics): {args.out}; reward curve: {png}")
    return 0
