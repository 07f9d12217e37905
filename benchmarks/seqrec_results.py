"""SASRec vs FAME on Amazon Beauty and MovieLens-100K: writes docs/results/seqrec.md (+ JSON, facet PNG).

Protocol: leave-one-out (last item test, second-to-last validation), full ranking over all items with
the user's history masked, HR/NDCG@{5,10,20}; both models trained with the same loss (full softmax
cross-entropy by default); early stopping on validation NDCG@10; mean ± std over seeds.

    python benchmarks/seqrec_results.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moekit.config import config_dict  # noqa: E402
from moekit.data.sequences import DATASETS, dataset_folder  # noqa: E402
from moekit.io import atomic_write_json, atomic_write_text  # noqa: E402
from moekit.train.results import TrainResult  # noqa: E402
from moekit.train.seqrec import (  # noqa: E402
    SeqRecConfig,
    SeqRecModelOptions,
    SeqRecTrainSettings,
    SequenceDataConfig,
    fit,
    head_gate_by_category,
    load_data,
)

# Published full-ranking numbers on this exact Beauty file (leave-one-out, all items).
PUBLISHED_BEAUTY = [
    ("SASRec, S3-Rec paper's table (BCE, 1 negative)", {"HR@10": 0.0605, "NDCG@10": 0.0318}),
    ("SASRec, RecBole (cross-entropy)", {"HR@10": 0.083, "NDCG@10": 0.0416}),
    ("ICLRec released checkpoint", {"HR@10": 0.0744, "NDCG@10": 0.0403}),
]
METRICS = ("HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20")


SECTIONS = {"model": SeqRecModelOptions, "data": SequenceDataConfig, "train": SeqRecTrainSettings}


def seqrec_config(**flat) -> SeqRecConfig:
    """A run config from flat keys (`hidden=128, lr=1e-3, dataset='beauty'`), each put into the section
    that has it; `model` names the architecture, as in the results JSON. Keys not given keep `moekit
    train seqrec`'s defaults."""
    flat = dict(flat)
    if "model" in flat:
        flat["architecture"] = flat.pop("model")
    sections: dict[str, dict] = {name: {} for name in SECTIONS}
    for key, value in flat.items():
        owners = [name for name, cls in SECTIONS.items() if key in {f.name for f in dataclasses.fields(cls)}]
        if len(owners) != 1:
            raise ValueError(f"no single config section has the key {key!r}")
        sections[owners[0]][key] = value
    return SeqRecConfig(**{name: cls(**sections[name]) for name, cls in SECTIONS.items()})


def flat_config(config: SeqRecConfig) -> dict:
    """The results JSON's `config`: every key of every section in one dict, `model` the architecture and
    `num_heads` resolved (what `seqrec_config` reads back)."""
    flat = {key: value for name in SECTIONS for key, value in config_dict(getattr(config, name)).items()}
    flat["model"] = flat.pop("architecture")
    flat["num_heads"] = config.model.heads
    return flat


def run_record(config: SeqRecConfig, result: TrainResult) -> dict:
    """What the results JSON keeps of one run (no tensors)."""
    return {"config": flat_config(config), "data": result.extra["data"], "protocol": result.extra["protocol"],
            "epochs_run": len(result.history), "best_epoch": result.best_epoch,
            "train_seconds": result.train_seconds, "valid": result.valid, "test": result.test,
            "history": result.history}


def _git_commit() -> str:
    try:

        def git(*a: str) -> str:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout

        out, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain")
        return out.strip() + (" (+ uncommitted changes)" if dirty.strip() else "")
    except OSError:
        return "unknown"


