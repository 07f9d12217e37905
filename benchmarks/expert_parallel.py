"""Expert parallelism on this machine: tokens/s and all-to-all bytes per step for P = 1 and 2.

    python benchmarks/expert_parallel.py [--tokens 4096 --layers 2 --steps 10]

A stack of residual MoE layers (fp32) runs forward + backward + gradient sync on a fixed global
batch of tokens (strong scaling), three ways:
  local   one process, the plain MoE layer (no torch.distributed),
  ep P=1  one process through the all-to-all dispatcher (its overhead without any traffic),
  ep P=2  two gloo processes on 127.0.0.1, each with half the tokens and half the experts.
Bytes are counted by the dispatcher (the payload handed to all_to_all_single in the forward; the
backward sends the same amount back) and set next to the volume model
tokens x k x d_model x bytes x 2 (dispatch + combine) per layer.
Writes a markdown table (and the same numbers as JSON beside it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from moekit import MoE, MoEConfig


class MoEStack(nn.Module):
    def __init__(self, cfg: MoEConfig, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([MoE(cfg) for _ in range(layers)])

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x_TD = x_TD + layer(x_TD).hidden_states
        return x_TD


def _config(args) -> MoEConfig:
    return MoEConfig(args.d_model, args.d_ff, num_experts=args.experts, top_k=args.top_k,
                     aux_loss_coef=0.01)


def _time_steps(model: nn.Module, x_TD: torch.Tensor, steps: int, after_backward, meters=()) -> list[float]:
    times = []
    for step in range(steps + 2):  # 2 warm-up steps
        if step == 2:
            for meter in meters:  # count the timed steps only
                meter.bytes_sent = meter.bytes_sent_remote = 0
                meter.comm_seconds = 0.0
        start = time.perf_counter()
        loss = model(x_TD).square().mean()
        loss.backward()
        after_backward()
        model.zero_grad(set_to_none=True)
        if step >= 2:
            times.append(time.perf_counter() - start)
    return times


def _worker(rank: int, world: int, args_dict: dict, folder: str) -> None:
    from moekit.distributed import init_expert_parallel, parallelize_experts, sync_gradients

    args = argparse.Namespace(**args_dict)
    groups = init_expert_parallel(world)
    torch.manual_seed(args.seed)
    model = parallelize_experts(MoEStack(_config(args), args.layers), groups)
    rows = slice(rank * args.tokens // world, (rank + 1) * args.tokens // world)
    x_TD = torch.randn(args.tokens, args.d_model)[rows]  # every rank draws the global batch, keeps its part
    dispatchers = [layer.dispatcher for layer in model.layers]
    times = _time_steps(model, x_TD, args.steps, lambda: sync_gradients(model, groups), dispatchers)
    per_step = {key: sum(getattr(d, key) for d in dispatchers) / args.steps
                for key in ("bytes_sent", "bytes_sent_remote", "comm_seconds")}
    Path(folder, f"rank{rank}.json").write_text(json.dumps({"times": times, **per_step}))


def _run_local(args) -> dict:
    torch.set_num_threads(args.threads_per_process)
    torch.manual_seed(args.seed)
    model = MoEStack(_config(args), args.layers)
    x_TD = torch.randn(args.tokens, args.d_model)
    times = _time_steps(model, x_TD, args.steps, lambda: None)
    return {"times": times, "bytes_sent": 0.0, "bytes_sent_remote": 0.0, "comm_seconds": 0.0}


def _run_ep(args, world: int) -> list[dict]:
    from moekit.distributed.launch import spawn

    with tempfile.TemporaryDirectory() as folder:
        spawn(_worker, world, vars(args), folder, threads=args.threads_per_process)
        return [json.loads(Path(folder, f"rank{r}.json").read_text()) for r in range(world)]


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="global tokens per step")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-ff", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up steps)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the three setups, interleaved")
    parser.add_argument("--threads-per-process", type=int, default=1,
                        help="torch intra-op threads of each process (see the note on a shared machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs/results/expert_parallel.md")
    args = parser.parse_args(argv)

    model_bytes = args.tokens * args.top_k * args.d_model * 4 * 2 * args.layers  # fp32, whole group
    setups = (("local (no EP)", 0), ("EP P=1", 1), ("EP P=2", 2))
    runs: dict[str, list[dict]] = {label: [] for label, _ in setups}
    for repeat in range(args.repeats):  # interleaved, so a busy spell on the machine hits all setups
        for label, world in setups:
            ranks = [_run_local(args)] if world == 0 else _run_ep(args, world)
            # A step ends when the slowest rank is done: the max over ranks of each step's time.
            step_s = statistics.median(max(r["times"][i] for r in ranks) for i in range(args.steps))
            runs[label].append({
                "step_s": step_s,
                "bytes_sent": sum(r["bytes_sent"] for r in ranks),
                "bytes_sent_remote": sum(r["bytes_sent_remote"] for r in ranks),
                "comm_s": statistics.mean(r["comm_seconds"] for r in ranks),
            })
            print(f"repeat {repeat + 1}/{args.repeats} {label}: {1000 * step_s:.1f} ms/step", flush=True)
    rows = []
    for label, world in setups:
        step_times = [r["step_s"] for r in runs[label]]
        step_s = statistics.median(step_times)
        rows.append({"setup": label, "processes": max(world, 1), "step_ms": 1000 * step_s,
                     "step_ms_min": 1000 * min(step_times), "step_ms_max": 1000 * max(step_times),
                     "tokens_per_s": args.tokens / step_s,
                     "comm_ms": 1000 * statistics.median(r["comm_s"] for r in runs[label]),
                     "a2a_bytes_fwd": runs[label][0]["bytes_sent"],
                     "a2a_bytes_fwd_remote": runs[label][0]["bytes_sent_remote"],
                     "model_bytes_fwd": model_bytes if world else 0})

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from moekit.io import atomic_write_json, atomic_write_text

    atomic_write_json(out.with_suffix(".json"), {"args": vars(args), "commit": _commit(), "rows": rows})
    atomic_write_text(out, _markdown(args, rows, model_bytes))
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


def _markdown(args, rows: list[dict], model_bytes: int) -> str:
    argv = " ".join(sys.argv[1:])
    local, ep1, ep2 = rows
    overhead = ep1["step_ms"] / local["step_ms"] - 1
    speedup = ep2["tokens_per_s"] / ep1["tokens_per_s"]
    comm_share = ep2["comm_ms"] / ep2["step_ms"]
    exact = all(r["a2a_bytes_fwd"] == r["model_bytes_fwd"] for r in (ep1, ep2))
    gap = ep2["a2a_bytes_fwd"] / ep2["model_bytes_fwd"] - 1
    lines = [
        "# Expert parallelism: throughput and communication volume",
        "",
        f"Command: `python benchmarks/expert_parallel.py {argv}`".rstrip() + "  ",
        f"Commit: `{_commit()}`, torch {torch.__version__}, gloo over 127.0.0.1.  ",
        f"Machine: {os.cpu_count()}-core CPU shared with other jobs (timings are noisy), no GPU.",
        "",
        f"Protocol: {args.layers} residual MoE layers (d_model={args.d_model}, d_ff={args.d_ff} SwiGLU, "
        f"E={args.experts}, k={args.top_k}, dropless, aux loss), fp32, a fixed global batch of "
        f"{args.tokens} tokens split evenly over the ranks; one step = forward + backward + "
        f"`sync_gradients`; median of {args.steps} steps after 2 warm-up steps, each step timed by its "
        f"slowest rank; {args.repeats} rounds of the three setups, interleaved: the table gives the "
        f"median round and the range over rounds. {args.threads_per_process} torch thread(s) per "
        f"process, so P=2 uses {2 * args.threads_per_process} cores and the one-process rows "
        f"{args.threads_per_process}. *a2a ms* is the time a rank spends inside all_to_all_single "
        "(forward and backward, waiting for its partner included).",
        "",
        "Bytes: the payload the dispatchers hand to `all_to_all_single` in the forward, summed over "
        "ranks and layers (the backward sends as much again); *remote* is the part that leaves its "
        "rank. Model: tokens x k x d_model x 4 bytes x 2 (dispatch + combine) x layers.",
        "",
        "| setup | processes | ms/step (range) | tokens/s | a2a ms/step | a2a bytes/step (fwd) "
        "| of which remote | model bytes/step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setup']} | {r['processes']} | {r['step_ms']:.0f} ({r['step_ms_min']:.0f}-"
            f"{r['step_ms_max']:.0f}) | {r['tokens_per_s']:,.0f} | {r['comm_ms']:.0f} | "
            f"{r['a2a_bytes_fwd'] / 1e6:.2f} MB | {r['a2a_bytes_fwd_remote'] / 1e6:.2f} MB | "
            f"{r['model_bytes_fwd'] / 1e6:.2f} MB |"
        )
    lines += [
        "",
        ("The measured payload equals the model exactly" if exact else
         f"The measured payload differs from the model by {gap:+.2%}") +
        ": dropless routing sends each of the tokens x k assignments once each way. With P ranks and "
        "balanced routing about (P-1)/P of it crosses ranks; the rest goes to the rank's own experts "
        "through the same call.",
        "",
        f"Reading: the EP path on one process costs {overhead:+.0%} step time against the plain layer "
        f"(the dispatcher's extra sort, gathers and collectives with nothing to send); two processes "
        f"run at {speedup:.2f}x the tokens/s of EP P=1, with {comm_share:.0%} of the P=2 step inside "
        "all_to_all. Each P=2 process has half the tokens and one core of its own, so most of any "
        "speed-up is the second core; expert parallelism exists for experts that do not fit one "
        "device, which this machine cannot show.",
        "",
        "Why one thread per process: the machine runs other jobs, and with 2 intra-op threads a "
        "single process stalled at ~5 s/step (vs ~0.15 s with 1 thread) for 512 tokens in a trial "
        "run, because OpenMP threads wait for preempted partners.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
