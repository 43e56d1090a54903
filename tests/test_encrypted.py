"""Encrypted statistics: results equal pandas/numpy, values the encoding cannot carry
are refused, and the protocol keeps every site's totals from everyone.

Reference data: scikit-learn's diabetes data (442 rows, original units) split into
three sites by row ranges; a million rows of N(1e6, 3) over four sites for the
cancellation-prone case. The issue's bound is 1e-9 relative; the implementation
sums exact fixed-point totals, so errors are in fact ~1e-15.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import pickle
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import replace
from functools import cache
from typing import Any

import numpy as np
import pandas as pd
import pytest
import tenseal as ts
from sklearn.datasets import load_diabetes

from healthlab import Site, encrypted
from healthlab.encrypted import (
    Aggregator,
    CKKSParams,
    Contribution,
    IntegrityError,
    KeyHolder,
    PublicContext,
    Query,
)
from healthlab.encrypted import values as every_value
from healthlab.encrypted.encoding import DIGITS, MAX_ABS, MODULUS, encode_totals
from healthlab.encrypted.keys import WeakParameters
from healthlab.encrypted.protocol import (
    Aggregate,
    SiteWork,
    decrypt_totals,
    unmask,
)
from healthlab.errors import (
    DataRefused,
    DisclosureRefused,
    InvalidInput,
    TooFewSites,
)
from healthlab.receipts import verify
from healthlab.sites import log_query

RTOL = 1e-9  # the bound for means, variances, correlations, coefficients


@cache
def diabetes() -> pd.DataFrame:
    """The 442 rows of scikit-learn's diabetes data, in original units."""
    return load_diabetes(as_frame=True, scaled=False).frame


def split(frame: pd.DataFrame, *cuts: int) -> dict[str, pd.DataFrame]:
    """Sites ``s0, s1, …`` holding the row ranges between ``cuts``."""
    bounds = [0, *cuts, len(frame)]
    return {
        f"s{i}": frame.iloc[lo:hi]
        for i, (lo, hi) in enumerate(itertools.pairwise(bounds))
    }


def thirds() -> dict[str, pd.DataFrame]:
    return split(diabetes(), 150, 300)


@pytest.fixture(scope="module")
def keys() -> KeyHolder:
    return KeyHolder()


def relative_error(actual: object, expected: object) -> float:
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    return float(np.max(np.abs(a - e) / np.abs(e)))


