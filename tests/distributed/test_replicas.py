"""World 4 = 2 replicas x expert-parallel 2: the replica groups, gradient averaging across copies of
the same shard, and loss-free bias loads summed over replicas, vs one process on the whole batch.

Balancing statistics (aux loss, capacity) are group-wide, not world-wide, by design, so this run
uses neither: then every quantity has a single-device equivalent. Rank r takes sequences
[2r, 2r + 2) of each global batch of 8.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moekit import MoE, MoEConfig
from moekit.distributed import (
    attach_expert_bias_updates,
    init_expert_parallel,
    parallelize_experts,
    sync_gradients,
)
from moekit.distributed.launch import spawn
from moekit.train.balancing import attach_expert_bias_updates as attach_local_bias_updates

WORLD, P, V, D, SEQ, BATCH, STEPS = 4, 2, 12, 8, 5, 8, 4


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.moe = MoE(MoEConfig(D, 8, num_experts=4, top_k=2, bias_update_rate=0.05, num_shared_experts=1))
        self.head = nn.Linear(D, V)

    def forward(self, idx, targets):
        x = self.embed(idx)
        x = x + self.moe(x).hidden_states
        return F.cross_entropy(self.head(x).view(-1, V), targets.reshape(-1))


def _batches():
    gen = torch.Generator().manual_seed(1)
    return [(idx, (idx * 5 + 2) % V) for idx in (torch.randint(0, V, (BATCH, SEQ), generator=gen)
                                                   for _ in range(STEPS))]


def _worker(rank: int, world: int, folder: str) -> None:
    groups = init_expert_parallel(P)
    assert (groups.ep_rank, groups.replica_rank, groups.num_replicas) == (rank % P, rank // P, WORLD // P)
    torch.manual_seed(0)
    model = parallelize_experts(Tiny(), groups)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    attach_expert_bias_updates(model, opt, groups)
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    losses = []
    for idx, tgt in _batches():
        loss = model(idx[rows], tgt[rows])
        opt.zero_grad()
        loss.backward()
        sync_gradients(model, groups)
        opt.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
    torch.save({"losses": losses, "state": model.state_dict()}, Path(folder) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("replicas")
    spawn(_worker, WORLD, str(folder), threads=1, start_method="fork")
    return [torch.load(folder / f"rank{r}.pt") for r in range(WORLD)]


def test_two_replicas_of_two_shards_match_one_process(results) -> None:
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    attach_local_bias_updates(model, opt)
    losses = []
    for idx, tgt in _batches():
        loss = model(idx, tgt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    state = model.state_dict()
    assert state["moe.router.expert_bias"].abs().sum() > 0
    for rank, result in enumerate(results):
        torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(losses), rtol=1e-5, atol=1e-5)
        L = 4 // P
        for key, value in state.items():
            if ".experts." in key:
                value = value[(rank % P) * L:(rank % P + 1) * L]
            torch.testing.assert_close(result["state"][key], value, rtol=1e-5, atol=1e-5,
                                       msg=lambda m, key=key, rank=rank: f"rank {rank} {key}: {m}")
