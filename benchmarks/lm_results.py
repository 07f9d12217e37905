"""MoE language model vs its dense twin on TinyShakespeare: writes docs/results/lm.md and its PNGs.

    python benchmarks/lm_results.py          # train both models (in parallel, one thread each), report
    python benchmarks/lm_results.py --reuse  # report from finished runs whose config matches
    python benchmarks/lm_results.py --quick --runs-dir /tmp/lm --out /tmp/lm/lm.md   # a 20-step smoke run

Both runs get the same data, seed, token budget and active parameters per token; they train at the
same time, one thread each, so on a shared machine both see the same background load. Each trains
with `moekit.train.lm.fit` on a config shipped with moekit (what `moekit train lm --config
shakespeare_dense` trains), in its own process, under moekit's glibc malloc setting.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from moekit.cli import MALLOC_TUNABLES  # noqa: E402
from moekit.config import apply_overrides, build_dataclass, read_yaml  # noqa: E402
from moekit.io import atomic_write_text  # noqa: E402
from moekit.train.lm import LMConfig  # noqa: E402

CONFIGS = {"dense": REPO / "moekit/configs/lm/shakespeare_dense.yaml",
           "moe": REPO / "moekit/configs/lm/shakespeare_moe.yaml"}
TEXT = "../shared/data/text/tinyshakespeare.txt"
# --quick: a few steps, a short final evaluation, the same models.
QUICK = ["train.max_steps=20", "train.eval_interval=10", "train.log_interval=5", "train.checkpoint_interval=20",
         "train.final_eval_tokens=16384"]


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def load_config(path: Path, text: str, overrides: list[str]) -> LMConfig:
    """A shipped config with the benchmark's text and `overrides` (section.key=value)."""
    data = read_yaml(path)
    data.setdefault("data", {})["path"] = text
    return build_dataclass(LMConfig, apply_overrides(data, overrides), str(path))


def run_is_finished(config: LMConfig, out: Path) -> bool:
    """Whether `out` holds a finished run of `config` (model and schedule equal; runtime keys may differ)."""
    from moekit.train.lm import config_from_run
    from moekit.train.run import read_run_config

    if not (out / "results.json").is_file() or not (out / "config.json").is_file():
        return False
    saved = config_from_run(read_run_config(out))
    runtime = set(config.train.RUNTIME_KEYS)
    same_train = all(getattr(saved.train, k) == getattr(config.train, k) for k in vars(config.train)
                     if k not in runtime)
    return saved.model == config.model and same_train \
        and json.loads((out / "results.json").read_text())["steps"] == config.total_steps


def train_one(config: LMConfig, out: Path, log_path: Path) -> None:
    """One run, in its own process (spawned): `fit` into `out`, its output into `log_path`."""
    from moekit.train.lm import fit

    with open(log_path, "w") as log:
        os.dup2(log.fileno(), sys.stdout.fileno())
        os.dup2(log.fileno(), sys.stderr.fileno())
        fit(config, out, mode="overwrite")


def train_all(configs: dict[str, LMConfig], outs: dict[str, Path], reuse: bool) -> None:
    """Train the runs not reused, side by side, one process each."""
    procs = {}
    spawn = multiprocessing.get_context("spawn")
    for name, config in configs.items():
        if reuse and run_is_finished(config, outs[name]):
            print(f"{name}: reusing finished run in {outs[name]}")
            continue
        outs[name].parent.mkdir(parents=True, exist_ok=True)
        log = outs[name].with_name(outs[name].name + ".log")
        print(f"{name}: training into {outs[name]} (log {log})")
        atomic_write_text(outs[name].with_name(outs[name].name + ".commit"), git_commit() + "\n")
        procs[name] = (spawn.Process(target=train_one, args=(config, outs[name], log)), log)
        procs[name][0].start()
    for name, (proc, log) in procs.items():
        proc.join()
        if proc.exitcode != 0:
            raise SystemExit(f"{name} run failed; see {log}")


