"""Table 1 tests from pooled sufficient statistics (issue 14): Welch's t-test,
one-way ANOVA and chi-square equal scipy on the pooled rows; table_one has them."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from healthlab import encrypted
from healthlab.data import load_cohort_sites
from healthlab.encrypted.inference import anova_from_groups
from healthlab.errors import DisclosureRefused, InvalidInput
from healthlab.receipts import verify

RTOL = 1e-10


def frames() -> dict[str, pd.DataFrame]:
    return load_cohort_sites()


def pooled() -> pd.DataFrame:
    return pd.concat(frames().values(), ignore_index=True)


def test_welch_t_test_equals_scipy() -> None:
    result = encrypted.ttest(frames(), "sbp", "sex")
    rows = pooled()
    a, b = (rows[rows.sex == s]["sbp"].dropna() for s in ("F", "M"))
    reference = stats.ttest_ind(a, b, equal_var=False)
    assert result.statistic == pytest.approx(reference.statistic, rel=RTOL)
    assert result.p_value == pytest.approx(reference.pvalue, rel=1e-8)
    assert result.df == pytest.approx(reference.df, rel=RTOL)
    assert result.estimate == pytest.approx(a.mean() - b.mean(), rel=RTOL)
    low, high = reference.confidence_interval()
    assert result.conf_int == pytest.approx((low, high), rel=1e-9)
    assert result.receipt["kind"] == "describe"


def test_a_t_test_needs_two_groups() -> None:
    sites = {
        k: f.assign(band=np.resize(["x", "y", "z"], len(f)))
        for k, f in frames().items()
    }
    with pytest.raises(InvalidInput, match="two released groups"):
        encrypted.ttest(sites, "sbp", "band")
    result = encrypted.ttest(sites, "sbp", "band", groups=["x", "z"])
    rows = pd.concat(sites.values())
    reference = stats.ttest_ind(
        rows[rows.band == "x"].sbp, rows[rows.band == "z"].sbp, equal_var=False
    )
    assert result.statistic == pytest.approx(reference.statistic, rel=RTOL)


def test_chi_square_equals_scipy() -> None:
    rows = pooled()
    for correction in (True, False):
        result = encrypted.chi2_test(
            frames(), "smoker", "cvd_event_10y", correction=correction
        )
        table = pd.crosstab(rows.smoker.astype(str), rows.cvd_event_10y.astype(str))
        statistic, p, dof, _ = stats.chi2_contingency(table, correction=correction)
        assert result.statistic == pytest.approx(statistic, rel=RTOL)
        assert result.p_value == pytest.approx(p, rel=1e-8)
        assert result.df == dof


def test_one_way_anova_equals_scipy() -> None:
    sites = {
        k: f.assign(band=np.resize(["x", "y", "z"], len(f)))
        for k, f in frames().items()
    }
    rows = pd.concat(sites.values())
    grouped = encrypted.describe(sites, ["sbp"], by="band")
    n, mean, var = (
        [grouped.loc[s, (b, "sbp")] for b in ("x", "y", "z")]
        for s in ("count", "mean", "var")
    )
    result = anova_from_groups(n, mean, var)
    reference = stats.f_oneway(*(g.sbp for _, g in rows.groupby("band")))
    assert result.statistic == pytest.approx(reference.statistic, rel=RTOL)
    assert result.p_value == pytest.approx(reference.pvalue, rel=1e-8, abs=1e-300)


def test_table_one_has_p_values_equal_to_scipy() -> None:
    table = encrypted.table_one(
        frames(),
        ["age", "sbp"],
        ["smoker"],
        by="sex",
        population=["age", "sbp", "smoker", "sex"],
    )
    assert list(table.columns) == ["F", "M", "overall", "p"]
    rows = pooled()
    welch = stats.ttest_ind(
        rows[rows.sex == "F"].age, rows[rows.sex == "M"].age, equal_var=False
    )
    expected = "<0.001" if welch.pvalue < 0.001 else f"{welch.pvalue:.3f}"
    assert table.loc["age, mean (SD)", "p"] == expected
    chi = stats.chi2_contingency(pd.crosstab(rows.smoker, rows.sex))[1]
    assert table.loc["smoker = 0, n (%)", "p"] == (
        "<0.001" if chi < 0.001 else f"{chi:.3f}"
    )
    assert table.loc["smoker = 1, n (%)", "p"] == ""


# ------------------------------------------------------------------ quantiles
def test_quantiles_bracket_numpy_at_the_resolution() -> None:
    rng = np.random.default_rng(5)
    frames_ = {f"s{i}": pd.DataFrame({"x": rng.normal(50, 10, 800)}) for i in range(3)}
    rows = pd.concat(frames_.values())["x"]
    result = encrypted.quantiles(
        frames_, "x", [0.1, 0.25, 0.5, 0.75, 0.9], range=(0, 120), resolution=1
    )
    for p, row in result.iterrows():
        true = np.quantile(rows, p, method="inverted_cdf")
        assert row["lower"] <= true < row["upper"]
        if row["at_resolution"]:
            assert row["upper"] - row["lower"] == 1
    assert result["at_resolution"].all()
    assert result.n == len(rows)
    # each step is a count query: about log2(119) of them per quantile, shared
    assert len(result.receipts) <= 5 * 7 + 1
    assert result.receipt["kind"] == "quantiles"
    assert verify(result.receipt, result).ok
    assert result.receipt["parts"] == [r["receipt_hash"] for r in result.receipts]
    assert len(result.receipt["queries"]) == len(result.receipts)


def test_on_the_owners_grid_quantiles_are_finer() -> None:
    from healthlab import DisclosurePolicy, Site

    rng = np.random.default_rng(6)
    policy = DisclosurePolicy(grid={"sbp": 0.5})
    frames_ = [pd.DataFrame({"sbp": rng.normal(130, 15, 900)}) for _ in range(2)]
    sites = [Site(f"s{i}", f, policy=policy) for i, f in enumerate(frames_)]
    result = encrypted.quantiles(sites, "sbp", [0.5], range=(0, 300), resolution=0.5)
    true = np.quantile(pd.concat(frames_)["sbp"], 0.5, method="inverted_cdf")
    assert result.loc[0.5, "lower"] <= true < result.loc[0.5, "upper"]
    assert result.loc[0.5, "upper"] - result.loc[0.5, "lower"] == 0.5
    # by default (2 significant digits) 130.5 is off the grid: refused by rule
    plain = [Site(f"p{i}", f) for i, f in enumerate(frames_)]
    with pytest.raises(DisclosureRefused, match="significant digit"):
        encrypted.quantiles(plain, "sbp", [0.5], range=(0, 300), resolution=0.5)


def test_a_refused_step_leaves_the_bracket_reached() -> None:
    """site_c holds one patient aged 67: the step between 66 and 68 is refused by
    its auditor, and the third quartile is reported as [66, 68)."""
    rows = pooled()
    result = encrypted.quantiles(
        frames(), "age", [0.25, 0.5, 0.75], range=(0, 120), resolution=1
    )
    for p, row in result.iterrows():
        true = np.quantile(rows.age, p, method="inverted_cdf")
        assert row["lower"] <= true < row["upper"]
    assert not result.loc[0.75, "at_resolution"]
    assert (result.loc[0.75, "lower"], result.loc[0.75, "upper"]) == (66, 68)


def test_the_minimum_and_maximum_are_not_released() -> None:
    for q in ([0.0], [1.0], [0.5, 1.0]):
        with pytest.raises(InvalidInput, match="strictly between 0 and 1"):
            encrypted.quantiles(frames(), "age", q, range=(0, 120), resolution=1)
    rng = np.random.default_rng(8)
    wide = {f"s{i}": pd.DataFrame({"x": rng.normal(50, 10, 800)}) for i in range(2)}
    with pytest.raises(DisclosureRefused, match="must hold every row"):
        encrypted.quantiles(wide, "x", [0.5], range=(40, 200), resolution=10)


def test_describe_with_percentiles_brackets_pandas() -> None:
    """describe(percentiles=) adds each percentile's bracket per column, equal to
    quantiles() and holding numpy's inverted-cdf percentile of the pooled rows;
    the moments are unchanged."""
    rng = np.random.default_rng(12)
    parts = {
        f"s{i}": pd.DataFrame(
            {"x": rng.normal(50, 10, 700), "y": rng.gamma(2.0, 3.0, 700)}
        )
        for i in range(3)
    }
    rows = pd.concat(parts.values())
    plain = encrypted.describe(parts, ["x", "y"])
    table = encrypted.describe(
        parts,
        ["x", "y"],
        percentiles=[0.25, 0.5, 0.75],
        ranges={"x": (0, 120), "y": (0, 40)},
        resolution={"x": 1, "y": 0.5},
    )
    pd.testing.assert_frame_equal(table.loc[plain.index], plain)
    for column, step in (("x", 1.0), ("y", 0.5)):
        for p in (0.25, 0.5, 0.75):
            label = f"{100 * p:g}%"
            low = table.loc[f"{label} lower", column]
            high = table.loc[f"{label} upper", column]
            true = np.quantile(rows[column], p, method="inverted_cdf")
            assert low <= true < high
            assert high - low == step
        found = table.percentiles[column]
        assert found["at_resolution"].all()
    receipt = table.receipt
    assert receipt["parameters"]["percentiles"] == [0.25, 0.5, 0.75]
    assert receipt["parameters"]["resolution"] == {"x": 1.0, "y": 0.5}


def test_describe_percentiles_refuse_what_they_cannot_answer() -> None:
    """The minimum and maximum stay unreleased; a range must be given and hold
    every row; a site's rule leaves the bracket reached."""
    parts = frames()
    with pytest.raises(InvalidInput, match="strictly between 0 and 1"):
        encrypted.describe(
            parts, ["age"], percentiles=[0.0], ranges=(0, 120), resolution=1
        )
    with pytest.raises(InvalidInput, match="needs ranges="):
        encrypted.describe(parts, ["age"], percentiles=[0.5])
    with pytest.raises(InvalidInput, match="go with percentiles"):
        encrypted.describe(parts, ["age"], resolution=1)
    with pytest.raises(InvalidInput, match="names no value for 'bmi'"):
        encrypted.describe(
            parts,
            ["age", "bmi"],
            percentiles=[0.5],
            ranges={"age": (0, 120)},
            resolution=1,
        )
    with pytest.raises(DisclosureRefused, match="must hold every row"):
        encrypted.describe(
            parts, ["age"], percentiles=[0.5], ranges=(60, 120), resolution=1
        )
    table = encrypted.describe(
        frames(), ["age"], percentiles=[0.75], ranges=(0, 120), resolution=1
    )
    assert (table.loc["75% lower", "age"], table.loc["75% upper", "age"]) == (66, 68)
    assert not table.percentiles["age"].loc[0.75, "at_resolution"]


