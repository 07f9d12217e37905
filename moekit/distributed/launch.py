"""Start a small process group on this machine: for tests, benchmarks and examples (gloo on CPU).

Real runs use `torchrun`; this spawns `world_size` processes with torch.multiprocessing, on
127.0.0.1 and a free port, and gives each `fn(rank, world_size, *args)` an initialised group.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, fn: Callable, world_size: int, port: int, backend: str, threads: int,
           args: tuple) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable, world_size: int, *args, backend: str = "gloo", threads: int | None = None,
          start_method: str = "spawn") -> None:
    """Run `fn(rank, world_size, *args)` in `world_size` processes; `fn` must be importable (top level).

    `threads` sets torch's intra-op threads per process (default: the CPU cores shared evenly).
    `start_method="fork"` skips re-importing torch in every child (seconds each on a small
    machine); it is safe for CPU work when the children run one intra-op thread, not with CUDA.
    """
    threads = threads or max(1, (os.cpu_count() or 1) // world_size)
    mp.start_processes(_entry, args=(fn, world_size, free_port(), backend, threads, args), nprocs=world_size,
                       join=True, start_method=start_method)
