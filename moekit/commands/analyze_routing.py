"""`moekit analyze routing`: how a trained or imported MoE language model routes the tokens of a text.

Per MoE layer: each expert's share of the token assignments, max/mean load, the experts that got
nothing, the router's entropy, how often each pair of experts is chosen together, and the
assignments an expert capacity of `factor * tokens * k / E` would drop. Writes `routing.md`
(tables), `routing.json` (everything, the co-selection matrices included) and heatmap PNGs, each
file atomically; prints the summary table.

Shape suffixes: T tokens, K experts per token, E experts, L MoE layers.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path

HELP = "per-layer expert load, router entropy, expert co-selection and capacity drops of an MoE LM over a text"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="moekit model or run folder (e.g. from `moekit hf import`)")
    parser.add_argument("--text", required=True, help="text file (or folder of .txt files) to route")
    parser.add_argument("--out", help="folder for routing.md, routing.json and the PNGs (default: CKPT/routing)")
    parser.add_argument("--max-tokens", type=int, default=20000, help="route at most this many tokens")
    parser.add_argument("--context", type=int, default=0, help="tokens per sequence (0: min(block_size, 1024))")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    parser.add_argument("--capacity-factor", type=float, nargs="+", default=[1.0, 1.25, 2.0],
                        help="capacity factors at which to count dropped assignments (per forward pass)")
    parser.add_argument("--pair-plots", type=int, default=8, help="co-selection heatmaps for at most this many layers")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--seed", type=int, default=0, help="unused (routing is deterministic); for uniformity")


@dataclass
class LayerRouting:
    """Routing statistics of one MoE layer, accumulated over forward passes."""

    layer: int
    num_experts: int
    top_k: int
    tokens: int = 0
    counts: list[int] = field(default_factory=list)
    """Assignments each expert received."""
    coselection: list[list[int]] = field(default_factory=list)
    """[a][b]: tokens that chose both a and b (the diagonal: tokens that chose a)."""
    entropy_sum: float = 0.0
    dropped: dict[float, int] = field(default_factory=dict)
    """Capacity factor -> assignments over capacity (None for expert-choice or soft routing)."""

    @property
    def assignments(self) -> int:
        return sum(self.counts)

    @property
    def share(self) -> list[float]:
        return [c / max(self.assignments, 1) for c in self.counts]

    @property
    def max_over_mean(self) -> float:
        mean = self.assignments / self.num_experts
        return max(self.counts) / mean if mean else 0.0

    @property
    def idle_experts(self) -> list[int]:
        return [e for e, c in enumerate(self.counts) if c == 0]

    @property
    def entropy(self) -> float:
        """Mean entropy (nats) of each token's distribution over the experts."""
        return self.entropy_sum / max(self.tokens, 1)

    def top_pairs(self, n: int = 5) -> list[tuple[int, int, int]]:
        E = self.num_experts
        pairs = [(a, b, self.coselection[a][b]) for a in range(E) for b in range(a + 1, E)]
        return sorted((p for p in pairs if p[2] > 0), key=lambda p: (-p[2], p[0], p[1]))[:n]

    def to_json(self) -> dict:
        return {"layer": self.layer, "num_experts": self.num_experts, "top_k": self.top_k, "tokens": self.tokens,
                "assignments": self.assignments, "counts": self.counts, "share": self.share,
                "max_over_mean": self.max_over_mean, "idle_experts": self.idle_experts,
                "entropy_nats": self.entropy, "entropy_over_log_e": self.entropy / math.log(self.num_experts),
                "dropped": {str(k): v for k, v in self.dropped.items()},
                "top_pairs": [list(p) for p in self.top_pairs()], "coselection": self.coselection}


