"""Tabular features: categorical columns (embedded, with an out-of-vocabulary bucket) and numeric columns
(standardised with training statistics).

A `FeatureSpec` is metadata only: vocabularies and statistics, fitted on the training rows and saved
beside the model (`to_dict`/`from_dict`, JSON-safe), so serving maps raw values exactly as training did.
The model builds its own embedding tables from `vocab_sizes`.

Shape suffixes: N rows, C categorical features, F numeric features.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

OOV = "<oov>"  # index 0 of every vocabulary: values unseen in training (or rarer than min_count)
NUMERIC_TRANSFORMS = ("none", "log1p")


@dataclass(frozen=True)
class CategoricalFeature:
    """A categorical column. `vocab[0]` is the OOV bucket; value `vocab[i]` maps to index i."""

    name: str
    vocab: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.vocab or self.vocab[0] != OOV:
            raise ValueError(f"categorical feature {self.name!r}: vocab must start with the OOV bucket "
                             f"{OOV!r}")

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)


@dataclass(frozen=True)
class NumericFeature:
    """A numeric column, mapped to (transform(x) - mean) / std. log1p tames heavy tails (capital gains)."""

    name: str
    mean: float
    std: float
    transform: str = "none"

    def __post_init__(self) -> None:
        if self.transform not in NUMERIC_TRANSFORMS:
            raise ValueError(f"numeric feature {self.name!r}: transform must be one of {NUMERIC_TRANSFORMS}, "
                             f"got {self.transform!r}")
        if not (math.isfinite(self.std) and self.std > 0):
            raise ValueError(f"numeric feature {self.name!r}: std must be positive and finite, "
                             f"got {self.std}")


@dataclass
class TabularBatch:
    """Encoded rows: categorical indices (N, C) int64, numeric (N, F) float32, labels (N, T) float32."""

    cat_NC: Tensor
    num_NF: Tensor
    labels_NT: Tensor | None = None

    def __len__(self) -> int:
        return self.cat_NC.shape[0]

    def to(self, device: str | torch.device) -> TabularBatch:
        labels = None if self.labels_NT is None else self.labels_NT.to(device)
        return TabularBatch(self.cat_NC.to(device), self.num_NF.to(device), labels)

    def select(self, index: Tensor) -> TabularBatch:
        labels = None if self.labels_NT is None else self.labels_NT[index]
        return TabularBatch(self.cat_NC[index], self.num_NF[index], labels)


@dataclass
class MultiTaskData:
    """Encoded train / validation / test splits of a table with one label column per task, and the
    feature spec fitted on the training rows."""

    train: TabularBatch
    valid: TabularBatch
    test: TabularBatch
    spec: FeatureSpec
    tasks: tuple[str, ...]
    task_types: tuple[str, ...]
    """'binary' or 'regression' per task."""
    name: str
    """What the data is, for reports (e.g. 'census-income group 1')."""
    protocol: str
    """How the splits were made."""


@dataclass
class FeatureSpec:
    """Which columns are features and how each one is encoded."""

    categorical: list[CategoricalFeature] = field(default_factory=list)
    numeric: list[NumericFeature] = field(default_factory=list)
    targets: dict[str, tuple[float, float]] = field(default_factory=dict)
    """(mean, std) of each regression task's training labels: the model learns standardised targets,
    and its outputs are mapped back with these (`unscale`)."""

    def unscale(self, task: str, value):
        """A model output of `task` in the label's own units (identity for binary tasks)."""
        if task not in self.targets:
            return value
        mean, std = self.targets[task]
        return value * std + mean

    @property
    def vocab_sizes(self) -> tuple[int, ...]:
        return tuple(f.vocab_size for f in self.categorical)

    @property
    def num_numeric(self) -> int:
        return len(self.numeric)

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.categorical] + [f.name for f in self.numeric]

    @classmethod
    def fit(
        cls,
        columns: Mapping[str, Sequence],
        categorical: Sequence[str],
        numeric: Sequence[str],
        min_count: int = 1,
        transforms: Mapping[str, str] | None = None,
    ) -> FeatureSpec:
        """Vocabularies and statistics from the training rows only (never from validation or test).

        Values seen fewer than `min_count` times share the OOV bucket. Vocabularies are sorted by
        value, so the same training rows always give the same indices.
        """
        transforms = dict(transforms or {})
        unknown = sorted(set(transforms) - set(numeric))
        if unknown:
            raise ValueError(f"transforms given for columns that are not numeric features: {unknown}")
        overlap = sorted(set(categorical) & set(numeric))
        if overlap:
            raise ValueError(f"columns listed as both categorical and numeric: {overlap}")
        _check_columns(columns, [*categorical, *numeric])
        cats = []
        for name in categorical:
            counts = Counter(str(v) for v in columns[name])
            kept = sorted(v for v, c in counts.items() if c >= min_count and v != OOV)
            cats.append(CategoricalFeature(name, (OOV, *kept)))
        nums = []
        for name in numeric:
            transform = transforms.get(name, "none")
            values = _numeric_array(columns[name], name, transform)
            std = float(values.std())
            # A constant column carries no information; std 1 keeps it at 0 instead of dividing by 0.
            nums.append(NumericFeature(name, float(values.mean()), std if std > 0 else 1.0, transform))
        return cls(cats, nums)

    def transform(self, columns: Mapping[str, Sequence]) -> TabularBatch:
        """Encode raw columns: unseen categories go to index 0 (OOV), numerics are standardised."""
        _check_columns(columns, self.names)
        n = len(columns[self.names[0]]) if self.names else 0
        cat_NC = np.zeros((n, len(self.categorical)), dtype=np.int64)
        for j, feature in enumerate(self.categorical):
            index = {v: i for i, v in enumerate(feature.vocab)}
            index.pop(OOV)  # a raw value spelled like the bucket is still unseen
            cat_NC[:, j] = [index.get(str(v), 0) for v in columns[feature.name]]
        num_NF = np.zeros((n, len(self.numeric)), dtype=np.float32)
        for j, feature in enumerate(self.numeric):
            values = _numeric_array(columns[feature.name], feature.name, feature.transform)
            num_NF[:, j] = (values - feature.mean) / feature.std
        return TabularBatch(torch.from_numpy(cat_NC), torch.from_numpy(num_NF))

    def to_dict(self) -> dict:
        return {
            "categorical": [{"name": f.name, "vocab": list(f.vocab)} for f in self.categorical],
            "numeric": [{"name": f.name, "mean": f.mean, "std": f.std, "transform": f.transform}
                        for f in self.numeric],
            "targets": {task: list(stats) for task, stats in self.targets.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> FeatureSpec:
        try:
            return cls(
                [CategoricalFeature(d["name"], tuple(d["vocab"])) for d in data["categorical"]],
                [NumericFeature(d["name"], float(d["mean"]), float(d["std"]), d.get("transform", "none"))
                 for d in data["numeric"]],
                {task: (float(m), float(sd)) for task, (m, sd) in data.get("targets", {}).items()},
            )
        except (KeyError, TypeError) as error:
            raise ValueError(f"not a feature spec (missing or malformed field {error})") from error


def _check_columns(columns: Mapping[str, Sequence], names: Sequence[str]) -> None:
    missing = [name for name in names if name not in columns]
    if missing:
        raise ValueError(f"columns missing from the data: {missing}")
    lengths = {name: len(columns[name]) for name in names}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"columns have different lengths: {lengths}")


def _numeric_array(values: Sequence, name: str, transform: str) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=np.float64)
    except ValueError as error:
        raise ValueError(f"numeric feature {name!r}: {error}") from error
    if not np.isfinite(array).all():
        raise ValueError(f"numeric feature {name!r}: non-finite values at rows "
                         f"{np.flatnonzero(~np.isfinite(array))[:5].tolist()}")
    if transform == "log1p":
        if (array < 0).any():
            raise ValueError(f"numeric feature {name!r}: log1p needs values >= 0")
        array = np.log1p(array)
    return array
