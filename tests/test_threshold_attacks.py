"""Attacks through the thresholds a researcher chooses (issue 13): a clip bound, a
researcher's own ``min_rows``, and bins or cells only one site holds.

Each is mounted as the researcher would mount it, asserted refused or withheld,
next to the honest variant answered exactly (pandas on the pooled rows).

- **Clipping.** ``bounds=`` clip each value at a site; without a DP budget,
  Σ clip(x, hi) against Σ x gives Σ (x − hi) over the rows above ``hi``: with
  ``hi`` just below the oldest patient's age, that age exactly (it did, before the
  clipped rows were audited). Now the rows a bound clips are subsets like a group:
  fewer than ``k`` of them, at any site, is refused; so is a pair of bounds whose
  difference isolates them.
- **A bin or cell one site holds.** A histogram's top bin only one hospital holds
  (its patients over 90), or a crosstab cell of a ward only one has, pooled over
  three sites, was that hospital's own count. The sites now count the holders of
  every bin and cell among themselves (masked flags, as for ``by=`` groups): such a
  bin or cell is sent as zeros by every site, shown ``<NA>`` and named; "all rows
  minus the released bins" is then refused.
- **The researcher's own min_rows.** A site refused when a subset held fewer rows
  than the larger of its policy and the study's ``min_rows``: bisecting
  ``min_rows`` gave the smaller site's exact n. The sites now decide by their
  policies only; the study's ``min_rows`` is applied to the pooled result on the
  researcher's side (groups, bins and cells of fewer pooled rows withheld; a
  result of fewer pooled rows refused), and ``levels(min_rows=)`` is refused.
- **Bisecting a bin's edge.** Whether a site answers depends on its rows (a tail
  bin of 1–2 rows is refused, an empty one is answered): a dozen histograms pin
  the oldest patient's age to a hundredth of a year (the control test). An owner
  closes it with ``DisclosurePolicy(grid={"age": 5})``: edges and clip bounds off
  the grid are refused whatever the rows, so the most a bisection learns is the
  5-year cell. Without a grid it stays open (README).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from healthlab import DisclosurePolicy, Site, encrypted
from healthlab.errors import DisclosureRefused


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
@pytest.mark.parametrize("rank", [1, 2])
def test_a_bound_just_below_the_oldest_patients_is_refused(rank: int) -> None:
    sites = two_sites()
    ages = np.sort(pooled()["age"].to_numpy())
    assert len(set(ages[-3:])) == 3
    hi = float(ages[-rank - 1])  # clips the `rank` oldest patients of the study
    encrypted.describe(sites, ["age"])  # the unclipped sums are answered
    with pytest.raises(DisclosureRefused, match=r"site h[12]"):
        encrypted.describe(sites, ["age"], bounds={"age": (0.0, hi)})


def test_a_low_bound_above_the_youngest_is_refused_too() -> None:
    sites = two_sites()
    lo = float(np.unique(pooled()["age"])[1])  # clips the youngest (two, tied)
    with pytest.raises(DisclosureRefused):
        encrypted.describe(
            sites, ["age", "sbp"], bounds={"age": (lo, 200.0), "sbp": (0.0, 900.0)}
        )


def test_two_bounds_whose_difference_isolates_patients_are_refused() -> None:
    """Each clip holds many rows; between them one site holds one or two."""
    sites = two_sites()
    h1 = np.sort(cohort(1)["age"].to_numpy())
    h2 = np.sort(cohort(2)["age"].to_numpy())
    # two bounds that each clip >= 3 rows at both sites, with exactly one h1 row
    # and no h2 row between them
    for i in range(20, len(h1) - 1):
        lo_b, hi_b = h1[-i - 1], h1[-i]
        between_h2 = ((h2 > lo_b) & (h2 <= hi_b)).sum()
        if h1[-i] > h1[-i - 1] and between_h2 == 0:
            break
    else:
        pytest.fail("no such pair of bounds in this cohort")
    first = {"age": (0.0, float(hi_b))}
    second = {"age": (0.0, float(lo_b))}
    table = encrypted.describe(sites, ["age"], bounds=first)
    expected = pooled()["age"].clip(0.0, float(hi_b))
    assert table.loc["mean", "age"] == pytest.approx(expected.mean(), abs=1e-9)
    with pytest.raises(DisclosureRefused, match="site h1: together with what"):
        encrypted.describe(sites, ["age"], bounds=second)


def test_bounds_that_clip_many_rows_or_none_are_answered_exactly() -> None:
    sites = two_sites()
    rows = pooled()
    wide = encrypted.describe(sites, ["age", "sbp"], bounds=(0.0, 1000.0))
    assert wide.loc["mean", "age"] == pytest.approx(rows["age"].mean(), abs=1e-9)
    bounds = {"age": (45.0, 65.0), "sbp": (110.0, 150.0)}
    table = encrypted.describe(two_sites(), ["age", "sbp"], bounds=bounds)
    for column, (lo, hi) in bounds.items():
        clipped = rows[column].clip(lo, hi)
        assert table.loc["mean", column] == pytest.approx(clipped.mean(), abs=1e-9)
        assert table.loc["std", column] == pytest.approx(clipped.std(), abs=1e-9)


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
    assert table.attrs["suppressed_bins"] == [(90.0, float(edges[-1]))]
    assert table["count"].iloc[:-1].tolist() == expected[:-1].tolist()
    assert int(expected[-1]) == 5
    if edges[0] > rows["age"].min():  # all rows minus the bins: others' rows too
        encrypted.describe(sites, ["age"])
        return
    # all rows minus the released bins would be the withheld bin: refused
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
    assert "suppressed_bins" not in table.attrs


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
    assert table.attrs["suppressed_bins"] == [(0.0, 45.0), (65.0, 200.0)]
    n_f = int((rows.sex == "F").sum())  # 169 F, 171 M pooled
    by_sex = encrypted.describe(uneven_sites()[0], ["age"], by="sex", min_rows=n_f + 1)
    assert by_sex.attrs["suppressed_groups"] == ["F"]
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


def bisect_top(sites: list[Site], lo: float, hi: float, step: float) -> float:
    """The researcher's bisection of a tail bin's edge: [0, t) and [t, 200]; a
    refusal or a bin of 1-2 rows means someone is above t. Returns the width of
    the interval the oldest patient's age is then known to lie in."""
    while hi - lo > step:
        t = round((lo + hi) / 2 / step) * step
        if t in (lo, hi):
            break
        try:
            top = encrypted.histogram(sites, "age", [0, t, 200])["count"].iloc[1]
            above = pd.isna(top) or top > 0
        except DisclosureRefused:
            above = True
        lo, hi = (t, hi) if above else (lo, t)
    return hi - lo


