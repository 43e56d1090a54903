"""Table statistics return a ResultTable (issue 14): the pandas table users know,
with typed metadata (receipt, missing, suppressed, outside, ...) that survive the
operations the module claims, and ``to_frame()`` a plain DataFrame without them."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest

from healthlab import Site, encrypted
from healthlab.encrypted import ResultTable
from healthlab.errors import DisclosureRefused
from healthlab.receipts import verify
from tests.test_pooling import cohort


def rare_region_sites() -> tuple[list[Site], pd.DataFrame]:
    frames = [cohort(10, region="east"), cohort(11), cohort(12)]
    sites = [Site(name, f) for name, f in zip("abc", frames, strict=True)]
    return sites, pd.concat(frames, ignore_index=True)


def grouped() -> ResultTable:
    sites, _ = rare_region_sites()
    return encrypted.describe(sites, ["age", "sbp"], by="region")


@pytest.mark.parametrize(
    ("operation", "derive"),
    [
        ("loc rows", lambda t: t.loc[["count", "mean"]]),
        ("loc rows and columns", lambda t: t.loc[["mean"], [("north", "age")]]),
        ("iloc", lambda t: t.iloc[:2]),
        ("round", lambda t: t.round(2)),
        ("copy", lambda t: t.copy()),
        ("transpose", lambda t: t.T),
        ("head", lambda t: t.head(3)),
        ("astype", lambda t: t.astype(float)),
    ],
)
def test_metadata_survives_what_pandas_finalizes(
    operation: str, derive: Callable[[ResultTable], pd.DataFrame]
) -> None:
    table = grouped()
    assert table.suppressed == ["east"]
    derived = derive(table)
    assert isinstance(derived, ResultTable), operation
    assert derived.receipt is table.receipt, operation
    assert derived.suppressed == ["east"], operation
    assert derived.missing == 0, operation


def test_the_receipt_covers_the_table_as_released_only() -> None:
    table = grouped()
    assert verify(table.receipt, table).ok
    rounded = table.round(0)
    assert rounded.receipt is table.receipt
    assert not verify(rounded.receipt, rounded).ok, "the rounded table is not it"


def test_to_frame_is_a_plain_frame_without_metadata() -> None:
    table = grouped()
    plain = table.to_frame()
    assert type(plain) is pd.DataFrame
    assert not hasattr(plain, "receipt") and not hasattr(plain, "suppressed")
    assert plain.attrs == {}
    pd.testing.assert_frame_equal(plain, table, check_frame_type=False)
    # a copy: changing it leaves the released table as it was
    plain.iloc[0, 0] = -1.0
    assert table.iloc[0, 0] != -1.0
    assert verify(table.receipt, table).ok


def test_a_column_is_a_plain_series_so_pandas_comparisons_hold() -> None:
    sites, pooled = rare_region_sites()
    table = encrypted.describe(sites, ["age"])
    assert type(table["age"]) is pd.Series
    expected = pooled[["age"]].describe().loc[["count", "mean", "std"]]
    pd.testing.assert_frame_equal(table.loc[["count", "mean", "std"]], expected)


def test_concat_gives_no_metadata_rather_than_a_wrong_one() -> None:
    table = grouped()
    joined = pd.concat([table, table])
    assert getattr(joined, "receipt", None) is None
    assert getattr(joined, "suppressed", None) is None


def test_every_table_statistic_carries_a_verifying_receipt() -> None:
    sites, pooled = rare_region_sites()
    results = {
        "describe": encrypted.describe(sites, ["age"]),
        "histogram": encrypted.histogram(sites, "age", [0, 50, 60, 200]),
        "crosstab": encrypted.crosstab(sites, "sex", "sex"),
        "counts": encrypted.counts(sites, "sex"),
        "missing": encrypted.missing(sites, ["age", "sbp"]),
        "corr": encrypted.corr(sites, ["age", "sbp"]),
        "cov": encrypted.cov(sites, ["age", "sbp"]),
    }
    for name, result in results.items():
        assert isinstance(result, ResultTable), name
        assert result.receipt["kind"] == ("crosstab" if name == "crosstab" else name)
        assert verify(result.receipt, result).ok, name
        assert result.missing == 0, name
        assert result.suppressed == [], name
        assert result.noise is None, name
    histogram = results["histogram"]
    assert histogram.outside == 0
    assert histogram["count"].sum() == len(pooled)
    # crosstab(x, x) arranges the one-way counts: its receipt names them
    diagonal = results["crosstab"]
    assert diagonal.receipt["parts"] == [diagonal.receipts[0]["receipt_hash"]]
    assert diagonal.receipts[0]["kind"] == "counts"
    expected = pooled["sex"].value_counts().sort_index()
    assert np.diag(diagonal.to_numpy()).tolist() == expected.tolist()


def test_histogram_counts_the_rows_outside_its_edges() -> None:
    sites, pooled = rare_region_sites()
    table = encrypted.histogram(sites, "age", [40, 60, 70])
    inside = pooled["age"].between(40, 70)
    assert table.outside == int((~inside).sum())
    assert table["count"].sum() == int(inside.sum())


def test_quantiles_refuse_a_range_when_the_rows_outside_are_withheld() -> None:
    """Rows outside the range at one site only: their count is withheld (None),
    which is not 0 — the quantiles would be of fewer rows than the column's."""
    frames = {f"s{i}": pd.DataFrame({"x": np.arange(10.0, 90.0)}) for i in range(3)}
    frames["s0"].loc[:9, "x"] = 150.0  # ten rows above the range, at s0 only
    table = encrypted.histogram(frames, "x", [0, 50, 100])
    assert table.outside is None
    with pytest.raises(DisclosureRefused, match="must hold every row"):
        encrypted.quantiles(frames, "x", [0.5], range=(0, 100), resolution=1)


def test_table_one_is_a_result_table_with_its_parts_receipts() -> None:
    frames = [cohort(20), cohort(21), cohort(22)]
    sites = [Site(name, f) for name, f in zip("abc", frames, strict=True)]
    pooled = pd.concat(frames, ignore_index=True)
    table = encrypted.table_one(sites, ["age", "sbp"], ["region"], by="sex")
    assert isinstance(table, ResultTable)
    assert verify(table.receipt, table).ok
    assert table.receipt["kind"] == "table_one"
    kinds = [r["kind"] for r in table.receipts]
    assert kinds == ["describe", "describe", "crosstab"]
    assert table.receipt["parts"] == [r["receipt_hash"] for r in table.receipts]
    assert len(table.receipt["queries"]) == sum(
        len(r["queries"]) for r in table.receipts
    )
    assert table.suppressed == [] and table.missing == 0
    assert table.loc["n", "overall"] == str(len(pooled))
