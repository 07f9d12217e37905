"""A short 2-process expert-parallel training run vs the same run on one process, plus its checkpoints.

A tiny MoE language model (embedding -> 2 residual MoE layers -> norm -> head) trains 6 Adam steps
on a learnable rule (next = 3 * token + 1 mod V) with aux loss, z-loss, shared experts, capacity
drops and the loss-free bias update. Rank r gets sequences [2r, 2r + 2) of each global batch of
4; the reference trains on the 4 sequences at once. Losses, final weights and expert biases must
agree at 1e-5. The run saves an expert-parallel checkpoint at step 3 and resumes from it.
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
    data_parallel,
    init_expert_parallel,
    parallelize_experts,
    sync_gradients,
)
from moekit.distributed.checkpoint import (
    load_checkpoint,
    merge_checkpoint,
    read_layout,
    reshard_checkpoint,
    save_checkpoint,
    shard_state_dict,
)
from moekit.distributed.expert_parallel import ExpertParallelGroups
from moekit.distributed.launch import spawn
from moekit.train.balancing import attach_expert_bias_updates as attach_local_bias_updates

P, V, D, SEQ, BATCH, STEPS, SAVE_AT = 2, 16, 8, 6, 4, 6, 3


class TinyMoELM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        cfg = MoEConfig(D, 12, num_experts=4, top_k=2, num_shared_experts=1, aux_loss_coef=0.01,
                        z_loss_coef=1e-3, bias_update_rate=0.01, capacity_factor=1.5)
        self.embed = nn.Embedding(V, D)
        self.layers = nn.ModuleList([MoE(cfg) for _ in range(2)])
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, V)

    def forward(self, idx_BS: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
        x_BSD = self.embed(idx_BS)
        aux = x_BSD.new_zeros(())
        for layer in self.layers:
            out = layer(x_BSD)
            x_BSD, aux = x_BSD + out.hidden_states, aux + out.aux_loss
        logits = self.head(self.norm(x_BSD))
        return F.cross_entropy(logits.view(-1, V), targets_BS.reshape(-1)) + aux


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(STEPS):
        idx = torch.randint(0, V, (BATCH, SEQ), generator=gen)
        out.append((idx, (3 * idx + 1) % V))
    return out


def _build() -> TinyMoELM:
    torch.manual_seed(0)
    return TinyMoELM()


def _train_single() -> tuple[list[float], TinyMoELM, dict]:
    model = _build()
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    attach_local_bias_updates(model, opt)
    losses, snapshot = [], None
    for step, (idx, tgt) in enumerate(_batches()):
        loss = model(idx, tgt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step + 1 == SAVE_AT:
            snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    return losses, model, snapshot


def _ep_step(model, opt, groups, idx, tgt, rank, ddp: bool = False) -> float:
    rows = slice(rank * BATCH // P, (rank + 1) * BATCH // P)
    loss = model(idx[rows], tgt[rows])
    opt.zero_grad()
    loss.backward()
    sync_gradients(model, groups, dense=not ddp)  # with DDP: only the expert shards
    opt.step()
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    return mean.item() / P


def _worker(rank: int, world: int, folder: str) -> None:
    folder = Path(folder)
    groups = init_expert_parallel(P)
    model = _build()
    parallelize_experts(model, groups)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    attach_expert_bias_updates(model, opt, groups)
    losses = []
    for step, (idx, tgt) in enumerate(_batches()):
        losses.append(_ep_step(model, opt, groups, idx, tgt, rank))
        if step + 1 == SAVE_AT:
            save_checkpoint(folder / "ckpt", model, groups, opt, extra={"step": step + 1})
    final = {k: v.clone() for k, v in model.state_dict().items()}

    # Resume from the step-3 checkpoint in a fresh model (other seed: the checkpoint must set all).
    torch.manual_seed(123)
    resumed = TinyMoELM()
    parallelize_experts(resumed, groups, broadcast=False)
    opt2 = torch.optim.Adam(resumed.parameters(), lr=3e-2)
    attach_expert_bias_updates(resumed, opt2, groups)
    extra = load_checkpoint(folder / "ckpt", resumed, groups, opt2)
    resumed_losses = [_ep_step(resumed, opt2, groups, idx, tgt, rank)
                      for idx, tgt in _batches()[extra["step"]:]]

    # The same run with torch DDP averaging the dense gradients during backward.
    model = data_parallel(parallelize_experts(_build(), groups), groups)
    opt3 = torch.optim.Adam(model.parameters(), lr=3e-2)
    attach_expert_bias_updates(model.module, opt3, groups)
    ddp_losses = [_ep_step(model, opt3, groups, idx, tgt, rank, ddp=True) for idx, tgt in _batches()]
    torch.save({"losses": losses, "final": final, "resumed_losses": resumed_losses,
                "resumed_final": resumed.state_dict(), "ddp_losses": ddp_losses,
                "ddp_final": model.module.state_dict()}, folder / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, list[dict]]:
    folder = tmp_path_factory.mktemp("ep_train")
    spawn(_worker, P, str(folder), threads=1, start_method="fork")
    return folder, [torch.load(folder / f"rank{r}.pt") for r in range(P)]


def _close(actual, expected, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{what}: {m}")


def _expert_keys(state: dict) -> list[str]:
    return [k for k in state if ".experts." in k]


def test_training_matches_single_process(run) -> None:
    _, results = run
    ref_losses, ref_model, _ = _train_single()
    assert ref_losses[-1] < ref_losses[0]  # it learns, so the comparison covers real updates
    ref_state = ref_model.state_dict()
    assert ref_state["layers.0.router.expert_bias"].abs().sum() > 0
    for rank, result in enumerate(results):
        _close(torch.tensor(result["losses"]), torch.tensor(ref_losses), f"rank {rank} losses")
        expected = shard_state_dict(ref_state, _expert_keys(ref_state), rank, P)
        for key, value in expected.items():
            _close(result["final"][key], value, f"rank {rank} {key}")


def test_ddp_for_dense_parameters_gives_the_same_run(run) -> None:
    _, results = run
    for rank, result in enumerate(results):
        _close(torch.tensor(result["ddp_losses"]), torch.tensor(result["losses"]), f"rank {rank} DDP losses")
        for key, value in result["final"].items():
            _close(result["ddp_final"][key], value, f"rank {rank} DDP {key}")


def test_resume_from_checkpoint_continues_the_run(run) -> None:
    _, results = run
    for rank, result in enumerate(results):
        _close(torch.tensor(result["resumed_losses"]), torch.tensor(result["losses"][SAVE_AT:]),
               f"rank {rank} resumed losses")
        for key, value in result["final"].items():
            _close(result["resumed_final"][key], value, f"rank {rank} resumed {key}")


def test_merge_gives_the_single_device_checkpoint(run, tmp_path) -> None:
    folder, _ = run
    _, _, snapshot = _train_single()
    merged = merge_checkpoint(folder / "ckpt")
    assert merged.keys() == snapshot.keys()
    for key, value in snapshot.items():
        _close(merged[key], value, f"merged {key}")
    model = TinyMoELM()
    model.load_state_dict(merged)  # loads into the plain single-device model

    # Re-shard 2 -> 1 -> 2: the shards come back bit-identical.
    reshard_checkpoint(folder / "ckpt", tmp_path / "p1", 1)
    reshard_checkpoint(tmp_path / "p1", tmp_path / "p2", 2)
    assert read_layout(tmp_path / "p1")["expert_parallel"] == 1
    again = merge_checkpoint(tmp_path / "p2")
    for key, value in merged.items():
        assert torch.equal(again[key], value), key


def test_wrong_layout_fails_clearly(run, tmp_path) -> None:
    folder, _ = run
    reshard_checkpoint(folder / "ckpt", tmp_path / "p1", 1)
    model = TinyMoELM()
    # Groups of a 2-way run on rank 1; nothing here communicates before the check.
    parallelize_experts(model, ExpertParallelGroups(2, 1, 2, None, None), broadcast=False)
    with pytest.raises(ValueError, match=r"saved with expert_parallel=1 but this run uses expert_parallel=2"):
        load_checkpoint(tmp_path / "p1", model, ExpertParallelGroups(2, 1, 2, None, None))
    # A shard file renamed to another rank's name is caught by its metadata.
    reshard_checkpoint(folder / "ckpt", tmp_path / "swapped", 2)
    a, b = (tmp_path / "swapped" / f"experts-0000{r}-of-00002.safetensors" for r in (0, 1))
    a.rename(tmp_path / "tmp")
    b.rename(a)
    (tmp_path / "tmp").rename(b)
    with pytest.raises(ValueError, match="holds the experts of rank 0 of 2, not rank 1 of 2"):
        load_checkpoint(tmp_path / "swapped", model, ExpertParallelGroups(2, 1, 2, None, None))
    with pytest.raises(FileNotFoundError, match="not an expert-parallel checkpoint"):
        load_checkpoint(tmp_path, model, ExpertParallelGroups(2, 1, 2, None, None))
