"""Cox proportional hazards across sites, exact on a declared time grid.

:func:`coxph` fits the Cox model with Breslow's handling of ties to the pooled rows
of every site, with follow-up times rounded up to a public grid (as
:func:`~healthlab.encrypted.survival.kaplan_meier` counts them): the result equals
statsmodels' ``PHReg(ties="breslow")`` on the grid-rounded times (params and
standard errors to ~1e-10).

**How, without a site's partial likelihood.** Cox's score is not a sum over sites
(each event's term divides by the pooled risk set), so it cannot be summed under
masks. But Breslow's partial likelihood is the profile of a Poisson likelihood
with one baseline log-hazard α_k per grid interval that holds events (Whitehead
1980; Laird & Olivier 1981): each row at risk at grid time t_k contributes a
Poisson term with mean ``exp(α_k + xβ)`` and outcome 1 if it had its event there.
Maximizing over α_k gives ``exp(α_k) = d_k / Σ_{risk set} exp(xβ)``, and what is
left is Breslow's log partial likelihood (plus a constant), with the same β, and
the same covariance of β (the β-block of the inverse information is the inverse
of the profile's curvature). That Poisson model's information matrix and score
*are* sums over rows, hence over sites, and a site computes its own without
expanding its rows: the totals per interval come from reverse cumulative sums.

So a Cox model is one more kind of model for the sites' Newton engine
(:mod:`healthlab.encrypted.models`): a site answers it only at zero, at the
baseline-only start (β = 0, every α_k's score 0) or at a Newton step from an
iterate it answered, verified among the sites before anything leaves them.

**What the totals release, and what the sites audit.** Per grid interval of the
model: the number at risk and the number of events (as Kaplan–Meier releases
them), and sums of the covariates over each risk set, weighted by exp(xβ) at the
iterate. A site registers with its auditor every risk set within every set of
rows two design columns share, every interval's events, and the events within
each column's rows; the rows at risk and the events of each interval must be held
by at least the pooling minimum of sites. A grid too fine for the data is refused
by name (coarsen it), as Kaplan–Meier's is.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from healthlab.encrypted.keys import KeyHolder
from healthlab.encrypted.models import (
    MAX_DOMAIN,
    FunctionLoad,
    FunctionSet,
    ModelFormula,
    ModelKind,
    ModelRows,
    ModelSession,
    _aliased,
    _design,
    _indicators,
    _pairs,
    _shared_rows,
    agree_levels,
    column_relations,
    design_columns,
    design_patterns,
    follow_newton,
    function_loads,
    model_frame,
    pair_supports,
    parse_formula,
    pattern_labels,
    raw_columns,
    value_functions,
    value_sets,
)
from healthlab.encrypted.protocol import Block
from healthlab.encrypted.results import FittedModel
from healthlab.encrypted.stats import (
    SitesLike,
    _full_masks,
    _left_out,
    population_columns,
)
from healthlab.errors import DisclosureRefused, InvalidInput
from healthlab.site_data import numeric_column
from healthlab.sites import Site, as_sites

__all__ = ["CoxResults", "coxph", "model_spec"]

#: The fields of a Cox model's spec (a site refuses any other).
COX_FIELDS = (
    "formula",
    "family",
    "terms",
    "levels",
    "population",
    "duration",
    "event",
    "grid",
    "intervals",
)

#: The rules a site's rows can break (anonymous flags, as a GLM's).
_FLAGS = (
    "the event indicator is not 0 (censored) or 1 (event) at some site",
    "a duration is not positive at some site",
    "a term is not finite (a log of 0 or of a negative number?) at some site",
    "the model has more parameters than the sites' maximum per row at some site; "
    "use fewer covariates",
)


def baseline_name(grid: Sequence[float], j: int) -> str:
    """The name of the baseline log-hazard of grid interval ``j``: (t_{j-1}, t_j]."""
    return f"baseline({grid[j - 1]:g}, {grid[j]:g}]"


def _check_spec(spec: Mapping[str, Any], terms: list[str]) -> list[int]:
    """The baseline coefficients (the first, one per interval of the model), with
    the spec's grid and intervals checked against its terms."""
    grid = spec.get("grid")
    intervals = spec.get("intervals")
    if (
        not isinstance(grid, list)
        or len(grid) < 2
        or not all(isinstance(t, int | float) for t in grid)
        or grid[0] != 0
        or not all(b > a for a, b in itertools.pairwise(grid))
    ):
        raise InvalidInput("a Cox model's grid starts at 0 and strictly increases")
    if (
        not isinstance(intervals, list)
        or not intervals
        or not all(isinstance(j, int) and 1 <= j < len(grid) for j in intervals)
        or not all(b > a for a, b in itertools.pairwise(intervals))
    ):
        raise InvalidInput("a Cox model's intervals are increasing grid intervals")
    names = [baseline_name(grid, j) for j in intervals]
    if terms[: len(names)] != names:
        raise InvalidInput("a Cox model's terms start with its baseline intervals")
    return list(range(len(names)))


