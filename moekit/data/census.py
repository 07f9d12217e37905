"""UCI Census-Income (KDD) with the task groups of the MMoE paper (Ma et al., KDD 2018, section 5.3).

- group 1: income > 50K, and marital status "Never married";
- group 2: education at least college (any post-secondary schooling: some college, associate,
  bachelor, master, professional school, doctorate), and marital status "Never married".

Official protocol: train on `census-income.data` (199,523 rows) and split `census-income.test`
(99,762 rows) 1:1 into validation and test with a fixed seed. When only the test file is present the
loader says so and splits its rows 50/25/25 into train/validation/test with a seeded shuffle; results on
that protocol are not comparable with published numbers, and `MultiTaskData.protocol` says which one ran.

Features: the label columns of the group (and the census income label in both groups) and the
instance weight (a sampling weight, not an attribute) are removed; continuous columns are numeric
(capital gains, losses and dividends through log1p), all others categorical.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from moekit.data.paths import find_file, open_text, resolve_data_dir
from moekit.data.table import multitask_data
from moekit.data.tabular import MultiTaskData

URL = "https://archive.ics.uci.edu/dataset/117/census+income+kdd"
TRAIN_FILES = ("census-income.data", "census-income.data.gz")
TEST_FILES = ("census-income.test", "census-income.test.gz")

# Column names in file order (census-income.names). Short, code-friendly spellings.
COLUMNS = (
    "age", "class_of_worker", "detailed_industry_recode", "detailed_occupation_recode", "education",
    "wage_per_hour", "enroll_in_edu_inst_last_wk", "marital_stat", "major_industry_code",
    "major_occupation_code", "race", "hispanic_origin", "sex", "member_of_a_labor_union",
    "reason_for_unemployment", "full_or_part_time_employment_stat", "capital_gains", "capital_losses",
    "dividends_from_stocks", "tax_filer_stat", "region_of_previous_residence",
    "state_of_previous_residence", "detailed_household_and_family_stat",
    "detailed_household_summary_in_household", "instance_weight", "migration_code_change_in_msa",
    "migration_code_change_in_reg", "migration_code_move_within_reg", "live_in_this_house_1_year_ago",
    "migration_prev_res_in_sunbelt", "num_persons_worked_for_employer", "family_members_under_18",
    "country_of_birth_father", "country_of_birth_mother", "country_of_birth_self", "citizenship",
    "own_business_or_self_employed", "fill_inc_questionnaire_for_veterans_admin", "veterans_benefits",
    "weeks_worked_in_year", "year", "income",
)
NUMERIC = ("age", "wage_per_hour", "capital_gains", "capital_losses", "dividends_from_stocks",
           "num_persons_worked_for_employer", "weeks_worked_in_year")
LOG1P = {"capital_gains": "log1p", "capital_losses": "log1p", "dividends_from_stocks": "log1p",
         "wage_per_hour": "log1p"}
_NUMERIC_INDEX = tuple(COLUMNS.index(c) for c in NUMERIC)
NEVER_MARRIED = "Never married"
INCOME_OVER_50K = "50000+."
INCOME_LABELS = ("- 50000.", INCOME_OVER_50K)
COLLEGE = frozenset({
    "Some college but no degree", "Associates degree-occup /vocational", "Associates degree-academic program",
    "Bachelors degree(BA AB BS)", "Masters degree(MA MS MEng MEd MSW MBA)",
    "Prof school degree (MD DDS DVM LLB JD)", "Doctorate degree(PhD EdD)",
})
GROUPS = {1: ("income", "marital"), 2: ("education", "marital")}
# Columns never used as features: all label sources (so neither group can leak a label) and the weight.
DROPPED = ("income", "marital_stat", "education", "instance_weight")
# Kept as features in group 1 (education is an ordinary attribute there), per the MMoE paper.
GROUP_DROPPED = {1: ("income", "marital_stat", "instance_weight"), 2: DROPPED}

PROTOCOL_OFFICIAL = "official: train = census-income.data, test file split 1:1 into validation/test"
PROTOCOL_TEST_ONLY = ("test-file-only fallback: census-income.data missing, the {rows:,} test rows shuffled "
                      "and split 50/25/25 into train/validation/test (not comparable to published numbers)")


def read_rows(path: Path, max_rows: int | None = None) -> list[list[str]]:
    """Rows of a census-income file as lists of 42 strings; a malformed row names the file and line."""
    rows = []
    with open_text(path, encoding="latin-1") as f:
        for line_no, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split(", ")
            if len(fields) != len(COLUMNS):
                raise ValueError(f"{path}, line {line_no}: expected {len(COLUMNS)} fields separated by ', ', "
                                 f"got {len(fields)}")
            for j in _NUMERIC_INDEX:
                try:
                    float(fields[j])
                except ValueError:
                    raise ValueError(f"{path}, line {line_no}: column {COLUMNS[j]!r} is not a number: "
                                     f"{fields[j]!r}") from None
            if fields[-1] not in INCOME_LABELS:
                raise ValueError(f"{path}, line {line_no}: the income label is {fields[-1]!r}, expected one of "
                                 f"{', '.join(map(repr, INCOME_LABELS))}")
            rows.append(fields)
            if max_rows is not None and len(rows) >= max_rows:
                break
    return rows


def frame(rows: list[list[str]], group: int):
    """The rows as a DataFrame of the census columns plus the group's task labels ('1' / '0')."""
    import pandas as pd

    table = pd.DataFrame(rows, columns=list(COLUMNS))
    first, marital = labels(table, group).T
    table[GROUPS[group][0]] = np.where(first, "1", "0")
    table[GROUPS[group][1]] = np.where(marital, "1", "0")
    return table


