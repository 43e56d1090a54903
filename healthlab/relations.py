"""How a site's value columns relate to each other on its rows.

A column that is an affine function of others on every row that holds it
(``age_fu = age + 5``, an age in months, a total of its parts) is one a data
dictionary states: a researcher who knows it turns a statistic of the column into
one of its basis. The models count its functions with theirs
(:func:`healthlab.encrypted.models.value_functions`).

A column that is such a function on all rows *but a few* (one patient followed up
a year late) is worse: beside its basis, every ordinary statistic of it gives
those rows' own — Σ age_fu − Σ age − 5n is that patient's delay, from two
describes over the same rows. The site refuses to compute on such a column
(:meth:`healthlab.sites.Site.rows`); its owner can drop or correct it.

Found greedily in the frame's column order, so the basis is the same for every
query: each value column (more than one value besides 0) is tried against the
columns before it that are not themselves functions of others. Not found: a
relation that is not affine (a logarithm kept as a column), or that fails on as
many rows as the site's minimum or more (README, "What is proven").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

__all__ = ["Relation", "Relations", "find_relations"]

#: Rows a relation between columns is first tried on (then confirmed on all).
SAMPLE = 2048
#: Random small samples a relation that fails on a few rows is fitted on.
TRIALS = 4


@dataclass(frozen=True)
class Relation:
    """A value column as ``constant + Σ coefficient · column`` of its basis, on
    every row that holds it (``exact``) or on all but a few."""

    terms: tuple[tuple[str, float], ...]
    constant: float

    @property
    def columns(self) -> frozenset[str]:
        return frozenset(c for c, _ in self.terms)

    def words(self) -> str:
        """Its basis columns, in words (never a value)."""
        return " and ".join(repr(c) for c, _ in self.terms)


@dataclass(frozen=True)
class Relations:
    """A site's columns that are affine functions of others: on every row that
    holds them (``exact``), or on all but fewer than the site's minimum rows
    (``near``: refused)."""

    exact: dict[str, Relation] = field(default_factory=dict)
    near: dict[str, Relation] = field(default_factory=dict)


def valued(values: np.ndarray) -> bool:
    """Whether a column takes more than one value besides 0 (else it is an
    indicator, or constant: a set of rows, not a value)."""
    finite = values[np.isfinite(values)]
    return bool(np.unique(finite[finite != 0]).size > 1)


def find_relations(frame: pd.DataFrame, min_rows: int) -> Relations:
    """The relations between a site's value columns (see the module)."""
    values: dict[str, np.ndarray] = {}
    for column in frame.columns:
        series = frame[column]
        if not pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(
            series
        ):
            continue
        v = np.asarray(series, dtype=float)
        if valued(v):
            values[str(column)] = v
    exact: dict[str, Relation] = {}
    near: dict[str, Relation] = {}
    basis: list[str] = []
    rng = np.random.default_rng(0)
    for column, v in values.items():
        present = np.flatnonzero(np.isfinite(v))
        usable = [b for b in basis if np.all(np.isfinite(values[b][present]))]
        others = [values[b] for b in usable]
        found = None
        if usable and present.size >= len(usable) + 3:
            found = _affine(v, others, present)
        if found is not None:
            relation = _relation(v, usable, others, present, found)
            if relation is not None:
                exact[column] = relation
                continue
        basis.append(column)
        if not usable or present.size < 4 * min_rows:
            continue
        # all rows but a few: fitted on small random samples (which miss the few
        # with high odds), against all the earlier basis and each column alone
        for chosen in [list(range(len(usable)))] + [[i] for i in range(len(usable))]:
            fit = _all_but_few(v, [others[i] for i in chosen], present, min_rows, rng)
            if fit is not None:
                relation = _relation(
                    v,
                    [usable[i] for i in chosen],
                    [others[i] for i in chosen],
                    present,
                    fit,
                )
                if relation is not None:
                    near[column] = relation
                    break
    return Relations(exact, near)


def _relation(
    v: np.ndarray,
    names: list[str],
    others: list[np.ndarray],
    present: np.ndarray,
    fit: tuple[float, np.ndarray],
) -> Relation | None:
    """A fit as a relation on the columns it uses (None: on none, a constant)."""
    constant, coefficients = fit
    scale = max(1.0, float(np.abs(v[present]).max()))
    terms = tuple(
        (b, float(c))
        for b, c, o in zip(names, coefficients, others, strict=True)
        if abs(c) * max(1.0, float(np.abs(o[present]).max())) > 1e-12 * scale
    )
    return Relation(terms, float(constant)) if terms else None


def _design(others: list[np.ndarray], rows: np.ndarray) -> np.ndarray:
    return np.column_stack([np.ones(rows.size)] + [o[rows] for o in others])


def _tolerance(
    v: np.ndarray, others: list[np.ndarray], present: np.ndarray, solution: np.ndarray
) -> float:
    size = float(np.abs(v[present]).max()) + sum(
        abs(float(s)) * float(np.abs(o[present]).max())
        for s, o in zip(solution[1:], others, strict=True)
    )
    return 1e-9 * max(1.0, size)


def _affine(
    v: np.ndarray, others: list[np.ndarray], present: np.ndarray
) -> tuple[float, np.ndarray] | None:
    """``v`` as ``c + Σ s_i · others_i`` on the rows ``present``, exactly (to
    rounding), or None: tried on a sample of rows, then confirmed on all."""
    if present.size > SAMPLE:
        sample = present[np.linspace(0, present.size - 1, SAMPLE).astype(np.int64)]
    else:
        sample = present
    solution, *_ = np.linalg.lstsq(_design(others, sample), v[sample], rcond=None)
    tolerance = _tolerance(v, others, present, solution)
    for rows in (sample, present):
        residual = v[rows] - _design(others, rows) @ solution
        if float(np.abs(residual).max()) > tolerance:
            return None
    return float(solution[0]), solution[1:]


def _all_but_few(
    v: np.ndarray,
    others: list[np.ndarray],
    present: np.ndarray,
    min_rows: int,
    rng: np.random.Generator,
) -> tuple[float, np.ndarray] | None:
    """``v`` as an affine function of ``others`` on all of ``present`` but 1 to
    ``min_rows − 1`` rows, or None."""
    size = len(others) + 1
    screen = (
        present[np.linspace(0, present.size - 1, SAMPLE).astype(np.int64)]
        if present.size > SAMPLE
        else present
    )
    for _ in range(TRIALS):
        rows = rng.choice(present, size=min(present.size, 2 * size), replace=False)
        solution, *_ = np.linalg.lstsq(_design(others, rows), v[rows], rcond=None)
        tolerance = _tolerance(v, others, present, solution)
        off = np.abs(v[screen] - _design(others, screen) @ solution) > tolerance
        if int(off.sum()) >= min_rows:
            continue
        off = np.abs(v[present] - _design(others, present) @ solution) > tolerance
        if 0 < int(off.sum()) < min_rows:
            return float(solution[0]), solution[1:]
    return None
