"""Tests of a Table 1 from pooled sufficient statistics: Welch's t-test, one-way
ANOVA and the chi-square test of independence.

Each test is a function of released pooled results only — group counts, means and
variances from :func:`~healthlab.encrypted.describe` with ``by=``, cell counts from
:func:`~healthlab.encrypted.crosstab` — so it asks the sites nothing beyond those
queries (and meets their rules: groups one site holds are suppressed, cells of 1–2
rows refused). The statistics equal scipy's on the pooled rows (``ttest_ind(...,
equal_var=False)``, ``f_oneway``, ``chi2_contingency``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as distributions

from healthlab.encrypted.keys import KeyHolder
from healthlab.encrypted.stats import (
    SitesLike,
    combined_receipt,
    crosstab,
    describe,
)
from healthlab.encrypted.tables import ResultTable
from healthlab.errors import (
    DisclosureRefused,
    HeldByTooFewSites,
    InvalidInput,
    TooFewRows,
    TooFewSites,
)
from healthlab.receipts import Receipt
from healthlab.sites import as_sites

__all__ = [
    "TestResult",
    "anova_from_groups",
    "chi2_from_table",
    "chi2_test",
    "format_table_one",
    "quantiles",
    "table_one",
    "ttest",
    "welch_from_groups",
]


@dataclass(frozen=True)
class TestResult:
    """A test's statistic, degrees of freedom and p-value, and what it compared."""

    __test__ = False  # not a pytest class

    method: str
    statistic: float
    df: float | tuple[float, float]
    p_value: float
    estimate: float | None = None
    conf_int: tuple[float, float] | None = None
    receipt: dict[str, Any] = field(default_factory=dict, repr=False)


def _groups(grouped: pd.DataFrame, column: str) -> pd.DataFrame:
    """n, mean, var per group of a ``describe(..., by=)`` result's column."""
    rows = {}
    for group in dict.fromkeys(grouped.columns.get_level_values(0)):
        key = (group, column)
        if key not in grouped.columns:
            continue
        rows[group] = {
            "n": float(grouped.loc["count", key]),
            "mean": float(grouped.loc["mean", key]),
            "var": float(grouped.loc["var", key]),
        }
    return pd.DataFrame.from_dict(rows, orient="index")


Numbers = Sequence[float] | np.ndarray | pd.Series


def welch_from_groups(
    n: Numbers, mean: Numbers, var: Numbers, alpha: float = 0.05
) -> TestResult:
    """Welch's t-test of two groups from their n, means and variances."""
    (n1, n2), (m1, m2), (v1, v2) = (np.asarray(v, dtype=float) for v in (n, mean, var))
    if min(n1, n2) < 2:
        raise InvalidInput("each group needs at least 2 rows for a t-test")
    s1, s2 = v1 / n1, v2 / n2
    se = float(np.sqrt(s1 + s2))
    t = (m1 - m2) / se
    df = (s1 + s2) ** 2 / (s1**2 / (n1 - 1) + s2**2 / (n2 - 1))
    p = float(2 * distributions.t.sf(abs(t), df))
    half = float(distributions.t.ppf(1 - alpha / 2, df)) * se
    diff = float(m1 - m2)
    return TestResult(
        "Welch's t-test", float(t), float(df), p, diff, (diff - half, diff + half)
    )


def anova_from_groups(n: Numbers, mean: Numbers, var: Numbers) -> TestResult:
    """One-way ANOVA (F test) of two or more groups from their n, means, variances."""
    counts, means, variances = (np.asarray(v, dtype=float) for v in (n, mean, var))
    k, total = counts.size, counts.sum()
    grand = float((counts * means).sum() / total)
    between = float((counts * (means - grand) ** 2).sum())
    within = float(((counts - 1) * variances).sum())
    df1, df2 = k - 1, total - k
    f = (between / df1) / (within / df2)
    p = float(distributions.f.sf(f, df1, df2))
    return TestResult("one-way ANOVA", float(f), (float(df1), float(df2)), p)


def chi2_from_table(table: pd.DataFrame, correction: bool = True) -> TestResult:
    """The chi-square test of independence of a table of counts (scipy's
    ``chi2_contingency``; Yates' correction for a 2 × 2 table when ``correction``)."""
    values = table.to_numpy(dtype=float, na_value=np.nan)
    if not np.all(np.isfinite(values)):
        raise DisclosureRefused(
            "the table has withheld cells (<NA>): its chi-square test cannot be "
            "computed; merge levels"
        )
    statistic, p, dof, _ = distributions.chi2_contingency(values, correction=correction)
    return TestResult("chi-square test", float(statistic), float(dof), float(p))


