"""The citizen health score: range, reference points, monotonicity, weights, gaps."""

from __future__ import annotations

import math
import traceback
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from healthlab.data import DataValidationError, city_days
from healthlab.errors import InvalidInput
from healthlab.score import (
    DEFAULT_WEIGHTS,
    FACTORS,
    health_score,
    normalize,
    score_breakdown,
    validate_weights,
)

#: A day that scores full marks on every factor.
BEST = {
    "humidity": 50.0,
    "temperature": 21.0,
    "uv_index": 1.0,
    "bmi": 22.0,
    "calories_burned": 400.0,
    "steps": 12_000.0,
    "resting_hr": 55.0,
}
#: A day that scores nothing on any factor.
WORST = {
    "humidity": 98.0,
    "temperature": 40.0,
    "uv_index": 12.0,
    "bmi": 45.0,
    "calories_burned": 0.0,
    "steps": 0.0,
    "resting_hr": 120.0,
}


def frame(*rows: dict[str, float]) -> pd.DataFrame:
    return pd.DataFrame(list(rows))


def score_of(row: dict[str, float], **kwargs: Any) -> float:
    return float(health_score(frame(row), **kwargs).iloc[0])


def plausible(name: str) -> st.SearchStrategy[float]:
    """Inputs across (and beyond) a factor's curve, within what is possible."""
    low, high = FACTORS[name].valid
    return st.floats(low, high, allow_nan=False)


day = st.fixed_dictionaries({name: plausible(name) for name in FACTORS})
day_with_gaps = st.fixed_dictionaries(
    {name: st.one_of(plausible(name), st.just(math.nan)) for name in FACTORS}
)


# ------------------------------------------------------------ reference points
@pytest.mark.parametrize(
    ("factor", "value", "expected"),
    [
        ("bmi", 15.0, 0.0),  # severe thinness
        ("bmi", 18.5, 1.0),  # WHO normal weight starts
        ("bmi", 24.9, 1.0),
        ("bmi", 30.0, 0.5),  # obese class I starts
        ("bmi", 40.0, 0.0),  # obese class III
        ("steps", 0.0, 0.0),
        ("steps", 5000.0, 0.5),  # sedentary below
        ("steps", 10_000.0, 1.0),  # active
        ("steps", 25_000.0, 1.0),  # plateau: more never hurts
        ("calories_burned", 300.0, 1.0),  # ~2000 kcal/week
        ("calories_burned", 75.0, 0.25),
        ("resting_hr", 60.0, 1.0),
        ("resting_hr", 80.0, 0.6),
        ("resting_hr", 100.0, 0.0),  # tachycardia
        ("temperature", 18.0, 1.0),
        ("temperature", 29.5, 0.5),
        ("temperature", -5.0, 0.0),
        ("humidity", 50.0, 1.0),  # 40-60 % optimal
        ("humidity", 75.0, 0.5),
        ("uv_index", 2.0, 1.0),  # WHO low
        ("uv_index", 6.0, 0.55),  # high
        ("uv_index", 11.0, 0.0),  # extreme
    ],
)
def test_factors_follow_their_cited_reference_points(
    factor: str, value: float, expected: float
) -> None:
    got = normalize(pd.DataFrame({factor: [value]}), [factor])[factor].iloc[0]
    assert got == pytest.approx(expected, abs=1e-12), (factor, value)


def test_best_and_worst_days_score_100_and_0() -> None:
    assert score_of(BEST) == pytest.approx(100.0, abs=1e-9)
    assert score_of(WORST) == 0.0


def test_documented_example_scores_as_stated() -> None:
    day_ = {"humidity": 50, "temperature": 21, "uv_index": 3, "bmi": 23}
    day_ |= {"calories_burned": 320, "steps": 6000, "resting_hr": 64}
    row = score_breakdown(pd.DataFrame([day_])).iloc[0]
    # uv 3 → 0.9, steps 6000 → 0.62, resting 64 → 0.92; the rest → 1
    assert row["uv_index"] == pytest.approx(100 * 0.1 * 0.9)
    assert row["steps"] == pytest.approx(100 * 0.2 * 0.62)
    assert row["resting_hr"] == pytest.approx(100 * 0.2 * 0.92)
    assert row["score"] == pytest.approx(100 - 1.0 - 7.6 - 1.6)


