"""Kaplan–Meier and the log-rank test across sites (issue 14), against lifelines on
the pooled rows with durations rounded up to the grid; and the rules a survival
table's cells meet (the cell rule, cells one site holds)."""

from __future__ import annotations

import warnings
from functools import cache

import numpy as np
import pandas as pd
import pytest
from lifelines import KaplanMeierFitter
from lifelines.datasets import load_gbsg2, load_lung, load_rossi
from lifelines.statistics import multivariate_logrank_test

from healthlab import Site, encrypted
from healthlab.encrypted.survival import ceil_to_grid, kaplan_meier
from healthlab.errors import DataRefused, DisclosureRefused, InvalidInput, TooFewSites

ATOL = 1e-12  # survival, its CI (probabilities) and the log-rank statistic


@cache
def lung() -> pd.DataFrame:
    frame = load_lung()
    frame["sex"] = frame["sex"].map({1: "male", 2: "female"})
    return frame


def arms() -> pd.DataFrame:
    """Three arms of a synthetic trial (exponential times, uniform censoring)."""
    rng = np.random.default_rng(11)
    arm = rng.choice(["a", "b", "c"], 1500)
    rate = pd.Series({"a": 0.2, "b": 0.3, "c": 0.45})[arm].to_numpy()
    time = rng.exponential(1 / rate)
    censor = rng.uniform(0, 12, 1500)
    return pd.DataFrame(
        {"time": np.minimum(time, censor), "event": (time <= censor).astype(float)}
        | {"arm": arm}
    )


#: (data, duration, event, grid, by, sites): grids with every site's cells 0 or at
#: least 3 rows (finer ones are merged, or refused with merge=False: the cell rule)
CASES = {
    "rossi": (load_rossi, "week", "arrest", [0, 20, 40, 52], "fin", 3),
    "lung": (lung, "time", "status", [0, 500, 1100], None, 2),
    "gbsg2": (load_gbsg2, "time", "cens", [0, 700, 1400, 2700], "horTh", 2),
    "three arms": (arms, "time", "event", [0, 1, 2, 4], "arm", 2),
}


def rounded(frame: pd.DataFrame, duration: str, event: str, grid: list[float]):
    """Durations up to the grid; rows beyond it censored after its end."""
    t = ceil_to_grid(frame[duration].to_numpy(), grid)
    e = np.where(np.isfinite(t), frame[event].to_numpy(), 0)
    return np.where(np.isfinite(t), t, grid[-1] + 1), e


def three_sites(frame: pd.DataFrame, n: int = 3) -> dict[str, pd.DataFrame]:
    shuffled = frame.sample(frac=1.0, random_state=3).reset_index(drop=True)
    return {f"s{i}": shuffled.iloc[i::n] for i in range(n)}


@pytest.mark.parametrize("name", sorted(CASES))
def test_kaplan_meier_equals_lifelines_on_the_grid(name: str) -> None:
    load, duration, event, grid, _, n = CASES[name]
    frame = load()
    km = kaplan_meier(three_sites(frame, n), duration, event, grid=grid)
    t, e = rounded(frame, duration, event, grid)
    reference = KaplanMeierFitter().fit(t, e)
    expected = reference.survival_function_.reindex(grid[1:]).iloc[:, 0]
    assert np.abs(km.table["survival"].to_numpy() - expected.to_numpy()).max() <= ATOL
    bounds = reference.confidence_interval_.reindex(grid[1:]).to_numpy()
    got = km.table[["lower", "upper"]].to_numpy()
    assert np.abs(got - bounds).max() <= ATOL
    # the counts are exact: at risk at each interval's start, events in it
    table = reference.event_table
    for row in km.table.itertuples():
        assert row.events == int(table.loc[row.time, "observed"])
        assert row.at_risk == int(table.loc[row.time, "at_risk"])
    assert km.receipt["kind"] == "kaplan_meier"
    s = km.survival_function()
    assert s.iloc[0] == 1.0 and s.index[0] == 0
    assert km.median() == (
        float(expected[expected <= 0.5].index[0]) if (expected <= 0.5).any() else np.inf
    )


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if c[4]))
def test_the_log_rank_test_equals_lifelines(name: str) -> None:
    load, duration, event, grid, by, n = CASES[name]
    frame = load()
    km = kaplan_meier(three_sites(frame, n), duration, event, grid=grid, by=by)
    t, e = rounded(frame, duration, event, grid)
    with warnings.catch_warnings():  # lifelines' own use of pandas
        warnings.simplefilter("ignore", pd.errors.Pandas4Warning)
        reference = multivariate_logrank_test(t, frame[by].astype(str), e)
    assert km.logrank is not None
    assert km.logrank["statistic"] == pytest.approx(reference.test_statistic, abs=1e-9)
    assert km.logrank["p_value"] == pytest.approx(reference.p_value, rel=1e-9)
    assert km.logrank["df"] == reference.degrees_of_freedom
    for level, rows in frame.groupby(frame[by].astype(str)):
        tg, eg = rounded(rows, duration, event, grid)
        curve = KaplanMeierFitter().fit(tg, eg).survival_function_
        expected = curve.reindex(grid[1:]).ffill().iloc[:, 0].to_numpy()
        mine = km.table[km.table["group"] == level]["survival"].to_numpy()
        assert np.abs(mine - expected).max() <= ATOL