def ttest(
    sites: SitesLike,
    column: str,
    by: str,
    *,
    groups: Sequence[str] | None = None,
    researcher: str | None = None,
    keys: KeyHolder | None = None,
    dropna: bool = False,
    population: Sequence[str] | None = None,
    alpha: float = 0.05,
) -> TestResult:
    """Welch's t-test of ``column`` between two levels of ``by`` (``groups=`` picks
    two when ``by`` has more), from one pooled ``describe(..., by=by)``; the
    estimate is the first group's mean minus the second's, with its CI."""
    grouped = describe(
        sites,
        [column],
        by=by,
        researcher=researcher,
        keys=keys or KeyHolder(),
        dropna=dropna,
        population=population,
    )
    table = _groups(grouped, column)
    chosen = list(groups) if groups is not None else list(table.index)
    if len(chosen) != 2 or not set(chosen) <= set(table.index):
        raise InvalidInput(
            f"a t-test compares two released groups of {by!r} "
            f"({list(table.index)}); name them with groups="
        )
    rows = table.loc[chosen]
    result = welch_from_groups(rows["n"], rows["mean"], rows["var"], alpha)
    return TestResult(
        result.method,
        result.statistic,
        result.df,
        result.p_value,
        result.estimate,
        result.conf_int,
        grouped.receipt,
    )


def chi2_test(
    sites: SitesLike,
    row: str,
    col: str,
    *,
    correction: bool = True,
    researcher: str | None = None,
    keys: KeyHolder | None = None,
    dropna: bool = False,
    population: Sequence[str] | None = None,
) -> TestResult:
    """The chi-square test of independence of ``row`` and ``col`` from one pooled
    :func:`crosstab`."""
    table = crosstab(
        sites,
        row,
        col,
        researcher=researcher,
        keys=keys or KeyHolder(),
        dropna=dropna,
        population=population,
    )
    result = chi2_from_table(table, correction)
    return TestResult(
        result.method,
        result.statistic,
        result.df,
        result.p_value,
        receipt=table.receipt,
    )


def format_table_one(
    overall: pd.DataFrame,
    grouped: pd.DataFrame,
    counts: Mapping[str, pd.DataFrame] | None = None,
    *,
    digits: int = 1,
    p_values: bool = False,
    medians: Mapping[Any, pd.DataFrame | None] | None = None,
) -> pd.DataFrame:
    """A paper's Table 1 from pooled results: mean (SD) and n (%) per group.

    ``medians`` (optional) maps ``column`` (overall) and ``(group, column)`` to
    :func:`quantiles` of 0.25, 0.5 and 0.75 (``None``: withheld): a row
    ``"{column}, median [IQR]"`` follows the column's mean (SD), each value the
    bracket's lower end when it reached the resolution (the value itself, for
    values on the resolution's grid), else ``lower–upper``.

    ``overall`` and ``grouped`` are ``encrypted.describe`` results without and with
    ``by=`` (same columns); ``counts`` maps a categorical variable to its
    ``encrypted.crosstab(sites, variable, by)``. Columns: each group, then
    ``overall``; with ``p_values``, ``p``: Welch's t-test (two groups) or one-way
    ANOVA (more) for a continuous variable, the chi-square test for a categorical
    one (on its first row). The ``n`` row counts the rows summarized for the
    continuous variables; each categorical variable's percentages are of its own
    table.
    """
    groups = list(dict.fromkeys(str(g) for g in grouped.columns.get_level_values(0)))
    columns = [str(c) for c in overall.columns]
    table: dict[str, dict[str, str]] = {"n": {}}
    for g in groups:
        table["n"][g] = f"{_at(grouped, 'count', (g, columns[0])):.0f}"
    table["n"]["overall"] = f"{_at(overall, 'count', columns[0]):.0f}"
    for c in columns:
        row = table[f"{c}, mean (SD)"] = {}
        for g in groups:
            mean = _at(grouped, "mean", (g, c))
            sd = _at(grouped, "std", (g, c))
            row[g] = f"{mean:.{digits}f} ({sd:.{digits}f})"
        mean, sd = _at(overall, "mean", c), _at(overall, "std", c)
        row["overall"] = f"{mean:.{digits}f} ({sd:.{digits}f})"
        if p_values:
            stats = _groups(grouped, c)
            test = (welch_from_groups if len(stats) == 2 else anova_from_groups)(
                stats["n"], stats["mean"], stats["var"]
            )
            row["p"] = _p(test.p_value)
        if medians is not None and c in medians:
            row = table[f"{c}, median [IQR]"] = {}
            for g in groups:
                row[g] = _median_iqr(medians.get((g, c)))
            row["overall"] = _median_iqr(medians[c])
            if p_values:
                row["p"] = ""
    for name, cross in (counts or {}).items():
        cross = cross.rename(columns=str)
        first = True
        # a cell the sites withheld (<NA>) is shown as such; a share whose total
        # includes one cannot be computed, so it is not shown either
        complete = cross.notna().all(axis=0)
        totals = cross.sum(axis=0)
        everyone = cross.to_numpy(dtype=float, na_value=np.nan).sum()
        for level in cross.index:
            row = table[f"{name} = {level}, n (%)"] = {}
            for g in groups:
                value = cross.loc[level, g] if g in cross.columns else 0
                row[g] = _count_cell(
                    value, totals.get(g, 0), bool(complete.get(g, True))
                )
            value = cross.loc[level].sum(min_count=len(cross.columns))
            whole = bool(np.isfinite(everyone))
            row["overall"] = _count_cell(value, everyone if whole else 0, whole)
            if p_values:
                if first:
                    try:
                        row["p"] = _p(chi2_from_table(cross).p_value)
                    except DisclosureRefused:
                        row["p"] = "withheld"
                else:
                    row["p"] = ""
            first = False
    order = [*groups, "overall", *(["p"] if p_values else [])]
    return pd.DataFrame.from_dict(table, orient="index").fillna({"p": ""})[order]


