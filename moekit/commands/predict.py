"""`moekit predict mtl`: score a table with a trained multi-task ranker, chunk by chunk."""

from __future__ import annotations

import argparse

HELP = "score the rows of a table (CSV, TSV, Parquet) with a trained multi-task model: one column per task"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, metavar="RUN", help="a `moekit train mtl` run folder")
    parser.add_argument("--data", required=True, metavar="FILE", help="the rows to score (the training columns)")
    parser.add_argument("--out", required=True, metavar="FILE", help="the CSV of scores to write")
    parser.add_argument("--id-column", default=None,
                        help="a column to copy beside the scores (default: the run's data.id_column)")
    parser.add_argument("--chunk-rows", type=int, default=100_000, help="rows per chunk (memory stays flat)")
    parser.add_argument("--delimiter", default=None, help="delimiter of a CSV/TSV file (default: sniffed)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--seed", type=int, default=0, help="unused: scoring is deterministic")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from moekit.data.table import check_file
    from moekit.train.families import expect_family
    from moekit.train.mtl import load_run, predict_file

    if args.chunk_rows < 1:
        raise ValueError(f"--chunk-rows must be >= 1 (got {args.chunk_rows})")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ValueError(f"--out {out} exists; pass --overwrite to replace it")
    check_file(args.data)
    expect_family(args.ckpt, "mtl", "moekit predict mtl")
    loaded = load_run(Path(args.ckpt), args.device)
    if loaded.feature_spec is None:
        raise ValueError(f"{args.ckpt} has no feature_spec.json: it cannot encode new rows")
    id_column = args.id_column or (loaded.config.data.id_column if loaded.config is not None else None)
    rows = predict_file(loaded.model, loaded.feature_spec, args.data, out, id_column, args.chunk_rows, args.delimiter,
                        progress=not args.no_progress)
    kinds = loaded.model.task_types.items()
    tasks = ", ".join(f"{t} ({'probability' if k == 'binary' else 'value'})" for t, k in kinds)
    print(f"{rows:,} rows scored: {tasks} -> {out}")
    return 0
