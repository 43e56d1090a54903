"""Attacks through the thresholds a researcher chooses (issue 13): a clip bound, a
researcher's own ``min_rows``, and bins or cells only one site holds.

Each is mounted as the researcher would mount it, asserted refused or withheld,
next to the honest variant answered exactly (pandas on the pooled rows).

- **Clipping.** ``bounds=`` clip each value at a site: Σ clip(x, hi) against Σ x
  gives Σ (x − hi) over the rows above ``hi`` — the oldest patient's age with
  ``hi`` just below it; one site's tail when only it holds rows there; with two
  clipped columns of a cross moment, the product of one patient's two values; with
  a bound above every value, a count through the encoding's limit. Auditing the
  clipped rows (tried first) was not enough (the review found the cross moment, the
  one-site tail and refusals that spoke). Bounds are for DP budgets, whose noise
  covers what clipping reveals: a site without one refuses every bound, by rule.
- **A bin or cell one site holds.** A histogram's top bin only one hospital holds
  (its patients over 90), or a crosstab cell of a ward only one has, pooled over
  three sites, was that hospital's own count. The sites now count the holders of
  every bin and cell among themselves (masked flags, as for ``by=`` groups): such a
  bin or cell is sent as zeros by every site, shown ``<NA>`` and named; "all rows
  minus the released bins" is then refused.
- **Rows only one site leaves out.** With ``dropna``, ``missing`` was that site's
  own count, and all rows minus the complete cases its totals of those rows: the
  sites count the holders of left-out rows too; too few, and the count is
  withheld and the rows protected. So are the rows outside a histogram's edges
  (all rows minus its bins) when too few sites hold such rows.
- **The researcher's own min_rows.** A site refused when a subset held fewer rows
  than the larger of its policy and the study's ``min_rows``: bisecting
  ``min_rows`` gave the smaller site's exact n. The sites now decide by their
  policies only; the study's ``min_rows`` is applied to the pooled result on the
  researcher's side (groups, bins and cells of fewer pooled rows withheld; a
  result of fewer pooled rows refused), and ``levels(min_rows=)`` is refused.
- **Bisecting a bin's edge.** Whether a site answers depends on its rows (a tail
  bin of 1–2 rows is refused, an empty one is answered): about fourteen
  histograms pin the oldest patient's age to 0.02 years (the control test, with
  the grid opted out). So edges and clip bounds off a grid are refused whatever
  the rows: by default a grid of 2 significant digits (a bisection learns the
  year of an age), or the owner's own, ``DisclosurePolicy(grid={"age": 5})`` (the
  5-year cell).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest

from healthlab import DisclosurePolicy, Site, encrypted
from healthlab.dp import PrivacyBudget
from healthlab.errors import DataRefused, DisclosureRefused


def cohort(seed: int, n: int = 300) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "age": rng.normal(55, 10, n).round(1),
            "sbp": rng.normal(130, 15, n).round(1),
            "sex": rng.choice(["F", "M"], n),
            "smoker": rng.choice(["no", "yes"], n, p=[0.7, 0.3]),
        }
    )


def two_sites() -> list[Site]:
    return [Site("h1", cohort(1)), Site("h2", cohort(2))]


def pooled() -> pd.DataFrame:
    return pd.concat([cohort(1), cohort(2)], ignore_index=True)


# ---------------------------------------------------------------------- clipping
def bound_attacks(rows: pd.DataFrame) -> dict[str, dict[str, tuple[float, float]]]:
    """Bounds an attacker would ask (with the unclipped sums, or each other): just
    below the oldest patient, above the youngest, two bounds one patient apart,
    both columns of a cross moment, and a bound far above every value (n·lo
    overflows the encoding at exactly one site size: a count oracle)."""
    ages = np.unique(rows["age"])
    return {
        "below the oldest": {"age": (0.0, float(ages[-2]))},
        "above the youngest": {"age": (float(ages[1]), 200.0)},
        "one patient apart": {"age": (0.0, float(ages[-3]))},
        "far above every value": {"age": (1e11, 2e11)},
        "wide": {"age": (0.0, 1000.0)},
    }


@pytest.mark.parametrize("attack", sorted(bound_attacks(pooled())))
def test_clip_bounds_are_refused_without_a_budget_whatever_the_rows(
    attack: str,
) -> None:
    """Σ clip(x) against Σ x gives the values beyond a bound — the oldest patient's
    age, one site's tail, a product of two columns in a cross moment, or (with a
    bound above every value) a count through the encoding's limit. Without a DP
    budget every bound is refused, by the same rule, before anything is computed:
    the refusal says nothing about the rows."""
    bounds = bound_attacks(pooled())[attack]
    messages = set()
    for statistic in (encrypted.describe, encrypted.cov, encrypted.corr):
        with pytest.raises(DisclosureRefused, match="no privacy budget") as refusal:
            statistic(
                two_sites(),
                ["age"] if statistic is encrypted.describe else ["age", "sbp"],
                bounds=bounds | {"sbp": (0.0, 400.0)},
            )
        messages.add(str(refusal.value).split(":")[0])
    assert messages <= {"2 sites refused the query", "site h1 has no privacy budget"}


def test_a_cross_moment_over_two_clipped_columns_is_refused() -> None:
    """The review's attack: cov with age and bmi clipped (neither, each, both)
    gave Σ(age − 80)(bmi − 40) over the one patient clipped in both."""
    with pytest.raises(DisclosureRefused, match="no privacy budget"):
        encrypted.cov(
            two_sites(), ["age", "sbp"], bounds={"age": (0, 80), "sbp": (0, 150)}
        )
    with pytest.raises(DisclosureRefused, match="no privacy budget"):
        encrypted.ols(
            two_sites(), "sbp", ["age"], bounds={"sbp": (0, 150), "age": (0, 80)}
        )


def test_a_crafted_centre_cannot_steer_the_encodings_limit() -> None:
    """Through the protocol by hand: a centre so large that n·c passes what the
    encoding carries at one site size only — refused by rule at every site; so is
    a second-moment centre whose square could."""
    from healthlab.encrypted.encoding import MAX_ABS
    from healthlab.encrypted.keys import KeyHolder
    from healthlab.encrypted.protocol import Query, prepare_query
    from healthlab.encrypted.stats import _moments
    from tests.test_review_attacks import moments_query

    query = moments_query("age", center=-MAX_ABS / 300.5)
    with pytest.raises(DataRefused, match="centres must be 0 for first moments"):
        prepare_query(two_sites(), query, _moments, keys=KeyHolder())
    square = {**query.spec, "order": 2, "center": [2e9]}
    with pytest.raises(DataRefused, match=r"at most 1\.57e"):
        prepare_query(
            two_sites(), Query("moments", square, 4), _moments, keys=KeyHolder()
        )


def test_without_bounds_every_statistic_is_answered_exactly() -> None:
    rows = pooled()
    table = encrypted.describe(two_sites(), ["age", "sbp"])
    assert table.loc["mean", "age"] == pytest.approx(rows["age"].mean(), abs=1e-9)
    assert table.loc["std", "sbp"] == pytest.approx(rows["sbp"].std(), abs=1e-9)


# ------------------------------------------------- cells only one site holds
def tail_sites() -> tuple[list[Site], pd.DataFrame]:
    """h1 holds 5 patients aged 90 or more, h2 and h3 none (and 300 rows each)."""
    frames = [cohort(1), cohort(2), cohort(3)]
    frames[0].loc[:4, "age"] = [90.5, 91.0, 92.2, 95.0, 97.4]
    frames[1]["age"] = frames[1]["age"].clip(upper=89.0)
    frames[2]["age"] = frames[2]["age"].clip(upper=89.0)
    sites = [Site(f"h{i}", f) for i, f in enumerate(frames, 1)]
    return sites, pd.concat(frames, ignore_index=True)


@pytest.mark.parametrize("edges", [[0, 90, 200], [60, 90, 100], [0, 50, 90, 120]])
def test_a_bin_one_site_holds_is_withheld_by_every_site(edges: list[float]) -> None:
    """The top bin's pooled count would be h1's own (5 patients): every site sends
    zeros for it; the other bins are exact."""
    sites, rows = tail_sites()
    table = encrypted.histogram(sites, "age", edges)
    expected, _ = np.histogram(rows["age"], bins=edges)
    assert table["count"].isna().tolist()[-1]
    assert table.suppressed == [(90.0, float(edges[-1]))]
    assert table["count"].iloc[:-1].tolist() == expected[:-1].tolist()
    assert int(expected[-1]) == 5
    # the rows outside the edges are counted (every site holds some, or none)
    outside = int(((rows.age < edges[0]) | (rows.age > edges[-1])).sum())
    assert table.outside == outside
    # all rows minus the released bins (and the rows outside) would be the
    # withheld bin: refused
    with pytest.raises(DisclosureRefused, match="site h1: a group held by too few"):
        encrypted.describe(sites, ["age"])


def test_a_bin_two_sites_hold_is_released() -> None:
    frames = [cohort(1), cohort(2), cohort(3)]
    frames[0].loc[:4, "age"] = [90.5, 91.0, 92.2, 95.0, 97.4]
    frames[1].loc[:2, "age"] = [90.1, 93.0, 94.0]
    frames[2]["age"] = frames[2]["age"].clip(upper=89.0)
    sites = [Site(f"h{i}", f) for i, f in enumerate(frames, 1)]
    rows = pd.concat(frames, ignore_index=True)
    table = encrypted.histogram(sites, "age", [0, 90, 200])
    assert table["count"].tolist() == [int((rows.age < 90).sum()), 8]
    assert table.suppressed == []


def test_a_crosstab_cell_one_site_holds_is_withheld() -> None:
    frames = [cohort(1), cohort(2), cohort(3)]
    frames[0]["ward"] = np.where(np.arange(300) < 10, "icu", "general")
    frames[0].loc[:9, "sex"] = ["F", "M"] * 5
    frames[1]["ward"] = "general"
    frames[2]["ward"] = "general"
    sites = [Site(f"h{i}", f) for i, f in enumerate(frames, 1)]
    rows = pd.concat(frames, ignore_index=True)
    table = encrypted.crosstab(sites, "ward", "sex")
    assert table.loc["icu"].isna().all()
    expected = pd.crosstab(rows.ward, rows.sex)
    assert table.loc["general"].tolist() == expected.loc["general"].tolist()


# ------------------------------------------------------- the researcher's min_rows
def uneven_sites() -> tuple[list[Site], pd.DataFrame]:
    """h1 holds 40 rows, h2 300: a threshold between them once told them apart."""
    frames = [cohort(1, n=40), cohort(2)]
    return [Site(f"h{i}", f) for i, f in enumerate(frames, 1)], pd.concat(frames)


@pytest.mark.parametrize("threshold", [30, 39, 40, 41, 45, 100, 340, 341])
def test_a_min_rows_of_the_researchers_reveals_only_the_pooled_count(
    threshold: int,
) -> None:
    """Bisecting min_rows once found h1's exact n (refused iff a site holds fewer):
    now the outcome depends on the pooled n (released anyway), never on a site's."""
    sites, rows = uneven_sites()
    if threshold <= len(rows):
        table = encrypted.describe(sites, ["age"], min_rows=threshold)
        assert table.loc["count", "age"] == len(rows)
    else:
        with pytest.raises(DisclosureRefused, match="your min_rows") as refusal:
            encrypted.describe(sites, ["age"], min_rows=threshold)
        assert "h1" not in str(refusal.value) and "40" not in str(refusal.value)


