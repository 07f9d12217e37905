"""A user's own table for multi-task ranking: CSV, TSV or Parquet files, one row per example, one label
column per task, feature columns of either kind.

    read_table(path)            the whole file as a DataFrame of strings (Parquet: its own types)
    iter_table(path, rows)      the file in chunks, for scoring files larger than memory
    infer_feature_kinds(...)    numeric or categorical per column, when the user does not say
    label_values(...)           a task's labels, checked (binary: 0/1; regression: numbers)
    multitask_data(...)         train / validation / test splits encoded with a feature spec fitted on
                                the training rows: the one path every multi-task dataset takes
                                (Census-Income is a definition on it, `moekit.data.census`)

Every error names the file, and the line where there is one: a missing column, a binary label that
is not 0 or 1, a word in a numeric column, an empty file, a truncated or mislabelled gzip.
pandas (and pyarrow for Parquet) come with the `train` extra.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from moekit.data.tabular import FeatureSpec, MultiTaskData, TabularBatch

PARQUET_SUFFIXES = (".parquet", ".pq")
BINARY_TRUE, BINARY_FALSE = {"1", "1.0", "true", "True"}, {"0", "0.0", "false", "False"}
# A column of numbers with at most this many distinct values is read as categorical (ids, codes).
MAX_NUMERIC_CODES = 20


class TableError(ValueError):
    """A table cannot be read as asked; the message names the file (and line)."""


def table_kind(path: Path) -> str:
    """'parquet' or 'delimited' by the file name (a .gz suffix is allowed for delimited files)."""
    suffixes = [s.lower() for s in path.suffixes]
    return "parquet" if suffixes and suffixes[-1] in PARQUET_SUFFIXES else "delimited"


def delimiter_for(path: Path, delimiter: str | None) -> str | None:
    """The given delimiter, else tab for .tsv/.tab files, a comma for .csv files (pandas' fast C
    parser), else None (the Python parser sniffs , ; | and tab)."""
    if delimiter:
        return {"\\t": "\t", "tab": "\t"}.get(delimiter, delimiter)
    name = path.name.lower().removesuffix(".gz")
    if name.endswith((".tsv", ".tab")):
        return "\t"
    return "," if name.endswith(".csv") else None


def check_file(path: str | os.PathLike, what: str = "table") -> Path:
    """The file exists, is not empty, and a .gz file is gzip data (not truncated at its header)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if path.is_dir():
        raise TableError(f"{what} {path} is a folder, not a file")
    if path.stat().st_size == 0:
        raise TableError(f"{what} {path} is empty")
    if path.suffix == ".gz":
        with open(path, "rb") as f:
            if f.read(2) != b"\x1f\x8b":
                raise TableError(f"{what} {path} ends in .gz but is not gzip-compressed")
    return path


def _gzip_error(path: Path, error: Exception) -> TableError:
    return TableError(f"{path} is a truncated or corrupt gzip file ({type(error).__name__}: {error})")


def read_table(path: str | os.PathLike, columns: Sequence[str] | None = None, delimiter: str | None = None,
               max_rows: int | None = None):
    """The table as a pandas DataFrame. Delimited files are read as text (every cell a string, nothing
    guessed); Parquet keeps its column types. `columns`: those must exist (one line names the missing
    ones and the columns the file has)."""
    import pandas as pd

    path = check_file(path)
    try:
        if table_kind(path) == "parquet":
            frame = pd.read_parquet(path)
            if max_rows is not None:
                frame = frame.head(max_rows)
        else:
            sep = delimiter_for(path, delimiter)
            frame = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, na_filter=False,
                                engine="python" if sep is None else "c", nrows=max_rows)
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise _gzip_error(path, error) from None
    except UnicodeDecodeError as error:
        raise TableError(f"{path} is not UTF-8 text (byte {error.start}); is it a binary file?") from None
    except pd.errors.EmptyDataError:
        raise TableError(f"{path} is empty") from None
    except pd.errors.ParserError as error:
        raise TableError(f"{path}: {' '.join(str(error).split())}") from None
    except (OSError, ValueError) as error:
        if table_kind(path) == "parquet":
            raise TableError(f"{path} is not a readable Parquet file ({error})") from None
        raise
    if len(frame) == 0:
        raise TableError(f"{path} has a header but no rows")
    require_columns(frame, columns or (), path, delimiter)
    return frame


def iter_table(path: str | os.PathLike, chunk_rows: int, columns: Sequence[str] | None = None,
               delimiter: str | None = None) -> Iterator:
    """The table in DataFrames of at most `chunk_rows` rows: memory stays flat in the file's length."""
    import pandas as pd

    path = check_file(path)
    if table_kind(path) == "parquet":
        import pyarrow.parquet as pq

        reader = pq.ParquetFile(path)
        for batch in reader.iter_batches(batch_size=chunk_rows):
            frame = batch.to_pandas()
            require_columns(frame, columns or (), path, delimiter)
            yield frame
        return
    sep = delimiter_for(path, delimiter)
    try:
        chunks = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, na_filter=False, chunksize=chunk_rows,
                             engine="python" if sep is None else "c")
        first = True
        for frame in chunks:
            if first:
                require_columns(frame, columns or (), path, delimiter)
                first = False
            yield frame
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise _gzip_error(path, error) from None
    except pd.errors.EmptyDataError:
        raise TableError(f"{path} is empty") from None
    except pd.errors.ParserError as error:
        raise TableError(f"{path}: {' '.join(str(error).split())}") from None


