"""The pooled Cox model (issue 14): exact against statsmodels on real datasets, and a
site answers it only along its own Newton path, under the auditor's rules.

Parity: statsmodels ``PHReg(ties="breslow")`` on the pooled rows with follow-up
rounded up to the grid (``ceil_to_grid``; beyond the grid: censored after its end),
fitted by Newton to ``tol=1e-14``; params and standard errors within 1e-8 relative,
the log partial likelihood within 1e-9, the Breslow baseline cumulative hazard
within 1e-8, under several splits of rossi, gbsg2 and lung.

Attacks: a researcher who drives the protocol by hand asks for the model at
coefficients of its choosing (a steep slope on age makes exp(xβ) pick out the
oldest patient of a risk set), at baseline intervals of its choosing (one interval
alone makes XᵀWX a sum over one risk set within a pair of columns), and at grids
one patient apart; every such query is refused before anything leaves a site.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from lifelines.datasets import load_gbsg2, load_lung, load_rossi

from healthlab import DisclosurePolicy, Site, encrypted
from healthlab.encrypted import KeyHolder
from healthlab.encrypted.cox import CoxResults, baseline_name, model_spec
from healthlab.encrypted.models import (
    AliasedDesign,
    NotConverged,
    _iterate,
    _Layout,
    parse_formula,
)
from healthlab.encrypted.protocol import Query, run_query
from healthlab.encrypted.survival import ceil_to_grid
from healthlab.errors import DisclosureRefused, InvalidInput, TooFewRows
from tests.test_glm import splits

RTOL = 1e-8  # params, standard errors, baseline hazard (the bound)
LLF_RTOL = 1e-9

#: a 6-row site takes a model of 3-6 covariates (the default 0.33 per row would
#: refuse it); the exactness of the pooled fit is what the parity tests measure
SMALL_SITES = DisclosurePolicy(max_param_ratio=1.0)
#: the splits where a site's late risk sets (or its 6 rows) are too small to
#: carry the Newton path's weighted functions: refused by default, by name, and
#: exact where the owners opt out of counting the iterates (a loud opt-out)
ITERATES_REFUSED = {
    ("gbsg2", "skewed"),
    ("gbsg2", "grouped"),
    ("gbsg2 six rows", "six_rows"),
    ("gbsg2 five intervals", "iid2"),
    ("rossi", "stride"),
    ("rossi", "two"),
    ("lung", "iid"),
}
#: where the tests are about something else than the iterates' count: the
#: owners' opt-out, so that rossi on its 3-interval grid is answered
UNCOUNTED = DisclosurePolicy(count_iterates=False)


@cache
def rossi() -> pd.DataFrame:
    return load_rossi().astype(float)


@cache
def gbsg2() -> pd.DataFrame:
    return load_gbsg2()


@cache
def lung() -> pd.DataFrame:
    frame = load_lung()
    frame.columns = [c.replace(".", "_") for c in frame.columns]
    frame["sex"] = frame["sex"].map({1: "male", 2: "female"})
    return frame


#: (data, duration, event, covariates, grid, grouping for a split, indicators for
#: the 6-row site, splits): grids where every site's cells hold 0 or at least 3
#: rows (a finer one is refused by name, see below)
CASES: dict[str, tuple[Any, ...]] = {
    "gbsg2": (
        gbsg2,
        "time",
        "cens",
        "C(horTh) + age + tsize + pnodes + progrec + estrec",
        [0, 700, 1400, 2700],
        "menostat",
        (),
        ("iid", "skewed", "grouped"),
    ),
    # the 6-row site: 3 patients at risk late with 5 whole-number measurements
    # would carry 20 functions of 15 values (refused); with age alone, answered
    "gbsg2 six rows": (
        gbsg2,
        "time",
        "cens",
        "C(horTh) + age",
        [0, 700, 1400, 2700],
        None,
        (),
        ("six_rows",),
    ),
    "gbsg2 five intervals": (
        gbsg2,
        "time",
        "cens",
        "age + tsize + pnodes + progrec + estrec",
        [0, 500, 1000, 1500, 2000, 2700],
        None,
        (),
        ("iid2",),
    ),
    "rossi": (
        rossi,
        "week",
        "arrest",
        "fin + age + prio",
        [0, 20, 40, 52],
        None,
        (),
        ("stride", "two"),
    ),
    "lung": (
        lung,
        "time",
        "status",
        "age + C(sex)",
        [0, 500, 1100],
        None,
        (),
        ("iid",),
    ),
}


def rounded(frame: pd.DataFrame, duration: str, event: str, grid: list[float]):
    """Follow-up up to the grid; rows beyond it censored after its end."""
    t = ceil_to_grid(frame[duration].to_numpy(), grid)
    e = np.where(np.isfinite(t), frame[event].to_numpy(), 0)
    return np.where(np.isfinite(t), t, grid[-1] + 1), e


@cache
def reference(name: str) -> Any:
    load, duration, event, covariates, grid, *_ = CASES[name]
    frame = load()
    t, e = rounded(frame, duration, event, grid)
    data = frame.assign(_t=t)
    model = sm.PHReg.from_formula(f"_t ~ {covariates}", data, status=e, ties="breslow")
    return model.fit(method="newton", tol=1e-14, maxiter=200)


def six_row_split(frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """gbsg2 with a 6-row site beside two large ones. Its rows hold every cell in
    threes (a statistic of 1-2 of a site's rows is refused: k = 3): 3 treated
    patients with an event in (0, 700], 3 untreated censored in (1400, 2700]."""
    early = frame.index[(frame["horTh"] == "yes") & (frame["cens"] == 1)]
    early = early[frame.loc[early, "time"] <= 700][:3]
    late = frame.index[(frame["horTh"] == "no") & (frame["cens"] == 0)]
    late = late[frame.loc[late, "time"] > 1400][:3]
    small = [*early, *late]
    rest = frame.drop(index=small)
    return {"s0": frame.loc[small], "s1": rest.iloc[::2], "s2": rest.iloc[1::2]}


def case_sites(name: str, split: str, count_iterates: bool = True) -> list[Site]:
    load, _, _, _, _, group, indicators, _ = CASES[name]
    frame = load()
    if split == "stride":
        frames = {f"s{i}": frame.iloc[i::3] for i in range(3)}
    elif split == "two":
        frames = {f"s{i}": frame.iloc[i::2] for i in range(2)}
    elif split == "iid2":
        frames = splits(frame, None, (), iid_sites=2)["iid"]
    elif split == "six_rows":
        frames = six_row_split(frame)
    else:
        frames = splits(frame, group, indicators)[split]
    policy = DisclosurePolicy(
        max_param_ratio=1.0 if split == "six_rows" else 0.33,
        count_iterates=count_iterates,
    )
    return [Site(k, f.reset_index(drop=True), policy=policy) for k, f in frames.items()]


def relative(a: pd.Series, b: pd.Series) -> float:
    b = b.reindex(a.index)
    return float(np.max(np.abs(a.to_numpy() - b.to_numpy()) / np.abs(b.to_numpy())))


PAIRS = [(name, split) for name, case in CASES.items() for split in case[-1]]


@pytest.mark.parametrize(("name", "split"), PAIRS)
def test_a_pooled_cox_model_equals_statsmodels_on_the_grid(
    name: str, split: str
) -> None:
    _, duration, event, covariates, grid, *_ = CASES[name]
    counted = (name, split) not in ITERATES_REFUSED
    if not counted:
        with pytest.raises(TooFewRows, match="functions of the values"):
            encrypted.coxph(
                case_sites(name, split), f"~ {covariates}", duration, event, grid=grid
            )
    fit = encrypted.coxph(
        case_sites(name, split, count_iterates=counted),
        f"~ {covariates}",
        duration,
        event,
        grid=grid,
    )
    ref = reference(name)
    names = ref.model.exog_names
    assert isinstance(fit, CoxResults) and fit.converged
    assert sorted(fit.names) == sorted(names)
    assert relative(fit.params, pd.Series(ref.params, index=names)) <= RTOL
    assert relative(fit.bse, pd.Series(ref.bse, index=names)) <= RTOL
    assert fit.llf == pytest.approx(ref.llf, rel=LLF_RTOL)
    order = [names.index(n) for n in fit.names]
    cov = np.asarray(ref.cov_params())[np.ix_(order, order)]
    assert np.allclose(fit.cov_params().to_numpy(), cov, rtol=1e-7, atol=0)
    p = pd.Series(ref.pvalues, index=names).reindex(fit.params.index)
    assert np.allclose(fit.pvalues, p, rtol=1e-6, atol=1e-300)
    ci = pd.DataFrame(ref.conf_int(), index=names).reindex(fit.params.index)
    assert np.allclose(fit.conf_int().to_numpy(), ci.to_numpy(), rtol=1e-7)
    # Breslow's baseline cumulative hazard at the grid times, from the pooled
    # rows at statsmodels' estimate: Σ_{t_j ≤ t} d_j / Σ_{at risk at t_j} exp(xβ)
    frame = CASES[name][0]()
    t, e = rounded(frame, duration, event, grid)
    risk = np.exp(ref.model.exog @ ref.params)
    expected = []
    total = 0.0
    for time in fit.baseline_cumulative_hazard.index:
        total += e[t == time].sum() / risk[t >= time].sum()
        expected.append(total)
    assert np.allclose(fit.baseline_cumulative_hazard, expected, rtol=RTOL, atol=0)
    # (statsmodels reports it just before each time: H(t−), one step behind)
    lagged = ref.baseline_cumulative_hazard[0][1]
    assert np.allclose(fit.baseline_cumulative_hazard.to_numpy()[:-1], lagged[1:])
    assert fit.nobs == len(frame)
    assert fit.n_events == int(e.sum())
    assert fit.aic == pytest.approx(-2 * ref.llf + 2 * len(names), rel=LLF_RTOL)


def test_the_fit_reads_like_statsmodels() -> None:
    sites = case_sites("rossi", "stride", count_iterates=False)
    fit = encrypted.coxph(
        sites, "~ fin + age + prio", "week", "arrest", grid=[0, 20, 40, 52]
    )
    ratios = fit.hazard_ratios()
    assert list(ratios.columns) == ["hazard_ratio", "0.025", "0.975"]
    assert np.allclose(ratios["hazard_ratio"], np.exp(fit.params))
    assert np.allclose(ratios["0.025"], np.exp(fit.conf_int()[0]))
    frame = fit.to_frame()
    assert list(frame.columns) == ["coef", "std err", "z", "P>|z|", "[0.025", "0.975]"]
    text = str(fit.summary())
    assert "PHReg" in text and "Breslow" in text and "prio" in text
    assert fit.receipt["kind"] == "coxph"
    assert fit.receipt["parameters"]["ties"] == "breslow"
    assert fit.sites == ["s0", "s1", "s2"]
    assert "CoxResults" in repr(fit)


def test_an_interval_without_events_has_no_baseline_and_is_left_out() -> None:
    """A grid interval no one has an event in has no baseline hazard (its α is
    −∞) and drops out of Breslow's likelihood: it is left out of the model, its
    rows still at risk at the grid times before it, and the fit is exact."""
    frame = rossi().copy()
    # no arrests in weeks 41-46: the grid's interval (40, 46] holds none
    quiet = (frame["week"] > 40) & (frame["week"] <= 46) & (frame["arrest"] == 1)
    frame = frame.loc[~quiet].reset_index(drop=True)
    sites = [
        Site(f"s{i}", frame.iloc[i::2].reset_index(drop=True), policy=UNCOUNTED)
        for i in range(2)
    ]
    grid = [0, 20, 40, 46, 52]
    fit = encrypted.coxph(sites, "~ fin + age + prio", "week", "arrest", grid=grid)
    t, e = rounded(frame, "week", "arrest", grid)
    ref = sm.PHReg.from_formula(
        "_t ~ fin + age + prio", frame.assign(_t=t), status=e, ties="breslow"
    ).fit(method="newton", tol=1e-14)
    names = ref.model.exog_names
    assert relative(fit.params, pd.Series(ref.params, index=names)) <= RTOL
    assert relative(fit.bse, pd.Series(ref.bse, index=names)) <= RTOL
    assert list(fit.baseline_cumulative_hazard.index) == [20.0, 40.0, 52.0]


# ------------------------------------------------------------- named refusals
def test_a_grid_too_fine_for_the_data_is_refused_by_name() -> None:
    """Weekly intervals over 3 sites: some site holds 1-2 events in a week (the
    cell rule), and a week's leavers at a site are a few patients whose values
    the origin's functions over the risk sets would determine (the function
    rule, which here speaks first): either way, a coarser grid."""
    with pytest.raises(DisclosureRefused, match=r"fewer than 3|coarser .* time grid"):
        encrypted.coxph(
            case_sites("rossi", "stride", count_iterates=False),
            "~ fin + age + prio",
            "week",
            "arrest",
            grid=list(range(0, 53, 2)),
        )


def test_bad_formulas_and_grids_are_refused_with_what_to_do() -> None:
    sites = case_sites("rossi", "two")
    grid = [0, 20, 40, 52]
    cases: list[tuple[dict[str, Any], str]] = [
        ({"formula": "arrest ~ age"}, "names only the covariates"),
        ({"formula": "~ age - 1"}, "no intercept to drop"),
        ({"formula": "~ age + week"}, "duration 'week' is also in the formula"),
        ({"formula": "~ age + arrest"}, "'arrest' is both the outcome"),
        ({"formula": "~ np.exp(age)"}, "not supported"),
        ({"formula": "~ 1"}, "at least one covariate"),
        ({"grid": [0, 40, 20]}, "strictly increasing"),
        ({"grid": [5, 20, 52]}, "starting at 0"),
        ({"grid": [0]}, "at least one interval"),
    ]
    for change, message in cases:
        options: dict[str, Any] = {"formula": "~ age", "grid": grid} | change
        with pytest.raises(InvalidInput, match=message):
            encrypted.coxph(
                sites, options["formula"], "week", "arrest", grid=options["grid"]
            )
    # a grid off the sites' grid of 2 significant digits: refused by the sites
    with pytest.raises(DisclosureRefused, match="significant digit"):
        encrypted.coxph(sites, "~ age", "week", "arrest", grid=[0, 20.5, 52])


def test_an_aliased_covariate_and_no_convergence_are_refused_by_name() -> None:
    frame = rossi().copy()
    frame["twice_age"] = 2 * frame["age"]
    frame["one"] = 1.0
    sites = [Site(f"s{i}", frame.iloc[i::2].reset_index(drop=True)) for i in range(2)]
    grid = [0, 20, 40, 52]
    with pytest.raises(AliasedDesign, match="twice_age"):
        encrypted.coxph(sites, "~ age + twice_age", "week", "arrest", grid=grid)
    with pytest.raises(AliasedDesign):
        encrypted.coxph(sites, "~ age + one", "week", "arrest", grid=grid)
    # a covariate that orders the events perfectly: β runs off to infinity
    ordered = rossi().copy()
    ordered["late"] = (ordered["week"] > 20).astype(float)
    # (where the owners opted out of counting the iterates: by default the
    # sites refuse the path once its functions outgrow a late risk set)
    opted_out = DisclosurePolicy(count_iterates=False)
    sites = [
        Site(f"s{i}", ordered.iloc[i::2].reset_index(drop=True), policy=opted_out)
        for i in range(2)
    ]
    with pytest.raises(NotConverged):
        encrypted.coxph(sites, "~ age + late", "week", "arrest", grid=grid, max_iter=25)


def test_rules_on_a_sites_rows_are_anonymous() -> None:
    """An event indicator of 2, a negative duration: every site refuses with the
    rule, and no message names the site whose rows break it."""
    for column, value in (("arrest", 2.0), ("week", -1.0)):
        messages = []
        for bad in (0, 1):
            frames = [
                rossi().iloc[i::2].reset_index(drop=True).copy() for i in range(2)
            ]
            frames[bad].loc[0, column] = value
            sites = [Site(f"h{i}", f) for i, f in enumerate(frames)]
            with pytest.raises(DisclosureRefused, match="at some site") as refused:
                encrypted.coxph(sites, "~ age", "week", "arrest", grid=[0, 20, 40, 52])
            messages.append(str(refused.value))
        # the same refusal whichever site's rows break the rule
        assert messages[0] == messages[1]


# ------------------------------------------------------------------- attacks
def attack_sites() -> list[Site]:
    """rossi over two sites; the iterates' count switched off (its own tests
    are below): the attacks here meet the step check first."""
    return [
        Site(f"h{i}", rossi().iloc[i::2].reset_index(drop=True), policy=UNCOUNTED)
        for i in range(2)
    ]


def spec_for(
    covariates: str = "age", intervals: list[int] | None = None, grid: Any = None
) -> dict[str, Any]:
    grid = grid or [0, 20, 40, 52]
    parsed = parse_formula(f"arrest ~ {covariates}")
    names = [c.strip() for c in covariates.split("+")]
    chosen = intervals or list(range(1, len(grid)))
    return model_spec(parsed, names, {}, "week", "arrest", grid, chosen)


def hand(spec: dict[str, Any], theta: list[float], step: str, previous: Any) -> Query:
    return Query(
        "glm",
        {**spec, "beta": theta, "step": step, "previous": previous, "fraction": 1.0},
        _Layout(len(spec["terms"])).size,
    )


def test_a_researcher_cannot_evaluate_a_cox_model_at_coefficients_of_its_choosing() -> (
    None
):
    """exp(1000·age) in a risk set is the oldest patient's weight alone: S1/S0 is
    that patient's age. Every way to ask such a β is refused before anything
    leaves a site, and the honest path is answered."""
    sites = attack_sites()
    keys = KeyHolder()
    spec = spec_for()
    steep = [0.0, 0.0, 0.0, 1000.0]
    with pytest.raises(DisclosureRefused, match="starts at zero"):
        run_query(sites, hand(spec, steep, "origin", None), _iterate, keys=keys)
    with pytest.raises(DisclosureRefused, match="every slope at zero"):
        run_query(sites, hand(spec, steep, "start", None), _iterate, keys=keys)
    with pytest.raises(DisclosureRefused, match="did not answer the iterate"):
        run_query(
            sites,
            hand(spec, steep, "newton", [0.0, 0.0, 0.0, 1.0]),
            _iterate,
            keys=keys,
        )
    origin = run_query(
        sites, hand(spec, [0.0] * 4, "origin", None), _iterate, keys=keys
    )
    out = _Layout(4).unpack(origin.totals)
    with pytest.raises(DisclosureRefused, match="Newton step"):
        run_query(sites, hand(spec, steep, "newton", [0.0] * 4), _iterate, keys=keys)
    # a start whose baseline does not solve its scores (a baseline of the
    # researcher's choosing weights the intervals at will)
    with pytest.raises(DisclosureRefused, match="Newton step"):
        run_query(
            sites,
            hand(spec, [-3.0, 5.0, -9.0, 0.0], "start", None),
            _iterate,
            keys=keys,
        )
    # nor a small push off the Newton step
    step = np.linalg.solve(out["H"], out["g"])
    for push in ([0.0, 0.0, 0.0, 1e-5], [1e-4, 0.0, 0.0, 0.0]):
        with pytest.raises(DisclosureRefused, match="Newton step"):
            run_query(
                sites,
                hand(spec, (step + np.asarray(push)).tolist(), "newton", [0.0] * 4),
                _iterate,
                keys=keys,
            )
    # the exact Newton step is answered
    run = run_query(
        sites, hand(spec, step.tolist(), "newton", [0.0] * 4), _iterate, keys=keys
    )
    assert _Layout(4).unpack(run.totals)["n"] == len(rossi())


def test_one_interval_alone_cannot_isolate_a_risk_set_within_a_pair_of_columns() -> (
    None
):
    """With the baseline of one interval j alone, XᵀWX at zero sums over the risk
    set at t_j within each pair of columns' rows: a pair's late risk set of 1-2
    patients at a site (here: fin = 1 and a flag, followed past week 40) would be
    their sum. Refused, whichever intervals are chosen."""
    frames = [rossi().iloc[i::2].reset_index(drop=True).copy() for i in range(2)]
    for frame in frames:
        # flag: 6 arrested early, 3 followed to the end (2 without fin, 1 with):
        # every set of one column is 0 or at least 3 rows; the late risk set
        # within flag and fin is one patient
        frame["flag"] = 0.0
        early = frame.index[(frame["week"] <= 20) & (frame["arrest"] == 1)][:6]
        late = frame.index[frame["week"] == 52]
        late_fin = frame.loc[late].index[frame.loc[late, "fin"] == 1][:1]
        late_none = frame.loc[late].index[frame.loc[late, "fin"] == 0][:2]
        frame.loc[[*early, *late_fin, *late_none], "flag"] = 1.0
    sites = [Site(f"h{i}", f) for i, f in enumerate(frames)]
    keys = KeyHolder()
    for intervals in ([3], [2, 3], [1, 2, 3]):
        spec = spec_for("fin + flag", intervals)
        theta = [0.0] * len(spec["terms"])
        with pytest.raises(DisclosureRefused, match="fewer than 3"):
            run_query(sites, hand(spec, theta, "origin", None), _iterate, keys=keys)
    with pytest.raises(DisclosureRefused, match="fewer than 3"):
        encrypted.coxph(sites, "~ fin + flag", "week", "arrest", grid=[0, 20, 40, 52])


def test_two_grids_one_patient_apart_are_refused() -> None:
    """The threshold attack on the grid: risk sets at t and at t' one patient
    apart differ by that patient's covariates. With the grid on the sites' 2
    significant digits and every risk set audited, the second grid is refused."""
    frames = [rossi().iloc[i::2].reset_index(drop=True).copy() for i in range(2)]
    # exactly one patient per site leaves follow-up in week 21
    for frame in frames:
        in21 = frame.index[frame["week"] == 21]
        frame.loc[in21[1:], "week"] = 22.0
    sites = [Site(f"h{i}", f) for i, f in enumerate(frames)]
    keys = KeyHolder()
    first = spec_for("age", [1, 2], grid=[0, 20, 52])
    run_query(sites, hand(first, [0.0] * 3, "origin", None), _iterate, keys=keys)
    second = spec_for("age", [1, 2], grid=[0, 21, 52])
    with pytest.raises(DisclosureRefused, match="fewer than 3"):
        run_query(sites, hand(second, [0.0] * 3, "origin", None), _iterate, keys=keys)


def test_events_of_an_interval_only_one_site_holds_are_refused() -> None:
    """A pooled count one site holds is that site's count: every site refuses."""
    frames = [rossi().iloc[i::2].reset_index(drop=True).copy() for i in range(2)]
    late = (frames[1]["week"] > 40) & (frames[1]["arrest"] == 1)
    frames[1].loc[late, "arrest"] = 0.0
    sites = [Site(f"h{i}", f) for i, f in enumerate(frames)]
    with pytest.raises(DisclosureRefused, match=r"the events in \(40, 52\] are"):
        encrypted.coxph(sites, "~ age", "week", "arrest", grid=[0, 20, 40, 52])