# ------------------------------------------------------------------ site side
@dataclass
class _CoxRows:
    """A site's rows of one Cox model, prepared once and used by every iterate."""

    x: np.ndarray  # the covariates (no intercept)
    index: np.ndarray  # each row's grid interval (len(grid): beyond the grid)
    events: np.ndarray  # the rows with their event in an interval of the model
    intervals: np.ndarray
    flags: np.ndarray
    dropped: int
    subsets: dict[str, list[np.ndarray]]
    columns: list[np.ndarray]  # each covariate's rows (over all the site's)
    at_risk: list[np.ndarray]  # each interval's risk set (over all the site's)
    cells: list[np.ndarray]  # each interval's events (over all the site's)
    size: int  # intervals of the grid, beyond included
    #: the other row sets a total sums over, each to be held by enough sites
    #: (events within a column's rows, pairs' shared rows, risk sets within them)
    shared: list[tuple[np.ndarray, str]]
    #: a discrete design's patterns within each risk set (see design_patterns),
    #: by name (pattern_labels, and the interval)
    patterns: dict[str, np.ndarray]
    domain: int
    #: the functions of the values each set carries (see check_functions)
    loads: list[FunctionLoad]

    def _reverse(self, values: np.ndarray) -> np.ndarray:
        """Per model interval: the sum of ``values`` over the rows at risk there
        (rows whose interval is that one or later)."""
        bins = self.size + 1
        if values.ndim == 1:
            per = np.bincount(self.index, weights=values, minlength=bins)
        else:
            per = np.column_stack(
                [np.bincount(self.index, weights=v, minlength=bins) for v in values.T]
            ).reshape(bins, values.shape[1])
        reverse = np.cumsum(per[::-1], axis=0)[::-1]
        return np.asarray(reverse[self.intervals], dtype=float)

    def evaluate(
        self, theta: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, list[float], np.ndarray]:
        k = self.intervals.size
        p = self.x.shape[1]
        alpha, beta = theta[:k], theta[k:]
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            eta = self.x @ beta
            w = np.exp(eta)
            hazard = np.exp(alpha)
            steps = np.zeros(self.size + 1)
            steps[self.intervals] = hazard
            # each row's cumulative baseline hazard up to its own interval
            mu = w * np.cumsum(steps)[self.index]
            s0 = self._reverse(w)
            s1 = self._reverse(w[:, None] * self.x)
            position = np.zeros(self.size + 1, dtype=int)
            position[self.intervals] = np.arange(k)
            at = position[self.index[self.events]]
            d = np.bincount(at, minlength=k).astype(float)
            h = np.zeros((k + p, k + p))
            h[np.arange(k), np.arange(k)] = hazard * s0
            h[:k, k:] = hazard[:, None] * s1
            h[k:, :k] = h[:k, k:].T
            h[k:, k:] = self.x.T @ (mu[:, None] * self.x)
            x_events = self.x[self.events]
            g = np.concatenate([d - hazard * s0, x_events.sum(axis=0) - self.x.T @ mu])
            linear = alpha[at] + eta[self.events]
            llf = float(linear.sum() - mu.sum())
            deviance = 2 * float(mu.sum() - d.sum() - linear.sum())
            pearson = float(np.exp(-linear).sum() - 2 * d.sum() + mu.sum())
            scale = np.concatenate(
                [d + hazard * s0, np.abs(x_events).sum(axis=0) + np.abs(self.x).T @ mu]
            )
        return h, g, [deviance, pearson, llf, 0.0], scale

    def counts(self) -> tuple[float, float]:
        """The rows the model sums over, and its events."""
        return float(len(self.index)), float(self.events.sum())

    def blocks(self, end: int, terms: Sequence[str]) -> list[Block]:
        k = self.intervals.size
        named = [
            (terms[k + i], mask, f"the rows of term {terms[k + i]!r} are", False)
            for i, mask in enumerate(self.columns)
        ]
        for i, (risk, cell) in enumerate(zip(self.at_risk, self.cells, strict=True)):
            where = terms[i].removeprefix("baseline")
            named.append((terms[i], risk, f"the rows at risk in {where} are", False))
            named.append((terms[i], cell, f"the events in {where} are", True))
        named += [(name, mask, name, True) for mask, name in self.shared]
        return [
            Block(end, end, mask, empty_released=empty, required=True, name=name)
            for _, mask, name, empty in named
        ]