def _median_iqr(found: pd.DataFrame | None) -> str:
    """``median [Q1, Q3]`` from a :func:`quantiles` table of 0.25, 0.5, 0.75."""
    if found is None:
        return "withheld"

    def value(p: float) -> str:
        row = found.to_dict(orient="index")[p]
        lower, upper = float(row["lower"]), float(row["upper"])
        if bool(row["at_resolution"]):
            return f"{lower:g}"
        return f"{lower:g}–{upper:g}"

    return f"{value(0.5)} [{value(0.25)}, {value(0.75)}]"


def _p(value: float) -> str:
    """A p-value as a paper prints it."""
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def _count_cell(value: Any, total: Any, complete: bool) -> str:
    """``n (share %)`` of Table 1, ``withheld`` for a cell the sites withheld, and
    ``n (share withheld)`` when the column's total includes a withheld cell."""
    if pd.isna(value):
        return "withheld"
    n = int(value)
    if not complete:
        return f"{n} (share withheld)"
    share = 100 * n / float(total) if total else 0.0
    return f"{n} ({share:.1f} %)"


def _at(frame: pd.DataFrame, row: str, column: Any) -> float:
    return float(np.asarray(frame.loc[row, column], dtype=float))


def table_one(
    sites: SitesLike,
    continuous: Sequence[str],
    categorical: Sequence[str] = (),
    *,
    by: str,
    researcher: str | None = None,
    keys: KeyHolder | None = None,
    population: Sequence[str] | None = None,
    dropna: bool = True,
    digits: int = 1,
    nonnormal: Sequence[str] = (),
    ranges: tuple[float, float] | Mapping[str, tuple[float, float]] | None = None,
    resolution: float | Mapping[str, float] | None = None,
) -> ResultTable:
    """A paper's Table 1 across sites, with p-values: mean (SD) of each
    ``continuous`` column and n (%) of each level of each ``categorical`` one, per
    level of ``by`` and overall; ``p``: Welch's t-test or one-way ANOVA, and the
    chi-square test. Declaring ``population=`` (e.g. every column named) keeps
    every query on the same rows, so the auditor answers the whole table.

    ``nonnormal`` (some of ``continuous``) adds a ``median [IQR]`` row per column,
    overall and per group, by :func:`quantiles` at ``resolution`` within
    ``ranges`` (as :func:`~healthlab.encrypted.describe`'s ``percentiles=``; of
    the rows with a value of the column, or of the declared ``population``). A
    group's quartiles whose step count cannot be released are ``withheld`` and
    named in ``.suppressed`` as ``(group, column)``.

    ``.receipt`` covers the formatted table (every query of its parts);
    ``.receipts`` are the parts' own (overall, by group, each categorical table);
    ``.suppressed`` names what they withheld (groups; ``(level, group)`` cells);
    ``.missing`` the rows left out (of the overall description).

    Examples
    --------
    >>> table_one(
    ...     sites, ["age", "sbp"], ["smoker"], by="sex", researcher=me
    ... )  # doctest: +SKIP
    """
    keys = keys or KeyHolder()
    options: dict[str, Any] = {
        "researcher": researcher,
        "keys": keys,
        "dropna": dropna,
        "population": population,
    }
    overall = describe(sites, list(continuous), **options)
    grouped = describe(sites, list(continuous), by=by, **options)
    counts = {c: crosstab(sites, c, by, **options) for c in categorical}
    medians, withheld = _medians(
        sites,
        grouped,
        list(continuous),
        list(nonnormal),
        by,
        ranges,
        resolution,
        keys,
        researcher,
        population,
    )
    table = format_table_one(
        overall, grouped, counts, digits=digits, p_values=True, medians=medians
    )
    found = [t for t in medians.values() if isinstance(t, ResultTable)]
    parts = [overall, grouped, *counts.values(), *found]
    receipt = combined_receipt(
        table,
        [p.receipt for p in parts],
        as_sites(sites),
        kind="table_one",
        parameters={
            "continuous": list(continuous),
            "categorical": list(categorical),
            "by": by,
            "dropna": dropna,
            "population": list(population or ()),
        },
    )
    return ResultTable.released(
        table,
        receipt,
        missing=overall.missing,
        suppressed=[
            *grouped.suppressed,
            *(cell for c in counts.values() for cell in c.suppressed),
            *withheld,
        ],
        receipts=[p.receipt for p in parts],
    )