def test_without_a_grid_bisecting_an_edge_pins_the_oldest_age() -> None:
    """The attack the grid answers (what remains open without one: README)."""
    sites = two_sites()
    oldest = pooled()["age"].max()
    width = bisect_top(sites, 60.0, 150.0, 0.01)
    assert width <= 0.02  # known to a hundredth of a year
    assert oldest > 60.0


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
    with pytest.raises(DisclosureRefused, match="multiples of 5"):
        encrypted.describe(gridded_sites()[0], ["age"], bounds={"age": (0, 83.7)})


def test_on_the_grid_ordinary_histograms_and_bounds_are_answered_exactly() -> None:
    sites, rows = gridded_sites()
    edges = [20, 40, 50, 60, 70, 100]
    table = encrypted.histogram(sites, "age", edges)
    expected, _ = np.histogram(rows["age"], bins=edges)
    assert table["count"].tolist() == expected.tolist()
    wide = encrypted.describe(gridded_sites()[0], ["age"], bounds={"age": (0, 120)})
    assert wide.loc["mean", "age"] == pytest.approx(rows["age"].mean(), abs=1e-9)
    sbp = encrypted.histogram(gridded_sites()[0], "sbp", [0, 127.3, 400])
    assert int(sbp["count"].sum()) == len(rows)  # columns off the grid: any edges


def test_a_grid_must_be_positive() -> None:
    from healthlab.errors import InvalidInput

    with pytest.raises(InvalidInput, match="grid widths"):
        DisclosurePolicy(grid={"age": 0})
    assert DisclosurePolicy(grid={"age": 5}) == GRID
    hash(GRID)
