"""moekit against its peers on their own ground: SASRec vs RecBole, two-tower vs torch-rechub.

    # the competitors, outside the shared environment (they pin old numpy/colorlog; see below)
    pip install --no-deps --target /tmp/peers-bench recbole==1.2.1 torch-rechub==0.9.0 colorlog==4.7.2 \\
        thop texttable tabulate psutil plotly
    PYTHONPATH=.:/tmp/peers-bench python benchmarks/seqrec_peers.py --data-dir ../shared/data
    PYTHONPATH=.:/tmp/peers-bench python benchmarks/seqrec_peers.py --quick     # smoke run, minutes

SASRec (Amazon Beauty, leave-one-out): RecBole 1.2.1 and moekit train SASRec of the same sizes (hidden 64,
2 layers, max length 50) with the same loss (full-softmax cross-entropy over all items) on the same split
(each user's last item is the test target, the one before it the validation target; full ranking of all
items, the user's history masked). Each library keeps its own defaults otherwise (RecBole: 2 heads, dropout
0.5, lr 1e-3; moekit: 4 heads, dropout 0.3, lr 3e-3, `train.loss_chunk=2048` (the loss scored 2,048 positions
at a time, for memory) and `train.eval_by_length` (users ranked in batches of similar history length, for
speed), both off by default; one seed also with the defaults) with batch 256 for both; both validate every epoch on
all users and stop after `--patience` epochs without a better validation NDCG@10. RecBole trains on every
prefix of every training sequence as its own sample (one target each); moekit cuts each training sequence
into windows of at most 51 items in which every position predicts the next (every item a target once), so
it takes ~6x fewer optimizer steps per epoch: time to a validation NDCG@10 is what is compared.

Two-tower (MovieLens-100K, leave-last-out): moekit's two-tower model (MLP towers, in-batch softmax with
logQ correction) and torch-rechub's DSSM (in-batch softmax, its `MatchTrainer` in 'list' mode), same
split, same user/item features where DSSM can take them, each ranking the full catalogue with the user's
training items excluded: Hit@50 and seconds per training epoch.

Every run is its own process (peak memory = its ru_maxrss), one after another, `--threads` torch threads.
RecBole 1.2.1 predates numpy 2 and torch >= 2.6: `recbole_shims` restores the removed numpy aliases
(np.float, np.long, ...) and torch.load's old `weights_only=False` default in RecBole's process only.
Writes docs/results/seqrec_peers.{md,json} and seqrec_peers_curve.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "docs" / "results"
SIZES = dict(hidden=64, num_layers=2, max_len=50)
BATCH = 256
LOSS_CHUNK = 2048  # moekit's train.loss_chunk (memory), with train.eval_by_length (speed); 0: moekit's defaults
QUICK_USERS = 300


# ----------------------------------------------------------------------------- shared data


def beauty(data_dir: str, quick: bool):
    """Amazon Beauty as moekit reads it; `quick`: the first 300 users, items renumbered 1..I'."""
    from moekit.data.sequences import SequenceDataset, load_sequences

    data = load_sequences("beauty", str(Path(data_dir) / "amazon-beauty"))
    if not quick:
        return data
    seqs = data.sequences[:QUICK_USERS]
    items = sorted({i for s in seqs for i in s})
    new = {old: j + 1 for j, old in enumerate(items)}
    return SequenceDataset(f"{data.name}-quick", [[new[i] for i in s] for s in seqs], len(items),
                           data.raw_user_ids[:QUICK_USERS], [-1, *items])


def peak_memory_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def split_counts(data) -> dict:
    """What each library should see on the leave-one-out split of `data`."""
    seqs = [s for s in data.sequences if len(s) >= 3]
    return {"users": len(seqs), "items": data.num_items, "interactions": sum(map(len, seqs)),
            "recbole_train_samples": sum(len(s) - 3 for s in seqs),  # every prefix of s[:-2] with a target
            "valid_users": len(seqs), "test_users": len(seqs)}


# ----------------------------------------------------------------------------- RecBole


def recbole_shims() -> None:
    """RecBole 1.2.1 on numpy 2 and torch >= 2.6, patched at run time (RecBole's code is not copied)."""
    import torch

    # RecBole's own compatibility_settings() assigns np.float = np.float_ etc.: give it the numpy 1 names
    for name, value in (("float_", np.float64), ("complex_", np.complex128), ("unicode_", np.str_),
                        ("float", float), ("int", int), ("bool", bool), ("long", np.int64)):
        if name not in np.__dict__:
            setattr(np, name, value)
    load = torch.load

    def old_default_load(*args, **kwargs):  # RecBole saves and reloads its own pickled checkpoints
        kwargs.setdefault("weights_only", False)
        return load(*args, **kwargs)

    torch.load = old_default_load