def _cox_rows(
    site: Site, spec: Mapping[str, Any], formula: ModelFormula, terms: list[str]
) -> ModelRows:
    """A site's rows of a Cox model: covariates, grid intervals, events, the rules
    its rows break (flags), the subsets its totals sum over and its blocks."""
    baseline = _check_spec(spec, terms)
    k = len(baseline)
    covariates = terms[k:]
    agreed: dict[str, list[str]] = {c: list(v) for c, v in spec["levels"].items()}
    if set(agreed) != set(formula.categorical):
        raise InvalidInput("the model's levels do not match its categories")
    duration, event = spec["duration"], spec["event"]
    if formula.response != event:
        raise InvalidInput("a Cox model's formula has its event on the left")
    reads = list(dict.fromkeys([duration, *formula.reads]))
    kept, frame = model_frame(site, spec, formula, agreed, reads)
    grid = np.asarray(spec["grid"], dtype=float)
    site.policy.check_grid(site.name, duration, grid)
    with np.errstate(all="ignore"):
        design = _design(formula, frame, agreed)
    if "Intercept" not in design.columns:
        raise InvalidInput("a Cox model's formula keeps its intercept (no '- 1')")
    x_frame = design.drop(columns="Intercept")
    if [str(c) for c in x_frame.columns] != covariates:
        raise InvalidInput(
            f"site {site.name}: the model's design does not have the terms the query "
            "names; ask again"
        )
    x = x_frame.to_numpy(dtype=float)
    t = numeric_column(site.name, kept[duration], duration)
    e = numeric_column(site.name, kept[event], event)
    index = np.searchsorted(grid, t, side="left")  # interval j: (g[j-1], g[j]]
    intervals = np.asarray(spec["intervals"], dtype=int)
    events = (e == 1) & np.isin(index, intervals)
    flags = np.asarray(
        [
            not bool(np.all(np.isin(e, (0.0, 1.0)))),
            not bool(np.all(t > 0)),
            not bool(np.all(np.isfinite(x))),
            bool(len(t)) and x.shape[1] > site.policy.max_param_ratio * len(t),
        ],
        dtype=float,
    )
    p = len(covariates)
    n_rows = site.n_rows
    empty = np.zeros(n_rows, dtype=bool)
    if flags.any():
        # as many blocks at every site, whatever its rows (the holder count's
        # announcements must line up); nothing of the rows is computed
        return _CoxRows(
            np.zeros((0, p)),
            np.zeros(0, dtype=int),
            np.zeros(0, dtype=bool),
            intervals,
            flags,
            n_rows - len(kept),
            _left_out(site, kept),
            [empty] * p,
            [empty] * k,
            [empty] * k,
            grid.size,
            [(empty, name) for name in _shared_names(terms, k)],
            {},
            0,
            [],
        )
    # the sets the totals sum over: each risk set within each set of rows two
    # design columns share (the intercept's: all rows), since over the iterates
    # the weights exp(α_k) separate the intervals of XᵀWX; each interval's events;
    # the model's events within each column's rows (the score's Σ x over them)
    indicator = _indicators(formula, frame, agreed)
    supports = pair_supports(indicator)
    risk = [index >= j for j in intervals]
    cells = [(e == 1) & (index == j) for j in intervals]
    sets = [r & s for r in risk for s in supports]
    sets += cells
    sets += [events & indicator[:, i] for i in range(indicator.shape[1])]
    columns = list(x_frame.columns)
    designed = [str(c) for c in design.columns]
    covariate_rows = [indicator[:, designed.index(str(c))] for c in columns]
    # the functions of the values each set carries: per interval, XᵀWX's pair
    # products over the risk set within the pair's rows (one interval alone
    # isolates them); the score's values over the events within a column's rows
    vectors, column_reads = value_functions(
        formula, frame, agreed, designed, column_relations(site)
    )
    q = len(designed)
    loads = function_loads(
        site,
        frame,
        [
            FunctionSet(
                r & indicator[:, a] & indicator[:, b],
                vectors[a] * vectors[b],
                column_reads[a] | column_reads[b],
                name=f"those at risk in interval {k + 1} among "
                + _shared_rows(designed[a], designed[b]),
            )
            for k, r in enumerate(risk)
            for a in range(q)
            for b in range(a, q)
        ]
        # the events' Σ x: the same at every iterate
        + [
            FunctionSet(
                events & indicator[:, a],
                vectors[a],
                column_reads[a],
                False,
                f"the events among the rows of term {designed[a]!r}",
                outcome=True,
            )
            for a in range(q)
        ],
        set().union(*column_reads),
    )
    # ... and each such set must be held by enough sites (else its totals are one
    # site's): the events within each column's rows, each pair's shared rows, and
    # each risk set within a column's or a pair's rows
    groups = covariate_rows + [
        covariate_rows[i] & covariate_rows[j] for i, j in _pairs(p)
    ]
    shared = [events & c for c in covariate_rows]
    shared += [covariate_rows[i] & covariate_rows[j] for i, j in _pairs(p)]
    shared += [r & g for r in risk for g in groups]
    # a discrete design's patterns, counted within each risk set
    patterns, domain = design_patterns(raw_columns(formula, frame), MAX_DOMAIN)
    names = pattern_labels(formula, frame, patterns)
    full = _full_masks(site, kept, [np.ones(len(kept), dtype=bool)])
    subsets = (
        {c: full for c in reads}
        | {"model terms": _full_masks(site, kept, sets)}
        | value_sets(site, kept, formula, agreed, designed)
        | _left_out(site, kept)
    )
    return _CoxRows(
        x,
        np.minimum(index, grid.size),
        events,
        intervals,
        flags,
        n_rows - len(kept),
        subsets,
        _full_masks(site, kept, covariate_rows),
        _full_masks(site, kept, risk),
        _full_masks(site, kept, cells),
        grid.size,
        list(
            zip(
                _full_masks(site, kept, shared),
                _shared_names(terms, k),
                strict=True,
            )
        ),
        dict(
            zip(
                [
                    f"{n} at risk in interval {j + 1}"
                    for j in range(len(risk))
                    for n in names
                ],
                _full_masks(site, kept, [r & m for r in risk for m in patterns]),
                strict=True,
            )
        ),
        domain * k,
        loads,
    )