# ------------------------------------------------------- per-column missing
def test_missing_counts_equal_pandas() -> None:
    columns = ["age", "bmi", "cholesterol", "glucose"]
    result = encrypted.missing(frames(), columns)
    assert result["missing"].tolist() == pooled()[columns].isna().sum().tolist()
    assert (result["of"] == len(pooled())).all()
    assert result.receipt["kind"] == "missing"


def test_a_missing_count_one_site_holds_is_withheld_and_one_or_two_refused() -> None:
    data = frames()
    alone = {k: f.copy() for k, f in data.items()}
    alone["site_a"].loc[alone["site_a"].index[:5], "sbp"] = np.nan  # only site_a
    result = encrypted.missing(alone, ["sbp", "bmi"])
    assert pd.isna(result.loc["sbp", "missing"])
    assert result.suppressed == ["sbp"]
    assert result.loc["bmi", "missing"] == pooled()["bmi"].isna().sum()
    few = {k: f.copy() for k, f in data.items()}
    for f in few.values():
        f.loc[f.index[:2], "sbp"] = np.nan  # 2 per site
    with pytest.raises(DisclosureRefused, match="fewer than 3"):
        encrypted.missing(few, ["sbp"])


# ------------------------------------------------ percentiles per group
def grouped_parts(seed: int = 8, n: int = 1200) -> dict[str, pd.DataFrame]:
    """Sites whose groups (and groups of g × h) hold enough rows at every
    bisection step (the ranges' quarter points included) for the cell rule."""
    rng = np.random.default_rng(seed)
    return {
        f"s{i}": pd.DataFrame(
            {
                "x": rng.normal(50, 10, n).round(0),
                "y": rng.normal(20, 5, n),
                "g": rng.choice(["a", "b"], n),
                "h": rng.choice(["u", "v"], n),
            }
        )
        for i in range(3)
    }


