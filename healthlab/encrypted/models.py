"""Generalized linear models pooled across sites, fitted exactly by Newton's method.

:func:`glm` fits a GLM (binomial, Poisson or Gaussian, with its canonical link) to
the rows of every site as if they were one table: each Newton (IRLS) iteration is a
query whose answer is every site's totals at the current coefficients β — the
information matrix ``XᵀWX``, the score ``XᵀW(z − η)``, the deviance, the Pearson χ²
and the log-likelihood — summed over encrypted, masked totals like every other
statistic (:mod:`healthlab.encrypted.protocol`). The result equals statsmodels'
``GLM`` on the pooled rows (params and standard errors to ~1e-10), and comes back
as :class:`GLMResults`, in statsmodels' shape.

**The coefficients are not the researcher's choice.** A site's totals at β are
smooth functions of its rows, but at a β of the researcher's choosing (a slope of
1000 on age, an intercept just below the oldest patient's age) the weights
``W = μ(1 − μ)`` pick out the rows near a threshold, and two such answers give one
patient's values. So a site answers a model only at

- β = 0 (the first iterate),
- the intercept-only fit (every slope 0, the intercept's score 0), or
- a Newton step from an iterate it answered: ``H(β_t)(β − β_t) = g(β_t)``.

The step is verified by the sites among themselves before anything leaves them:
each adds its own ``H_s(β_t)(β − β_t) − g_s(β_t)`` to a vector summed under
pairwise masks with the holder count (:class:`~healthlab.encrypted.protocol.Check`)
and refuses unless the sum is zero to ~1e-8 of its own totals. The key holder
never sees the check, and cannot forge it. So every answered β lies on the Newton
path of the pooled data from a fixed start — a function of the data, not of the
researcher — and a site answers at most :data:`MAX_ITERATES` of them per model.

Each design column's rows (a level of ``C(sex)``, a 0/1 covariate's ones) must be
held by at least the pooling minimum of sites, as a ``by=`` group must: else the
coefficient would be one site's totals, and every site refuses the model.
"""

from __future__ import annotations

import hashlib
import json
import re
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pandas as pd
import statsmodels.api as sm
from formulaic import Formula, model_matrix
from scipy import special

from healthlab.encrypted.encoding import MAX_ABS
from healthlab.encrypted.keys import KeyHolder
from healthlab.encrypted.protocol import (
    Block,
    Check,
    Query,
    StudyRun,
    Totals,
    computation,
)
from healthlab.encrypted.results import FittedModel
from healthlab.encrypted.stats import (
    AliasedDesign,
    SitesLike,
    _check_grouping,
    _full_masks,
    _left_out,
    _run,
    check_aliasing,
    levels,
    population_columns,
    receipt_for,
    value_key,
)
from healthlab.errors import (
    DataRefused,
    DisclosureRefused,
    HealthLabError,
    InvalidInput,
    TooFewRows,
)
from healthlab.relations import Relation
from healthlab.relations import valued as _valued
from healthlab.site_data import numeric_column
from healthlab.sites import Site, as_sites

__all__ = [
    "MAX_ITERATES",
    "AliasedDesign",
    "GLMResults",
    "NotConverged",
    "PerfectSeparation",
    "glm",
    "logit",
    "parse_formula",
]

#: Iterates a site answers per model (and participants): Newton converges in ~10.
MAX_ITERATES = 60
#: A Newton step's check must hold to this fraction of the site's own totals.
STEP_TOLERANCE = 1e-8
#: Totals a site sends at most (beyond: a flag, not a refusal naming the site).
ENCODABLE = MAX_ABS / 2
#: Fitted probabilities this close to 0 or 1 mean the estimates do not exist.
BOUNDARY = 1e-10
#: An outcome of at most this many values is audited by its value sets: the
#: totals hold y (the score), y·log y (deviance), log y! (llf) and the count.
OUTCOME_FUNCTIONS = 4

_FAMILIES: dict[str, Any] = {
    "binomial": sm.families.Binomial,
    "poisson": sm.families.Poisson,
    "gaussian": sm.families.Gaussian,
}


class NotConverged(HealthLabError):
    """A model's Newton iterations did not converge within the allowed iterations."""


class PerfectSeparation(NotConverged):
    """The outcome is predicted exactly for some rows: the estimates do not exist."""


# ------------------------------------------------------------------ formulas
_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_CATEGORICAL = re.compile(rf"^C\(\s*({_NAME})\s*\)$")
# np.exp is not among them: it weights the largest values so that a total is
# theirs (two patients' ages came out of exp(prio) and exp(prio):age)
_TRANSFORM = re.compile(rf"^np\.(?:log|log1p|sqrt)\(\s*({_NAME})\s*\)$")
_POWER = re.compile(rf"^I\(\s*({_NAME})\s*\*\*\s*2\s*\)$")
_PLAIN = re.compile(rf"^{_NAME}$")
_SUPPORTED = (
    "column names, C(column) for a category, np.log / np.log1p / np.sqrt of a "
    "column, I(column ** 2), and interactions a:b or a*b; '- 1' drops the "
    "intercept"
)


@dataclass(frozen=True)
class ModelFormula:
    """A parsed, checked model formula: which columns it reads and how."""

    text: str
    response: str
    numeric: tuple[str, ...]
    categorical: tuple[str, ...]
    intercept: bool

    @property
    def rhs(self) -> str:
        return self.text.split("~", 1)[1].strip()

    @property
    def reads(self) -> list[str]:
        """Every column the model reads, the response first."""
        return list(dict.fromkeys([self.response, *self.numeric, *self.categorical]))


def parse_formula(formula: str) -> ModelFormula:
    """Parse a Wilkinson formula (formulaic) and check every term against the short
    list a site evaluates; anything else is refused before it reaches a site (a
    formula is code: a site must never run a researcher's expression)."""
    if not isinstance(formula, str) or formula.count("~") != 1:
        raise InvalidInput(
            'a model formula has one "~": the outcome on the left, the terms on the '
            'right, e.g. "cvd ~ age + C(sex) + age:bmi"'
        )
    reason = ""
    try:
        parsed = Formula(formula)
        lhs = [f for term in parsed.lhs for f in term.factors]
        rhs = [(str(t), [f.expr for f in t.factors]) for t in parsed.rhs]
        rhs_text = str(parsed.rhs)
    except Exception as exc:  # formulaic's errors quote only the formula
        reason = f"{type(exc).__name__}: {exc}"
    if reason:
        raise InvalidInput(
            f"the formula does not parse ({reason}); use {_SUPPORTED}"
        ) from None
    if len(lhs) != 1 or not _PLAIN.match(lhs[0].expr):
        raise InvalidInput("the outcome (left of ~) must be one column's name")
    numeric: list[str] = []
    categorical: list[str] = []
    intercept = False
    for _, factors in rhs:
        for raw in factors:
            expr = raw.strip()
            if expr == "1":
                intercept = True
            elif _PLAIN.match(expr):
                numeric.append(expr)
            elif m := _CATEGORICAL.match(expr):
                categorical.append(m.group(1))
            elif m := _TRANSFORM.match(expr) or _POWER.match(expr):
                numeric.append(m.group(1))
            else:
                raise InvalidInput(
                    f"formula term {expr!r} is not supported; use {_SUPPORTED}"
                )
    response = lhs[0].expr
    if response in numeric or response in categorical:
        raise InvalidInput(f"{response!r} is both the outcome and a covariate")
    both = set(numeric) & set(categorical)
    if both:
        raise InvalidInput(
            f"{sorted(both)} are used both as numbers and as C(categories)"
        )
    # formulaic's rhs leaves out "- 1": said again, or the intercept comes back
    text = f"{response} ~ {rhs_text}" + ("" if intercept else " - 1")
    return ModelFormula(
        text,
        response,
        tuple(dict.fromkeys(numeric)),
        tuple(dict.fromkeys(categorical)),
        intercept,
    )


def _design(
    formula: ModelFormula, frame: pd.DataFrame, levels: Mapping[str, Sequence[str]]
) -> pd.DataFrame:
    """The design matrix of ``frame`` (numeric columns as float, categories cast to
    the agreed levels): the same columns at every site and at the researcher's."""
    data = pd.DataFrame(index=frame.index)
    for column in formula.numeric:
        data[column] = frame[column].to_numpy(dtype=float)
    for column in formula.categorical:
        data[column] = pd.Categorical(
            frame[column].astype(str), categories=list(levels[column])
        )
    matrix = model_matrix(
        formula.rhs, data, context={"np": np}, na_action="raise", output="pandas"
    )
    return pd.DataFrame(matrix)


def design_columns(
    formula: ModelFormula, levels: Mapping[str, Sequence[str]]
) -> list[str]:
    """The design's column names, from the formula and the agreed levels only."""
    size = max([2, *(len(v) for v in levels.values())])
    frame = pd.DataFrame(
        {c: np.ones(size) for c in formula.numeric}
        | {
            c: [levels[c][i % len(levels[c])] for i in range(size)]
            for c in formula.categorical
        }
    )
    return [str(c) for c in _design(formula, frame, levels).columns]


# ----------------------------------------------------------------- site side
def _family(name: str) -> Any:
    if name not in _FAMILIES:
        raise InvalidInput(f"family must be one of {sorted(_FAMILIES)}")
    return _FAMILIES[name]()


@dataclass(frozen=True)
class _Layout:
    """The one definition of a model iteration's totals: where each one lies."""

    p: int

    @property
    def upper(self) -> int:
        return self.p * (self.p + 1) // 2

    @property
    def size(self) -> int:
        # dropped, n, Σ weights, H (upper triangle), g, deviance, χ², llf, boundary
        return 3 + self.upper + self.p + 4

    def pack(
        self,
        dropped: float,
        n: float,
        weight: float,
        h: np.ndarray,
        g: np.ndarray,
        rest: Sequence[float],
    ) -> list[float]:
        return [
            dropped,
            n,
            weight,
            *h[np.triu_indices(self.p)].tolist(),
            *g.tolist(),
            *rest,
        ]

    def unpack(self, totals: Sequence[float]) -> dict[str, Any]:
        t = np.asarray(totals, dtype=float)
        h = np.zeros((self.p, self.p))
        h[np.triu_indices(self.p)] = t[3 : 3 + self.upper]
        h = h + np.triu(h, 1).T
        g = t[3 + self.upper : 3 + self.upper + self.p]
        deviance, pearson, llf, boundary = t[3 + self.upper + self.p :]
        return {
            "dropped": t[0],
            "n": t[1],
            "weight": t[2],
            "H": h,
            "g": g,
            "deviance": deviance,
            "pearson": pearson,
            "llf": llf,
            "boundary": boundary,
        }