def recbole_data(args):
    """RecBole's config, dataset and loaders for our Beauty split, and the counts RecBole reports."""
    recbole_shims()
    import torch
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import init_seed

    data = beauty(args.data_dir, args.quick)
    work = Path(tempfile.mkdtemp(prefix="recbole-"))
    os.chdir(work)  # RecBole writes log_tensorboard/ and saved/ into the working folder
    (work / "beauty").mkdir()
    with open(work / "beauty" / "beauty.inter", "w") as f:  # timestamp = position: the sequence order
        f.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for u, seq in enumerate(data.sequences):
            f.writelines(f"{u}\t{i}\t{t}\n" for t, i in enumerate(seq))
    config = Config(model="SASRec", dataset="beauty", config_dict={
        "data_path": str(work), "checkpoint_dir": str(work / "saved"), "use_gpu": False, "seed": args.seed,
        "show_progress": False, "state": "WARNING", "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "hidden_size": SIZES["hidden"], "n_layers": SIZES["num_layers"], "MAX_ITEM_LIST_LENGTH": SIZES["max_len"],
        "loss_type": "CE", "train_neg_sample_args": None, "train_batch_size": BATCH,
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
        "metrics": ["Hit", "NDCG"], "topk": [10], "valid_metric": "NDCG@10", "stopping_step": args.patience,
        "epochs": args.epochs})
    init_seed(config["seed"], config["reproducibility"])
    torch.set_num_threads(args.threads)
    dataset = create_dataset(config)
    interactions = len(dataset.inter_feat)  # data_preparation replaces them by the augmented prefixes
    train_data, valid_data, test_data = data_preparation(config, dataset)
    seen = {"users": dataset.user_num - 1, "items": dataset.item_num - 1, "interactions": interactions,
            "recbole_train_samples": len(train_data.dataset), "valid_users": len(valid_data.dataset),
            "test_users": len(test_data.dataset)}
    return config, train_data, valid_data, test_data, seen


def recbole_split_worker(args) -> dict:
    """What RecBole sees of the split (counts only: a minute, no training)."""
    *_, seen = recbole_data(args)
    return {"library": "RecBole 1.2.1", "seen": seen}


def recbole_worker(args) -> dict:
    from recbole.utils import get_model, get_trainer, init_seed

    config, train_data, valid_data, test_data, seen = recbole_data(args)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    curve, best, best_state, bad, start = [], -1.0, None, 0, time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        loss = trainer._train_epoch(train_data, epoch)
        t1 = time.perf_counter()
        score, result = trainer._valid_epoch(valid_data)
        t2 = time.perf_counter()
        curve.append({"epoch": epoch, "train_s": t1 - t0, "eval_s": t2 - t1, "wall_s": t2 - start, "loss": loss,
                      "valid NDCG@10": result["ndcg@10"], "valid HR@10": result["hit@10"]})
        print(f"recbole seed {args.seed} epoch {epoch}: {curve[-1]}", flush=True)
        if score > best:
            best, bad = score, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
        if bad >= args.patience:
            stopped = "early stopping"
            break
        if time.perf_counter() - start + curve[-1]["train_s"] + curve[-1]["eval_s"] > args.budget_s:
            stopped = f"time budget: another epoch would end past {args.budget_s:.0f} s"
            break
    else:
        stopped = f"epoch cap ({args.epochs})"
    model.load_state_dict(best_state)
    t0 = time.perf_counter()
    test = trainer.evaluate(test_data, load_best_model=False)
    test_s = time.perf_counter() - t0
    return {"library": "RecBole 1.2.1", "seed": args.seed, "seen": seen, "curve": curve, "stopped": stopped,
            "best_epoch": max(curve, key=lambda r: r["valid NDCG@10"])["epoch"], "test_eval_s": test_s,
            "test": {"HR@10": float(test["hit@10"]), "NDCG@10": float(test["ndcg@10"])},
            "optimizer_steps_per_epoch": len(train_data), "peak_mb": peak_memory_mb(),
            "settings": {"heads": config["n_heads"], "dropout": config["hidden_dropout_prob"],
                         "lr": config["learning_rate"], "batch": BATCH, "eval_batch": config["eval_batch_size"]}}


# ----------------------------------------------------------------------------- moekit SASRec


