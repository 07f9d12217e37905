"""Training throughput (samples/s) of MMoE and PLE: moekit vs torch-rechub's trainer vs DeepCTR-Torch's fit.

Same data (Census-Income group 1 training split: 49,881 rows, 32 categorical + 7 numeric features),
same sizes (embedding 4, 8 experts of two layers 32 -> 16, towers with one hidden layer of 16; PLE: 2
levels of 2 task-specific + 2 shared experts: DeepCTR-Torch 0.3.0's PLE crashes with more shared than
specific experts, as it builds the shared experts with specific_expert_num), batch 1024, Adam, one
thread each, side by side in one process. Each library trains `--epochs` full epochs through its own
training entry point (the whole loop: batching, forward, backward, optimizer step), round robin across
libraries; the fastest epoch counts. Writes docs/results/mtl_throughput.md and .json.

    python benchmarks/mtl_throughput.py --data-dir ../shared/data/census-income
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moekit.io import atomic_write_json, atomic_write_text  # noqa: E402
from moekit.models.multitask import MultiTaskModel, MultiTaskOptions  # noqa: E402
from moekit.train.loop import build_optimizer, seed_everything  # noqa: E402
from moekit.train.mtl import (  # noqa: E402
    MTLConfig,
    MTLDataConfig,
    MTLTrainSettings,
    MultiTaskObjective,
    load_data,
    model_config,
    train_epoch,
)

SIZES = dict(embed_dim=4, num_experts=8, expert_hidden=32, expert_dim=16, tower_widths=(16,),
             num_specific_experts=2, num_shared_experts=2, num_levels=2)
BATCH = 1024


def as_dict(data, batch):
    x = {f.name: batch.cat_NC[:, j].numpy() for j, f in enumerate(data.spec.categorical)}
    x.update({f.name: batch.num_NF[:, j].numpy().astype(np.float32) for j, f in enumerate(data.spec.numeric)})
    return x, batch.labels_NT.numpy()


def timed(n: int, run_epoch) -> float:
    start = time.perf_counter()
    run_epoch()
    return n / (time.perf_counter() - start)


def moekit_trainer(model: str, data):
    """One training epoch of moekit's loop (`train_epoch`: device tensors, index batches, fused experts,
    the non-finite guard on every step)."""
    cfg = MTLConfig(model=MultiTaskOptions(architecture=model, **SIZES),
                    train=MTLTrainSettings(batch_size=BATCH, lr=1e-3))
    generator = seed_everything(0)
    objective = MultiTaskObjective(MultiTaskModel(model_config(cfg, data)), cfg.train)  # task losses summed
    optimizer = build_optimizer(objective, cfg.train, kind="adam")
    return lambda: timed(len(data.train), lambda: train_epoch(objective, optimizer, data.train, cfg.train,
                                                              generator))


def rechub_trainer(model: str, data):
    from torch_rechub.basic.features import DenseFeature, SparseFeature
    from torch_rechub.models.multi_task import MMOE, PLE
    from torch_rechub.trainers import MTLTrainer
    from torch_rechub.utils.data import DataGenerator

    torch.manual_seed(0)
    features = [SparseFeature(f.name, vocab_size=f.vocab_size, embed_dim=SIZES["embed_dim"])
                for f in data.spec.categorical] + [DenseFeature(f.name) for f in data.spec.numeric]
    expert = {"dims": [SIZES["expert_hidden"], SIZES["expert_dim"]]}
    towers = [{"dims": list(SIZES["tower_widths"])}] * 2
    types = ["classification"] * 2
    if model == "mmoe":
        net = MMOE(features, types, n_expert=SIZES["num_experts"], expert_params=expert,
                   tower_params_list=towers)
    else:
        net = PLE(features, types, n_level=SIZES["num_levels"],
                  n_expert_specific=SIZES["num_specific_experts"],
                  n_expert_shared=SIZES["num_shared_experts"], expert_params=expert, tower_params_list=towers)
    x, y = as_dict(data, data.train)
    loader = DataGenerator(x, y).generate_dataloader(x_val=x, y_val=y, x_test=x, y_test=y,
                                                     batch_size=BATCH)[0]
    trainer = MTLTrainer(net, task_types=types, optimizer_params={"lr": 1e-3, "weight_decay": 0.0},
                         n_epoch=1, device="cpu")  # train_one_epoch saves nothing
    return lambda: timed(len(data.train), lambda: trainer.train_one_epoch(loader))


def deepctr_trainer(model: str, data):
    from deepctr_torch.inputs import DenseFeat, SparseFeat
    from deepctr_torch.models import MMOE, PLE

    torch.manual_seed(0)
    columns = [SparseFeat(f.name, vocabulary_size=f.vocab_size, embedding_dim=SIZES["embed_dim"])
               for f in data.spec.categorical] + [DenseFeat(f.name, 1) for f in data.spec.numeric]
    common = dict(expert_dnn_hidden_units=(SIZES["expert_hidden"], SIZES["expert_dim"]),
                  gate_dnn_hidden_units=(), tower_dnn_hidden_units=SIZES["tower_widths"],
                  task_types=("binary", "binary"), task_names=("income", "marital"), device="cpu", seed=0)
    if model == "mmoe":
        net = MMOE(columns, num_experts=SIZES["num_experts"], **common)
    else:
        net = PLE(columns, shared_expert_num=SIZES["num_shared_experts"],
                  specific_expert_num=SIZES["num_specific_experts"], num_levels=SIZES["num_levels"], **common)
    net.compile("adam", loss=["binary_crossentropy", "binary_crossentropy"])
    x, y = as_dict(data, data.train)
    return lambda: timed(len(data.train), lambda: net.fit(x, y, batch_size=BATCH, epochs=1, verbose=0))


COMPETITORS = {  # library -> (its Python module, its runner)
    "torch-rechub 0.9.0 MTLTrainer": ("torch_rechub", rechub_trainer),
    "DeepCTR-Torch 0.3.0 fit": ("deepctr_torch", deepctr_trainer),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data/census-income")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--out-dir", default=str(ROOT / "docs" / "results"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    data = load_data(MTLDataConfig(data_dir=args.data_dir, group=1))
    results = {"protocol": data.protocol, "rows": len(data.train), "sizes": SIZES, "batch_size": BATCH,
               "runs": {}}
    runners = {"moekit": moekit_trainer}
    for lib, (module, runner) in COMPETITORS.items():
        if importlib.util.find_spec(module) is None:
            print(f"{module} is not installed (pip install 'moekit[bench]'): {lib} is left out")
        else:
            runners[lib] = runner
    epochs = {f"{lib} / {model}": runner(model, data) for model in ("mmoe", "ple")
              for lib, runner in runners.items()}
    # Round robin: epoch r of every library runs before epoch r + 1 of any, so load changes on the shared
    # machine hit all libraries alike rather than whichever happened to run during them.
    for round_ in range(args.epochs):
        for key, run_epoch in epochs.items():
            results["runs"].setdefault(key, []).append(run_epoch())
            print(f"round {round_}: {key:40s} {results['runs'][key][-1]:,.0f} samples/s", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    lines = [
        "# Multi-task training throughput: moekit vs torch-rechub vs DeepCTR-Torch", "",
        "Produced by `python benchmarks/mtl_throughput.py --data-dir ../shared/data/census-income` at "
        f"commit `{commit}` on a shared 2-core CPU ({platform.machine()}, torch {torch.__version__}), "
        "**1 thread per library** (the machine is shared with other jobs; 2 threads oversubscribe it).", "",
        "Protocol: Census-Income group 1 training rows of the test-file-only split "
        f"({len(data.train):,} rows, 32 categorical features embedded in 4 dims + 7 numeric), batch 1024, "
        "Adam; MMoE with 8 experts "
        "(two layers 32 -> 16), PLE with 2 levels of 2 specific + 2 shared experts (DeepCTR-Torch 0.3.0's "
        "PLE crashes with more shared than specific experts); towers 16 -> 1. Each "
        f"library runs {args.epochs} epochs, round robin (one epoch of each library in turn, so load changes "
        "on the shared machine hit all alike), through its own training entry point (moekit `train_epoch`, "
        "torch-rechub `MTLTrainer.train_one_epoch` with its DataLoader, DeepCTR-Torch `fit`); the fastest "
        "and the median epoch are reported. Architectures differ in details each library fixes (torch-rechub "
        "puts BatchNorm in every layer, DeepCTR-Torch adds L2 regularisation terms); sizes and FLOPs match.", "",
        "| model | library | samples/s (fastest epoch) | moekit speed-up | samples/s (median epoch) | "
        "moekit speed-up (median) |", "|---|---|---|---|---|---|",
    ]
    runs = results["runs"]
    fastest = {key: max(v) for key, v in runs.items()}
    median = {key: float(np.median(v)) for key, v in runs.items()}
    for model in ("mmoe", "ple"):
        ours = f"moekit / {model}"
        for lib in runners:
            key = f"{lib} / {model}"
            lines.append(f"| {model} | {lib} | {fastest[key]:,.0f} | {fastest[ours] / fastest[key]:.2f}x | "
                         f"{median[key]:,.0f} | {median[ours] / median[key]:.2f}x |")
    lines += ["", "Targets: at least 4x torch-rechub's trainer and 2x DeepCTR-Torch's fit (fastest epochs; "
              "medians in brackets)."]
    for model in ("mmoe", "ple"):
        verdicts = []
        for lib, short, target in (("torch-rechub 0.9.0 MTLTrainer", "torch-rechub", 4),
                                   ("DeepCTR-Torch 0.3.0 fit", "DeepCTR-Torch", 2)):
            if lib not in runners:
                verdicts.append(f"{short} (not measured: not installed)")
                continue
            best = fastest[f"moekit / {model}"] / fastest[f"{lib} / {model}"]
            mid = median[f"moekit / {model}"] / median[f"{lib} / {model}"]
            verdict = "met" if min(best, mid) >= target else ("met on fastest only" if best >= target else "MISSED")
            verdicts.append(f"{best:.2f}x ({mid:.2f}x) {short} ({verdict})")
        lines.append(f"- {model}: " + ", ".join(verdicts))
    out = Path(args.out_dir)
    atomic_write_json(out / "mtl_throughput.json", results)
    atomic_write_text(out / "mtl_throughput.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