def test_a_min_rows_withholds_pooled_groups_bins_and_cells_below_it() -> None:
    sites, rows = uneven_sites()
    edges = [0, 45, 55, 65, 200]
    expected, _ = np.histogram(rows["age"], bins=edges)  # 55 117 123 45
    table = encrypted.histogram(sites, "age", edges, min_rows=100)
    assert table["count"].isna().tolist() == [True, False, False, True]
    assert table["count"].dropna().tolist() == [117, 123]
    assert table.suppressed == [(0.0, 45.0), (65.0, 200.0)]
    n_f = int((rows.sex == "F").sum())  # 169 F, 171 M pooled
    by_sex = encrypted.describe(uneven_sites()[0], ["age"], by="sex", min_rows=n_f + 1)
    assert by_sex.suppressed == ["F"]
    male = rows[rows.sex == "M"]["age"]
    assert by_sex[("M", "age")]["count"] == len(male)
    assert by_sex[("M", "age")]["mean"] == pytest.approx(male.mean(), abs=1e-9)
    expected = pd.crosstab(rows.sex, rows.smoker).to_numpy()
    threshold = int(expected.min()) + 1  # the smallest cell falls below
    cells = encrypted.crosstab(
        uneven_sites()[0], "sex", "smoker", min_rows=threshold
    ).to_numpy()
    below = expected < threshold
    assert pd.isna(cells).tolist() == below.tolist()
    assert cells[~below].astype(int).tolist() == expected[~below].tolist()


