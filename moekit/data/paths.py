"""Finding dataset files: an explicit path, else $MOEKIT_DATA, else data shipped with moekit, else a
clear error naming the official download address."""

from __future__ import annotations

import gzip
import io
import os
import sys
import zlib
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

ASSETS = "moekit.assets"
# dataset -> the file shipped in moekit/assets that stands in for it when no data is given
SHIPPED = {
    "census-income": "census-income.sample.gz",  # 4,000 rows of the UCI test file (CC BY 4.0)
    "text": "tinyshakespeare.txt.gz",  # TinyShakespeare (public domain)
}
SHIPPED_NOTE = {
    "census-income": "the 4,000-row Census-Income sample shipped with moekit",
    "text": "TinyShakespeare as shipped with moekit",
}


def asset_path(name: str) -> Path:
    """Path of a data file shipped in moekit/assets (present in every install)."""
    path = Path(str(resources.files(ASSETS).joinpath(name)))
    if not path.is_file():
        raise FileNotFoundError(f"moekit's shipped data file {path} is missing: reinstall moekit")
    return path


def resolve_data_dir(data_dir: str | os.PathLike | None, dataset: str, announce: bool = True) -> Path:
    """Where `dataset` is, as an absolute path: `data_dir` if given, else $MOEKIT_DATA/<dataset>,
    else the file moekit ships for it (Census-Income sample, TinyShakespeare), else an error."""
    if data_dir is not None:
        return Path(data_dir).expanduser().resolve()
    root = os.environ.get("MOEKIT_DATA")
    if root:
        return (Path(root).expanduser() / dataset).resolve()
    if dataset in SHIPPED:
        if announce:
            print(f"moekit: no --data-dir and no $MOEKIT_DATA: using {SHIPPED_NOTE[dataset]}", file=sys.stderr)
        return asset_path(SHIPPED[dataset])
    raise FileNotFoundError(
        f"no data directory for {dataset}: pass --data-dir DIR or set MOEKIT_DATA to a folder holding {dataset}/"
    )


def find_file(folder: Path, names: Sequence[str], dataset: str, url: str) -> Path:
    """The first of `names` (e.g. 'u.data', 'u.data.gz') that exists in `folder`, else a clear error."""
    if not folder.exists():
        raise FileNotFoundError(f"{dataset}: {folder} does not exist; download the data from {url}")
    for name in names:
        path = folder / name
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{dataset}: none of {', '.join(names)} found in {folder}; download it from {url}"
    )


def open_text(path: Path, encoding: str = "utf-8") -> io.StringIO:
    """A text file's contents (gzip-decompressed by the .gz suffix) as a file object. A file that is
    empty, not gzip despite its name, truncated or not in `encoding` is one error naming it."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            if raw[:2] != b"\x1f\x8b":
                raise ValueError(f"{path} ends in .gz but is not gzip-compressed")
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise ValueError(f"{path} is a truncated or corrupt gzip file ({type(error).__name__}: {error})") from None
    if not raw.strip():
        raise ValueError(f"{path} is empty")
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not {encoding} text (byte {error.start}); is it a binary file?") from None
    return io.StringIO(text, newline=None)


def read_json_file(path: Path) -> object:
    """A JSON file (gzip by the .gz suffix); malformed JSON names the file, line and column."""
    import json

    with open_text(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {error.lineno}, column {error.colno}: not valid JSON ({error.msg})") \
                from None