def test_a_spare_field_or_a_foreign_interval_cannot_make_a_fresh_model() -> None:
    sites = attack_sites()
    keys = KeyHolder()
    spec = spec_for() | {"intercept": 0}
    with pytest.raises(InvalidInput, match="no fields"):
        run_query(sites, hand(spec, [0.0] * 4, "origin", None), _iterate, keys=keys)
    spec = spec_for()
    spec["intervals"] = [1, 2, 7]
    with pytest.raises(InvalidInput, match="intervals"):
        run_query(sites, hand(spec, [0.0] * 4, "origin", None), _iterate, keys=keys)
    spec = spec_for()
    spec["terms"] = [baseline_name(spec["grid"], 2), *spec["terms"][1:]]
    with pytest.raises(InvalidInput, match="baseline"):
        run_query(sites, hand(spec, [0.0] * 4, "origin", None), _iterate, keys=keys)


def test_many_functions_of_age_over_an_interval_s_events_are_refused() -> None:
    """A grid whose first interval holds 3 arrests at each of 2 sites, and the
    origin with age, age² and √age: the score's sums over those 6 events (and
    log age, log1p age from a second model) fitted one multiset of whole-number
    ages only. Refused: three functions over 3 rows of a site."""
    sites = attack_sites()
    spec = spec_for("age + I(age ** 2) + np.sqrt(age)", [1], grid=[0, 6, 52])
    with pytest.raises(DisclosureRefused, match="functions of the values"):
        run_query(
            sites, hand(spec, [0.0] * 4, "origin", None), _iterate, keys=KeyHolder()
        )


