"""`moekit bench layer`: moekit's MoE layer (grouped, loop and dense backends) against the matmul floor.

Every implementation runs the same workload in one process, in turn within each repetition (so
machine noise hits all of them alike), and the table reports median times and ratios to the floor:
the same FLOPs as plain dense matmuls of the routed (and shared) tokens, with no routing at all.

Each layer shape (W1 Mixtral-like, W2 DeepSeek-like) runs at decode sizes (T = 1, 8, 64 tokens: one
sequence, a small and a large decoding batch) and at a training batch (4096 tokens). Calls that take
less than `MIN_SAMPLE_S` are repeated within one timed sample, so microsecond layers are not timed
at the clock's noise. The harness (`run_benchmark`, with `extra` implementations) is what
benchmarks/moe_layer.py uses to add Hugging Face transformers' MoE blocks.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

HELP = "time moekit's MoE layer backends against the dense-matmul floor"
TUNE_MALLOC = True  # see moekit.cli.MALLOC_TUNABLES: every implementation runs under the same setting


@dataclass(frozen=True)
class Workload:
    name: str
    d_model: int
    d_ff: int
    num_experts: int
    top_k: int
    num_shared: int
    tokens: int


SHAPES = {
    "W1": Workload("W1", 512, 1024, 8, 2, 0, 4096),
    "W2": Workload("W2", 512, 256, 64, 6, 2, 4096),
}
TOKENS = (1, 8, 64, 4096)  # decode: one sequence, a small and a large batch; then a training batch
QUICK_TOKENS = (1, 8, 64, 512)
BACKENDS = ("grouped", "loop", "dense")
DTYPES = ("float32", "bfloat16")
FLOOR = "floor (dense matmuls)"
# The dense backend runs every expert on every token (E/k times the routed FLOPs): made for tiny E
# and soft routing, it is timed only up to this many token-expert rows.
DENSE_LIMIT_ROWS = 16384
MIN_SAMPLE_S = 0.01  # a timed sample repeats a faster call until it lasts about this long ...
MAX_CALLS = 100  # ... but at most this many times

Impl = tuple[Callable, list]  # run(x) -> y, and the parameters whose gradients it makes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workloads", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--tokens", type=int, nargs="+", default=None,
                        help=f"token counts per workload (default: {' '.join(map(str, TOKENS))})")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    parser.add_argument("--dtypes", nargs="+", default=None, choices=list(DTYPES),
                        help=f"default: {' '.join(DTYPES)}")
    parser.add_argument("--reps", type=int, default=15, help="timed repetitions per implementation (median kept)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--quick", action="store_true",
                        help=f"a smoke run: by default tokens {' '.join(map(str, QUICK_TOKENS))}, float32 only; "
                             "1 warm-up and 3 timed repetitions")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")


# --- the implementations ---------------------------------------------------------------------


def moekit_layer(w: Workload, dtype, device, backend: str) -> Impl:
    from moekit import MoE, MoEConfig

    cfg = MoEConfig(d_model=w.d_model, d_ff=w.d_ff, num_experts=w.num_experts, top_k=w.top_k,
                    num_shared_experts=w.num_shared, backend=backend)
    moe = MoE(cfg).to(device=device, dtype=dtype)
    return lambda x: moe(x).hidden_states, list(moe.parameters())


def floor(w: Workload, dtype, device) -> Impl:
    """Dense SwiGLU matmuls over the routed rows (T*k) and the shared rows (T): the FLOPs alone."""
    import torch

    from moekit.layers.experts import activate

    def linear(n_in, n_out):
        return torch.nn.Linear(n_in, n_out, bias=False, device=device, dtype=dtype)

    routed_in, routed_out = linear(w.d_model, 2 * w.d_ff), linear(w.d_ff, w.d_model)
    shared = w.num_shared * w.d_ff
    shared_in, shared_out = (linear(w.d_model, 2 * shared), linear(shared, w.d_model)) if shared else (None, None)

    def swiglu(x, w_in, w_out):  # moekit's own fused SwiGLU: the floor is the best dense execution
        return w_out(activate(w_in(x), "swiglu", "silu"))

    def run(x):
        x_TD = x.reshape(-1, w.d_model)
        y = swiglu(x_TD.repeat(w.top_k, 1), routed_in, routed_out).view(w.top_k, -1, w.d_model).sum(0)
        if shared_in is not None:
            y = y + swiglu(x_TD, shared_in, shared_out)
        return y

    params = [p for m in (routed_in, routed_out, shared_in, shared_out) if m is not None for p in m.parameters()]
    return run, params


def implementations(w: Workload, dtype, device, backends, skipped: dict[str, str]) -> dict[str, Impl]:
    """The floor and moekit's layer with each backend; backends not run go into `skipped` with the reason."""
    impls = {FLOOR: floor(w, dtype, device)}
    for backend in backends:
        name = f"moekit {backend}"
        if backend == "dense" and w.tokens * w.num_experts > DENSE_LIMIT_ROWS:
            skipped[name] = (f"not run: computes all {w.num_experts} experts for every token "
                             f"({w.num_experts / w.top_k:.0f}x the routed FLOPs)")
            continue
        impls[name] = moekit_layer(w, dtype, device, backend)
    return impls


# --- timing ----------------------------------------------------------------------------------


