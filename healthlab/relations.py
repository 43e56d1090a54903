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

The same holds for a column that is a function of others the formulas can also
write: ``age_sq = age²`` beside ``I(age ** 2)``, ``age_x_bmi = age · bmi`` beside
``age:bmi``, a stored logarithm beside ``np.log(age)``, a ratio (``bmi =
weight / height²``, whose logarithm is ``log weight − 2 log height``). So a
column is tried, besides as an affine function of its basis, as an affine
function of one family of the basis' transforms with the values — squares and
products, logarithms, ``log1p``, square roots — and its logarithm as one of the
values or of their logarithms (:data:`FAMILIES`).

Found greedily in the frame's column order, so the basis is the same for every
query: each value column (more than one value besides 0) is tried against the
columns before it that are not themselves functions of others. Not found: a
relation outside those families (an exponent of a product, a piecewise function
through a 0/1 flag, a rounded transform), one on a site of too few rows to tell
it from chance (fewer than twice a family's terms and 3), or one that fails on as
many rows as the site's minimum or more (README, "What is proven").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

__all__ = ["FAMILIES", "Feature", "Relation", "Relations", "find_relations"]

#: Rows a relation between columns is first tried on (then confirmed on all).
SAMPLE = 2048
#: Random small samples a relation that fails on a few rows is fitted on.
TRIALS = 4


@dataclass(frozen=True)
class Feature:
    """A function of one or two basis columns a relation is affine in: the
    column's ``value``, its ``square``, ``log``, ``log1p`` or ``sqrt``, or the
    ``product`` of two."""

    kind: str
    columns: tuple[str, ...]

    def __str__(self) -> str:
        if self.kind == "value":
            return self.columns[0]
        if self.kind == "product":
            return "*".join(self.columns)
        if self.kind == "square":
            return f"{self.columns[0]}**2"
        return f"{self.kind}({self.columns[0]})"

    def evaluate(self, values: Mapping[str, np.ndarray]) -> np.ndarray:
        """Its values, from the basis columns'."""
        x = np.asarray(values[self.columns[0]], dtype=float)
        with np.errstate(all="ignore"):
            if self.kind == "value":
                return x
            if self.kind == "square":
                return np.asarray(x * x, dtype=float)
            if self.kind == "product":
                other = np.asarray(values[self.columns[1]], dtype=float)
                return np.asarray(x * other, dtype=float)
            return np.asarray(getattr(np, self.kind)(x), dtype=float)

    def derivative(self, column: str, point: Mapping[str, float]) -> float:
        """Its derivative by one basis column at a point."""
        if column not in self.columns:
            return 0.0
        x = float(point[self.columns[0]])
        if self.kind == "value":
            return 1.0
        if self.kind == "square":
            return 2.0 * x
        if self.kind == "product":
            a, b = self.columns
            return float(point[b]) if column == a else float(point[a])
        if self.kind == "log":
            return 1.0 / x
        if self.kind == "log1p":
            return 1.0 / (1.0 + x)
        return 0.5 / float(np.sqrt(x))


@dataclass(frozen=True)
class Relation:
    """A value column as ``constant + Σ coefficient · feature`` of its basis
    columns (``outer="log"``: its logarithm is), on every row that holds it
    (``exact``) or on all but a few."""

    terms: tuple[tuple[Feature, float], ...]
    constant: float
    outer: str = "value"

    @property
    def columns(self) -> frozenset[str]:
        return frozenset(c for f, _ in self.terms for c in f.columns)

    @property
    def coefficients(self) -> dict[str, float]:
        """Each feature's coefficient, by the feature in words."""
        return {str(f): s for f, s in self.terms}

    @property
    def affine(self) -> bool:
        """Whether the column is an affine function of its basis' values."""
        return self.outer == "value" and all(f.kind == "value" for f, _ in self.terms)

    def words(self) -> str:
        """Its basis columns, in words (never a value)."""
        return " and ".join(repr(c) for c in sorted(self.columns))

    def kind_words(self) -> str:
        """What kind of function of its basis it is, in words (never a value)."""
        kind = "an affine function" if self.affine else "a function"
        return f"{kind} of {self.words()}"

    def evaluate(self, values: Mapping[str, np.ndarray]) -> np.ndarray:
        """The column's values, from its basis columns'."""
        inner = self.constant + sum(
            (s * f.evaluate(values) for f, s in self.terms), np.float64(0.0)
        )
        if self.outer == "log":
            with np.errstate(all="ignore"):
                return np.asarray(np.exp(inner), dtype=float)
        return np.asarray(inner, dtype=float)

    def gradient(self, point: Mapping[str, float]) -> dict[str, float]:
        """Its derivatives by each basis column at a point (an affine relation's:
        its coefficients, anywhere)."""
        out = {
            c: sum(s * f.derivative(c, point) for f, s in self.terms)
            for c in sorted(self.columns)
        }
        if self.outer == "log":
            value = float(self.evaluate({c: np.array([point[c]]) for c in point})[0])
            out = {c: g * value for c, g in out.items()}
        return out


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


#: The families of functions of its basis a column is tried as (each with the
#: basis' values): its own transform (``value``, or its ``log``), and the basis
#: features it is affine in besides the values.
FAMILIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("value", ()),  # age_fu = age + 5, months = 12 age, total = a + b
    ("value", ("square", "product")),  # age_sq = age², age_x_bmi = age · bmi
    ("value", ("log",)),  # log_age = log(age)
    ("value", ("log1p",)),
    ("value", ("sqrt",)),
    ("log", ()),  # exp_x = e^x
    ("log", ("log",)),  # ratios and powers: bmi = weight / height²
)


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
        basis_relations = list(_candidates(v, usable, values, present))
        found = None
        for outer, target, features in basis_relations:
            if present.size < len(features) + 3:
                continue
            fit = _exact(target, features, values, present)
            if fit is not None:
                found = _relation(target, features, values, present, fit, outer)
                if found is not None:
                    break
        if found is not None:
            exact[column] = found
            continue
        if not usable or present.size < 4 * min_rows:
            basis.append(column)
            continue
        # all rows but a few: fitted on small random samples (which miss the few
        # with high odds), against the earlier basis (affine: also each column
        # alone) and each family of its transforms
        tries = basis_relations[:1] + [
            (o, t, [f]) for o, t, fs in basis_relations[:1] for f in fs
        ] * (len(usable) > 1)
        tries += basis_relations[1:]
        for outer, target, features in tries:
            if present.size < 2 * (len(features) + 1):
                continue
            fit = _all_but_few(target, features, values, present, min_rows, rng)
            if fit is not None:
                relation = _relation(target, features, values, present, fit, outer)
                if relation is not None:
                    near[column] = relation
                    break
        if column not in near:
            # (a column refused for its near relation is no basis for others:
            # they are tried against the columns it nearly equals)
            basis.append(column)
    return Relations(exact, near)


