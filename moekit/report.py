"""Self-contained HTML reports: tables and PNG plots embedded in one file that opens anywhere."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from moekit.io import atomic_write_text

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 980px; margin: 2em auto; color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
pre { background: #f7f7f7; padding: 10px; white-space: pre-wrap; }
img { max-width: 100%; border: 1px solid #eee; }
.note { color: #666; font-size: 0.9em; }
"""


def table_html(header: list[str], rows: list[list]) -> str:
    """An HTML table with escaped cells."""
    cells = lambda tag, row: "".join(f"<{tag}>{html.escape(str(c))}</{tag}>" for c in row)  # noqa: E731
    body = "".join(f"<tr>{cells('td', row)}</tr>" for row in rows)
    return f"<table><tr>{cells('th', header)}</tr>{body}</table>"


def image_html(path: str | Path, alt: str) -> str:
    """An <img> with the PNG inlined as base64, or a note when the plot is missing."""
    path = Path(path)
    if not path.is_file():
        return f"<p class='note'>({html.escape(alt)}: plot not produced)</p>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'>"


def write_demo_report(summary: dict, path: str | Path) -> Path:
    """The demo's self-contained report.html (tables, samples, inlined plots)."""
    lm, mtl = summary["language_models"], summary["multitask"]
    parts = [f"<html><head><meta charset='utf-8'><title>moekit demo</title><style>{_STYLE}</style></head><body>",
             "<h1>moekit demo</h1>",
             f"<p class='note'>seed {summary['seed']}, {'quick smoke run' if summary['quick'] else 'full demo'}, "
             f"{summary['seconds']:.0f} s. Data shipped with moekit: TinyShakespeare (public domain) and 4,000 "
             "UCI Census-Income rows (CC BY 4.0).</p>",
             "<h2>1. A Mixture-of-Experts language model and its dense twin</h2>",
             "<p>Both models have the same attention and the same compute per token: the dense FFN has width 168; "
             "the MoE has 8 experts of width 84 and sends each token to 2 of them. The MoE holds more "
             "parameters for the same active parameters per token.</p>"]
    rows = []
    for kind, r in lm["results"].items():
        p = r["parameters"]
        rows.append([kind, f"{r['val_loss']:.4f}", f"{r['val_bits_per_byte']:.4f}", f"{p.get('total', 0):,}",
                     f"{p.get('active', 0):,}", f"{r['train_tokens_per_s']:.0f}"])
    parts.append(table_html(["model", "val loss", "bits/byte", "params total", "active per token", "train tokens/s"],
                            rows))
    parts.append(image_html(lm["plots"].get("lm_loss_curves", ""), "loss curves"))
    parts.append("<h3>Expert load (fraction of tokens per expert, per layer)</h3>")
    parts.append(image_html(lm["plots"].get("expert_load", ""), "expert load heatmap"))
    for kind, r in lm["results"].items():
        parts.append(f"<h3>Sample from the {kind} model</h3><pre>{html.escape(r['sample'])}</pre>")

    parts.append("<h2>2. Multi-task ranking: MMoE against Shared-Bottom</h2>")
    parts.append(f"<p class='note'>Census-Income group 1 tasks; protocol: {html.escape(mtl['protocol'])}. "
                 f"{html.escape(mtl.get('note', ''))}</p>")
    tasks = mtl["tasks"]
    rows = [[model] + [f"{r['test_auc'][t]:.4f}" for t in tasks] for model, r in mtl["results"].items()]
    parts.append(table_html(["model"] + [f"test AUC {t}" for t in tasks], rows))
    parts.append("<h3>What the MMoE gates learned</h3>")
    parts.append(image_html(mtl["plots"].get("mmoe_gates", ""), "MMoE gate heatmap"))
    parts.append("</body></html>")
    return atomic_write_text(path, "\n".join(parts))
