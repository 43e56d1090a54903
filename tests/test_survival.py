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
#: least 3 rows (finer ones are refused: the cell rule; intervals are not merged
#: automatically)
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
        kaplan_meier(three_sites(load_rossi()), "week", "arrest", grid=range(0, 56, 4))


def test_a_cell_only_one_site_holds_is_refused() -> None:
    """Only site a follows patients past week 40: the last interval's counts would
    be a's own."""
    frame = load_rossi()
    early = frame[frame.week <= 40]
    sites = {"a": frame.iloc[::2], "b": early.iloc[1::2]}
    with pytest.raises(TooFewSites, match="a cell of the grid"):
        kaplan_meier(sites, "week", "arrest", grid=[0, 20, 40, 52])


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
