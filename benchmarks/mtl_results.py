"""Census-Income multi-task results: moekit's four models beside torch-rechub's MMoE and PLE.

Writes docs/results/mtl.md (tables), docs/results/mtl_gates.png (gate heatmaps) and
docs/results/mtl.json (every run). Every model sees the same split, the same encoded features
(moekit's FeatureSpec: categorical indices + standardised numerics) and the same seeds.

    python benchmarks/mtl_results.py --data-dir ../shared/data/census-income [--seeds 5] [--resume]

torch-rechub is driven through its own public API (features, DataGenerator, MTLTrainer) by the thin
adapter below; it lives here, never in the package.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moekit.io import atomic_write_json, atomic_write_text  # noqa: E402
from moekit.models.multitask import MultiTaskOptions  # noqa: E402
from moekit.plots import gate_heatmap  # noqa: E402
from moekit.train.mtl import MTLConfig, MTLDataConfig, MTLTrainSettings, fit, gate_table, load_data  # noqa: E402
from moekit.train.results import TrainResult  # noqa: E402

MOEKIT_MODELS = ("shared_bottom", "omoe", "mmoe", "ple")
RECHUB_MODELS = ("mmoe", "ple")
PUBLISHED = """\
| source (protocol) | model | income AUC | marital AUC |
|---|---|---|---|
| MMoE paper, KDD 2018 (train file, 199,523 rows) | Shared-Bottom | 0.9295 | 0.9921 |
| MMoE paper, KDD 2018 | OMoE | 0.9319 | 0.9923 |
| MMoE paper, KDD 2018 | MMoE | 0.9359 | 0.9927 |
| PLE paper, RecSys 2020 | MMoE | 0.9393 | 0.9928 |
| PLE paper, RecSys 2020 | PLE | 0.9522 | 0.9945 |
"""


def base_config(args) -> MTLConfig:
    # One architecture size for every library (see the protocol section of the report).
    return MTLConfig(
        model=MultiTaskOptions(embed_dim=4, num_experts=8, expert_hidden=32, expert_dim=16, tower_widths=(16,),
                               num_specific_experts=2, num_shared_experts=4, num_levels=2, bottom_widths=(64, 16)),
        data=MTLDataConfig(data_dir=args.data_dir),
        train=MTLTrainSettings(epochs=args.epochs, patience=args.patience, batch_size=1024, lr=args.lr, threads=1,
                               progress=False),
    )


def unreachable(run: dict) -> dict[str, list[int]]:
    """Per task, the experts its gate cannot weigh: under PLE, the other tasks' specific experts (named
    '<task> <i>'; shared experts are 'shared <i>'). Empty for OMoE and MMoE."""
    names = run["expert_names"]
    return {task: [i for i, name in enumerate(names) if not name.startswith(("shared ", f"{task} "))]
            for task in run["gates"]} if any(n.startswith("shared ") for n in names) else {}


def run_record(result: TrainResult, seed: int, tasks) -> dict:
    """What mtl.json keeps of one moekit run (the same keys torch-rechub's runs have, and the gates)."""
    record = {
        "seed": seed,
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "val_auc": {t: result.valid[f"{t}/auc"] for t in tasks},
        "test_auc": {t: result.test[f"{t}/auc"] for t in tasks},
        "test_loss": {t: result.test[f"{t}/logloss"] for t in tasks},
        "gates": result.extra["gates"],
        "expert_names": result.extra["expert_names"],
        "train_samples_per_s": result.extra["train_samples_per_s"],
        "history": result.history,
    }
    if "log_variances" in result.extra:
        record["log_variances"] = result.extra["log_variances"]
    return record


# ------------------------------------------------------------------------------ torch-rechub adapter


def rechub_run(model_name: str, data, cfg: MTLConfig, seed: int, log) -> dict:
    """Train torch-rechub's MMOE or PLE with its MTLTrainer on our split; returns test AUC per task."""
    from torch_rechub.basic.features import DenseFeature, SparseFeature
    from torch_rechub.models.multi_task import MMOE, PLE
    from torch_rechub.trainers import MTLTrainer
    from torch_rechub.utils.data import DataGenerator

    spec = data.spec

    def as_dict(batch):
        x = {f.name: batch.cat_NC[:, j].numpy() for j, f in enumerate(spec.categorical)}
        x.update({f.name: batch.num_NF[:, j].numpy() for j, f in enumerate(spec.numeric)})
        return x, batch.labels_NT.numpy()

    torch.manual_seed(seed)
    np.random.seed(seed)
    # New feature objects per run: torch-rechub caches the nn.Embedding on the feature object.
    features = [SparseFeature(f.name, vocab_size=f.vocab_size, embed_dim=cfg.model.embed_dim)
                for f in spec.categorical]
    features += [DenseFeature(f.name) for f in spec.numeric]
    expert = {"dims": [cfg.model.expert_hidden, cfg.model.expert_dim]}
    towers = [{"dims": list(cfg.model.tower_widths)} for _ in data.tasks]
    types = ["classification"] * len(data.tasks)
    if model_name == "mmoe":
        model = MMOE(features, types, n_expert=cfg.model.num_experts, expert_params=expert,
                     tower_params_list=towers)
    else:
        model = PLE(features, types, n_level=cfg.model.num_levels,
                    n_expert_specific=cfg.model.num_specific_experts,
                    n_expert_shared=cfg.model.num_shared_experts, expert_params=expert, tower_params_list=towers)
    x_train, y_train = as_dict(data.train)
    x_val, y_val = as_dict(data.valid)
    x_test, y_test = as_dict(data.test)
    loaders = DataGenerator(x_train, y_train).generate_dataloader(
        x_val=x_val, y_val=y_val, x_test=x_test, y_test=y_test, batch_size=cfg.train.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = MTLTrainer(model, task_types=types, optimizer_params={"lr": cfg.train.lr, "weight_decay": 0.0},
                             n_epoch=cfg.train.epochs, earlystop_patience=cfg.train.patience, device="cpu",
                             model_path=tmp)
        start = time.perf_counter()
        history = trainer.fit(loaders[0], loaders[1])
        seconds = time.perf_counter() - start
        test_auc = trainer.evaluate(trainer.model, loaders[2])
    log(f"torch-rechub {model_name} seed {seed}: test AUC {np.round(test_auc, 4).tolist()} "
        f"({len(history)} epochs, {seconds:.0f}s)")
    return {"seed": seed, "test_auc": dict(zip(data.tasks, map(float, test_auc), strict=True)),
            "epochs_run": len(history), "seconds": seconds}


# ------------------------------------------------------------------------------ report


def mean_std(runs: list[dict], task: str) -> tuple[float, float]:
    values = np.array([r["test_auc"][task] for r in runs])
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def fmt(runs, task) -> str:
    mean, std = mean_std(runs, task)
    return f"{mean:.4f} ± {std:.4f}"


def write_report(results: dict, args, out_dir: Path) -> None:
    commit = results.get("commit", "unknown")
    lines = [
        "# Multi-task learning on Census-Income (KDD): moekit vs torch-rechub",
        "",
        "Produced by `python benchmarks/mtl_results.py --data-dir ../shared/data/census-income "
        f"--seeds {args.seeds} --epochs {args.epochs} --patience {args.patience}` (runs made at commit "
        f"`{commit}`) on a shared 2-core CPU "
        f"({platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread per run).",
        "",
        "## Protocol",
        "",
        f"- **Data: {results['protocol']}.** Only `census-income.test.gz` (99,762 rows) is available here; "
        "the official training file (199,523 rows) is missing, so every number below is on the "
        "test-file-only fallback split and is **not comparable** to published numbers.",
        "- Split: seeded shuffle (split seed 0), 50/25/25 → 49,881 / 24,940 / 24,941 rows; the same split, "
        "the same encoded features (32 categorical columns embedded in 4 dimensions with an OOV bucket, "
        "7 numeric columns standardised with training statistics, log1p on money columns) and the same "
        f"seeds ({', '.join(str(s) for s in range(args.seeds))}) for every model and library.",
        "- Group 1: income > 50K, never married. Group 2: education at least college (any post-secondary "
        "schooling), never married. Label columns (income, marital status, education) and the instance "
        "weight are removed from the features (education is kept as a feature in group 1).",
        f"- Sizes (all libraries): 8 experts of two layers (hidden 32, output 16), towers with one hidden "
        "layer of 16; PLE: 2 levels, 2 task-specific + 4 shared experts per level; Shared-Bottom: bottom "
        f"(64, 16). Adam, lr {args.lr}, batch 1024, at most {args.epochs} epochs, early stopping with "
        f"patience {args.patience}, best weights restored, test AUC by scikit-learn.",
        "- Early stopping: moekit on the mean validation AUC over tasks; torch-rechub's MTLTrainer on the "
        "first task's validation AUC (its only option).",
        f"- {_cap_note(results, args.epochs)}",
        *_later_changes(commit),
        "- moekit options used: the defaults (softmax gates, no input or expert BatchNorm, no residual "
        "experts, attention gates or dropout). One tuning decision was made on group 1, seed 0, validation "
        "AUC: input BatchNorm is off by default because it cost ~0.005 income AUC there.",
        "",
    ]
    for group in (1, 2):
        g = results["groups"].get(str(group))
        if not g:
            continue
        tasks = g["tasks"]
        lines += [f"## Group {group}: test AUC ({', '.join(tasks)}), mean ± std over {args.seeds} seeds", "",
                  "| library | model | " + " | ".join(f"{t} AUC" for t in tasks) + " | mean epochs |",
                  "|---|---|" + "---|" * (len(tasks) + 1)]
        for library, key, names in (("moekit", "moekit", MOEKIT_MODELS),
                                    ("torch-rechub 0.9.0", "rechub", RECHUB_MODELS)):
            for name in names:
                runs = g[key].get(name, [])
                if runs:
                    epochs = np.mean([r["epochs_run"] for r in runs])
                    lines.append(f"| {library} | {name} | " + " | ".join(fmt(runs, t) for t in tasks)
                                 + f" | {epochs:.1f} |")
        lines += ["", *target_lines(g, tasks, group), ""]
    lines += ["## Published numbers (loose reference only: different protocol, trained on the official "
              "199,523-row training file)", "", PUBLISHED]
    lines += ["## Gate analysis", "",
              "Mean gate weight each task puts on each expert over the test set (group 1, seed 0: experts "
              "are exchangeable between seeds, so they are not averaged; every seed's table is in "
              "`mtl.json`). "
              "PLE columns are the last level's experts; a task's gate cannot see the other task's "
              "specific experts (weight 0). Heatmap: `mtl_gates.png`.", ""]
    g1 = results["groups"].get("1")
    if g1:
        for name in ("omoe", "mmoe", "ple"):
            runs = g1["moekit"].get(name, [])
            if runs:
                lines += [f"**{name}** (seed {runs[0]['seed']})", "",
                          gate_table(runs[0]["gates"], runs[0]["expert_names"]), ""]
    atomic_write_text(out_dir / "mtl.md", "\n".join(lines) + "\n")


def _later_changes(commit: str) -> list[str]:
    """A protocol bullet listing the commits that changed moekit/ after the runs were made, if any."""
    log = subprocess.run(["git", "log", "--format=%h %s", f"{commit}..HEAD", "--", "moekit"], cwd=ROOT,
                         capture_output=True, text=True).stdout.strip().splitlines()
    if not log:
        return []
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()
    return [f"- moekit/ changed after the runs were made ({len(log)} commit(s), `{commit}..{head}`; "
            "`git log` lists them). docs/results/reproduce.md reruns one configuration per report at a "
            "current commit. Rerun the command to reproduce everything at the current commit."]


def _cap_note(results: dict, cap: int) -> str:
    """How many runs stopped at the epoch cap rather than by early stopping."""
    counts = {}
    for g in results["groups"].values():
        for key in ("moekit", "rechub"):
            for runs in g[key].values():
                total, capped = counts.get(key, (0, 0))
                counts[key] = (total + len(runs), capped + sum(r["epochs_run"] >= cap for r in runs))
    parts = [f"{capped} of {total} {'moekit' if key == 'moekit' else 'torch-rechub'} runs"
             for key, (total, capped) in counts.items()]
    return (f"Runs that reached the {cap}-epoch cap instead of stopping early: {' and '.join(parts)} "
            "(mean epochs column).")


def target_lines(g: dict, tasks, group: int) -> list[str]:
    out = ["Targets:"]
    for name in RECHUB_MODELS:
        ours, theirs = g["moekit"].get(name), g["rechub"].get(name)
        if not ours or not theirs:
            continue
        for t in tasks:
            (m1, s1), (m2, s2) = mean_std(ours, t), mean_std(theirs, t)
            ok = m1 >= m2 - max(s1, s2)
            out.append(f"- moekit {name} vs torch-rechub {name}, {t}: {m1:.4f} vs {m2:.4f} "
                       f"({m1 - m2:+.4f}; {'met' if ok else 'MISSED'}: within one std or better)")
    if group == 1 and g["moekit"].get("ple") and g["moekit"].get("mmoe"):
        for t in tasks:
            m_ple, m_mmoe = mean_std(g["moekit"]["ple"], t)[0], mean_std(g["moekit"]["mmoe"], t)[0]
            out.append(f"- PLE >= MMoE on group 1, {t}: {m_ple:.5f} vs {m_mmoe:.5f} ({m_ple - m_mmoe:+.5f}; "
                       f"{'met' if m_ple >= m_mmoe else 'MISSED'})")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data/census-income")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--skip-rechub", action="store_true")
    parser.add_argument("--resume", action="store_true", help="reuse runs already in docs/results/mtl.json")
    parser.add_argument("--out-dir", default=str(ROOT / "docs" / "results"))
    args = parser.parse_args()
    out_dir = Path(args.out_dir)
    raw_path = out_dir / "mtl.json"
    torch.set_num_threads(1)
    results = {"groups": {}}
    if args.resume and raw_path.is_file():
        import json

        results = json.loads(raw_path.read_text())
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip() or "unknown"
    results.setdefault("commit", head)  # a --resume keeps the commit the runs were made at
    cfg = base_config(args)

    def log(msg: str) -> None:
        print(msg, flush=True)

    quiet = lambda msg: None  # noqa: E731 (per-epoch tables go to mtl.json, not the log)
    for group in args.groups:
        group_cfg = replace(cfg, data=replace(cfg.data, group=group))
        data = load_data(group_cfg.data)
        results["protocol"] = data.protocol
        g = results["groups"].setdefault(str(group), {"tasks": list(data.tasks), "moekit": {}, "rechub": {}})
        for seed in range(args.seeds):
            for name in MOEKIT_MODELS:
                runs = g["moekit"].setdefault(name, [])
                if any(r["seed"] == seed for r in runs):
                    continue
                start = time.perf_counter()
                run_cfg = replace(group_cfg, model=replace(cfg.model, architecture=name),
                                  train=replace(cfg.train, seed=seed))
                run = run_record(fit(run_cfg, data=data, log=quiet), seed, data.tasks)
                run["seconds"] = time.perf_counter() - start
                runs.append(run)
                log(f"group {group} moekit {name} seed {seed}: test AUC "
                    f"{ {t: round(v, 4) for t, v in run['test_auc'].items()} } "
                    f"({run['epochs_run']} epochs, {run['seconds']:.0f}s, "
                    f"{run['train_samples_per_s']:,.0f} rows/s)")
                atomic_write_json(raw_path, results)
            if args.skip_rechub:
                continue
            for name in RECHUB_MODELS:
                runs = g["rechub"].setdefault(name, [])
                if any(r["seed"] == seed for r in runs):
                    continue
                runs.append(rechub_run(name, data, group_cfg, seed, log))
                atomic_write_json(raw_path, results)
        write_report(results, args, out_dir)
    g1 = results["groups"].get("1")
    if g1:
        panels = {f"moekit {name}": (g1["moekit"][name][0]["gates"], g1["moekit"][name][0]["expert_names"],
                                     unreachable(g1["moekit"][name][0]))
                  for name in ("omoe", "mmoe", "ple") if g1["moekit"].get(name)}
        gate_heatmap(panels, out_dir / "mtl_gates.png",
                     "Census-Income group 1 (test-file-only split): mean gate weight per expert, seed 0")
    write_report(results, args, out_dir)
    log(f"wrote {out_dir / 'mtl.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
