"""The citizen health score: 0–100 per user per day, explained factor by factor.

The score is a weighted mean of seven factors, each first mapped to [0, 1] (1 is
best) by a piecewise-linear curve through points taken from a published reference
range (input→value pairs below). Between the points the curve is linear; beyond
the first and last point it is flat.

``bmi`` (kg/m²): 16→0, 18.5→1, 25→1, 30→0.5, 35→0.25, 40→0.
    WHO BMI classification (WHO Technical Report Series 894, 2000): < 16 severe
    thinness, 18.5–24.9 normal weight, 25–29.9 pre-obese, 30–34.9 / 35–39.9 / ≥ 40
    obese class I / II / III.
``steps`` (per day): 0→0, 5000→0.5, 7500→0.8, 10000→1.
    Tudor-Locke et al. 2011, *Int J Behav Nutr Phys Act* 8:79 (< 5000 sedentary,
    ≥ 10000 active); Paluch et al. 2022, *Lancet Public Health* 7:e219 (mortality
    falls up to 6000–10000 steps/day, then plateaus).
``calories_burned`` (kcal/day of activity, above resting): 0→0, 150→0.5, 300→1.
    Paffenbarger et al. 1986, *N Engl J Med* 314:605 (≥ 2000 kcal/week of activity,
    about 300 kcal/day, lowers mortality); WHO 2020 guidelines on physical activity
    (150–300 min/week of moderate activity).
``resting_hr`` (beats/min): 30→0.5, 40→1, 60→1, 80→0.6, 100→0.
    American Heart Association: a normal adult resting rate is 60–100 bpm, ≥ 100 is
    tachycardia; Zhang et al. 2016, *CMAJ* 188:E53 (mortality rises with the resting
    rate). Below 40 bpm is bradycardia unless trained: half credit at 30.
``temperature`` (°C): 0→0, 18→1, 24→1, 35→0.
    WHO Housing and Health Guidelines 2018 (≥ 18 °C in cold seasons); WHO Europe
    heat-health action plans (health risks rise from about 25–30 °C).
``humidity`` (% relative humidity): 10→0, 40→1, 60→1, 90→0.
    Arundel et al. 1986, *Environ Health Perspect* 65:351 (optimal 40–60 %); ASHRAE
    Standard 55 comfort range.
``uv_index`` (WHO UV index): 2→1, 5→0.7, 7→0.4, 10→0.1, 11→0.
    WHO, Global Solar UV Index: A Practical Guide (2002): 0–2 low, 3–5 moderate, 6–7
    high, 8–10 very high, ≥ 11 extreme.

Consequences the tests hold the score to: more steps (or active calories) never
lower it; a higher UV index never raises it; every factor's value stays in [0, 1],
so the score stays in [0, 100].

Weights (:data:`DEFAULT_WEIGHTS`, or your own mapping) must name known factors
only, be finite and non-negative, and sum to 1; a factor left out has weight 0.

Missing inputs: a factor whose input is missing (NaN) for a row is left out of that
row, and the remaining weights are scaled up to sum to 1 — the score is the
weighted mean of the factors that were measured. ``coverage`` (the weight that was
measured, 0–1) says how much of the score stands on data; when it is below
``min_coverage`` (default 0.5) the row's score is NaN rather than a guess.
Physically impossible inputs (a negative step count, a humidity above 100 %, an
infinite value…) are refused with :class:`~healthlab.data.DataValidationError`.

A score describes one person's day: publish only aggregates, computed with the
sites' disclosure rules (see :mod:`healthlab.encrypted`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Real

import numpy as np
import pandas as pd

from healthlab.data.schemas import failure
from healthlab.errors import InvalidInput

__all__ = [
    "DEFAULT_WEIGHTS",
    "FACTORS",
    "Factor",
    "health_score",
    "normalize",
    "score_breakdown",
    "validate_weights",
]


@dataclass(frozen=True)
class Factor:
    """One input of the score and its normalization curve."""

    name: str
    unit: str
    points: tuple[tuple[float, float], ...]  # (input, value in [0, 1]), rising input
    valid: tuple[float, float]  # physically possible inputs (inclusive)
    reference: str

    def normalize(self, values: np.ndarray | pd.Series) -> np.ndarray:
        """Map inputs to [0, 1] along the curve; NaN stays NaN."""
        x = np.asarray(values, dtype=float)
        xs, ys = zip(*self.points, strict=True)
        out: np.ndarray = np.interp(x, xs, ys)
        out[np.isnan(x)] = np.nan
        return out


FACTORS: dict[str, Factor] = {
    f.name: f
    for f in [
        Factor(
            "humidity",
            "% relative humidity",
            ((10, 0.0), (40, 1.0), (60, 1.0), (90, 0.0)),
            (0, 100),
            "Arundel et al. 1986 (optimal 40-60 %); ASHRAE Standard 55",
        ),
        Factor(
            "temperature",
            "°C",
            ((0, 0.0), (18, 1.0), (24, 1.0), (35, 0.0)),
            (-90, 60),
            "WHO Housing and Health Guidelines 2018; WHO Europe heat-health plans",
        ),
        Factor(
            "uv_index",
            "WHO UV index",
            ((2, 1.0), (5, 0.7), (7, 0.4), (10, 0.1), (11, 0.0)),
            (0, 25),
            "WHO Global Solar UV Index: A Practical Guide (2002)",
        ),
        Factor(
            "bmi",
            "kg/m²",
            ((16, 0.0), (18.5, 1.0), (25, 1.0), (30, 0.5), (35, 0.25), (40, 0.0)),
            (5, 150),
            "WHO BMI classification (TRS 894, 2000)",
        ),
        Factor(
            "calories_burned",
            "kcal/day of activity",
            ((0, 0.0), (150, 0.5), (300, 1.0)),
            (0, 20_000),
            "Paffenbarger et al. 1986 (2000 kcal/week); WHO 2020 activity guidelines",
        ),
        Factor(
            "steps",
            "steps/day",
            ((0, 0.0), (5000, 0.5), (7500, 0.8), (10_000, 1.0)),
            (0, 200_000),
            "Tudor-Locke et al. 2011; Paluch et al. 2022",
        ),
        Factor(
            "resting_hr",
            "beats/min",
            ((30, 0.5), (40, 1.0), (60, 1.0), (80, 0.6), (100, 0.0)),
            (10, 300),
            "AHA normal range 60-100 bpm; Zhang et al. 2016",
        ),
    ]
}

#: Environment 30 %, the person's own measurements 70 %.
DEFAULT_WEIGHTS: dict[str, float] = {
    "humidity": 0.10,
    "temperature": 0.10,
    "uv_index": 0.10,
    "bmi": 0.20,
    "calories_burned": 0.10,
    "steps": 0.20,
    "resting_hr": 0.20,
}


def validate_weights(weights: Mapping[str, float] | None = None) -> dict[str, float]:
    """Checked weights for every factor (0 for those left out); default when None.

    Raises :class:`~healthlab.errors.InvalidInput` for an unknown factor, a weight
    that is not a finite non-negative number, or weights that do not sum to 1.
    """
    if weights is None:
        return dict(DEFAULT_WEIGHTS)
    if not isinstance(weights, Mapping):
        raise InvalidInput("weights must be a mapping {factor: weight}")
    unknown = sorted(str(k) for k in weights if k not in FACTORS)
    if unknown:
        raise InvalidInput(
            f"unknown factor(s) {', '.join(unknown)}: weights may name only "
            f"{', '.join(FACTORS)}"
        )
    for name, weight in weights.items():
        ok = isinstance(weight, Real) and not isinstance(weight, bool)
        if not ok or not math.isfinite(float(weight)) or float(weight) < 0:
            raise InvalidInput(
                f"weight of {name!r} must be a finite number >= 0, not {weight!r}"
            )
    total = math.fsum(float(w) for w in weights.values())
    if not math.isclose(total, 1.0, rel_tol=0, abs_tol=1e-9):
        raise InvalidInput(f"weights must sum to 1, not {total:.12g}: rescale them")
    return {name: float(weights.get(name, 0.0)) for name in FACTORS}


def normalize(
    frame: pd.DataFrame, factors: list[str] | None = None, *, source: str = "input"
) -> pd.DataFrame:
    """Each factor's value in [0, 1] (NaN where its input is missing).

    Raises :class:`~healthlab.data.DataValidationError` naming the column and the
    positions of rows whose input is impossible (values are not shown), and
    :class:`~healthlab.errors.InvalidInput` when a needed column is absent.
    """
    names = list(FACTORS) if factors is None else factors
    absent = [n for n in names if n not in frame.columns]
    if absent:
        raise InvalidInput(
            f"{source} lacks column(s) {', '.join(absent)}: join the wearables with "
            "the city sensors (healthlab.data.city_days), or give those factors "
            "weight 0"
        )
    out = {}
    for name in names:
        factor = FACTORS[name]
        numeric = pd.to_numeric(frame[name], errors="coerce")
        not_number = numeric.isna() & frame[name].notna()
        if not_number.any():
            raise failure(source, name, "not a number", not_number)
        values = numeric.to_numpy(dtype=float, na_value=np.nan)
        low, high = factor.valid
        impossible = ~np.isnan(values) & ~((values >= low) & (values <= high))
        if impossible.any():
            raise failure(
                source,
                name,
                f"impossible {factor.unit} (outside {low}–{high})",
                impossible,
            )
        out[name] = factor.normalize(values)
    return pd.DataFrame(out, index=frame.index)


def score_breakdown(
    frame: pd.DataFrame,
    weights: Mapping[str, float] | None = None,
    *,
    min_coverage: float = 0.5,
) -> pd.DataFrame:
    """The score and the points each factor contributed to it, row by row.

    Returns a frame on ``frame``'s index with one column per factor (its points:
    ``100 × weight × value / coverage``; NaN when its input is missing; 0 when its
    weight is 0), ``coverage`` (the measured share of the weight) and ``score``
    (the sum of the points; NaN when coverage < ``min_coverage``).

    Examples
    --------
    >>> day = {"humidity": 50, "temperature": 21, "uv_index": 3, "bmi": 23}
    >>> day |= {"calories_burned": 320, "steps": 6000, "resting_hr": 64}
    >>> row = score_breakdown(pd.DataFrame([day])).round(1).iloc[0]
    >>> row[["uv_index", "steps", "resting_hr", "score"]].to_dict()
    {'uv_index': 9.0, 'steps': 12.4, 'resting_hr': 18.4, 'score': 89.8}
    """
    chosen = validate_weights(weights)
    if not (isinstance(min_coverage, Real) and 0 < float(min_coverage) <= 1):
        raise InvalidInput(f"min_coverage must be in (0, 1], not {min_coverage!r}")
    used = [name for name, w in chosen.items() if w > 0]
    values = normalize(frame, used)
    w = np.array([chosen[name] for name in used])
    measured = ~np.isnan(values.to_numpy())
    coverage = measured @ w
    enough = coverage >= float(min_coverage) - 1e-12
    with np.errstate(invalid="ignore", divide="ignore"):
        points = 100 * values.to_numpy() * w / coverage[:, None]
    points[~enough] = np.nan
    out = pd.DataFrame(0.0, index=frame.index, columns=list(FACTORS))
    out[used] = points
    out.loc[~enough, :] = np.nan
    out["coverage"] = coverage
    score = np.where(enough, np.nansum(points, axis=1), np.nan)
    out["score"] = np.clip(score, 0.0, 100.0)  # rounding can overshoot 100 by 1 ulp
    return out


def health_score(
    frame: pd.DataFrame,
    weights: Mapping[str, float] | None = None,
    *,
    min_coverage: float = 0.5,
) -> pd.Series:
    """The citizen health score (0–100) of each row (one user on one day).

    Parameters
    ----------
    frame:
        One row per user per day with the factor columns (``humidity``,
        ``temperature``, ``uv_index``, ``bmi``, ``calories_burned``, ``steps``,
        ``resting_hr``), e.g. :func:`healthlab.data.city_days`. Columns of factors
        with weight 0 may be absent.
    weights:
        ``{factor: weight}``, non-negative, summing to 1; default
        :data:`DEFAULT_WEIGHTS`.
    min_coverage:
        The least share of the weight that must be measured for a score; rows below
        it score NaN.

    Examples
    --------
    >>> from healthlab.data import city_days
    >>> scores = health_score(city_days())
    >>> bool(scores.between(0, 100).all())
    True
    """
    breakdown = score_breakdown(frame, weights, min_coverage=min_coverage)
    return breakdown["score"].rename("score")