# ----------------------------------------------------------------- properties
@settings(max_examples=200, deadline=None)
@given(day_with_gaps)
def test_score_is_within_0_and_100_or_nan_below_min_coverage(
    row: dict[str, float],
) -> None:
    out = score_breakdown(frame(row)).iloc[0]
    measured = sum(DEFAULT_WEIGHTS[n] for n, v in row.items() if not math.isnan(v))
    assert out["coverage"] == pytest.approx(measured)
    if measured < 0.5 - 1e-9:
        assert math.isnan(out["score"])
    else:
        assert 0.0 <= out["score"] <= 100.0


@settings(max_examples=200, deadline=None)
@given(day_with_gaps)
def test_breakdown_sums_to_the_score(row: dict[str, float]) -> None:
    out = score_breakdown(frame(row), min_coverage=0.1).iloc[0]
    points = out[list(FACTORS)]
    if math.isnan(out["score"]):
        assert points.isna().all()
        return
    assert points.sum() == pytest.approx(out["score"], abs=1e-9)
    for name, value in row.items():
        assert math.isnan(points[name]) == math.isnan(value), name


def along(row: dict[str, float], factor: str, values: np.ndarray) -> np.ndarray:
    """Scores of ``row`` with ``factor`` set to each of ``values`` in turn."""
    rows = pd.DataFrame([row] * len(values))
    rows[factor] = values
    return health_score(rows).to_numpy()


def grid(factor: str, extra: list[float]) -> np.ndarray:
    """A fine grid over the factor's possible inputs, plus Hypothesis' picks."""
    low, high = FACTORS[factor].valid
    top = min(high, 4 * FACTORS[factor].points[-1][0] + 10)
    return np.unique(np.concatenate([np.linspace(low, top, 2001), extra]))


@settings(max_examples=50, deadline=None)
@given(day_with_gaps, st.lists(plausible("steps"), max_size=5))
def test_more_steps_never_lower_the_score(
    row: dict[str, float], extra: list[float]
) -> None:
    scores = along(row, "steps", grid("steps", extra))
    assert (np.diff(scores[~np.isnan(scores)]) >= 0).all()


@settings(max_examples=50, deadline=None)
@given(day_with_gaps, st.lists(plausible("calories_burned"), max_size=5))
def test_more_active_calories_never_lower_the_score(
    row: dict[str, float], extra: list[float]
) -> None:
    scores = along(row, "calories_burned", grid("calories_burned", extra))
    assert (np.diff(scores[~np.isnan(scores)]) >= 0).all()


@settings(max_examples=50, deadline=None)
@given(day_with_gaps, st.lists(plausible("uv_index"), max_size=5))
def test_higher_uv_never_raises_the_score(
    row: dict[str, float], extra: list[float]
) -> None:
    scores = along(row, "uv_index", grid("uv_index", extra))
    assert (np.diff(scores[~np.isnan(scores)]) <= 0).all()


@pytest.mark.parametrize(("fewer", "more"), [(0, 3000), (4000, 6000), (7000, 9900)])
def test_steps_raise_the_score_strictly_below_the_active_threshold(
    fewer: float, more: float
) -> None:
    assert score_of(BEST | {"steps": fewer}) < score_of(BEST | {"steps": more})


def test_rows_are_scored_independently_and_keep_the_index() -> None:
    rows = frame(BEST, WORST, BEST | {"steps": 5000.0})
    rows.index = pd.Index([10, 3, 7])
    scores = health_score(rows)
    assert scores.index.tolist() == [10, 3, 7]
    for label, row in zip([10, 3, 7], rows.to_dict("records"), strict=True):
        assert scores[label] == pytest.approx(score_of(row))


