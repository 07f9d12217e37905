"""`moekit checkpoint merge/reshard` on a 2-shard checkpoint written without a process group.

Each rank's shard is written by `save_checkpoint` with that rank's groups (nothing communicates
while saving without a process group), from one seeded model: the merged file must equal the
unsharded model's state dict.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from moekit import MoE, MoEConfig
from moekit.cli import main
from moekit.distributed import parallelize_experts
from moekit.distributed.checkpoint import read_layout, save_checkpoint
from moekit.distributed.expert_parallel import ExpertParallelGroups
from moekit.io import load_tensors


def _model() -> nn.Module:
    torch.manual_seed(0)
    cfg = MoEConfig(8, 12, num_experts=4, top_k=2, expert_bias=True, bias_update_rate=0.1)
    return nn.Sequential(MoE(cfg), nn.Linear(8, 8), MoE(cfg))


@pytest.fixture
def sharded(tmp_path):
    full = _model()
    for rank in range(2):
        groups = ExpertParallelGroups(world_size=2, rank=rank, ep_size=2, ep_group=None, replica_group=None)
        save_checkpoint(tmp_path / "ckpt", parallelize_experts(copy.deepcopy(full), groups, broadcast=False),
                        groups, extra={"step": 7})
    return tmp_path, full.state_dict()


def _merge(src, dst) -> int:
    return main(["checkpoint", "merge", "--input", str(src), "--output", str(dst)])


def test_merge_cli_writes_the_single_device_state(sharded, capsys) -> None:
    folder, expected = sharded
    assert _merge(folder / "ckpt", folder / "m.safetensors") == 0
    merged = load_tensors(folder / "m.safetensors")
    assert merged.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(merged[key], value), key
    assert "merged 2 expert shards" in capsys.readouterr().out


def test_reshard_cli_to_four_then_merge(sharded) -> None:
    folder, expected = sharded
    assert main(["checkpoint", "reshard", "--input", str(folder / "ckpt"), "--output", str(folder / "p4"),
                 "--expert-parallel", "4"]) == 0
    layout = read_layout(folder / "p4")
    assert layout["expert_parallel"] == 4 and layout["extra"]["step"] == 7
    shard = load_tensors(folder / "p4" / "experts-00002-of-00004.safetensors")
    assert torch.equal(shard["0.experts.w_in"], expected["0.experts.w_in"][2:3])
    assert _merge(folder / "p4", folder / "m.safetensors") == 0
    assert torch.equal(load_tensors(folder / "m.safetensors")["2.experts.w_out"], expected["2.experts.w_out"])


def test_errors_are_one_line(sharded, capsys) -> None:
    folder, _ = sharded
    assert main(["checkpoint", "reshard", "--input", str(folder / "ckpt"), "--output", str(folder / "p3"),
                 "--expert-parallel", "3"]) == 2
    assert "not divisible by expert_parallel=3" in capsys.readouterr().err
    assert _merge(folder, folder / "x.safetensors") == 2
    assert "is not an expert-parallel checkpoint" in capsys.readouterr().err