@pytest.mark.parametrize("by", ["g", ["g", "h"]])
def test_describe_percentiles_by_group_bracket_numpy_per_group(
    by: str | list[str],
) -> None:
    """describe(by=, percentiles=): each released group's bracket, by bisection on
    that group's pooled counts, holds numpy's inverted-cdf percentile of the
    group's pooled rows, at the resolution; the moments are unchanged."""
    parts = grouped_parts()
    rows = pd.concat(parts.values(), ignore_index=True)
    plain = encrypted.describe(parts, ["x", "y"], by=by)
    table = encrypted.describe(
        parts,
        ["x", "y"],
        by=by,
        percentiles=[0.25, 0.5, 0.75],
        ranges={"x": (0, 120), "y": (0, 40)},
        resolution={"x": 1, "y": 1},
    )
    pd.testing.assert_frame_equal(table.loc[plain.index], plain)
    named = [by] if isinstance(by, str) else by
    assert table.suppressed == []
    assert table.percentiles is not None
    assert sorted(table.percentiles) == sorted(table.columns)
    for key in table.columns:
        *levels, column = key
        mask = np.ones(len(rows), dtype=bool)
        for name, level in zip(named, levels, strict=True):
            mask &= (rows[name] == level).to_numpy()
        values = rows.loc[mask, column]
        found = table.percentiles[key]
        reached = found["at_resolution"].to_dict()
        for p in (0.25, 0.5, 0.75):
            label = f"{100 * p:g}%"
            low = table.loc[f"{label} lower", key]
            high = table.loc[f"{label} upper", key]
            true = np.quantile(values, p, method="inverted_cdf")
            assert low <= true < high, (key, p)
            # the resolution, or wider where a site's rule stopped the bisection
            assert (high - low == 1.0) == reached[p], (key, p)
        assert found.n == len(values), key
        if isinstance(by, str):  # 1800 rows per group: every step is answered
            assert all(reached.values()), key
        assert found.receipt["parameters"]["within"] == dict(
            zip(named, levels, strict=True)
        )
        assert verify(found.receipt, found).ok
    assert verify(table.receipt, table).ok