def _std(values: list[float]) -> float:
    """Sample std over seeds; 0 for a single seed (numpy's ddof=1 would give NaN and a warning)."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.4f} ± {_std(values):.4f}"


def _table(rows: dict[str, list[dict]], published) -> str:
    lines = ["| model | epochs (best) | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for name, results in rows.items():
        epochs = ", ".join(f"{r['epochs_run']} ({r['best_epoch']})" for r in results)
        cells = [_mean_std([r["test"][m] for r in results]) for m in METRICS]
        lines.append(f"| moekit {name} | {epochs} | " + " | ".join(cells) + " |")
    for name, nums in published:
        lines.append(
            f"| {name} (published) | | "
            + " | ".join(f"{nums[m]:.4f}" if m in nums else "" for m in METRICS)
            + " |"
        )
    return "\n".join(lines)


CATEGORY_LABEL = {  # what the row labels of the facet plot are, per dataset
    "beauty": "attribute id of the test target\n(S3-Rec's category/brand ids; names\nare not published) (users)",
    "ml-100k": "genre of the test target (users)",
}


def _heatmap(names, table, counts, title: str, path: Path, dataset: str) -> None:
    from moekit.plots import annotated_heatmap, pyplot, save_png

    fig, ax = pyplot().subplots(figsize=(5.4 + 1.1 * table.shape[1], 1.4 + 0.32 * len(names)))
    annotated_heatmap(ax, table, [f"{n} ({c})" for n, c in zip(names, counts, strict=True)],
                      [f"head {h}" for h in range(table.shape[1])], colorbar_label="mean head-gate weight",
                      fmt="{:.3f}", xlabel="FAME head (facet)", ylabel=CATEGORY_LABEL.get(dataset, "category"))
    ax.set_title(title, fontsize=9)
    save_png(fig, path)


def run_side_by_side(fn: Callable, jobs: list[tuple], workers: int, slow_first: Callable) -> list:
    """fn(*job) for every job, in `workers` spawned processes (one each, so torch threads do not fight),
    jobs sorted by `slow_first(job)` so the slow ones start first and the workers finish together.
    Results come back in the order of `jobs`."""
    if workers <= 1:
        return [fn(*job) for job in jobs]
    import multiprocessing

    order = sorted(range(len(jobs)), key=lambda i: slow_first(jobs[i]))
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        done = pool.starmap(fn, [jobs[i] for i in order])
    results = [None] * len(jobs)
    for i, result in zip(order, done, strict=True):
        results[i] = result
    return results


def run_job(args: argparse.Namespace, dataset: str, model: str, seed: int, epochs: int):
    """Train one (dataset, model, seed): (result without tensors, FAME facets for the first seed or None)."""
    # Training settings not given on the command line stay `moekit train seqrec`'s defaults.
    given = {name: getattr(args, name) for name in ("lr", "lr_decay", "batch_size") if getattr(args, name) is not None}
    if args.dropout is not None:
        given.update(dropout=args.dropout, attn_dropout=args.dropout)
    cfg = seqrec_config(
        dataset=dataset,
        data_dir=str(Path(args.data_dir) / dataset_folder(dataset)),
        model=model,
        loss=args.loss,
        epochs=epochs,
        patience=args.patience,
        valid_users=args.valid_users or None,
        threads=args.threads,
        seed=seed,
        progress=args.workers == 1,
        **given,
    )
    data = load_data(cfg.data)
    result = fit(cfg, data=data)
    print(
        f"{dataset} {model} seed {seed}: test HR@10 {result.test['HR@10']:.4f} "
        f"NDCG@10 {result.test['NDCG@10']:.4f} ({len(result.history)} epochs, "
        f"best {result.best_epoch}, {result.train_seconds:.0f} s)",
        flush=True,
    )
    facet = None
    if model == "fame" and seed == args.seeds[0]:
        facet = head_gate_by_category(result.model, result.extra["split"], data)
    return {**run_record(cfg, result), "summary": data.summary()}, facet


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="../shared/data", help="folder holding amazon-beauty/ and ml-100k/")
    p.add_argument("--datasets", nargs="+", default=["beauty", "ml-100k"])
    p.add_argument("--models", nargs="+", default=["sasrec", "fame"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--loss", default="ce", choices=["ce", "bce"])
    p.add_argument(
        "--epochs",
        type=int,
        nargs="+",
        default=[40, 100],
        help="epoch cap per dataset (same order as --datasets)",
    )
    p.add_argument("--patience", type=int, default=5, help="epochs without a better validation NDCG@10")
    p.add_argument("--lr", type=float, default=None, help="default: `moekit train seqrec`'s")
    p.add_argument("--dropout", type=float, default=None, help="default: `moekit train seqrec`'s")
    p.add_argument("--batch-size", type=int, default=None, help="default: `moekit train seqrec`'s")
    p.add_argument("--lr-decay", type=float, default=None, help="ReduceLROnPlateau factor "
                   "(default: `moekit train seqrec`'s)")
    p.add_argument("--valid-users", type=int, default=3000, help="early-stopping users (0: all)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--workers", type=int, default=2, help="runs trained side by side (one process each)")
    p.add_argument("--out", default=str(ROOT / "docs" / "results"))
    p.add_argument("--merge", action="store_true",
                   help="replace only --datasets in OUT/seqrec.json, keeping the other datasets' runs")
    p.add_argument("--from-json", action="store_true", help="only re-render the tables from OUT/seqrec.json")
    args = p.parse_args(argv)
    if len(args.epochs) != len(args.datasets):
        p.error(f"--epochs needs one value per dataset ({len(args.datasets)})")
    out = Path(args.out)
    command = "python benchmarks/seqrec_results.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.from_json:
        raw = json.loads((out / "seqrec.json").read_text())
    else:
        cap = dict(zip(args.datasets, args.epochs, strict=True))
        jobs = [(args, d, m, seed, cap[d]) for d in args.datasets for m in args.models for seed in args.seeds]
        started, load_before, commit = time.time(), os.getloadavg()[0], _git_commit()  # the code that runs
        # The longest runs (Beauty, FAME) start first.
        outcomes = run_side_by_side(run_job, jobs, args.workers, slow_first=lambda job: (job[1] != "beauty",
                                                                                          job[2] != "fame"))
        meta = {
            "command": command,
            "commit": commit,
            "wall_minutes": (time.time() - started) / 60,
            "workers": args.workers,
            "threads": args.threads,
            "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        }
        raw = {}
        if args.merge and (out / "seqrec.json").is_file():
            # Keep the other datasets' runs; each dataset carries the metadata of the run that made it.
            raw = json.loads((out / "seqrec.json").read_text())
            old_meta = raw.pop("meta", None)
            for entry in raw.values():
                entry.setdefault("meta", old_meta)
        for dataset in args.datasets:
            raw.pop(dataset, None)
        for (_, dataset, model, _, _), (result, facet) in zip(jobs, outcomes, strict=True):
            entry = raw.setdefault(dataset, {"data": result.pop("summary"), "runs": {}, "facets": None,
                                             "meta": meta})
            result.pop("summary", None)
            entry["runs"].setdefault(model, []).append(result)
            if facet is not None:
                entry["facets"] = {"categories": facet[0], "gate": facet[1], "counts": facet[2]}
        atomic_write_json(out / "seqrec.json", raw)
    render(raw, out, command if args.from_json else None)
    return 0


def _verdicts(dataset: str, runs: dict) -> list[str]:
    """Plain statements of whether the issue's targets are met, with the margins."""
    lines = []
    ndcg = {m: [r["test"]["NDCG@10"] for r in rs] for m, rs in runs.items()}
    hr = {m: [r["test"]["HR@10"] for r in rs] for m, rs in runs.items()}
    if dataset == "beauty" and "sasrec" in runs:
        ok = np.mean(hr["sasrec"]) >= 0.083 and np.mean(ndcg["sasrec"]) >= 0.0416
        lines.append(
            "- Target SASRec (CE) >= RecBole's HR@10 0.083 / NDCG@10 0.0416: "
            f"**{'met' if ok else 'missed'}** "
            f"(HR@10 {np.mean(hr['sasrec']):.4f}, {np.mean(hr['sasrec']) - 0.083:+.4f}; NDCG@10 "
            f"{np.mean(ndcg['sasrec']):.4f}, {np.mean(ndcg['sasrec']) - 0.0416:+.4f})."
        )
    if "sasrec" in runs and "fame" in runs:
        gap = np.mean(ndcg["fame"]) - np.mean(ndcg["sasrec"])
        spread = max(_std(ndcg["fame"]), _std(ndcg["sasrec"]))
        ok = gap > spread
        lines.append(
            f"- Target FAME beats SASRec (same loss) on NDCG@10 by more than the seed spread: "
            f"**{'met' if ok else 'missed'}** (FAME − SASRec = {gap:+.4f}; larger seed std {spread:.4f})."
        )
    return lines