def sample(out_dir: Path, prompt: str, tokens: int = 240) -> str:
    import torch

    from moekit.data.text import StreamDecoder
    from moekit.train.lm import load_run

    loaded = load_run(out_dir, "cpu")
    decoder = StreamDecoder(loaded.tokenizer)
    idx = torch.tensor([loaded.tokenizer.encode(prompt)])
    text = "".join(decoder.push(int(t[0])) for t in
                   loaded.model.generate(idx, tokens, 0.8, top_k=40, generator=torch.Generator().manual_seed(0)))
    return prompt + text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reuse", action="store_true", help="skip runs that already finished\n"
                        "with this config")
    parser.add_argument("--out", default="docs/results/lm.md")
    parser.add_argument("--runs-dir", default="runs/lm", help="where the run folders go (shakespeare_{dense,moe})")
    parser.add_argument("--text", default=TEXT, help="the training text")
    parser.add_argument("--quick", action="store_true", help="20 steps each and a short final evaluation: a smoke run")
    args = parser.parse_args(argv)
    if sys.platform == "linux" and "GLIBC_TUNABLES" not in os.environ:  # both runs inherit it; acts at start-up
        os.execve(sys.executable, [sys.executable, __file__, *(sys.argv[1:] if argv is None else argv)],
                  dict(os.environ, GLIBC_TUNABLES=MALLOC_TUNABLES))

    from moekit.commands.info import environment_summary
    from moekit.plots import expert_load_heatmap, loss_curves
    from moekit.train.run import read_metrics

    text = str((REPO / args.text).resolve())
    configs = {name: load_config(path, text, QUICK if args.quick else []) for name, path in CONFIGS.items()}
    outs = {name: REPO / args.runs_dir / path.stem for name, path in CONFIGS.items()}
    started = time.time()
    train_all(configs, outs, args.reuse)
    results = {n: json.loads((out / "results.json").read_text()) for n, out in outs.items()}
    metrics = {n: read_metrics(out / "metrics.csv") for n, out in outs.items()}
    out = REPO / args.out
    png_loss = out.with_name("lm_loss.png")
    png_load = out.with_name("lm_expert_load.png")
    loss_curves({f"{n} ({results[n]['parameters']['total'] / 1e6:.2f}M params)": metrics[n] for n in configs},
                png_loss)
    load_rows = read_metrics(outs["moe"] / "expert_load.csv")
    expert_load_heatmap(load_rows, png_load)
    last_step = max(int(r["step"]) for r in load_rows)
    imbalance = {int(r["layer"]): float(r["max_over_mean"]) for r in load_rows if int(r["step"]) == last_step}

    dense, moe = results["dense"], results["moe"]
    train = configs["dense"].train
    # The runs start together but need not end together; the one still running alone then gets
    # the whole machine. Compare throughput over the time both were running.
    overlap = min(float(rows[-1]["elapsed_s"]) for rows in metrics.values())
    rate_overlap = {n: float([r for r in rows if float(r["elapsed_s"]) <= overlap][-1]["tokens_per_s"])
                    for n, rows in metrics.items()}
    speed_ratio = rate_overlap["moe"] / rate_overlap["dense"]
    loss_gap = dense["test"]["val_loss"] - moe["test"]["val_loss"]
    env = environment_summary()
    commit_files = {n: out.with_name(out.name + ".commit") for n, out in outs.items()}
    run_commits = {n: f.read_text().strip() if f.is_file() else "unknown" for n, f in commit_files.items()}
    mcfg = configs["moe"].model
    lines = [
        "# MoE language model vs its dense twin (TinyShakespeare, byte level)",
        "",
        f"Produced by `python benchmarks/lm_results.py{' '.join(['', *(sys.argv[1:] if argv is None else argv)])}` "
        "at commit "
        f"`{git_commit()}` on {env['platform']} ({env['cpu_count']} CPU cores, shared with other jobs; "
        f"torch {env['torch']}). Report written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "## Protocol",
        "",
        f"- Data: `{args.text}`, byte-level tokens (vocab 256); first 90% train "
        f"({configs['dense'].data.val_fraction:.0%} held out at the end for validation).",
        f"- Both models: {mcfg.n_layer} layers, d_model {mcfg.d_model}, {mcfg.n_head} heads, context "
        f"{mcfg.block_size}, RoPE, RMSNorm, SwiGLU, tied embeddings; AdamW (lr {train.lr}, "
        f"warm-up {train.warmup_steps} steps, cosine to {train.min_lr_ratio:.0%}), "
        f"clip {train.grad_clip}, batch {train.batch_size} x {mcfg.block_size} tokens, "
        f"seed {train.seed}, float32.",
        f"- Dense: FFN width {configs['dense'].model.d_ff}. MoE: every FFN is "
        f"{mcfg.moe.num_experts} experts of "
        f"width {mcfg.moe.d_ff}, top-{mcfg.moe.top_k} ({mcfg.moe.router}), so each token uses "
        f"{mcfg.moe.top_k} x {mcfg.moe.d_ff} = {mcfg.moe.top_k * mcfg.moe.d_ff} hidden units, "
        "the dense width; "
        f"Switch load-balancing loss x {mcfg.moe.aux_loss_coef}, dropless.",
        f"- Same training tokens ({dense['tokens']:,}), same seed, same data order. The two runs trained at "
        "the same time, one thread each, so they shared the machine's background load equally; absolute "
        "tokens/s depend on that load, the ratio much less.",
        "- Training runs: `moekit.train.lm.fit` on `moekit/configs/lm/shakespeare_{dense,moe}.yaml` (what `moekit "
        "train lm --config shakespeare_{dense,moe}` trains), one process each, started together (training code at "
        "commit "
        + ", ".join(f"{n}: `{c}`" for n, c in run_commits.items()) + ").",
        "- Validation loss: mean cross-entropy over "
        + ("the whole validation split" if not train.final_eval_tokens else
           f"the first {train.final_eval_tokens:,} validation tokens")
        + " (consecutive windows of the context length), after the last step. The curves' validation points use "
        f"the first {train.eval_tokens:,} validation tokens only (a cheaper periodic check), so they differ from "
        "the final full-split numbers.",
        "",
        "## Results",
        "",
        "| model | total params | active params / token | val loss (nats) | val bits/byte | val perplexity "
        "| train tokens/s (whole run) | tokens/s while both ran | speed vs dense | peak RSS (MB) "
        "| train time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['parameters']['total']:,} | {r['parameters']['active']:,} | "
            f"{r['test']['val_loss']:.4f} | "
            f"{r['test']['val_bits_per_byte']:.4f} | {math.exp(r['test']['val_loss']):.3f} | "
            f"{r['train_tokens_per_s']:,.0f} | {rate_overlap[name]:,.0f} | "
            f"{rate_overlap[name] / rate_overlap['dense']:.2f}x | {r['peak_memory_mb']:,.0f} | "
            f"{r['train_seconds']:,.0f} |")
    verdict_loss = "met" if loss_gap > 0 else "MISSED"
    verdict_speed = "met" if speed_ratio >= 0.7 else "MISSED"
    lines += [
        "",
        f"- Target 1, MoE reaches a lower validation loss than the dense twin: **{verdict_loss}** "
        f"(dense {dense['test']['val_loss']:.4f} - MoE {moe['test']['val_loss']:.4f} = {loss_gap:+.4f} "
        "nats/token).",
        f"- Target 2, MoE trains at >= 0.7x the dense twin's tokens/s: **{verdict_speed}** "
        f"({speed_ratio:.2f}x, measured over the first {overlap:,.0f} s, while both runs were training; "
        f"over each whole run it is {moe['train_tokens_per_s'] / dense['train_tokens_per_s']:.2f}x, "
        "flattered by the MoE run finishing alone).",
        "- Active parameters differ only by the routers (one d_model x E matrix per MoE layer).",
        "- Peak RSS is the whole Python process (about 300 MB of it is the interpreter and libraries).",
        "- Expert load at the last logged step, max/mean share per layer (1.0 = perfect balance): "
        + ", ".join(f"layer {k}: {v:.2f}" for k, v in sorted(imbalance.items())) + ".",
        "- One seed only (time budget); run-to-run spread was not measured, so small gaps should be read "
        "with care.",
        "",
        f"![loss curves]({png_loss.name})",
        "",
        f"![expert load]({png_load.name})",
        "",
        "## Samples (temperature 0.8, top-k 40, seed 0)",
        "",
    ]
    for name, run in outs.items():
        lines += [f"**{name}**", "", "```", sample(run, "ROMEO:\n"), "```", ""]
    lines += [
        "## Not covered",
        "",
        "- WikiText-2 with a BPE tokenizer: WikiText-2 is not present in `../shared/data/text/` on this "
        "machine (see `../shared/data/README.md`), so that half of the protocol was not run. "
        "`data.tokenizer: bpe` works on any text (`moekit train lm --config ... data.tokenizer=bpe "
        "model.vocab_size=4096`).",
        "",
        f"(benchmark wall time {time.time() - started:,.0f} s; run folders "
        + ", ".join(f"`{run.relative_to(REPO) if run.is_relative_to(REPO) else run}`" for run in outs.values())
        + ")",
    ]
    atomic_write_text(out, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