def moekit_worker(args) -> dict:
    import torch

    from moekit.train import seqrec

    data = beauty(args.data_dir, args.quick)
    config = seqrec.SeqRecConfig(
        model=seqrec.SeqRecModelOptions(architecture="sasrec", **SIZES),
        train=seqrec.SeqRecTrainSettings(seed=args.seed, batch_size=BATCH, loss="ce", epochs=args.epochs,
                                         patience=args.patience, threads=args.threads, progress=False,
                                         loss_chunk=args.loss_chunk or None, eval_by_length=bool(args.loss_chunk)))
    calls = []
    evaluate = seqrec.evaluate

    def timed_evaluate(*a, **kw):  # fit() validates all users once per epoch, then valid + test at the end
        t0 = time.perf_counter()
        out = evaluate(*a, **kw)
        calls.append((t0, time.perf_counter(), out[0]))
        return out

    seqrec.evaluate = timed_evaluate
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    result = seqrec.fit(config, data=data, log=lambda message: None)
    split = result.extra["split"]
    train_windows = len(seqrec.training_windows(split.train, SIZES["max_len"])[0])
    curve = []
    for row, (t0, t1, valid) in zip(result.history, calls, strict=False):
        curve.append({"epoch": int(row["epoch"]), "train_s": float(row["train_s"]), "eval_s": t1 - t0,
                      "wall_s": t1 - start, "loss": float(row["loss"]), "valid NDCG@10": valid["NDCG@10"],
                      "valid HR@10": valid["HR@10"]})
    epochs_run = len(result.history)
    library = f"moekit (loss_chunk={args.loss_chunk}, eval_by_length)" if args.loss_chunk else "moekit (defaults)"
    return {"library": library, "seed": args.seed, "curve": curve,
            "stopped": "early stopping" if epochs_run < args.epochs else f"epoch cap ({args.epochs})",
            "best_epoch": result.best_epoch, "test_eval_s": calls[-1][1] - calls[-1][0],
            "test": {"HR@10": result.test["HR@10"], "NDCG@10": result.test["NDCG@10"]},
            "optimizer_steps_per_epoch": result.steps // max(epochs_run, 1), "train_windows": train_windows,
            "seen": {"users": len(split.users), "items": data.num_items,
                     "interactions": sum(len(s) for s in data.sequences if len(s) >= 3),
                     "train_targets": sum(len(s) - 1 for s in split.train),
                     "valid_users": len(split.valid_target), "test_users": len(split.test_target)},
            "peak_mb": peak_memory_mb(),
            "settings": {"heads": config.model.heads, "dropout": config.model.dropout, "lr": config.train.lr,
                         "batch": BATCH, "eval_batch": config.train.eval_batch_size}}


# ----------------------------------------------------------------------------- two-tower vs torch-rechub

TT_EPOCHS, TT_BATCH, TT_LR, TT_DIM, TT_TEMPERATURE = 5, 512, 2e-3, 64, 0.05


def movielens(args):
    from moekit.data.movielens import load_movielens
    from moekit.train.retrieval import prepare_retrieval_data

    ml = load_movielens(Path(args.data_dir) / "ml-100k", "ml-100k")
    data = prepare_retrieval_data(ml, "test", 50)
    if args.quick:  # the first 200 users' interactions only (evaluation still on every user)
        keep = data.train_user < 200
        data.train_user, data.train_item = data.train_user[keep], data.train_item[keep]
        data.train_history = data.train_history[keep]
    return ml, data


def hit_at(data, users_UD, items_ID) -> dict:
    """Hit@K over the full catalogue, training items excluded: the same code for both libraries."""
    import torch

    from moekit.train.metrics import chunked_top_k, recall_hit_at_k

    seen = data.seen[data.eval_user]
    topk = chunked_top_k(lambda a, b: users_UD @ items_ID[a:b].T, len(items_ID), 100,
                         lambda a, b: seen[:, a:b])
    with torch.no_grad():
        return recall_hit_at_k(topk.numpy(), data.eval_target.numpy(), (10, 50, 100))


# moekit towers sized to DSSM's arithmetic per row: 192 -> 64, residual FFN 64 -> 128 -> 64, 64 -> 64
# (~33k multiply-adds) against DSSM's 80 -> 256 -> 64 (~37k); the default towers do ~98k.
TT_SMALL = dict(hidden=64, ffn_hidden=128)


def moekit_two_tower_small_worker(args) -> dict:
    return moekit_two_tower_worker(args, TT_SMALL)


def moekit_two_tower_worker(args, sizes: dict | None = None) -> dict:
    import torch

    from moekit.train.retrieval import (
        RetrievalDataConfig,
        TwoTowerOptions,
        TwoTowerRunConfig,
        TwoTowerTrainSettings,
        fit,
    )

    torch.set_num_threads(args.threads)
    ml, data = movielens(args)
    epochs = 1 if args.quick else TT_EPOCHS
    config = TwoTowerRunConfig(
        model=TwoTowerOptions(tower="mlp", dim=TT_DIM, history_len=50, temperature=TT_TEMPERATURE, **(sizes or {})),
        data=RetrievalDataConfig(dataset="ml-100k"),
        train=TwoTowerTrainSettings(seed=args.seed, epochs=epochs, batch_size=TT_BATCH, lr=TT_LR,
                                    threads=args.threads, progress=False))
    result = fit(config, ml=ml, data=data, log=lambda message: None)
    library = "moekit two-tower (MLP towers)" if not sizes else \
        "moekit two-tower (MLP towers of DSSM's arithmetic: hidden 64, FFN 128)"
    return {"library": library, "seed": args.seed, "epochs": epochs,
            "train_rows": len(data.train_user), "eval_users": len(data.eval_user),
            "seconds_per_epoch": result.train_seconds / epochs,
            "test": {k: result.test[f"Hit@{k}"] for k in (10, 50, 100)},
            "peak_mb": peak_memory_mb()}


