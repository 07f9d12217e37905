"""The same MoE language model in Hugging Face transformers and in moekit: docs/results/hf_speed.md.

    python benchmarks/hf_speed.py --json docs/results/hf_speed.json --markdown docs/results/hf_speed.md
    python benchmarks/hf_speed.py --quick      # a smoke run: small sizes, 2 repetitions
    python benchmarks/hf_speed.py --tie-check --json docs/results/hf_speed.json --markdown docs/results/hf_speed.md
        # adds why float32 logits differ where they do (router near-ties), untimed

For a Mixtral-like and a Qwen3-MoE-like configuration, transformers builds a random model from its
own config class and saves it (`save_pretrained`); transformers loads that folder back and moekit
imports it (`moekit.hf.from_hf`), so both run the same weights. In one process, float32 and
bfloat16, each cell times moekit, transformers with each experts implementation (its default,
`grouped_mm` in 5.x, and `eager` and `batched_mm`) and the matmul floor, in turn within every
repetition:

- prefill: a 4 x 512 prompt into an empty KV cache, logits of the last position (what generation needs);
- decode: greedy generation of 32 tokens after a 16-token prompt at batch 1 and 8, in tokens/s; the
  tokens must be identical in float32 (checked before timing), their agreement is reported in bf16;
- train: one training step, forward + next-token cross-entropy + backward, on 4 x 512 tokens.

The floor is the model's matmuls as plain dense matmuls of the same FLOPs, nothing else: the
attention projections, the causal attention products (half the square), the router, k expert-sized
FFN matmuls over the tokens (a dense model with the active parameters) and the output head, with
their gradients for the train step. The second part times the MoE layer's execution paths
('sparse', 'grouped', and 'auto' choosing between them) from 1 to 16384 tokens: the crossover that
`MoEConfig.backend` documents. The script restarts itself once under moekit's glibc malloc setting
(`moekit.cli.MALLOC_TUNABLES`), so every competitor runs under the same allocator.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from moekit.cli import MALLOC_TUNABLES  # noqa: E402
from moekit.io import atomic_write_json, atomic_write_text  # noqa: E402

COMMON = dict(vocab_size=32000, hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
              max_position_embeddings=4096, tie_word_embeddings=False)
FAMILIES = {  # name -> (transformers config class, its arguments)
    "mixtral": ("MixtralConfig", dict(COMMON, intermediate_size=1792, num_local_experts=8, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(COMMON, head_dim=64, moe_intermediate_size=256, intermediate_size=1792,
                                         num_experts=64, num_experts_per_tok=8, norm_topk_prob=True)),
}
HF_EXPERTS = ("grouped_mm", "eager", "batched_mm")
# batched_mm gathers one weight matrix per (token, expert) pair: made for decoding, it needs
# T*k*3*d_ff*d_model elements per layer (45 GB for the Mixtral-like prefill in float32).
BATCHED_MM_LIMIT_BYTES = 2 * 2**30
FLOOR = "floor (dense matmuls)"
MOEKIT = "moekit"
TARGET_SPEEDUP, TARGET_BF16_DECODE, TARGET_FLOOR = 1.0, 1.3, 1.15


@dataclass(frozen=True)
class Sizes:
    prefill: tuple[int, int]  # batch, prompt tokens
    decode_batches: tuple[int, ...]
    decode_prompt: int
    decode_tokens: int
    train: tuple[int, int]  # batch, tokens
    layer_tokens: tuple[int, ...]
    layer_train_tokens: tuple[int, ...]


FULL = Sizes((4, 512), (1, 8), 16, 32, (4, 512), (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096, 16384),
             (1, 8, 64, 256, 1024, 4096))
QUICK = Sizes((2, 64), (1, 8), 8, 8, (2, 64), (1, 8, 64, 512), (1, 64))


# --- timing ----------------------------------------------------------------------------------


@dataclass
class Competitor:
    run: Callable[[], object]
    setup: Callable[[], None] = lambda: None  # untimed, before every call (switch experts implementation, zero grads)


def time_round_robin(competitors: dict[str, Competitor], reps: int, warmup: int, min_sample_s: float) -> dict:
    """Median seconds per call of each competitor; all run in turn within each repetition (the
    starting one rotates), so machine noise hits all alike. A call shorter than `min_sample_s` is
    repeated within its sample and timed per call."""
    names = list(competitors)
    calls = {}
    for name in names:  # warm-up, and how many calls make one sample
        c = competitors[name]
        for _ in range(max(warmup, 1)):
            c.setup()
            start = time.perf_counter()
            c.run()
            elapsed = time.perf_counter() - start
        calls[name] = max(1, min(100, int(min_sample_s / max(elapsed, 1e-6))))
    samples: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            c, total = competitors[name], 0.0
            for _ in range(calls[name]):
                c.setup()
                start = time.perf_counter()
                c.run()
                total += time.perf_counter() - start
            samples[name].append(total / calls[name])
    return {name: {"median_s": statistics.median(s), "samples_s": s, "calls_per_sample": calls[name]}
            for name, s in samples.items()}


# --- the models ------------------------------------------------------------------------------


def build_models(family: str, dtype: torch.dtype, folder: Path, seed: int):
    """A random transformers model of `family` saved to `folder` in float32, then loaded back by
    transformers and imported by moekit in `dtype`: (hf_model, moekit_model, default experts impl)."""
    import transformers

    import moekit.hf

    if not (folder / "config.json").exists():
        class_name, kwargs = FAMILIES[family]
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, class_name)(**kwargs))
        model.save_pretrained(folder)
        del model
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    hf.generation_config.eos_token_id = None  # generate every requested token
    hf.generation_config.pad_token_id = 0
    ours = moekit.hf.from_hf(folder, dtype=dtype).eval()
    return hf, ours, hf.config._experts_implementation


def hf_competitor(hf, impl: str, run: Callable[[], object], train: bool = False) -> Competitor:
    def setup():
        if hf.config._experts_implementation != impl:
            hf.set_experts_implementation(impl)
        if train:
            hf.zero_grad(set_to_none=True)
    return Competitor(run, setup)


def batched_mm_bytes(hf_config, tokens: int, dtype: torch.dtype) -> int:
    c = hf_config
    d_ff = getattr(c, "moe_intermediate_size", None) or c.intermediate_size
    return tokens * c.num_experts_per_tok * 3 * d_ff * c.hidden_size * dtype.itemsize


def hf_impls(hf, tokens: int, dtype: torch.dtype, default: str, skipped: dict[str, str]) -> list[str]:
    impls = []
    for impl in HF_EXPERTS:
        name = hf_name(impl, default)
        if impl == "batched_mm" and batched_mm_bytes(hf.config, tokens, dtype) > BATCHED_MM_LIMIT_BYTES:
            gib = batched_mm_bytes(hf.config, tokens, dtype) / 2**30
            skipped[name] = f"not run: would gather {gib:.0f} GiB of per-token expert weights per layer"
            continue
        impls.append(impl)
    return impls


def hf_name(impl: str, default: str) -> str:
    return f"transformers {impl}" + (" (default)" if impl == default else "")


# --- the floor -------------------------------------------------------------------------------


def floor_shapes(hf_config, batch: int, q_tokens: int, kv_tokens: int, head_rows: int) -> list[tuple]:
    """(batch, M, K, N) of every matmul of one forward over `batch` x `q_tokens` new tokens seeing
    `kv_tokens` keys each on average, as a dense model with the active parameters does it."""
    c = hf_config
    D, H, G = c.hidden_size, c.num_attention_heads, c.num_key_value_heads
    Q = getattr(c, "head_dim", None) or D // H
    E = getattr(c, "num_local_experts", None) or c.num_experts
    K = c.num_experts_per_tok
    d_ff = getattr(c, "moe_intermediate_size", None) or c.intermediate_size
    T = batch * q_tokens
    layer = [(1, T, D, H * Q), (1, T, D, 2 * G * Q), (1, T, H * Q, D),  # q, kv, out projections
             (batch * H, q_tokens, Q, kv_tokens), (batch * H, q_tokens, kv_tokens, Q),  # scores, values
             (1, T, D, E)]  # router
    layer += [(1, T, D, 2 * d_ff), (1, T, d_ff, D)] * K  # k active experts (gate|up, down)
    return layer * c.num_hidden_layers + [(1, head_rows, D, c.vocab_size)]


class Floor:
    """The matmuls of `shapes`, on preallocated operands (with their gradients when `train`); floors
    built together share the operands of equal shapes (a decode floor's steps)."""

    def __init__(self, shapes, dtype: torch.dtype, train: bool = False, shared: dict | None = None) -> None:
        self.train = train
        self.operands = []
        shared = {} if shared is None else shared
        for b, m, k, n in shapes:
            if (b, m, k, n) not in shared:
                a = torch.randn(b, m, k, dtype=dtype).requires_grad_(train)
                w = torch.randn(b, k, n, dtype=dtype).requires_grad_(train)
                shared[b, m, k, n] = (a, w, torch.ones(b, m, n, dtype=dtype) if train else None)
            self.operands.append(shared[b, m, k, n])

    def __call__(self) -> None:
        with torch.set_grad_enabled(self.train):
            for a, w, grad in self.operands:
                out = torch.bmm(a, w) if a.shape[0] > 1 else a[0] @ w[0]
                if self.train:
                    a.grad = w.grad = None
                    out.backward(grad if a.shape[0] > 1 else grad[0])

    def flops(self) -> float:
        return sum(2 * a.shape[0] * a.shape[1] * a.shape[2] * w.shape[2] for a, w, _ in self.operands) * \
            (3 if self.train else 1)


# --- the cells -------------------------------------------------------------------------------


def prefill_cell(hf, ours, default: str, dtype, sizes: Sizes, skipped: dict) -> tuple[dict, dict]:
    B, T = sizes.prefill
    idx = torch.randint(0, hf.config.vocab_size, (B, T))

    @torch.no_grad()
    def run_ours():
        return ours(idx, cache=ours.new_cache(B, T), last_only=True)[0][:, -1]

    @torch.no_grad()
    def run_hf():
        return hf(idx, use_cache=True, logits_to_keep=1).logits[:, -1]

    check = {}
    competitors = {MOEKIT: Competitor(run_ours)}
    expected = run_ours().float()
    for impl in hf_impls(hf, B * T, dtype, default, skipped):
        competitors[hf_name(impl, default)] = hf_competitor(hf, impl, run_hf)
        competitors[hf_name(impl, default)].setup()
        check[hf_name(impl, default)] = float((run_hf().float() - expected).abs().max())
    floor = Floor(floor_shapes(hf.config, B, T, T // 2, B), dtype)
    competitors[FLOOR] = Competitor(floor)
    return competitors, {"max_abs_logit_difference": check, "floor_gflop": floor.flops() / 1e9}


def router_tie_check(family: str, sizes: Sizes, seed: int, folder: Path) -> dict:
    """Why float32 logits can differ by more than rounding on the prefill prompt: the same weights and
    prompt as the prefill cell, all positions compared. A token whose k-th and (k+1)-th router logits lie
    within float32 rounding of each other can go to different experts in the two libraries (their sums
    run in different orders); attention then carries the change to every later position of that
    sequence. Returns the first position whose logits differ by more than 1e-4, the smallest such
    router gap (over layers) at that position, and the smallest gap anywhere in the prompt."""
    hf, ours, _ = build_models(family, torch.float32, folder, seed)
    torch.manual_seed(seed)
    B, T = sizes.prefill
    idx = torch.randint(0, hf.config.vocab_size, (B, T))  # the prefill cell's prompt (same seed, same draw)
    with torch.no_grad():
        out = hf(idx, output_router_logits=True)
        diff_BT = (out.logits - ours(idx)[0]).abs().amax(-1)
    k = hf.config.num_experts_per_tok
    gaps_LBT = torch.stack([(lambda top: top[..., k - 1] - top[..., k])(r.view(B, T, -1).float().topk(k + 1, -1).values)
                            for r in out.router_logits])
    result = {"max_abs_logit_difference_all_positions": float(diff_BT.max()),
              "positions_over_1e-4": int((diff_BT > 1e-4).sum()), "positions": B * T,
              "smallest_router_gap": float(gaps_LBT.min())}
    over = [(b, t) for b in range(B) for t in range(T) if diff_BT[b, t] > 1e-4]
    if over:
        first = min(over, key=lambda bt: bt[1])  # the earliest differing position of any sequence
        result.update(first_position=list(first), gap_at_first=float(gaps_LBT[:, first[0], first[1]].min()),
                      largest_difference_before_first=float(diff_BT[first[0], : first[1]].max()) if first[1] else 0.0)
    return result


def decode_cell(hf, ours, default: str, dtype, sizes: Sizes, batch: int, skipped: dict) -> tuple[dict, dict]:
    P, N = sizes.decode_prompt, sizes.decode_tokens
    idx = torch.randint(0, hf.config.vocab_size, (batch, P))

    @torch.no_grad()
    def run_ours():
        return torch.stack(list(ours.generate(idx, N, temperature=0)), dim=1)

    @torch.no_grad()
    def run_hf():
        return hf.generate(idx, max_new_tokens=N, do_sample=False)[:, P:]

    ours_tokens = run_ours()
    competitors = {MOEKIT: Competitor(run_ours)}
    agreement = {}
    for impl in hf_impls(hf, batch, dtype, default, skipped):
        name = hf_name(impl, default)
        competitors[name] = hf_competitor(hf, impl, run_hf)
        competitors[name].setup()
        theirs = run_hf()
        same = (theirs == ours_tokens)
        first_diff = (~same).float().argmax(dim=1)
        agreement[name] = {
            "identical_tokens": float(same.float().mean()),
            "first_difference": [int(f) if not s.all() else None for f, s in zip(first_diff, same, strict=True)],
        }
        if dtype == torch.float32 and not bool(same.all()):
            raise AssertionError(f"float32 greedy tokens differ between moekit and {name}: {agreement[name]}")
    # The floor decodes as the models do: each step one token per sequence against the growing cache.
    shared: dict = {}
    steps = [Floor(floor_shapes(hf.config, batch, 1, P + s + 1, batch), dtype, shared=shared) for s in range(N)]
    prefill = Floor(floor_shapes(hf.config, batch, P, P // 2, batch), dtype, shared=shared)
    competitors[FLOOR] = Competitor(lambda: [f() for f in [prefill, *steps]])
    return competitors, {"agreement": agreement, "new_tokens": batch * N,
                         "floor_gflop": sum(f.flops() for f in [prefill, *steps]) / 1e9}


def train_cell(hf, ours, default: str, dtype, sizes: Sizes, skipped: dict) -> tuple[dict, dict]:
    B, T = sizes.train
    idx = torch.randint(0, hf.config.vocab_size, (B, T))
    targets = torch.cat((idx[:, 1:], torch.full((B, 1), -1)), dim=1)  # what transformers' labels=idx means

    def run_ours():
        _, out = ours(idx, targets)
        out.lm_loss.backward()
        return out.lm_loss

    def run_hf():
        loss = hf(input_ids=idx, labels=idx, use_cache=False).loss
        loss.backward()
        return loss

    ours.train()
    hf.train()
    ours.zero_grad(set_to_none=True)
    loss_ours = float(run_ours())
    competitors = {MOEKIT: Competitor(run_ours, lambda: ours.zero_grad(set_to_none=True))}
    losses = {MOEKIT: loss_ours}
    for impl in hf_impls(hf, B * T, dtype, default, skipped):
        name = hf_name(impl, default)
        competitors[name] = hf_competitor(hf, impl, run_hf, train=True)
        competitors[name].setup()
        losses[name] = float(run_hf())
    floor = Floor(floor_shapes(hf.config, B, T, T // 2, B * T), dtype, train=True)
    competitors[FLOOR] = Competitor(floor)
    return competitors, {"loss": losses, "floor_gflop": floor.flops() / 1e9}


def bench_models(args, sizes: Sizes, folder: Path, parameters: dict[str, int]) -> list[dict]:
    rows = []
    for family in args.families:
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            hf, ours, default = build_models(family, dtype, folder / family, args.seed)
            parameters[family] = sum(p.numel() for p in ours.parameters())
            cells = [("prefill", f"{sizes.prefill[0]}x{sizes.prefill[1]}", prefill_cell, ())]
            cells += [(f"decode b{b}", f"{b}x({sizes.decode_prompt}+{sizes.decode_tokens})", decode_cell, (b,))
                      for b in sizes.decode_batches]
            cells.append(("train step", f"{sizes.train[0]}x{sizes.train[1]}", train_cell, ()))
            for cell, shape, make, extra in cells:
                torch.manual_seed(args.seed)
                ours.eval()
                hf.eval()
                skipped: dict[str, str] = {}
                competitors, info = make(hf, ours, default, dtype, sizes, *extra, skipped)
                timings = time_round_robin(competitors, args.reps, args.warmup, args.min_sample_s)
                row = {"family": family, "dtype": dtype_name, "cell": cell, "shape": shape, "timings": timings,
                       "skipped": skipped, "default_experts_implementation": default, **info}
                rows.append(row)
                print(format_row(row), flush=True)
                ours.eval()
                hf.eval()
            del hf, ours
    return rows


# --- the layer's execution paths -------------------------------------------------------------

LAYERS = {  # the two models' MoE layers
    "mixtral": dict(d_model=512, d_ff=1792, num_experts=8, top_k=2, router="topk_softmax"),
    "qwen3_moe": dict(d_model=512, d_ff=256, num_experts=64, top_k=8, router="softmax_topk"),
}
PATHS = ("sparse", "grouped", "auto")


def bench_layer_paths(args, sizes: Sizes) -> list[dict]:
    from moekit import MoE, MoEConfig

    rows = []
    for family in args.families:
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            torch.manual_seed(args.seed)
            layers = {p: MoE(MoEConfig(**LAYERS[family], backend=p)).to(dtype) for p in PATHS}
            for p in PATHS[1:]:
                layers[p].load_state_dict(layers[PATHS[0]].state_dict())
            for mode, token_counts in (("forward", sizes.layer_tokens), ("fwd+bwd", sizes.layer_train_tokens)):
                for T in token_counts:
                    x = torch.randn(T, 512, dtype=dtype, requires_grad=mode == "fwd+bwd")
                    competitors = {}
                    for p, layer in layers.items():
                        if mode == "forward":
                            competitors[p] = Competitor(torch.no_grad()(lambda layer=layer, x=x: layer(x)))
                        else:
                            def step(layer=layer, x=x):
                                layer(x).hidden_states.sum().backward()
                            competitors[p] = Competitor(step, lambda layer=layer: layer.zero_grad(set_to_none=True))
                    timings = time_round_robin(competitors, args.layer_reps, args.warmup, args.min_sample_s)
                    ms = {p: timings[p]["median_s"] * 1e3 for p in PATHS}
                    row = {"family": family, "dtype": dtype_name, "mode": mode, "tokens": T, "ms": ms,
                           "auto_path": layers["auto"].path(T * LAYERS[family]["top_k"], x)}
                    rows.append(row)
                    print(f"layer {family} {dtype_name} {mode} T={T}: " +
                          "  ".join(f"{p} {v:.3f} ms" for p, v in ms.items()) + f"  (auto: {row['auto_path']})",
                          flush=True)
    return rows


# --- the report ------------------------------------------------------------------------------


def speed(row: dict, name: str) -> float:
    """Calls per second (decode: tokens per second)."""
    per_call = row["timings"][name]["median_s"]
    return row.get("new_tokens", 1) / per_call


def summarize(row: dict) -> dict:
    t = row["timings"]
    rivals = {n: v["median_s"] for n, v in t.items() if n.startswith("transformers")}
    best = min(rivals, key=rivals.get)
    return {"fastest_transformers": best, "speedup": rivals[best] / t[MOEKIT]["median_s"],
            "vs_floor": t[MOEKIT]["median_s"] / t[FLOOR]["median_s"],
            "transformers_vs_floor": rivals[best] / t[FLOOR]["median_s"]}


def format_row(row: dict) -> str:
    s = summarize(row)
    unit = "tok/s" if "new_tokens" in row else "ms"
    values = "  ".join(
        f"{n}: {speed(row, n):.1f} {unit}" if unit == "tok/s" else f"{n}: {v['median_s'] * 1e3:.1f} ms"
        for n, v in row["timings"].items())
    return (f"{row['family']} {row['dtype']} {row['cell']} ({row['shape']}): {values}  -> moekit "
            f"{s['speedup']:.2f}x {s['fastest_transformers']}, {s['vs_floor']:.2f}x the floor")


def targets_of(row: dict) -> list[tuple[str, float, float, bool]]:
    """(what, value, target, met) for each target that applies to this cell."""
    s = summarize(row)
    out = [("speed vs fastest transformers", s["speedup"], TARGET_SPEEDUP, s["speedup"] >= TARGET_SPEEDUP)]
    if row["dtype"] == "bfloat16" and row["cell"].startswith("decode"):
        out.append(("bf16 decode speed vs fastest transformers", s["speedup"], TARGET_BF16_DECODE,
                    s["speedup"] >= TARGET_BF16_DECODE))
    if row["dtype"] == "float32" and row["cell"] in ("prefill", "train step"):
        out.append(("time vs floor", s["vs_floor"], TARGET_FLOOR, s["vs_floor"] <= TARGET_FLOOR))
    return out


def table_value(row: dict, name: str) -> str:
    if name not in row["timings"]:
        return "not run" if name in row["skipped"] else "-"
    if "new_tokens" in row:
        return f"{speed(row, name):.1f}"
    return f"{row['timings'][name]['median_s'] * 1e3:.1f}"


def render_markdown(results: dict) -> str:
    env, args, rows = results["environment"], results["args"], results["rows"]
    sizes = results["sizes"]
    lines = [
        "# The same MoE LM in transformers and moekit: prefill, greedy decode, train step",
        "",
        f"Command: `{results['command']}` at commit `{results['commit']}` (transformers {results['transformers']}).",
        f"Machine: {env['platform']}, {env['cpu_count']} cores, torch {env['torch']} ({env['torch_threads']} "
        f"threads); `GLIBC_TUNABLES={env['glibc_tunables']}` for every competitor.",
        "",
        "**Protocol.** transformers builds a random model from its own config class and `save_pretrained`s it; "
        "transformers loads the folder back (`from_pretrained(dtype=...)`) and moekit imports it "
        "(`moekit.hf.from_hf(dtype=...)`): the same weights, in one process. Within each repetition every "
        "competitor runs once in turn (the first one rotates), so machine noise hits all alike; the tables give "
        f"medians of {args['reps']} repetitions after {args['warmup']} warm-up call(s) (a call under "
        f"{args['min_sample_s'] * 1e3:.0f} ms is repeated within its sample). transformers runs with each experts "
        "implementation (`set_experts_implementation`); its fastest one in each cell is the reference. "
        f"*prefill*: a {sizes['prefill'][0]} x {sizes['prefill'][1]} prompt into an empty KV cache, logits of the "
        "last position (transformers: `logits_to_keep=1`), under `no_grad`. *decode*: greedy generation "
        f"(`generate`) of {sizes['decode_tokens']} tokens after a {sizes['decode_prompt']}-token prompt, prefill "
        "included, in new tokens per second; float32 tokens are checked identical before timing. *train step*: "
        f"forward + next-token cross-entropy + backward on {sizes['train'][0]} x {sizes['train'][1]} tokens "
        "(transformers: `labels=input_ids`, `use_cache=False`; moekit: the same shifted targets), gradients "
        "zeroed untimed; no optimizer step. moekit uses its defaults after import (backend 'auto'). "
        "*Floor*: the same FLOPs as plain dense matmuls and nothing else: q/kv/out projections, causal "
        "attention products (half the square; decode: the cache length), the router, k expert-sized FFN matmuls "
        "over the tokens (a dense model of the active parameters) and the output head (last position for "
        "prefill/decode), with both gradients of each for the train step. At decode the floor reads k experts' "
        "weights per step where a batch of 8 reads up to all of them, so decode is not judged against it.",
        "",
    ]
    for family, (class_name, kwargs) in FAMILIES.items():
        if family not in results["parameters"]:
            continue
        E = kwargs.get("num_local_experts") or kwargs["num_experts"]
        d_ff = kwargs.get("moe_intermediate_size") or kwargs["intermediate_size"]
        lines.append(f"- **{family}** (`{class_name}`): hidden {kwargs['hidden_size']}, {kwargs['num_hidden_layers']} "
                     f"layers, {kwargs['num_attention_heads']} heads / {kwargs['num_key_value_heads']} kv heads, "
                     f"{E} experts top-{kwargs['num_experts_per_tok']}, expert width {d_ff}, vocab "
                     f"{kwargs['vocab_size']}; {results['parameters'][family] / 1e6:.1f}M parameters")
    lines += ["", "## Results", "",
              "Times in ms (decode: tokens/s, higher is better). *vs best*: moekit's speed over the fastest "
              "transformers experts implementation in that cell (> 1: moekit faster); *vs floor*: moekit's time "
              "over the floor's.", ""]
    impl_names = []
    for row in rows:
        for n in row["timings"]:
            if n not in impl_names and n not in (MOEKIT, FLOOR):
                impl_names.append(n)
    header = ["model", "dtype", "cell", MOEKIT, *[n.replace("transformers ", "hf ") for n in impl_names], FLOOR,
              "vs best", "vs floor"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        s = summarize(row)
        values = [table_value(row, n) for n in (MOEKIT, *impl_names, FLOOR)]
        lines.append("| " + " | ".join([row["family"], row["dtype"], f"{row['cell']} ({row['shape']})", *values,
                                        f"**{s['speedup']:.2f}x**", f"{s['vs_floor']:.2f}x"]) + " |")
    notes = sorted({f"{n}: {why}" for row in rows for n, why in row["skipped"].items()})
    if notes:
        lines += ["", "Not run: " + "; ".join(notes) + " (prefill and train step)."]

    lines += ["", "## Targets (issue 21)", ""]
    met = missed = 0
    for row in rows:
        for what, value, target, ok in targets_of(row):
            met, missed = met + ok, missed + (not ok)
            sign = ">=" if "speed" in what else "<="
            lines.append(f"- {row['family']} {row['dtype']} {row['cell']}: {what} {value:.2f}x "
                         f"(target {sign} {target}x): **{'met' if ok else 'MISSED'}**")
    lines += ["", f"{met} targets met, {missed} missed.", ""]

    lines += ["## Agreement", ""]
    for row in rows:
        if "agreement" in row:
            parts = [f"{n.replace('transformers ', '')} {a['identical_tokens'] * 100:.0f}%"
                     for n, a in row["agreement"].items()]
            lines.append(f"- {row['family']} {row['dtype']} {row['cell']}: greedy tokens identical to moekit's: "
                         + ", ".join(parts))
        elif "loss" in row:
            parts = [f"{n.replace('transformers ', '')} {v:.5f}" for n, v in row["loss"].items()]
            lines.append(f"- {row['family']} {row['dtype']} {row['cell']}: loss " + ", ".join(parts))
        else:
            parts = [f"{n.replace('transformers ', '')} {v:.2e}" for n, v in row["max_abs_logit_difference"].items()]
            lines.append(f"- {row['family']} {row['dtype']} {row['cell']}: largest |logit difference| to moekit: "
                         + ", ".join(parts))
    ties = results.get("router_ties") or {}
    if ties:
        lines += ["", "Where float32 logits differ by more than rounding (`--tie-check`: the prefill prompt, every "
                  "position, transformers' default experts implementation): a token whose k-th and (k+1)-th router "
                  "logits are within float32 rounding of each other can go to different experts in the two "
                  "libraries, and attention carries the change to every later position of its sequence.", ""]
        for family, t in ties.items():
            if "first_position" not in t:
                largest = t["max_abs_logit_difference_all_positions"]
                lines.append(f"- {family}: every position within 1e-4 (largest {largest:.2e}; smallest router gap "
                             f"in the prompt {t['smallest_router_gap']:.1e})")
                continue
            b, p = t["first_position"]
            lines.append(f"- {family}: {t['positions_over_1e-4']} of {t['positions']} positions differ by more "
                         f"than 1e-4; the first is sequence {b}, position {p}, where the router gap in one layer is "
                         f"{t['gap_at_first']:.1e}; every earlier position of that sequence agrees within "
                         f"{t['largest_difference_before_first']:.1e}")
    lines.append("")

    layer_rows = results.get("layer_paths") or []
    if layer_rows:
        lines += ["## Layer paths: where 'auto' switches", "",
                  "moekit's MoE layer alone (the two models' layer shapes), ms per call, median of "
                  f"{args['layer_reps']} round-robin repetitions: 'sparse' (plain matmuls on the weight slices of "
                  "the experts hit, no padding), 'grouped' (sort by expert, one grouped GEMM per projection; CPU "
                  "bf16 pads each expert's rows to 32), and 'auto' (the path it picked in brackets). "
                  "*sparse/grouped* < 1: the sparse path is faster.", ""]
        lines += ["| layer | dtype | mode | tokens | assignments | sparse | grouped | auto | sparse/grouped |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in layer_rows:
            k = LAYERS[r["family"]]["top_k"]
            ms = r["ms"]
            lines.append(f"| {r['family']} (E={LAYERS[r['family']]['num_experts']}, k={k}) | {r['dtype']} | "
                         f"{r['mode']} | {r['tokens']} | {r['tokens'] * k} | {ms['sparse']:.3f} | "
                         f"{ms['grouped']:.3f} | {ms['auto']:.3f} ({r['auto_path']}) | "
                         f"{ms['sparse'] / ms['grouped']:.2f} |")
        lines.append("")
    return "\n".join(lines)


# --- main ------------------------------------------------------------------------------------


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=ROOT).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if sys.platform == "linux" and "GLIBC_TUNABLES" not in os.environ:  # it acts only at start-up
        os.execve(sys.executable, [sys.executable, __file__, *argv], dict(os.environ, GLIBC_TUNABLES=MALLOC_TUNABLES))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per cell (median kept)")
    parser.add_argument("--layer-reps", type=int, default=7, help="timed repetitions per layer-path point")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--min-sample-s", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-models", action="store_true", help="only the layer paths")
    parser.add_argument("--skip-layer", action="store_true", help="only the models")
    parser.add_argument("--quick", action="store_true", help="a smoke run: small sizes, 2 repetitions")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.add_argument("--markdown", default=None, help="write the report (markdown) to this file")
    parser.add_argument("--tie-check", action="store_true",
                        help="only the float32 router near-tie check, added to the --json file's results")
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.layer_reps, args.warmup = 2, 2, 1
    sizes = QUICK if args.quick else FULL
    torch.set_num_threads(args.threads)
    if args.tie_check:
        if not args.json or not Path(args.json).is_file():
            parser.error("--tie-check adds to an existing results file: pass --json FILE")
        import json

        results = json.loads(Path(args.json).read_text())
        with tempfile.TemporaryDirectory() as tmp:
            results["router_ties"] = {f: router_tie_check(f, sizes, args.seed, Path(tmp) / f) for f in args.families}
        print(results["router_ties"], flush=True)
        atomic_write_json(args.json, results)
        if args.markdown:
            atomic_write_text(args.markdown, render_markdown(results))
        return 0

    import transformers

    from moekit.commands.info import environment_summary

    env = environment_summary()
    print("  ".join(f"{k}={env[k]}" for k in ("moekit", "torch", "torch_threads", "glibc_tunables")), flush=True)
    results = {"environment": env, "commit": git_commit(), "transformers": transformers.__version__,
               "command": "python benchmarks/hf_speed.py " + " ".join(argv), "args": vars(args),
               "sizes": {"prefill": sizes.prefill, "decode_prompt": sizes.decode_prompt,
                         "decode_tokens": sizes.decode_tokens, "train": sizes.train},
               "parameters": {}, "rows": [], "layer_paths": []}

    def save():
        if args.json:
            atomic_write_json(args.json, results)
        if args.markdown:
            atomic_write_text(args.markdown, render_markdown(results))

    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_models:
            folder = Path(tmp)
            results["rows"] = bench_models(args, sizes, folder, results["parameters"])
            save()
    if not args.skip_layer:
        results["layer_paths"] = bench_layer_paths(args, sizes)
    save()
    for path in (args.json, args.markdown):
        if path:
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
