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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import statsmodels.api as sm
from formulaic import Formula, model_matrix
from scipy import special
from scipy import stats as distributions

from healthlab.encrypted.keys import KeyHolder
from healthlab.encrypted.protocol import Block, Check, Query, StudyRun, Totals
from healthlab.encrypted.stats import (
    AliasedDesign,
    SitesLike,
    _check_grouping,
    _full_masks,
    _left_out,
    _run,
    attach_receipt,
    check_aliasing,
    levels,
    population_columns,
)
from healthlab.errors import (
    DataRefused,
    DisclosureRefused,
    HealthLabError,
    InvalidInput,
)
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
#: Fitted probabilities this close to 0 or 1 mean the estimates do not exist.
BOUNDARY = 1e-10

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
_TRANSFORM = re.compile(rf"^np\.(?:log|log1p|sqrt|exp)\(\s*({_NAME})\s*\)$")
_POWER = re.compile(rf"^I\(\s*({_NAME})\s*\*\*\s*[23]\s*\)$")
_PLAIN = re.compile(rf"^{_NAME}$")
_SUPPORTED = (
    "column names, C(column) for a category, np.log / np.log1p / np.sqrt / "
    "np.exp of a column, I(column ** 2) or I(column ** 3), and interactions a:b "
    "or a*b; '- 1' drops the intercept"
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
    try:
        parsed = Formula(formula)
    except Exception as exc:  # formulaic's parse errors quote only the formula
        raise InvalidInput(f"the formula does not parse: {exc}") from None
    lhs = [f for term in parsed.lhs for f in term.factors]
    if len(lhs) != 1 or not _PLAIN.match(lhs[0].expr):
        raise InvalidInput("the outcome (left of ~) must be one column's name")
    numeric: list[str] = []
    categorical: list[str] = []
    intercept = False
    for term in parsed.rhs:
        for factor in term.factors:
            expr = factor.expr.strip()
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
    text = f"{response} ~ {parsed.rhs}"
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
) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """H = XᵀWX, the score g = XᵀW(z − η) and deviance, χ², llf, boundary at β."""
    if len(y) == 0:
        p = x.shape[1]
        return np.zeros((p, p)), np.zeros(p), [0.0, 0.0, 0.0, 0.0]
    with np.errstate(over="ignore", under="ignore", divide="ignore"):
        eta = x @ beta + offset
        mu = family.link.inverse(eta)
        w = trials * family.weights(mu)
        score = w * family.link.deriv(mu) * (y - mu)
        h = x.T @ (w[:, None] * x)
        g = x.T @ score
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
    return h, g, [deviance, pearson, llf, boundary]