def _candidates(
    v: np.ndarray, basis: list[str], values: dict[str, np.ndarray], present: np.ndarray
) -> list[tuple[str, np.ndarray, list[Feature]]]:
    """The families a column is tried as, where they are defined on its rows:
    (its transform, that transform of its values, the basis features)."""
    if not basis:
        return []
    positive = bool(np.all(v[present] > 0))
    out = []
    for outer, kinds in FAMILIES:
        if outer == "log" and not positive:
            continue
        features = [Feature("value", (b,)) for b in basis]
        for kind in kinds:
            if kind == "product":
                features += [
                    Feature("product", (a, b))
                    for i, a in enumerate(basis)
                    for b in basis[i + 1 :]
                ]
                continue
            for b in basis:
                x = values[b][present]
                domain = {"log": x > 0, "log1p": x > -1, "sqrt": x >= 0}.get(kind)
                if domain is None or np.all(domain):
                    features.append(Feature(kind, (b,)))
        if kinds and len(features) == len(basis):
            continue  # none of the family's transforms is defined here
        with np.errstate(all="ignore"):
            target = np.log(v) if outer == "log" else v
        out.append((outer, target, features))
    return out


def _relation(
    target: np.ndarray,
    features: list[Feature],
    values: dict[str, np.ndarray],
    present: np.ndarray,
    fit: tuple[float, np.ndarray],
    outer: str,
) -> Relation | None:
    """A fit as a relation on the features it uses (None: on none, a constant)."""
    constant, coefficients = fit
    scale = max(1.0, float(np.abs(target[present]).max()))
    terms = tuple(
        (f, float(c))
        for f, c in zip(features, coefficients, strict=True)
        if abs(c) * _size(f, values, present) > 1e-12 * scale
    )
    return Relation(terms, float(constant), outer) if terms else None


def _size(
    feature: Feature, values: dict[str, np.ndarray], present: np.ndarray
) -> float:
    return max(1.0, float(np.abs(_column(feature, values, present)).max()))


def _column(
    feature: Feature, values: dict[str, np.ndarray], rows: np.ndarray
) -> np.ndarray:
    return feature.evaluate({c: values[c][rows] for c in feature.columns})


def _design(
    features: list[Feature], values: dict[str, np.ndarray], rows: np.ndarray
) -> np.ndarray:
    return np.column_stack(
        [np.ones(rows.size)] + [_column(f, values, rows) for f in features]
    )