def _evaluate(
    family: Any,
    x: np.ndarray,
    y: np.ndarray,
    offset: np.ndarray,
    trials: np.ndarray,
    beta: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, list[float], np.ndarray]:
    """H = XᵀWX, the score g = XᵀW(z − η), [deviance, χ², llf, boundary] and each
    score's scale at β."""
    if len(y) == 0:
        p = x.shape[1]
        return np.zeros((p, p)), np.zeros(p), [0.0, 0.0, 0.0, 0.0], np.zeros(p)
    with np.errstate(over="ignore", under="ignore", divide="ignore"):
        eta = x @ beta + offset
        mu = family.link.inverse(eta)
        w = trials * family.weights(mu)
        score = w * family.link.deriv(mu) * (y - mu)
        h = x.T @ (w[:, None] * x)
        g = x.T @ score
        # each score's own size (its terms' absolute sum): the start's tolerance
        scale = np.abs(x).T @ np.abs(
            w * family.link.deriv(mu) * (np.abs(y) + np.abs(mu))
        )
        deviance = float(family.deviance(y, mu, var_weights=trials))
        pearson = float(np.sum(trials * (y - mu) ** 2 / family.variance(mu)))
        if isinstance(family, sm.families.Gaussian):
            llf = 0.0  # from the pooled deviance (it needs the pooled scale)
        elif isinstance(family, sm.families.Binomial):
            # the binomial log-likelihood of successes s = y·n out of n trials
            s = y * trials
            p = np.clip(mu, np.finfo(float).tiny, 1 - np.finfo(float).eps)
            llf = float(
                np.sum(
                    special.gammaln(trials + 1)
                    - special.gammaln(s + 1)
                    - special.gammaln(trials - s + 1)
                    + s * np.log(p)
                    + (trials - s) * np.log1p(-p)
                )
            )
        else:
            llf = float(family.loglike(y, mu, var_weights=trials))
    boundary = 0.0
    if isinstance(family, sm.families.Binomial):
        boundary = float(np.sum((mu < BOUNDARY) | (mu > 1 - BOUNDARY)))
    return h, g, [deviance, pearson, llf, boundary], scale


#: The fields of a model iteration's spec; a site refuses any other (a spare key
#: would make a fresh model, with a fresh count of iterates).
MODEL_FIELDS = (
    "formula",
    "family",
    "terms",
    "levels",
    "offset",
    "trials",
    "population",
    "intercept",
)
#: The fields of one iterate of a model: where it is evaluated, and from where.
STEP_FIELDS = ("beta", "step", "previous", "fraction")
#: The step lengths a Newton step may take (halving when a full step overshoots).
FRACTIONS = tuple(2.0**-j for j in range(11))