# ------------------------------------------------------------------- weights
def test_default_weights_are_valid_and_cover_every_factor() -> None:
    assert validate_weights() == DEFAULT_WEIGHTS
    assert set(DEFAULT_WEIGHTS) == set(FACTORS)
    assert math.fsum(DEFAULT_WEIGHTS.values()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ({"steps": 0.5, "happiness": 0.5}, "unknown factor.*happiness"),
        ({"steps": 1.2, "bmi": -0.2}, "bmi.*>= 0"),
        ({"steps": math.nan, "bmi": 1.0}, "steps.*finite"),
        ({"steps": math.inf}, "steps.*finite"),
        ({"steps": True}, "steps.*number"),
        ({"steps": "1"}, "steps.*number"),
        ({"steps": 0.5, "bmi": 0.4}, "sum to 1, not 0.9"),
        ({}, "sum to 1, not 0"),
        ([("steps", 1.0)], "mapping"),
    ],
)
def test_bad_weights_are_refused_with_the_reason(weights: Any, match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        validate_weights(weights)
    with pytest.raises(InvalidInput, match=match):
        health_score(frame(BEST), weights)


def test_custom_weights_change_the_score_and_unweighted_columns_may_be_absent() -> None:
    only_activity = {"steps": 0.5, "calories_burned": 0.5}
    rows = frame({"steps": 5000.0, "calories_burned": 300.0})
    breakdown = score_breakdown(rows, only_activity).iloc[0]
    assert breakdown["score"] == pytest.approx(100 * (0.5 * 0.5 + 0.5 * 1.0))
    assert breakdown["bmi"] == 0.0 and breakdown["coverage"] == 1.0
    with pytest.raises(InvalidInput, match=r"lacks column.*bmi"):
        health_score(rows)


# ------------------------------------------------------------- missing inputs
def test_a_missing_factor_is_left_out_and_the_rest_reweighted() -> None:
    row = BEST | {"steps": math.nan, "uv_index": 11.0}
    out = score_breakdown(frame(row)).iloc[0]
    kept = 1.0 - DEFAULT_WEIGHTS["steps"]
    assert out["coverage"] == pytest.approx(kept)
    assert math.isnan(out["steps"])
    assert out["score"] == pytest.approx(
        100 * (kept - DEFAULT_WEIGHTS["uv_index"]) / kept
    )


def test_too_little_measured_gives_nan_unless_min_coverage_allows() -> None:
    personal = ["bmi", "calories_burned", "steps", "resting_hr"]
    row = BEST | dict.fromkeys(personal, math.nan)  # only the city's 30 % is known
    assert math.isnan(score_of(row))
    assert score_of(row, min_coverage=0.3) == pytest.approx(100.0)
    assert math.isnan(score_of(dict.fromkeys(FACTORS, math.nan), min_coverage=0.01))


@pytest.mark.parametrize("min_coverage", [0, -0.5, 1.01, math.nan])
def test_min_coverage_must_be_a_share(min_coverage: float) -> None:
    with pytest.raises(InvalidInput, match="min_coverage"):
        health_score(frame(BEST), min_coverage=min_coverage)


# ------------------------------------------------------------ impossible inputs
@pytest.mark.parametrize(
    ("column", "value", "rule"),
    [
        ("steps", -4321.0, "impossible steps/day"),
        ("humidity", 123.456, "impossible % relative humidity"),
        ("resting_hr", math.inf, "impossible beats/min"),
        ("bmi", "obese-ish", "not a number"),
    ],
)
def test_impossible_inputs_are_refused_by_column_and_row_without_the_value(
    column: str, value: Any, rule: str
) -> None:
    rows = frame(BEST, BEST, BEST).astype({column: object})
    rows.loc[2, column] = value
    with pytest.raises(DataValidationError) as caught:
        health_score(rows)
    exc = caught.value
    assert (exc.column, exc.rows) == (column, (2,))
    assert rule in str(exc)
    text = "".join(traceback.format_exception(exc))
    assert str(value) not in text, "the offending value leaked"


# ---------------------------------------------------------------- the samples
def test_every_sample_day_scores_and_the_city_factors_reflect_the_climates() -> None:
    days = city_days()
    breakdown = score_breakdown(days)
    scores = breakdown["score"]
    assert scores.index.equals(days.index)
    assert scores.notna().all(), "every sample day has at least half the weight"
    assert ((scores >= 0) & (scores <= 100)).all()
    points = breakdown.groupby(days["city_id"]).mean()
    # inland is dry (near the 40-60 % optimum), the coast humid, the north cold and
    # with the least sun
    assert points["humidity"].idxmax() == "inland"
    assert points["humidity"].idxmin() == "coastal"
    assert points["temperature"].idxmin() == "northern"
    assert points["uv_index"].idxmax() == "northern"
