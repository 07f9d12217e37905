"""The run folder: a second run into it, a concurrent run, --overwrite, the non-finite guard in an
epoch family, and `moekit.load` / `from_pretrained` for every family."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import moekit
from moekit.cli import main
from moekit.train.loop import NonFiniteError
from moekit.train.run import Run, RunFolderError
from tests.train.test_mtl import quiet, small, synthetic


def test_a_second_run_into_a_run_folder_is_refused_and_the_first_is_intact(tmp_path, capsys):
    data = synthetic()
    first = moekit.train.mtl.fit(small(epochs=2), tmp_path / "run", data=data, log=quiet)
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    with pytest.raises(RunFolderError, match="already holds a run; pass --resume .* or --overwrite"):
        moekit.train.mtl.fit(small(epochs=2, seed=1), tmp_path / "run", data=data, log=quiet)
    after = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    assert after == before
    # --overwrite replaces it.
    second = moekit.train.mtl.fit(small(epochs=2, seed=1), tmp_path / "run", mode="overwrite", data=data, log=quiet)
    assert second.test != first.test
    assert json.loads((tmp_path / "run/results.json").read_text())["test"] == pytest.approx(second.test)
    # A folder with other files is not a run: never emptied.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/notes.txt").write_text("keep me")
    with pytest.raises(RunFolderError, match="is not empty and holds no moekit run"):
        Run(tmp_path / "mine", "mtl", "overwrite")
    assert (tmp_path / "mine/notes.txt").read_text() == "keep me"


def test_a_concurrent_run_into_a_locked_folder_fails_at_once(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from moekit.train.run import Run
        run = Run({str(tmp_path / 'run')!r}, "mtl", "new")
        print("locked", flush=True)
        time.sleep(30)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderError, match=r"is in use by moekit pid \d+"):
            Run(tmp_path / "run", "mtl", "overwrite")
    finally:
        holder.kill()
        holder.wait()
    Run(tmp_path / "run", "mtl", "new").close()  # the lock goes with its process


def test_the_cli_refuses_with_one_line(tmp_path, capsys):
    args = ["train", "seqrec", "--no-progress", "--out", str(tmp_path / "run")]
    (tmp_path / "run").mkdir()
    (tmp_path / "run/config.json").write_text("{}")
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "already holds a run" in err
    assert main([*args, "--resume", "--overwrite"]) == 2
    assert "--resume and --overwrite exclude each other" in capsys.readouterr().err


def test_nan_gradients_stop_an_epoch_family_and_every_kept_checkpoint_is_finite(tmp_path, monkeypatch):
    """A step with a finite loss and NaN gradients (a hook on the tower's weights) stops the run before
    the update; the run folder keeps only finite weights and the message names a file that exists."""
    from moekit.models.multitask import MultiTaskModel

    data = synthetic()
    forward, calls = MultiTaskModel.forward, {"n": 0}

    def poisoned(self, cat_NC, num_NF):
        out = forward(self, cat_NC, num_NF)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 12:  # the 12th step: epoch 3 of 5 steps each (300 rows, batch 64)
                self.towers[0][-1].weight.register_hook(lambda g: g * float("nan"))
        return out

    monkeypatch.setattr(MultiTaskModel, "forward", poisoned)
    with pytest.raises(NonFiniteError) as raised:
        moekit.train.mtl.fit(small(epochs=5), tmp_path / "run", data=data, log=quiet)
    message = str(raised.value)
    assert "gradient norm became nan" in message and "at step 12; stopped before the update" in message
    named = message.rsplit("the last good checkpoint is ", 1)[1]
    assert named.endswith("step_0000002") and (tmp_path / "run/checkpoints/step_0000002").is_dir()
    monkeypatch.undo()
    from moekit.io import load_tensors

    kept = sorted((tmp_path / "run/checkpoints").glob("step_*/model.safetensors"))
    files = [tmp_path / "run/model.safetensors", *kept]
    assert len(files) == 3
    for path in files:
        assert all(torch.isfinite(t).all() for t in load_tensors(path).values() if t.is_floating_point()), path


def _families(tmp_path):
    """One tiny finished run folder per family, and a forward to compare outputs with."""
    from moekit.data.movielens import synthetic_movielens
    from moekit.train import retrieval, seqrec
    from tests.train.test_lm import TEXT, tiny_config
    from tests.train.test_seqrec import _cyclic_data, seqrec_config

    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    data = synthetic()
    moekit.train.mtl.fit(small(epochs=1), tmp_path / "mtl", data=data, log=quiet)
    seqrec.fit(seqrec_config(architecture="fame", max_len=8, hidden=16, num_layers=1, epochs=1, progress=False),
               tmp_path / "seqrec", data=_cyclic_data(), log=quiet)
    ml = synthetic_movielens(num_users=20, num_items=30, ratings_per_user=8, seed=0)
    retrieval.fit(retrieval.TwoTowerRunConfig(
        model=retrieval.TwoTowerOptions(tower="moe", dim=8, hidden=16, ffn_hidden=16, history_len=4),
        train=retrieval.TwoTowerTrainSettings(epochs=1, batch_size=16, progress=False, ks=(1,))),
        tmp_path / "two-tower", ml=ml)
    moekit.train.lm.fit(tiny_config(text, max_steps=2), tmp_path / "lm")
    inputs = {
        "mtl": lambda m: m(data.test.cat_NC, data.test.num_NF).logits["a"],
        "seqrec": lambda m: m.scores(torch.tensor([[1, 2, 3, 4]])),
        "two-tower": lambda m: m.all_item_embeddings(),
        "lm": lambda m: m(torch.tensor([[1, 2, 3]]))[0],
    }
    return inputs


def test_every_family_loads_back_with_identical_outputs(tmp_path):
    inputs = _families(tmp_path)
    for family, forward in inputs.items():
        loaded = moekit.load(tmp_path / family)
        assert loaded.family == family and loaded.config is not None
        trained_again = type(loaded.model).from_pretrained(tmp_path / family)
        with torch.no_grad():
            torch.testing.assert_close(forward(loaded.model), forward(trained_again), rtol=0, atol=0)
        # save_pretrained -> from_pretrained: a model folder of its own.
        loaded.model.save_pretrained(tmp_path / f"{family}-model")
        copy = type(loaded.model).from_pretrained(tmp_path / f"{family}-model")
        with torch.no_grad():
            torch.testing.assert_close(forward(copy), forward(loaded.model), rtol=0, atol=0)
    assert moekit.load(tmp_path / "mtl").feature_spec is not None
    assert moekit.load(tmp_path / "seqrec").items["dataset"] == "cyclic"
    assert moekit.load(tmp_path / "lm").tokenizer.kind == "byte"
    with pytest.raises(ValueError, match="holds a MultiTaskModel .* not a SASRec"):
        moekit.models.SASRec.from_pretrained(tmp_path / "mtl")


def test_a_run_of_another_family_is_named(tmp_path, capsys):
    moekit.train.mtl.fit(small(epochs=1), tmp_path / "mtl", data=synthetic(), log=quiet)
    assert main(["recommend", "--ckpt", str(tmp_path / "mtl"), "--user", "1"]) == 2
    assert "is an mtl run, not a seqrec run: use moekit eval mtl" in capsys.readouterr().err
    assert main(["retrieve", "--ckpt", str(tmp_path / "mtl"), "--user", "1"]) == 2
    assert "is an mtl run, not a two-tower run" in capsys.readouterr().err
    (tmp_path / "half/checkpoints/step_0000003").mkdir(parents=True)
    assert main(["eval", "mtl", "--ckpt", str(tmp_path / "half")]) == 2
    assert "holds no finished model (no config.json); its step folders are step_0000003" in capsys.readouterr().err


def test_a_full_disk_is_one_line_and_leaves_no_temporary_folder(tmp_path, monkeypatch, capsys):
    """A checkpoint that cannot be written (ENOSPC from the disk) names the file, stops the run, and
    leaves neither a .tmp_step folder nor a temporary file; the run's earlier checkpoints stay."""
    import errno
    import os

    real_fsync, calls = os.fsync, {"n": 0}

    def full_disk(fd):
        calls["n"] += 1
        if calls["n"] > 12:  # the first epochs' files go through, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match=r"cannot write .*: No space left on device"):
        moekit.train.mtl.fit(small(epochs=5), tmp_path / "run", data=synthetic(), log=quiet)
    monkeypatch.undo()
    leftovers = [p for p in (tmp_path / "run").rglob("*") if p.name.startswith(".") and p.name != ".lock"]
    assert leftovers == [] and list((tmp_path / "run/checkpoints").glob("step_*"))