def test_a_fine_grid_with_cells_of_one_or_two_rows_is_refused() -> None:
    """rossi over 3 sites in 4-week intervals: a site's interval holds 1-2 events."""
    with pytest.raises(DisclosureRefused, match="fewer than 3 rows"):
        kaplan_meier(three_sites(load_rossi()), "week", "arrest", grid=range(0, 8, 4))


def test_a_cell_only_one_site_holds_is_refused() -> None:
    """Only site a follows patients past week 40: the last interval's counts would
    be a's own."""
    frame = load_rossi()
    early = frame[frame.week <= 40]
    sites = {"a": frame.iloc[::2], "b": early.iloc[1::2]}
    with pytest.raises(TooFewSites, match="a cell of the grid"):
        kaplan_meier(sites, "week", "arrest", grid=[0, 20, 40, 52], merge=False)


def test_bad_survival_input_is_refused_with_what_to_do() -> None:
    sites = three_sites(load_rossi())
    with pytest.raises(InvalidInput, match="starting at 0"):
        kaplan_meier(sites, "week", "arrest", grid=[10, 20])
    with pytest.raises(DisclosureRefused, match="2 significant digit"):
        kaplan_meier(sites, "week", "arrest", grid=[0, 20, 40, 52.5])
    negative = {k: v.assign(week=-v.week) for k, v in sites.items()}
    with pytest.raises(DataRefused, match="must be positive"):
        kaplan_meier(negative, "week", "arrest", grid=[0, 20, 40, 52])
    coded = {k: v.assign(arrest=v.arrest * 2) for k, v in sites.items()}
    with pytest.raises(DataRefused, match="0 \\(censored\\)") as refused:
        kaplan_meier(coded, "week", "arrest", grid=[0, 20, 40, 52])
    assert "2.0" not in str(refused.value)


def test_gated_sites_answer_survival_like_any_statistic() -> None:
    """The same curve from Site objects as from frames (and it is exported)."""
    frames = three_sites(load_rossi())
    sites = [Site(k, f) for k, f in frames.items()]
    a = encrypted.kaplan_meier(sites, "week", "arrest", grid=[0, 20, 40, 52])
    b = kaplan_meier(frames, "week", "arrest", grid=[0, 20, 40, 52])
    pd.testing.assert_frame_equal(a.table, b.table)


