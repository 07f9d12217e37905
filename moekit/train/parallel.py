"""Data parallelism under `torchrun` for the recommender families (mtl, seqrec, two-tower).

    torchrun --nproc_per_node 2 -m moekit train seqrec --out runs/sasrec ...

Every process draws the same global batch order from the same seed and keeps its share of each
batch's rows; `DistributedDataParallel` averages the gradients (gloo on CPU, NCCL on GPU). Each
process scales its local mean loss by `world * local_rows / global_rows`, so the averaged gradient
is the gradient of the global batch's mean loss: two processes with a global batch B take the
steps one process with batch B takes. Every process evaluates the whole validation split (the
same numbers everywhere, so early stopping agrees); only the main process writes the run folder.

Where a loss is not a mean over rows, a process computes it over its own rows: the balancing loss
of MoE towers (two-tower with `tower='moe'`) is then the mean of the processes' balancing losses,
not the balancing loss of the global batch (as Megatron-LM and DeepSpeed compute it per process),
and those runs differ slightly from one process's. Dropout masks differ too (each process draws
its own), so an exact comparison needs dropout 0.

The language model has its own strategy with expert parallelism (`moekit.train.lm_parallel`).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from moekit.config import ConfigError
from moekit.train.loop import TrainSettings, resolve_device, seed_everything, set_threads
from moekit.train.run import Run


def launched_by_torchrun() -> bool:
    """Whether this process is one of several started by torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_process_group(device_type: str) -> None:
    """init_process_group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...)."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ConfigError("several processes need a torchrun launch, e.g. "
                          "torchrun --nproc_per_node 2 -m moekit train ...")
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")


class DataParallel:
    """One process (the default), or one of torchrun's data-parallel processes."""

    def __init__(self, device: torch.device) -> None:
        self.world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = 0
        self.device = device
        if self.world > 1:
            init_process_group(device.type)
            self.rank = dist.get_rank()
            if device.type == "cuda":
                self.device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
                torch.cuda.set_device(self.device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """`model` itself (one process) or its DDP wrapper (call `.module` ... via `unwrap`)."""
        if self.world == 1:
            return model
        batchnorms = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if batchnorms and self.device.type != "cuda":
            raise ConfigError(f"batch norm ({batchnorms[0]}) keeps per-process statistics under data "
                              f"parallelism and torch syncs them only on GPUs; turn it off to train on "
                              f"{self.world} CPU processes")
        if batchnorms:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ids = [self.device.index] if self.device.type == "cuda" else None
        # find_unused_parameters: a process whose share of a small last batch is empty (or whose rows
        # pick no token for an expert) leaves some parameters without a gradient this step.
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False,
                                                   find_unused_parameters=True)

    def shard(self, index_B: torch.Tensor) -> torch.Tensor:
        """This process's rows of a global batch (contiguous, as equal as possible)."""
        if self.world == 1:
            return index_B
        return torch.tensor_split(index_B, self.world)[self.rank]

    def loss_scale(self, local_rows: int, global_rows: int) -> float:
        """Factor on a local mean loss so DDP's gradient average is the global mean's gradient."""
        return self.world * local_rows / max(global_rows, 1)

    def global_loss(self, loss) -> float:
        """The global batch's loss from this process's scaled share (`loss_scale`): what one process
        with the whole batch would have logged."""
        if self.world == 1:
            return float(loss.detach())
        total = loss.detach().clone()
        dist.all_reduce(total)
        return float(total) / self.world

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def begin_fit(settings: TrainSettings, out, mode: str) -> tuple[DataParallel, torch.Generator]:
    """How every data-parallel `fit` begins: its threads, its device (and process group under torchrun),
    the run folder checked before any data is read (a refused folder costs nothing), then the seeds.
    Returns the processes and the seeded generator of the data order."""
    set_threads(settings.threads)
    parallel = DataParallel(resolve_device(settings.device))
    if parallel.is_main:
        Run.check_target(out, mode)
    return parallel, seed_everything(settings.seed)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
