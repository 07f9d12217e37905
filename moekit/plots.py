"""Every plot moekit draws, as PNG files written atomically. Commands and benchmarks call these;
trainers never draw.

One annotated heatmap serves the expert-load, gate and facet plots: a colour scale that covers
the data, a labelled colour bar, cell text that stays readable on every colour (black or white by
the cell's luminance), and hatched grey cells for entries that do not exist (a PLE task cannot
reach another task's experts: those cells are marked, not drawn as zeros).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from moekit.io import atomic_write_bytes


def pyplot():
    """matplotlib.pyplot with the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Write `fig` as a PNG atomically and close it."""
    plt = pyplot()
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


def annotated_heatmap(ax, matrix: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str], *,
                      colorbar_label: str, cmap: str = "viridis", vmin: float | None = None,
                      vmax: float | None = None, missing: np.ndarray | None = None, fmt: str = "{:.2f}",
                      xlabel: str = "", ylabel: str = "") -> None:
    """Draw `matrix` (rows x columns) on `ax` with its values written in the cells.

    `missing` (bool, same shape) marks cells that do not exist: hatched grey, no number. The colour
    scale spans the existing cells unless `vmin`/`vmax` say otherwise.
    """
    import matplotlib.colors as mcolors

    plt = pyplot()
    matrix = np.asarray(matrix, dtype=float)
    missing = np.zeros(matrix.shape, dtype=bool) if missing is None else np.asarray(missing, dtype=bool)
    present = matrix[~missing]
    low = vmin if vmin is not None else (float(present.min()) if present.size else 0.0)
    high = vmax if vmax is not None else (float(present.max()) if present.size else 1.0)
    if high <= low:
        high = low + 1e-6
    colormap = plt.get_cmap(cmap).with_extremes(bad="#dddddd")
    norm = mcolors.Normalize(low, high)
    image = ax.imshow(np.ma.masked_array(matrix, missing), cmap=colormap, norm=norm, aspect="auto")
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            if missing[i, j]:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", edgecolor="#999999",
                                           linewidth=0))
                continue
            r, g, b, _ = colormap(norm(matrix[i, j]))
            luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b
            ax.text(j, i, fmt.format(matrix[i, j]), ha="center", va="center", fontsize=7,
                    color="black" if luminance > 0.5 else "white")
    ax.set_xticks(range(len(col_labels)), col_labels, rotation=30 if max(map(len, col_labels), default=0) > 3
                  else 0, ha="right" if max(map(len, col_labels), default=0) > 3 else "center", fontsize=8)
    ax.set_yticks(range(len(row_labels)), row_labels, fontsize=8)
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    bar = ax.figure.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    bar.set_label(colorbar_label)


def gate_heatmap(panels: dict[str, tuple], path: str | os.PathLike, title: str = "",
                 unreachable: dict[str, list[int]] | None = None) -> Path:
    """Multi-task gates: one heatmap per panel (e.g. per model), tasks x experts, colour = mean gate
    weight. A panel is (gates by task, expert names[, unreachable]); `unreachable[task]` lists the
    experts the task's gate cannot see (PLE), drawn as missing, not as zeros (the `unreachable`
    argument serves a panel that has none of its own)."""
    plt = pyplot()
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 1.3 + 1.8 * len(panels)), squeeze=False)
    for ax, (name, panel) in zip(axes[:, 0], panels.items(), strict=True):
        gates, experts = panel[0], panel[1]
        hidden = panel[2] if len(panel) > 2 else (unreachable or {})
        matrix = np.array(list(gates.values()), dtype=float)
        missing = np.zeros(matrix.shape, dtype=bool)
        for i, task in enumerate(gates):
            for e in hidden.get(task, []):
                missing[i, e] = True
        annotated_heatmap(ax, matrix, list(gates), experts, colorbar_label="mean gate weight", vmin=0.0,
                          missing=missing, xlabel="expert", ylabel="task")
        ax.set_title(name, fontsize=10)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_png(fig, path)


def loss_curves(runs: dict[str, list[dict]], path: str | os.PathLike) -> Path:
    """LM training loss (thin) and validation loss (markers) against tokens, one colour per run."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, rows) in enumerate(runs.items()):
        color = f"C{i}"
        train = [(int(float(r["tokens"])), float(r["lm_loss"])) for r in rows if r.get("lm_loss") not in (None, "")]
        val = [(int(float(r["tokens"])), float(r["val_loss"])) for r in rows if r.get("val_loss") not in (None, "")]
        if train:
            ax.plot(*zip(*train, strict=True), color=color, alpha=0.35, linewidth=0.8, label=f"{name} train")
        if val:
            ax.plot(*zip(*val, strict=True), color=color, marker="o", markersize=3, label=f"{name} validation")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return save_png(fig, path)