# ------------------------------------------------------------- merging intervals
def test_cells_below_the_minimum_are_merged_and_the_curve_is_exact_there(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """rossi over 3 sites in 4-week intervals: the grid times whose intervals hold
    1-2 events at a site are removed, and the curve on the grid left equals
    lifelines there; the receipt covers both queries."""
    frame = load_rossi()
    sites = three_sites(frame)
    with caplog.at_level("WARNING", logger="healthlab.encrypted.survival"):
        km = kaplan_meier(sites, "week", "arrest", grid=range(0, 56, 4))
    assert km.requested_grid == [float(t) for t in range(0, 56, 4)]
    assert km.merged and set(km.merged).isdisjoint(km.grid)
    assert sorted([*km.grid, *km.merged]) == km.requested_grid
    assert 2 < len(km.grid) < len(km.requested_grid)  # merged, not collapsed
    assert "removed" in caplog.text
    t, e = rounded(frame, "week", "arrest", km.grid)
    reference = KaplanMeierFitter().fit(t, e)
    expected = reference.survival_function_.reindex(km.grid[1:]).iloc[:, 0]
    assert np.abs(km.table["survival"].to_numpy() - expected.to_numpy()).max() <= ATOL
    # every site's cells on the grid used are empty or at least 3 rows
    for part in sites.values():
        index = np.searchsorted(km.grid, part["week"], side="left")
        for flag in (0, 1):
            cells = np.bincount(index[part["arrest"] == flag], minlength=len(km.grid))
            inner = cells[1 : len(km.grid)]
            assert np.all((inner == 0) | (inner >= 3))
    kinds = [q["kind"] for q in km.receipt["queries"]]
    assert kinds == ["survival_grid", "survival"]
    assert km.receipt["parameters"]["requested_grid"] == km.requested_grid


def test_merging_can_be_turned_off_and_then_the_grid_is_refused() -> None:
    with pytest.raises(DisclosureRefused, match="fewer than 3 rows"):
        kaplan_meier(
            three_sites(load_rossi()),
            "week",
            "arrest",
            grid=range(0, 56, 4),
            merge=False,
        )


def test_a_cell_only_one_site_holds_is_merged_into_the_interval_before() -> None:
    """Only site a follows patients past week 40 (b's censorings are earlier):
    (40, 52] joins (20, 40]."""
    frame = load_rossi()
    early = frame[frame.week <= 40].iloc[1::2].copy()
    middle = early.index[(early.week > 20)][:10]
    early.loc[middle, "arrest"] = 0  # lost to follow-up between weeks 20 and 40
    sites = {"a": frame.iloc[::2], "b": early}
    km = kaplan_meier(sites, "week", "arrest", grid=[0, 20, 40, 52])
    assert km.grid == [0.0, 20.0, 52.0] and km.merged == [40.0]
    pooled = pd.concat(list(sites.values()))
    t, e = rounded(pooled, "week", "arrest", km.grid)
    reference = KaplanMeierFitter().fit(t, e).survival_function_
    expected = reference.reindex(km.grid[1:]).iloc[:, 0].to_numpy()
    assert np.abs(km.table["survival"].to_numpy() - expected).max() <= ATOL


def test_merging_sends_only_flags_never_a_count() -> None:
    """The merge plan's pooled totals are sums of 0/1 flags (at most the number of
    sites), and adding rows to a cell that is already large changes none of them:
    no count reaches the researcher through the plan."""
    frame = load_rossi()
    sites = three_sites(frame)
    km = kaplan_meier(sites, "week", "arrest", grid=range(0, 56, 4))
    more = dict(sites)
    extra = sites["s0"][(sites["s0"].week > 48) & (sites["s0"].arrest == 0)]
    more["s0"] = pd.concat([sites["s0"], extra.iloc[:5].assign(week=50)])
    # other sites (the same ones again would difference s0's new rows: refused)
    again = kaplan_meier(
        {f"m{k}": v for k, v in more.items()}, "week", "arrest", grid=range(0, 56, 4)
    )
    assert again.grid == km.grid
    # the plan's totals, as the key holder decrypted them (its receipt holds only
    # hashes, so ask the run itself)
    from healthlab.encrypted.keys import KeyHolder
    from healthlab.encrypted.stats import _run

    grid = [float(t) for t in range(0, 56, 4)]
    spec = {
        "duration": "week",
        "event": "arrest",
        "by": None,
        "groups": [],
        "grid": grid,
        "population": [],
        "columns": ["week", "arrest"],
    }
    intervals = len(grid) - 1
    size = 1 + (intervals - 1) + intervals * (intervals + 1)
    plans = [
        _run(
            list(Site(k, v) for k, v in s.items()),
            "survival_grid",
            spec,
            size,
            keys=KeyHolder(),
            researcher=None,
            min_sites=2,
            min_rows=0,
            on_refusal="raise",
        ).totals[1:]
        for s in (sites, more)
    ]
    for totals in plans:
        values = np.asarray(totals, dtype=float)
        assert np.allclose(values, np.rint(values), atol=1e-6)
        assert values.min() >= -1e-6 and values.max() <= 3 + 1e-6
    np.testing.assert_allclose(plans[0], plans[1], atol=1e-6)


def test_a_site_no_merging_can_help_still_refuses() -> None:
    """A site whose only events, over the whole grid, are 2 rows: no merge makes
    its cell releasable, so the curve is refused (the rule is the sites')."""
    frame = load_rossi()
    sites = three_sites(frame)
    small = sites["s2"]
    sites["s2"] = pd.concat(
        [small[small.arrest == 0], small[small.arrest == 1].iloc[:2]]
    )
    with pytest.raises(DisclosureRefused, match="fewer than 3 rows"):
        kaplan_meier(sites, "week", "arrest", grid=[0, 20, 40, 52])


@pytest.mark.parametrize("seed", range(40))
def test_local_merges_leave_every_cell_empty_or_releasable(seed: int) -> None:
    from healthlab.encrypted.survival import local_merges

    rng = np.random.default_rng(seed)
    intervals = int(rng.integers(2, 15))
    cells = rng.choice([0, 0, 1, 2, 3, 5, 9], size=(int(rng.integers(1, 5)), intervals))
    flags = local_merges(cells, 3)
    assert flags.shape == (intervals - 1,)
    ends = [j for j in range(intervals - 1) if flags[j] == 0] + [intervals - 1]
    start = 0
    runs = []
    for end in ends:
        runs.append(cells[:, start : end + 1].sum(axis=1))
        start = end + 1
    good = [bool(np.all((r == 0) | (r >= 3))) for r in runs]
    # every run is releasable, unless the whole grid is one run that is not
    assert all(good) or (len(runs) == 1)
    # and a boundary is removed only when needed: the untouched grid's
    # intervals are all releasable exactly when nothing is removed
    fine = bool(np.all((cells == 0) | (cells >= 3)))
    assert fine == (flags.sum() == 0)
