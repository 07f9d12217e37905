"""`moekit train dqn`: a DQN recommender trained in the MovieLens user simulator."""

from __future__ import annotations

import argparse

HELP = "train a DQN recommender in a MovieLens user simulator and compare it with baselines"
TUNE_MALLOC = True  # see moekit.cli.MALLOC_TUNABLES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help="MovieLens folder (default: $MOEKIT_DATA/<dataset>)")
    parser.add_argument("--dataset", default="ml-100k", choices=["ml-100k", "ml-1m"])
    parser.add_argument("--out", required=True, help="folder for the Q-network, metrics and reward curve")
    parser.add_argument("--steps", type=int, default=20_000, help="environment steps")
    parser.add_argument("--q-net", default="mlp", choices=["mlp", "moe"])
    parser.add_argument("--num-experts", type=int, default=4)
    parser.add_argument("--episode-length", type=int, default=10)
    parser.add_argument("--state-len", type=int, default=10)
    parser.add_argument("--candidates", type=int, default=None,
                        help="restrict sessions to the N most-rated movies (default: whole catalogue)")
    parser.add_argument("--noise", type=float, default=0.0, help="std of the noise on simulated ratings")
    parser.add_argument("--gamma", type=float, default=0.9)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--explore", default="uniform", choices=["uniform", "popular"])
    parser.add_argument("--eps-decay-steps", type=int, default=10_000)
    parser.add_argument("--init-from-mf", action="store_true",
                        help="warm-start item embeddings from the simulator's MF item factors")
    parser.add_argument("--no-double", action="store_true", help="plain DQN targets instead of Double DQN")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def run(args: argparse.Namespace) -> int:
    import torch

    from moekit.data.movielens import load_movielens
    from moekit.rl.simulator import MovieLensSimulator, SimulatorConfig
    from moekit.train.dqn import (
        DQNTrainConfig,
        evaluate_policy,
        greedy_mf_policy,
        most_popular_policy,
        random_policy,
        train_dqn,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    sim_kw = {"episode_length": args.episode_length, "state_len": args.state_len, "noise_std": args.noise,
              "num_candidates": args.candidates}
    cfg = DQNTrainConfig(
        data_dir=args.data_dir, dataset=args.dataset, out_dir=args.out, seed=args.seed,
        total_steps=args.steps,
        lr=args.lr, gamma=args.gamma, explore=args.explore, eps_decay_steps=args.eps_decay_steps,
        double=not args.no_double, init_from_mf=args.init_from_mf, sim=sim_kw,
        q={"q_net": args.q_net, "num_experts": args.num_experts},
    )
    ml = load_movielens(args.data_dir, args.dataset)
    sim = MovieLensSimulator(ml, SimulatorConfig(**sim_kw), seed=args.seed)
    _, report = train_dqn(cfg, sim=sim)
    rows = {"random": evaluate_policy(sim, random_policy(args.seed), sim.test_users, args.seed),
            "most-popular": evaluate_policy(sim, most_popular_policy(sim), sim.test_users, args.seed),
            "greedy-MF (reads the user model)": evaluate_policy(sim, greedy_mf_policy(sim), sim.test_users,
                                                                args.seed),
            f"DQN ({args.q_net})": report["test"]}
    print(f"{len(sim.test_users)} test users, sessions of {args.episode_length}; "
          f"training {report['train_seconds']:.0f} s")
    print(f"{'policy':<34} {'return':>8} {'hit rate':>9}")
    for name, m in rows.items():
        print(f"{name:<34} {m['return']:>8.3f} {m['hit_rate']:>9.3f}")
    print(f"checkpoint and reward curve: {args.out}")
    return 0
