"""Checkpoint-folder config reading: the error names the file and the command."""

import json

import pytest

from moekit.io import read_checkpoint_config


def test_read_checkpoint_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model": "fame"}))
    folder, config = read_checkpoint_config(tmp_path, "train seqrec")
    assert folder == tmp_path and config == {"model": "fame"}


def test_missing_or_corrupt_config_names_the_file_and_command(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config.json not found: is .* a `moekit train dqn` checkpoint"):
        read_checkpoint_config(tmp_path, "train dqn")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        read_checkpoint_config(tmp_path, "train dqn")