def labels(table, group: int) -> np.ndarray:
    """(N, 2) float32 labels of the group's tasks, in GROUPS[group] order."""
    marital = table["marital_stat"].to_numpy() == NEVER_MARRIED
    if group == 1:
        first = table["income"].to_numpy() == INCOME_OVER_50K
    else:
        first = table["education"].isin(COLLEGE).to_numpy()
    return np.stack([first, marital], axis=1).astype(np.float32)


def load_census_income(
    data_dir: str | os.PathLike | None = None,
    group: int = 1,
    split_seed: int = 0,
    max_rows: int | None = None,
) -> MultiTaskData:
    """Load, split and encode Census-Income for one task group (see the module docstring).

    `split_seed` fixes the split (kept apart from the training seed so seeds vary only the model).
    `max_rows` reads only the first rows of each file (demos and tests).
    """
    if group not in GROUPS:
        raise ValueError(f"group must be 1 or 2, got {group}")
    folder = resolve_data_dir(data_dir, "census-income")
    if folder.is_file():  # one file: the test file (or the sample moekit ships), no train file
        test_path, train_path = folder, None
    else:
        test_path = find_file(folder, TEST_FILES, "census-income", URL)
        train_path = next((folder / n for n in TRAIN_FILES if (folder / n).is_file()), None)
    rng = np.random.default_rng(split_seed)
    test_rows = read_rows(test_path, max_rows)
    if train_path is not None:
        train_rows = read_rows(train_path, max_rows)
        order = rng.permutation(len(test_rows))
        half = len(test_rows) // 2
        valid_rows = [test_rows[i] for i in order[:half]]
        test_rows_split = [test_rows[i] for i in order[half:]]
        protocol = PROTOCOL_OFFICIAL
    else:
        warnings.warn(f"census-income: no {TRAIN_FILES[0]} beside {test_path.name}; using the test-file-only "
                      "fallback split 50/25/25 (results are not comparable to published numbers)",
                      stacklevel=2)
        order = rng.permutation(len(test_rows))
        n_train, n_valid = len(test_rows) // 2, len(test_rows) // 4
        train_rows = [test_rows[i] for i in order[:n_train]]
        valid_rows = [test_rows[i] for i in order[n_train:n_train + n_valid]]
        test_rows_split = [test_rows[i] for i in order[n_train + n_valid:]]
        protocol = PROTOCOL_TEST_ONLY.format(rows=len(test_rows))

    dropped = set(GROUP_DROPPED[group])
    categorical = [c for c in COLUMNS if c not in dropped and c not in NUMERIC]
    numeric = [c for c in NUMERIC if c not in dropped]
    frames = {"train": frame(train_rows, group), "valid": frame(valid_rows, group),
              "test": frame(test_rows_split, group)}
    paths = {"train": train_path or test_path, "valid": test_path, "test": test_path}
    return multitask_data(frames, paths, GROUPS[group], ("binary",) * len(GROUPS[group]), categorical, numeric,
                          f"census-income group {group}", protocol, transforms=LOG1P)
