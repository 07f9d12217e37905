"""`moekit train dqn`: a DQN recommender trained in a user simulator with long-term dynamics, vs baselines."""

from __future__ import annotations

import argparse

HELP = "train a DQN recommender in a user simulator with long-term dynamics and compare it with baselines"
TUNE_MALLOC = True  # see moekit.cli.MALLOC_TUNABLES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from moekit.commands.shared import add_train_arguments
    from moekit.train.dqn import DQNConfig

    add_train_arguments(parser, DQNConfig, "dqn", aliases={"steps": "train.total_steps", "data": "data.path"})
    compare = parser.add_argument_group("comparison")
    compare.add_argument("--no-myopic", action="store_true",
                         help="skip training the myopic greedy ranker (the same Q-network with gamma 0, into "
                              "OUT/myopic)")
    compare.add_argument("--oracle-depth", type=int, default=3,
                         help="depth of the lookahead oracle's tree search (0: skip the oracle; default: 3)")
    parser.epilog += (" Simulator settings go under data.simulator, e.g. data.simulator.episode_length=20 "
                      "data.simulator.boredom=0.3 (see moekit.rl.simulator.SimulatorConfig); --no-dynamics gives "
                      "the memoryless simulator.")


def run(args: argparse.Namespace) -> int:
    import dataclasses

    import numpy as np

    from moekit.commands.shared import train_runs
    from moekit.io import atomic_write_json
    from moekit.plots import line_curves
    from moekit.rl.policies import LookaheadOracle, greedy_mf_policy, most_popular_policy, random_policy
    from moekit.train.dqn import DQNConfig, evaluate_policy, fit, policy_name

    if args.oracle_depth < 0:
        raise ValueError(f"--oracle-depth must be >= 0 (got {args.oracle_depth})")
    for result in train_runs(args, "dqn", DQNConfig, fit):
        sim, seed, out = result.sim, result.extra["seed"], result.out
        users = sim.test_users
        rows = {"random": evaluate_policy(sim, random_policy(seed), users, seed),
                "most-popular": evaluate_policy(sim, most_popular_policy(sim), users, seed)}
        trained = {result.extra["policy"]: result}
        if not args.no_myopic:
            from moekit.train.families import family_module

            saved = family_module("dqn").load_run(out).config
            myopic = dataclasses.replace(saved, train=dataclasses.replace(saved.train, gamma=0.0, n_step=1))
            trained[policy_name(myopic)] = fit(myopic, out / "myopic", sim=sim, mode="overwrite")
        for name, r in trained.items():
            rows[name] = r.test
        rows["greedy-MF (reads the user's MF factors)"] = evaluate_policy(sim, greedy_mf_policy(sim), users, seed)
        if args.oracle_depth > 0:
            rows["myopic oracle (reads the simulator state)"] = evaluate_policy(sim, LookaheadOracle(sim, 1), users,
                                                                                seed)
            if args.oracle_depth > 1:
                rows[f"lookahead oracle, depth {args.oracle_depth} (reads the simulator state)"] = evaluate_policy(
                    sim, LookaheadOracle(sim, args.oracle_depth), users, seed)
        mode = "with long-term dynamics" if result.extra["dynamics"] else "memoryless (dynamics off)"
        print(f"\n{sim.data_name} simulator {mode}: {len(users)} held-out users, one session each "
              f"(at most {sim.config.episode_length} recommendations); training "
              + ", ".join(f"{n} {r.train_seconds:.0f} s" for n, r in trained.items()))
        width = max(len(n) for n in rows) + 2
        print(f"{'policy':<{width}} {'return':>8} {'session length':>15} {'hit rate':>9}")
        for name, m in rows.items():
            print(f"{name:<{width}} {m['return']:>8.3f} {m['session_length']:>15.2f} {m['hit_rate']:>9.3f}")
        curves = {n: (np.cumsum(r.extra["train_lengths"]), r.extra["train_returns"]) for n, r in trained.items()}
        refs = {f"{n} (held-out users)": m["return"] for n, m in rows.items() if n in ("random", "most-popular")}
        png = line_curves(curves, out / "reward_curve.png", xlabel="training env steps (recommendations)",
                          ylabel="training session return\n(moving average of 50 sessions)",
                          title=f"{sim.data_name} simulator, {mode}", smooth=50, references=refs)
        atomic_write_json(out / "comparison.json", {"policies": rows, "dynamics": result.extra["dynamics"]})
        print(f"run folder: {out}; reward curve: {png}")
    return 0
