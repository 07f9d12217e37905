"""Plots for language-model runs: loss curves and the expert-load heatmap (layer x expert)."""

from __future__ import annotations

import os
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curves(runs: dict[str, list[dict]], path: str | os.PathLike) -> Path:
    """Training loss (thin) and validation loss (markers) against tokens, one colour per run."""
    from moekit.io import atomic_write_bytes

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, rows) in enumerate(runs.items()):
        color = f"C{i}"
        train = [(int(r["tokens"]), float(r["lm_loss"])) for r in rows if r.get("lm_loss") not in (None, "")]
        val = [(int(r["tokens"]), float(r["val_loss"])) for r in rows if r.get("val_loss") not in (None, "")]
        if train:
            ax.plot(*zip(*train, strict=True), color=color, alpha=0.35, linewidth=0.8, label=f"{name} train")
        if val:
            ax.plot(*zip(*val, strict=True), color=color, marker="o", markersize=3, label=f"{name} val")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save(fig, path, plt, atomic_write_bytes)


def plot_expert_load(load_rows: list[dict], path: str | os.PathLike, last_fraction: float = 0.2) -> Path:
    """Heatmap of each MoE layer's share of tokens per expert, averaged over the last part of training.

    1/E everywhere is perfect balance; the colour scale is centred there.
    """
    import numpy as np

    from moekit.io import atomic_write_bytes

    plt = _pyplot()
    steps = sorted({int(r["step"]) for r in load_rows})
    keep = set(steps[int(len(steps) * (1 - last_fraction)):])
    layers = sorted({int(r["layer"]) for r in load_rows})
    num_experts = sum(1 for k in load_rows[0] if str(k).startswith("e") and str(k)[1:].isdigit())
    share = np.zeros((len(layers), num_experts))
    for i, layer in enumerate(layers):
        rows = [r for r in load_rows if int(r["layer"]) == layer and int(r["step"]) in keep]
        share[i] = np.mean([[float(r[f"e{e}"]) for e in range(num_experts)] for r in rows], axis=0)
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * num_experts + 2), max(2.5, 0.5 * len(layers) + 1.5)))
    image = ax.imshow(share, cmap="RdBu_r", vmin=0, vmax=2 / num_experts, aspect="auto")
    for i in range(len(layers)):
        for e in range(num_experts):
            ax.text(e, i, f"{share[i, e]:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(num_experts))
    ax.set_yticks(range(len(layers)), [f"layer {layer}" for layer in layers])
    ax.set_xlabel("expert")
    ax.set_title(f"share of token assignments (last {last_fraction:.0%} of steps;\n"
                 f"uniform = {1 / num_experts:.3f})")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return _save(fig, path, plt, atomic_write_bytes)


def _save(fig, path, plt, atomic_write_bytes) -> Path:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())
