"""Data parallelism through the training core: two gloo processes with a global batch B take the
steps one process with batch B takes, for mtl, seqrec and two-tower (loss curves equal at 1e-5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moekit.distributed.launch import spawn


def mtl_job(out: Path | None):
    from moekit.models.multitask import MultiTaskOptions
    from moekit.train.mtl import MTLConfig, MTLTrainSettings, fit
    from tests.train.test_mtl import synthetic

    options = MultiTaskOptions(architecture="ple", embed_dim=2, expert_hidden=8, expert_dim=4, tower_widths=(4,),
                               num_specific_experts=1, num_shared_experts=2, num_levels=1)
    config = MTLConfig(model=options, train=MTLTrainSettings(epochs=3, patience=3, batch_size=64, lr=1e-2,
                                                             progress=False, loss_weighting="uncertainty",
                                                             device="cpu"))
    return fit(config, out, data=synthetic(), log=lambda m: None)


def seqrec_job(out: Path | None, loss: str):
    from moekit.train.seqrec import fit
    from tests.train.test_seqrec import _cyclic_data, seqrec_config

    config = seqrec_config(architecture="fame", loss=loss, max_len=8, hidden=16, num_layers=1, num_experts=2,
                           dropout=0.0, attn_dropout=0.0, epochs=3, patience=3, batch_size=16, lr=1e-2, seed=3,
                           progress=False, device="cpu")
    return fit(config, out, data=_cyclic_data(), log=lambda m: None)


def two_tower_job(out: Path | None):
    from moekit.data.movielens import synthetic_movielens
    from moekit.train.retrieval import TwoTowerOptions, TwoTowerRunConfig, TwoTowerTrainSettings, fit

    ml = synthetic_movielens(num_users=20, num_items=30, ratings_per_user=8, seed=0)
    # MLP towers: an MoE tower's balancing loss is computed per process (see moekit.train.parallel).
    config = TwoTowerRunConfig(model=TwoTowerOptions(tower="mlp", dim=8, hidden=16, ffn_hidden=16, history_len=4,
                                                     dropout=0.0),
                               train=TwoTowerTrainSettings(epochs=2, batch_size=16, progress=False,
                                                           extra_negatives=5, ks=(1, 5), device="cpu"))
    return fit(config, out, ml=ml)


JOBS = {"mtl": (mtl_job, (), "train_loss"), "seqrec-ce": (seqrec_job, ("ce",), "loss"),
        "seqrec-bce": (seqrec_job, ("bce",), "loss"), "two-tower": (two_tower_job, (), "loss")}


def _worker(rank: int, world: int, name: str, folder: str) -> None:
    job, args, _ = JOBS[name]
    job(Path(folder) / "ddp", *args)


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> dict[str, Path]:
    folders = {}
    for name in JOBS:
        folder = tmp_path_factory.mktemp(name)
        spawn(_worker, 2, name, str(folder), threads=1, start_method="fork")
        folders[name] = folder
    return folders


@pytest.mark.parametrize("name", list(JOBS))
def test_two_processes_take_the_steps_of_one(ddp_runs, name):
    job, args, key = JOBS[name]
    single = job(None, *args)
    ddp = json.loads((ddp_runs[name] / "ddp/results.json").read_text())
    curve_1 = [row[key] for row in single.history]
    curve_2 = [row[key] for row in ddp["history"]]
    assert len(curve_1) == len(curve_2) > 1
    assert curve_2 == pytest.approx(curve_1, abs=1e-5, rel=1e-5)
    assert ddp["test"] == pytest.approx(single.test, abs=1e-5)
    assert not list((ddp_runs[name] / "ddp").glob("seed-*"))  # one run folder, written by rank 0 alone
