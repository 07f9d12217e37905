"""`moekit train mtl`: multi-task recommenders (Shared-Bottom, OMoE, MMoE, PLE) on Census-Income."""

from __future__ import annotations

import argparse

HELP = "train a multi-task model (shared_bottom, omoe, mmoe, ple) on Census-Income"
TUNE_MALLOC = True


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from moekit.train.mtl import MTLTrainConfig

    d = MTLTrainConfig()
    m = d.model  # the model flags below fill MTLTrainConfig.model (a MultiTaskOptions) in `run`
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default=d.dataset, choices=["census-income"])
    data.add_argument("--data-dir", default=None,
                      help="folder holding census-income.test[.gz] (default $MOEKIT_DATA/census-income)")
    data.add_argument("--group", type=int, default=d.group, choices=[1, 2],
                      help="1: income + never married; 2: education + never married (MMoE paper)")
    data.add_argument("--max-rows", type=int, default=None, help="read only the first rows (quick runs)")
    data.add_argument("--split-seed", type=int, default=d.split_seed)
    model = parser.add_argument_group("model")
    model.add_argument("--model", default=m.architecture, choices=["shared_bottom", "omoe", "mmoe", "ple"])
    model.add_argument("--embed-dim", type=int, default=m.embed_dim)
    model.add_argument("--num-experts", type=int, default=m.num_experts)
    model.add_argument("--expert-hidden", type=int, default=m.expert_hidden)
    model.add_argument("--expert-dim", type=int, default=m.expert_dim)
    model.add_argument("--gate", default=m.gate, choices=["softmax", "attention"])
    model.add_argument("--residual-experts", action="store_true")
    model.add_argument("--input-batchnorm", action="store_true", help="BatchNorm on the input row")
    model.add_argument("--expert-batchnorm", action="store_true", help="BatchNorm inside the experts")
    model.add_argument("--input-dropout", type=float, default=m.input_dropout)
    model.add_argument("--expert-dropout", type=float, default=m.expert_dropout)
    model.add_argument("--specific-experts", dest="num_specific_experts", type=int,
                       default=m.num_specific_experts, help="PLE: experts per task at each level")
    model.add_argument("--shared-experts", dest="num_shared_experts", type=int, default=m.num_shared_experts)
    model.add_argument("--levels", dest="num_levels", type=int, default=m.num_levels, help="PLE: CGC levels")
    model.add_argument("--bottom-widths", type=_ints, default=m.bottom_widths,
                       help="Shared-Bottom widths, e.g. 128,64")
    model.add_argument("--tower-widths", type=_ints, default=m.tower_widths,
                       help="tower hidden widths, e.g. 64,32 for deeper towers")
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=d.epochs)
    train.add_argument("--batch-size", type=int, default=d.batch_size)
    train.add_argument("--lr", type=float, default=d.lr)
    train.add_argument("--weight-decay", type=float, default=d.weight_decay)
    train.add_argument("--patience", type=int, default=d.patience)
    train.add_argument("--loss-weighting", default=d.loss_weighting, choices=["fixed", "uncertainty"])
    train.add_argument("--task-weights", type=_floats, default=None, help="fixed weights, e.g. 1,0.5")
    train.add_argument("--seed", type=int, default=d.seed)
    train.add_argument("--seeds", type=int, default=d.seeds, help="repeat with seeds seed..seed+N-1")
    train.add_argument("--device", default=d.device)
    train.add_argument("--threads", type=int, default=None)
    train.add_argument("--out-dir", default=None,
                       help="write checkpoints, metrics.json, gates.png here (atomically)")
    train.add_argument("--no-progress", dest="progress", action="store_false")


def run(args: argparse.Namespace) -> int:
    from dataclasses import fields
    from pathlib import Path

    from moekit.models.multitask import MultiTaskOptions
    from moekit.train.mtl import MTLTrainConfig, gate_table, plot_gate_heatmap, train_mtl

    # `--model` names the architecture; the other model flags share their MultiTaskOptions field's name.
    # Fields without a flag (eval_batch_size, tower_dropout) keep their defaults.
    model = MultiTaskOptions(architecture=args.model, **{f.name: getattr(args, f.name)
                                                         for f in fields(MultiTaskOptions)
                                                         if f.name != "architecture" and hasattr(args, f.name)})
    cfg = MTLTrainConfig(model=model, **{f.name: getattr(args, f.name) for f in fields(MTLTrainConfig)
                                         if f.name != "model" and hasattr(args, f.name)})
    results = train_mtl(cfg)
    tasks = results["tasks"]
    print()
    print(f"model {cfg.model.architecture}, group {results['group']}, {len(results['runs'])} seed(s)")
    print(f"protocol: {results['protocol']}")
    print("test AUC: " + ", ".join(
        f"{t} {s['mean']:.4f} ± {s['std']:.4f}" for t, s in results["summary"].items()))
    if results["gates"]:
        print(f"\nmean gate weight per expert (test set, seed {cfg.seed}):")
        print(gate_table(results["gates"], results["expert_names"]))
        if cfg.out_dir:
            path = plot_gate_heatmap({cfg.model.architecture: (results["gates"], results["expert_names"])},
                                     Path(cfg.out_dir) / "gates.png",
                                     f"census-income group {results['group']}: {', '.join(tasks)}")
            print(f"gate heatmap: {path}")
    if cfg.out_dir:
        print(f"metrics and checkpoints: {cfg.out_dir}")
    return 0