def require_columns(frame, columns: Sequence[str], path: Path, delimiter: str | None = None) -> None:
    """Every one of `columns` is in `frame`; else one line naming the missing ones and the columns there are."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        have = list(frame.columns)
        hint = ""
        if len(have) == 1 and any(ch in str(have[0]) for ch in ",;|\t"):
            hint = " (one column only: is the delimiter right? pass --delimiter)"
        raise TableError(f"{path}: no column {', '.join(map(repr, missing))}; its columns are "
                         f"{', '.join(map(repr, have[:20]))}{' ...' if len(have) > 20 else ''}{hint}")


def _line(frame, row: int, path: Path) -> str:
    """Where row `row` of `frame` is in its file: 'line N' (header = line 1) or 'row N' (Parquet)."""
    index = frame.index[row]
    return f"row {index + 1}" if table_kind(path) == "parquet" else f"line {index + 2}"


def numeric_values(frame, column: str, path: Path) -> np.ndarray:
    """A numeric column as float64; a cell that is not a number names its line and value."""
    import pandas as pd

    raw = frame[column]
    values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        row = int(bad[0])
        cell = raw.iloc[row]
        what = "is empty" if str(cell).strip() == "" else f"is not a number: {cell!r}"
        raise TableError(f"{path}, {_line(frame, row, path)}: column {column!r} {what} "
                         f"(list the column with --categorical to read it as categories)")
    return values


def label_values(frame, task: str, kind: str, path: Path) -> np.ndarray:
    """A task's labels as float32: 0/1 for a binary task (true/false allowed), numbers for regression."""
    if kind == "regression":
        return numeric_values(frame, task, path).astype(np.float32)
    raw = frame[task].astype(str).str.strip()
    positive = raw.isin(BINARY_TRUE).to_numpy()
    negative = raw.isin(BINARY_FALSE).to_numpy()
    bad = np.flatnonzero(~(positive | negative))
    if bad.size:
        row = int(bad[0])
        raise TableError(f"{path}, {_line(frame, row, path)}: task {task!r} is binary but its label is "
                         f"{frame[task].iloc[row]!r} (labels of a binary task are 0 or 1; set its type to "
                         f"regression for numbers)")
    return positive.astype(np.float32)


def infer_task_type(frame, task: str) -> str:
    """'binary' when every label is 0/1 (or true/false), else 'regression'."""
    values = set(frame[task].astype(str).str.strip().unique())
    return "binary" if values <= BINARY_TRUE | BINARY_FALSE else "regression"


def infer_feature_kinds(frame, candidates: Sequence[str]) -> tuple[list[str], list[str]]:
    """(categorical, numeric): a column is numeric when every cell is a number and it has more than
    `MAX_NUMERIC_CODES` distinct values, or non-integer ones; everything else is categorical."""
    import pandas as pd

    categorical, numeric = [], []
    for column in candidates:
        values = pd.to_numeric(frame[column], errors="coerce")
        if values.notna().all() and (values.nunique() > MAX_NUMERIC_CODES or not (values % 1 == 0).all()):
            numeric.append(column)
        else:
            categorical.append(column)
    return categorical, numeric


def columns_of(frame, names: Sequence[str], numeric: Sequence[str], path: Path) -> dict[str, np.ndarray | list]:
    """The feature columns of `frame` as FeatureSpec takes them: numbers checked, categories as strings."""
    numeric = set(numeric)
    return {name: numeric_values(frame, name, path) if name in numeric else frame[name].astype(str).tolist()
            for name in names}


def multitask_data(frames: dict[str, object], paths: dict[str, Path], tasks: Sequence[str],
                   task_types: Sequence[str], categorical: Sequence[str], numeric: Sequence[str], name: str,
                   protocol: str, transforms: dict[str, str] | None = None) -> MultiTaskData:
    """Encode train / valid / test DataFrames with a feature spec fitted on the training rows only.

    `frames` and `paths` are keyed 'train', 'valid', 'test' (paths name the files in errors)."""
    spec = FeatureSpec.fit(columns_of(frames["train"], [*categorical, *numeric], numeric, paths["train"]),
                           categorical, numeric, transforms=transforms)
    for task, kind in zip(tasks, task_types, strict=True):
        if kind == "regression":  # the model learns standardised targets (see FeatureSpec.targets)
            y = label_values(frames["train"], task, kind, paths["train"]).astype(np.float64)
            spec.targets[task] = (float(y.mean()), float(y.std()) or 1.0)

    def encode(split: str) -> TabularBatch:
        frame, path = frames[split], paths[split]
        batch = spec.transform(columns_of(frame, spec.names, numeric, path))
        labels = []
        for task, kind in zip(tasks, task_types, strict=True):
            y = label_values(frame, task, kind, path)
            if task in spec.targets:
                mean, std = spec.targets[task]
                y = ((y - mean) / std).astype(np.float32)
            labels.append(y)
        batch.labels_NT = torch.from_numpy(np.stack(labels, axis=1).astype(np.float32))
        return batch

    return MultiTaskData(train=encode("train"), valid=encode("valid"), test=encode("test"), spec=spec,
                         tasks=tuple(tasks), task_types=tuple(task_types), name=name, protocol=protocol)


def split_rows(n: int, fractions: Sequence[float], seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row indices of a seeded shuffle cut into train / valid / test by `fractions` (summing to 1)."""
    order = np.random.default_rng(seed).permutation(n)
    n_train = int(round(fractions[0] * n))
    n_valid = int(round(fractions[1] * n))
    return order[:n_train], order[n_train:n_train + n_valid], order[n_train + n_valid:]