def test_levels_refuse_a_threshold_of_the_researchers() -> None:
    from healthlab.errors import InvalidInput

    sites, _ = uneven_sites()
    with pytest.raises(InvalidInput, match="sites' own minimum"):
        encrypted.levels(sites, "sex", min_rows=21)
    assert list(encrypted.levels(sites, "sex")) == ["F", "M"]


# ----------------------------------------------------------- the owner's grid
GRID = DisclosurePolicy(grid={"age": 5})


def gridded_sites() -> tuple[list[Site], pd.DataFrame]:
    frames = [cohort(1), cohort(2)]
    sites = [Site(f"h{i}", f, policy=GRID) for i, f in enumerate(frames, 1)]
    return sites, pd.concat(frames, ignore_index=True)


def two_digits(t: float) -> float:
    """The finest edge the default policy takes: ``t`` to 2 significant digits."""
    return float(f"{t:.2g}")


def bisect_top(
    sites: list[Site],
    lo: float,
    hi: float,
    step: float,
    allowed: Callable[[float], float] = lambda t: t,
) -> float:
    """The researcher's bisection of a tail bin's edge: [0, t) and [t, 200]; a
    refusal or a bin of 1-2 rows means someone is above t. ``allowed`` rounds t to
    the edges the sites accept. Returns the width of the interval the oldest
    patient's age is then known to lie in."""
    while hi - lo > step:
        t = allowed(round((lo + hi) / 2 / step) * step)
        if not lo < t < hi:
            break
        try:
            top = encrypted.histogram(sites, "age", [0, t, 200])["count"].iloc[1]
            above = pd.isna(top) or top > 0
        except DisclosureRefused:
            above = True
        lo, hi = (t, hi) if above else (lo, t)
    return hi - lo


