"""Statistics across sites over homomorphically encrypted site totals (CKKS, TenSEAL).

The public API: :func:`describe`, :func:`histogram`, :func:`crosstab`, :func:`counts`,
:func:`corr`, :func:`cov`, :func:`ols` (and :func:`levels`, which withholds rare
levels and refuses identifiers), :func:`describe_values` (every value encrypted);
models: :func:`glm` and :func:`logit` (:mod:`healthlab.encrypted.models`);
survival: :func:`kaplan_meier` with the log-rank test
(:mod:`healthlab.encrypted.survival`) and the Cox model :func:`coxph`
(:mod:`healthlab.encrypted.cox`); tests: :func:`ttest`, :func:`chi2_test`
and :func:`table_one` with p-values (:mod:`healthlab.encrypted.inference`);
:class:`KeyHolder` for the researcher's keys
and :class:`Aggregator` for the server side. Table statistics return a
:class:`ResultTable` (a DataFrame with ``receipt``, ``missing``, ``suppressed``, ...;
:mod:`healthlab.encrypted.tables`).
"""

from __future__ import annotations

from healthlab.encrypted.cox import CoxResults, coxph
from healthlab.encrypted.inference import (
    TestResult,
    chi2_test,
    quantiles,
    table_one,
    ttest,
)
from healthlab.encrypted.keys import (
    CKKSParams,
    IntegrityError,
    KeyHolder,
    PublicContext,
)
from healthlab.encrypted.models import (
    AliasedDesign,
    GLMResults,
    NotConverged,
    PerfectSeparation,
    glm,
    logit,
)
from healthlab.encrypted.protocol import Aggregator, Contribution, Query
from healthlab.encrypted.stats import (
    Levels,
    corr,
    counts,
    cov,
    crosstab,
    describe,
    histogram,
    levels,
    missing,
    ols,
)
from healthlab.encrypted.survival import SurvivalResult, kaplan_meier
from healthlab.encrypted.tables import ResultTable
from healthlab.encrypted.values import describe_values, square_bias_factor

__all__ = [
    "Aggregator",
    "AliasedDesign",
    "CKKSParams",
    "Contribution",
    "CoxResults",
    "GLMResults",
    "IntegrityError",
    "KeyHolder",
    "Levels",
    "NotConverged",
    "PerfectSeparation",
    "PublicContext",
    "Query",
    "ResultTable",
    "SurvivalResult",
    "TestResult",
    "chi2_test",
    "corr",
    "counts",
    "cov",
    "coxph",
    "crosstab",
    "describe",
    "describe_values",
    "glm",
    "histogram",
    "kaplan_meier",
    "levels",
    "logit",
    "missing",
    "ols",
    "quantiles",
    "square_bias_factor",
    "table_one",
    "ttest",
]