def _medians(
    sites: SitesLike,
    grouped: ResultTable,
    continuous: list[str],
    nonnormal: list[str],
    by: str,
    ranges: tuple[float, float] | Mapping[str, tuple[float, float]] | None,
    resolution: float | Mapping[str, float] | None,
    keys: KeyHolder,
    researcher: str | None,
    population: Sequence[str] | None,
) -> tuple[dict[Any, ResultTable | None], list[tuple[Any, str]]]:
    """``table_one``'s quartiles of each ``nonnormal`` column: overall, and per
    released group of ``grouped`` (``None`` and named when withheld)."""
    from healthlab.encrypted.stats import percentile_args

    if not nonnormal:
        if ranges is not None or resolution is not None:
            raise InvalidInput("ranges= and resolution= go with nonnormal=[...]")
        return {}, []
    if not set(nonnormal) <= set(continuous):
        raise InvalidInput("nonnormal= names columns among the continuous ones")
    asked = percentile_args(nonnormal, [0.25, 0.5, 0.75], ranges, resolution)
    assert asked is not None
    probabilities, spans, steps = asked
    groups = list(dict.fromkeys(grouped.columns.get_level_values(0)))
    options: dict[str, Any] = {
        "researcher": researcher,
        "keys": keys,
        "dropna": True,
        "population": population,
    }
    found: dict[Any, ResultTable | None] = {}
    withheld: list[tuple[Any, str]] = []
    for c in nonnormal:
        ask = {"range": spans[c], "resolution": steps[c], **options}
        found[c] = quantiles(sites, c, probabilities, **ask)
        for g in groups:
            try:
                found[(g, c)] = quantiles(
                    sites, c, probabilities, within={by: g}, **ask
                )
            except TooFewSites:
                found[(g, c)] = None
                withheld.append((g, c))
    return found, withheld


