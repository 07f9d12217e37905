"""Finding dataset files: an explicit path, else $MOEKIT_DATA, else a clear error with the download address."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path


def resolve_data_dir(data_dir: str | os.PathLike | None, dataset: str) -> Path:
    """The folder holding `dataset`: `data_dir` if given, else $MOEKIT_DATA/<dataset>."""
    if data_dir is not None:
        return Path(data_dir)
    root = os.environ.get("MOEKIT_DATA")
    if root is None:
        raise FileNotFoundError(
            f"no data directory for {dataset}: pass --data-dir DIR or set MOEKIT_DATA to a folder holding {dataset}/"
        )
    return Path(root) / dataset


def find_file(folder: Path, names: Sequence[str], dataset: str, url: str) -> Path:
    """The first of `names` (e.g. 'u.data', 'u.data.gz') that exists in `folder`, else a clear error."""
    for name in names:
        path = folder / name
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{dataset}: none of {', '.join(names)} found in {folder}; download it from {url}"
    )


def open_text(path: Path, encoding: str = "utf-8"):
    """Open a text file, gzip-compressed or not (by the .gz suffix)."""
    if path.suffix == ".gz":
        import gzip

        return gzip.open(path, "rt", encoding=encoding, newline="")
    return open(path, encoding=encoding, newline="")