OPTED_OUT = DisclosurePolicy(grid_digits=None)


def test_opted_out_of_the_grid_bisecting_an_edge_pins_the_oldest_age(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The control: what the default grid answers (the opt-out says so, loudly)."""
    with caplog.at_level("WARNING", logger="healthlab.sites"):
        policy = DisclosurePolicy(grid_digits=None)
    assert "INSECURE" in caplog.text
    sites = [Site("h1", cohort(1), policy=policy), Site("h2", cohort(2), policy=policy)]
    oldest = pooled()["age"].max()
    width = bisect_top(sites, 60.0, 150.0, 0.01)
    assert width <= 0.02  # known to within 0.02 years
    assert oldest > 60.0


def test_by_default_edges_have_two_digits_and_a_bisection_learns_the_year() -> None:
    """No grid declared: the sites take edges of 2 significant digits only, and
    refuse others whatever the rows — so the finest bisection learns the year."""
    oldest = pooled()["age"].max()
    width = bisect_top(two_sites(), 60.0, 150.0, 0.01, allowed=two_digits)
    assert width >= 1.0  # the year (for ages 10-99), never finer
    # off the 2-digit grid every edge is refused alike, above or below the oldest
    messages = set()
    for t in [60.5, 70.25, 83.7, oldest - 0.1, oldest + 0.1, 99.9, 101.0, 135.0]:
        with pytest.raises(DisclosureRefused, match="2 significant digit") as refused:
            encrypted.histogram(two_sites(), "age", [0, t, 200])
        messages.add(str(refused.value))
        assert f"{t:g}" not in str(refused.value)
    assert len(messages) == 1
    # ordinary edges are answered exactly
    rows = pooled()
    edges = [0, 18, 40, 0.5e2, 65, 120, 200]
    table = encrypted.histogram(two_sites(), "age", edges)
    expected, _ = np.histogram(rows["age"], bins=edges)
    assert table["count"].tolist() == expected.tolist()


def test_grid_digits_must_be_a_small_whole_number() -> None:
    from healthlab.errors import InvalidInput

    for bad in (0, 16, 2.5):
        with pytest.raises(InvalidInput, match="grid_digits"):
            DisclosurePolicy(grid_digits=bad)  # type: ignore[arg-type]
    assert DisclosurePolicy(grid_digits=3).grid_digits == 3


def test_on_the_owners_grid_bisecting_reveals_at_most_the_grid_cell() -> None:
    sites, rows = gridded_sites()
    with pytest.raises(DisclosureRefused, match="multiples of 5") as refusal:
        encrypted.histogram(sites, "age", [0, 83.7, 200])
    assert "83.7" not in str(refusal.value)
    # off the grid every edge is refused alike, above or below the oldest patient:
    # the refusal depends on the edges only, never on the rows
    messages = set()
    off_grid = [
        t for t in np.arange(60.3, 100.0, 0.7) if abs(t / 5 - round(t / 5)) > 1e-6
    ]
    for t in off_grid:
        with pytest.raises(DisclosureRefused, match="multiples of 5") as refused:
            encrypted.histogram(gridded_sites()[0], "age", [0, float(t), 200])
        messages.add(str(refused.value))
    assert len(messages) == 1
    assert any(t > rows["age"].max() for t in off_grid)
    # clip bounds (a DP site's) are held to the grid too
    dp = DisclosurePolicy(
        grid={"age": 5}, privacy=PrivacyBudget(10.0, delta=1e-6, noise_multiplier=2.0)
    )
    noisy = [Site(f"h{i}", cohort(i), policy=dp) for i in (1, 2)]
    with pytest.raises(DisclosureRefused, match="multiples of 5"):
        encrypted.describe(noisy, ["age"], bounds={"age": (0, 83.7)})
    table = encrypted.describe(noisy, ["age"], bounds={"age": (0, 120)})
    assert table.loc["count", "age"] == pytest.approx(len(rows), abs=60)


def test_on_the_grid_ordinary_histograms_and_bounds_are_answered_exactly() -> None:
    sites, rows = gridded_sites()
    edges = [20, 40, 50, 60, 70, 100]
    table = encrypted.histogram(sites, "age", edges)
    expected, _ = np.histogram(rows["age"], bins=edges)
    assert table["count"].tolist() == expected.tolist()
    wide = encrypted.describe(gridded_sites()[0], ["age"])
    assert wide.loc["mean", "age"] == pytest.approx(rows["age"].mean(), abs=1e-9)
    sbp = encrypted.histogram(gridded_sites()[0], "sbp", [0, 130, 400])
    assert int(sbp["count"].sum()) == len(rows)  # other columns: 2 digits
    with pytest.raises(DisclosureRefused, match="2 significant digit"):
        encrypted.histogram(gridded_sites()[0], "sbp", [0, 127.3, 400])


def test_a_grid_must_be_positive() -> None:
    from healthlab.errors import InvalidInput

    with pytest.raises(InvalidInput, match="grid widths"):
        DisclosurePolicy(grid={"age": 0})
    assert DisclosurePolicy(grid={"age": 5}) == GRID
    hash(GRID)


def test_counts_refuse_bounds_rather_than_ignore_them() -> None:
    from healthlab.errors import InvalidInput

    with pytest.raises(InvalidInput, match="counts take none"):
        encrypted.histogram(two_sites(), "age", [0, 50, 200], bounds=(0, 100))
    with pytest.raises(InvalidInput, match="counts take none"):
        encrypted.crosstab(two_sites(), "sex", "smoker", bounds=(0, 100))


def test_withheld_counts_keep_nothing_under_the_mask() -> None:
    sites, _ = uneven_sites()
    table = encrypted.histogram(sites, "age", [0, 45, 55, 65, 200], min_rows=100)
    assert table["count"].array._data.tolist() == [0, 117, 123, 0]
    # levels with the policy's own minimum (or less) are answered as without
    assert list(encrypted.levels(sites, "sex", min_rows=3)) == ["F", "M"]


# ------------------------------------------------ rows only one site leaves out
def test_a_missing_count_only_one_site_has_is_withheld() -> None:
    """With dropna, ``missing`` was h1's own count when only h1 lacks values (the
    review printed 5); all rows minus the complete cases, h1's totals of them."""
    frames = [cohort(1), cohort(2)]
    frames[0].loc[:4, "sbp"] = np.nan
    sites = [Site(f"h{i}", f) for i, f in enumerate(frames, 1)]
    table = encrypted.histogram(sites, "age", [0, 50, 200], population=["sbp"])
    assert table.missing is None
    assert int(table["count"].sum()) == 595
    with pytest.raises(DisclosureRefused, match="rows that too few sites leave out"):
        encrypted.describe(sites, ["age"])
    frames[1].loc[:2, "sbp"] = np.nan  # both leave rows out: the count is pooled
    both = [Site(f"h{i}", f) for i, f in enumerate(frames, 1)]
    assert encrypted.histogram(both, "age", [0, 200], population=["sbp"]).missing == 8