def model_key(spec: Mapping[str, Any], participants: Sequence[str]) -> str:
    """A model's identity at a site: its fields but the coefficients, with the
    participants (a Newton path is the pooled data's of these sites)."""
    fixed = {k: spec.get(k) for k in _kind(spec.get("family")).fields}
    canonical = json.dumps([fixed, sorted(participants)], sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


#: The rules a site's rows can break, checked as anonymous flags summed among the
#: sites (a refusal naming the site would say what its rows hold).
_FLAGS = (
    "the outcome is not 0/1 (or not successes out of trials=) at some site",
    "the outcome of a Poisson model is negative at some site",
    "a term is not finite (a log of 0 or of a negative number?) at some site",
    "the model has more parameters than the sites' maximum per row at some site; "
    "use fewer covariates",
)
#: Flags of one iterate (they depend on the coefficients), after the data's.
_SEPARATION = (
    "the outcome is predicted exactly (a fitted probability of 0 or 1) for some "
    "rows at some site"
)
_ITERATE_FLAGS = (
    _SEPARATION,
    "a total is beyond what the encoding carries at some site (rescale a column)",
)


def _flags(
    site: Site, family: str, y: np.ndarray, trials: np.ndarray, x: np.ndarray
) -> np.ndarray:
    bad_outcome = (
        family == "binomial"
        and bool(len(y))
        and not (
            np.all(trials > 0)
            and np.all(np.isfinite(y))
            and np.all((y >= 0) & (y <= 1))
        )
    )
    negative = family == "poisson" and bool(np.any(~(y >= 0)))
    infinite = not bool(np.all(np.isfinite(x)))
    too_many = bool(len(y)) and x.shape[1] > site.policy.max_param_ratio * len(y)
    return np.asarray([bad_outcome, negative, infinite, too_many], dtype=float)


@dataclass
class _ModelRows:
    """A site's rows of one GLM, prepared once and used by every iterate."""

    family: Any
    x: np.ndarray
    y: np.ndarray
    trials: np.ndarray
    offset: np.ndarray
    flags: np.ndarray
    dropped: int
    subsets: dict[str, list[np.ndarray]]
    columns: list[np.ndarray]  # each design column's rows (over all the site's)
    #: the rows each pair of design columns shares (i < j)
    pairs: list[np.ndarray]
    #: each design column's rows with y ≠ 0 (a 0/1 outcome: with y = 1, y = 0)
    outcomes: list[np.ndarray]
    #: a discrete design's patterns (over all the site's rows; see
    #: design_patterns), by the design row's values (pattern_labels)
    patterns: dict[str, np.ndarray]
    domain: int
    #: the functions of the values each set carries (see check_functions)
    loads: list[FunctionLoad]

    def evaluate(
        self, beta: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, list[float], np.ndarray]:
        return _evaluate(self.family, self.x, self.y, self.offset, self.trials, beta)

    def counts(self) -> tuple[float, float]:
        """The rows the totals sum over, and their weight (Σ trials)."""
        return float(len(self.y)), float(self.trials.sum())

    def blocks(self, end: int, terms: Sequence[str]) -> list[Block]:
        # each column's rows must be held by enough sites: else its coefficient
        # is one site's
        blocks = [
            Block(end, end, mask, required=True, name=f"the rows of term {term!r} are")
            for term, mask in zip(terms, self.columns, strict=True)
        ]
        # ... and so must each pair's shared rows (XᵀWX sums over them: three
        # patients one site held gave their ages from a pair's power sums), and
        # the outcome's rows in each column's (the score sums over them; none
        # anywhere is separation, which the fit refuses by name)
        p = len(terms)
        per_column = len(self.outcomes) // p if p else 0
        shared = [
            (mask, f"the rows terms {terms[i]!r} and {terms[j]!r} share are")
            for mask, (i, j) in zip(self.pairs, _pairs(p), strict=True)
        ]
        outcome = [
            (
                mask,
                f"the rows of term {terms[n // per_column]!r} with "
                + (
                    "the outcome not 0"
                    if per_column == 1
                    else f"outcome {1 - n % per_column}"
                )
                + " are",
            )
            for n, mask in enumerate(self.outcomes)
        ]
        return blocks + [
            Block(end, end, mask, empty_released=True, required=True, name=name)
            for mask, name in shared + outcome
        ]


def _shared_rows(a: str, b: str) -> str:
    """The rows two design columns share, in words."""
    if a == b:
        return f"the rows of term {a!r}"
    return f"the rows terms {a!r} and {b!r} share"


def _pairs(p: int) -> list[tuple[int, int]]:
    """The pairs of design columns, i < j."""
    return [(i, j) for i in range(p) for j in range(i + 1, p)]


class ModelRows(Protocol):
    """What a site prepares once per model (a GLM's or a Cox model's rows)."""

    flags: np.ndarray
    dropped: int
    subsets: dict[str, list[np.ndarray]]
    patterns: dict[str, np.ndarray]
    domain: int
    loads: list[FunctionLoad]

    def evaluate(
        self, beta: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, list[float], np.ndarray]:
        """H, g, [deviance, χ², llf, rows at a boundary] and each score's scale."""
        ...

    def counts(self) -> tuple[float, float]: ...

    def blocks(self, end: int, terms: Sequence[str]) -> list[Block]: ...


@dataclass(frozen=True)
class ModelKind:
    """What a kind of model (GLM, Cox) does at a site: the fields of its spec, how
    it prepares its rows, which coefficients its start solves for (the rest at
    zero), and what each of its data flags says."""

    fields: tuple[str, ...]
    prepare: Callable[[Site, Mapping[str, Any], ModelFormula, list[str]], ModelRows]
    baseline: Callable[[Mapping[str, Any], list[str]], list[int]]
    flags: tuple[str, ...]


def _glm_baseline(spec: Mapping[str, Any], terms: list[str]) -> list[int]:
    index = spec.get("intercept")
    if index is not None and (
        not isinstance(index, int)
        or not 0 <= index < len(terms)
        or terms[index] != "Intercept"
    ):
        raise InvalidInput("the model's intercept index does not name its intercept")
    return [] if index is None else [index]


def _kind(family: Any) -> ModelKind:
    """The model kind a spec's family names (refused unless one of them)."""
    if family == "cox":
        from healthlab.encrypted import cox  # cox builds on this module

        return cox.KIND
    _family(family)
    return _GLM


#: Per site, its prepared rows of the models it answers (the latest few).
_PREPARED: weakref.WeakKeyDictionary[
    Site, dict[tuple[str, int], tuple[ModelRows, frozenset[str]]]
] = weakref.WeakKeyDictionary()


@computation("glm")
def _iterate(site: Site, query: Query) -> Totals:
    """At a site: its totals of one model iterate, and the check of the step."""
    spec = query.spec
    kind = _kind(spec.get("family"))
    extra_keys = sorted(set(spec) - {*kind.fields, *STEP_FIELDS})
    if extra_keys:
        raise InvalidInput(f"a model query has no fields {extra_keys}")
    formula = parse_formula(spec["formula"])
    terms: list[str] = list(spec["terms"])
    p = len(terms)
    baseline = kind.baseline(spec, terms)
    beta = np.asarray(spec["beta"], dtype=float)
    if beta.shape != (p,) or not np.all(np.isfinite(beta)):
        raise InvalidInput("the model's coefficients do not match its terms")
    key = model_key(spec, query.participants)
    if site.model_iterations(key) >= MAX_ITERATES:
        raise DisclosureRefused(
            f"site {site.name} answers at most {MAX_ITERATES} iterates of one model; "
            "the model did not converge"
        )
    cache = _PREPARED.setdefault(site, {})
    version = (key, id(site._frame))
    prepared = cache.get(version)
    if prepared is None:
        with site.reads() as reads:
            rows = kind.prepare(site, spec, formula, terms)
        while len(cache) >= 4:  # the latest few models
            cache.pop(next(iter(cache)))
        cache[version] = prepared = (rows, frozenset(reads))
    rows, read = prepared
    site.note_reads(read)  # the columns this iterate reads, as its first did
    flags = rows.flags
    n, weight = rows.counts()
    if not flags.any():
        h, g, rest, scale = rows.evaluate(beta)
    else:  # rows that break a rule: nothing is computed, and every site refuses
        h, g, rest, scale = np.zeros((p, p)), np.zeros(p), [0.0] * 4, np.zeros(p)
        n = 0.0
    layout = _Layout(p)
    # the rows at a fitted 0 or 1 are not counted out loud (a separating path
    # moved that count one patient at a time): a flag, and every site refuses
    separated = float(rest[3] > 0)
    rest = [*rest[:3], 0.0]
    totals = layout.pack(float(rows.dropped), n, weight, h, g, rest)
    # nor is a total the encoding cannot carry (its refusal named the site)
    overflow = float(
        not (np.all(np.isfinite(totals)) and np.max(np.abs(totals)) < ENCODABLE)
    )
    if overflow:
        totals = [0.0] * len(totals)
        h, g = np.zeros((p, p)), np.zeros(p)
    check = _step_check(
        site,
        spec,
        key,
        beta,
        (h, g, scale),
        baseline,
        kind.flags,
        np.concatenate([flags, [separated, overflow]]),
    )
    subsets = rows.subsets
    answered = site.model_iterations(key)
    if not flags.any():
        # the functions this iterate adds, with the model's earlier iterates'
        # (a GLM's weights other than the Gaussian's, and a Cox model's risk-set
        # weights, change with β: each iterate adds weighted functions)
        # (a discrete design's weights are a function of each row's pattern:
        # what its iterates solve for are the patterns' counts, audited below)
        weighted = (
            spec.get("family") != "gaussian"
            and site.policy.count_iterates
            and (not rows.patterns or bool(_offset_reads(spec)))
        )
        new = site.model_iterate(key, beta) is None
        check_functions(site, rows.loads, answered, weighted=weighted, new=new)
    # once the iterates' totals number a discrete design's patterns, they solve
    # for each pattern's count: from then on every pattern is audited
    if rows.patterns and rows.domain <= equations(p) * (answered + 1):
        subsets = subsets | {
            f"{DESIGN_PATTERN}{name}": [mask] for name, mask in rows.patterns.items()
        }
    return totals, subsets, rows.blocks(len(totals), terms), check


def model_frame(
    site: Site,
    spec: Mapping[str, Any],
    formula: ModelFormula,
    agreed: Mapping[str, Sequence[str]],
    reads: list[str],
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A model's complete cases at a site (its population's), and them with the
    numeric columns as numbers. Rows of a level that was not released (held by
    too few rows) are left out, and audited as such: they are among the rows the
    query leaves out."""
    kept, _ = site.rows(reads, dropna=True, population=spec.get("population", ()))
    for column in formula.categorical:
        _check_grouping(site, kept, column, site.policy.min_rows)
    unreleased = np.zeros(len(kept), dtype=bool)
    for column in formula.categorical:
        unreleased |= ~kept[column].astype(str).isin(agreed[column]).to_numpy()
    kept = kept.loc[~unreleased]
    frame = kept.copy()
    for column in formula.numeric:
        frame[column] = numeric_column(site.name, kept[column], column)
    return kept, frame


#: An offset of at most this many values splits a model's sets by its values
#: (the functions' weights are then constant on each part); one of more values
#: weights every row apart, and is not split (not shown exploitable: README).
OFFSET_VALUES = 16


def _by_offset(
    sets: list[FunctionSet], offset: np.ndarray | None, spec: Mapping[str, Any]
) -> list[FunctionSet]:
    """A model's function sets, and with an offset of few values their parts at
    each value.

    At the origin an offset weights each row's functions by exp(offset) (or
    expit's slope there): against the same model without it, a 0/1 offset's
    difference was Σ over its ones of every function (a third review gave 3
    patients' ages a site, and 2 a site at a 3-valued offset's rare value from
    three weightings). With as many weightings of its values as the offset has
    values, each part is summed on its own: the parts count (FunctionAtoms),
    once the site has seen that many."""
    if offset is None:
        return sets
    column, family = str(spec.get("offset")), str(spec.get("family"))
    seen = np.unique(offset)
    whole = [
        FunctionSet(
            e.rows,
            e.vectors,
            e.reads,
            e.varying,
            e.name,
            e.outcome,
            (column, family, 0),
        )
        for e in sets
    ]
    if seen.size > OFFSET_VALUES:
        return whole
    split = []
    for entry in sets:
        for v in seen:
            part = entry.rows & (offset == v)
            if part.any() and not np.array_equal(part, entry.rows):
                split.append(
                    FunctionSet(
                        part,
                        entry.vectors,
                        entry.reads,
                        entry.varying,
                        f"{entry.name}, at one value of the offset",
                        entry.outcome,
                        (column, family, int(seen.size)),
                    )
                )
    return whole + split


def _offset_reads(spec: Mapping[str, Any]) -> set[str]:
    """The offset column, when the weights read its values (a binomial model's)."""
    offset = spec.get("offset")
    return {str(offset)} if spec.get("family") == "binomial" and offset else set()


def _model_rows(
    site: Site, spec: Mapping[str, Any], formula: ModelFormula, terms: list[str]
) -> ModelRows:
    """A site's rows of a model: its design, outcome, offset, trials, the rules its
    rows break (flags) and the subsets its totals sum over."""
    agreed: dict[str, list[str]] = {c: list(v) for c, v in spec["levels"].items()}
    if set(agreed) != set(formula.categorical):
        raise InvalidInput("the model's levels do not match its categories")
    extra = [c for c in (spec.get("offset"), spec.get("trials")) if c]
    if set(extra) & set(formula.reads):
        # exp(offset) of a covariate is the np.exp the formulas do not offer
        raise InvalidInput("an offset or trials column is also in the formula")
    reads = list(dict.fromkeys([*formula.reads, *extra]))
    kept, frame = model_frame(site, spec, formula, agreed, reads)
    with np.errstate(all="ignore"):
        x_frame = _design(formula, frame, agreed)
    if [str(c) for c in x_frame.columns] != terms:
        raise DataRefused(
            f"site {site.name}: the model's design does not have the terms the query "
            "names; ask again"
        )
    x = x_frame.to_numpy(dtype=float)
    y = numeric_column(site.name, kept[formula.response], formula.response)
    trials = np.ones(len(y))
    if spec.get("trials"):
        trials = numeric_column(site.name, kept[spec["trials"]], spec["trials"])
        with np.errstate(all="ignore"):
            y = y / trials
    offset = np.zeros(len(y))
    if spec.get("offset"):
        offset = numeric_column(site.name, kept[spec["offset"]], spec["offset"])
    p = len(terms)
    flags = _flags(site, spec["family"], y, trials, x)
    if not np.all(np.isfinite(offset)):
        flags[2] = 1.0
    full = _full_masks(site, kept, [np.ones(len(kept), dtype=bool)])
    # a design column is a value (age, 1, log(bmi)) times an indicator (a level
    # of C(sex), a 0/1 covariate, their products): its totals, and in XᵀWX a
    # pair's, sum a function of the values over the rows its indicators hold in
    # common. Two such with the same values and sets one patient apart gave that
    # patient's age and follow-up (age:mar:arrest and age:mar:arrest:race). So
    # every such set is a subset for the auditor: at least k rows, no
    # differencing. (A value's own zeros — a count of 0 — are not a set: a sum
    # over them is a sum over all rows.)
    supports: list[np.ndarray] = []
    binary = spec["family"] == "binomial" and not spec.get("trials")
    # the outcome's rows that enter the score (y ≠ 0: Σ x_j y sums over them),
    # and for a 0/1 outcome its non-events too
    values = (1.0, 0.0) if binary else (None,)
    if not flags.any():
        indicator = _indicators(formula, frame, agreed)
        supports = pair_supports(indicator)
        column_rows = _full_masks(site, kept, [indicator[:, i] for i in range(p)])
        pair_rows = _full_masks(
            site, kept, [indicator[:, i] & indicator[:, j] for i, j in _pairs(p)]
        )
        # XᵀWX sums each pair's value product over the rows the pair shares
        vectors, column_reads = value_functions(
            formula, frame, agreed, terms, column_relations(site)
        )
        loads = function_loads(
            site,
            frame,
            _by_offset(
                [
                    FunctionSet(
                        indicator[:, i] & indicator[:, j],
                        vectors[i] * vectors[j],
                        column_reads[i] | column_reads[j],
                        name=_shared_rows(terms[i], terms[j]),
                    )
                    for i in range(p)
                    for j in range(i, p)
                ]
                # ... and the score each column's value over its rows with y ≠ 0
                + [
                    FunctionSet(
                        indicator[:, i] & (y * trials != 0),
                        vectors[i],
                        column_reads[i],
                        False,  # Σ x y: the same at every iterate
                        f"the rows of term {terms[i]!r} with the outcome not 0",
                        outcome=True,
                    )
                    for i in range(p)
                ],
                offset if spec.get("offset") else None,
                spec,
            ),
            # (a binomial model's offset too: expit(η + offset) does not factor
            # by the design's patterns, so its weights read the offset's values;
            # a Poisson offset's exp(offset) factors out of each pattern)
            set().union(*column_reads) | _offset_reads(spec),
        )
        raw = y * trials
        outcome_rows = _full_masks(
            site,
            kept,
            [
                indicator[:, i] & (raw != 0 if v is None else raw == v)
                for i in range(p)
                for v in values
            ],
        )
    else:
        # as many blocks at every site, whatever its rows, or the announcements
        # of the holder count would not line up
        empty = np.zeros(site.n_rows, dtype=bool)
        loads = []
        column_rows = [empty] * p
        pair_rows = [empty] * len(_pairs(p))
        outcome_rows = [empty] * (len(values) * p)
    levels_of = (
        {} if flags.any() else value_sets(site, kept, formula, agreed, terms, extra)
    )
    patterns, domain = (
        ([], 0)
        if flags.any()
        else design_patterns(raw_columns(formula, frame), MAX_DOMAIN)
    )
    pattern_names = pattern_labels(formula, frame, patterns)
    # the outcome enters the score times every design column: Σ x_j (y − μ). A
    # 0/1 outcome makes that a sum over the rows with y = 1 among column j's —
    # the one arrested patient's age came out of an origin answer. So an outcome
    # of few values has its value sets within every column's rows audited too,
    # and each value's rows must be held by enough sites (else the score is one
    # site's sums over them)
    outcome_sets: dict[str, list[np.ndarray]] = {}
    if not flags.any():
        raw = np.asarray(kept[formula.response], dtype=float)
        seen = np.unique(raw)
        if seen.size <= OUTCOME_FUNCTIONS:
            # the score's column j sums y over column j's rows (a pair of columns
            # meets only in XᵀWX, which holds no y); the deviance, over all rows
            columns = [np.ones(len(raw), dtype=bool)] + [
                indicator[:, i] for i in range(p)
            ]
            outcome_sets = {
                value_key(formula.response, v): [(raw == v) & rows for rows in columns]
                for v in seen
            }
    subsets = (
        {c: full for c in reads}
        | {"model terms": _full_masks(site, kept, supports)}
        | levels_of
        | {key: _full_masks(site, kept, sets) for key, sets in outcome_sets.items()}
        | _left_out(site, kept)
    )
    return _ModelRows(
        _family(spec["family"]),
        x,
        y,
        trials,
        offset,
        flags,
        site.n_rows - len(kept),
        subsets,
        column_rows,
        pair_rows,
        outcome_rows,
        dict(zip(pattern_names, _full_masks(site, kept, patterns), strict=True)),
        domain,
        loads,
    )


#: What a whole-number column's value counts as an unknown against the functions
#: a set carries (a real value: 1): six ages came out of five functions by a
#: search over the integers, so six whole numbers carry fewer than five unknowns.
WHOLE_NUMBER_UNKNOWN = 0.75
#: Probe points at which a design column's values are compared as functions.
_PROBES = 48
_LEVEL = re.compile(r"C\(\s*(\w+)\s*\)\[(?:T\.)?([^\]]*)\]")


def column_relations(site: Site) -> dict[str, Relation]:
    """The site's value columns that are functions of others on its rows
    (:func:`healthlab.relations.find_relations`): a model of ``age_fu = age + 5``
    or of ``age_sq = age²`` sums functions of ``age``'s values, and is counted
    with them."""
    return site.column_relations().exact


def _probe(column: str) -> np.ndarray:
    """A column's probe points: fixed by its name."""
    seed = int.from_bytes(hashlib.sha256(column.encode()).digest()[:8], "big")
    return np.random.default_rng(seed).uniform(1.5, 4.5, _PROBES)


def value_functions(
    formula: ModelFormula,
    frame: pd.DataFrame,
    levels: Mapping[str, Sequence[str]],
    names: Sequence[str],
    relations: Mapping[str, Relation] | None = None,
) -> tuple[np.ndarray, list[frozenset[str]]]:
    """Each design column's values as a function of the numeric columns (its
    indicators on), at fixed probe points, and the numeric columns it reads.

    A numeric column of one value besides 0 (a 0/1 covariate) is an indicator, as
    :func:`_indicators` has it; every other one takes the probe values. A column
    that is a function of others on the site's rows (``relations``, see
    :func:`column_relations`) takes the same function of their probe values, and
    reads it by its own name (its unknowns are counted with its basis by
    direction, :func:`_unknowns`): ``age_fu = age + 5`` and ``age_sq = age²``
    sum functions of ``age``. From the formula, the levels, which columns are
    indicators here and how they relate."""
    relations = relations or {}
    valued = [c for c in formula.numeric if _valued(np.asarray(frame[c], dtype=float))]
    # the value columns the formula's are functions of
    bases = sorted(
        set().union(*(relations[c].columns if c in relations else {c} for c in valued))
    )

    # each basis column's probe points its own (the same in every model, so
    # that the functions one set carries can be added up across models)
    def probes(points: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {}
        for c in formula.numeric:
            if c not in valued:
                out[c] = np.ones(_PROBES)
            elif c in relations:
                out[c] = relations[c].evaluate(points)
            else:
                out[c] = points[c]
        return out

    points = {b: _probe(b) for b in bases}
    probe = probes(points)
    first = {c: next(iter(v)) for c, v in levels.items()}

    # one design per assignment of levels the columns need (a column's own
    # levels on, the others at their first), and per value column moved
    assignments: dict[tuple[tuple[str, str], ...], list[int]] = {}
    for i, column in enumerate(names):
        chosen = dict(first) | {m.group(1): m.group(2) for m in _LEVEL.finditer(column)}
        assignments.setdefault(tuple(sorted(chosen.items())), []).append(i)

    def design(
        values: Mapping[str, np.ndarray], chosen: dict[str, str]
    ) -> pd.DataFrame:
        data = dict(values) | {c: [chosen[c]] * _PROBES for c in formula.categorical}
        with np.errstate(all="ignore"):
            return _design(formula, pd.DataFrame(data), levels)

    vectors = np.zeros((len(names), _PROBES))
    moved: list[set[str]] = [set() for _ in names]
    for assignment, members in assignments.items():
        chosen = dict(assignment)
        base = design(probe, chosen)
        for i in members:
            vectors[i] = np.asarray(base[names[i]], dtype=float)
        # (each column read by its own name: its unknowns are counted with its
        # relations' by their directions, see _unknowns)
        for c in valued:
            changed = design(probe | {c: probe[c] * 1.37 + 0.11}, chosen)
            for i in members:
                after = np.asarray(changed[names[i]], dtype=float)
                if not np.allclose(after, vectors[i], equal_nan=True):
                    moved[i].add(c)
    reads = [frozenset(m) for m in moved]
    return vectors, reads


def _functions(vectors: np.ndarray) -> int:
    """How many functions of the values (the constant, a count, left out) the
    vectors span: the rank after removing the constant."""
    finite = vectors[np.all(np.isfinite(vectors), axis=1)]
    if not len(finite):
        return 0
    centred = finite - finite.mean(axis=1, keepdims=True)
    scale = np.abs(centred).max(axis=1, keepdims=True)
    useful = centred[scale[:, 0] > 1e-9] / scale[scale[:, 0] > 1e-9]
    if not len(useful):
        return 0
    singular = np.linalg.svd(useful, compute_uv=False)
    return int(np.sum(singular > 1e-8 * singular[0]))


@dataclass(frozen=True)
class FunctionSet:
    """A set of a site's rows a model's totals sum functions of the values over:
    its rows, the function vectors (one row each), the value columns they read,
    whether they change with β (``varying``: else they are the same at every
    iterate, as the score's Σ x·y) and what it is, in words (for a refusal)."""

    rows: np.ndarray
    vectors: np.ndarray
    reads: frozenset[str] | set[str]
    varying: bool = True
    name: str = "a set of rows"
    #: the functions are the values times the outcome (the score's Σ x·y, a Cox
    #: model's events' Σ x): other functions than the same values' own
    outcome: bool = False
    #: a model with an offset: (its column, the family weighting by it, and for
    #: a part at one of its values, how many values it takes here; else 0)
    weighting: tuple[str, str, int] | None = None


@dataclass(frozen=True)
class FunctionLoad:
    """A set of a site's rows and the functions of its values a model sums over
    it: ``rows`` (its size), ``unknowns`` (per row, of the functions' own value
    columns), ``functions`` (their rank at one iterate, the constant left out)."""

    rows: int
    unknowns: float
    functions: int
    #: per row, with every value column the iterates' weights read
    weighted_unknowns: float
    #: the set (over all the site's rows, packed), its function vectors and
    #: each value column's unknowns per row: to add up across models
    key: bytes = b""
    vectors: np.ndarray = field(default_factory=lambda: np.zeros((0, _PROBES)))
    columns: tuple[tuple[str, float], ...] = ()
    #: whether the iterates' weights read a value column: else they are a
    #: function of the rows' levels alone (audited as the design's patterns), and
    #: an iterate adds no function of the values
    varying: bool = True
    #: the set, in words
    name: str = "a set of rows"
    #: the value columns the iterates' weights read (with the set's own: what an
    #: iterate's weighted functions are functions of)
    weighted_columns: tuple[str, ...] = ()
    #: the functions are the values times the outcome (see FunctionSet)
    outcome: bool = False
    #: the offset weighting the functions (see FunctionSet)
    weighting: tuple[str, str, int] | None = None


def _column_unknowns(
    frame: pd.DataFrame, rows: np.ndarray, columns: set[str]
) -> dict[str, float]:
    """Per row, each of ``columns``' unknowns over ``rows``: 1, a column of whole
    numbers :data:`WHOLE_NUMBER_UNKNOWN`."""
    out = {}
    for column in columns:
        values = np.asarray(frame[column], dtype=float)[rows]
        whole = bool(np.all(np.isfinite(values) & (np.round(values) == values)))
        out[column] = WHOLE_NUMBER_UNKNOWN if whole else 1.0
    return out


def _unknowns(
    frame: pd.DataFrame,
    rows: np.ndarray,
    columns: set[str],
    relations: Mapping[str, Relation] | None = None,
) -> float:
    """Per row, the unknowns of ``columns`` over ``rows``: with ``relations``
    (columns that are functions of others), as many as the independent
    directions the columns take in their basis — ``age`` and ``age_fu = age + 5``
    are one unknown, ``total = a + b`` alone one (its powers determine the total,
    not its parts), with ``a`` two. Whole-number columns are taken first (their
    unknown is the smaller)."""
    each = _column_unknowns(frame, rows, columns)
    if not relations or not any(c in relations for c in each):
        return sum(each.values())
    bases = sorted(
        set().union(*(relations[c].columns if c in relations else {c} for c in each))
    )
    where = {b: i for i, b in enumerate(bases)}
    # a relation's direction: its gradient, at a probe point (an affine one's is
    # its coefficients anywhere; another's, generic at that point)
    point = {b: float(_probe(b)[0]) for b in bases}
    chosen: list[np.ndarray] = []
    total = 0.0
    for column in sorted(each, key=lambda c: (each[c], c)):
        direction = np.zeros(len(bases))
        if column in relations:
            for b, g in relations[column].gradient(point).items():
                direction[where[b]] = g
        else:
            direction[where[column]] = 1.0
        trial = [*chosen, direction / np.abs(direction).max()]
        if np.linalg.matrix_rank(np.vstack(trial), tol=1e-9) > len(chosen):
            chosen = trial
            total += each[column]
    return total


def function_loads(
    site: Site,
    frame: pd.DataFrame,
    sets: Sequence[FunctionSet],
    weighted: set[str],
    kept: pd.DataFrame | None = None,
) -> list[FunctionLoad]:
    """The function loads of a model's sets at a site (see :func:`check_functions`).

    ``sets``: (rows, the function vectors summed over them, the columns those
    read); entries of one set are combined (named by the first). ``weighted``:
    the value columns the iterates' weights read (every one in the linear
    predictor): at β ≠ 0 each varying function is weighted by them. Sets of fewer
    than k rows are the auditor's."""
    grouped: dict[bytes, tuple[np.ndarray, list[np.ndarray], set[str], list[Any]]]
    grouped = {}
    for entry_set in sets:
        rows = entry_set.rows
        if rows.sum() < site.policy.min_rows:
            continue
        key = np.packbits(rows).tobytes() + (b"y" if entry_set.outcome else b"")
        key += repr(entry_set.weighting).encode()
        entry = grouped.setdefault(
            key,
            (
                rows,
                [],
                set(),
                [False, entry_set.name, entry_set.outcome, entry_set.weighting],
            ),
        )
        entry[1].append(np.atleast_2d(entry_set.vectors))
        entry[2].update(entry_set.reads)
        entry[3][0] = entry[3][0] or entry_set.varying
    loads = []
    relations = column_relations(site)
    for rows, parts, columns, (varies, name, outcome, weighting) in grouped.values():
        vectors = np.concatenate(parts)
        full = _full_masks(site, kept if kept is not None else frame, [rows])[0]
        # (over the site's frame: the columns read may be ones the model's
        # columns are functions of, not in the model)
        loads.append(
            FunctionLoad(
                int(rows.sum()),
                # the origin's unknowns are the set's own columns'; an iterate's
                # weights read every value column of the model
                _unknowns(site._frame, full, columns, relations),
                _functions(vectors),
                _unknowns(site._frame, full, columns | weighted, relations),
                np.packbits(full).tobytes(),
                vectors,
                tuple(sorted(_column_unknowns(site._frame, full, columns).items())),
                bool(weighted) and varies,
                name,
                tuple(sorted(weighted)),
                outcome,
                weighting,
            )
        )
    return loads


def _function_key(vector: np.ndarray) -> bytes:
    """One function of the values (a row of a load's probe vectors), up to scale:
    the same function summed over another set, or by another model, has the same
    key."""
    v = np.asarray(vector, dtype=float)
    if not np.all(np.isfinite(v)):
        return b"nonfinite" + v.tobytes()
    top = float(np.abs(v).max(initial=0.0))
    if top == 0.0:
        return b"zero"
    v = v / top
    first = v[np.flatnonzero(np.abs(v) > 1e-12)[0]]
    v = v * np.sign(first)
    return bytes(np.round(v, 9).tobytes())


def _orthonormal(vectors: np.ndarray) -> np.ndarray:
    """An orthonormal basis (columns) of the span of function vectors (rows)."""
    finite = vectors[np.all(np.isfinite(vectors), axis=1)]
    scale = np.abs(finite).max(axis=1, keepdims=True)
    useful = finite[scale[:, 0] > 0] / scale[scale[:, 0] > 0]
    u, singular, _ = np.linalg.svd(useful.T, full_matrices=False)
    return u[:, singular > 1e-9 * singular[0]]


def _in_span(vector: np.ndarray, basis: np.ndarray) -> bool:
    """Whether a function vector is a combination of a span's (orthonormal)."""
    v = np.asarray(vector, dtype=float)
    if not np.all(np.isfinite(v)):
        return False
    norm = float(np.linalg.norm(v))
    if norm == 0.0:
        return True
    residual = v - basis @ (basis.T @ v)
    return bool(np.linalg.norm(residual) <= 1e-8 * norm)


@dataclass
class _Unit:
    """A set of a site's rows a researcher can isolate for some function (a block
    of the partition that function's sets make, in their span): the functions
    it carries and the value columns they read."""

    vectors: list[np.ndarray] = field(default_factory=list)
    weighted: int = 0
    columns: set[str] = field(default_factory=set)
    weighted_columns: set[str] = field(default_factory=set)


class FunctionAtoms:
    """What a site's models summed over its rows, followed on the sets a
    researcher can isolate: every model, population and interval alike.

    A model's totals over two sets are differenced as easily as two answers: a
    rare level as the reference (all rows minus the other levels), a model over
    all rows and again over a population without 6 patients, consecutive risk
    sets (an interval's leavers). So each function of the values is followed over
    the sets it was summed over, and every block of the partition those sets make
    that is a linear combination of them (the reference level, the 6 patients,
    the leavers) is a *unit* that carries the function: the origins' functions
    (unweighted: alike in every model, counted by their rank) and each later
    iterate's weighted ones (new each iterate, the count among them). A unit whose
    rows carry no more unknowns than its functions is refused, whichever query
    asked. The sets are kept on the *atoms* of every set seen (the finest
    partition), in memory, as the site's iterates."""

    def __init__(self, n_rows: int) -> None:
        self.n_rows = n_rows
        self._bytes = (n_rows + 7) // 8
        self.atoms: list[np.ndarray] = []
        self._inside: dict[bytes, list[int]] = {}
        self._blocks: dict[tuple[bytes, ...], list[tuple[int, ...]]] = {}
        #: every origin's (unweighted) function, of any model: its vector, the
        #: sets it was summed over, the value columns it reads
        self.origin: dict[bytes, tuple[np.ndarray, set[bytes], set[str]]] = {}
        #: per offset column, the weightings of its values the origins summed
        #: with (a family's, "none" for a model without it)
        self.weightings: dict[str, set[str]] = {}
        self.plain = False
        #: the origin functions over an offset's parts, with the offset and its
        #: number of values: they count once that many weightings were seen
        self.parts: dict[bytes, tuple[np.ndarray, set[bytes], set[str]]] = {}
        self.part_of: dict[bytes, tuple[str, int, bytes]] = {}
        #: the weighted functions units carry, by the unit's rows (packed)
        self.units: dict[bytes, _Unit] = {}
        #: per kind of function (the origin's, the outcome's, a part's marker),
        #: the span of the functions each set was summed with (orthonormal
        #: columns), the count among them
        self.spans: dict[bytes, dict[bytes, np.ndarray]] = {}
        self._spread: set[tuple[bytes, bytes]] = set()
        self._spread_keys: set[bytes] = set()
        #: each function's kind (its key's marker)
        self.marker_of: dict[bytes, bytes] = {}

    def _split(self, packed: np.ndarray) -> bool:
        """Refine the atoms by a set; whether any changed."""
        changed = False
        for i in range(len(self.atoms)):
            atom = self.atoms[i]
            inside = np.bitwise_and(atom, packed)
            if not inside.any() or np.array_equal(inside, atom):
                continue
            self.atoms[i] = inside
            self.atoms.append(np.bitwise_and(atom, np.bitwise_not(packed)))
            changed = True
        covered = np.zeros(self._bytes, dtype=np.uint8)
        for atom in self.atoms:
            covered |= atom
        rest = np.bitwise_and(packed, np.bitwise_not(covered))
        if rest.any():
            self.atoms.append(rest)
            changed = True
        if changed:
            self._inside = {}
            self._blocks = {}
        return changed

    def inside(self, key: bytes) -> list[int]:
        """The atoms inside a set (packed, as a load's key), refining by it."""
        if key not in self._inside:
            packed = np.frombuffer(key, dtype=np.uint8)
            self._split(packed)
            self._inside[key] = [
                i
                for i, atom in enumerate(self.atoms)
                if not np.bitwise_and(atom, np.bitwise_not(packed)).any()
            ]
        return self._inside[key]

    def units_of(self, keys: Iterable[bytes]) -> list[bytes]:
        """The units of a function summed over these sets: the blocks of the
        partition they make (atoms alike in every set) whose rows are a linear
        combination of the sets, each as its rows (packed)."""
        distinct = tuple(sorted(set(keys)))
        for k in distinct:
            self.inside(k)
        if distinct not in self._blocks:
            members = [set(self.inside(k)) for k in distinct]
            used = sorted(set().union(*members)) if members else []
            blocks: dict[tuple[bool, ...], list[int]] = {}
            for a in used:
                blocks.setdefault(tuple(a in m for m in members), []).append(a)
            out: list[tuple[int, ...]] = []
            if used:
                where = {a: r for r, a in enumerate(used)}
                matrix = np.zeros((len(used), len(distinct)))
                for j, m in enumerate(members):
                    matrix[[where[a] for a in m], j] = 1.0
                # a block is in the span iff its indicator has no part in the
                # left null space of the atoms-by-sets matrix
                u, singular, _ = np.linalg.svd(matrix, full_matrices=True)
                rank = int(np.sum(singular > 1e-9 * max(1.0, float(singular[0]))))
                null = u[:, rank:]
                for block in blocks.values():
                    part = null[[where[a] for a in block]].sum(axis=0)
                    if float(np.abs(part).max(initial=0.0)) < 1e-9:
                        out.append(tuple(block))
            self._blocks[distinct] = out
        units = []
        for members_of in self._blocks[distinct]:
            packed = np.zeros(self._bytes, dtype=np.uint8)
            for a in members_of:
                packed |= self.atoms[a]
            units.append(packed.tobytes())
        return units

    def span_over(self, marker: bytes, rows: bytes, vectors: np.ndarray) -> None:
        """Add functions summed over a set (its rows, packed) to the span the
        set carries of its kind (``marker``: the origin's, the outcome's, an
        offset's part's), the count always among them."""
        spans = self.spans.setdefault(marker, {})
        before = spans.get(rows)
        stacked = [np.ones((1, _PROBES)), np.atleast_2d(vectors)]
        if before is not None:
            stacked.append(before.T)
        basis = _orthonormal(np.concatenate(stacked))
        if before is None or basis.shape[1] > before.shape[1]:
            spans[rows] = basis
            self._spread.add((marker, rows))

    def spread(self) -> None:
        """Give every function the sets whose span holds it (after new sets or
        functions): the origin's and the offset parts', each of its kind."""
        for target in (self.origin, self.parts):
            for key, (vector, keys, _) in target.items():
                marker = self.marker_of[key]
                fresh = key not in self._spread_keys
                for rows, basis in self.spans.get(marker, {}).items():
                    if rows in keys or not (fresh or (marker, rows) in self._spread):
                        continue
                    if _in_span(vector, basis):
                        keys.add(rows)
                self._spread_keys.add(key)
        self._spread = set()

    def parts_open(self, column: str) -> bool:
        """Whether an offset's parts are summed on their own: the site has seen
        as many weightings of its values as it takes (the fewest of its parts'
        counts)."""
        counts = [v for c, v, _ in self.part_of.values() if c == column]
        if not counts:
            return False
        seen = len(self.weightings.get(column, set())) + int(self.plain)
        return seen >= min(counts)

    def rows(self, key: bytes) -> np.ndarray:
        packed = np.frombuffer(key, dtype=np.uint8)
        return np.unpackbits(packed, count=self.n_rows).astype(bool)


def check_functions(
    site: Site,
    loads: Sequence[FunctionLoad],
    answered: int,
    weighted: bool,
    new: bool = True,
) -> None:
    """Refuse a model iterate whose totals, with every earlier model's, sum too
    many functions of the values over too few of this site's rows.

    With ``e`` functions of ``u`` unknowns per row over ``n`` rows, the values are
    determined once ``n·u ≤ e`` (three patients' ages from a pair's count, Σa, Σa²,
    Σa³, Σa⁴), and for whole numbers in a narrow range before (six ages out of
    five functions, by searching the integers): so rows must carry more unknowns
    than functions, a column of whole numbers counting
    :data:`WHOLE_NUMBER_UNKNOWN`. At β ≠ 0 every function (the count too) comes
    weighted by the iterate's weights, new functions of the row's values: after
    ``t`` answered iterates a set has carried ``(e + 1)(t + 1) − 1`` (a 6-row
    set's ages came out of an honest Poisson path's seven iterates); an iterate
    asked again (``new`` False) adds nothing. A Gaussian model's weights are
    constant (``weighted`` False), and so are those of a design of levels alone,
    or a set's Σ x y: their iterates add none. Everything is counted on the sets
    a researcher can isolate from every model's sets (:class:`FunctionAtoms`),
    so no difference of two sets escapes the count. The owner's loud opt-out,
    ``DisclosurePolicy(count_iterates=False)``, switches the weighted count off."""
    atoms = site.function_atoms
    names: dict[bytes, str] = {}
    keyed = [load for load in loads if load.key]
    for load in keyed:
        names.setdefault(_rows_key(load), load.name)
    newly: set[str] = set()  # offset columns whose parts this query unlocked
    if not answered:  # the origin's functions, each with the sets it was over
        before = {c: atoms.parts_open(c) for c in atoms.weightings}
        if any(load.weighting is None for load in keyed):
            atoms.plain = True
        for load in keyed:
            if load.weighting is not None:
                atoms.weightings.setdefault(load.weighting[0], set()).add(
                    load.weighting[1]
                )
        for load in keyed:
            reads = {c for c, _ in load.columns}
            marker = b"y:" if load.outcome else b""
            target = atoms.origin
            base = marker
            if load.weighting is not None and load.weighting[2]:
                target = atoms.parts
                column, values = load.weighting[0], load.weighting[2]
                marker += f"part:{column}:".encode()
            atoms.span_over(marker, _rows_key(load), load.vectors)
            for vector in np.atleast_2d(load.vectors):
                fkey = _function_key(vector)
                key = marker + fkey
                entry = target.setdefault(key, (vector, set(), set()))
                entry[1].add(_rows_key(load))
                entry[2].update(reads)
                atoms.marker_of[key] = marker
                if target is atoms.parts:
                    atoms.part_of[key] = (column, values, base + fkey)
        # a function is summed over every set whose functions span it, whichever
        # model's column it was (Σ(age + 5) with the count is Σ age; Σ age and
        # Σ bmi are Σ(age + bmi))
        atoms.spread()
        newly = {
            c for c in atoms.weightings if atoms.parts_open(c) and not before.get(c)
        }
    checked: dict[bytes, _Unit] = {}
    asked = {_rows_key(load) for load in keyed}
    # each origin function reaches the units its sets isolate (checked when this
    # query sums it: another's units are as they were)
    reached: dict[bytes, _Unit] = {}
    # an offset's parts, once open, are summed with the whole sets the same
    # function was summed over (all rows minus the other parts: the rare value)
    followed = list(atoms.origin.items())
    for k, (vector, keys, reads) in atoms.parts.items():
        if atoms.parts_open(atoms.part_of[k][0]):
            whole = atoms.origin.get(atoms.part_of[k][2])
            followed.append((k, (vector, keys | (whole[1] if whole else set()), reads)))
    for _, (vector, keys, reads) in followed:
        for unit in atoms.units_of(keys):
            entry = reached.setdefault(unit, _Unit())
            entry.vectors.append(vector)
            entry.columns.update(reads)
    for key, (_, keys, _) in followed:
        unlocked = key in atoms.part_of and atoms.part_of[key][0] in newly
        if not (keys & asked or unlocked):
            continue
        for unit in atoms.units_of(keys):
            checked[unit] = reached[unit]
    if answered and weighted and new:
        # this iterate's weighted functions, the count among them: each reaches
        # the units its sets isolate (the reference level: all rows minus the
        # others; an interval's leavers: two risk sets apart), not a part only
        # an unweighted set (Σ x y over the outcome's rows) cuts out
        families: dict[bytes, tuple[set[bytes], set[str]]] = {}
        for load in keyed:
            # (an offset's parts count at the origins, once open: at an iterate
            # each is weighted alike with its whole set)
            if not load.varying or (load.weighting and load.weighting[2]):
                continue
            reads = {c for c, _ in load.columns} | set(load.weighted_columns)
            for vector in [np.ones(_PROBES), *np.atleast_2d(load.vectors)]:
                family = families.setdefault(_function_key(vector), (set(), set()))
                family[0].add(_rows_key(load))
                family[1].update(reads)
        for keys, reads in families.values():
            for unit in atoms.units_of(keys):
                stored = atoms.units.setdefault(unit, _Unit())
                stored.weighted += 1
                stored.weighted_columns.update(reads)
                checked[unit] = reached.get(unit, _Unit())
    # a load without a key (a unit's own check) is its own set
    for load in loads:
        if load.key:
            continue
        functions = load.functions
        unknowns = load.unknowns
        if weighted and answered and load.varying:
            functions = (load.functions + 1) * (answered + 1) - 1
            unknowns = load.weighted_unknowns
        _refuse_if_determined(site, load.rows, unknowns, functions, load.name)
    frame = site._frame
    for unit, entry in checked.items():
        stored = atoms.units.get(unit)
        extra = stored.weighted if stored is not None else 0
        origin = _functions(np.asarray(entry.vectors)) if entry.vectors else 0
        functions = origin + extra
        if not functions:
            continue
        rows = atoms.rows(unit)
        if rows.sum() < site.policy.min_rows:
            # a unit of fewer than k rows a researcher can isolate: its count at
            # least is a statistic of 1–2 patients (a set the subset auditor may
            # not see: an offset's rare value)
            where = names.get(unit, "a part of the model's rows")
            raise TooFewRows(
                f"site {site.name}: the model sums functions of the values over "
                f"{where} that a combination of its sets isolates in fewer than "
                f"{site.policy.min_rows} rows; use a coarser category, offset or "
                "time grid, or leave out a site this small"
            )
        columns = set(entry.columns)
        if extra and stored is not None:
            columns |= stored.weighted_columns
        unknowns = (
            _unknowns(frame, rows, columns, column_relations(site)) if columns else 0.0
        )
        name = names.get(unit, "a part of the model's rows")
        _refuse_if_determined(site, int(rows.sum()), unknowns, functions, name)


def _rows_key(load: FunctionLoad) -> bytes:
    """A load's rows (packed)."""
    return load.key


def _refuse_if_determined(
    site: Site, rows: int, unknowns: float, functions: int, name: str
) -> None:
    if functions and rows * max(unknowns, WHOLE_NUMBER_UNKNOWN) <= functions:
        raise TooFewRows(
            f"site {site.name}: the model sums {functions} functions of the "
            f"values over {name}, too few rows at this site for them (their "
            "values would be determined); use fewer transforms or interactions "
            "of one column, a coarser category or time grid, or leave out a "
            "site this small"
        )


#: The largest domain of a discrete design whose pattern counts are audited. The
#: iterates' totals solve for the counts of a small domain (4 and 8 values were
#: solved); for a larger one the system is as large but so ill-conditioned that
#: totals exact to 1e-15 do not determine it — not proven, see README.
MAX_DOMAIN = 16
#: A column is a discrete scale when its values repeat this often on average.
REPEATS = 3


def design_patterns(x: np.ndarray, bound: int) -> tuple[list[np.ndarray], int]:
    """A discrete design's patterns (the rows of each distinct design row) and the
    size of its domain (the product of each column's distinct values), when the
    domain holds at most ``bound`` patterns; else none.

    Each iterate's totals are sums over the patterns of a pattern's count times a
    function of the pattern, and the functions change with β: over a model's
    iterates, once its totals number the domain's patterns, they solve for each
    pattern's count (a 4-valued covariate's one patient at 3 came out of a Cox
    model's Newton path, and a 2-row value of an 8-valued one out of a Poisson
    model's). So from then on each pattern's rows are a subset for the auditor (0
    or at least k rows at a site): the model is a crosstab of its covariates."""
    if not len(x):
        return [], 0
    domain = 1
    for column in x.T:
        seen = np.unique(column).size
        # a scale (each value held by several rows) is discrete; a column of
        # mostly distinct values is not (the researcher does not know them)
        if seen * REPEATS > len(column):
            return [], 0
        domain *= seen
        if domain > bound:
            return [], 0
    patterns, inverse = np.unique(x, axis=0, return_inverse=True)
    inverse = np.asarray(inverse).reshape(-1)
    return [inverse == i for i in range(len(patterns))], domain


def raw_columns(formula: ModelFormula, frame: pd.DataFrame) -> np.ndarray:
    """The columns a design is built from (numbers, and categories as codes): its
    patterns' domain is theirs, not the design's (pat_karno with its square is 8
    values, not 64)."""
    parts = [np.asarray(frame[c], dtype=float) for c in formula.numeric]
    parts += [
        pd.Categorical(frame[c].astype(str)).codes.astype(float)
        for c in formula.categorical
    ]
    return np.column_stack(parts) if parts else np.zeros((len(frame), 0))


#: The subset key prefix of a discrete design's pattern (followed by its values).
DESIGN_PATTERN = "patterns of the design: "


def pattern_labels(
    formula: ModelFormula, frame: pd.DataFrame, patterns: Sequence[np.ndarray]
) -> list[str]:
    """Each pattern by its design row's values (the raw columns' own, numbers as
    floats): the same pattern is named alike at every site, whatever values
    another site holds (a category's codes are each site's own)."""
    names = []
    for mask in patterns:
        first = int(np.flatnonzero(mask)[0])
        parts = [f"{c}={float(frame[c].iloc[first])!r}" for c in formula.numeric]
        parts += [f"{c}={str(frame[c].iloc[first])!r}" for c in formula.categorical]
        names.append(", ".join(parts))
    return names


def equations(p: int) -> int:
    """The totals of one iterate that change with β and not with the outcome:
    XᵀWX and the score's Σ x μ."""
    return p * (p + 1) // 2 + p


def pair_supports(indicator: np.ndarray) -> list[np.ndarray]:
    """The distinct row sets two design columns' indicators hold in common (a
    column with itself included): the sets XᵀWX sums over."""
    p = indicator.shape[1]
    distinct: dict[bytes, np.ndarray] = {}
    for i in range(p):
        for j in range(i, p):
            both = indicator[:, i] & indicator[:, j]
            distinct.setdefault(np.packbits(both).tobytes(), both)
    return list(distinct.values())


def value_sets(
    site: Site,
    kept: pd.DataFrame,
    formula: ModelFormula,
    agreed: Mapping[str, Sequence[str]],
    terms: list[str],
    extra: Sequence[str] = (),
) -> dict[str, list[np.ndarray]]:
    """The value sets of a model's numeric columns of few values, as subsets.

    A numeric column of few values is a category in disguise: the totals hold many
    functions of it (prio, prio², √prio, their products, exp(offset)), and as many
    functions as values solve for each value's count and sums (one patient's age
    at prio = 15 came out). ``extra``: columns outside the design (an offset, the
    trials)."""
    out: dict[str, list[np.ndarray]] = {}
    uses = _uses(formula, agreed, terms)
    for column in sorted({*formula.numeric, *extra}):
        d = uses.get(column, 0) + (1 if column in extra else 0)
        # with d functions of it in the design, the totals hold every product of
        # two of {1, f_1, … f_d}; an offset or trials column alone, its weight
        # and 1
        functions = (d + 1) * (d + 2) // 2 if column in uses else 2
        values = np.asarray(kept[column], dtype=float)
        seen = np.unique(values)
        if seen.size <= functions:
            for v in seen:  # a key per value: the same cell alike at every site
                out[value_key(column, v)] = _full_masks(site, kept, [values == v])
    return out


_GLM = ModelKind(MODEL_FIELDS, _model_rows, _glm_baseline, _FLAGS)


def _uses(
    formula: ModelFormula, levels: Mapping[str, Sequence[str]], terms: list[str]
) -> dict[str, int]:
    """How many design columns each numeric column enters (from one synthetic row
    changed in that column: public, no data)."""
    base = {c: [2.0] for c in formula.numeric} | {
        c: [next(iter(v))] for c, v in levels.items()
    }
    with np.errstate(all="ignore"):
        reference = _design(formula, pd.DataFrame(base), levels).to_numpy(dtype=float)
        out = {}
        for column in formula.numeric:
            changed = _design(
                formula, pd.DataFrame(base | {column: [3.0]}), levels
            ).to_numpy(dtype=float)
            out[column] = int(np.sum(changed != reference))
    return out


def _indicators(
    formula: ModelFormula, frame: pd.DataFrame, levels: Mapping[str, Sequence[str]]
) -> np.ndarray:
    """Per row and design column, whether the column's indicators (its dummies and
    0/1 covariates) all hold: the design again with every value set to 2 (where
    log, sqrt and squares are finite and not zero) and only indicators kept."""
    marked = frame.copy()
    for column in formula.numeric:
        values = np.asarray(frame[column], dtype=float)
        if np.unique(values[values != 0]).size > 1:  # a value, not an indicator
            marked[column] = 2.0
    with np.errstate(all="ignore"):
        design = _design(formula, marked, levels).to_numpy(dtype=float)
    return np.asarray(design != 0)


def _pair(i: int, j: int, p: int) -> int:
    """The position of (i, j), i <= j, in the upper triangle's row-major order."""
    return i * p - i * (i - 1) // 2 + (j - i)


def _step_check(
    site: Site,
    spec: Mapping[str, Any],
    key: str,
    beta: np.ndarray,
    answer: tuple[np.ndarray, np.ndarray, np.ndarray],
    baseline: list[int],
    data_flags: tuple[str, ...],
    flags: np.ndarray,
) -> Check:
    """The check that β is the model's start or a Newton step from an iterate this
    site answered, and that no site's rows break a rule of the model (anonymous
    flags); passing it records β as answered (with the site's H and g).

    ``answer`` is this site's H, g and each score's scale at β; ``baseline`` the
    coefficients a start solves for (a GLM's intercept, a Cox model's baseline
    hazard), every other one at zero."""
    h, g, score_scale = answer
    p = len(g)
    step = spec.get("step")

    def remember() -> None:
        site.remember_iterate(key, beta, (h, g))
        if step == "newton":
            start = np.asarray(spec.get("previous"), dtype=float)
            site.record_step(key, start, float(spec.get("fraction") or 1.0), True)

    rule = (
        "the model's coefficients do not follow from its previous iterate by a "
        "Newton step over the sites' own answers (a model is only answered along "
        "its own Newton path); fit it again from the start"
    )
    labels = (rule,) * p + data_flags + _ITERATE_FLAGS
    half = np.full(len(labels) - p, 0.5)  # any site's flag fails the check

    # a step's refusal unlocks the next halving only when the step itself held
    # and only a fitted 0 or 1 (or a total beyond the encoding) refused it: a
    # deliberately wrong step must not (it unlocked every fraction)
    halving: list[float | None] = [None]

    def refused(broken: list[str]) -> None:
        # recorded when asked (a site that refuses first stops the others'
        # checks); a step whose own equation failed is no refusal to halve after
        if halving[0] is not None and not set(broken) <= set(_ITERATE_FLAGS):
            start = np.asarray(spec.get("previous"), dtype=float)
            site.undo_step(key, start, halving[0])

    def check(values: np.ndarray, tolerance: np.ndarray) -> Check:
        return Check(
            np.concatenate([values, flags]),
            np.concatenate([tolerance, half]),
            rule,
            remember,
            on_fail=refused,
            labels=labels,
        )

    if step == "origin":
        if np.any(beta != 0):
            raise DisclosureRefused(f"site {site.name}: a model starts at zero")
        return check(np.zeros(p), np.full(p, np.inf))
    if step == "start":
        # the intercept-only fit (a Cox model's: the baseline hazard alone): every
        # slope exactly 0, the baseline's scores 0
        if not baseline:
            raise DisclosureRefused(f"site {site.name}: this model has no intercept")
        if np.any(np.delete(beta, baseline) != 0):
            raise DisclosureRefused(
                f"site {site.name}: a model's start has every slope at zero"
            )
        values = np.zeros(p)
        values[baseline] = g[baseline]
        tolerance = np.full(p, np.inf)
        own = score_scale[baseline]
        # a score none of this site's rows enter is checked by the sites it has
        tolerance[baseline] = np.where(own > 0, STEP_TOLERANCE * own, np.inf)
        return check(values, tolerance)
    if step != "newton":
        raise InvalidInput("a model's step is origin, start or newton")
    previous = np.asarray(spec.get("previous") or [], dtype=float)
    stored = site.model_iterate(key, previous) if previous.shape == (p,) else None
    if stored is None:
        raise DisclosureRefused(
            f"site {site.name} did not answer the iterate this step starts from; "
            "fit the model again from the start"
        )
    h_prev, g_prev = stored
    fraction = float(spec.get("fraction") or 1.0)
    if fraction not in FRACTIONS:
        raise InvalidInput("a Newton step's fraction is 1, 1/2, 1/4, … 1/1024")
    # a step is halved only after the longer one was asked and not answered (the
    # sites refused it: a fitted 0 or 1), one halving at a time: else one
    # direction gives eleven iterates (they solved for a covariate's value counts)
    smallest, answered = site.newton_steps(key, previous)
    if fraction < 1 and (answered or smallest != 2 * fraction):
        raise DisclosureRefused(
            f"site {site.name}: a Newton step is halved only after the sites refused "
            "the longer one from the same iterate; fit the model again from the start"
        )
    halving[0] = fraction
    site.record_step(key, previous, fraction)
    values = h_prev @ (beta - previous) - fraction * g_prev
    # the tolerance does not grow with the step: a step along a direction the
    # information matrix (nearly) cannot see would otherwise pass at any length
    # (a researcher steered β that way until one patient's weight was left)
    scale = STEP_TOLERANCE * fraction * np.abs(g_prev) + 1e-10 * (
        np.abs(h_prev) @ (np.abs(previous) + 1.0)
    )
    # a coordinate none of this site's rows touch does not move its rows' fit:
    # the sites whose rows it touches check it
    tolerance = np.where(np.diag(h_prev) > 0, scale, np.inf)
    return check(values, tolerance)


# ------------------------------------------------------------ researcher side
@dataclass
class GLMResults(FittedModel):
    """A pooled GLM fit, in statsmodels' shape (``GLMResults``).

    ``params``, ``bse``, ``tvalues`` (z), ``pvalues``, ``conf_int(alpha)``,
    ``cov_params()``, ``nobs``, ``df_model``, ``df_resid``, ``llf``, ``deviance``,
    ``pearson_chi2``, ``scale``, ``aic``, ``bic`` (from the log-likelihood, as
    statsmodels' ``bic_llf``), ``converged``, ``iterations``, ``summary()``;
    ``odds_ratios()`` (binomial) and ``rate_ratios()`` (Poisson) with their CIs;
    ``to_frame()``; ``receipt``.
    """

    formula: str
    family: str
    nobs: int
    llf: float
    deviance: float
    pearson_chi2: float
    scale: float
    iterations: int
    converged: bool
    sites: list[str]
    missing: float
    receipt: dict[str, Any]

    @property
    def df_model(self) -> int:
        return len(self.params) - int("Intercept" in self.params.index)

    @property
    def df_resid(self) -> int:
        return self.nobs - len(self.params)

    @property
    def aic(self) -> float:
        return -2 * self.llf + 2 * (self.df_model + 1)

    @property
    def bic(self) -> float:
        return float(-2 * self.llf + (self.df_model + 1) * np.log(self.nobs))

    def odds_ratios(self, alpha: float = 0.05) -> pd.DataFrame:
        """exp(coefficient) with its CI, per term (the intercept left out)."""
        if self.family != "binomial":
            raise InvalidInput("odds ratios are for binomial models (logit link)")
        return self._ratios(alpha).rename(columns={"ratio": "odds_ratio"})

    def rate_ratios(self, alpha: float = 0.05) -> pd.DataFrame:
        """exp(coefficient) with its CI, per term (the intercept left out)."""
        if self.family != "poisson":
            raise InvalidInput("rate ratios are for Poisson models (log link)")
        return self._ratios(alpha).rename(columns={"ratio": "rate_ratio"})

    def summary(self, alpha: float = 0.05) -> Any:
        """statsmodels' summary table (``print(fit.summary())``)."""
        link = type(_family(self.family).link).__name__
        left = [
            ("Dep. Variable:", [self.formula.split("~")[0].strip()]),
            ("Model:", ["GLM, pooled"]),
            ("Model Family:", [self.family.capitalize()]),
            ("Link Function:", [link]),
            ("Method:", ["IRLS (Newton)"]),
            ("Sites:", [str(len(self.sites))]),
            ("No. Iterations:", [str(self.iterations)]),
        ]
        right = [
            ("No. Observations:", [str(self.nobs)]),
            ("Df Residuals:", [str(self.df_resid)]),
            ("Df Model:", [str(self.df_model)]),
            ("Scale:", [f"{self.scale:.4g}"]),
            ("Log-Likelihood:", [f"{self.llf:.5g}"]),
            ("Deviance:", [f"{self.deviance:.5g}"]),
            ("Pearson chi2:", [f"{self.pearson_chi2:.3g}"]),
        ]
        return self._summary(
            "Generalized Linear Model Regression Results",
            left[0][1][0],
            left,
            right,
            alpha,
            self.missing,
        )

    def __repr__(self) -> str:
        return (
            f"GLMResults({self.formula!r}, family={self.family!r}, nobs={self.nobs}, "
            f"sites={len(self.sites)})"
        )


def _start(family: str, spec: Mapping[str, Any], first: dict[str, Any]) -> float | None:
    """The intercept-only estimate from the answer at β = 0, where it has a closed
    form (no offset for binomial; Poisson with or without one); else None."""
    index = spec.get("intercept")
    if index is None:
        return None
    g, h = first["g"][index], first["H"][index, index]
    if family == "binomial" and not spec.get("offset"):
        # at β = 0: μ = ½, W = w/4, so g = Σ w(y − ½) and H = Σ w / 4
        total = 4 * h
        share = (g + total / 2) / total
        return float(np.log(share / (1 - share))) if 0 < share < 1 else None
    if family == "poisson":
        # at β = 0: μ = exp(offset) = W, so g = Σ (y − μ) and H = Σ μ
        events = g + h
        return float(np.log(events / h)) if events > 0 and h > 0 else None
    return None


def _aliased(h: np.ndarray, names: list[str]) -> None:
    """Refuse an aliased design (the information matrix, intercept included)."""
    check_aliasing(h, names)


#: How a model's driver asks the sites for one iterate: (β, step, previous β,
#: fraction of the Newton step) → the unpacked pooled totals there.
Ask = Callable[[np.ndarray, str, "np.ndarray | None", float], dict[str, Any]]


def follow_newton(
    ask: Ask,
    beta: np.ndarray,
    current: dict[str, Any],
    terms: list[str],
    *,
    max_iter: int,
    tol: float,
) -> tuple[np.ndarray, dict[str, Any], int]:
    """Newton's method from an answered iterate to convergence: each step solves
    ``H δ = g`` over the pooled totals and asks the sites at ``β + δ`` (halved
    while it lands where a fitted probability is 0 or 1, which the sites refuse
    by a flag). Returns the estimate, the totals there and the steps taken;
    refuses by name an aliased design, perfect separation or no convergence."""
    for iterations in range(max_iter + 1):
        h, g = current["H"], current["g"]
        try:
            delta = np.linalg.solve(h, g)
        except np.linalg.LinAlgError:
            _aliased(h, terms)
            raise
        if np.max(np.abs(delta)) <= tol * (1 + np.max(np.abs(beta))):
            return beta, current, iterations
        if iterations == max_iter or not np.isfinite(current["deviance"]):
            break
        beta, current = _step(ask, beta, delta)
    raise NotConverged(
        f"the model did not converge in {max_iter} Newton steps (often a sign of "
        "separation, or of a covariate on a very large scale); rescale or drop "
        "covariates"
    )


def _step(
    ask: Ask, beta: np.ndarray, delta: np.ndarray
) -> tuple[np.ndarray, dict[str, Any]]:
    """A Newton step, halved while it lands where some row's fitted probability is
    0 or 1 (the sites refuse such an iterate, by a flag)."""
    for fraction in FRACTIONS:
        target = beta + fraction * delta
        try:
            return target, ask(target, "newton", beta, fraction)
        except DisclosureRefused as refused:
            if _SEPARATION not in str(refused):
                raise
    raise PerfectSeparation(
        "the outcome is predicted exactly (fitted probability 0 or 1) for some "
        "rows: the maximum-likelihood estimates do not exist. Drop or merge the "
        "covariate that separates the outcome, or coarsen it"
    )


def _ordered(levels: list[str]) -> list[str]:
    """Levels in the order statsmodels uses: numerically when they are numbers
    (2 before 10), else as text; the first is the reference."""
    try:
        return sorted(levels, key=float)
    except ValueError:
        return sorted(levels)


def agree_levels(
    sites: list[Site],
    parsed: ModelFormula,
    researcher: str | None,
    keys: KeyHolder,
) -> dict[str, list[str]]:
    """Each C(column)'s levels, agreed across the sites by :func:`levels` (levels
    too rare anywhere are not released), in statsmodels' order."""
    agreed: dict[str, list[str]] = {}
    for column in parsed.categorical:
        released = levels(sites, column, researcher=researcher, keys=keys)
        if len(released) < 2:
            raise DisclosureRefused(
                f"C({column}) has fewer than 2 levels released by the sites; it "
                "cannot be a covariate"
            )
        agreed[column] = _ordered(list(released))
    return agreed


class ModelSession:
    """The researcher's side of fitting models: asks the sites for one iterate at
    a time, keeps every run (for the receipt) and the sites still taking part (a
    site that refused the origin is left out of the model's later iterates)."""

    def __init__(
        self,
        sites: list[Site],
        keys: KeyHolder,
        researcher: str | None,
        *,
        min_sites: int,
        on_refusal: str,
    ) -> None:
        self.participants = sites
        self.keys = keys
        self.researcher = researcher
        self.min_sites = min_sites
        self.on_refusal = on_refusal
        self.runs: list[StudyRun] = []

    def ask(
        self,
        spec: Mapping[str, Any],
        beta: np.ndarray,
        step: str,
        previous: np.ndarray | None,
        fraction: float = 1.0,
    ) -> dict[str, Any]:
        """The pooled totals of the model ``spec`` at ``beta``, unpacked."""
        layout = _Layout(len(spec["terms"]))
        run = _run(
            self.participants,
            "glm",
            {
                **spec,
                "beta": beta.tolist(),
                "step": step,
                "previous": None if previous is None else previous.tolist(),
                "fraction": fraction,
            },
            layout.size,
            keys=self.keys,
            researcher=self.researcher,
            min_sites=self.min_sites,
            min_rows=0,
            on_refusal=self.on_refusal if step == "origin" else "raise",
        )
        self.runs.append(run)
        names = {s.name for s in run.sites}
        self.participants = [s for s in self.participants if s.name in names]
        return layout.unpack(run.totals)

    @property
    def missing_withheld(self) -> bool:
        return any(r.missing_withheld for r in self.runs)

    def attach_receipt(
        self, result: Any, kind: str, parameters: dict[str, Any]
    ) -> None:
        """The receipt of every run of the fit, over its table (``to_frame()``)."""
        result.receipt = receipt_for(
            result.to_frame(), self.runs, kind=kind, parameters=parameters
        )


def glm(
    sites: SitesLike,
    formula: str,
    family: str = "binomial",
    *,
    offset: str | None = None,
    trials: str | None = None,
    researcher: str | None = None,
    keys: KeyHolder | None = None,
    population: Sequence[str] | None = None,
    min_sites: int = 2,
    on_refusal: str = "raise",
    max_iter: int = 40,
    tol: float = 1e-11,
) -> GLMResults:
    """Fit a GLM to the pooled rows of ``sites`` by Newton's method (IRLS), exactly.

    ``formula`` is a Wilkinson formula (formulaic): ``"cvd ~ age + C(sex) +
    age:bmi"``. Categories' levels are agreed across the sites by :func:`levels`
    (levels too rare anywhere are not released; their rows are left out and
    counted). ``family`` is ``"binomial"`` (logit link; a 0/1 outcome, or successes
    out of ``trials=``), ``"poisson"`` (log link; ``offset=`` a column such as log
    person-time) or ``"gaussian"`` (identity link). Rows with a missing value in a
    column the model reads are left out (complete cases; counted in the summary).

    Standard errors come from the information matrix at the estimate (scale 1 for
    binomial and Poisson, Pearson χ²/df for Gaussian), as statsmodels' ``GLM``.
    Refused with a named error: an aliased design (:class:`AliasedDesign`, naming
    the term), perfect separation (:class:`PerfectSeparation`), no convergence in
    ``max_iter`` Newton steps (:class:`NotConverged`).

    Examples
    --------
    >>> fit = glm(sites, "cvd ~ age + C(sex)", researcher=me)  # doctest: +SKIP
    >>> fit.odds_ratios()  # doctest: +SKIP
    """
    site_list = as_sites(sites)
    parsed = parse_formula(formula)
    fam = str(family).lower()
    _family(fam)
    if trials and fam != "binomial":
        raise InvalidInput("trials= is for binomial models")
    if offset and offset in parsed.reads:
        raise InvalidInput(f"the offset {offset!r} is also in the formula")
    keys = keys or KeyHolder()
    agreed = agree_levels(site_list, parsed, researcher, keys)
    terms = design_columns(parsed, agreed)
    spec: dict[str, Any] = {
        "formula": parsed.text,
        "family": fam,
        "terms": terms,
        "levels": agreed,
        "offset": offset,
        "trials": trials,
        "population": population_columns(population),
        "intercept": terms.index("Intercept") if "Intercept" in terms else None,
    }
    session = ModelSession(
        site_list, keys, researcher, min_sites=min_sites, on_refusal=on_refusal
    )

    def ask(
        beta: np.ndarray, step: str, previous: np.ndarray | None, fraction: float = 1
    ) -> dict[str, Any]:
        return session.ask(spec, beta, step, previous, fraction)

    beta = np.zeros(len(terms))
    current = ask(beta, "origin", None)
    if current["n"] <= len(terms):
        raise DisclosureRefused("fewer pooled rows than the model's parameters")
    _aliased(current["H"], terms)
    start = _start(fam, spec, current)
    if start is not None:
        beta = np.zeros(len(terms))
        beta[spec["intercept"]] = start
        current = ask(beta, "start", None)
    beta, current, iterations = follow_newton(
        ask, beta, current, terms, max_iter=max_iter, tol=tol
    )
    converged = True
    h = current["H"]
    _aliased(h, terms)
    n = round(current["n"])
    dof = n - len(terms)
    if fam == "gaussian":
        scale = current["pearson"] / dof
        llf = -n / 2 * (np.log(2 * np.pi * current["deviance"] / n) + 1)
    else:
        scale = 1.0
        llf = current["llf"]
    cov = np.linalg.inv(h) * scale
    params = pd.Series(beta, index=terms)
    withheld = session.missing_withheld
    result = GLMResults(
        formula=parsed.text,
        family=fam,
        params=params,
        cov=cov,
        nobs=n,
        llf=float(llf),
        deviance=float(current["deviance"]),
        pearson_chi2=float(current["pearson"]),
        scale=float(scale),
        iterations=iterations,
        converged=converged,
        sites=[s.name for s in session.participants],
        missing=np.nan if withheld else float(current["dropped"]),
        receipt={},
    )
    session.attach_receipt(
        result,
        "glm",
        {
            "formula": parsed.text,
            "family": fam,
            "offset": offset,
            "trials": trials,
            "population": spec["population"],
            "levels": agreed,
            "iterations": iterations,
        },
    )
    return result


def logit(sites: SitesLike, formula: str, **options: Any) -> GLMResults:
    """Logistic regression: :func:`glm` with ``family="binomial"``."""
    if "family" in options:
        raise InvalidInput("logit is the binomial family; use glm for another")
    return glm(sites, formula, "binomial", **options)
