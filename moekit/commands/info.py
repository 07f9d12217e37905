"""`moekit info`: versions, threads and devices, for bug reports and benchmark headers."""

from __future__ import annotations

import argparse

HELP = "print versions, thread counts and available devices"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def environment_summary() -> dict[str, str]:
    """What a benchmark table or a bug report should say about where it ran."""
    import os
    import platform

    import numpy
    import torch

    import moekit

    info = {
        "moekit": moekit.__version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "cuda": torch.version.cuda or "none",
        "devices": ", ".join(["cpu"] + [
            f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())
        ]),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "(unset)"),
    }
    return info


def run(args: argparse.Namespace) -> int:
    for key, value in environment_summary().items():
        print(f"{key:>15}: {value}")
    return 0
