"""MoE language model vs its dense twin on TinyShakespeare: writes docs/results/lm.md and its PNGs.

    python benchmarks/lm_results.py          # train both models (in parallel, one thread each), report
    python benchmarks/lm_results.py --reuse  # report from finished runs whose config matches

Both runs get the same data, seed, token budget and active parameters per token; they train at the
same time, one thread each, so on a shared machine both see the same background load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from moekit.cli import MALLOC_TUNABLES  # noqa: E402
from moekit.io import atomic_write_text  # noqa: E402
from moekit.train.lm import load_lm_config  # noqa: E402

CONFIGS = {"dense": "configs/lm/shakespeare_dense.yaml", "moe": "configs/lm/shakespeare_moe.yaml"}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_is_finished(config) -> bool:
    out = REPO / config.out_dir
    if not (out / "results.json").is_file() or not (out / "config.json").is_file():
        return False
    saved = json.loads((out / "config.json").read_text())
    return saved["model"] == config.to_dict()["model"] and saved["data"] == config.to_dict()["data"] \
        and json.loads((out / "results.json").read_text())["steps"] == config.total_steps


def train_all(configs: dict, reuse: bool) -> None:
    env = dict(os.environ, GLIBC_TUNABLES=MALLOC_TUNABLES, MOEKIT_NO_REEXEC="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    procs = {}
    for name, path in CONFIGS.items():
        if reuse and run_is_finished(configs[name]):
            print(f"{name}: reusing finished run in {configs[name].out_dir}")
            continue
        log = open(REPO / f"{configs[name].out_dir}.log", "w")  # noqa: SIM115 (closed when the run ends)
        cmd = [sys.executable, "-m", "moekit", "train", "lm", "--config", path, "progress=false"]
        print(f"{name}: {' '.join(cmd[1:])}")
        atomic_write_text(REPO / f"{configs[name].out_dir}.commit", git_commit() + "\n")
        procs[name] = (subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log)
    for name, (proc, log) in procs.items():
        if proc.wait() != 0:
            raise SystemExit(f"{name} run failed; see {log.name}")
        log.close()


def read_csv(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def sample(out_dir: Path, prompt: str, tokens: int = 240) -> str:
    import torch

    from moekit.data.text import StreamDecoder
    from moekit.train.lm import load_trained_lm

    model, _, tokenizer, _ = load_trained_lm(str(out_dir), "cpu")
    decoder = StreamDecoder(tokenizer)
    idx = torch.tensor([tokenizer.encode(prompt)])
    text = "".join(decoder.push(int(t[0])) for t in
                   model.generate(idx, tokens, 0.8, top_k=40, generator=torch.Generator().manual_seed(0)))
    return prompt + text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reuse", action="store_true", help="skip runs that already finished\n"
                        "with this config")
    parser.add_argument("--out", default="docs/results/lm.md")
    args = parser.parse_args(argv)

    from moekit.commands.info import environment_summary
    from moekit.train.lm_plots import plot_expert_load, plot_loss_curves

    configs = {name: load_lm_config(REPO / path) for name, path in CONFIGS.items()}
    started = time.time()
    train_all(configs, args.reuse)
    results = {n: json.loads((REPO / c.out_dir / "results.json").read_text()) for n, c in configs.items()}
    metrics = {n: read_csv(REPO / c.out_dir / "metrics.csv") for n, c in configs.items()}
    out = REPO / args.out
    png_loss = out.with_name("lm_loss.png")
    png_load = out.with_name("lm_expert_load.png")
    plot_loss_curves({f"{n} ({results[n]['parameters']['total'] / 1e6:.2f}M params)": metrics[n]
                      for n in configs}, png_loss)
    plot_expert_load(read_csv(REPO / configs["moe"].out_dir / "expert_load.csv"), png_load)
    load_rows = read_csv(REPO / configs["moe"].out_dir / "expert_load.csv")
    last_step = max(int(r["step"]) for r in load_rows)
    imbalance = {int(r["layer"]): float(r["max_over_mean"]) for r in load_rows if int(r["step"]) == last_step}

    dense, moe = results["dense"], results["moe"]
    # The runs start together but need not end together; the one still running alone then gets
    # the whole machine. Compare throughput over the time both were running.
    overlap = min(float(rows[-1]["elapsed_s"]) for rows in metrics.values())
    rate_overlap = {n: float([r for r in rows if float(r["elapsed_s"]) <= overlap][-1]["tokens_per_s"])
                    for n, rows in metrics.items()}
    speed_ratio = rate_overlap["moe"] / rate_overlap["dense"]
    loss_gap = dense["val_loss"] - moe["val_loss"]
    env = environment_summary()
    run_commits = {n: (REPO / f"{c.out_dir}.commit").read_text().strip()
                   if (REPO / f"{c.out_dir}.commit").is_file() else "unknown" for n, c in configs.items()}
    mcfg = configs["moe"].model
    lines = [
        "# MoE language model vs its dense twin (TinyShakespeare, byte level)",
        "",
        f"Produced by `python benchmarks/lm_results.py{' --reuse' if args.reuse else ''}` at commit "
        f"`{git_commit()}` on {env['platform']} ({env['cpu_count']} CPU cores, shared with other jobs; "
        f"torch {env['torch']}). Report written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "## Protocol",
        "",
        f"- Data: `../shared/data/text/tinyshakespeare.txt`, byte-level tokens (vocab 256); first 90% train "
        f"({configs['dense'].data.val_fraction:.0%} held out at the end for validation).",
        f"- Both models: {mcfg.n_layer} layers, d_model {mcfg.d_model}, {mcfg.n_head} heads, context "
        f"{mcfg.block_size}, RoPE, RMSNorm, SwiGLU, tied embeddings; AdamW (lr {configs['dense'].lr}, "
        f"warm-up {configs['dense'].warmup_steps} steps, cosine to {configs['dense'].min_lr_ratio:.0%}), "
        f"clip {configs['dense'].grad_clip}, batch {configs['dense'].batch_size} x {mcfg.block_size} tokens, "
        f"seed {configs['dense'].seed}, float32.",
        f"- Dense: FFN width {configs['dense'].model.d_ff}. MoE: every FFN is "
        f"{mcfg.moe.num_experts} experts of "
        f"width {mcfg.moe.d_ff}, top-{mcfg.moe.top_k} ({mcfg.moe.router}), so each token uses "
        f"{mcfg.moe.top_k} x {mcfg.moe.d_ff} = {mcfg.moe.top_k * mcfg.moe.d_ff} hidden units, "
        "the dense width; "
        f"Switch load-balancing loss x {mcfg.moe.aux_loss_coef}, dropless.",
        f"- Same training tokens ({dense['tokens']:,}), same seed, same data order. The two runs trained at "
        "the same time, one thread each, so they shared the machine's background load equally; absolute "
        "tokens/s depend on that load, the ratio much less.",
        "- Training runs: `moekit train lm --config configs/lm/shakespeare_{dense,moe}.yaml progress=false`, "
        "started together (training code at commit "
        + ", ".join(f"{n}: `{c}`" for n, c in run_commits.items()) + ").",
        "- Validation loss: mean cross-entropy over the whole validation split (consecutive windows of the "
        "context length), after the last step. The curves' validation points use the first 16,384 "
        "validation tokens only (a cheaper periodic check), so they differ from the final full-split numbers.",
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
            f"{r['val_loss']:.4f} | "
            f"{r['val_bits_per_byte']:.4f} | {math.exp(r['val_loss']):.3f} | "
            f"{r['train_tokens_per_s']:,.0f} | {rate_overlap[name]:,.0f} | "
            f"{rate_overlap[name] / rate_overlap['dense']:.2f}x | {r['peak_memory_mb']:,.0f} | "
            f"{r['train_seconds']:,.0f} |")
    verdict_loss = "met" if loss_gap > 0 else "MISSED"
    verdict_speed = "met" if speed_ratio >= 0.7 else "MISSED"
    lines += [
        "",
        f"- Target 1, MoE reaches a lower validation loss than the dense twin: **{verdict_loss}** "
        f"(dense {dense['val_loss']:.4f} - MoE {moe['val_loss']:.4f} = {loss_gap:+.4f} nats/token).",
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
    for name, c in configs.items():
        lines += [f"**{name}**", "", "```", sample(REPO / c.out_dir, "ROMEO:\n"), "```", ""]
    lines += [
        "## Not covered",
        "",
        "- WikiText-2 with a BPE tokenizer: WikiText-2 is not present in `../shared/data/text/` on this "
        "machine (see `../shared/data/README.md`), so that half of the protocol was not run. "
        "`data.tokenizer: bpe` works on any text (`moekit train lm --config ... data.tokenizer=bpe "
        "model.vocab_size=4096`).",
        "",
        f"(benchmark wall time {time.time() - started:,.0f} s; run folders "
        + ", ".join(f"`{c.out_dir}`" for c in configs.values()) + ")",
    ]
    atomic_write_text(out, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