def model_key(spec: Mapping[str, Any], participants: Sequence[str]) -> str:
    """A model's identity at a site: everything but the coefficients, with the
    participants (a Newton path is the pooled data's of these sites)."""
    fixed = {k: v for k, v in spec.items() if k not in ("beta", "previous", "step")}
    canonical = json.dumps([fixed, sorted(participants)], sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _check_outcome(site: str, family: str, column: str, y: np.ndarray) -> None:
    if family == "binomial" and not np.all((y >= 0) & (y <= 1)):
        raise DataRefused(
            f"site {site}: the outcome {column!r} of a binomial model must be 0/1 "
            "(or successes out of trials=)"
        )
    if family == "poisson" and not np.all(y >= 0):
        raise DataRefused(
            f"site {site}: the outcome {column!r} of a Poisson model must be a count "
            "(non-negative)"
        )


def _iterate(site: Site, query: Query) -> Totals:
    """At a site: its totals of one model iterate, and the check of the step."""
    spec = query.spec
    formula = parse_formula(spec["formula"])
    family = _family(spec["family"])
    agreed: dict[str, list[str]] = {c: list(v) for c, v in spec["levels"].items()}
    extra = [c for c in (spec.get("offset"), spec.get("trials")) if c]
    reads = list(dict.fromkeys([*formula.reads, *extra]))
    kept, _ = site.rows(reads, dropna=True, population=spec.get("population", ()))
    for column in formula.categorical:
        _check_grouping(site, kept, column, site.policy.min_rows)
    # rows of a level that was not released (held by too few rows) are left out
    unreleased = np.zeros(len(kept), dtype=bool)
    for column in formula.categorical:
        unreleased |= ~kept[column].astype(str).isin(agreed[column]).to_numpy()
    kept = kept.loc[~unreleased]
    dropped = site.n_rows - len(kept)
    frame = kept.copy()
    for column in formula.numeric:
        frame[column] = numeric_column(site.name, kept[column], column)
    x_frame = _design(formula, frame, agreed)
    if [str(c) for c in x_frame.columns] != list(spec["terms"]):
        raise DataRefused(
            f"site {site.name}: the model's design does not have the terms the query "
            "names; ask again"
        )
    x = x_frame.to_numpy(dtype=float)
    if not np.all(np.isfinite(x)):
        raise DataRefused(
            f"site {site.name}: a term of the model is not finite for some rows (a "
            "log of 0 or of a negative number?); transform the column differently"
        )
    y = numeric_column(site.name, kept[formula.response], formula.response)
    trials = np.ones(len(y))
    if spec.get("trials"):
        trials = numeric_column(site.name, kept[spec["trials"]], spec["trials"])
        if not np.all(trials > 0) or not np.all((y >= 0) & (y <= trials)):
            raise DataRefused(
                f"site {site.name}: trials {spec['trials']!r} must be positive and at "
                f"least the successes {formula.response!r}"
            )
        y = y / trials
    _check_outcome(site.name, spec["family"], formula.response, y)
    offset = np.zeros(len(y))
    if spec.get("offset"):
        offset = numeric_column(site.name, kept[spec["offset"]], spec["offset"])
    terms: list[str] = list(spec["terms"])
    p = len(terms)
    if len(y):
        site.check_model(p, len(y))
    beta = np.asarray(spec["beta"], dtype=float)
    if beta.shape != (p,) or not np.all(np.isfinite(beta)):
        raise InvalidInput("the model's coefficients do not match its terms")
    key = model_key(spec, query.participants)
    if site.model_iterations(key) >= MAX_ITERATES:
        raise DisclosureRefused(
            f"site {site.name} answers at most {MAX_ITERATES} iterates of one model; "
            "the model did not converge"
        )
    h, g, rest = _evaluate(family, x, y, offset, trials, beta)
    check = _step_check(
        site, spec, key, beta, h, g, terms, (family, x, y, offset, trials)
    )
    layout = _Layout(p)
    totals = layout.pack(float(dropped), float(len(y)), float(trials.sum()), h, g, rest)
    full = _full_masks(site, kept, [np.ones(len(kept), dtype=bool)])
    # a design column's totals are statistics of the rows where it is not zero: a
    # column of one value there (a level of C(sex), the ones of a 0/1 covariate,
    # their interactions) sums the same weights over its rows as the intercept
    # does over all, so its rows are a subset for the auditor (at least k rows,
    # no differencing); any other column's rows must be at least k
    nonzero = _full_masks(site, kept, [x[:, j] != 0 for j in range(p)])
    indicators = {}
    for j, term in enumerate(terms):
        values = x[x[:, j] != 0, j]
        if np.unique(values).size <= 1:
            indicators[f"term {term}"] = [nonzero[j]]
        elif values.size < site.policy.min_rows:
            raise DisclosureRefused(
                f"site {site.name}: a subset, group, cell or bin of this query would "
                f"summarize fewer than {site.policy.min_rows} rows (the site's "
                "minimum): a term is not zero in too few rows; drop or recode it"
            )
    subsets = {c: full for c in reads} | indicators | _left_out(site, kept)
    # ... and must be held by enough sites: else its coefficient is one site's
    end = len(totals)
    blocks = [
        Block(end, end, mask, required=True, name=f"the rows of term {term!r} are")
        for term, mask in zip(terms, nonzero, strict=True)
    ]
    return totals, subsets, blocks, check


def _step_check(
    site: Site,
    spec: Mapping[str, Any],
    key: str,
    beta: np.ndarray,
    h: np.ndarray,
    g: np.ndarray,
    terms: list[str],
    data: tuple[Any, ...],
) -> Check:
    """The check that β is the model's start or a Newton step from an iterate this
    site answered; passing it records β as answered (with the site's H and g)."""
    p = len(terms)
    step = spec.get("step")

    def remember() -> None:
        site.remember_iterate(key, beta, (h, g))

    rule = (
        "the model's coefficients do not follow from its previous iterate by a "
        "Newton step over the sites' own answers (a model is only answered along "
        "its own Newton path); fit it again from the start"
    )
    if step == "origin":
        if np.any(beta != 0):
            raise DisclosureRefused(f"site {site.name}: a model starts at zero")
        return Check(np.zeros(p), np.full(p, np.inf), rule, remember)
    if step == "start":
        # the intercept-only fit: every slope exactly 0, the intercept's score 0
        index = spec.get("intercept")
        if index is None or terms[index] != "Intercept":
            raise DisclosureRefused(f"site {site.name}: this model has no intercept")
        slopes = np.delete(beta, index)
        if np.any(slopes != 0):
            raise DisclosureRefused(
                f"site {site.name}: a model's start has every slope at zero"
            )
        family, x, y, offset, trials = data
        values = np.zeros(p)
        values[index] = g[index]
        tolerance = np.full(p, np.inf)
        with np.errstate(over="ignore", under="ignore", divide="ignore"):
            mu = family.link.inverse(x @ beta + offset)
            w = trials * family.weights(mu) * np.abs(family.link.deriv(mu))
            scale = float(np.sum(w * (np.abs(y) + np.abs(mu))))
        tolerance[index] = STEP_TOLERANCE * scale if len(y) else np.inf
        return Check(values, tolerance, rule, remember)
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
    delta = beta - previous
    values = h_prev @ delta - g_prev
    scale = np.abs(h_prev) @ np.abs(delta) + np.abs(g_prev)
    # a coordinate none of this site's rows touch does not move its rows' fit:
    # the sites whose rows it touches check it
    tolerance = np.where(np.diag(h_prev) > 0, STEP_TOLERANCE * scale, np.inf)
    return Check(values, tolerance, rule, remember)


# ------------------------------------------------------------ researcher side
@dataclass
class GLMResults:
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
    params: pd.Series
    cov: np.ndarray
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
    def names(self) -> list[str]:
        return [str(n) for n in self.params.index]

    @property
    def bse(self) -> pd.Series:
        return pd.Series(np.sqrt(np.diag(self.cov)), index=self.params.index)

    @property
    def tvalues(self) -> pd.Series:
        return self.params / self.bse

    @property
    def pvalues(self) -> pd.Series:
        return pd.Series(
            2 * distributions.norm.sf(np.abs(self.tvalues.to_numpy())),
            index=self.params.index,
        )

    def conf_int(self, alpha: float = 0.05) -> pd.DataFrame:
        """Wald confidence intervals (columns 0 and 1, as statsmodels)."""
        z = distributions.norm.ppf(1 - alpha / 2)
        return pd.DataFrame(
            {0: self.params - z * self.bse, 1: self.params + z * self.bse}
        )

    def cov_params(self) -> pd.DataFrame:
        return pd.DataFrame(
            self.cov, index=self.params.index, columns=self.params.index
        )

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

    def _ratios(self, alpha: float) -> pd.DataFrame:
        ci = self.conf_int(alpha)
        low, high = f"{alpha / 2:.3g}", f"{1 - alpha / 2:.3g}"
        return pd.DataFrame(
            {"ratio": np.exp(self.params), low: np.exp(ci[0]), high: np.exp(ci[1])}
        ).drop(index="Intercept", errors="ignore")

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

    def to_frame(self, alpha: float = 0.05) -> pd.DataFrame:
        """coef, std err, z, P>|z| and the CI, one row per term."""
        ci = self.conf_int(alpha)
        return pd.DataFrame(
            {
                "coef": self.params,
                "std err": self.bse,
                "z": self.tvalues,
                "P>|z|": self.pvalues,
                f"[{alpha / 2:.3g}": ci[0],
                f"{1 - alpha / 2:.3g}]": ci[1],
            }
        )

    def summary(self, alpha: float = 0.05) -> Any:
        """statsmodels' summary table (``print(fit.summary())``)."""
        from statsmodels.iolib.summary import Summary, summary_params

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
        out = Summary()
        out.add_table_2cols(
            None,
            gleft=left,
            gright=right,
            yname=left[0][1][0],
            xname=self.names,
            title="Generalized Linear Model Regression Results",
        )
        ci = self.conf_int(alpha).to_numpy()
        out.tables.append(
            summary_params(
                (
                    None,
                    self.params.to_numpy(),
                    self.bse.to_numpy(),
                    self.tvalues.to_numpy(),
                    self.pvalues.to_numpy(),
                    ci,
                ),
                yname=left[0][1][0],
                xname=self.names,
                alpha=alpha,
                use_t=False,
            )
        )
        if np.isfinite(self.missing) and self.missing:
            out.add_extra_txt([f"{int(self.missing)} rows left out (missing values)."])
        return out

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
    agreed: dict[str, list[str]] = {}
    for column in parsed.categorical:
        released = levels(site_list, column, researcher=researcher, keys=keys)
        if len(released) < 2:
            raise DisclosureRefused(
                f"C({column}) has fewer than 2 levels released by the sites; it "
                "cannot be a covariate"
            )
        agreed[column] = list(released)
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
    layout = _Layout(len(terms))
    runs: list[StudyRun] = []
    participants = site_list

    def ask(beta: np.ndarray, step: str, previous: np.ndarray | None) -> dict[str, Any]:
        nonlocal participants
        run = _run(
            participants,
            "glm",
            {
                **spec,
                "beta": beta.tolist(),
                "step": step,
                "previous": None if previous is None else previous.tolist(),
            },
            layout.size,
            _iterate,
            keys=keys,
            researcher=researcher,
            min_sites=min_sites,
            min_rows=0,
            on_refusal=on_refusal if step == "origin" else "raise",
        )
        runs.append(run)
        names = {s.name for s in run.sites}
        participants = [s for s in participants if s.name in names]
        out = layout.unpack(run.totals)
        if fam == "binomial" and out["boundary"] > 0:
            raise PerfectSeparation(
                "the outcome is predicted exactly (fitted probability 0 or 1) for "
                "some rows: the maximum-likelihood estimates do not exist. Drop or "
                "merge the covariate that separates the outcome, or coarsen it"
            )
        return out

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
    converged = False
    iterations = 0
    for _ in range(max_iter):
        h, g = current["H"], current["g"]
        try:
            delta = np.linalg.solve(h, g)
        except np.linalg.LinAlgError:
            _aliased(h, terms)
            raise
        if np.max(np.abs(delta)) <= tol * (1 + np.max(np.abs(beta))):
            converged = True
            break
        previous, beta = beta, beta + delta
        current = ask(beta, "newton", previous)
        iterations += 1
        if not np.isfinite(current["deviance"]):
            break
    if not converged:
        raise NotConverged(
            f"the model did not converge in {max_iter} Newton steps (often a sign of "
            "separation, or of a covariate on a very large scale); rescale or drop "
            "covariates"
        )
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
    withheld = any(r.missing_withheld for r in runs)
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
        sites=[s.name for s in participants],
        missing=np.nan if withheld else float(current["dropped"]),
        receipt={},
    )
    table = result.to_frame()
    attach_receipt(
        table,
        runs,
        kind="glm",
        parameters={
            "formula": parsed.text,
            "family": fam,
            "offset": offset,
            "trials": trials,
            "population": spec["population"],
            "levels": agreed,
            "iterations": iterations,
        },
    )
    result.receipt = table.attrs["receipt"]
    return result


def logit(sites: SitesLike, formula: str, **options: Any) -> GLMResults:
    """Logistic regression: :func:`glm` with ``family="binomial"``."""
    if "family" in options:
        raise InvalidInput("logit is the binomial family; use glm for another")
    return glm(sites, formula, "binomial", **options)