def quantiles(
    sites: SitesLike,
    column: str,
    q: Sequence[float] = (0.25, 0.5, 0.75),
    *,
    range: tuple[float, float],
    resolution: float,
    researcher: str | None = None,
    keys: KeyHolder | None = None,
    dropna: bool = True,
    population: Sequence[str] | None = None,
    within: Mapping[str, Any] | None = None,
) -> ResultTable:
    """Pooled quantiles of ``column`` to within ``resolution``, by bisection on
    pooled counts.

    Each step is a two-bin :func:`~healthlab.encrypted.histogram` over ``range``
    (which must hold every row: the minimum and maximum are not released) split at
    a multiple of ``resolution`` — a count query under every rule of the sites:
    their grid (``resolution`` must be on it: e.g. 1 year of age by default,
    finer where the owner declares a grid), their auditor (which refuses when
    fewer than its minimum of a site's rows lie between two steps, i.e. within
    one resolution step of the answer). Returns, per probability ``p``, the
    interval ``[lower, upper)`` that holds numpy's ``quantile(x, p,
    method="inverted_cdf")`` of the pooled rows: of width ``resolution``, or wider
    where a step was refused (``at_resolution`` False: the bracket reached).

    ``within`` (``{"sex": "F"}``): the quantiles of one group's rows, one released
    level (:func:`~healthlab.encrypted.levels`) of each named column; every step
    counts that group's rows only. A step whose count is withheld (too few sites
    hold the group's rows on one side of it) is refused with
    :class:`~healthlab.errors.TooFewSites`.

    ``.n``: the pooled rows (in range) the quantiles are of; ``.receipts``: each
    step's receipt; ``.receipt``: one over the table, naming every step's query.
    """
    from healthlab.encrypted.stats import grouping_levels, histogram

    low, high = (float(v) for v in range)
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise InvalidInput("range= is (low, high), finite, low < high")
    if not (np.isfinite(resolution) and resolution > 0):
        raise InvalidInput("resolution= is a positive step")
    probabilities = [float(p) for p in q]
    if not all(0 < p < 1 for p in probabilities):
        raise InvalidInput(
            "quantiles are strictly between 0 and 1 (the minimum and maximum are "
            "single rows' values and are not released)"
        )
    steps = np.arange(np.ceil(low / resolution), np.floor(high / resolution) + 1)
    grid = [float(s * resolution) for s in steps if low < s * resolution < high]
    if not grid:
        raise InvalidInput("range= holds no multiple of resolution= inside it")
    if within:
        for name, level in within.items():
            released = grouping_levels(as_sites(sites), name, researcher)
            if str(level) not in released:
                raise InvalidInput(
                    f"within= names a level of {name!r} that is not among its "
                    "released levels (encrypted.levels)"
                )
    options: dict[str, Any] = {
        "researcher": researcher,
        "keys": keys or KeyHolder(),
        "dropna": dropna,
        "population": population,
        "within": dict(within) if within else None,
    }
    below: dict[int, int] = {}
    total: list[int] = []
    receipts: list[Receipt] = []

    def counted(edges: list[float]) -> pd.Series:
        table = histogram(sites, column, edges, **options)
        # None: the count outside is withheld, i.e. some site has rows there
        if table.outside is None or table.outside:
            raise DisclosureRefused(
                f"range= must hold every row of {column!r} (the minimum and "
                "maximum are not released); widen it"
            )
        counts = table["count"]
        if counts.isna().any():
            raise TooFewSites(
                "a bisection step's count was withheld (too few sites hold rows "
                "on one side of it); widen range= or coarsen resolution="
            )
        receipts.append(table.receipt)
        return counts

    def count_below(j: int) -> int:  # pooled rows with value < grid[j]
        if j not in below:
            below[j] = int(counts_at(j).iloc[0])
        return below[j]

    def counts_at(j: int) -> pd.Series:
        return counted([low, grid[j], high])

    # the rows in range: one bin (every row, or the range is refused)
    total[:] = [int(counted([low, high]).iloc[0])]
    if not total[0]:
        raise InvalidInput(
            f"no pooled rows of {column!r}"
            + (" in the group asked (within=)" if within else "")
            + " lie in range=: there is no quantile to find"
        )
    rows = {}
    for p in probabilities:
        needed = int(np.ceil(p * total[0]))
        first, last = 0, len(grid)  # the first j with count_below(j) >= needed
        refined = True
        while first < last:
            mid = (first + last) // 2
            try:
                enough = count_below(mid) >= needed
            except (TooFewRows, HeldByTooFewSites):
                # a site's auditor: fewer than its minimum of rows between this
                # step and one answered before, or rows between them that too few
                # sites hold — the answer is known to the bracket so far, not finer
                refined = False
                break
            if enough:
                last = mid
            else:
                first = mid + 1
        lower = grid[first - 1] if first > 0 else low
        upper = grid[last] if last < len(grid) else high
        rows[p] = {"lower": lower, "upper": upper, "at_resolution": refined}
    result = pd.DataFrame.from_dict(rows, orient="index")
    result.index.name = "q"
    receipt = combined_receipt(
        result,
        receipts,
        as_sites(sites),
        kind="quantiles",
        parameters={
            "column": column,
            "q": probabilities,
            "range": [low, high],
            "resolution": float(resolution),
            "dropna": dropna,
            "population": list(population or ()),
            **(
                {"within": {str(k): str(v) for k, v in within.items()}}
                if within
                else {}
            ),
        },
    )
    return ResultTable.released(result, receipt, n=total[0], receipts=receipts)
