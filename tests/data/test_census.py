"""Census-Income loader on the real file (../shared/data/census-income) and on small files made here."""

from __future__ import annotations

import gzip
import warnings
from pathlib import Path

import pytest
import torch

from moekit.data import census
from moekit.data.census import COLLEGE, URL, load_census_income, read_rows

ROWS = 3000


def raw_lines(folder: Path, n: int) -> list[str]:
    with gzip.open(folder / "census-income" / "census-income.test.gz", "rt", encoding="latin-1") as f:
        return [next(f) for _ in range(n)]


def load(folder, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_census_income(folder, **kw)


def test_whole_test_file_has_the_documented_label_counts(shared_data):
    # Counts from the data README (UCI's documentation of census-income.test).
    rows = read_rows(shared_data / "census-income" / "census-income.test.gz")
    assert len(rows) == 99_762
    assert sum(r[41] == "50000+." for r in rows) == 6_186
    assert sum(r[7] == "Never married" for r in rows) == 43_143


@pytest.mark.parametrize("group", [1, 2])
def test_slice_label_rates_and_fallback_split(shared_data, group):
    lines = raw_lines(shared_data, ROWS)
    fields = [line.rstrip("\n").split(", ") for line in lines]
    income = sum(f[-1] == "50000+." for f in fields)
    college = sum(f[4] in COLLEGE for f in fields)
    never = sum(f[7] == "Never married" for f in fields)
    with pytest.warns(UserWarning, match="no census-income.data beside census-income.test.gz"):
        data = load_census_income(shared_data / "census-income", group=group, max_rows=ROWS)
    assert data.protocol == census.PROTOCOL_TEST_ONLY.format(rows=ROWS)
    assert (len(data.train), len(data.valid), len(data.test)) == (1500, 750, 750)
    labels = torch.cat([data.train.labels_NT, data.valid.labels_NT, data.test.labels_NT])
    first = income if group == 1 else college
    assert labels.sum(0).tolist() == [first, never]
    assert data.tasks == (("income", "marital") if group == 1 else ("education", "marital"))


@pytest.mark.parametrize("group", [1, 2])
def test_no_label_leaks_into_the_features(shared_data, group):
    data = load(shared_data / "census-income", group=group, max_rows=ROWS)
    names = set(data.spec.names)
    assert {"income", "marital_stat", "instance_weight"}.isdisjoint(names)
    assert ("education" in names) == (group == 1)
    assert len(names) == 42 - (3 if group == 1 else 4)
    # No vocabulary contains a label value, so no encoded column is a renamed label.
    values = {v for f in data.spec.categorical for v in f.vocab}
    assert {"Never married", "50000+.", "- 50000."}.isdisjoint(values)
    if group == 2:
        assert not COLLEGE & values


def test_split_is_seeded(shared_data):
    a = load(shared_data / "census-income", max_rows=400, split_seed=7)
    b = load(shared_data / "census-income", max_rows=400, split_seed=7)
    c = load(shared_data / "census-income", max_rows=400, split_seed=8)
    assert torch.equal(a.test.cat_NC, b.test.cat_NC) and torch.equal(a.test.num_NF, b.test.num_NF)
    assert not torch.equal(a.test.num_NF, c.test.num_NF)


def test_official_protocol_when_the_training_file_is_present(shared_data, tmp_path):
    lines = raw_lines(shared_data, 300)
    (tmp_path / "census-income.data").write_text("".join(lines[:200]), encoding="latin-1")
    (tmp_path / "census-income.test").write_text("".join(lines[200:]), encoding="latin-1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        data = load_census_income(tmp_path)
    assert data.protocol == census.PROTOCOL_OFFICIAL
    assert (len(data.train), len(data.valid), len(data.test)) == (200, 50, 50)


def test_unseen_categories_in_validation_go_to_oov(shared_data, tmp_path):
    lines = raw_lines(shared_data, 60)
    unseen = lines[0].split(", ")
    unseen[1] = "Martian worker"  # class of worker never seen in training
    (tmp_path / "census-income.data").write_text("".join(lines[:40]), encoding="latin-1")
    test_text = ", ".join(unseen) + "".join(lines[40:42])
    (tmp_path / "census-income.test").write_text(test_text, encoding="latin-1")
    data = load(tmp_path, max_rows=None)
    column = [f.name for f in data.spec.categorical].index("class_of_worker")
    all_rows = torch.cat([data.valid.cat_NC, data.test.cat_NC])
    assert (all_rows[:, column] == 0).sum() >= 1


def test_malformed_row_names_the_file_and_line(shared_data, tmp_path):
    lines = raw_lines(shared_data, 5)
    lines[3] = ", ".join(lines[3].split(", ")[:40]) + "\n"
    path = tmp_path / "census-income.test"
    path.write_text("".join(lines), encoding="latin-1")
    with pytest.raises(ValueError, match=r"census-income.test, line 4: expected 42 fields .* got 40"):
        read_rows(path)
    bad = lines[:3] + [lines[0].replace(lines[0].split(", ")[0], "old", 1)]
    path.write_text("".join(bad), encoding="latin-1")
    with pytest.raises(ValueError, match=r"line 4: column 'age' is not a number: 'old'"):
        load(tmp_path)


def test_missing_file_names_the_file_and_the_download_address(tmp_path):
    with pytest.raises(FileNotFoundError, match="census-income.test") as error:
        load_census_income(tmp_path)
    assert URL in str(error.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_census_income(tmp_path / "nope")
    with pytest.raises(ValueError, match="group must be 1 or 2"):
        load_census_income(tmp_path, group=3)