def test_a_group_percentile_that_cannot_be_released_is_withheld_and_named() -> None:
    """Group b is held by two sites, but its low values only at one and its high
    values only at the other: every bisection step's count would be one site's,
    so the sites answer none — b's percentiles are NaN and named, a's exact."""
    rng = np.random.default_rng(4)
    parts = {
        f"s{i}": pd.DataFrame({"x": rng.normal(50, 5, 300).round(0), "g": "a"})
        for i in range(3)
    }
    parts["s0"].loc[:19, ["x", "g"]] = [[v, "b"] for v in np.arange(10.0, 30.0)]
    parts["s1"].loc[:19, ["x", "g"]] = [[v, "b"] for v in np.arange(70.0, 90.0)]
    rows = pd.concat(parts.values(), ignore_index=True)
    table = encrypted.describe(
        parts, ["x"], by="g", percentiles=[0.5], ranges=(0, 120), resolution=1
    )
    assert table.suppressed == [("b", "x")]
    assert np.isnan(table.loc["50% lower", ("b", "x")])
    assert np.isnan(table.loc["50% upper", ("b", "x")])
    assert table.loc["count", ("b", "x")] == 40, "the moments are still released"
    assert table.percentiles is not None and ("b", "x") not in table.percentiles
    a = rows.loc[rows.g == "a", "x"]
    true = np.quantile(a, 0.5, method="inverted_cdf")
    assert table.loc["50% lower", ("a", "x")] == true
    assert table.loc["50% upper", ("a", "x")] == true + 1
    # asked alone, the group's median is known only to the whole range
    alone = encrypted.quantiles(
        parts, "x", [0.5], range=(0, 120), resolution=1, within={"g": "b"}
    )
    assert alone.to_dict(orient="index")[0.5] == {
        "lower": 0.0,
        "upper": 120.0,
        "at_resolution": False,
    }
    with pytest.raises(InvalidInput, match="not among its released levels"):
        encrypted.quantiles(
            parts, "x", [0.5], range=(0, 120), resolution=1, within={"g": "c"}
        )


def test_table_one_shows_median_and_iqr_per_group() -> None:
    parts = grouped_parts(9)
    rows = pd.concat(parts.values(), ignore_index=True)
    table = encrypted.table_one(
        parts,
        ["x", "y"],
        ["h"],
        by="g",
        nonnormal=["x"],
        ranges={"x": (0, 120)},
        resolution={"x": 1},
    )

    def holds(cell: str, values: pd.Series) -> None:
        """``median [Q1, Q3]``: each the value (at the resolution: x is on it) or
        a ``lower–upper`` bracket holding numpy's percentile of the rows."""
        median, quartiles = cell.rstrip("]").split(" [")
        shown = [quartiles.split(", ")[0], median, quartiles.split(", ")[1]]
        for text, p in zip(shown, (0.25, 0.5, 0.75), strict=True):
            true = np.quantile(values, p, method="inverted_cdf")
            if "–" in text:
                low, high = (float(v) for v in text.split("–"))
                assert low <= true < high and high - low > 1, (cell, p)
            else:
                assert float(text) == true, (cell, p)

    row = table.loc["x, median [IQR]"]
    for g in ("a", "b"):
        holds(row[g], rows.loc[rows.g == g, "x"])
    holds(row["overall"], rows["x"])
    assert row["overall"].count("–") == 0, "the overall quartiles reach 1 year"
    assert row["p"] == ""
    assert "y, median [IQR]" not in table.index
    # x's mean (SD) row and its p stay; the quartiles' receipts are parts
    assert table.loc["x, mean (SD)", "p"] != ""
    assert [r["kind"] for r in table.receipts].count("quantiles") == 3
    assert verify(table.receipt, table).ok
    with pytest.raises(InvalidInput, match="among the continuous"):
        encrypted.table_one(
            parts, ["x"], by="g", nonnormal=["y"], ranges=(0, 60), resolution=1
        )