def test_a_discrete_covariates_counts_do_not_come_out_of_the_newton_path() -> None:
    """lung's ph.ecog takes 0-3, one patient at 3. A Cox model on it alone: each
    iterate's totals are sums over the 4 values' counts at risk, weighted by
    exp(β·ecog), so a few iterates solved for each value's count at risk — the
    one patient at 3, when she left follow-up, and that she died. From the
    iterate whose totals number the values, each value's rows are audited:
    refused; without her, answered (and equal to statsmodels)."""
    frame = lung().dropna(subset=["ph_ecog"]).reset_index(drop=True)
    grid = [0, 500, 1100]

    def two(rows: pd.DataFrame) -> list[Site]:
        return [Site(f"h{i}", rows.iloc[i::2].reset_index(drop=True)) for i in range(2)]

    assert (frame["ph_ecog"] == 3).sum() == 1
    with pytest.raises(DisclosureRefused, match="fewer than 3"):
        encrypted.coxph(two(frame), "~ ph_ecog", "time", "status", grid=grid)
    rest = frame[frame["ph_ecog"] != 3].reset_index(drop=True)
    fit = encrypted.coxph(two(rest), "~ ph_ecog", "time", "status", grid=grid)
    t, e = rounded(rest, "time", "status", grid)
    ref = sm.PHReg(t, rest[["ph_ecog"]], status=e, ties="breslow").fit(
        method="newton", tol=1e-14
    )
    assert fit.params["ph_ecog"] == pytest.approx(ref.params[0], rel=RTOL)