def _fallback_meta(rerender_command: str | None) -> dict:
    """For a JSON written before runs recorded their metadata: the training command is the re-render
    command without --from-json, and the code is the last commit that touched moekit/."""
    code = subprocess.run(
        ["git", "log", "-1", "--format=%h", "--", "moekit"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    command = (rerender_command or "").replace(" --from-json", "")
    return {
        "command": command,
        "commit": f"{code} (last change to moekit/; JSON without metadata)",
        "wall_minutes": float("nan"),
        "workers": 2 if "--parallel" in command else 1,
        "threads": 1,
    }


def _load(meta: dict) -> str:
    if "load_average" not in meta:
        return "other agents' jobs running, load average ~10; "
    before, after = meta["load_average"]
    return f"1-minute load average {before} at the start, {after} at the end; "


def _valid_users(cfg: dict, data: dict) -> str:
    users = data["eval_users"]
    if cfg["valid_users"] and cfg["valid_users"] < users:
        return f"{cfg['valid_users']} random validation users (of {users:,})"
    return f"all {users:,} validation users"


def render(raw: dict, out: Path, rerender_command: str | None = None) -> None:
    """docs/results/seqrec.md (+ facet PNGs) from the results JSON."""
    datasets = sorted((d for d in raw if d != "meta"), key=DATASETS.index)  # Beauty first, as the issue
    cfg0 = raw[datasets[0]]["runs"]["sasrec" if "sasrec" in raw[datasets[0]]["runs"] else "fame"][0]["config"]
    all_runs = [r for d in datasets for rs in raw[d]["runs"].values() for r in rs]
    loss = (
        "full softmax cross-entropy over all items"
        if cfg0["loss"] == "ce"
        else "BCE with one sampled negative"
    )
    text = [
        "# Sequential recommendation: SASRec and FAME",
        "",
        "Each dataset's section names the command and commit that produced it."
        + (f" Tables re-rendered from docs/results/seqrec.json by `{rerender_command}`." if rerender_command
           else ""),
        "",
        "**Protocol.** Leave-one-out: per user the last item is the test target, the second-to-last the "
        "validation target. Full ranking over all items (no sampling), the user's earlier items removed from "
        "the candidates. Test metrics of the epoch with the best validation NDCG@10 (the validation users, "
        "a fixed random subset or all, and the learning-rate schedule are in each dataset's model line). "
        f"Both models trained with the same loss ({loss}), every position of a training sequence "
        "predicting its next item and every such target weighing the same in the loss. "
        "Mean ± sample std over seeds "
        f"{sorted({r['config']['seed'] for r in raw[datasets[0]]['runs']['sasrec']})}.",
        "",
    ]
    capped = [r for r in all_runs if r["epochs_run"] == r["config"]["epochs"] and r["best_epoch"] == r["epochs_run"]]
    if capped:
        text += [
            f"**Not converged:** {len(capped)} of {len(all_runs)} runs were still improving when they hit their "
            "epoch cap (best validation NDCG@10 at the last epoch); their numbers are lower bounds.",
            "",
        ]
    for dataset in datasets:
        entry = raw[dataset]
        runs = entry["runs"]
        cap = next(iter(runs.values()))[0]["config"]["epochs"]
        published = PUBLISHED_BEAUTY if dataset == "beauty" else []
        meta = entry.get("meta") or raw.get("meta") or _fallback_meta(rerender_command)
        cfg = next(iter(runs.values()))[0]["config"]
        text += [
            f"## {entry['data']}",
            "",
            f"Produced by `{meta['command']}` at commit {meta['commit']}, on a shared 2-core CPU "
            f"({_load(meta)}{meta['workers']} worker process(es), {meta['threads']} torch thread(s) each); "
            + (f"{meta['wall_minutes']:.0f} min wall time for the command."
               if meta["wall_minutes"] == meta["wall_minutes"] else "wall time not recorded."),
            "",
            f"Model: max_len {cfg['max_len']}, hidden {cfg['hidden']}, {cfg['num_layers']} layers, "
            + ", ".join(f"{m} {rs[0]['config']['num_heads']} heads" for m, rs in runs.items())
            + f", dropout {cfg['dropout']}, Adam lr {cfg['lr']}, batch {cfg['batch_size']}, "
            f"patience {cfg['patience']} on {_valid_users(cfg, next(iter(runs.values()))[0]['data'])}, "
            + (f"learning rate x{cfg['lr_decay']} after {cfg['lr_patience']} epochs without a better validation "
               "NDCG@10" if cfg.get("lr_decay") else "constant learning rate")
            + f"; FAME: {cfg['num_experts']} query experts per head in the last layer, "
            + ("a gate over heads mixing the heads' softmax distributions."
               if cfg.get("head_mixing", "probability") == "probability"
               else "the heads' item scores added with weights H x a gate over heads (summing to H)."),
            "",
            f"Epoch cap {cap}; per run: epochs run (best epoch).",
            "",
            _table(runs, published),
            "",
        ]
        verdicts = _verdicts(dataset, runs)
        text += verdicts + [""]
        if any("**missed**" in v for v in verdicts) and (out / "seqrec_variants.md").is_file():
            text += ["What was tried against the missed targets (variants of both models on Beauty, mostly "
                     "single-seed): [seqrec_variants.md](seqrec_variants.md).", ""]
        facet = entry.get("facets")
        if facet:
            names, table, counts = facet["categories"], np.array(facet["gate"]), facet["counts"]
            png = f"seqrec_facets_{dataset}.png"
            seed = runs["fame"][0]["config"]["seed"]
            _heatmap(
                names,
                table,
                counts,
                f"FAME head gate by test-target category, {dataset} (seed {seed})",
                out / png,
                dataset,
            )
            heads = " | ".join(f"head {h}" for h in range(table.shape[1]))
            kind = ("attribute ids: the category and brand ids of S3-Rec's preprocessing, whose names are not "
                    "published" if dataset == "beauty" else "genres")
            text += [
                "FAME facets: mean head-gate weight at the test step, grouped by the category of the test "
                f"target ({kind}; an item counts in each of its categories; the most frequent categories; "
                f"FAME seed {seed}).",
                "",
                f"| category (test targets) | {heads} |",
                "|---|" + "---|" * table.shape[1],
            ]
            text += [
                f"| {n} ({c}) | " + " | ".join(f"{v:.3f}" for v in row) + " |"
                for n, c, row in zip(names, counts, table, strict=True)
            ]
            text += ["", f"![FAME facets on {dataset}]({png})", ""]
    atomic_write_text(out / "seqrec.md", "\n".join(text) + "\n")


if __name__ == "__main__":
    sys.exit(main())