def _seconds(fn: Callable[[], None], calls: int, device: str) -> float:
    """Wall-clock seconds per call of `calls` back-to-back calls."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls


def bench_workload(w: Workload, dtype_name: str, args: argparse.Namespace, progress,
                   extra: Callable[..., dict[str, Impl]] | None = None) -> list[dict]:
    """Rows of median times and ratios to the floor for one workload and dtype. `extra(w, dtype,
    device, skipped)` adds implementations (name -> (run, params)) beside moekit's."""
    import torch

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(args.seed)
    skipped: dict[str, str] = {}
    impls = implementations(w, dtype, args.device, args.backends, skipped)
    if extra is not None:
        impls.update(extra(w, dtype, args.device, skipped))
    x = torch.randn(1, w.tokens, w.d_model, device=args.device, dtype=dtype)
    upstream = torch.randn(1, w.tokens, w.d_model, device=args.device, dtype=dtype)

    def forward(run, params):
        with torch.no_grad():
            run(x)

    def forward_backward(run, params):
        xg = x.detach().requires_grad_(True)
        y = run(xg)
        torch.autograd.backward(y, upstream.view_as(y))
        for p in params:
            p.grad = None

    modes = {"fwd": forward, "fwd+bwd": forward_backward}
    calls = {(name, mode): 1 for name in impls for mode in modes}  # calls per sample, set by the first rep
    times = {name: {mode: [] for mode in modes} for name in impls}
    for rep in range(args.warmup + args.reps):
        for name, (run, params) in impls.items():  # interleaved: noise hits everyone alike
            for mode, fn in modes.items():
                seconds = _seconds(lambda fn=fn, run=run, params=params: fn(run, params), calls[name, mode],
                                   args.device)
                if rep == 0:
                    calls[name, mode] = max(1, min(MAX_CALLS, round(MIN_SAMPLE_S / max(seconds, 1e-9))))
                if rep >= args.warmup:
                    times[name][mode].append(1e3 * seconds)
        progress.update(1)

    base = {mode: statistics.median(v) for mode, v in times[FLOOR].items()}
    rows = []
    for name, t in times.items():
        fwd, fwdbwd = statistics.median(t["fwd"]), statistics.median(t["fwd+bwd"])
        rows.append({
            "workload": w.name, "tokens": w.tokens, "dtype": dtype_name, "implementation": name,
            "fwd_ms": fwd, "fwd_bwd_ms": fwdbwd,
            "fwd_vs_floor": fwd / base["fwd"], "fwd_bwd_vs_floor": fwdbwd / base["fwd+bwd"],
        })
    for name, reason in skipped.items():
        rows.append({"workload": w.name, "tokens": w.tokens, "dtype": dtype_name, "implementation": name,
                     "skipped": reason})
    return rows


def _ms(value: float) -> str:
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def format_table(rows: list[dict]) -> str:
    header = f"| {'workload':8} | {'tokens':>6} | {'dtype':8} | {'implementation':40} | {'fwd ms':>8} " \
             f"| {'fwd+bwd ms':>10} | {'fwd/floor':>9} | {'fwd+bwd/floor':>13} |"
    lines = [header, "|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|"]
    for r in rows:
        start = f"| {r['workload']:8} | {r['tokens']:6d} | {r['dtype']:8} | {r['implementation']:40} |"
        if "skipped" in r:
            lines.append(f"{start} {r['skipped']} |")
            continue
        lines.append(f"{start} {_ms(r['fwd_ms']):>8} | {_ms(r['fwd_bwd_ms']):>10} | {r['fwd_vs_floor']:8.2f}x "
                     f"| {r['fwd_bwd_vs_floor']:12.2f}x |")
    return "\n".join(lines)


def resolve_defaults(args: argparse.Namespace) -> None:
    """Fill in the token counts, dtypes and repetitions not given, as `--quick` says."""
    if args.quick:
        args.reps, args.warmup = 3, 1
    args.tokens = args.tokens or list(QUICK_TOKENS if args.quick else TOKENS)
    args.dtypes = args.dtypes or (["float32"] if args.quick else list(DTYPES))


def run_benchmark(args: argparse.Namespace, extra: Callable[..., dict[str, Impl]] | None = None) -> dict:
    """Time every workload and dtype, printing each block's table as it finishes and all rows at the
    end; returns {environment, commit, args, rows, workloads}."""
    from tqdm import tqdm

    from moekit.commands.info import environment_summary
    from moekit.train.loop import seed_everything

    seed_everything(args.seed)
    resolve_defaults(args)
    chosen = [dataclasses.replace(SHAPES[name], tokens=t) for name in args.workloads for t in args.tokens]
    env = environment_summary()
    print("  ".join(f"{k}={env[k]}" for k in ("moekit", "torch", "torch_threads", "devices", "glibc_tunables")))
    rows: list[dict] = []
    total = len(chosen) * len(args.dtypes) * (args.warmup + args.reps)
    with tqdm(total=total, desc="bench layer", unit="rep") as progress:
        for w in chosen:
            for dtype_name in args.dtypes:
                progress.set_postfix_str(f"{w.name} T={w.tokens} {dtype_name}")
                block = bench_workload(w, dtype_name, args, progress, extra)
                progress.write(format_table(block))  # as each block finishes: long runs show progress
                rows.extend(block)
    print("\nAll results:")
    print(format_table(rows))
    for name in args.workloads:
        w = SHAPES[name]
        print(f"{w.name}: d_model {w.d_model}, d_ff {w.d_ff}, E {w.num_experts}, top-{w.top_k}, "
              f"{w.num_shared} shared, swiglu; tokens {', '.join(str(c.tokens) for c in chosen if c.name == name)}")
    options = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    return {"environment": env, "commit": git_commit(), "args": options, "rows": rows,
            "workloads": [dataclasses.asdict(w) for w in chosen]}


def run(args: argparse.Namespace) -> int:
    from moekit.io import atomic_write_json

    results = run_benchmark(args)
    if args.json:
        atomic_write_json(args.json, results)
        print(f"wrote {args.json}")
    return 0


def git_commit() -> str:
    import subprocess
    from pathlib import Path

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
