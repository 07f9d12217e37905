"""Atomic writes: the old file or the new one, never half; a failed write leaves no temporary file."""

import errno
import json
import os

import pytest

from moekit.io import atomic_write_json, atomic_write_text


def test_atomic_write_replaces_whole_files(tmp_path):
    path = tmp_path / "deep" / "folder" / "a.json"
    atomic_write_json(path, {"x": 1})
    atomic_write_json(path, {"x": 2})
    assert json.loads(path.read_text()) == {"x": 2} and os.listdir(path.parent) == ["a.json"]


def test_a_failed_write_keeps_the_old_file_and_names_the_path(tmp_path, monkeypatch):
    path = tmp_path / "report.md"
    atomic_write_text(path, "old")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match=f"cannot write {path}: No space left on device"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["report.md"]