def rechub_two_tower_worker(args) -> dict:
    import torch
    from torch.utils.data import DataLoader
    from torch_rechub.basic.features import SequenceFeature, SparseFeature
    from torch_rechub.models.matching import DSSM
    from torch_rechub.trainers import MatchTrainer
    from torch_rechub.utils.data import TorchDataset

    class TemperedDSSM(DSSM):
        """DSSM whose user embedding is divided by its `temperature`: MatchTrainer's in-batch path scores
        user @ item.T and never applies the model's temperature (0.9.0), so L2-normalised towers would
        train on cosines in [-1, 1]. The ranking is unchanged by the scale."""

        def user_tower(self, x):
            u = super().user_tower(x)
            return None if u is None else u / self.temperature

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    ml, data = movielens(args)
    I, dim = data.num_items, 16
    genres = torch.from_numpy(ml.genres.astype(np.int64))  # (I, G) multi-hot -> padded genre ids (0 = none)
    genre_ids = torch.where(genres > 0, torch.arange(1, genres.shape[1] + 1), 0)
    from moekit.train.retrieval import year_buckets

    years = torch.from_numpy(year_buckets(ml.years, 20))

    def user_x(user, history):
        hist = torch.where(history == I, 0, history + 1)  # moekit pads with I; rechub masks padding_idx 0
        return {"user_id": user, "gender": torch.from_numpy(ml.gender)[user],
                "age": torch.from_numpy(ml.age_group)[user], "occupation": torch.from_numpy(ml.occupation)[user],
                "hist_movie_id": hist}

    def item_x(item):
        return {"movie_id": item + 1, "year": years[item], "genres": genre_ids[item]}

    user_features = [SparseFeature("user_id", ml.num_users, dim), SparseFeature("gender", 3, dim),
                     SparseFeature("age", 8, dim), SparseFeature("occupation", len(ml.occupations) + 1, dim),
                     SequenceFeature("hist_movie_id", I + 1, dim, pooling="mean", shared_with="movie_id",
                                     padding_idx=0)]
    item_features = [SparseFeature("movie_id", I + 1, dim), SparseFeature("year", 21, dim),
                     SequenceFeature("genres", genres.shape[1] + 1, dim, pooling="mean", padding_idx=0)]
    model = TemperedDSSM(user_features, item_features, temperature=TT_TEMPERATURE,
                         user_params={"dims": [256, TT_DIM], "activation": "prelu"},
                         item_params={"dims": [256, TT_DIM], "activation": "prelu"})
    x = {k: v.numpy() for k, v in {**user_x(data.train_user, data.train_history),
                                   **item_x(data.train_item)}.items()}
    loader = DataLoader(TorchDataset(x, np.ones(len(data.train_user), dtype=np.int64)), batch_size=TT_BATCH,
                        shuffle=True)
    trainer = MatchTrainer(model, mode=2, in_batch_neg=True, optimizer_params={"lr": TT_LR, "weight_decay": 1e-6},
                           device="cpu", model_path=tempfile.mkdtemp())
    epochs = 1 if args.quick else TT_EPOCHS
    times = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        trainer.train_one_epoch(loader, log_interval=10**9)
        times.append(time.perf_counter() - t0)
    model.eval()
    with torch.no_grad():
        model.mode = "user"
        users = model.user_tower(user_x(data.eval_user, data.eval_history))
        model.mode = "item"
        items = model.item_tower(item_x(torch.arange(I)))
    return {"library": "torch-rechub 0.9.0 DSSM (MatchTrainer, in-batch softmax)", "seed": args.seed,
            "epochs": epochs, "train_rows": len(data.train_user), "eval_users": len(data.eval_user),
            "seconds_per_epoch": float(np.mean(times)),
            "test": {int(k.split("@")[1]): v for k, v in hit_at(data, users, items).items() if k.startswith("Hit")},
            "peak_mb": peak_memory_mb()}


# ----------------------------------------------------------------------------- full ranking at scale

SCALE_USERS, SCALE_HISTORY = 1024, 20


def eval_scale_worker(args) -> dict:
    """One full-ranking evaluation of 1,024 synthetic users (histories of 20 items) by a SASRec of
    `--items` items: moekit's `evaluate` (item chunks) or the whole (users x items) score matrix."""
    import torch

    from moekit.data.sequences import pad_left
    from moekit.models.sequential import SASRec, SASRecConfig
    from moekit.train.metrics import mask_history, ranking_metrics, target_ranks
    from moekit.train.seqrec import evaluate

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(num_items=args.items, **SIZES, num_heads=4)).eval()
    rng = np.random.default_rng(0)
    histories = rng.integers(1, args.items + 1, (SCALE_USERS, SCALE_HISTORY)).tolist()
    targets = rng.integers(1, args.items + 1, SCALE_USERS)
    base_mb = peak_memory_mb()
    t0 = time.perf_counter()
    if args.path == "chunked":
        metrics, _ = evaluate(model, histories, targets, batch_size=SCALE_USERS)
    else:  # what evaluate() did before: the score matrix, history masked in it, ranks from it
        with torch.no_grad():
            scores = model.scores(torch.from_numpy(pad_left(histories, SIZES["max_len"]))).float()
            target = torch.from_numpy(targets)
            metrics = ranking_metrics(target_ranks(mask_history(scores, histories, target), target))
    return {"items": args.items, "path": args.path, "users": SCALE_USERS, "seconds": time.perf_counter() - t0,
            "peak_mb": peak_memory_mb(), "before_mb": base_mb, "NDCG@10": metrics["NDCG@10"]}


