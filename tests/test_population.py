"""A declared analysis population (issue 13, point 9): ordinary work is answered,
exactly, and the declaration opens no way around the auditor.

The data: at site a, one patient lacks both bmi and glucose and a few others lack
one of them — the shape of the four-query attack. Without a declared population,
the ordinary Table 1 sequence (all rows, then the complete cases of each further
column) is refused part way; with ``population=`` every table, group, bin, cell,
correlation and regression of the study is answered and equals pandas on the
complete cases. Populations are row filters like any other: the attack through
four different populations is refused as before.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from healthlab import Site, encrypted
from healthlab.encrypted import ResultTable
from healthlab.errors import DataRefused, DisclosureRefused, InvalidInput
from healthlab.receipts import verify

COLUMNS = ["age", "sbp", "bmi", "glucose"]


def cohort(seed: int, n: int = 80) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "age": rng.normal(55, 10, n).round(1),
            "sbp": rng.normal(130, 15, n).round(1),
            "bmi": rng.normal(27, 4, n).round(1),
            "glucose": rng.normal(5.5, 1.0, n).round(2),
            "sex": rng.choice(["F", "M"], n),
            "smoker": rng.choice(["no", "yes"], n),
        }
    )


def study() -> tuple[list[Site], pd.DataFrame]:
    a = cohort(0)
    a.loc[0:4, "bmi"] = np.nan  # rows 0-4 lack bmi, rows 4-8 glucose: row 4 both
    a.loc[4:8, "glucose"] = np.nan
    b = cohort(1)
    b.loc[10:13, "bmi"] = np.nan
    c = cohort(2)
    c.loc[20:24, "glucose"] = np.nan  # two sites lack each column
    frames = [a, b, c]
    sites = [Site(n, f) for n, f in zip("abc", frames, strict=True)]
    return sites, pd.concat(frames, ignore_index=True)


def table_one(sites: list[Site], **ask: object) -> dict[str, ResultTable]:
    return {
        "age": encrypted.describe(sites, ["age", "sbp"], **ask),
        "with bmi": encrypted.describe(sites, ["age", "sbp", "bmi"], **ask),
        "with glucose": encrypted.describe(sites, ["age", "sbp", "glucose"], **ask),
        "all": encrypted.describe(sites, COLUMNS, **ask),
        "by sex": encrypted.describe(sites, COLUMNS, by="sex", **ask),
        "histogram": encrypted.histogram(sites, "age", [0, 50, 60, 200], **ask),
        "crosstab": encrypted.crosstab(sites, "sex", "smoker", **ask),
        "corr": encrypted.corr(sites, COLUMNS, **ask),
        "ols": encrypted.ols(sites, "sbp", ["age", "bmi", "glucose"], **ask).table,
    }


def test_without_a_population_the_ordinary_sequence_is_refused() -> None:
    sites, _ = study()
    with pytest.raises(DisclosureRefused, match="site a: together with"):
        table_one(sites, dropna=True)


def test_with_a_population_the_whole_table_one_is_answered_exactly() -> None:
    sites, pooled = study()
    answers = table_one(sites, population=COLUMNS)
    complete = pooled.dropna(subset=COLUMNS)
    n = len(complete)
    assert n == len(pooled) - 18  # 9 at a (row 4 lacks both), 4 at b, 5 at c
    for name in ("age", "with bmi", "with glucose", "all"):
        table = answers[name]
        assert table.loc["count"].eq(n).all(), name
        assert table.loc["missing"].eq(len(pooled) - n).all(), name
        for column in table.columns:
            assert table.loc["mean", column] == pytest.approx(
                complete[column].mean(), rel=1e-13
            )
            assert table.loc["std", column] == pytest.approx(
                complete[column].std(), rel=1e-12
            )
    by_sex = answers["by sex"]
    expected = complete.groupby("sex")["glucose"].mean()
    for sex in ("F", "M"):
        assert by_sex[(sex, "glucose")]["mean"] == pytest.approx(
            expected[sex], rel=1e-12
        )
    counts, _ = np.histogram(complete["age"], [0, 50, 60, 200])
    assert answers["histogram"]["count"].tolist() == counts.tolist()
    assert answers["histogram"].missing == len(pooled) - n
    # every answer counts the rows outside the population alike
    for name in ("by sex", "crosstab", "corr", "ols"):
        assert answers[name].missing == len(pooled) - n, name
    cross = pd.crosstab(complete["sex"], complete["smoker"])
    assert answers["crosstab"].to_numpy().tolist() == cross.to_numpy().tolist()
    assert np.allclose(answers["corr"], complete[COLUMNS].corr(), rtol=1e-12)
    design = np.column_stack(
        [np.ones(n), complete[["age", "bmi", "glucose"]].to_numpy()]
    )
    beta = np.linalg.lstsq(design, complete["sbp"].to_numpy(), rcond=None)[0]
    assert np.allclose(answers["ols"]["coef"], beta, rtol=1e-10)
    assert answers["ols"].receipt["kind"] == "ols"
    assert verify(answers["ols"].receipt, answers["ols"]).ok
    # the receipt says which population every answer summarizes
    assert answers["ols"].receipt["parameters"]["population"] == sorted(COLUMNS)


def test_the_attack_through_four_populations_is_refused() -> None:
    sites, _ = study()
    encrypted.describe(sites, ["age", "sbp"], population=["age"])
    encrypted.describe(sites, ["age", "sbp"], population=["age", "bmi"])
    encrypted.describe(sites, ["age", "sbp"], population=["age", "glucose"])
    with pytest.raises(DisclosureRefused, match="site a: together with"):
        encrypted.describe(sites, ["age", "sbp"], population=["age", "bmi", "glucose"])


def test_a_population_and_then_all_rows_is_audited_like_any_subset() -> None:
    """Rows outside the population are 13 here: answering all rows after the
    population is allowed (13 >= 3). With one row outside, the population itself
    is refused (its count of rows left out would be one patient's), and so is all
    rows minus a population of two rows less."""
    sites, _ = study()
    encrypted.describe(sites, ["age"], population=COLUMNS)
    encrypted.describe(sites, ["age"])
    lone = cohort(5)
    lone.loc[3, "bmi"] = np.nan
    few = [Site("a", lone), Site("b", cohort(6))]
    with pytest.raises(DisclosureRefused, match="site a: the rows this query leaves"):
        encrypted.describe(few, ["age"], population=["age", "bmi"])
    pair = cohort(7)
    pair.loc[[3, 4], "bmi"] = np.nan
    two = [Site("a", pair), Site("b", cohort(8))]
    encrypted.describe(two, ["age"])
    with pytest.raises(DisclosureRefused, match="site a: the rows this query leaves"):
        encrypted.describe(two, ["age"], population=["age", "bmi"])


def test_a_population_names_columns() -> None:
    sites, _ = study()
    with pytest.raises(InvalidInput, match="population= names the columns"):
        encrypted.describe(sites, ["age"], population=[])
    with pytest.raises(DataRefused, match="has no column"):
        encrypted.describe(sites, ["age"], population=["weight"])
    # a column asked that is outside the population still needs dropna
    with pytest.raises(DataRefused, match="declare them in the study's population"):
        encrypted.describe(sites, ["bmi"], population=["age"])