def expert_load_heatmap(load_rows: list[dict], path: str | os.PathLike, last_fraction: float = 0.2) -> Path:
    """Each MoE layer's share of token assignments per expert, averaged over the last part of training.
    The colour scale is centred on uniform (1/E) and spans the data."""
    plt = pyplot()
    steps = sorted({int(float(r["step"])) for r in load_rows})
    keep = set(steps[int(len(steps) * (1 - last_fraction)):])
    layers = sorted({int(float(r["layer"])) for r in load_rows})
    num_experts = sum(1 for k in load_rows[0] if str(k).startswith("e") and str(k)[1:].isdigit())
    share = np.zeros((len(layers), num_experts))
    for i, layer in enumerate(layers):
        rows = [r for r in load_rows if int(float(r["layer"])) == layer and int(float(r["step"])) in keep]
        share[i] = np.mean([[float(r[f"e{e}"]) for e in range(num_experts)] for r in rows], axis=0)
    uniform = 1 / num_experts
    spread = max(float(np.abs(share - uniform).max()), 1e-6)
    fig, ax = plt.subplots(figsize=(max(4, 0.55 * num_experts + 2.5), max(2.5, 0.5 * len(layers) + 1.5)))
    annotated_heatmap(ax, share, [f"layer {layer}" for layer in layers], [str(e) for e in range(num_experts)],
                      colorbar_label="share of token assignments", cmap="RdBu_r", vmin=uniform - spread,
                      vmax=uniform + spread, xlabel="expert", ylabel="MoE layer")
    ax.set_title(f"expert load, last {last_fraction:.0%} of steps (uniform = {uniform:.3f})", fontsize=10)
    return save_png(fig, path)


def line_curves(curves: dict[str, tuple], path: str | os.PathLike, xlabel: str, ylabel: str, title: str = "",
                smooth: int = 1, references: dict[str, float] | None = None,
                bands: dict[str, tuple] | None = None) -> Path:
    """One line per curve, (x, y) each (a moving average over `smooth` points where there are enough; a
    curve of one or two points is drawn with markers, so a short run still shows), dashed horizontal
    lines for `references`, optional (low, high) bands per curve; every line its own colour, the legend
    outside the axes (off the data)."""
    plt = pyplot()
    colors = plt.get_cmap("tab10").colors
    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    k = 0
    for name, (x, y) in curves.items():
        x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        if len(y) == 0:
            continue
        w = max(1, min(smooth, len(y)))
        ys = np.convolve(y, np.ones(w) / w, mode="valid")
        xs = x[w - 1:]
        color = colors[k % len(colors)]
        ax.plot(xs, ys, label=name, color=color, marker="o" if len(ys) < 3 else None)
        if bands and name in bands:
            lo, hi = (np.asarray(b, dtype=float)[w - 1:] for b in bands[name])
            ax.fill_between(xs, lo, hi, color=color, alpha=0.15, linewidth=0)
        k += 1
    for name, value in (references or {}).items():
        ax.axhline(value, linestyle="--", linewidth=1.2, label=name, color=colors[k % len(colors)])
        k += 1
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if k:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return save_png(fig, path)