WORKERS = {"recbole-sasrec": recbole_worker, "recbole-split": recbole_split_worker, "moekit-sasrec": moekit_worker,
           "moekit-two-tower": moekit_two_tower_worker, "rechub-two-tower": rechub_two_tower_worker,
           "moekit-two-tower-small": moekit_two_tower_small_worker,
           "eval-scale": eval_scale_worker}


def run_worker(args) -> int:
    result = WORKERS[args.worker](args)
    result["threads"] = args.threads
    Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


# ----------------------------------------------------------------------------- orchestration


def jobs(args) -> list[tuple[str, list[str]]]:
    """(result name, worker flags) in the order they run: the cheap ones, then one seed of each SASRec."""
    seeds = [args.seeds[0]] if args.quick else args.seeds
    out = []
    for items in ((20_000,) if args.quick else (100_000, 1_000_000)):
        for path in ("chunked", "whole"):
            flags = ["--worker", "eval-scale", "--items", str(items), "--path", path]
            out.append((f"eval-scale-{path}-{items}", flags))
    tt_workers = {"moekit-two-tower": "moekit-two-tower", "rechub-two-tower": "rechub-two-tower",
                  "small-moekit-two-tower": "moekit-two-tower-small"}  # result name -> worker
    two_tower = [(f"{name}-{seed}", ["--worker", worker, "--seed", str(seed)]) for seed in seeds
                 for name, worker in tt_workers.items()]
    recbole = [(f"recbole-sasrec-{seed}", ["--worker", "recbole-sasrec", "--seed", str(seed),
                                           "--budget-s", str(args.recbole_budget_s)])
               for seed in seeds[:args.recbole_seeds]]
    moekit = [(f"moekit-sasrec-{seed}", ["--worker", "moekit-sasrec", "--seed", str(seed)]) for seed in seeds]
    plain = [(f"plain-moekit-sasrec-{seeds[0]}", ["--worker", "moekit-sasrec", "--seed", str(seeds[0]),
                                                  "--loss-chunk", "0"])]
    # one seed of each SASRec first: the comparison stands if the shared machine's time runs out
    return out + moekit[:1] + recbole + [("recbole-split", ["--worker", "recbole-split"])] + two_tower \
        + moekit[1:] + plain


def run_jobs(args, runs_dir: Path) -> None:
    common = ["--data-dir", args.data_dir, "--threads", str(args.threads), "--patience", str(args.patience),
              "--epochs", str(2 if args.quick else args.epochs)] + (["--quick"] if args.quick else [])
    for name, flags in jobs(args):
        target = runs_dir / f"{name}.json"
        if target.exists() and not args.rerun:
            print(f"{name}: kept {target}", flush=True)
            continue
        if name.startswith("recbole") or name.startswith("rechub"):
            if not _installed("recbole" if name.startswith("recbole") else "torch_rechub"):
                print(f"{name}: left out (not installed: see this script's docstring)", flush=True)
                continue
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, *common, *flags, "--json", str(target)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stdout[-2000:], proc.stderr[-4000:], sep="\n")
            raise SystemExit(f"{name} failed (exit {proc.returncode})")
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# ----------------------------------------------------------------------------- the report


def _mean_std(values) -> str:
    values = np.asarray(values, dtype=float)
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{values.mean():.4f} ± {values.std(ddof=1):.4f}"


def first_time_reaching(curve: list[dict], value: float) -> float | None:
    """Wall seconds at the end of the first epoch whose validation NDCG@10 reaches `value`."""
    return next((r["wall_s"] for r in curve if r["valid NDCG@10"] >= value), None)