# ------------------------------------------------------------- vs pandas
NUMERIC = ["age", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6", "target"]


def test_describe_equals_pandas_on_diabetes(keys: KeyHolder) -> None:
    table = encrypted.describe(thirds(), NUMERIC, keys=keys)
    frame = diabetes()[NUMERIC]
    assert table.loc["count"].tolist() == [442.0] * len(NUMERIC)
    for stat in ("mean", "std", "var", "sum", "sem"):
        error = relative_error(table.loc[stat], frame.agg(stat))
        assert error <= RTOL, f"{stat}: relative error {error:.3g}"
    assert list(table.index) == ["count", "mean", "std", "var", "sum", "sem"]


@pytest.mark.parametrize("kind", ["corr", "cov"])
def test_corr_and_cov_equal_pandas_on_diabetes(keys: KeyHolder, kind: str) -> None:
    matrix = getattr(encrypted, kind)(thirds(), NUMERIC, keys=keys)
    expected = getattr(diabetes()[NUMERIC], kind)()
    assert list(matrix.index) == list(matrix.columns) == NUMERIC
    np.testing.assert_allclose(matrix.to_numpy(), expected.to_numpy(), rtol=RTOL)


def ols_reference(
    frame: pd.DataFrame, y: str, xs: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, float]:
    """Coefficients (lstsq), standard errors σ̂²(XᵀX)⁻¹ via QR, and R²."""
    design = np.column_stack([np.ones(len(frame)), frame[list(xs)].to_numpy()])
    target = frame[y].to_numpy()
    beta, *_ = np.linalg.lstsq(design, target, rcond=None)
    residual = target - design @ beta
    rss = float(residual @ residual)
    sigma2 = rss / (len(frame) - design.shape[1])
    r_inv = np.linalg.inv(np.linalg.qr(design, mode="r"))
    se = np.sqrt(sigma2 * np.sum(r_inv * r_inv, axis=1))  # diag(R⁻¹R⁻ᵀ)
    tss = float(np.sum((target - target.mean()) ** 2))
    return beta, se, 1.0 - rss / tss


@pytest.mark.parametrize(
    "xs", [["bmi"], ["age", "bmi", "bp", "s5"], ["age", "sex", "bmi", "bp", "s1", "s6"]]
)
def test_ols_equals_least_squares_on_diabetes(keys: KeyHolder, xs: list[str]) -> None:
    fit = encrypted.ols(thirds(), "target", xs, keys=keys)
    beta, se, r2 = ols_reference(diabetes(), "target", xs)
    assert list(fit.params.index) == ["Intercept", *xs]
    np.testing.assert_allclose(fit.params, beta, rtol=RTOL)
    np.testing.assert_allclose(fit.bse, se, rtol=RTOL)
    np.testing.assert_allclose(fit.tvalues, beta / se, rtol=RTOL)
    assert fit.nobs == 442
    assert fit.df_resid == 442 - len(xs) - 1
    assert relative_error(fit.rsquared, r2) <= RTOL
    # the receipted table: the same numbers, in the table's columns
    table = fit.to_frame()
    np.testing.assert_allclose(table["coef"], beta, rtol=RTOL)
    np.testing.assert_allclose(table["se"], se, rtol=RTOL)
    assert type(table) is pd.DataFrame, "to_frame() is a plain frame"
    assert fit.table.receipt == fit.receipt
    assert verify(fit.receipt, table).ok, "the receipt covers to_frame()"
    assert fit.table.missing == 0


@pytest.mark.parametrize(
    ("column", "bins", "value_range"),
    [
        ("bmi", [15.0, 20.0, 25.0, 30.0, 35.0, 45.0], None),
        ("age", 5, (19.0, 79.0)),  # 79 is the maximum: the last bin is closed
        ("bp", [70.0, 80.0, 90.0, 100.0, 110.0], None),  # some rows fall outside
        ("s5", 2, (3.0, 7.0)),
    ],
)
def test_histogram_counts_equal_numpy(
    keys: KeyHolder,
    column: str,
    bins: list[float] | int,
    value_range: tuple[float, float] | None,
) -> None:
    result = encrypted.histogram(thirds(), column, bins, range=value_range, keys=keys)
    counts, edges = np.histogram(diabetes()[column], bins=bins, range=value_range)
    assert result["count"].tolist() == counts.tolist()
    assert result["left"].tolist() == edges[:-1].tolist()
    assert result["right"].tolist() == edges[1:].tolist()
    # numpy drops the values outside the edges; the count of them is given
    column_values = diabetes()[column]
    low, high = edges[0], edges[-1]
    outside = int(((column_values < low) | (column_values > high)).sum())
    assert result.outside == outside


def test_a_histogram_with_few_rows_outside_its_edges_is_refused(
    keys: KeyHolder,
) -> None:
    """s5 runs 3.26-6.11: over (3, 6) a row or two of a site lie above 6, and their
    count would be released."""
    with pytest.raises(DisclosureRefused, match="outside the bin edges"):
        encrypted.histogram(thirds(), "s5", [3, 4, 5, 6], keys=keys)


def test_equal_bins_must_fall_on_the_default_grid(keys: KeyHolder) -> None:
    """3 bins over (3, 6.5) have edges 4.1666…: off the 2-digit grid, refused by
    rule (whatever the rows), with what to do."""
    with pytest.raises(DisclosureRefused, match="at most 2 significant digit"):
        encrypted.histogram(thirds(), "s5", 3, range=(3.0, 6.5), keys=keys)


@pytest.mark.parametrize(
    ("row", "col"), [("sex", "obese"), ("sex", "older"), ("obese", "older")]
)
def test_crosstab_equals_pandas(keys: KeyHolder, row: str, col: str) -> None:
    frame = diabetes().assign(
        obese=(diabetes()["bmi"] >= 30).map({True: "yes", False: "no"}),
        older=pd.cut(
            diabetes()["age"], [0, 40, 60, 100], labels=["<40", "40-59", "60+"]
        ),
    )
    table = encrypted.crosstab(split(frame, 150, 300), row, col, keys=keys)
    expected = pd.crosstab(frame[row].astype(str), frame[col].astype(str))
    assert list(table.index) == list(expected.index)
    assert list(table.columns) == list(expected.columns)
    assert table.to_numpy().tolist() == expected.to_numpy().tolist()


def table_one_frame() -> pd.DataFrame:
    return diabetes().assign(
        obese=(diabetes()["bmi"] >= 30).map({True: "yes", False: "no"}),
        older=pd.cut(
            diabetes()["age"], [0, 40, 60, 100], labels=["<40", "40-59", "60+"]
        ),
    )


def test_one_way_counts_equal_pandas(keys: KeyHolder) -> None:
    frame = table_one_frame()
    sites = split(frame, 150, 300)
    for column in ("sex", "obese", "older"):
        table = encrypted.counts(sites, column, keys=keys)
        expected = frame[column].astype(str).value_counts().sort_index()
        assert list(table.index) == list(expected.index)
        assert table["count"].tolist() == expected.tolist()
        assert table.receipt["kind"] == "counts"
    # crosstab(x, x) (pandas: the counts on the diagonal; it raised IndexError)
    diagonal = encrypted.crosstab(sites, "older", "older", keys=keys)
    expected = pd.crosstab(frame["older"].astype(str), frame["older"].astype(str))
    assert diagonal.to_numpy().tolist() == expected.to_numpy().tolist()


def test_describe_by_two_columns_equals_pandas(keys: KeyHolder) -> None:
    frame = table_one_frame()
    table = encrypted.describe(
        split(frame, 150, 300), ["bmi", "bp"], by=["sex", "obese"], keys=keys
    )
    grouped = frame.assign(sex=frame["sex"].astype(str)).groupby(["sex", "obese"])
    for (sex, obese), rows in grouped:
        for column in ("bmi", "bp"):
            got = table[(sex, obese, column)]
            assert got["count"] == len(rows)
            assert relative_error(got["mean"], rows[column].mean()) <= RTOL
            assert relative_error(got["std"], rows[column].std()) <= RTOL
    with pytest.raises(InvalidInput, match="distinct"):
        encrypted.describe(split(frame, 150, 300), ["bmi"], by=["sex", "sex"])


def test_ols_inference_equals_statsmodels(keys: KeyHolder) -> None:
    import statsmodels.formula.api as smf

    frame = diabetes()
    fit = encrypted.ols(split(frame, 150, 300), "bp", ["age", "bmi", "s5"], keys=keys)
    reference = smf.ols("bp ~ age + bmi + s5", frame).fit()
    assert relative_error(fit.pvalues, reference.pvalues) <= 1e-8
    ci = reference.conf_int()
    assert relative_error(fit.conf_int()[0], ci[0]) <= RTOL
    assert relative_error(fit.conf_int()[1], ci[1]) <= RTOL
    assert relative_error(fit.conf_int(0.1)[1], reference.conf_int(0.1)[1]) <= RTOL
    assert relative_error(fit.rsquared_adj, reference.rsquared_adj) <= RTOL
    assert relative_error(fit.fvalue, reference.fvalue) <= RTOL
    assert relative_error(fit.f_pvalue, reference.f_pvalue) <= 1e-8
    np.testing.assert_allclose(
        fit.cov_params().to_numpy(), reference.cov_params().to_numpy(), rtol=1e-9
    )
    assert relative_error(fit.llf, reference.llf) <= RTOL
    assert relative_error(fit.aic, reference.aic) <= RTOL
    assert relative_error(fit.bic, reference.bic) <= RTOL
    assert fit.df_model == reference.df_model and fit.df_resid == reference.df_resid
    assert relative_error(fit.ssr, reference.ssr) <= RTOL
    table = fit.to_frame()
    assert relative_error(table["P>|t|"], reference.pvalues) <= 1e-8
    assert relative_error(table["[0.025"], ci[0]) <= RTOL
    assert "OLS Regression Results" in str(fit.summary())


def test_ols_refuses_an_aliased_design_naming_the_term(keys: KeyHolder) -> None:
    frame = diabetes().assign(
        age_bmi=lambda f: f["age"] + f["bmi"],
        tenth_age=lambda f: 0.1 * f["age"],
        five=5.0,
    )
    sites = split(frame, 150, 300)
    with pytest.raises(encrypted.AliasedDesign, match=r"'age_bmi' is \(nearly\)"):
        encrypted.ols(sites, "bp", ["age", "bmi", "age_bmi"], keys=keys)
    with pytest.raises(encrypted.AliasedDesign, match="'tenth_age'"):
        encrypted.ols(sites, "bp", ["age", "tenth_age"], keys=keys)
    with pytest.raises(encrypted.AliasedDesign, match="constant"):
        encrypted.ols(sites, "bp", ["age", "five"], keys=keys)
    with pytest.raises(encrypted.AliasedDesign, match="perfect fit"):
        encrypted.ols(sites, "age_bmi", ["age", "bmi"], keys=keys)


def test_describe_by_group_equals_pandas_groupby(keys: KeyHolder) -> None:
    columns = ["age", "bmi", "target"]
    table = encrypted.describe(thirds(), columns, by="sex", keys=keys)
    groups = diabetes().groupby("sex")[columns]
    for level, frame in groups:
        label = str(level)  # levels are compared as text
        assert table.loc["count", label].tolist() == [float(len(frame))] * 3
        for stat in ("mean", "std", "var"):
            error = relative_error(table.loc[stat, label], frame.agg(stat))
            assert error <= RTOL, f"sex={label} {stat}: relative error {error:.3g}"


def test_million_large_values_equal_pandas(keys: KeyHolder) -> None:
    # N(1e6, 3): Σx² ≈ 1e18 while Σ(x - x̄)² ≈ 9e6 — a one-pass formula loses ~1e-6
    rng = np.random.default_rng(20240611)
    n = 1_000_000
    frame = pd.DataFrame({"x": rng.normal(1e6, 3.0, n), "y": rng.uniform(-1e6, 1e6, n)})
    x = frame["x"].to_numpy()
    naive = (np.sum(x * x) - np.sum(x) ** 2 / n) / (n - 1)
    assert relative_error(naive, x.var(ddof=1)) > 1e-7, "the data is the hard case"
    table = encrypted.describe(split(frame, 250_000, 500_000, 750_000), ["x", "y"])
    assert table.loc["count"].tolist() == [float(n), float(n)]
    for stat in ("mean", "std", "var"):
        error = relative_error(table.loc[stat], frame.agg(stat))
        assert error <= RTOL, f"{stat}: relative error {error:.3g}"


# ------------------------------------------------------------- refusals
def three_sites_of(values: np.ndarray) -> dict[str, pd.DataFrame]:
    frame = pd.DataFrame({"v": values})
    return split(frame, len(values) // 3, 2 * len(values) // 3)


@pytest.mark.parametrize(
    ("name", "values"),
    [
        # Σ(x - x̄)² ≈ 1e40 per site (second round) far beyond 2^91 ≈ 2.5e27
        ("1e20 spread", np.linspace(1e20, 2e20, 300)),
        # Σx = 1e30 per site: already the first round cannot carry it
        ("1e28", np.full(300, 1e28)),
        # Σx = 7 × 3.56e26 = 2.49e27 per site: just beyond 2^91 (7 rows per site, so
        # a 2-parameter ols passes the 0.33-per-row policy and meets the overflow)
        ("just beyond", np.full(21, 3.56e26)),
    ],
)
@pytest.mark.parametrize("statistic", ["describe", "corr", "ols"])
def test_totals_beyond_the_encoding_are_refused(
    keys: KeyHolder, name: str, values: np.ndarray, statistic: str
) -> None:
    sites = three_sites_of(values)
    for frame in sites.values():
        frame.insert(1, "w", np.arange(len(frame), dtype=float) % 7)
    calls: dict[str, Callable[[], object]] = {
        "describe": lambda: encrypted.describe(sites, ["v"], keys=keys),
        "corr": lambda: encrypted.corr(sites, ["w", "v"], keys=keys),
        "ols": lambda: encrypted.ols(sites, "w", ["v"], keys=keys),
    }
    with pytest.raises(DataRefused, match="beyond what the encoding carries") as caught:
        calls[statistic]()
    for site in sites:  # the totals, or the squared centre of round 2 (by rule)
        assert f"site {site}: a total reaches" in str(
            caught.value
        ) or f"site {site}: a query's centres" in str(caught.value)


def test_largest_totals_the_encoding_carries_are_exact(keys: KeyHolder) -> None:
    """First moments (round 1 of describe) up to the encoding's limit are exact;
    second moments refuse centres whose square could pass it (a centre of the
    caller's choosing must not steer the limit), so describe stops there."""
    from healthlab.encrypted.protocol import Query, run_query
    from healthlab.encrypted.stats import _moments
    from healthlab.sites import as_sites
    from tests.test_review_attacks import moments_query

    values = np.full(9, 8.0e26)  # Σx = 2.4e27 per site, just below 2^91
    assert 3 * 8.0e26 < MAX_ABS < 3 * 8.3e26
    query = moments_query("v")
    spec = query.spec
    sites = as_sites(three_sites_of(values))
    run = run_query(sites, query, _moments, keys=keys)
    assert run.totals[1:] == [9.0, 9 * 8.0e26]
    wrong = {**spec, "center": [1.0]}
    with pytest.raises(DataRefused, match="centres must be 0 for first moments"):
        run_query(sites, Query("moments", wrong, 3), _moments, keys=keys)
    with pytest.raises(DataRefused, match="rescale the column"):
        encrypted.describe(three_sites_of(values), ["v"], keys=keys)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_infinity_are_refused_at_the_site(keys: KeyHolder, bad: float) -> None:
    a = pd.DataFrame({"v": [1.5, bad, 2.5, 3.5], "w": [7.25, 8.25, bad, bad]})
    b = pd.DataFrame({"v": [4.5, 5.5, 6.5, bad], "w": [9.25, 10.25, 11.25, 12.25]})
    c = pd.DataFrame({"v": [7.5, 8.5, 9.5, 10.5], "w": [1.25, 2.25, 3.25, 4.25]})
    with pytest.raises(DataRefused) as caught:
        encrypted.describe({"a": a, "b": b, "c": c}, ["v", "w"], keys=keys)
    message = str(caught.value)
    assert message.startswith("2 sites refused the query")
    # the columns, never how many rows: counts below the threshold stay at the site
    assert "site a has missing or infinite values in 'v', 'w';" in message
    assert "site b has missing or infinite values in 'v';" in message
    assert " rows)" not in message and ": 1" not in message and ": 2" not in message
    assert "site c" not in message
    for value in ("1.5", "2.5", "7.25", "9.25", "nan"):
        assert value not in message, f"{value!r} in {message!r}"


def test_dropna_drops_and_counts_missing_rows(keys: KeyHolder) -> None:
    frame = diabetes()[["age", "bmi", "bp"]].copy()
    # at least 3 rows left out at each site (fewer would be a released count of
    # one or two patients, refused)
    frame.loc[[3, 7, 160, 161, 400, 410], "bmi"] = np.nan
    frame.loc[[3, 170, 420], "bp"] = np.inf
    frame.loc[[5], "age"] = -np.inf
    sites = split(frame, 150, 300)
    complete = frame.replace([np.inf, -np.inf], np.nan).dropna()
    assert len(frame) - len(complete) == 9
    table = encrypted.describe(sites, ["age", "bmi", "bp"], dropna=True, keys=keys)
    assert table.loc["missing"].tolist() == [9.0, 9.0, 9.0]
    assert table.loc["count"].tolist() == [float(len(complete))] * 3
    for stat in ("mean", "std"):
        error = relative_error(table.loc[stat], complete.agg(stat))
        assert error <= RTOL, f"{stat}: relative error {error:.3g}"
    # the bmi histogram over these same sites would differ from the complete cases
    # by the patients whose bp or age alone is not finite (one or two per site):
    # the auditor refuses it
    with pytest.raises(DisclosureRefused, match=r"together with|leaves out"):
        encrypted.histogram(sites, "bmi", [15, 25, 35, 45], dropna=True, keys=keys)


def test_a_histogram_drops_only_its_own_columns_missing_rows(keys: KeyHolder) -> None:
    frame = diabetes()[["age", "bmi", "bp"]].copy()
    frame.loc[[3, 4, 5, 160, 161, 162, 400, 401, 402], "bmi"] = np.nan
    frame.loc[[3, 170, 420], "bp"] = np.inf
    sites = split(frame, 150, 300)
    # a histogram asks for one column: only that column's missing rows are dropped
    hist = encrypted.histogram(sites, "bmi", [15, 25, 35, 45], dropna=True, keys=keys)
    assert hist.missing == 9
    counts, _ = np.histogram(frame["bmi"].dropna(), [15, 25, 35, 45])
    assert hist["count"].tolist() == counts.tolist()


# ------------------------------------------------------ protocol security
def load_context(public: PublicContext) -> ts.Context:
    return ts.context_from(public.data)


@pytest.mark.parametrize("which", ["public", "evaluation"])
def test_contexts_sent_out_hold_no_secret_key(keys: KeyHolder, which: str) -> None:
    public = keys.public_context() if which == "public" else keys.evaluation_context()
    context = load_context(public)
    assert not context.is_private()
    assert not context.has_secret_key()
    vector = ts.ckks_vector(context, [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="secret_key"):
        vector.decrypt()
    assert public.load().is_private() is False


def test_public_context_with_a_secret_key_is_refused() -> None:
    context = ts.context(
        ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 40, 60]
    )
    leaked = PublicContext(
        data=context.serialize(save_secret_key=True), params=CKKSParams()
    )
    with pytest.raises(IntegrityError, match="must not carry the secret key"):
        leaked.load()
    with pytest.raises(IntegrityError, match="must not carry the secret key"):
        Aggregator(leaked)


def test_key_holder_cannot_be_pickled_or_printed_with_its_key(keys: KeyHolder) -> None:
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(keys)
    assert repr(keys).startswith("KeyHolder(CKKSParams(poly_modulus_degree=8192")
    assert len(repr(keys)) < 200


TOTALS = 200  # totals per site in the hand-driven protocol runs below


def site_totals(names: Sequence[str]) -> dict[str, list[float]]:
    rng = np.random.default_rng(17)
    return {name: rng.normal(0.0, 1e6, TOTALS).tolist() for name in names}


def contribute(
    names: Sequence[str],
    public: PublicContext,
    totals: dict[str, list[float]],
    query: Query | None = None,
) -> list[Contribution]:
    """Run the site side of one query by hand; return every site's contribution."""
    query = query or Query("custom", {"what": "test totals"}, TOTALS)
    sites = [Site(name, pd.DataFrame({"x": [1.0, 2.0, 3.0]})) for name in names]

    def compute(
        site: Site, _: Query
    ) -> tuple[list[float], dict[str, list[np.ndarray]]]:
        return totals[site.name], {"x": [np.ones(3, dtype=bool)]}

    query = replace(query, participants=tuple(sorted(s.participant for s in sites)))
    log_query(sites, query.hash, None)  # what prepare_query does before asking
    work = [SiteWork(site, query, None, compute) for site in sites]
    peers = {site.name: site.mask_public_key for site in sites}
    announced = [w.announce(peers) for w in work]
    for w in work:
        w.count_holders(peers, announced)
    contributions = [w.contribute(peers, public) for w in work]
    _SESSIONS[query.hash + public.fingerprint] = (
        work,
        {a.site: a for a in announced},
        contributions,
    )
    return contributions


#: the sites' side of each query run by hand: (work, announcements, contributions)
_SESSIONS: dict[str, tuple[list[SiteWork], dict[str, Any], list[Contribution]]] = {}


def open_sum(keys: KeyHolder, aggregate: Aggregate) -> list[float]:
    """The rest of the protocol by hand: the summed sites reveal their shares, the
    key holder unmasks and decrypts."""
    work, announced, sent = _SESSIONS[aggregate.query_hash + aggregate.fingerprint]
    survivors = sorted(aggregate.sites)
    by_site = {c.site: c for c in sent}
    reveals = [
        w.reveal(
            survivors,
            {s: by_site[s].confirms.get(w.site.name, "") for s in survivors},
        )
        for w in work
        if w.site.name in survivors
    ]
    return decrypt_totals(keys, aggregate, unmask(aggregate, announced, reveals))


def test_contributions_cannot_be_decrypted_by_sites_or_aggregator(
    keys: KeyHolder,
) -> None:
    contributions = contribute("abc", keys.public_context(), site_totals("abc"))
    assert [len(c.ciphertexts) for c in contributions] == [1, 1, 1]
    for public in (keys.public_context(), keys.evaluation_context()):
        context = load_context(public)
        for contribution in contributions:
            vector = ts.ckks_vector_from(context, contribution.ciphertexts[0])
            with pytest.raises(ValueError, match="secret_key"):
                vector.decrypt()


@pytest.mark.parametrize("names", ["ab", "abc", "abcdefgh"])
def test_single_site_digits_are_masked_and_the_sum_is_exact(
    keys: KeyHolder, names: str
) -> None:
    totals = site_totals(names)
    public = keys.public_context()
    contributions = contribute(names, public, totals)
    used = TOTALS * DIGITS
    for contribution in contributions:
        # what the key holder would see if it decrypted one site's ciphertext
        slots = keys.decrypt(
            contribution.ciphertexts[0], fingerprint=public.fingerprint
        )
        digits = np.rint(slots[:used])
        assert np.abs(slots[:used] - digits).max() < 1e-3
        plain = encode_totals(totals[contribution.site])
        assert plain.max() < 4096, "unmasked digits are 12-bit"
        same = int(np.sum(digits == plain))
        assert same <= 5, f"{same} of {used} digits unmasked at {contribution.site}"
        assert digits.min() >= 0 and digits.max() < MODULUS
        # masked digits are uniform mod 2^16: their top 4 bits fill 16 buckets evenly
        buckets = np.bincount(digits.astype(np.int64) >> 12, minlength=16)
        expected = used / 16
        chi2 = float(np.sum((buckets - expected) ** 2 / expected))
        assert chi2 < 60, f"top-bit buckets {buckets.tolist()} (χ²₁₅ = {chi2:.1f})"
    aggregate = Aggregator(public).add(contributions)
    pooled = open_sum(keys, aggregate)
    exact = [math.fsum(column) for column in zip(*totals.values(), strict=True)]
    assert pooled == exact, "the sum over sites decodes exactly (correctly rounded)"


def test_aggregator_rejects_a_contribution_under_another_public_key(
    keys: KeyHolder,
) -> None:
    other = KeyHolder()
    totals = site_totals("abc")
    query = Query("custom", {"what": "test totals"}, TOTALS)
    good = contribute("abc", keys.public_context(), totals, query)
    foreign = contribute("abc", other.public_context(), totals, query)
    with pytest.raises(IntegrityError, match="site c encrypted under another public"):
        Aggregator(keys.public_context()).add([*good[:2], foreign[2]])


@pytest.mark.parametrize("forged", [1, 3])
def test_ciphertext_under_another_key_with_the_right_tag_fails_decoding(
    keys: KeyHolder, forged: int
) -> None:
    other = KeyHolder()
    totals = site_totals("abc")
    query = Query("custom", {"what": "test totals"}, TOTALS)
    public = keys.public_context()
    good = contribute("abc", public, totals, query)
    foreign = contribute("abc", other.public_context(), totals, query)
    relabelled = [
        dataclasses.replace(c, fingerprint=public.fingerprint) for c in foreign
    ]
    mixed = [*good[: 3 - forged], *relabelled[3 - forged :]]
    aggregate = Aggregator(public).add(mixed)  # tags and layout look right
    with pytest.raises(IntegrityError):
        open_sum(keys, aggregate)
    assert open_sum(keys, Aggregator(public).add(good)) == [
        math.fsum(column) for column in zip(*totals.values(), strict=True)
    ]


def test_aggregator_rejects_ciphertexts_under_other_parameters(
    keys: KeyHolder,
) -> None:
    small = KeyHolder(CKKSParams(4096, (49, 30, 30), scale_bits=30))
    # 100 totals: 1300 digits fit one ciphertext under both parameter sets
    totals = {name: values[:100] for name, values in site_totals("ab").items()}
    query = Query("custom", {"what": "test totals"}, 100)
    public = keys.public_context()
    good = contribute("ab", public, totals, query)
    other = contribute("ab", small.public_context(), totals, query)
    relabelled = dataclasses.replace(other[1], fingerprint=public.fingerprint)
    with pytest.raises(IntegrityError, match="site b sent a ciphertext that does not"):
        Aggregator(public).add([good[0], relabelled])


def test_aggregator_rejects_contributions_to_another_query(keys: KeyHolder) -> None:
    totals = site_totals("ab")
    public = keys.public_context()
    first = contribute("ab", public, totals, Query("custom", {"q": 1}, TOTALS))
    second = contribute("ab", public, totals, Query("custom", {"q": 2}, TOTALS))
    with pytest.raises(IntegrityError, match="site b answered another query"):
        Aggregator(public).add([first[0], second[1]])


def test_key_holder_refuses_to_decrypt_a_single_site(keys: KeyHolder) -> None:
    contributions = contribute("ab", keys.public_context(), site_totals("ab"))
    single = Aggregator(keys.public_context()).add(contributions[:1])
    with pytest.raises(TooFewSites, match="at least two sites"):
        decrypt_totals(keys, single, np.zeros(TOTALS * DIGITS, dtype=np.int64))


def test_aggregator_rejects_a_site_contributing_twice(keys: KeyHolder) -> None:
    contributions = contribute("ab", keys.public_context(), site_totals("ab"))
    with pytest.raises(IntegrityError, match="a site contributed twice"):
        Aggregator(keys.public_context()).add([contributions[0], contributions[0]])


@pytest.mark.parametrize(
    ("degree", "moduli"),
    [
        (4096, (60, 40, 40, 60)),  # 200 bits > 109
        (8192, (59, 40, 40, 40, 40)),  # 219 bits > 218
        (2048, (30, 30)),  # 60 bits > 54
        (6000, (40, 40)),  # not a power of two
        (65536, (60, 40, 60)),  # beyond the table
    ],
)
def test_parameters_below_128_bit_security_are_refused(
    degree: int, moduli: tuple[int, ...]
) -> None:
    params = CKKSParams(degree, moduli, scale_bits=30)
    with pytest.raises(WeakParameters):
        params.check()
    with pytest.raises(WeakParameters):
        KeyHolder(params)


@pytest.mark.parametrize(
    ("degree", "moduli", "scale"),
    [
        (8192, (60, 40, 40, 60), 40),  # the default
        (8192, (58, 40, 40, 40, 40), 40),  # exactly 218 bits
        (4096, (49, 30, 30), 30),  # exactly 109 bits
        (16384, (60, 40, 40, 40, 40, 60), 40),
    ],
)
def test_parameters_within_128_bit_security_pass(
    degree: int, moduli: tuple[int, ...], scale: int
) -> None:
    params = CKKSParams(degree, moduli, scale_bits=scale)
    params.check()
    keys = KeyHolder(params)
    assert keys.public_context().params == params
    assert (
        keys.public_context()
        .load()
        .seal_context()
        .data.key_context_data()
        .parms()
        .poly_modulus_degree()
        == degree
    )


def test_smallest_secure_parameters_still_give_exact_results() -> None:
    keys = KeyHolder(CKKSParams(4096, (49, 30, 30), scale_bits=30))
    table = encrypted.describe(thirds(), ["age", "bmi"], keys=keys)
    frame = diabetes()[["age", "bmi"]]
    assert table.loc["count"].tolist() == [442.0, 442.0]
    assert relative_error(table.loc["mean"], frame.mean()) <= RTOL
    assert relative_error(table.loc["std"], frame.std()) <= RTOL


def test_inconsistent_parameters_are_refused() -> None:
    with pytest.raises(InvalidInput, match="none smaller than the scale"):
        CKKSParams(8192, (60, 30, 60), scale_bits=40).check()


# ------------------------------------------------------- every-value mode
def test_every_value_mode_is_exported() -> None:
    missing = [
        name
        for name in ("describe_values", "square_bias_factor")
        if not hasattr(encrypted, name)
    ]
    assert not missing, (
        f"healthlab.encrypted lists {missing} in __all__ but does not import them "
        "(from healthlab.encrypted import * fails)"
    )


@pytest.fixture(scope="module")
def every_value_run(
    keys: KeyHolder,
) -> tuple[pd.DataFrame, dict[str, pd.DataFrame], pd.DataFrame]:
    """7000 rows over sites of 1000, 1000 and 5000 rows, every value encrypted."""
    rng = np.random.default_rng(11)
    frame = pd.DataFrame(
        {"x": rng.normal(50, 10, 7000), "y": rng.uniform(0, 100, 7000)}
    )
    sites = split(frame, 1000, 2000)
    table = every_value.describe_values(sites, ["x", "y"], bound=BOUND, keys=keys)
    return frame, sites, table


BOUND = 200.0


def test_every_value_mode_rounds_sums_to_its_quantum(
    every_value_run: tuple[pd.DataFrame, dict[str, pd.DataFrame], pd.DataFrame],
) -> None:
    frame, sites, table = every_value_run
    n = len(frame)
    assert table.loc["count"].tolist() == [float(n), float(n)]
    # one ciphertext per 4096 values per site; the quantum follows their noise
    n_ciphertexts = sum(-(-len(part) // 4096) for part in sites.values())
    quantum = every_value.rounding_quantum(n_ciphertexts, 4096)
    assert quantum <= 2.0**-12, "the quantum must stay far below the released precision"
    for column in ("x", "y"):
        total = table.loc["sum", column]
        squares = table.loc["var", column] * (n - 1) + total * total / n
        # the key holder releases Σx/B and Σx²/B² rounded to a multiple of the quantum
        assert abs(total - math.fsum(frame[column])) <= 0.5 * quantum * BOUND
        assert abs(squares - math.fsum(frame[column] ** 2)) <= (
            0.5 * quantum * BOUND**2 * (1 + 1e-9)
        )
        assert (total / BOUND / quantum).is_integer()


def test_every_value_mode_matches_pandas_within_1e_6(
    every_value_run: tuple[pd.DataFrame, dict[str, pd.DataFrame], pd.DataFrame],
) -> None:
    frame, _, table = every_value_run
    # Rounding to a fixed 2^-8·B² once gave std 4.7e-5 off; the quantum now follows
    # the CKKS noise of the folded sums (rounding_quantum).
    mean_error = relative_error(table.loc["mean"], frame.mean())
    assert mean_error < 1e-6, f"mean: relative error {mean_error:.3g}"
    std_error = relative_error(table.loc["std"], frame.std())
    assert std_error < 1e-6, (
        f"every-value std is {std_error:.3g} off pandas: is the rounding quantum far "
        "above the CKKS noise?"
    )


def test_every_value_mode_uploads_a_ciphertext_per_4096_values(
    keys: KeyHolder,
    every_value_run: tuple[pd.DataFrame, dict[str, pd.DataFrame], pd.DataFrame],
) -> None:
    _, sites, table = every_value_run
    receipt = table.receipt
    assert receipt["encryption"]["mode"] == "every value"
    values_upload = receipt["encryption"]["upload_bytes"]
    totals = encrypted.describe(sites, ["x", "y"], keys=keys)
    totals_upload = totals.receipt["encryption"]["upload_bytes"]
    ciphertext = len(
        every_value.encrypt_values(np.zeros(1), keys.evaluation_context())[0]
    )
    # every value: a ciphertext per 4096 values per column, plus one for the count's
    # round; totals: one per query, and describe runs two queries (centers, then
    # deviations from them)
    for site, frame in sites.items():
        assert values_upload[site] > totals_upload[site]
        expected = 2 * math.ceil(len(frame) / 4096) + 1
        assert round(values_upload[site] / ciphertext) == expected, site
        assert round(totals_upload[site] / ciphertext) == 2, site


def test_every_value_mode_refuses_values_beyond_the_bound(keys: KeyHolder) -> None:
    frame = pd.DataFrame({"x": np.linspace(0, 250, 30)})
    with pytest.raises(DataRefused, match="exceeds the public bound 200"):
        every_value.describe_values(split(frame, 10, 20), ["x"], bound=200, keys=keys)


def test_every_value_mode_drops_incomplete_rows_from_every_column(
    keys: KeyHolder,
) -> None:
    """With dropna, a row missing any asked column is dropped from all of them (as in
    describe()): every column's sums cover the n rows counted, not the rows where
    that column alone is present."""
    rng = np.random.default_rng(4)
    n = 6000
    frame = pd.DataFrame({"x": rng.uniform(0, 100, n), "y": rng.uniform(0, 100, n)})
    frame.loc[[2, 9, 3100, 5000, 5001], "x"] = np.nan
    frame.loc[[7, 3101, 3102, 4000], "y"] = np.inf
    complete = frame.replace([np.inf, -np.inf], np.nan).dropna()
    sites = split(frame, 2000, 4000)
    table = every_value.describe_values(
        sites, ["x", "y"], bound=BOUND, keys=keys, dropna=True
    )
    assert table.loc["missing"].tolist() == [9.0, 9.0]
    assert table.loc["count"].tolist() == [float(len(complete))] * 2
    for stat in ("mean", "std"):
        error = relative_error(table.loc[stat], complete.agg(stat))
        assert error < 1e-6, f"{stat}: relative error {error:.3g}"


def test_every_value_mode_refuses_more_rows_than_the_parameters_carry() -> None:
    """With two data primes (100 bits) the folded Σx² at scale 2^80 has room for
    ~46k rows: more are refused with a clear error, never decrypted as garbage."""
    params = CKKSParams(coeff_mod_bit_sizes=(60, 40, 60))
    limit = every_value.max_rows(params)
    assert 40_000 < limit < 50_000
    assert every_value.max_rows(CKKSParams()) > 10**15
    frame = pd.DataFrame({"x": np.linspace(0, 1, limit + 10)})
    keys = KeyHolder(params)
    with pytest.raises(InvalidInput, match="more than these CKKS parameters can sum"):
        every_value.describe_values(
            split(frame, limit // 2), ["x"], bound=1.0, keys=keys, workers=1
        )
    # at the limit it sums, exactly enough to round to the truth (other sites: the
    # same ones without s2 would be a subset of an asked set, refused)
    at_limit = {
        f"t{k[1:]}": v for k, v in split(frame.iloc[:limit], limit // 2).items()
    }
    table = every_value.describe_values(
        at_limit, ["x"], bound=1.0, keys=keys, workers=1
    )
    assert table.loc["count", "x"] == limit
    expected = frame["x"].iloc[:limit].mean()
    assert table.loc["mean", "x"] == pytest.approx(expected, rel=1e-6)


def test_square_bias_factor_removes_tenseal_square_bias() -> None:
    params = CKKSParams()
    context = ts.context(
        ts.SCHEME_TYPE.CKKS,
        params.poly_modulus_degree,
        coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
    )
    context.global_scale = 2.0**params.scale_bits
    public = PublicContext(data=context.serialize(save_secret_key=False), params=params)
    factor = every_value.square_bias_factor(public)
    x = np.random.default_rng(5).uniform(1.0, 10.0, params.slots)
    squared = np.asarray(ts.ckks_vector(context, x).square().decrypt())
    ratio = squared / (x * x)
    bias = float(ratio.mean() - 1.0)
    # TenSEAL labels the rescaled product 2^40 although it divided by q ≠ 2^40
    assert 1e-7 < bias < 2e-7, f"TenSEAL's square() bias is {bias:.3g}"
    assert abs(bias - (1.0 / factor - 1.0)) < 1e-9
    corrected = float((ratio * factor).mean() - 1.0)
    assert abs(corrected) < 1e-9, f"corrected bias {corrected:.3g}"
    assert float(np.abs(ratio * factor - 1.0).max()) < 1e-7


def test_every_value_stream_keeps_order_through_a_small_window(
    keys: KeyHolder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One bounded window of pool tasks serves every site and column: with one chunk
    per task and one task in flight per worker, each ciphertext file still comes
    back tagged with the array it belongs to, in order, and holds that array's
    values (checked through the aggregator: each file's folded sum)."""
    monkeypatch.setattr(every_value, "BATCH", 1)
    monkeypatch.setattr(every_value, "IN_FLIGHT_PER_WORKER", 1)
    public, evaluation = keys.public_context(), keys.evaluation_context()
    sizes = [5000, 1, 9000, 4096]  # 2, 1, 3 and 1 ciphertexts
    arrays = [np.full(n, (i + 1) / 8) for i, n in enumerate(sizes)]
    aggregator = every_value.ValueAggregator(evaluation, accepted=public.fingerprint)
    owners, sums = [], []
    with every_value.encryption_pool(public, 2) as pool:
        for i, path in every_value._encrypt_many(arrays, public, pool, 2):
            owners.append(i)
            aggregator.start()
            aggregator.add_file("s", public.fingerprint, path)
            folded = aggregator.finish()
            _, total = keys.decrypt_folded_pair(
                folded, fingerprint=evaluation.fingerprint
            )
            sums.append(total)
    assert owners == [0, 0, 1, 2, 2, 2, 3]
    counts = [4096, 904, 1, 4096, 4096, 808, 4096]  # values in each ciphertext
    for i, got, count in zip(owners, sums, counts, strict=True):
        assert got == pytest.approx((i + 1) / 8 * count, abs=1e-4), (i, count)


def folded_sums(
    keys: KeyHolder, items: Iterable[tuple[int, str]]
) -> tuple[list[int], list[float]]:
    """Each stream item's owner, and the sum of the values in its ciphertext file."""
    public, evaluation = keys.public_context(), keys.evaluation_context()
    aggregator = every_value.ValueAggregator(evaluation, accepted=public.fingerprint)
    owners, sums = [], []
    for i, path in items:
        owners.append(i)
        aggregator.start()
        aggregator.add_file("s", public.fingerprint, path)
        _, total = keys.decrypt_folded_pair(
            aggregator.finish(), fingerprint=evaluation.fingerprint
        )
        sums.append(total)
    return owners, sums


def test_every_value_stream_with_a_local_lane_encrypts_every_chunk_once(
    keys: KeyHolder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``local``, this process encrypts whenever the pool's next result is not
    ready: results come in completion order, but every chunk comes exactly once,
    tagged with its array, holding that array's values."""
    monkeypatch.setattr(every_value, "BATCH", 1)
    monkeypatch.setattr(every_value, "LOCAL_IN_FLIGHT_PER_WORKER", 1)
    public = keys.public_context()
    sizes = [5000, 1, 9000, 4096, 12288]  # 2, 1, 3, 1 and 3 ciphertexts
    arrays = [np.full(n, (i + 1) / 8) for i, n in enumerate(sizes)]
    with every_value.encryption_pool(public, 1) as pool:
        stream = every_value._encrypt_many(arrays, public, pool, 1, local=True)
        owners, sums = folded_sums(keys, stream)
    counts = sorted(
        (i, round(total / ((i + 1) / 8))) for i, total in zip(owners, sums, strict=True)
    )
    assert counts == [
        (0, 904), (0, 4096), (1, 1), (2, 808), (2, 4096), (2, 4096),
        (3, 4096), (4, 4096), (4, 4096), (4, 4096),
    ]  # fmt: skip
    for i, total in zip(owners, sums, strict=True):
        count = round(total / ((i + 1) / 8))
        assert total == pytest.approx((i + 1) / 8 * count, abs=1e-4), (i, count)


class _IdlePool:
    """A stand-in pool whose tasks never start: every submitted task stays pending."""

    def __init__(self) -> None:
        self.submitted: list[Future[list[str]]] = []

    def submit(self, *_: object) -> Future[list[str]]:
        future: Future[list[str]] = Future()
        self.submitted.append(future)
        return future


def test_every_value_local_lane_takes_back_tasks_the_pool_has_not_started(
    keys: KeyHolder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When every chunk has been handed out, this process cancels the pool's tasks
    that have not started and encrypts their chunks itself: nothing waits on a busy
    or stalled pool, and nothing is lost or done twice."""
    monkeypatch.setattr(every_value, "BATCH", 2)
    public = keys.public_context()
    sizes = [9000, 4096, 100]  # 3, 1 and 1 ciphertexts; the window takes them all
    arrays = [np.full(n, (i + 1) / 4) for i, n in enumerate(sizes)]
    pool = _IdlePool()
    stream = every_value._encrypt_many(arrays, public, pool, 1, local=True)
    owners, sums = folded_sums(keys, stream)
    assert pool.submitted, "the window was filled"
    assert all(f.cancelled() for f in pool.submitted)
    assert owners == [0, 0, 0, 1, 2]  # submission order: all taken back
    counts = [4096, 4096, 808, 4096, 100]
    for i, got, count in zip(owners, sums, counts, strict=True):
        assert got == pytest.approx((i + 1) / 4 * count, abs=1e-4), (i, count)


def test_every_value_ciphertexts_under_other_parameters_are_refused(
    keys: KeyHolder,
) -> None:
    """The upload is SEAL's serialization; SEAL refuses one made for another
    parameter set when the aggregator loads it."""
    other = KeyHolder(CKKSParams(coeff_mod_bit_sizes=(60, 40, 60)))
    blob = every_value.encrypt_values(np.ones(10), other.public_context(), workers=1)[0]
    aggregator = every_value.ValueAggregator(
        keys.evaluation_context(), accepted=keys.public_context().fingerprint
    )
    with pytest.raises(IntegrityError, match="parameters"):
        aggregator.add("s", keys.public_context().fingerprint, blob)
