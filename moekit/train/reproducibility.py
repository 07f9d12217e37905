"""Seeding: every entry point takes --seed, and the same seed gives the same numbers."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (CPU and CUDA); returns a CPU generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the last good checkpoint is kept."""


def check_finite(loss: torch.Tensor, step: int, checkpoint_hint: str = "") -> None:
    """Stop with a clear message on a NaN/inf loss (call before the optimizer step)."""
    if not torch.isfinite(loss).all():
        hint = f"; the last good checkpoint is kept at {checkpoint_hint}" if checkpoint_hint else ""
        raise NonFiniteLossError(f"loss became {loss.item()} at step {step}{hint}")