def _shared_names(terms: Sequence[str], k: int) -> list[str]:
    """The names of :attr:`_CoxRows.shared`'s sets, in its order (public: from the
    terms alone, the same at every site)."""
    covariates = list(terms[k:])
    pairs = [
        f"terms {covariates[i]!r} and {covariates[j]!r}"
        for i, j in _pairs(len(covariates))
    ]
    groups = [f"term {c!r}" for c in covariates] + pairs
    names = [f"the events within term {c!r} are" for c in covariates]
    names += [f"the rows {pair} share are" for pair in pairs]
    names += [
        f"the rows at risk in {terms[i].removeprefix('baseline')} within {g} are"
        for i in range(k)
        for g in groups
    ]
    return names


KIND = ModelKind(COX_FIELDS, _cox_rows, _check_spec, _FLAGS)


# ------------------------------------------------------------ researcher side
@dataclass
class CoxResults(FittedModel):
    """A pooled Cox model, in statsmodels' shape (``PHRegResults``).

    ``params`` (log hazard ratios), ``bse``, ``tvalues`` (z), ``pvalues``,
    ``conf_int(alpha)``, ``cov_params()``, ``llf`` (Breslow's log partial
    likelihood), ``aic``, ``nobs``, ``n_events``, ``converged``, ``iterations``;
    ``hazard_ratios(alpha)`` with their CIs; ``baseline_cumulative_hazard`` (Breslow,
    at the grid times of the model); ``summary()``, ``to_frame()``, ``receipt``.
    """

    formula: str
    duration: str
    event: str
    grid: list[float]
    nobs: int
    n_events: int
    llf: float
    iterations: int
    converged: bool
    baseline_cumulative_hazard: pd.Series
    sites: list[str]
    missing: float
    receipt: dict[str, Any]

    @property
    def df_model(self) -> int:
        return len(self.params)

    @property
    def aic(self) -> float:
        return -2 * self.llf + 2 * self.df_model

    def hazard_ratios(self, alpha: float = 0.05) -> pd.DataFrame:
        """exp(coefficient) with its CI, per term."""
        return self._ratios(alpha).rename(columns={"ratio": "hazard_ratio"})

    def summary(self, alpha: float = 0.05) -> Any:
        """statsmodels' summary table (``print(fit.summary())``)."""
        left = [
            ("Model:", ["PH Reg, pooled"]),
            ("Ties:", ["Breslow"]),
            ("Duration:", [self.duration]),
            ("Event:", [self.event]),
            ("Sites:", [str(len(self.sites))]),
        ]
        right = [
            ("No. Observations:", [str(self.nobs)]),
            ("No. Events:", [str(self.n_events)]),
            ("Log partial lik.:", [f"{self.llf:.5g}"]),
            ("Grid times:", [str(len(self.grid) - 1)]),
            ("No. Iterations:", [str(self.iterations)]),
        ]
        return self._summary(
            "Results: PHReg (Cox), times on the grid",
            self.duration,
            left,
            right,
            alpha,
            self.missing,
        )

    def __repr__(self) -> str:
        return (
            f"CoxResults({self.formula!r}, nobs={self.nobs}, events={self.n_events}, "
            f"sites={len(self.sites)})"
        )


