"""Peak memory of `moekit predict mtl` as the file to score grows: streaming keeps it flat.

    python benchmarks/predict_memory.py [--rows 100000 400000 1600000] [--chunk-rows 50000] [--quick]

Trains a small MMoE on a generated table once, then scores generated files of growing length, each
in a fresh `moekit predict mtl` process, and reads that process's peak resident memory (ru_maxrss of
the child). Writes docs/results/predict_memory.md. A loader that read the whole file would grow
with it; the streamed one holds one chunk at a time.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moekit.io import atomic_write_text  # noqa: E402


def table(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"row_id": np.arange(n), "country": rng.choice(["fr", "de", "us", "jp", "br"], n),
                          "device": rng.choice(["ios", "android", "web"], n), "age": rng.normal(40, 10, n).round(2),
                          "income": rng.lognormal(10, 1, n).round(0)})
    frame["click"] = (frame.country.isin(["fr", "de"]) ^ (rng.random(n) < 0.1)).astype(int)
    frame["purchase"] = ((frame.age > 40) ^ (rng.random(n) < 0.1)).astype(int)
    return frame


def moekit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moekit", "--no-malloc-tuning", *args], check=True,
                          capture_output=True, text=True, cwd=ROOT)


def peak_of_child(args: list[str]) -> tuple[float, float]:
    """(peak RSS in MB, seconds) of one `moekit` process (run through a tiny wrapper that reports it)."""
    code = ("import resource, runpy, sys; sys.argv = ['moekit', *sys.argv[1:]]\n"
            "try:\n    runpy.run_module('moekit', run_name='__main__')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, "--no-malloc-tuning", *args], check=True, capture_output=True,
                         text=True, cwd=ROOT).stdout
    seconds = time.perf_counter() - start
    return float(out.split("PEAK")[-1]), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 400_000, 1_600_000])
    parser.add_argument("--chunk-rows", type=int, default=50_000)
    parser.add_argument("--quick", action="store_true", help="small files (smoke run)")
    parser.add_argument("--out", default=str(ROOT / "docs/results/predict_memory.md"))
    args = parser.parse_args()
    rows = [2_000, 8_000] if args.quick else args.rows
    chunk = 1_000 if args.quick else args.chunk_rows
    work = Path(tempfile.mkdtemp(prefix="moekit-predict-"))
    table(5_000, 0).to_csv(work / "train.csv", index=False)
    moekit("train", "mtl", "--data", str(work / "train.csv"), "--tasks", "click,purchase", "--id-column", "row_id",
           "--out", str(work / "run"), "--epochs", "2", "--no-progress")
    results = []
    for n in rows:
        path = work / f"score_{n}.csv"
        table(n, 1).drop(columns=["click", "purchase"]).to_csv(path, index=False)
        peak, seconds = peak_of_child(["predict", "mtl", "--ckpt", str(work / "run"), "--data", str(path),
                                       "--out", str(work / f"scores_{n}.csv"), "--chunk-rows", str(chunk),
                                       "--no-progress"])
        size = path.stat().st_size / 2**20
        results.append((n, size, peak, seconds))
        print(f"{n:>10,} rows  {size:8.1f} MB file  peak RSS {peak:8.1f} MB  {seconds:6.1f} s", flush=True)
    base = results[0][2]
    lines = ["# Streaming `moekit predict mtl`: peak memory against file length", "",
             f"Command: `python benchmarks/predict_memory.py{' --quick' if args.quick else ''}` "
             f"(chunks of {chunk:,} rows). Each file is scored in a fresh process; the peak is that process's "
             f"maximum resident memory (`ru_maxrss`), torch and pandas included. Machine: "
             f"{resource.getpagesize()} B pages, 2-core CPU shared with other jobs.", "",
             "| rows | file (MB) | peak RSS (MB) | vs smallest | seconds |", "|---:|---:|---:|---:|---:|"]
    for n, size, peak, seconds in results:
        lines.append(f"| {n:,} | {size:.1f} | {peak:.0f} | {peak / base:.2f}x | {seconds:.1f} |")
    growth = results[-1][2] / base
    ratio = results[-1][0] / results[0][0]
    lines += ["", f"The file grows {ratio:.0f}x; peak memory grows {growth:.2f}x "
                  f"({'flat: one chunk at a time' if growth < 1.25 else 'NOT flat'})."]
    atomic_write_text(args.out, "\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
