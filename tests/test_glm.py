"""Pooled GLMs (issue 14): exact against statsmodels on real datasets, and a site
answers a model only along its own Newton path.

Parity: statsmodels ``GLM`` on the pooled rows, fitted to ``tol=1e-14``, under
several splits of each dataset (IID, by a natural grouping, skewed sizes, a 6-row
site); params and standard errors within 1e-8 relative, deviance within 1e-9.

Attacks: a researcher who drives the protocol by hand evaluates the model at
coefficients of its choosing — a slope of 1000 around a threshold makes the
weights pick out the rows near it (two such answers give the oldest patient's
age); every such query is refused before anything leaves a site.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
import statsmodels.formula.api as smf
from lifelines.datasets import load_rossi
from scipy import special
from sklearn.datasets import load_breast_cancer, load_diabetes

from healthlab import DisclosurePolicy, Site, encrypted
from healthlab.dp import PrivacyBudget
from healthlab.encrypted import KeyHolder
from healthlab.encrypted import models as glm_models
from healthlab.encrypted.models import (
    AliasedDesign,
    NotConverged,
    PerfectSeparation,
    _iterate,
    _Layout,
    design_columns,
    parse_formula,
)
from healthlab.encrypted.protocol import Query, run_query
from healthlab.errors import (
    DisclosureRefused,
    HeldByTooFewSites,
    InvalidInput,
    TooFewRows,
    TooFewSites,
)

RTOL = 1e-8  # params and standard errors (the bound)
DEV_RTOL = 1e-9  # deviance


# ------------------------------------------------------------------- datasets
@cache
def rossi() -> pd.DataFrame:
    frame = load_rossi().astype(float)
    frame["log_week"] = np.log(frame["week"])
    return frame


@cache
def breast_cancer() -> pd.DataFrame:
    frame = load_breast_cancer(as_frame=True).frame
    frame.columns = [c.replace(" ", "_") for c in frame.columns]
    return frame


@cache
def diabetes() -> pd.DataFrame:
    return load_diabetes(as_frame=True, scaled=False).frame


@cache
def spector() -> pd.DataFrame:
    return sm.datasets.spector.load_pandas().data


@cache
def star98() -> pd.DataFrame:
    data = sm.datasets.star98.load_pandas()
    frame = pd.concat([data.endog, data.exog], axis=1)
    frame["TOTAL"] = frame["NABOVE"] + frame["NBELOW"]
    return frame


def six_row_split(
    frame: pd.DataFrame, indicators: Sequence[str]
) -> dict[str, pd.DataFrame]:
    """A 6-row site beside two large ones. The 6 rows are 3 + 3 of two patterns of
    the model's 0/1 covariates, so each covariate's ones there are 0, 3 or 6 (1-2
    would be refused: a statistic of fewer than 3 of the site's rows)."""
    patterns = (
        [part.index for _, part in frame.groupby(list(indicators))]
        if indicators
        else [frame.index]
    )
    common = [rows for rows in patterns if len(rows) >= 3][:2]
    small = [*common[0][:3], *common[-1][-3:]]
    rest = frame.drop(index=small)
    half = len(rest) // 2
    return {"s0": frame.loc[small], "s1": rest.iloc[:half], "s2": rest.iloc[half:]}


def splits(
    frame: pd.DataFrame,
    group: str | None,
    indicators: Sequence[str] = (),
    iid_sites: int = 3,
) -> dict[str, dict[str, pd.DataFrame]]:
    """The issue's splits: IID over 3 sites, by a natural grouping, skewed sizes
    (70/20/10 %), and one 6-row site beside two large ones."""
    rng = np.random.default_rng(7)
    order = rng.permutation(len(frame))
    shuffled = frame.iloc[order].reset_index(drop=True)
    n = len(frame)
    out = {
        "iid": {f"s{i}": shuffled.iloc[i::iid_sites] for i in range(iid_sites)},
        "skewed": {
            "s0": shuffled.iloc[: int(0.7 * n)],
            "s1": shuffled.iloc[int(0.7 * n) : int(0.9 * n)],
            "s2": shuffled.iloc[int(0.9 * n) :],
        },
        "six_rows": six_row_split(shuffled, indicators),
    }
    if group is not None:
        out["grouped"] = {
            f"g{k}": part for k, (_, part) in enumerate(frame.groupby(group))
        }
    return out


#: the 6-row site takes a model of 4-5 parameters (DataSHIELD's 0.33 per row would
#: refuse it); the exactness of the pooled fit is what these tests measure
SMALL_SITES = DisclosurePolicy(max_param_ratio=1.0)
#: ... and where a site is too small to carry the Newton path's weighted
#: functions (refused by default, by name), the owners' loud opt-out
UNCOUNTED = DisclosurePolicy(max_param_ratio=1.0, count_iterates=False)
#: the splits whose small sites refuse a model's iterates by default: 6 rows, or
#: spector's 16 a site (GPA and TUCE over 16 patients: 28 unknowns, and the
#: fifth iterate brings the functions to 29)
ITERATES_REFUSED = {
    ("rossi logit", "six_rows"),
    ("breast_cancer logit", "six_rows"),
    ("spector logit", "iid"),
    ("star98 binomial with trials", "six_rows"),
    ("rossi poisson with offset", "six_rows"),
}
#: ... and where, with the count switched off, the 6-row site's outcome takes so
#: few values that its value sets are cells (the score would solve for them) that
#: no other site names (theirs take many values): refused by the holder patterns
#: — stricter than needed, since the pooled outcome takes many values
FEW_VALUES_UNSHARED = {("rossi poisson with offset", "six_rows")}

CASES: dict[str, dict[str, Any]] = {
    "rossi logit": {
        "data": rossi,
        "formula": "arrest ~ fin + age + prio + wexp",
        "family": "binomial",
        "group": "paro",
        # the outcome too: its events and non-events in each term's rows are
        # sums the score releases (each 0 or at least 3 at a site)
        "indicators": ["fin", "wexp", "arrest"],
    },
    "breast_cancer logit": {
        "data": breast_cancer,
        "formula": "target ~ mean_radius + mean_texture + mean_smoothness",
        "family": "binomial",
        "group": None,
    },
    "spector logit": {
        "data": spector,
        # PSI is left out: 3 of its 0s passed, so any split gives a site 1-2 of
        # them, whose sums the score holds (refused: see the test below)
        "formula": "GRADE ~ GPA + TUCE",
        "family": "binomial",
        "group": None,
        "indicators": ["GRADE"],
        # 32 rows, 11 passes: a 10 % site holds 3 rows, and over 3 sites (or
        # beside a 6-row site) some site holds 1-2 passes (refused: k = 3)
        "skewed": False,
        "six_rows": False,
        "iid_sites": 2,
    },
    "star98 binomial with trials": {
        "data": star98,
        "formula": "NABOVE ~ LOWINC + PERASIAN + PERBLACK + PERHISP + AVYRSEXP",
        "family": "binomial",
        "trials": "TOTAL",
        "group": None,
    },
    "rossi poisson with offset": {
        "data": rossi,
        "formula": "prio ~ age + fin + paro",
        "family": "poisson",
        "offset": "log_week",
        "group": "wexp",
        # the offset too: a column of 2 values at the 6-row site is audited by
        # value (exp(offset) and 1 would solve for each value's count)
        "indicators": ["fin", "paro", "week"],
    },
    "diabetes gaussian with a category": {
        "data": diabetes,
        "formula": "target ~ age + bmi + bp + C(sex)",
        "family": "gaussian",
        "group": None,
        # a 6-row site holds fewer than 3 of one sex: levels() withholds it
        "six_rows": False,
    },
}


def reference(case: dict[str, Any]) -> Any:
    """statsmodels' GLM on the pooled rows, converged tightly."""
    frame = case["data"]()
    family = {
        "binomial": sm.families.Binomial(),
        "poisson": sm.families.Poisson(),
        "gaussian": sm.families.Gaussian(),
    }[case["family"]]
    if case.get("trials"):
        lhs, rhs = case["formula"].split("~")
        exog = sm.add_constant(frame[[c.strip() for c in rhs.split("+")]])
        exog = exog.rename(columns={"const": "Intercept"})
        endog = np.column_stack(
            [frame[lhs.strip()], frame[case["trials"]] - frame[lhs.strip()]]
        )
        return sm.GLM(endog, exog, family=family).fit(tol=1e-14)
    offset = frame[case["offset"]] if case.get("offset") else None
    model = smf.glm(case["formula"], frame, family=family, offset=offset)
    return model.fit(tol=1e-14)


def relative(a: pd.Series, b: pd.Series) -> float:
    b = b.reindex(a.index)
    return float(np.max(np.abs(a.to_numpy() - b.to_numpy()) / np.abs(b.to_numpy())))


PAIRS = [
    (name, split)
    for name, case in CASES.items()
    for split in [
        "iid",
        *(["skewed"] if case.get("skewed", True) else []),
        *(["six_rows"] if case.get("six_rows", True) else []),
        *(["grouped"] if case["group"] else []),
    ]
]


@pytest.mark.parametrize(("name", "split"), PAIRS)
def test_a_pooled_glm_equals_statsmodels_on_the_pooled_rows(
    name: str, split: str
) -> None:
    case = CASES[name]
    frames = splits(
        case["data"](),
        case["group"],
        case.get("indicators", ()),
        case.get("iid_sites", 3),
    )[split]

    def fit_with(policy: DisclosurePolicy) -> Any:
        return encrypted.glm(
            [Site(k, f, policy=policy) for k, f in frames.items()],
            case["formula"],
            case["family"],
            offset=case.get("offset"),
            trials=case.get("trials"),
        )

    if (name, split) in FEW_VALUES_UNSHARED:
        for policy in (SMALL_SITES, UNCOUNTED):
            with pytest.raises(HeldByTooFewSites):
                fit_with(policy)
        return
    if (name, split) in ITERATES_REFUSED:
        with pytest.raises(TooFewRows, match="functions of the values"):
            fit_with(SMALL_SITES)
        fit = fit_with(UNCOUNTED)
    else:
        fit = fit_with(SMALL_SITES)
    ref = reference(case)
    ref_params = pd.Series(ref.params).reindex(fit.params.index)
    ref_bse = pd.Series(ref.bse).reindex(fit.params.index)
    assert fit.converged
    assert relative(fit.params, ref_params) <= RTOL
    assert relative(fit.bse, ref_bse) <= RTOL
    assert fit.deviance == pytest.approx(ref.deviance, rel=DEV_RTOL)
    assert fit.llf == pytest.approx(ref.llf, rel=DEV_RTOL)
    assert fit.nobs == ref.nobs and fit.df_resid == ref.df_resid
    assert fit.df_model == ref.df_model
    assert fit.aic == pytest.approx(ref.aic, rel=DEV_RTOL)
    assert fit.bic == pytest.approx(ref.bic_llf, rel=DEV_RTOL)
    assert fit.scale == pytest.approx(ref.scale, rel=RTOL)
    assert fit.pearson_chi2 == pytest.approx(ref.pearson_chi2, rel=1e-7)
    ref_p = pd.Series(ref.pvalues).reindex(fit.params.index)
    assert np.allclose(fit.pvalues, ref_p, rtol=1e-6, atol=1e-300)
    ref_ci = pd.DataFrame(ref.conf_int()).reindex(fit.params.index).to_numpy()
    assert np.allclose(fit.conf_int().to_numpy(), ref_ci, rtol=1e-7)
    assert fit.sites == list(frames)


def test_the_fit_reads_like_statsmodels() -> None:
    frames = splits(rossi(), "mar")["iid"]
    fit = encrypted.logit(frames, "arrest ~ fin + age + prio")
    text = str(fit.summary())
    assert "Generalized Linear Model Regression Results" in text
    assert "Binomial" in text and "Logit" in text
    for term in ("Intercept", "fin", "age", "prio"):
        assert term in text
    odds = fit.odds_ratios()
    assert list(odds.index) == ["fin", "age", "prio"]
    assert odds["odds_ratio"].tolist() == pytest.approx(np.exp(fit.params[1:]).tolist())
    assert (odds["0.025"] < odds["odds_ratio"]).all()
    assert (odds["odds_ratio"] < odds["0.975"]).all()
    table = fit.to_frame()
    assert list(table.columns) == ["coef", "std err", "z", "P>|z|", "[0.025", "0.975]"]
    assert fit.cov_params().shape == (4, 4)
    # the receipt covers every iteration's query, the first at zero
    queries = fit.receipt["queries"]
    assert len(queries) == fit.iterations + 2  # origin, intercept start, steps
    assert queries[0]["spec"]["step"] == "origin"
    assert all(q["spec"]["step"] == "newton" for q in queries[2:])
    with pytest.raises(InvalidInput, match="Poisson"):
        fit.rate_ratios()


def test_rows_with_missing_values_are_left_out_and_counted() -> None:
    frame = rossi().copy()
    # three rows at each of two sites (fewer would be refused: a count of 1-2)
    frame.loc[[0, 3, 6, 1, 4, 7], "prio"] = np.nan
    frames = {f"s{i}": frame.iloc[i::3] for i in range(3)}
    fit = encrypted.logit(frames, "arrest ~ fin + age + prio")
    ref = smf.glm(
        "arrest ~ fin + age + prio", frame.dropna(), family=sm.families.Binomial()
    ).fit(tol=1e-14)
    assert fit.nobs == len(frame) - 6
    assert relative(fit.params, ref.params) <= RTOL
    assert fit.missing == 6
    assert "6 rows left out" in str(fit.summary())


# ------------------------------------------------------------ named refusals
def test_an_aliased_design_is_refused_naming_the_term() -> None:
    frame = rossi().copy()
    frame["age_prio"] = frame["age"] + frame["prio"]
    frame["tenth_age"] = 0.1 * frame["age"]
    frame["five"] = 5.0
    frames = {f"s{i}": frame.iloc[i::3] for i in range(3)}
    with pytest.raises(AliasedDesign, match=r"'age_prio' is .*combination"):
        encrypted.logit(frames, "arrest ~ age + prio + age_prio")
    with pytest.raises(AliasedDesign, match="'tenth_age'"):
        encrypted.logit(frames, "arrest ~ age + tenth_age")
    with pytest.raises(AliasedDesign, match="'five'"):
        encrypted.glm(frames, "prio ~ age + five", "gaussian")


def test_perfect_separation_is_refused_by_name() -> None:
    frame = rossi().copy()
    frame["arrest"] = (frame["age"] > 24).astype(float)  # age separates exactly
    frames = {f"s{i}": frame.iloc[i::3] for i in range(3)}
    with pytest.raises(PerfectSeparation, match="predicted exactly"):
        encrypted.logit(frames, "arrest ~ age + prio")


def test_no_convergence_is_refused_by_name() -> None:
    frames = {f"s{i}": rossi().iloc[i::3] for i in range(3)}
    with pytest.raises(NotConverged, match="did not converge in 1 Newton"):
        encrypted.logit(frames, "arrest ~ age + prio", max_iter=1)


def test_bad_outcomes_and_formulas_are_refused_with_what_to_do() -> None:
    frames = {f"s{i}": rossi().iloc[i::3] for i in range(3)}
    # a site's rows that break a rule are an anonymous flag, summed among the
    # sites: every site refuses alike, none says it is the one
    with pytest.raises(DisclosureRefused, match=r"not 0/1 .*at some site"):
        encrypted.logit(frames, "prio ~ age")
    for formula in (
        "arrest ~ __import__('os').system('true')",
        "arrest ~ np.log(age).__class__",
        "arrest ~ open('x')",
        "arrest ~ I(age ** 9)",
        "np.log(arrest) ~ age",
        "arrest",
    ):
        with pytest.raises(InvalidInput) as refused:
            encrypted.logit(frames, formula)
        assert "Traceback" not in str(refused.value)
    with pytest.raises(InvalidInput, match="family"):
        encrypted.glm(frames, "arrest ~ age", "gamma")


def test_a_term_only_one_site_holds_is_refused() -> None:
    """Every smoker at one hospital: the 0/1 covariate's coefficient would be that
    site's totals over its smokers."""
    frame = spector()
    frames = {"a": frame[frame.PSI == 0], "b": frame[frame.PSI == 1]}
    sites = [Site(k, f, policy=SMALL_SITES) for k, f in frames.items()]
    with pytest.raises(TooFewSites, match="term 'PSI'") as refused:
        encrypted.logit(sites, "GRADE ~ GPA + PSI")
    assert "14" not in str(refused.value)  # b's count of them
    # without PSI the model is answered (16-18 patients a site carry its
    # iterates only where the owners opted out of counting them)
    opted_out = DisclosurePolicy(max_param_ratio=1.0, count_iterates=False)
    sites = [Site(k, f, policy=opted_out) for k, f in frames.items()]
    fit = encrypted.logit(sites, "GRADE ~ GPA + TUCE")
    assert fit.converged


def test_a_site_with_a_privacy_budget_refuses_models() -> None:
    budget = DisclosurePolicy(privacy=PrivacyBudget(5.0, delta=1e-6))
    sites = [Site(f"s{i}", rossi().iloc[i::2], policy=budget) for i in range(2)]
    with pytest.raises(DisclosureRefused, match="no noise calibration"):
        encrypted.logit(sites, "arrest ~ age")


# --------------------------------------------------------------------- attacks
def threshold_sites() -> list[Site]:
    return [Site(f"h{i}", rossi().iloc[i::2].reset_index(drop=True)) for i in range(2)]


def hand_query(
    spec: dict[str, Any], beta: list[float], step: str, previous: list[float] | None
) -> Query:
    return Query(
        "glm",
        {**spec, "beta": beta, "step": step, "previous": previous},
        _Layout(len(spec["terms"])).size,
    )


def model_spec(formula: str = "arrest ~ age") -> dict[str, Any]:
    parsed = parse_formula(formula)
    terms = design_columns(parsed, {})
    return {
        "formula": parsed.text,
        "family": "binomial",
        "terms": terms,
        "levels": {},
        "offset": None,
        "trials": None,
        "population": [],
        "intercept": 0,
    }


def answered(sites: list[Site], keys: KeyHolder) -> int:
    return sum(len(s.log) for s in sites)


def test_a_researcher_cannot_evaluate_a_model_at_coefficients_of_its_choosing() -> None:
    """The threshold attack: β = (−1000·t, 1000) on age makes μ a step at t, so the
    score Σ age·(y − μ) differs between t and t + 1 by the rows aged in [t, t+1).
    Every way to ask such a β is refused before anything leaves a site."""
    sites = threshold_sites()
    keys = KeyHolder()
    spec = model_spec()
    oldest = float(rossi()["age"].max())
    steep = [-1000.0 * (oldest - 0.5), 1000.0]
    # 1. as the first iterate (a model starts at zero)
    with pytest.raises(DisclosureRefused, match="starts at zero"):
        run_query(sites, hand_query(spec, steep, "origin", None), _iterate, keys=keys)
    # 2. as the intercept-only start (every slope must be zero)
    with pytest.raises(DisclosureRefused, match="every slope at zero"):
        run_query(sites, hand_query(spec, steep, "start", None), _iterate, keys=keys)
    # 3. as a "Newton step" from an iterate the sites never answered
    with pytest.raises(DisclosureRefused, match="did not answer the iterate"):
        run_query(
            sites, hand_query(spec, steep, "newton", [1.0, 0.0]), _iterate, keys=keys
        )
    # 4. as a step from an answered iterate (zero): the sites' check fails
    run_query(sites, hand_query(spec, [0.0, 0.0], "origin", None), _iterate, keys=keys)
    before = answered(sites, keys)
    with pytest.raises(DisclosureRefused, match="Newton step"):
        run_query(
            sites, hand_query(spec, steep, "newton", [0.0, 0.0]), _iterate, keys=keys
        )
    # 5. nor a small push off the Newton step
    honest = encrypted.logit(threshold_sites(), "arrest ~ age")
    assert honest.converged
    origin = run_query(
        sites, hand_query(spec, [0.0, 0.0], "origin", None), _iterate, keys=keys
    )
    out = _Layout(2).unpack(origin.totals)
    step = np.linalg.solve(out["H"], out["g"])
    for push in ([1e-4, 0.0], [0.0, 1e-5], [0.0, 1.0]):
        with pytest.raises(DisclosureRefused, match="Newton step"):
            run_query(
                sites,
                hand_query(spec, (step + np.asarray(push)).tolist(), "newton", [0, 0]),
                _iterate,
                keys=keys,
            )
    # nothing was answered for the refused steps: no log line, no contribution
    assert answered(sites, keys) == before + len(sites)
    # the exact Newton step is answered
    run = run_query(
        sites,
        hand_query(spec, step.tolist(), "newton", [0.0, 0.0]),
        _iterate,
        keys=keys,
    )
    assert _Layout(2).unpack(run.totals)["n"] == len(rossi())


def test_a_refused_step_is_not_an_anchor_for_the_next() -> None:
    sites = threshold_sites()
    keys = KeyHolder()
    spec = model_spec()
    run_query(sites, hand_query(spec, [0.0, 0.0], "origin", None), _iterate, keys=keys)
    crafted = [-30.0, 1.0]
    with pytest.raises(DisclosureRefused):
        run_query(
            sites, hand_query(spec, crafted, "newton", [0.0, 0.0]), _iterate, keys=keys
        )
    with pytest.raises(DisclosureRefused, match="did not answer the iterate"):
        run_query(
            sites,
            hand_query(spec, [-31.0, 1.0], "newton", crafted),
            _iterate,
            keys=keys,
        )


def test_an_intercept_start_must_solve_the_intercept_score() -> None:
    sites = threshold_sites()
    keys = KeyHolder()
    spec = model_spec()
    ybar = float(rossi()["arrest"].mean())
    exact = float(np.log(ybar / (1 - ybar)))
    for wrong in (exact + 1e-3, exact - 0.5, 5.0):
        with pytest.raises(DisclosureRefused, match="Newton step"):
            run_query(
                sites,
                hand_query(spec, [wrong, 0.0], "start", None),
                _iterate,
                keys=keys,
            )
    run = run_query(
        sites, hand_query(spec, [exact, 0.0], "start", None), _iterate, keys=keys
    )
    assert abs(_Layout(2).unpack(run.totals)["g"][0]) < 1e-9


def test_a_model_has_a_bounded_number_of_iterates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(glm_models, "MAX_ITERATES", 3)
    sites = threshold_sites()
    with pytest.raises(DisclosureRefused, match="at most 3 iterates"):
        encrypted.logit(sites, "arrest ~ age + prio")


def test_a_formula_is_checked_at_the_site_too() -> None:
    """A hand-built query with a formula no researcher-side check saw."""
    sites = threshold_sites()
    spec = model_spec() | {"formula": "arrest ~ __import__('os').getcwd()"}
    with pytest.raises(InvalidInput, match=r"not supported|does not parse"):
        run_query(
            sites,
            hand_query(spec, [0.0, 0.0], "origin", None),
            _iterate,
            keys=KeyHolder(),
        )


def test_models_differing_by_one_row_are_audited() -> None:
    """Two models whose populations differ by one patient (each leaving out 3 or
    more rows, so no count rule fires): the second is refused by the sites'
    auditors, like any other differencing."""
    frames = [rossi().iloc[i::2].reset_index(drop=True).copy() for i in range(2)]
    for frame in frames:
        frame["a"] = 1.0
        frame.loc[[0, 1, 2], "a"] = np.nan
        frame["b"] = frame["a"]
    frames[0].loc[3, "b"] = np.nan  # b leaves out one more patient at h0
    sites = [Site(f"h{i}", f) for i, f in enumerate(frames)]
    fit = encrypted.logit(sites, "arrest ~ age", population=["a"])
    assert fit.nobs == len(rossi()) - 6
    # (the auditor's differencing, or the model's own count of what its sets
    # isolate: the one patient b leaves out)
    with pytest.raises(
        DisclosureRefused, match=r"\(differencing\)|isolates in fewer than 3"
    ):
        encrypted.logit(sites, "arrest ~ age", population=["b"])


def test_a_term_of_fewer_than_k_rows_at_a_site_is_refused() -> None:
    """A 0/1 covariate with one patient's 1 at each of two sites: held by two
    sites, but each site's share of its totals is one patient's."""
    frames = [rossi().iloc[i::2].reset_index(drop=True).copy() for i in range(2)]
    for frame in frames:
        frame["rare"] = 0.0
        frame.loc[5, "rare"] = 1.0
    sites = [Site(f"h{i}", f) for i, f in enumerate(frames)]
    with pytest.raises(DisclosureRefused, match="fewer than 3"):
        encrypted.logit(sites, "arrest ~ age + rare")
    for frame in frames:
        # twenty at each site, ten of them arrested: every cell of rare by the
        # outcome holds 0 or at least 3 of a site's rows (the score sums them),
        # and the cell carries the Newton path's weighted functions of age (six
        # a site would not: test_an_honest_newton_path_does_not_release_…)
        frame["rare"] = 0.0
        arrested = frame.index[frame["arrest"] == 1][:10]
        free = frame.index[frame["arrest"] == 0][:10]
        frame.loc[[*arrested, *free], "rare"] = 1.0
    fit = encrypted.logit(
        [Site(f"h{i}", f) for i, f in enumerate(frames)], "arrest ~ age + rare"
    )
    pooled = pd.concat(frames, ignore_index=True)
    ref = smf.glm("arrest ~ age + rare", pooled, family=sm.families.Binomial()).fit(
        tol=1e-14
    )
    assert relative(fit.params, ref.params) <= RTOL


# ------------------------------------------- the review's attacks (all refused)
def test_the_score_over_a_sites_few_events_is_refused() -> None:
    """The score Σ x (y − μ) sums x over the rows with y = 1: with one arrested
    patient at a site (and none elsewhere), the origin's score on age was that
    patient's age. Every way to have 1-2 events of a term at a site, or events
    only one site holds, is refused before anything leaves a site."""
    rows = rossi()
    oldest = rows.index[rows["age"] == rows["age"].max()][0]
    for arrested in (1, 2, 3):
        frames = [rows.iloc[i::3].copy() for i in range(3)]
        for frame in frames:
            frame["arrest"] = 0.0
        site0 = frames[0]
        chosen = [oldest] if oldest in site0.index else []
        chosen = [*chosen, *site0.index.difference(chosen)][:arrested]
        site0.loc[chosen, "arrest"] = 1.0
        sites = [Site(f"s{i}", f.reset_index(drop=True)) for i, f in enumerate(frames)]
        keys = KeyHolder()
        # by hand: the origin alone (the answer the attack reads)
        expected = r"fewer than 3|held by too few of the sites"
        with pytest.raises(DisclosureRefused, match=expected):
            run_query(
                sites,
                hand_query(model_spec(), [0.0, 0.0], "origin", None),
                _iterate,
                keys=keys,
            )
        with pytest.raises(DisclosureRefused, match=expected):
            encrypted.logit(sites, "arrest ~ age")
    # within a term: 1-2 events among a category's rows at a site (the pooled
    # events of all rows are plenty): Σ over them is in the score of that term
    frames = [rows.iloc[i::2].reset_index(drop=True).copy() for i in range(2)]
    for frame in frames:
        rare = frame.index[frame["arrest"] == 0][:4]
        frame["rare"] = 0.0
        frame.loc[rare, "rare"] = 1.0
        frame.loc[rare[0], "arrest"] = 1.0  # one event among the 4 rare rows
    with pytest.raises(DisclosureRefused, match="fewer than 3"):
        encrypted.logit(
            [Site(f"h{i}", f) for i, f in enumerate(frames)], "arrest ~ age + rare"
        )


def test_functions_of_one_set_add_up_across_models() -> None:
    """Five models at their origin, each with two functions of age over the
    same 6 patients (3 + 3 at two sites): each passed alone, and together their
    sums fitted one multiset of whole-number ages only. The functions a site
    summed over a set are added up across models: the third is refused."""
    rows = rossi()
    label = np.random.default_rng(1).integers(0, 2, len(rows))
    sites = [Site(f"h{s}", rows[label == s].reset_index(drop=True)) for s in range(2)]
    cell = "C(race):C(arrest):wexp"
    levels = {"race": ["0.0", "1.0"], "arrest": ["0.0", "1.0"]}

    def spec_with(function: str) -> dict:
        parsed = parse_formula(f"week ~ {cell} + {cell}:{function} - 1")
        return {
            "formula": parsed.text,
            "family": "gaussian",
            "terms": design_columns(parsed, levels),
            "levels": levels,
            "offset": None,
            "trials": None,
            "population": [],
            "intercept": None,
        }

    outcomes = []
    for function in ("age", "I(age ** 2)", "np.sqrt(age)", "np.log(age)"):
        try:
            origin(sites, spec_with(function))
            outcomes.append("answered")
        except DisclosureRefused as refused:
            outcomes.append(str(refused))
    assert outcomes[0] == "answered"
    refusals = [o for o in outcomes if o != "answered"]
    assert refusals and all("functions of the values" in o for o in refusals)
    # each alone, on fresh sites, is answered
    fresh = [Site(f"h{s}", rows[label == s].reset_index(drop=True)) for s in range(2)]
    origin(fresh, spec_with("np.log(age)"))


def test_a_logit_with_a_small_cell_of_covariate_by_outcome_is_refused() -> None:
    """spector: 3 of PSI's 0s passed (GRADE = 1). Split over sites, some site holds
    1-2 of them, and the score's Σ GPA over them is theirs: refused by name, with
    what to do, at every split."""
    frames = splits(spector(), None, ["PSI"])
    for split in ("iid", "six_rows"):
        sites = [Site(k, f, policy=SMALL_SITES) for k, f in frames[split].items()]
        with pytest.raises(DisclosureRefused, match=r"fewer than 3 .*rows"):
            encrypted.logit(sites, "GRADE ~ GPA + TUCE + PSI")


def test_two_columns_one_patient_apart_are_refused_in_one_query() -> None:
    """age:mar:arrest and age:mar:arrest:race differ by the one patient with
    mar = arrest = 1 and race = 0: H's entries gave that patient's age, and the
    fit's parameters the follow-up (public API, no hand driving). Refused: the
    sets' count, Σ age and Σ age² over so few rows are too many functions for
    them (and the difference would be differencing)."""
    sites = threshold_sites()
    with pytest.raises(DisclosureRefused, match=r"differencing|functions of the"):
        encrypted.glm(sites, "week ~ age:mar:arrest + age:mar:arrest:race", "gaussian")


def test_a_pair_of_columns_whose_rows_meet_in_two_patients_is_refused() -> None:
    """fin:wexp and mar:arrest each hold many rows; both hold two patients (one
    per site): H[fin:wexp, mar:arrest] was 2, and age:fin:wexp gave their ages."""
    sites = threshold_sites()
    spec = model_spec("week ~ fin:wexp + mar:arrest + age:fin:wexp") | {
        "family": "gaussian"
    }
    with pytest.raises(DisclosureRefused, match="fewer than 3"):
        run_query(
            sites,
            hand_query(spec, [0.0] * 4, "origin", None),
            _iterate,
            keys=KeyHolder(),
        )


def test_transforms_that_let_extremes_dominate_are_not_offered() -> None:
    sites = threshold_sites()
    for formula in ("week ~ np.exp(prio) + np.exp(prio):age", "arrest ~ I(age ** 3)"):
        with pytest.raises(InvalidInput, match="not supported"):
            encrypted.glm(sites, formula, "gaussian")


def test_a_step_along_a_direction_the_information_cannot_see_is_refused() -> None:
    """A design with near-null directions v (|Hv| ~ 1e-15 |H||v|): β = step + t·v
    passed a tolerance that grew with |β − β_t|, for t large enough that one
    patient's weight was left (the age-41 patient isolated, a count of 1)."""
    sites = threshold_sites()
    keys = KeyHolder()
    formula = "arrest ~ age + I(age ** 2) + np.sqrt(age) + np.log(age) + np.log1p(age)"
    spec = model_spec(formula)
    p = len(spec["terms"])
    origin = run_query(
        sites, hand_query(spec, [0.0] * p, "origin", None), _iterate, keys=keys
    )
    out = _Layout(p).unpack(origin.totals)
    h, g = out["H"], out["g"]
    step = np.linalg.solve(h, g)
    d = np.sqrt(np.diag(h))
    _, vectors = np.linalg.eigh(h / np.outer(d, d))
    ages = np.arange(17.0, 45.0)
    design = glm_models._design(
        parse_formula(formula), pd.DataFrame({"age": ages}), {}
    ).to_numpy()
    v0, v1 = vectors[:, 0] / d, vectors[:, 1] / d
    target = int(np.flatnonzero(ages == 41.0)[0])
    u = (design @ v1)[target] * v0 - (design @ v0)[target] * v1  # 0 at age 41
    t = 60.0 / np.abs(np.delete(design @ u, target)).min()

    def answered(beta: np.ndarray) -> bool:
        try:
            run_query(
                sites,
                hand_query(spec, beta.tolist(), "newton", [0.0] * p),
                _iterate,
                keys=keys,
            )
        except DisclosureRefused as refused:
            if "Newton step" not in str(refused):
                raise
            return False
        return True

    shifts = {
        scale: float(np.abs(design @ (scale * u)).max())  # |Δη| over the ages
        for scale in (t, t / 1e2, t / 1e4, t / 1e6, t / 1e8)
        if answered(step + scale * u)
    }
    # the attack's shift (60 everywhere but at age 41) is refused; what passes
    # moves no patient's linear predictor by 0.01 (weights by 1 %), and a model
    # has at most MAX_ITERATES such steps
    assert t not in shifts and t / 1e2 not in shifts
    assert all(shift < 0.01 for shift in shifts.values()), shifts
    # the honest step from the same iterate is answered
    run_query(
        sites, hand_query(spec, step.tolist(), "newton", [0.0] * p), _iterate, keys=keys
    )


def test_an_offset_that_is_also_a_covariate_is_refused_at_the_site() -> None:
    """offset=age with age in the design: exp(age) weights (the np.exp the
    formulas do not offer) gave the top of the age distribution. glm() refuses
    it, and so does every site for a query driven by hand."""
    for weight in ({"family": "poisson", "offset": "age"}, {"trials": "age"}):
        spec = model_spec("arrest ~ age") | weight
        query = hand_query(spec, [0.0, 0.0], "origin", None)
        with pytest.raises(InvalidInput, match="also in the formula"):
            run_query(threshold_sites(), query, _iterate, keys=KeyHolder())


def test_a_spare_field_cannot_make_a_fresh_model() -> None:
    """Extra spec keys gave new model keys: a fresh count of iterates each."""
    sites = threshold_sites()
    spec = model_spec() | {"salt": 1}
    with pytest.raises(InvalidInput, match="no fields"):
        run_query(
            sites,
            hand_query(spec, [0.0, 0.0], "origin", None),
            _iterate,
            keys=KeyHolder(),
        )


def test_rules_on_a_sites_rows_are_anonymous() -> None:
    """The parameter ratio and the outcome's range were refusals naming the site
    (n_h0 of a chosen set bisected to within 3 rows; a row with prio > week at
    h0): now flags every site sums, and every site refuses alike."""
    frames = [rossi().iloc[i::2].reset_index(drop=True) for i in range(2)]
    frames[1] = frames[1].iloc[:9]  # 9 rows: 4 parameters exceed 0.33 per row
    sites = [Site(f"h{i}", f) for i, f in enumerate(frames)]
    with pytest.raises(DisclosureRefused) as refused:
        encrypted.logit(sites, "arrest ~ age + prio + fin")
    message = str(refused.value)
    assert "more parameters than the sites' maximum per row at some site" in message
    assert "h1: 4 parameters" not in message
    with pytest.raises(DisclosureRefused, match="at some site") as refused:
        encrypted.glm(threshold_sites(), "prio ~ fin", trials="week")
    assert "h0" not in str(refused.value).replace("site h0:", "")


def test_a_refused_step_does_not_use_up_the_iterates() -> None:
    sites = threshold_sites()
    keys = KeyHolder()
    spec = model_spec()
    run_query(sites, hand_query(spec, [0.0, 0.0], "origin", None), _iterate, keys=keys)
    before = [dict(s._iterates) for s in sites]
    with pytest.raises(DisclosureRefused):
        run_query(
            sites,
            hand_query(spec, [-30.0, 1.0], "newton", [0.0, 0.0]),
            _iterate,
            keys=keys,
        )
    assert [{k: len(v) for k, v in s._iterates.items()} for s in sites] == [
        {k: len(v) for k, v in b.items()} for b in before
    ]


def test_a_step_is_halved_only_after_the_longer_one_was_refused() -> None:
    """Every fraction 1 … 1/1024 of one Newton step was answered: eleven iterates
    along one direction, which solved a covariate's value counts (the review's
    pat.karno). A fraction is answered only after the longer step from the same
    iterate was asked and refused, one halving at a time."""
    sites = threshold_sites()
    keys = KeyHolder()
    spec = model_spec()
    origin = run_query(
        sites, hand_query(spec, [0.0, 0.0], "origin", None), _iterate, keys=keys
    )
    out = _Layout(2).unpack(origin.totals)
    step = np.linalg.solve(out["H"], out["g"])

    def ask(fraction: float) -> Any:
        beta = (fraction * step).tolist()
        fields = {"beta": beta, "step": "newton", "previous": [0.0, 0.0]}
        query = Query("glm", {**spec, **fields, "fraction": fraction}, _Layout(2).size)
        return run_query(sites, query, _iterate, keys=keys)

    for fraction in (0.5, 0.25):  # not asked after the full step
        with pytest.raises(DisclosureRefused, match="halved only after"):
            ask(fraction)
    # a deliberately wrong step is no refusal to halve after
    bogus = Query(
        "glm",
        {**spec, "beta": (step + 1e-3).tolist(), "step": "newton"}
        | {"previous": [0.0, 0.0], "fraction": 1.0},
        _Layout(2).size,
    )
    with pytest.raises(DisclosureRefused, match="Newton step"):
        run_query(sites, bogus, _iterate, keys=keys)
    with pytest.raises(DisclosureRefused, match="halved only after"):
        ask(0.5)
    ask(1.0)  # the full step is answered ...
    for fraction in (0.5, 0.25, 2.0**-10):  # ... so no shorter one is
        with pytest.raises(DisclosureRefused, match="halved only after"):
            ask(fraction)


def test_removing_the_intercept_is_honoured() -> None:
    frames = {f"s{i}": rossi().iloc[i::3] for i in range(3)}
    fit = encrypted.logit(frames, "arrest ~ age + prio - 1")
    assert list(fit.params.index) == ["age", "prio"]
    ref = smf.glm("arrest ~ age + prio - 1", rossi(), family=sm.families.Binomial())
    assert relative(fit.params, ref.fit(tol=1e-14).params) <= RTOL
    with pytest.raises(InvalidInput, match="does not parse"):
        encrypted.logit(frames, "arrest ~ age | prio")


# ------------------------------------- the second review's attacks (refused)
def test_many_functions_of_a_count_are_audited_by_its_values() -> None:
    """prio has 17 values; 15 functions of it (products of prio, prio², √prio,
    log1p prio) and the same times age solved for each value's count and Σ age:
    the one patient with prio = 15 was 22. A column of few values, next to as
    many functions of it, is audited by its value sets."""
    sites = threshold_sites()
    terms = "prio*I(prio ** 2)*np.sqrt(prio)*np.log1p(prio)"
    formula = f"arrest ~ ({terms}) + age + age:({terms})"
    spec = model_spec(formula) | {"family": "gaussian"}
    p = len(spec["terms"])
    with pytest.raises(DisclosureRefused, match="fewer than 3"):
        run_query(
            sites,
            hand_query(spec, [0.0] * p, "origin", None),
            _iterate,
            keys=KeyHolder(),
        )
    # a plain count covariate (3 functions of it, 17 values) is answered
    fit = encrypted.glm(threshold_sites(), "arrest ~ prio + age", "binomial")
    assert fit.converged


def test_an_offset_of_few_values_is_audited_by_its_values() -> None:
    frames = [rossi().iloc[i::2].reset_index(drop=True).copy() for i in range(2)]
    for frame in frames:
        frame["exposure"] = 1.0
        frame.loc[0, "exposure"] = 2.0  # one patient per site with another value
    sites = [Site(f"h{i}", f) for i, f in enumerate(frames)]
    with pytest.raises(DisclosureRefused, match="fewer than 3"):
        encrypted.glm(sites, "prio ~ age", "poisson", offset="exposure")


def test_rows_at_a_fitted_zero_or_one_are_a_flag_not_a_count() -> None:
    """arrest ~ week: everyone arrested before week 52, so the Newton path moves a
    cut up through the weeks, and the count of rows at a fitted 0 or 1 rose one
    patient at a time (99, 100, 102: one at week 47, two at 48). Driven by hand
    along the honest path, no answered iterate carries that count, and the sites
    refuse the iterate that would have one; the public fit is PerfectSeparation."""
    with pytest.raises(PerfectSeparation, match="predicted exactly"):
        encrypted.logit(threshold_sites(), "arrest ~ week")
    sites = threshold_sites()
    keys = KeyHolder()
    spec = model_spec("arrest ~ week")
    out = _Layout(2).unpack(
        run_query(
            sites, hand_query(spec, [0.0, 0.0], "origin", None), _iterate, keys=keys
        ).totals
    )
    share = (out["g"][0] + 2 * out["H"][0, 0]) / (4 * out["H"][0, 0])
    beta = np.array([np.log(share / (1 - share)), 0.0])
    out = _Layout(2).unpack(
        run_query(
            sites, hand_query(spec, beta.tolist(), "start", None), _iterate, keys=keys
        ).totals
    )
    refused = ""
    for _ in range(30):
        step = beta + np.linalg.solve(out["H"], out["g"])
        try:
            run = run_query(
                sites,
                hand_query(spec, step.tolist(), "newton", beta.tolist()),
                _iterate,
                keys=keys,
            )
        except DisclosureRefused as exc:
            refused = str(exc)
            break
        out, beta = _Layout(2).unpack(run.totals), step
        assert out["boundary"] == 0
    assert glm_models._SEPARATION in refused


def test_a_total_beyond_the_encoding_is_an_anonymous_flag() -> None:
    """exp(age) weights (Poisson, offset age): one site's totals pass what the
    encoding carries, and its refusal named it (a threshold bit on one site's
    Σ e^age·f(age)). Now a flag: every site refuses alike."""
    spec = model_spec("arrest ~ I(age ** 2):np.log(age)") | {
        "family": "poisson",
        "offset": "exposure",  # a column of its own (age itself is refused)
    }
    frames = [rossi().iloc[i::2].reset_index(drop=True) for i in range(2)]
    sites = [Site(f"h{i}", f.assign(exposure=f["age"])) for i, f in enumerate(frames)]
    with pytest.raises(DisclosureRefused) as refused:
        run_query(
            sites,
            hand_query(spec, [0.0, 0.0], "origin", None),
            _iterate,
            keys=KeyHolder(),
        )
    message = str(refused.value)
    assert "beyond what the encoding carries at some site" in message
    assert "reaches" not in message


def test_a_binomial_model_with_an_offset_converges_by_halving_steps() -> None:
    frame = rossi()
    sites = threshold_sites()
    fit = encrypted.glm(sites, "arrest ~ age + prio", "binomial", offset="log_week")
    ref = smf.glm(
        "arrest ~ age + prio",
        frame,
        family=sm.families.Binomial(),
        offset=frame["log_week"],
    ).fit(tol=1e-14)
    assert relative(fit.params, ref.params) <= RTOL
    assert relative(fit.bse, ref.bse) <= RTOL
    steps = [q["spec"].get("fraction") for q in fit.receipt["queries"][2:]]
    assert any(f < 1 for f in steps)  # a full step from zero overshoots


def test_numeric_categories_have_statsmodels_reference_level() -> None:
    frame = rossi().copy()
    frame["band"] = np.select([frame.age < 20, frame.age < 30], [2.0, 10.0], 30.0)
    frames = {f"s{i}": frame.iloc[i::3] for i in range(3)}
    fit = encrypted.logit(frames, "arrest ~ C(band)")
    ref = smf.glm("arrest ~ C(band)", frame, family=sm.families.Binomial()).fit(
        tol=1e-14
    )
    assert list(fit.params.index) == list(ref.params.index)
    np.testing.assert_allclose(fit.params, ref.params, rtol=RTOL, atol=1e-12)


# --------------------------------- the third review's attacks (all refused now)
def glm_hand_spec(formula: str, family: str, trials: str | None = None) -> dict:
    parsed = parse_formula(formula)
    terms = design_columns(parsed, {})
    return {
        "formula": parsed.text,
        "family": family,
        "terms": terms,
        "levels": {},
        "offset": None,
        "trials": trials,
        "population": [],
        "intercept": terms.index("Intercept") if "Intercept" in terms else None,
    }


def origin(sites: list[Site], spec: dict) -> Any:
    query = Query(
        "glm",
        {**spec, "beta": [0.0] * len(spec["terms"]), "step": "origin"}
        | {"previous": None, "fraction": 1.0},
        _Layout(len(spec["terms"])).size,
    )
    return run_query(sites, query, _iterate, keys=KeyHolder())


def test_a_pairs_power_sums_over_rows_one_site_holds_are_refused() -> None:
    """mar and fin:arrest, each with age and age²: XᵀX at zero holds n, Σa … Σa⁴
    over the 3 patients both hold — all at one site: by Newton's identities
    their ages. Refused (too many functions for 3 rows; and a pair's rows one
    site holds)."""
    rows = rossi()
    label = np.random.default_rng(1).integers(0, 2, len(rows))
    sites = [Site(f"h{s}", rows[label == s].reset_index(drop=True)) for s in range(2)]
    spec = glm_hand_spec(
        "week ~ mar + fin:arrest + mar:age + fin:arrest:age + mar:I(age**2) + "
        "fin:arrest:I(age**2)",
        "gaussian",
    )
    with pytest.raises(DisclosureRefused, match=r"functions of the values|too few"):
        origin(sites, spec)
    # the same pair's rows held by one site only, with the count alone: refused
    # (on fresh sites: these remember the functions the first model asked)
    spec = glm_hand_spec("week ~ mar + fin:arrest", "gaussian")
    fresh = [Site(f"h{s}", rows[label == s].reset_index(drop=True)) for s in range(2)]
    with pytest.raises(DisclosureRefused, match="share are"):
        origin(fresh, spec)


def test_many_functions_of_one_column_over_a_group_are_refused() -> None:
    """Five functions of age within race:mar:arrest (7 patients, 4 + 3 over two
    sites): XᵀX's pairwise products were 13 moments over 7 ages, which only one
    multiset of whole numbers fits. Refused; two functions are answered."""
    sites = threshold_sites()
    group = "race:mar:arrest"
    many = glm_hand_spec(
        f"week ~ {group} + {group}:age + {group}:I(age**2) + "
        f"{group}:np.sqrt(age) + {group}:np.log(age)",
        "gaussian",
    )
    with pytest.raises(DisclosureRefused, match="functions of the values"):
        origin(sites, many)
    with pytest.raises(DisclosureRefused, match="functions of the values"):
        encrypted.glm(sites, many["formula"], "gaussian")


def test_the_outcome_one_site_holds_in_a_column_is_refused_in_every_family() -> None:
    """All 8 married arrested patients at one site: logit was refused, but the
    same score came out of Poisson, binomial with trials= and a Cox model (their
    count and Σ age: that site's totals). Refused in every family."""
    rows = rossi()
    label = np.random.default_rng(1).integers(0, 2, len(rows))
    frames = [rows[label == s].reset_index(drop=True) for s in range(2)]
    assert [int(((f.mar == 1) & (f.arrest == 1)).sum()) for f in frames] == [0, 8]

    def fresh() -> list[Site]:
        return [Site(f"h{i}", f) for i, f in enumerate(frames)]

    formula = "arrest ~ mar + mar:age"
    for family, trials in (("binomial", None), ("poisson", None), ("binomial", "week")):
        with pytest.raises(DisclosureRefused, match="held by too few of the sites"):
            origin(fresh(), glm_hand_spec(formula, family, trials))
    with pytest.raises(DisclosureRefused, match="the events within term 'mar' are"):
        encrypted.coxph(fresh(), "~ mar + mar:age", "week", "arrest", grid=[0, 60])


def test_a_discrete_covariates_counts_do_not_come_out_of_the_iterates() -> None:
    """lung's pat.karno takes 8 values, two of them held by 2 patients each. A
    Poisson model on it alone, at the origin and eleven fractions of one Newton
    step, solved for every value's count. Fractions are no longer answered (see
    above), and from the iterate whose totals number the values each value's
    rows are audited: refused; on the values held by 3 or more, answered."""
    from lifelines.datasets import load_lung

    frame = load_lung().rename(columns={"pat.karno": "pat_karno"})
    frame = frame.dropna(subset=["pat_karno"]).reset_index(drop=True)

    def two(rows: pd.DataFrame) -> list[Site]:
        return [Site(f"h{i}", rows.iloc[i::2].reset_index(drop=True)) for i in range(2)]

    with pytest.raises(DisclosureRefused, match="fewer than 3"):
        encrypted.glm(two(frame), "status ~ pat_karno", "poisson")
    # its square too: the domain is the 8 values of the column, not 8 × 8
    with pytest.raises(DisclosureRefused, match="fewer than 3"):
        encrypted.glm(two(frame), "status ~ pat_karno + I(pat_karno ** 2)", "poisson")
    common = frame.groupby("pat_karno")["status"].transform("size") >= 6
    rest = frame[common].reset_index(drop=True)
    fit = encrypted.glm(two(rest), "status ~ pat_karno", "poisson")
    ref = smf.glm("status ~ pat_karno", rest, family=sm.families.Poisson()).fit(
        tol=1e-14
    )
    assert relative(fit.params, ref.params) <= RTOL


def test_counting_each_iterates_weighted_functions_refuses_as_they_add_up() -> None:
    """The rule for the iterates' weighted functions: a 6-row set of one
    whole-number column with 2 functions passes at the origin and is refused once
    (e + 1)(t + 1) − 1 reaches its unknowns; unweighted (Gaussian) iterates add
    none."""
    site = threshold_sites()[0]
    load = glm_models.FunctionLoad(
        rows=6, unknowns=0.75, functions=2, weighted_unknowns=0.75
    )
    glm_models.check_functions(site, [load], answered=0, weighted=True)
    glm_models.check_functions(site, [load], answered=5, weighted=False)
    with pytest.raises(DisclosureRefused, match="functions of the values"):
        glm_models.check_functions(site, [load], answered=1, weighted=True)


def _rare_cell_sites(policy: DisclosurePolicy) -> tuple[list[Site], np.ndarray]:
    """Two sites of 200 patients each, and a rare exposure 3 patients at each hold
    (the cell a model's coefficient is about): 6 whole-number ages in 30-80."""
    rng = np.random.default_rng(11)
    frames, cell = [], []
    for _ in range(2):
        age = rng.integers(30, 81, 203).astype(float)
        rare = np.r_[np.zeros(200), np.ones(3)]
        y = rng.poisson(np.exp(-2.0 + 0.03 * age + 0.5 * rare)).astype(float)
        y[200:] = np.maximum(y[200:], 1.0)  # the cell's outcomes are not 0
        frames.append(pd.DataFrame({"y": y, "rare": rare, "age": age}))
        cell.extend(age[200:])
    sites = [Site(f"h{i}", f, policy=policy) for i, f in enumerate(frames)]
    return sites, np.sort(np.asarray(cell))


def _walk_newton_path(
    sites: list[Site], spec: dict[str, Any], steps: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The researcher's honest Newton path from zero, driven by hand: each
    answered iterate's β and pooled information matrix."""
    keys = KeyHolder()
    p = len(spec["terms"])
    beta = np.zeros(p)
    origin = hand_query(spec, [0.0] * p, "origin", None)
    out = _Layout(p).unpack(run_query(sites, origin, _iterate, keys=keys).totals)
    path = [(beta, out["H"])]
    for _ in range(steps):
        step = beta + np.linalg.solve(out["H"], out["g"])
        run = run_query(
            sites,
            hand_query(spec, step.tolist(), "newton", beta.tolist()),
            _iterate,
            keys=keys,
        )
        beta, out = step, _Layout(p).unpack(run.totals)
        path.append((beta, out["H"]))
    return path


def test_an_honest_newton_path_does_not_release_a_small_cells_values() -> None:
    """B3, the attack the second review mounted: a Poisson model ``y ~ rare +
    age`` along its own honest Newton path. Each iterate's information matrix
    holds Σ μᵢ and Σ μᵢ·ageᵢ over the 6 rare patients, with μᵢ = exp(β₀ + β₁ +
    β₂·ageᵢ) and β₂ changing every iterate: new functions of the 6 ages each
    time. With the weighted count switched off (the owner's loud opt-out), the
    path's totals pick the true ages out of candidates that differ by one year
    in one patient; by default every site refuses the first step after the
    origin (3 rows a site cannot carry the functions), so only the origin's
    Σ age over 6 patients leaves."""
    parsed = parse_formula("y ~ rare + age")
    spec = {
        **model_spec(),
        "formula": parsed.text,
        "family": "poisson",
        "terms": design_columns(parsed, {}),
    }

    # the attack, where the owner switched the count off
    sites, true_ages = _rare_cell_sites(DisclosurePolicy(count_iterates=False))
    path = _walk_newton_path(sites, spec, steps=5)

    def residual(ages: np.ndarray, iterates: int = len(path)) -> float:
        """How far the path's (rare, rare) and (rare, age) entries are from
        those the candidate ages would give (the cell's factor exp(β₀ + β₁)
        known from β)."""
        worst = 0.0
        for beta, h in path[:iterates]:
            weight = np.exp(beta[0] + beta[1] + beta[2] * ages)
            model = np.array([weight.sum(), (weight * ages).sum()])
            seen = np.array([h[1, 1], h[1, 2]])
            worst = max(worst, float(np.max(np.abs(model - seen) / np.abs(seen))))
        return worst

    candidates = [true_ages]
    for i in range(6):
        for shift in (-1.0, 1.0):
            other = true_ages.copy()
            other[i] += shift
            candidates.append(other)
    # the same Σ age as the truth (the origin's total): only the iterates tell
    for i in range(5):
        other = true_ages.copy()
        other[i] -= 1.0
        other[i + 1] += 1.0
        candidates.append(other)
    scores = [residual(c) for c in candidates]
    assert scores[0] < 1e-12
    assert min(scores[1:]) > 1e3 * max(scores[0], 1e-16)
    # the origin alone cannot tell them apart: the iterates are the leak
    assert all(residual(c, iterates=1) < 1e-12 for c in candidates[-5:])

    # the default: refused at the first step, by every site, by name
    sites, _ = _rare_cell_sites(DisclosurePolicy())
    with pytest.raises(TooFewRows, match="functions of the values"):
        _walk_newton_path(sites, spec, steps=1)
    assert all(s.model_iterations(next(iter(s._iterates))) == 1 for s in sites)


def test_the_iterates_weighted_functions_add_up_across_models() -> None:
    """Two models' Newton paths over the same 8 patients (whole-number ages: 6
    unknowns): the origin's 2 functions of age, and each iterate after it e + 1
    weighted ones (the count among them), whichever model asks it. Model A's
    first step (2 + 3 = 5 functions) passes, and asking that same iterate again
    adds nothing; model B's first step over the same set brings them to 8 and is
    refused."""
    site = threshold_sites()[0]
    rows = np.zeros(site.n_rows, dtype=bool)
    rows[:8] = True
    probes = np.linspace(1.0, 2.0, glm_models._PROBES)
    load = glm_models.FunctionLoad(
        rows=8,
        unknowns=0.75,
        functions=2,
        weighted_unknowns=0.75,
        key=np.packbits(rows).tobytes(),
        vectors=np.vstack([probes, probes**2]),
        columns=(("age", 0.75),),
        weighted_columns=("age",),
    )
    glm_models.check_functions(site, [load], answered=0, weighted=True)
    glm_models.check_functions(site, [load], answered=1, weighted=True)
    glm_models.check_functions(site, [load], answered=1, weighted=True, new=False)
    with pytest.raises(TooFewRows, match="8 functions"):
        glm_models.check_functions(site, [load], answered=1, weighted=True)
    # a design of levels alone (weights constant on each set) adds none
    fixed = glm_models.FunctionLoad(
        rows=8, unknowns=0.75, functions=2, weighted_unknowns=0.75, varying=False
    )
    glm_models.check_functions(site, [fixed], answered=6, weighted=True)


def test_a_sample_hospitals_small_cell_refuses_the_path_naming_its_terms() -> None:
    """The sample cohort: site_c's 900 patients hold 5 smokers with diabetes.
    ``cvd_event_10y ~ age + smoker + diabetes`` is refused at its fifth iterate
    (the 5 ages under four iterates' weights: the rows are too few), by the
    terms whose shared rows they are and never by their count; without
    ``diabetes`` the model is answered."""
    from pathlib import Path

    cohort = Path(__file__).resolve().parents[1] / "data_samples" / "cohort"
    frames = {p.stem: pd.read_csv(p) for p in sorted(cohort.glob("site_*.csv"))}
    with pytest.raises(TooFewRows) as refused:
        encrypted.logit(frames, "cvd_event_10y ~ age + smoker + diabetes")
    message = str(refused.value)
    assert "site site_c" in message
    assert "terms 'smoker' and 'diabetes' share" in message
    assert "5" not in message and "900" not in message  # no count of rows
    fit = encrypted.logit(frames, "cvd_event_10y ~ age + smoker + sbp")
    assert fit.converged


# ----------------------- the third review: differences of sets (all refused)
def _rare_frames(seed: int = 11) -> list[pd.DataFrame]:
    """Two sites of 200 patients and a rare level 3 at each hold (level "a",
    which sorts first: the reference level of C(grp))."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(2):
        age = rng.integers(30, 81, 203).astype(float)
        rare = np.r_[np.zeros(200), np.ones(3)]
        y = rng.poisson(np.exp(-2.0 + 0.03 * age + 0.5 * rare)).astype(float)
        y[200:] = np.maximum(y[200:], 1.0)
        frames.append(
            pd.DataFrame(
                {"y": y, "rare": rare, "age": age, "grp": np.where(rare == 1, "a", "b")}
            )
        )
    return frames


def test_a_rare_reference_level_is_counted_as_the_difference_it_is() -> None:
    """The rare cell as the reference level of ``C(grp)``: the design's sets are
    all rows and grp = b, each large, and the cell is their difference — its Σμ,
    Σμ·age, Σμ·age² at every iterate, which gave its 6 ages. Every function is
    followed over the sets it was summed over, and the cell they isolate carries
    it: refused by default; answered where the owners opted out."""
    formula = "y ~ C(grp) + age + C(grp):age"
    with pytest.raises(TooFewRows, match="functions of the values"):
        encrypted.glm(
            [Site(f"h{i}", f) for i, f in enumerate(_rare_frames())], formula, "poisson"
        )
    sites = [Site(f"h{i}", f, policy=UNCOUNTED) for i, f in enumerate(_rare_frames())]
    assert encrypted.glm(sites, formula, "poisson").converged


def test_two_models_a_population_apart_are_counted_on_their_difference() -> None:
    """A Gaussian model over all rows, then the same over the rows with a lab
    value — missing for exactly the 6 rare patients: the two origins' XᵀX
    differ by the 6 patients' sums of 1, √a, a, a², a^1.5 … (8 functions; their
    ages came out). Each model alone is answered; the second after the first is
    refused."""

    def frames() -> list[pd.DataFrame]:
        out = []
        for i, f in enumerate(_rare_frames(seed=5)):
            f = f.copy()
            f["y"] = np.random.default_rng(i).normal(120, 15, len(f)).round(1)
            f["lab"] = np.where(f["rare"] == 1, np.nan, 1.0 + f.index % 7)
            out.append(f)
        return out

    formula = "y ~ np.sqrt(age) + age + I(age ** 2)"
    sites = [Site(f"h{i}", f) for i, f in enumerate(frames())]
    encrypted.glm(sites, formula, "gaussian")
    with pytest.raises(TooFewRows, match="functions of the values"):
        encrypted.glm(sites, formula, "gaussian", population=["lab"])
    fresh = [Site(f"h{i}", f) for i, f in enumerate(frames())]
    assert encrypted.glm(fresh, formula, "gaussian", population=["lab"]).converged


def test_a_binomial_offset_is_a_value_the_weights_read() -> None:
    """``y ~ C(grp)``, binomial, with a private z-score as the offset: a design
    of levels alone, so its iterates were not counted, yet expit(η + offset)
    does not factor by level, and two such fits gave the 6 rare patients'
    z-scores. The offset is a value column the weights read: refused by
    default; answered where the owners opted out."""
    rng = np.random.default_rng(21)

    def frames() -> list[pd.DataFrame]:
        out = []
        for _ in range(2):
            chol = np.round(rng.uniform(-1.5, 1.5, 203), 2)
            y = rng.binomial(10, special.expit(-2.5 + chol)).astype(float)
            y[200:] = np.clip(y[200:], 1, 9)
            out.append(
                pd.DataFrame(
                    {
                        "y": y,
                        "grp": np.array(["b"] * 200 + ["z"] * 3),
                        "chol": chol,
                        "n": 10.0,
                    }
                )
            )
        return out

    def fit(policy: DisclosurePolicy) -> Any:
        sites = [Site(f"h{i}", f, policy=policy) for i, f in enumerate(frames())]
        return encrypted.glm(sites, "y ~ C(grp)", "binomial", offset="chol", trials="n")

    with pytest.raises(TooFewRows, match="functions of the values"):
        fit(DisclosurePolicy())
    assert fit(UNCOUNTED).converged


def _offset_frames(three: bool) -> list[pd.DataFrame]:
    """Two sites of 203 patients; an offset column ``o``: the rare cell's flag
    (3 patients a site at 1), or three-valued with its rare value 2 held by 2
    patients a site."""
    rng = np.random.default_rng(7)
    frames = []
    for _ in range(2):
        age = rng.integers(30, 81, 203).astype(float)
        rare = np.r_[np.zeros(200), np.ones(3)]
        o = np.r_[rng.integers(0, 2, 201), [2, 2]].astype(float) if three else rare
        frames.append(
            pd.DataFrame(
                {
                    "age": age,
                    "o": o,
                    "y": rng.poisson(3, 203).astype(float),
                    "ev": rng.integers(0, 2, 203).astype(float),
                }
            )
        )
    return frames


def test_an_offset_of_few_values_splits_the_sets_it_weights() -> None:
    """The fourth review: at the origin an offset weights each row's functions
    (exp(o)); against the same model without it, a 0/1 offset's difference is Σ
    over its ones of every function (3 patients' ages a site came out), and a
    3-valued one's, from three weightings (Poisson, none, binomial), its rare
    value's 2 patients a site. Once a site has seen as many weightings of an
    offset as it has values, the parts at each value count as sets: refused.
    One weighting alone is answered."""
    formula = "y ~ np.sqrt(age) + age + I(age ** 2)"
    sites = [Site(f"h{i}", f) for i, f in enumerate(_offset_frames(False))]
    encrypted.glm(sites, formula, "poisson")
    with pytest.raises(TooFewRows):
        encrypted.glm(sites, formula, "poisson", offset="o")
    fresh = [Site(f"h{i}", f) for i, f in enumerate(_offset_frames(False))]
    assert encrypted.glm(fresh, formula, "poisson", offset="o").converged
    sites = [Site(f"h{i}", f) for i, f in enumerate(_offset_frames(True))]
    encrypted.glm(sites, formula, "poisson")
    encrypted.glm(sites, formula, "poisson", offset="o")  # two weightings: answered
    answered = [len(s.log) for s in sites]
    binomial = "ev ~ np.sqrt(age) + age + I(age ** 2)"
    with pytest.raises(TooFewRows):  # the third weighting: refused at its origin
        encrypted.glm(sites, binomial, "binomial", offset="o")
    assert [len(s.log) for s in sites] == answered  # nothing of it answered


# ----------------------- a fifth review: columns related to each other (refused)
def _related_frames(
    derive: Callable[[pd.DataFrame], pd.Series] | None,
) -> list[pd.DataFrame]:
    """The population-apart frames (a lab value missing for exactly the 6 rare
    patients), with a column ``age_fu`` derived from ``age`` (as a data
    dictionary would state it)."""
    out = []
    for i, f in enumerate(_rare_frames(seed=5)):
        f = f.copy()
        f["y"] = np.random.default_rng(i).normal(120, 15, len(f)).round(1)
        f["lab"] = np.where(f["rare"] == 1, np.nan, 1.0 + f.index % 7)
        f["b"] = np.random.default_rng(20 + i).normal(27, 4, len(f)).round(2)
        f["age_fu"] = derive(f)
        out.append(f)
    return out


_FIRST = "y ~ np.sqrt(age) + age + I(age ** 2)"


@pytest.mark.parametrize(
    ("derive", "first", "second"),
    [
        # follow-up age: a shifted copy of age
        (
            lambda f: f["age"] + 5,
            _FIRST,
            "y ~ np.sqrt(age_fu) + age_fu + I(age_fu ** 2)",
        ),
        # age in months, less three: scaled and shifted
        (
            lambda f: 12 * f["age"] - 3,
            _FIRST,
            "y ~ np.sqrt(age_fu) + age_fu + I(age_fu ** 2)",
        ),
        # a copy, under other transforms
        (
            lambda f: f["age"].copy(),
            _FIRST,
            "y ~ np.log(age_fu) + age_fu + I(age_fu ** 2)",
        ),
        # a stored square: √(age²), age², log(age²) span age, age², log age
        (
            lambda f: f["age"] ** 2,
            "y ~ age + I(age ** 2) + np.log(age)",
            "y ~ np.sqrt(age_fu) + age_fu + np.log(age_fu)",
        ),
        # a stored product: the interaction's own values
        (lambda f: f["age"] * f["b"], "y ~ age + b + age:b", "y ~ age + b + age_fu"),
        # a stored ratio: its logarithm is log age − log b
        (
            lambda f: f["age"] / f["b"],
            "y ~ np.log(age) + np.log(b) + age",
            "y ~ np.log(age_fu) + np.log(b) + age",
        ),
        # a stored logarithm
        (
            lambda f: np.log(f["age"]),
            "y ~ np.log(age) + age + np.sqrt(age)",
            "y ~ age_fu + age + np.sqrt(age)",
        ),
    ],
    ids=[
        "shifted column",
        "scaled column",
        "copied column",
        "squared column",
        "product column",
        "ratio column",
        "logarithm column",
    ],
)
def test_a_column_related_to_another_is_counted_with_it(
    derive: Callable[[pd.DataFrame], pd.Series], first: str, second: str
) -> None:
    """The population-apart attack with the second model over another column
    (or transform) of the same values: Σ(age + 5)ᵏ with the count is Σ ageʲ, a
    stored age² or age · b is the first model's own function, so the two models'
    functions still differ by the 6 patients' sums. Each function counts over
    every set whose functions span it, and a column that is a function of others
    on the site's rows (affine, or of their squares, products, logarithms) takes
    their functions: refused. Each model alone is answered."""
    sites = [Site(f"h{i}", f) for i, f in enumerate(_related_frames(derive))]
    encrypted.glm(sites, first, "gaussian")
    answered = [len(s.log) for s in sites]
    with pytest.raises(TooFewRows, match="functions of the values"):
        encrypted.glm(sites, second, "gaussian", population=["lab"])
    assert [len(s.log) for s in sites] == answered
    fresh = [Site(f"h{i}", f) for i, f in enumerate(_related_frames(derive))]
    assert encrypted.glm(fresh, second, "gaussian", population=["lab"]).converged
    # the honest order: both models over one population
    fresh = [Site(f"h{i}", f) for i, f in enumerate(_related_frames(derive))]
    encrypted.glm(fresh, first, "gaussian")
    assert encrypted.glm(fresh, second, "gaussian").converged


def test_column_relations_are_found_on_every_row_and_only_there() -> None:
    """A shifted, a scaled and a summed column are affine functions of their
    bases, a logarithm, a square, a product and a ratio functions of theirs; a
    column equal to another but on one row, a transform outside the families
    (a rounded one, an exponent of a product) and 0/1 flags are not; a relation
    holds where the column has values."""
    rng = np.random.default_rng(3)
    n = 5000
    a = rng.integers(30, 81, n).astype(float)
    b = rng.normal(27, 4, n).round(2)
    near = a + 5
    near[17] += 1  # one patient's follow-up a year later
    fu = a + 5
    fu[::7] = np.nan  # not followed up: no value, the relation holds elsewhere
    frame = pd.DataFrame(
        {
            "age": a,
            "bmi": b,
            "age_fu": fu,
            "months": 12 * a - 3,
            "total": a + 2 * b,
            "near": near,
            "log_age": np.log(a),
            "age_sq": a**2,
            "age_bmi": a * b,
            "ratio": 1e4 * a / b**2,
            "rounded": np.round(a**2 / 7, 1),
            "power": np.exp(a * b / 1000),
            "flag": (a > 50).astype(float),
            "name": ["x"] * n,
        }
    )
    site = Site("s", frame)
    relations = glm_models.column_relations(site)
    assert set(relations) == {
        "age_fu",
        "months",
        "total",
        "log_age",
        "age_sq",
        "age_bmi",
        "ratio",
    }
    # equal to age + 5 but on one row: refused at the site (tests/test_audit.py)
    assert set(site.column_relations().near) == {"near"}
    assert site.column_relations().near["near"].coefficients == pytest.approx(
        {"age": 1.0}
    )
    assert relations["age_fu"].coefficients == pytest.approx({"age": 1.0})
    assert relations["age_fu"].constant == pytest.approx(5.0)
    assert relations["months"].coefficients == pytest.approx({"age": 12.0})
    assert relations["total"].coefficients == pytest.approx({"age": 1.0, "bmi": 2.0})
    assert all(relations[c].affine for c in ("age_fu", "months", "total"))
    assert relations["log_age"].coefficients == pytest.approx({"log(age)": 1.0})
    assert relations["age_sq"].coefficients == pytest.approx({"age**2": 1.0})
    assert relations["age_bmi"].coefficients == pytest.approx({"age*bmi": 1.0})
    ratio = relations["ratio"]
    assert (ratio.outer, ratio.constant) == ("log", pytest.approx(np.log(1e4)))
    assert ratio.coefficients == pytest.approx({"log(age)": 1.0, "log(bmi)": -2.0})
    # each evaluates to its column's values from its basis', where it has them
    for column, relation in relations.items():
        held = frame[column].notna().to_numpy()
        np.testing.assert_allclose(
            relation.evaluate(frame)[held], frame[column][held], rtol=1e-9
        )


def test_a_stored_total_counts_one_unknown_not_its_parts() -> None:
    """``total = a + b`` over its parts' basis: its powers over the 6 patients a
    population leaves out determine their totals (not their parts), so they count
    one unknown a row, not two; the same model a population apart is refused, as
    for any column. With a part beside it, two."""

    def frames() -> list[pd.DataFrame]:
        out = []
        for i, f in enumerate(_related_frames(lambda f: f["age"] + 5)):
            f = f.copy()
            f["b"] = np.random.default_rng(10 + i).integers(1, 9, len(f)).astype(float)
            f["total"] = f["age"] + f["b"]
            out.append(f)
        return out

    formula = "y ~ total + I(total ** 2) + np.sqrt(total)"
    sites = [Site(f"h{i}", f) for i, f in enumerate(frames())]
    assert set(sites[0].column_relations().exact) >= {"total", "age_fu"}
    encrypted.glm(sites, formula, "gaussian")
    with pytest.raises(TooFewRows, match="functions of the values"):
        encrypted.glm(sites, formula, "gaussian", population=["lab"])
    relations = glm_models.column_relations(sites[0])
    frame, rows = sites[0]._frame, np.ones(sites[0].n_rows, dtype=bool)
    unknowns = glm_models._unknowns
    assert unknowns(frame, rows, {"total"}, relations) == pytest.approx(0.75)
    assert unknowns(frame, rows, {"total", "age"}, relations) == pytest.approx(1.5)
    assert unknowns(frame, rows, {"age_fu", "age"}, relations) == pytest.approx(0.75)