def _cox_formula(formula: str, event: str) -> ModelFormula:
    text = formula.strip() if isinstance(formula, str) else ""
    if "~" in text and text.split("~", 1)[0].strip():
        raise InvalidInput(
            'a Cox model\'s formula names only the covariates ("~ age + C(sex)"); '
            "name the follow-up and the event with duration= and event="
        )
    rhs = text.split("~", 1)[-1].strip()
    if not rhs:
        raise InvalidInput('name the covariates: "~ age + C(sex)"')
    parsed = parse_formula(f"{event} ~ {rhs}")
    if not parsed.intercept:
        raise InvalidInput(
            "a Cox model has no intercept to drop (its baseline hazard takes its "
            "place); leave out '- 1'"
        )
    if event in parsed.reads[1:]:
        raise InvalidInput(f"the event {event!r} is also a covariate")
    return parsed


def model_spec(
    parsed: ModelFormula,
    covariates: list[str],
    levels: Mapping[str, Sequence[str]],
    duration: str,
    event: str,
    grid: Sequence[float],
    intervals: Sequence[int],
    population: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The spec of a Cox model's iterates (every field but the coefficients)."""
    return {
        "formula": parsed.text,
        "family": "cox",
        "terms": [baseline_name(grid, j) for j in intervals] + list(covariates),
        "levels": {c: list(v) for c, v in levels.items()},
        "population": population_columns(population),
        "duration": duration,
        "event": event,
        "grid": [float(t) for t in grid],
        "intervals": list(intervals),
    }


def coxph(
    sites: SitesLike,
    formula: str,
    duration: str,
    event: str,
    *,
    grid: Sequence[float],
    researcher: str | None = None,
    keys: KeyHolder | None = None,
    population: Sequence[str] | None = None,
    min_sites: int = 2,
    on_refusal: str = "raise",
    max_iter: int = 40,
    tol: float = 1e-11,
) -> CoxResults:
    """Fit a Cox proportional hazards model to the pooled rows of ``sites``.

    ``formula`` names the covariates (formulaic): ``"~ age + C(fin) + prio"``.
    ``duration`` is the follow-up time (positive) and ``event`` 1 for an event, 0
    for a censoring. Follow-up is rounded up to ``grid`` (starting at 0, strictly
    increasing, on the sites' grid — 2 significant digits by default): the events
    and risk sets are those at the grid times, and a row followed beyond the last
    grid time is at risk throughout and censored after it. Ties are Breslow's.
    The result equals statsmodels' ``PHReg(ties="breslow")`` on the grid-rounded
    times; a finer grid is closer to the exact times, and is refused by name where
    an interval's events or risk set are too few at some site.

    Rows with a missing value in a column the model reads are left out (complete
    cases; counted in the summary). Refused with a named error: an aliased design
    (:class:`~healthlab.encrypted.models.AliasedDesign`), no convergence
    (:class:`~healthlab.encrypted.models.NotConverged`, e.g. when a covariate
    orders the events perfectly).

    Examples
    --------
    >>> fit = coxph(
    ...     sites, "~ fin + age + prio", "week", "arrest", grid=range(0, 56, 4)
    ... )  # doctest: +SKIP
    >>> fit.hazard_ratios()  # doctest: +SKIP
    """
    site_list = as_sites(sites)
    parsed = _cox_formula(formula, event)
    if duration in parsed.reads:
        raise InvalidInput(f"the duration {duration!r} is also in the formula")
    edges = [float(t) for t in grid]
    if (
        len(edges) < 2
        or edges[0] != 0
        or not all(b > a for a, b in itertools.pairwise(edges))
    ):
        raise InvalidInput(
            "grid= is the model's time grid: starting at 0, strictly increasing, "
            "with at least one interval"
        )
    keys = keys or KeyHolder()
    agreed = agree_levels(site_list, parsed, researcher, keys)
    covariates = [t for t in design_columns(parsed, agreed) if t != "Intercept"]
    if not covariates:
        raise InvalidInput('name at least one covariate: "~ age + C(sex)"')
    session = ModelSession(
        site_list, keys, researcher, min_sites=min_sites, on_refusal=on_refusal
    )

    def model(intervals: list[int]) -> dict[str, Any]:
        return model_spec(
            parsed, covariates, agreed, duration, event, edges, intervals, population
        )

    # the grid's intervals with events (one without has no baseline: its α is
    # −∞); the origin of the whole grid says which hold events
    intervals = list(range(1, len(edges)))
    spec = model(intervals)
    k = len(intervals)
    current = session.ask(spec, np.zeros(k + len(covariates)), "origin", None)
    events = np.rint(current["g"][:k] + np.diag(current["H"])[:k])
    if not np.any(events > 0):
        raise DisclosureRefused("no events fall within the grid; extend it")
    if np.any(events == 0):
        intervals = [j for j, d in zip(intervals, events, strict=True) if d > 0]
        spec = model(intervals)
        k = len(intervals)
        current = session.ask(spec, np.zeros(k + len(covariates)), "origin", None)
    terms = list(spec["terms"])
    if current["n"] <= len(covariates):
        raise DisclosureRefused("fewer pooled rows than the model's parameters")
    _aliased(current["H"], terms)
    # the baseline alone: at β = 0, exp(α_k) = d_k / (rows at risk at t_k)
    at_risk = np.diag(current["H"])[:k]
    d = current["g"][:k] + at_risk
    theta = np.zeros(len(terms))
    theta[:k] = np.log(d / at_risk)
    current = session.ask(spec, theta, "start", None)

    def ask(
        beta: np.ndarray, step: str, previous: np.ndarray | None, fraction: float = 1
    ) -> dict[str, Any]:
        return session.ask(spec, beta, step, previous, fraction)

    theta, current, iterations = follow_newton(
        ask, theta, current, terms, max_iter=max_iter, tol=tol
    )
    h = current["H"]
    _aliased(h, terms)
    cov = np.linalg.inv(h)[k:, k:]
    d = current["g"][:k] + h[np.arange(k), np.arange(k)]  # d_k: the events
    d = np.rint(d)
    # Breslow's log partial likelihood: the Poisson llf at its α, less Σ d log d − d
    llf = current["llf"] - float(np.sum(d * np.log(d) - d))
    cumulative = pd.Series(
        np.cumsum(np.exp(theta[:k])),
        index=[edges[j] for j in intervals],
        name="cumulative hazard",
    )
    result = CoxResults(
        params=pd.Series(theta[k:], index=covariates),
        cov=cov,
        formula=f"~ {parsed.rhs}",
        duration=duration,
        event=event,
        grid=edges,
        nobs=round(current["n"]),
        n_events=round(current["weight"]),
        llf=llf,
        iterations=iterations,
        converged=True,
        baseline_cumulative_hazard=cumulative,
        sites=[s.name for s in session.participants],
        missing=np.nan if session.missing_withheld else float(current["dropped"]),
        receipt={},
    )
    session.attach_receipt(
        result,
        "coxph",
        {
            "formula": result.formula,
            "duration": duration,
            "event": event,
            "grid": edges,
            "ties": "breslow",
            "population": spec["population"],
            "levels": agreed,
            "iterations": iterations,
        },
    )
    return result