def test_an_intervals_few_leavers_are_counted_as_two_risk_sets_apart() -> None:
    """The third review: each interval's risk set is large, but two consecutive
    ones differ by the interval's leavers — 3 patients at each of two sites in
    (10, 11] — whose Σ exp(xβ)·{1, a, a²} every iterate releases (their 6 ages
    came out of the path; at the origin alone, their Σ a … Σ a⁴). The leavers
    are a unit that carries those functions: refused, whether or not the owners
    count the iterates; without the 1-week interval, answered."""
    rng = np.random.default_rng(3)
    frames = []
    for _ in range(2):
        age = rng.integers(30, 81, 200).astype(float)
        t = rng.exponential(20 * np.exp(-0.02 * (age - 55)), 200)
        t = np.clip(np.where((t > 10) & (t <= 11), t + 1.5, t), 0.1, None)
        e = (rng.random(200) < 0.7).astype(float)
        t[:3] = [10.2, 10.5, 10.9]
        e[:3] = 1.0
        frames.append(pd.DataFrame({"age": age, "t": t, "e": e}))

    def fit(policy: DisclosurePolicy, grid: list[float]) -> Any:
        sites = [Site(f"h{i}", f, policy=policy) for i, f in enumerate(frames)]
        return encrypted.coxph(sites, "~ age + I(age ** 2)", "t", "e", grid=grid)

    for policy in (DisclosurePolicy(), UNCOUNTED):
        with pytest.raises(TooFewRows, match="functions of the values"):
            fit(policy, [0, 5, 10, 11, 20, 40])
    assert fit(DisclosurePolicy(), [0, 10, 40]).converged
