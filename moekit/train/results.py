"""What every family's `fit` returns, and the mean ± std over seeds.

`TrainResult.test` holds the test metrics by name (`income/auc`, `NDCG@10`, `Hit@50`, `return`):
the numbers written to `results.json` and reproduced by `moekit eval <family> --ckpt RUN`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn


@dataclass
class TrainResult:
    """One finished run of one family."""

    family: str
    model: nn.Module
    """The trained model (the best state, for families that stop early)."""
    test: dict[str, float]
    """Test metrics by name."""
    valid: dict[str, float] = field(default_factory=dict)
    """Validation metrics of the returned model."""
    history: list[dict] = field(default_factory=list)
    """One row per epoch or logged step: what metrics.csv holds."""
    best_epoch: int | None = None
    """The epoch whose state was kept (early stopping); None for families that keep the last state."""
    steps: int = 0
    """Optimizer steps taken."""
    train_seconds: float = 0.0
    """Wall-clock seconds of training (evaluation included), this session."""
    out: Path | None = None
    """The run folder (None when nothing was written)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Family-specific results (gate weights, protocol, throughput, ...), JSON-safe."""

    def to_json(self) -> dict:
        return {"family": self.family, "test": self.test, "valid": self.valid, "best_epoch": self.best_epoch,
                "steps": self.steps, "train_seconds": self.train_seconds, **self.extra,
                "history": self.history}


class Stopwatch:
    """Seconds spent inside `with watch:` blocks (training time without the evaluations, say)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start = 0.0

    def __enter__(self) -> Stopwatch:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds += time.perf_counter() - self._start


def summarize_seeds(results: list[TrainResult]) -> dict[str, dict]:
    """{metric: {"mean", "std", "values"}} over the seeds' test metrics (std None for one seed)."""
    summary: dict[str, dict] = {}
    for name in results[0].test:
        values = np.array([r.test.get(name, math.nan) for r in results], dtype=np.float64)
        std = float(values.std(ddof=1)) if len(values) > 1 else None
        summary[name] = {"mean": float(values.mean()), "std": std, "values": values.tolist()}
    return summary


def format_mean_std(entry: dict, digits: int = 4) -> str:
    """'0.9456 ± 0.0012', or just '0.9456' for a single seed."""
    mean = f"{entry['mean']:.{digits}f}"
    return mean if entry.get("std") is None else f"{mean} ± {entry['std']:.{digits}f}"


def metrics_table(rows: dict[str, dict[str, float | str]], digits: int = 4) -> str:
    """A plain-text table: one row per name, one column per metric (floats rounded)."""
    columns: list[str] = []
    for values in rows.values():
        columns.extend(k for k in values if k not in columns)
    cells = [[name] + [_cell(values.get(c, ""), digits) for c in columns] for name, values in rows.items()]
    header = [""] + columns
    widths = [max(len(str(r[i])) for r in [header, *cells]) for i in range(len(header))]
    lines = ["  ".join(str(h).ljust(w) if i == 0 else str(h).rjust(w) for i, (h, w) in enumerate(zip(header, widths,
                                                                                                     strict=True)))]
    for row in cells:
        lines.append("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths, strict=True))))
    return "\n".join(lines)


def _cell(value: Any, digits: int) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)