def _spread(present: np.ndarray, size: int) -> np.ndarray:
    """At most ``size`` of the rows, spread over them."""
    if present.size <= size:
        return present
    return present[np.linspace(0, present.size - 1, size).astype(np.int64)]


def _solve(design: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Least squares with each column scaled to 1 (the features' sizes differ by
    orders: an age and its square)."""
    scale = np.abs(design).max(axis=0)
    scale[scale == 0] = 1.0
    solution, *_ = np.linalg.lstsq(design / scale, target, rcond=None)
    return np.asarray(solution / scale, dtype=float)


def _residual(
    target: np.ndarray,
    features: list[Feature],
    values: dict[str, np.ndarray],
    rows: np.ndarray,
    solution: np.ndarray,
) -> tuple[np.ndarray, float]:
    """The fit's residual on ``rows`` and its tolerance (rounding of the terms'
    sizes), a feature at a time (a site's rows times its features would not fit
    in memory)."""
    residual = target[rows] - solution[0]
    size = float(np.abs(target[rows]).max(initial=0.0))
    for f, s in zip(features, solution[1:], strict=True):
        x = _column(f, values, rows)
        residual = residual - s * x
        size += abs(float(s)) * float(np.abs(x).max(initial=0.0))
    return residual, 1e-9 * max(1.0, size)


def _sparse(
    target: np.ndarray,
    features: list[Feature],
    values: dict[str, np.ndarray],
    rows: np.ndarray,
) -> np.ndarray | None:
    """An exact fit on ``rows``, on the features it uses (a refit on them: a
    data dictionary's relation has few terms, and rounding leaves others tiny)."""
    design = _design(features, values, rows)
    # one feature first (a square, a logarithm, a product: found alone, also
    # beside basis columns that are close to collinear with it on these rows)
    for i, feature in enumerate(features):
        one = _solve(design[:, [0, i + 1]], target[rows])
        residual, tolerance = _residual(target, [feature], values, rows, one)
        if float(np.abs(residual).max(initial=0.0)) <= tolerance:
            full = np.zeros(len(features) + 1)
            full[[0, i + 1]] = one
            return full
    solution = _solve(design, target[rows])
    residual, tolerance = _residual(target, features, values, rows, solution)
    if float(np.abs(residual).max(initial=0.0)) > tolerance:
        return None
    sizes = np.abs(solution[1:]) * np.abs(design[:, 1:]).max(axis=0, initial=0.0)
    keep = [
        i for i, z in enumerate(sizes) if z > 1e-7 * max(float(sizes.max()), 1e-300)
    ]
    if len(keep) < len(features):
        reduced = _solve(design[:, [0, *(i + 1 for i in keep)]], target[rows])
        chosen = [features[i] for i in keep]
        residual, tolerance = _residual(target, chosen, values, rows, reduced)
        if float(np.abs(residual).max(initial=0.0)) <= tolerance:
            full = np.zeros(len(features) + 1)
            full[0] = reduced[0]
            full[[i + 1 for i in keep]] = reduced[1:]
            solution = full
    return solution


def _exact(
    target: np.ndarray,
    features: list[Feature],
    values: dict[str, np.ndarray],
    present: np.ndarray,
) -> tuple[float, np.ndarray] | None:
    """``target`` as ``c + Σ s_i · features_i`` on the rows ``present``, exactly
    (to rounding), or None: tried on a sample of rows, then confirmed on all."""
    sample = _spread(present, SAMPLE)
    solution = _sparse(target, features, values, sample)
    if solution is None:
        return None
    residual, tolerance = _residual(target, features, values, present, solution)
    if float(np.abs(residual).max(initial=0.0)) > tolerance:
        return None
    return float(solution[0]), solution[1:]


def _all_but_few(
    target: np.ndarray,
    features: list[Feature],
    values: dict[str, np.ndarray],
    present: np.ndarray,
    min_rows: int,
    rng: np.random.Generator,
) -> tuple[float, np.ndarray] | None:
    """``target`` as an affine function of ``features`` on all of ``present`` but
    1 to ``min_rows − 1`` rows, or None."""
    size = len(features) + 1
    screen = _spread(present, SAMPLE)
    for _ in range(TRIALS):
        rows = rng.choice(present, size=min(present.size, 2 * size), replace=False)
        solution = _solve(_design(features, values, rows), target[rows])
        residual, tolerance = _residual(target, features, values, screen, solution)
        if int((np.abs(residual) > tolerance).sum()) >= min_rows:
            continue
        residual, tolerance = _residual(target, features, values, present, solution)
        off = int((np.abs(residual) > tolerance).sum())
        if 0 < off < min_rows:
            return float(solution[0]), solution[1:]
    return None