def collect_routing(model, ids, context: int, batch_size: int, capacity_factors: list[float]) -> list[LayerRouting]:
    """Route `ids` (a 1-D token tensor) through `model` in sequences of `context` tokens and gather
    each MoE layer's statistics from its router's decisions (captured by forward hooks)."""
    import torch

    stats = {i: LayerRouting(i, model.blocks[i].ffn.config.num_experts, model.blocks[i].ffn.config.experts_per_token)
             for i in model.moe_layers}
    for s in stats.values():
        s.counts = [0] * s.num_experts
        s.coselection = [[0] * s.num_experts for _ in range(s.num_experts)]
        s.dropped = {cf: 0 for cf in capacity_factors}
    captured = {}
    hooks = [model.blocks[i].ffn.router.register_forward_hook(
        lambda module, args, routing, i=i: captured.__setitem__(i, routing)) for i in stats]
    device = next(model.parameters()).device
    try:
        n_seq = max(len(ids) // context, 1)
        sequences = ids[: n_seq * context].view(n_seq, -1)
        with torch.no_grad():
            for start in range(0, n_seq, batch_size):
                model(sequences[start:start + batch_size].to(device))
                for i, routing in captured.items():
                    accumulate(stats[i], routing, model.blocks[i].ffn.config)
                captured.clear()
    finally:
        for hook in hooks:
            hook.remove()
    return [stats[i] for i in sorted(stats)]


def accumulate(stats: LayerRouting, routing, config) -> None:
    """Add one forward's routing (a `moekit.layers.routers.Routing`) to `stats`."""
    import torch

    probs_TE = routing.probs_TE.double()
    T, E = probs_TE.shape
    chosen_TE = torch.zeros(T, E, dtype=torch.float64, device=probs_TE.device)
    if routing.expert_choice:  # ids (E, C): the tokens each expert took
        chosen_TE[routing.ids, torch.arange(E, device=probs_TE.device).unsqueeze(1).expand_as(routing.ids)] = 1
    else:
        chosen_TE.scatter_(1, routing.ids, 1.0)
    counts_E = chosen_TE.sum(0)
    co_EE = chosen_TE.t() @ chosen_TE
    stats.tokens += T
    stats.counts = [a + int(b) for a, b in zip(stats.counts, counts_E.tolist(), strict=True)]
    stats.coselection = [[a + int(b) for a, b in zip(row, new, strict=True)]
                         for row, new in zip(stats.coselection, co_EE.tolist(), strict=True)]
    stats.entropy_sum += float(-(probs_TE * probs_TE.clamp_min(1e-300).log()).sum())
    for cf in stats.dropped:
        if stats.dropped[cf] is None or routing.expert_choice or config.router == "soft":
            stats.dropped[cf] = None
            continue
        capacity = math.ceil(cf * T * config.top_k / E)
        stats.dropped[cf] += int((counts_E - capacity).clamp_min(0).sum())


# --- tables -----------------------------------------------------------------------------------


def summary_rows(layers: list[LayerRouting], capacity_factors: list[float]) -> tuple[list[str], list[list[str]]]:
    header = ["layer", "experts", "k", "tokens", "max/mean load", "idle experts", "entropy (nats)", "entropy / ln E",
              *(f"dropped @ cf {cf:g}" for cf in capacity_factors)]
    rows = []
    for s in layers:
        dropped = ["n/a" if s.dropped[cf] is None
                   else f"{s.dropped[cf]:,} ({s.dropped[cf] / max(s.assignments, 1):.1%})" for cf in capacity_factors]
        idle = ", ".join(map(str, s.idle_experts[:8])) + (" ..." if len(s.idle_experts) > 8 else "")
        rows.append([str(s.layer), str(s.num_experts), str(s.top_k), f"{s.tokens:,}", f"{s.max_over_mean:.2f}",
                     f"{len(s.idle_experts)}: {idle}" if s.idle_experts else "none", f"{s.entropy:.3f}",
                     f"{s.entropy / math.log(s.num_experts):.3f}", *dropped])
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def plain_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)])


def report_markdown(layers: list[LayerRouting], meta: dict, capacity_factors: list[float], plots: list[str]) -> str:
    header, rows = summary_rows(layers, capacity_factors)
    parts = [f"# Routing of {meta['ckpt']}", "",
             f"{meta['tokens']:,} tokens of `{meta['text']}` in sequences of {meta['context']}. Load: share of the "
             f"token-expert assignments; max/mean load 1.0 is perfectly even; entropy of each token's router "
             f"distribution, averaged (ln E is uniform); dropped: assignments over an expert capacity of "
             f"ceil(cf x tokens x k / E) per forward pass of {meta['batch_size']} sequences.", "",
             markdown_table(header, rows), "", "## Experts chosen together most often", "",
             markdown_table(["layer", "pairs (expert a, expert b: tokens choosing both)"],
                            [[str(s.layer), "; ".join(f"{a}, {b}: {n:,}" for a, b, n in s.top_pairs()) or "none"]
                             for s in layers]), ""]
    if plots:
        parts += ["## Heatmaps", "", *(f"![{p}]({p})" for p in plots), ""]
    return "\n".join(parts)


# --- plots ------------------------------------------------------------------------------------