def curve_plot(runs: dict[str, list[dict]], path: Path) -> None:
    from moekit.plots import pyplot, save_png

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, (name, rows) in enumerate(runs.items()):
        ax.plot([r["wall_s"] / 60 for r in rows], [r["valid NDCG@10"] for r in rows], marker="o", markersize=3,
                color=f"C{i}", label=name)
    ax.set_xlabel("wall-clock minutes since training started (training + validation of all users)")
    ax.set_ylabel("validation NDCG@10 (full ranking)")
    ax.set_title("SASRec on Amazon Beauty: validation NDCG@10 against time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_png(fig, path)


def report(args, runs_dir: Path, out_dir: Path) -> str:
    runs = {p.stem: json.loads(p.read_text()) for p in sorted(runs_dir.glob("*.json"))}
    by = lambda prefix: [runs[k] for k in sorted(runs) if k.startswith(prefix)]  # noqa: E731
    if "recbole-split" in runs:
        runs["recbole-split"]["library"] = "RecBole 1.2.1"
    moekit, recbole, plain = by("moekit-sasrec-"), by("recbole-sasrec-"), by("plain-moekit-sasrec-")
    tt_moekit, tt_rechub, tt_small = by("moekit-two-tower-"), by("rechub-two-tower-"), by("small-moekit-two-tower-")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    import torch

    lines = ["# moekit against its peers: SASRec vs RecBole, two-tower vs torch-rechub", "",
             f"Produced by `{args.command}` at commit `{args.runs_commit or commit}`"
             + (f" (this report written at `{commit}`)" if args.runs_commit else "")
             + f" on a shared 2-core CPU ({platform.machine()}, "
             f"torch {torch.__version__}), every run its own process with **{args.threads} torch thread(s)** (2 "
             "threads on this shared machine oversubscribe it: a two-tower epoch took 18 s with 2 and 0.8 s with 1), "
             "one run at a time. Raw per-run records: `docs/results/seqrec_peers/*.json`.", ""]
    if args.quick:
        lines += ["**QUICK SMOKE RUN** (300 users, 2 epochs): numbers say nothing about the libraries.", ""]

    lines += ["## Full-ranking evaluation that scales", "",
              f"One evaluation of {SCALE_USERS:,} synthetic users (histories of {SCALE_HISTORY} items, history masked) "
              "by a SASRec (hidden 64, 2 layers) of N items: `moekit.train.seqrec.evaluate` (item chunks of 8,192: "
              "`chunked_target_ranks`) against the whole (users x items) score matrix it built before.", "",
              "| items | path | seconds | peak memory (MB) | of which before evaluating |", "|---|---|---|---|---|"]
    for r in by("eval-scale-"):
        lines.append(f"| {r['items']:,} | {'item chunks' if r['path'] == 'chunked' else 'whole matrix'} | "
                     f"{r['seconds']:.2f} | {r['peak_mb']:,.0f} | {r['before_mb']:,.0f} |")
    lines.append("")

    if moekit or recbole:
        both = [x for x in (moekit, plain, recbole) if x]
        lines += ["## SASRec on Amazon Beauty: moekit vs RecBole 1.2.1", "",
                  "Same split, checked: what each library saw (RecBole's counts read back from its dataset and "
                  "dataloaders):", "",
                  "| | users | items | interactions | training samples | validation users | test users |",
                  "|---|---|---|---|---|---|---|"]
        for group in both:
            r = group[0]
            seen = runs["recbole-split"]["seen"] if r["library"].startswith("RecBole") and "recbole-split" in runs \
                else r["seen"]
            samples = (f"{seen['recbole_train_samples']:,} prefixes (one target each)" if "recbole_train_samples"
                       in seen and r["library"].startswith("RecBole") else
                       f"{r.get('train_windows', 0):,} windows holding {seen.get('train_targets', 0):,} targets")
            lines.append(f"| {r['library']} | {seen['users']:,} | {seen['items']:,} | {seen['interactions']:,} | "
                         f"{samples} | {seen['valid_users']:,} | {seen['test_users']:,} |")
        lines += ["", "Sizes: hidden 64, 2 layers, max length 50, full-softmax cross-entropy, batch 256, validation of "
                  "all users every epoch, early stopping on validation NDCG@10 with patience "
                  f"{args.patience}; otherwise each library's defaults (below). Evaluation: full ranking of all items, "
                  "the user's earlier items masked (RecBole masks every history item, moekit keeps a target that "
                  "was seen before as a candidate; on this 5-core Beauty copy the difference touches few users).", "",
                  "| library | seeds | heads / dropout / lr | optimizer steps per epoch | s per training epoch "
                  "(median) | s per full-ranking eval of all users (median) | peak memory (MB) | epochs (best) | "
                  "stopped by | test HR@10 | test NDCG@10 |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for group in both:
            r0 = group[0]
            st = r0["settings"]
            epochs = ", ".join(f"{len(r['curve'])} ({r['best_epoch']})" for r in group)
            stopped = "; ".join(sorted({r["stopped"] for r in group}))
            lines.append(
                f"| {r0['library']} | {', '.join(str(r['seed']) for r in group)} | {st['heads']} / {st['dropout']} / "
                f"{st['lr']} | {r0['optimizer_steps_per_epoch']} | "
                f"{np.median([c['train_s'] for r in group for c in r['curve']]):.1f} | "
                f"{np.median([c['eval_s'] for r in group for c in r['curve']]):.2f} | "
                f"{max(r['peak_mb'] for r in group):,.0f} | {epochs} | {stopped} | "
                f"{_mean_std([r['test']['HR@10'] for r in group])} | "
                f"{_mean_std([r['test']['NDCG@10'] for r in group])} |")
        lines.append("")
        curves = {f"{r['library']} seed {r['seed']}": r["curve"] for group in both for r in group}
        curve_plot(curves, out_dir / "seqrec_peers_curve.png")
        lines += ["![validation NDCG@10 against wall-clock time](seqrec_peers_curve.png)", ""]

    if moekit and recbole:
        m, rb = moekit[0], recbole[0]
        lines += [f"### Targets (moekit seed {m['seed']} against RecBole seed {rb['seed']}, one run each)", "",
                  "Time to RecBole's validation NDCG@10: for each point of RecBole's curve, the wall time at which "
                  "moekit's curve first reaches the same value.", "",
                  "| RecBole epoch | its validation NDCG@10 | RecBole wall s | moekit wall s | moekit faster |",
                  "|---|---|---|---|---|"]
        ratios = []
        for c in rb["curve"]:
            t = first_time_reaching(m["curve"], c["valid NDCG@10"])
            ratio = c["wall_s"] / t if t else None
            ratios.append(ratio)
            lines.append(f"| {c['epoch']} | {c['valid NDCG@10']:.4f} | {c['wall_s']:.0f} | "
                         f"{'never' if t is None else f'{t:.0f}'} | {'-' if ratio is None else f'{ratio:.1f}x'} |")
        eval_ratio = np.median([c["eval_s"] for c in rb["curve"]]) / np.median([c["eval_s"] for c in m["curve"]])
        mem = (m["peak_mb"], rb["peak_mb"])
        verdict = lambda ok: "**met**" if ok else "**missed**"  # noqa: E731
        reached = [x for x in ratios if x is not None]
        lines += ["",
                  f"- at least 3x faster wall-clock to the same validation NDCG@10: "
                  f"{verdict(bool(reached) and len(reached) == len(ratios) and min(reached) >= 3)} "
                  f"({', '.join('never' if x is None else f'{x:.1f}x' for x in ratios)} at RecBole's epochs)",
                  f"- at least 5x faster full-ranking evaluation of all users: {verdict(eval_ratio >= 5)} "
                  f"({eval_ratio:.1f}x: median {np.median([c['eval_s'] for c in m['curve']]):.2f} s vs "
                  f"{np.median([c['eval_s'] for c in rb['curve']]):.2f} s)",
                  f"- peak memory no higher than RecBole's: {verdict(mem[0] <= mem[1])} ({mem[0]:,.0f} MB vs "
                  f"{mem[1]:,.0f} MB)"]
        early = rb["stopped"] == "early stopping"
        for key in ("HR@10", "NDCG@10"):
            ok = m["test"][key] >= rb["test"][key]
            lines.append(f"- test {key} at or above RecBole's when both stop early: "
                         + (verdict(ok) if early else ("**met against its best epoch so far**" if ok else "**missed**"))
                         + f" ({m['test'][key]:.4f} vs {rb['test'][key]:.4f}"
                         + ("" if early else f"; RecBole did not stop early: {rb['stopped']}, "
                            f"tested at its best of {len(rb['curve'])} epochs") + ")")
        lines.append("")

    if tt_moekit or tt_rechub:
        lines += ["## Two-tower on MovieLens-100K: moekit vs torch-rechub 0.9.0", "",
                  f"Leave-last-out (each user's latest rating is the test item, ranked against all "
                  f"{1682:,} movies with the user's training movies excluded); {TT_EPOCHS} epochs each of batch "
                  f"{TT_BATCH}, Adam(W) lr {TT_LR}, in-batch softmax at temperature {TT_TEMPERATURE}, embedding "
                  f"dim {TT_DIM}. moekit: `moekit.train.retrieval.fit`, MLP towers, logQ correction. torch-rechub: "
                  "DSSM (user id, gender, age, occupation, mean-pooled last 50 movies; movie id, year bucket, "
                  "genres; towers 256 -> 64, embeddings 16 per feature) trained by `MatchTrainer(mode=2, "
                  "in_batch_neg=True)` (its in-batch list-wise loss); its in-batch path ignores the model's "
                  "temperature, so the adapter divides the user embedding by it (ranking unchanged). Both scored "
                  "by the same full-catalogue Hit@K code.", "",
                  "| library | seeds | train rows | s per epoch (mean) | Hit@10 | Hit@50 | Hit@100 | "
                  "peak memory (MB) |",
                  "|---|---|---|---|---|---|---|---|"]
        for group in (tt_moekit, tt_small, tt_rechub):
            if not group:
                continue
            r0 = group[0]
            lines.append(f"| {r0['library']} | {', '.join(str(r['seed']) for r in group)} | {r0['train_rows']:,} | "
                         f"{np.mean([r['seconds_per_epoch'] for r in group]):.2f} | "
                         + " | ".join(_mean_std([r["test"][str(k)] for r in group]) for k in (10, 50, 100))
                         + f" | {max(r['peak_mb'] for r in group):,.0f} |")
        if tt_moekit and tt_rechub:
            hits = [np.mean([r["test"]["50"] for r in g]) for g in (tt_moekit, tt_rechub)]
            speed = np.mean([r["seconds_per_epoch"] for r in tt_rechub]) / np.mean(
                [r["seconds_per_epoch"] for r in tt_moekit])
            lines += ["", f"- higher Hit@50 than torch-rechub: {'**met**' if hits[0] > hits[1] else '**missed**'}"
                      f" ({hits[0]:.4f} vs {hits[1]:.4f})",
                      f"- at least 3x faster per epoch: {'**met**' if speed >= 3 else '**missed**'} ({speed:.1f}x)",
                      "", "Per step the two models do different amounts of arithmetic: moekit's towers take 64-dim "
                      "embeddings through Linear(192 -> 128), a residual FFN 128 -> 256 -> 128 and Linear(128 -> 64); "
                      "this DSSM takes 16-dim embeddings (80 per tower) through 80 -> 256 -> 64. Half of a moekit "
                      "step is `aten::mm` of those layers (torch.profiler, batch 512, 1 thread), so per-epoch time "
                      "compares the models as much as the libraries' training loops."]
        if tt_small and tt_rechub:
            small_speed = np.mean([r["seconds_per_epoch"] for r in tt_rechub]) / np.mean(
                [r["seconds_per_epoch"] for r in tt_small])
            small_hits = np.mean([r["test"]["50"] for r in tt_small])
            lines += ["", "The same loops on about the same arithmetic: moekit's towers sized down to DSSM's "
                      "multiply-adds per row (192 -> 64, residual FFN 64 -> 128 -> 64, 64 -> 64: ~33k against DSSM's "
                      f"~37k) train {small_speed:.1f}x faster per epoch than DSSM, with Hit@50 {small_hits:.4f}."]
        lines.append("")
    lines += ["## How the peers were installed and run", "",
              "- Neither competitor goes into moekit's environment (torch 2.13 CPU, numpy 2): "
              "`pip install --no-deps --target /tmp/peers-bench recbole==1.2.1 torch-rechub==0.9.0 colorlog==4.7.2 "
              "thop texttable tabulate psutil plotly`, then `PYTHONPATH=.:/tmp/peers-bench`. RecBole 1.2.1 pins "
              "colorlog 4.7.2 / colorama 0.4.4 and ray <= 2.6.3 (only for its hyper-parameter search, not needed); "
              "torch-rechub 0.9.0 needs nothing beyond moekit's `train` extra.",
              "- RecBole shims, in its process only (`recbole_shims`): numpy 2 removed `np.float_`, `np.complex_`, "
              "`np.unicode_` (RecBole's `Config.compatibility_settings` reads them) and `np.float` / `np.long` (its "
              "metrics and layers use them): they are set back as aliases; torch >= 2.6 defaults `torch.load` to "
              "`weights_only=True`, which cannot load RecBole's pickled checkpoints: the old default is restored. "
              "RecBole's code is not changed or copied. Its pandas 3 warnings (chained assignment in `_fill_nan`) "
              "are harmless here: Beauty has no missing values.",
              "- RecBole's data: `beauty.inter` written from the same sequences moekit reads (`user_id`, `item_id`, "
              "`timestamp` = position in the sequence), `eval_args` leave-one-out (`LS: valid_and_test`, ordered by "
              "time, full ranking); the counts it reports are in the split table. RecBole's epoch loop is "
              "driven here (`_train_epoch`, `_valid_epoch`, `evaluate`) to time training and evaluation apart and "
              "to stop on a wall-clock budget; the best validation state is restored before testing.",
              "- A RecBole SASRec epoch costs minutes on this CPU (it runs every prefix as a full length-50 "
              "sequence with unfused attention), so RecBole runs one seed under a wall-clock budget "
              f"({args.recbole_budget_s / 60:.0f} min, no epoch started that would end past it): it does not reach "
              "early stopping, and its test numbers are those of its best validation epoch within the budget.",
              "- torch-rechub: the two-tower epoch time is `MatchTrainer.train_one_epoch` over its `TorchDataset` "
              "DataLoader; moekit's is `retrieval.fit`'s training loop (evaluation excluded for both).", ""]
    text = "\n".join(lines) + "\n"
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 300 users, 2 epochs, one seed, written to a temporary folder")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--patience", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--budget-s", type=float, default=float("inf"), help="stop a run after this much wall time")
    parser.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    parser.add_argument("--items", type=int, default=1_000_000, help=argparse.SUPPRESS)
    parser.add_argument("--loss-chunk", type=int, default=LOSS_CHUNK, help=argparse.SUPPRESS)
    parser.add_argument("--path", choices=["chunked", "whole"], default="chunked", help=argparse.SUPPRESS)
    parser.add_argument("--recbole-seeds", type=int, default=1, help="RecBole runs take hours: how many seeds")
    parser.add_argument("--recbole-budget-s", type=float, default=2400.0,
                        help="RecBole stops before an epoch that would end past this wall time")
    parser.add_argument("--runs-dir", default=None, help="per-run JSON (default docs/results/seqrec_peers/)")
    parser.add_argument("--out-dir", default=str(RESULTS))
    parser.add_argument("--rerun", action="store_true", help="run again the runs whose JSON exists")
    parser.add_argument("--report-only", action="store_true", help="write the report from the runs' JSON")
    parser.add_argument("--runs-commit", default=None, help="with --report-only: the commit the runs were made at")
    args = parser.parse_args(argv)
    if args.worker:
        return run_worker(args)
    args.command = "python benchmarks/seqrec_peers.py" + (" --quick" if args.quick else "")
    out_dir = Path(args.out_dir) if not args.quick else Path(tempfile.mkdtemp(prefix="seqrec-peers-quick-"))
    runs_dir = Path(args.runs_dir) if args.runs_dir else out_dir / "seqrec_peers"
    runs_dir.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        run_jobs(args, runs_dir)
    from moekit.io import atomic_write_text

    text = report(args, runs_dir, out_dir)
    atomic_write_text(out_dir / "seqrec_peers.md", text)
    print(text)
    print(f"wrote {out_dir / 'seqrec_peers.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