@pytest.mark.parametrize("describe_first", [True, False])
def test_rows_outside_the_edges_that_one_site_holds_are_protected(
    describe_first: bool,
) -> None:
    """All rows minus a histogram's bins are the rows outside its edges: when only
    h1 holds such rows (its patients over 90), that difference was h1's count."""
    sites, rows = tail_sites()
    if describe_first:
        encrypted.describe(sites, ["age"])
        with pytest.raises(DisclosureRefused, match="site h1: a group held by too few"):
            encrypted.histogram(sites, "age", [0, 90])
        return
    table = encrypted.histogram(sites, "age", [0, 90])
    assert table["count"].tolist() == [int((rows.age <= 90).sum())]
    assert table.suppressed == []
    with pytest.raises(DisclosureRefused, match="site h1: a group held by too few"):
        encrypted.describe(sites, ["age"])


def test_rows_outside_the_edges_that_several_sites_hold_are_answered() -> None:
    sites = two_sites()
    rows = pooled()
    encrypted.describe(sites, ["age"])
    table = encrypted.histogram(sites, "age", [40, 70])
    assert table["count"].tolist() == [int(rows.age.between(40, 70).sum())]


# ------------------------------------------------- a category in disguise
def test_a_column_of_few_values_is_audited_by_its_values() -> None:
    """A 0/1/2 column (say, a count of admissions): n, Σx and Σx² give the pooled
    count of each value, and with another column Σxy its sums over them. One
    patient with 2 at h1: describe would have said "one patient has 2"."""
    frames = [cohort(1), cohort(2)]
    for f in frames:
        f["admissions"] = np.resize([0.0, 1.0], len(f))
    frames[0].loc[0, "admissions"] = 2.0
    sites = [Site(f"h{i}", f) for i, f in enumerate(frames, 1)]
    # (the value only h1 holds is a holder cell too: either rule refuses)
    either = "fewer than 3|too few of the sites hold"
    with pytest.raises(DisclosureRefused, match=either):
        encrypted.describe(sites, ["admissions"])
    with pytest.raises(DisclosureRefused, match=either):
        encrypted.cov(
            [Site(f"g{i}", f) for i, f in enumerate(frames, 1)], ["admissions", "age"]
        )
    # with 3 or more of each value at each site, answered exactly
    for f in frames:
        f.loc[:2, "admissions"] = 2.0
    rows = pd.concat(frames, ignore_index=True)
    fresh = [Site(f"k{i}", f) for i, f in enumerate(frames, 1)]
    table = encrypted.describe(fresh, ["admissions"])
    assert table.loc["mean", "admissions"] == pytest.approx(rows.admissions.mean())
    # a measurement whose values all differ is not a category, however few rows
    tiny = [Site("t1", cohort(3, n=3)), Site("t2", cohort(4))]
    encrypted.describe(tiny, ["age"])