def heatmap_png(matrix, title: str, xlabel: str, ylabel: str, colorbar_label: str, yticklabels=None,
                cell_format: str | None = None) -> bytes:
    """A heatmap as PNG bytes: the colour scale spans the data (0 to its max), the colour bar is
    labelled, and cell text (when the grid is small enough to read) is black or white by the
    luminance of its cell."""
    import io

    import matplotlib
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data = np.asarray(matrix, dtype=float)  # NaN cells are drawn grey, without text
    rows, cols = data.shape
    fig = Figure(figsize=(min(2 + 0.45 * cols, 24), min(1.6 + 0.4 * rows, 24)), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    vmax = float(np.nanmax(data)) if np.isfinite(data).any() and np.nanmax(data) > 0 else 1.0
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    image = ax.imshow(data, cmap=cmap, vmin=0.0, vmax=vmax, aspect="auto", interpolation="nearest")
    colorbar = fig.colorbar(image, ax=ax)
    colorbar.set_label(colorbar_label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    step = max(1, cols // 32)
    ax.set_xticks(range(0, cols, step))
    ax.set_yticks(range(rows))
    ax.set_yticklabels(yticklabels if yticklabels is not None else range(rows))
    if cell_format and rows * cols <= 24 * 24:
        for r in range(rows):
            for c in range(cols):
                if not np.isfinite(data[r, c]):
                    continue
                red, green, blue, _ = image.cmap(image.norm(data[r, c]))
                luminance = 0.2126 * red + 0.7152 * green + 0.0722 * blue
                ax.text(c, r, format(data[r, c], cell_format), ha="center", va="center", fontsize=7,
                        color="black" if luminance > 0.5 else "white")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def write_plots(layers: list[LayerRouting], out: Path, max_pair_plots: int) -> list[str]:
    from moekit.io import atomic_write_bytes

    names = []
    width = max(s.num_experts for s in layers)
    share = [[*(100 * x for x in s.share), *[0.0] * (width - s.num_experts)] for s in layers]
    atomic_write_bytes(out / "expert_load.png", heatmap_png(
        share, "Expert load: share of each layer's assignments", "expert", "MoE layer", "share of assignments (%)",
        yticklabels=[s.layer for s in layers], cell_format=".1f"))
    names.append("expert_load.png")
    # Co-selection maps for at most max_pair_plots layers, evenly spaced through the model.
    n = min(max_pair_plots, len(layers))
    picks = sorted({round(j * (len(layers) - 1) / max(n - 1, 1)) for j in range(n)})
    for s in (layers[j] for j in picks):
        name = f"coselection_layer{s.layer}.png"
        pairs = [[float("nan") if a == b else n for b, n in enumerate(row)] for a, row in enumerate(s.coselection)]
        atomic_write_bytes(out / name, heatmap_png(
            pairs, f"Layer {s.layer}: tokens routed to both experts\n(diagonal blank: each expert's load is in "
            f"expert_load.png)", "expert", "expert", "tokens choosing both experts",
            cell_format=".0f" if s.num_experts <= 16 else None))
        names.append(name)
    return names


# --- the command ------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    import torch

    from moekit.data.text import load_tokenizer, read_text_source
    from moekit.io import atomic_write_json, atomic_write_text
    from moekit.models.transformer import Transformer

    for flag, value in (("--max-tokens", args.max_tokens), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1 (got {value})")
    if args.context < 0:
        raise ValueError(f"--context must be >= 0 (got {args.context})")
    if args.pair_plots < 0:
        raise ValueError(f"--pair-plots must be >= 0 (got {args.pair_plots})")
    for cf in args.capacity_factor:
        if not (cf > 0 and math.isfinite(cf)):
            raise ValueError(f"--capacity-factor must be positive numbers (got {cf})")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model = Transformer.from_pretrained(args.ckpt, device=device)
    if not model.moe_layers:
        raise ValueError(f"{args.ckpt} holds a dense model: it has no MoE layers to analyze")
    if args.context > model.config.block_size:
        raise ValueError(f"--context {args.context} is longer than the model's block_size={model.config.block_size}")
    text = read_text_source(args.text)
    ids = torch.tensor(load_tokenizer(args.ckpt).encode(text)[: args.max_tokens], dtype=torch.long)
    if len(ids) == 0:
        raise ValueError(f"{args.text} holds no text to route")
    context = min(args.context or min(model.config.block_size, 1024), len(ids))
    layers = collect_routing(model, ids, context, args.batch_size, args.capacity_factor)

    out = Path(args.out) if args.out else Path(args.ckpt) / "routing"
    meta = {"ckpt": str(args.ckpt), "text": str(args.text), "tokens": len(ids) // context * context,
            "context": context, "batch_size": args.batch_size, "capacity_factors": args.capacity_factor}
    plots = write_plots(layers, out, args.pair_plots)
    atomic_write_json(out / "routing.json", {**meta, "layers": [s.to_json() for s in layers]})
    atomic_write_text(out / "routing.md", report_markdown(layers, meta, args.capacity_factor, plots))
    header, rows = summary_rows(layers, args.capacity_factor)
    print(plain_table(header, rows))
    print(f"\nwrote {out / 'routing.md'}, {out / 'routing.json'} and {len(plots)} heatmap(s)")
    return 0
