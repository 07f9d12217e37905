# ruff: noqa: E501  (the markdown report templates below keep their lines as they appear in the doc)
"""DQN vs a myopic greedy ranker, baselines and oracles in the user simulator, dynamics on and off: docs/results/dqn.md + PNGs.

    python benchmarks/dqn_results.py --data-dir ../shared/data/ml-100k

Per dynamics setting and seed: a simulator (the seed draws the 20% test users and the MF init),
the fixed policies (random, most-popular, greedy-MF, the myopic and lookahead oracles) and the
learned ones, each trained from random initialisation on training-user sessions with the same
budget: the myopic greedy ranker (γ = 0) and the DQN with an MLP and with an MoE Q-network. All
are evaluated with one session per test user; mean ± std over seeds. Every finished run is added to
docs/results/dqn.json at once, and `--resume` skips the runs already there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.retrieval_results import commit  # noqa: E402
from moekit.commands.info import environment_summary  # noqa: E402
from moekit.io import atomic_write_json, atomic_write_text  # noqa: E402
from moekit.plots import line_curves  # noqa: E402
from moekit.rl.calibration import estimate_dynamics  # noqa: E402
from moekit.rl.dqn import QNetworkOptions  # noqa: E402
from moekit.rl.policies import LookaheadOracle, greedy_mf_policy, most_popular_policy, random_policy  # noqa: E402
from moekit.rl.simulator import SimulatorConfig  # noqa: E402
from moekit.train.dqn import (  # noqa: E402
    DQNConfig,
    DQNDataConfig,
    DQNTrainSettings,
    build_simulator,
    evaluate_policy,
    fit,
    load_data,
    resolve_data,
    value_calibration,
)

SETTINGS = {"on": "dynamics on", "off": "dynamics off (memoryless)"}
FIXED = ["random", "most-popular"]
REFERENCES = ["greedy-MF (reads the MF user factors)", "myopic oracle (reads the simulator state)"]


def portable_args(args) -> dict:
    """The run's arguments without this machine's paths: the data folder by its name, the report by
    its place in the repository."""
    out = vars(args).copy()
    if out["data_dir"]:
        out["data_dir"] = Path(out["data_dir"]).name
    out["out"] = str(Path(out["out"]).resolve().relative_to(REPO)) if Path(out["out"]).resolve().is_relative_to(
        REPO) else Path(out["out"]).name
    return out


def learned_configs(args, seed: int, dynamics: bool) -> dict[str, DQNConfig]:
    """The learned policies' run configs: the myopic greedy ranker (γ = 0) and the DQN per Q-network."""
    data = DQNDataConfig(dataset=args.dataset, data_dir=args.data_dir, dynamics=dynamics)

    def config(q_net: str, gamma: float, n_step: int) -> DQNConfig:
        train = DQNTrainSettings(seed=seed, total_steps=args.steps, eps_decay_steps=args.steps // 2,
                                 explore=args.explore, eval_every=args.steps // args.curve_points,
                                 eval_users=args.curve_users, progress=False, gamma=gamma, n_step=n_step)
        return DQNConfig(model=QNetworkOptions(q_net=q_net), data=data, train=train)

    out = {"myopic greedy (mlp, γ = 0)": config("mlp", 0.0, 1)}
    for q in args.q_nets:
        out[f"DQN ({q})"] = config(q, args.gamma, args.n_step)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--settings", nargs="+", default=["on", "off"], choices=list(SETTINGS))
    parser.add_argument("--steps", type=int, default=30_000, help="env steps per learned policy")
    parser.add_argument("--gamma", type=float, default=0.8)
    parser.add_argument("--n-step", type=int, default=10)
    parser.add_argument("--explore", default="popular", choices=["uniform", "popular"])
    parser.add_argument("--q-nets", nargs="+", default=["mlp", "moe"], choices=["mlp", "moe"])
    parser.add_argument("--oracle-depth", type=int, default=3)
    parser.add_argument("--curve-points", type=int, default=6, help="greedy evaluations along training")
    parser.add_argument("--curve-users", type=int, default=100, help="training users in each curve evaluation")
    parser.add_argument("--variants", nargs="*", default=["0.95,3", "0.9,10", "0.9,1", "0.8,3"],
                        help="other 'gamma,n_step' pairs for DQN (mlp), run on the first seed with the dynamics on")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in the JSON file")
    parser.add_argument("--report-only", action="store_true",
                        help="write the markdown and PNGs from the JSON file's runs, training nothing")
    parser.add_argument("--out", default=str(REPO / "docs" / "results" / "dqn.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    json_path = Path(args.out).with_suffix(".json")
    store = json.loads(json_path.read_text()) if (args.resume or args.report_only) and json_path.is_file() else {}
    deep = f"lookahead oracle, depth {args.oracle_depth} (reads the simulator state)"
    if args.report_only:
        write_report(store, args, deep, Path(args.out))
        return
    runs: dict = store.setdefault("runs", {})
    if commit() not in store.setdefault("run_commits", []):
        store["run_commits"].append(commit())
    data = load_data(resolve_data(DQNDataConfig(dataset=args.dataset, data_dir=args.data_dir)))

    def save():
        store["args"] = portable_args(args)
        atomic_write_json(json_path, store)

    for setting in args.settings:
        for seed in args.seeds:
            key = f"{setting}/{seed}"
            done = runs.setdefault(key, {})
            configs = learned_configs(args, seed, setting == "on")
            sim = build_simulator(next(iter(configs.values())), data)
            if "calibration" not in store:
                store["calibration"] = estimate_dynamics(data, sim.known_rows).as_dict()
                store["num_items"], store["test_users"] = sim.num_items, len(sim.test_users)
            users, curve_users = sim.test_users, sim.train_users[: args.curve_users]
            fixed = {"random": random_policy(seed), "most-popular": most_popular_policy(sim),
                     REFERENCES[0]: greedy_mf_policy(sim), REFERENCES[1]: LookaheadOracle(sim, 1)}
            if args.oracle_depth > 1:
                fixed[deep] = LookaheadOracle(sim, args.oracle_depth)
            for name, policy in fixed.items():
                if name in done:
                    continue
                t = time.perf_counter()
                done[name] = {"test": evaluate_policy(sim, policy, users, seed)}
                if name != deep:  # the curves' reference lines, on the curve users
                    done[name]["curve_users"] = evaluate_policy(sim, policy, curve_users, seed)
                done[name]["seconds"] = time.perf_counter() - t
                save()
                print(f"[{key}] {name}: return {done[name]['test']['return']:.3f}", flush=True)
            if setting == "on" and seed == args.seeds[0]:
                for v in args.variants:
                    gamma, n = v.split(",")
                    name = f"DQN (mlp), γ = {float(gamma)}, n = {int(n)}"
                    base = configs["DQN (mlp)"]
                    configs[name] = dataclasses.replace(base, train=dataclasses.replace(
                        base.train, gamma=float(gamma), n_step=int(n)))
            for name, cfg in configs.items():
                if name in done:
                    continue
                result = fit(cfg, sim=sim)
                done[name] = {"test": {**result.test, "ended_by": result.extra["ended_by"]},
                              "curve": result.extra["curve"], "train_seconds": result.train_seconds,
                              "final_loss": result.extra["final_loss"]}
                done[name]["value_calibration"] = value_calibration(sim, result.model, curve_users, cfg.train.gamma,
                                                                    seed)
                save()
                print(f"[{key}] {name}: return {result.test['return']:.3f} ({result.train_seconds:.0f} s)",
                      flush=True)
    store["seconds"] = store.get("seconds", 0.0) + time.perf_counter() - start
    save()
    write_report(store, args, deep, Path(args.out))


def _stats(runs: dict, setting: str, seeds: list[int], name: str, key: str) -> np.ndarray:
    return np.array([runs[f"{setting}/{s}"][name]["test"][key] for s in seeds if name in runs.get(f"{setting}/{s}", {})])


def _cell(v: np.ndarray, digits: int = 3, seeds: int = 0) -> str:
    """mean ± std over the seeds run; says so when fewer than `seeds` were."""
    if not len(v):
        return "n/a"
    if len(v) == 1 and seeds > 1:
        return f"{v[0]:.{digits}f} (1 seed)"
    return f"{v.mean():.{digits}f} ± {v.std():.{digits}f}" + (f" ({len(v)} seeds)" if len(v) < seeds else "")


def write_report(store: dict, args, deep: str, out: Path) -> None:
    runs, seeds = store["runs"], args.seeds
    learned = list(learned_configs(args, seeds[0], True))
    names = FIXED + learned + REFERENCES + ([deep] if args.oracle_depth > 1 else [])
    tables, verdicts = {}, {}
    for setting in args.settings:
        rows = ["| policy | return per session | session length | hit rate (≥ 4 stars) | mean stars | real held-out share |",
                "|---|---|---|---|---|---|"]
        for n in names:
            cells = [_cell(_stats(runs, setting, seeds, n, k), d, len(seeds)) for k, d in
                     (("return", 3), ("session_length", 2), ("hit_rate", 3), ("mean_stars", 3), ("real_share", 3))]
            label = f"**{n}**" if n.startswith("DQN") else n
            rows.append(f"| {label} | " + " | ".join(cells) + " |")
        tables[setting] = "\n".join(rows)
        lines = []
        myopic = learned[0]
        base = _stats(runs, setting, seeds, myopic, "return")
        for n in learned[1:]:
            dqn = _stats(runs, setting, seeds, n, "return")
            if not len(dqn) or len(dqn) != len(base):
                continue
            diff = dqn - base
            if len(diff) == 1:
                lines.append(f"- {n} vs {myopic}: {dqn[0]:.3f} vs {base[0]:.3f}, difference {diff[0]:+.3f} "
                             f"(one seed: no seed spread to compare it with).")
                continue
            spread = max(dqn.std(), base.std())
            met = diff.mean() > spread and (diff > 0).all()
            lines.append(f"- {n} vs {myopic}: {dqn.mean():.3f} vs {base.mean():.3f}, difference "
                         f"{diff.mean():+.3f} (per seed {', '.join(f'{d:+.2f}' for d in diff)}; seed spread "
                         f"{spread:.3f}): **{'beats it by more than the seed spread' if met else 'does not beat it by more than the seed spread'}**.")
        deep_r, myo_r = _stats(runs, setting, seeds, deep, "return"), _stats(runs, setting, seeds, REFERENCES[1], "return")
        if len(deep_r) and len(deep_r) == len(myo_r):
            gap = deep_r - myo_r
            lines.append(f"- What planning is worth here: the lookahead oracle returns {deep_r.mean():.3f} against the myopic "
                         f"oracle's {myo_r.mean():.3f} ({gap.mean():+.3f}, {100 * gap.mean() / max(abs(myo_r.mean()), 1e-9):+.1f}%), "
                         f"with the same hidden state; every other gap in the table is about learning the user, not planning.")
        verdicts[setting] = "\n".join(lines)
    plot_paths = make_plots(store, args, learned, out)
    first = runs.get(f"on/{seeds[0]}", {})
    variant_rows = ["| learned policy (dynamics on, seed " + str(seeds[0]) + ") | γ | n | greedy return, training users (end of training) | test return | test session length | mean Q(s, a) of chosen items | realised discounted return |",
                    "|---|---|---|---|---|---|---|---|"]
    for n, r in first.items():
        if "curve" not in r:
            continue
        gamma, n_step = (0.0, 1) if n.startswith("myopic") else (
            (args.gamma, args.n_step) if "γ =" not in n else (float(n.split("γ = ")[1].split(",")[0]), int(n.split("n = ")[1])))
        vc = r.get("value_calibration", {})
        variant_rows.append(f"| {n} | {gamma} | {n_step} | {r['curve']['return'][-1]:.3f} | {r['test']['return']:.3f} | "
                            f"{r['test']['session_length']:.2f} | {vc.get('mean_q', float('nan')):.2f} | "
                            f"{vc.get('mean_discounted_return', float('nan')):.2f} |")
    cal = store.get("calibration", {})
    env = environment_summary()
    d, m = SimulatorConfig(), SimulatorConfig.memoryless()
    secs = {n: np.mean([runs[k][n]["train_seconds"] for k in runs if n in runs[k]]) for n in learned}
    train_minutes = sum(r.get("train_seconds", 0.0) for k in runs for r in runs[k].values()) / 60
    text = f"""# DQN recommender in a user simulator with long-term dynamics ({args.dataset})

Command: `python benchmarks/dqn_results.py --data-dir ../shared/data/{args.dataset}` (report written at commit {commit()};
runs recorded at {', '.join(store.get('run_commits', [])) or 'the same commit'}; {train_minutes:.0f} min of learned-policy training in all).
Machine: {env['cpu_count']}-core CPU shared with other jobs, torch {env['torch']}, 1 thread. Raw numbers: `docs/results/dqn.json`.
{store.get('provenance', '')}

## The simulator (`moekit.rl.simulator`)

Each user's ratings are split in time: the first 80% are known, the last 20% held out. 20% of the users
(drawn with the seed) are test users; every learned policy trains only on sessions of the others. A user's
taste is x0(u, i): their real held-out rating of movie i if there is one, else the rating a biased MF (32
factors, ALS on the known ratings of all users) predicts, rounded to whole stars. A session is a sequence of
single recommendations a_0, a_1, ... from the whole catalogue ({store.get('num_items', 0):,} movies), never a repeat
nor a movie the user rated in the known part. Reward r_t = (x_t - 3) / 2; a reaction of 4 stars or more is
a hit. With the dynamics **on**:

- **Boredom** (GeMS / SARDINE boredom, RecLab's topic penalty): with ĝ_i the item's genre vector scaled to
  unit length, the user carries a genre exposure e_0 = 0, e_(t+1) = λ e_t + ĝ_(a_t), and reacts
  x_t = clip(x0(u, a_t) - β ĝ_(a_t) · e_t, 1, 5). A movie of the same genres as the previous one loses β
  stars, after two such movies β(1 + λ); a genre recovers by the factor λ per recommendation.
- **Patience and leaving** (KuaiSim's leave model, RecSim's time budget): P_0 = P,
  P_(t+1) = P_t - clip(τ - x_t, 0, d); the session ends when P_(t+1) <= 0, otherwise the user leaves with
  probability h after each recommendation, and the session stops after at most {d.episode_length} recommendations.

| parameter | value | where it comes from |
|---|---|---|
| h, leave probability per recommendation | {d.leave_prob} | **data**: in ML-100K rating sessions of the known ratings (a gap of more than 30 min starts a new one: {cal.get('sessions', 0):,} sessions, mean length {cal.get('mean_session_length', 0):.1f}), the chance a session ends right after a rating of 3+ stars is {cal.get('leave_rate', float('nan')):.4f} |
| β, stars lost per unit of genre exposure | {d.boredom} | **literature**: the data cannot identify it. Within users, ML-100K ratings do not fall with genre repetition in a session: the slope of the MF residual on the exposure ĝ · e (λ = 0.8) is {cal.get('boredom_slope', float('nan')):+.4f} ± {cal.get('boredom_slope_se', float('nan')):.4f} stars (MovieLens rating sessions log films seen long before, not a sequence consumed in that order). The value follows RecLab's `topics-dynamic-v1` (1 star off once one of 19 topics was seen more than twice in the last 5): here the 4th same-genre movie in a row loses 1.22 stars |
| λ, exposure kept per recommendation | {d.boredom_decay} | literature (as β): a genre is within 0.1 star of fresh 8 recommendations after it was last shown |
| P, τ, d: patience, disappointment threshold, most patience lost per item | {d.patience}, {d.patience_threshold}, {d.patience_max_drop} | **literature**, KuaiSim's defaults (initial temper 10, a step costs between 0 and 2): a 1-star reaction costs 2, a 2-star one 1, 3 stars and up nothing. The data cannot identify it: a 1-2 star rating raises the chance a rating session ends only from {cal.get('leave_rate', float('nan')):.4f} to {cal.get('leave_rate_disappointed', float('nan')):.4f}, but a low rating of a film seen years ago is not a disappointing recommendation |
| most recommendations per session | {d.episode_length} | KuaiSim's max_step_per_episode |

The parameters were fixed, and these numbers measured, before any agent was trained; none was changed after.
With the dynamics **off** (`SimulatorConfig.memoryless()`: β = 0, no patience, h = 0, {m.episode_length}
recommendations) the simulator is the memoryless one moekit had before (a test checks it against an
independent re-implementation).

## Policies

All policies see the same observation: the user's 10 latest liked movies (known part, then liked
recommendations) and demographic features (gender, age group, occupation), and the session's latest 10
recommendations with their reactions and the step count; none sees the hidden exposure or patience.

- **random**, **most-popular** (most known ratings).
- **myopic greedy (γ = 0)**: the greedy ranker learned from the same data as the DQN: the same Q-network,
  trained the same way on the same number of simulator interactions, with discount 0, i.e. a model of the
  immediate reward of each movie given the observation, ranked greedily.
- **DQN**: Double DQN, target network copied every 1000 steps, Huber loss, {args.n_step}-step returns with
  γ = {args.gamma}, replay of 50,000 transitions, Adam lr 1e-3, batch 64, one gradient step per env step,
  epsilon 1 -> 0.05 over the first half of training, exploration {args.explore}
  ({'proportional to known-rating counts + 1' if args.explore == 'popular' else 'uniform'}); Q(s, a) = V(s) + A(s, a) - mean A
  (dueling), A(s, a) = <f(s), e_a + W g_a> + b_a, f = history embeddings + user features + session features
  -> residual MLP or **MoE** block (4 experts, top-2), width 64. **Random initialisation** (no MF warm start).
  {args.steps:,} env steps per learned policy and seed (mean training time: {', '.join(f'{n} {s:.0f} s' for n, s in secs.items())}).
- References that read what no policy sees, labelled as such: **greedy-MF** ranks by the user's MF
  prediction (the taste model, blind to the dynamics); the **myopic oracle** takes the best true immediate
  reaction given the hidden state; the **lookahead oracle** searches {args.oracle_depth} steps ahead on the hidden
  state (beam of 6 items, one per genre set; the leave probability folded in as the chance to go on). They
  bound what the observation-based policies could reach; the gap between the two oracles is what planning
  is worth in this simulator.

Evaluation: one greedy session per test user ({store.get('test_users', 0)} users; `env.reset(seed=seed + k)` for the k-th user, so every
policy meets the same leave draws), mean over users; then mean ± std over seeds {seeds}.

## Results: dynamics on

{tables.get('on', '(not run)')}

{verdicts.get('on', '')}

## Results: dynamics off (the memoryless simulator)

{tables.get('off', '(not run)')}

{verdicts.get('off', '')}

## What was tried for the DQN

The DQN's discount and n-step length were chosen before the 3-seed runs, on the greedy return of training
users (never the test users). Every variant below is run by this command on seed {seeds[0]} with the dynamics on;
the last two columns compare, on the same training users, the Q-value of the items the greedy policy picks
with the discounted return that actually followed (over-estimation: the max over ~1,600 noisy item values,
fed back through bootstrapping).

{chr(10).join(variant_rows)}

## Learning curves

Greedy return on {args.curve_users} fixed training users along training (mean over seeds, band: min-max), with
the fixed policies on the same users as dashed lines.

{chr(10).join(f'![{p.stem}]({p.name})' for p in plot_paths)}
"""
    atomic_write_text(out, text)
    print(text)


def make_plots(store: dict, args, learned: list[str], out: Path) -> list[Path]:
    runs, paths = store["runs"], []
    for setting in args.settings:
        for metric, ylabel in (("return", "greedy return per session"), ("session_length", "session length (recommendations)")):
            if metric == "session_length" and setting == "off":
                continue  # always 10
            curves, bands = {}, {}
            for n in learned:
                ys = [runs[f"{setting}/{s}"][n]["curve"][metric] for s in args.seeds if n in runs.get(f"{setting}/{s}", {})]
                if not ys:
                    continue
                x = runs[f"{setting}/{args.seeds[0]}"][n]["curve"]["step"]
                ys = np.array(ys)
                curves[n], bands[n] = (x, ys.mean(0)), (ys.min(0), ys.max(0))
            refs = {}
            for n in FIXED + REFERENCES:
                v = [runs[f"{setting}/{s}"][n]["curve_users"][metric] for s in args.seeds if n in runs.get(f"{setting}/{s}", {})]
                if v:
                    refs[n] = float(np.mean(v))
            present = [s for s in args.seeds if any(n in runs.get(f"{setting}/{s}", {}) for n in learned)]
            path = out.with_name(f"dqn_{metric}_{setting}.png")
            line_curves(curves, path, xlabel="training env steps (recommendations)", ylabel=ylabel,
                        title=f"{SETTINGS[setting]}\n{ylabel} on {args.curve_users} training users, seeds {present}",
                        references=refs, bands=bands)
            paths.append(path)
    return paths


if __name__ == "__main__":
    main()
