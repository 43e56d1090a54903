"""Attacks of a review against the sites' disclosure controls, each mounted as the
researcher would mount it, on gated sites of an embedded chain or on ungated
``Site(name, frame)`` sites (the in-memory simulation).

Fixed, and asserted refused (next to an honest variant answered exactly):

- mixed minimums of sites: a site with ``min_sites=3`` suppresses a group two sites
  hold while a site with the default sends it; the pooled group was one site's;
- the rows a query leaves out (missing values, outside the population) counted in
  ``missing`` with no audit: one patient lacking a value, or inclusion–exclusion
  over three populations;
- a suppressed group minus a few patients, reached by a later population query;
- a second researcher account (auto-approved grants) starting with an empty memory,
  for rows and for site sets;
- the researcher's own dataset counted as a holder of a group only one hospital
  holds, and used in site-set differencing (its totals are the researcher's);
- a threshold oracle on one site's totals (a total the encoding cannot carry) used
  on two subsets that differ by one patient (refused on the first ask);
- ``levels()`` asked of one site alone;
- a hand-built query grouping rows by a patient identifier (membership of a named
  patient at a named site).

Found in the fixes by the same review, and fixed: the differencing probe of the
threshold oracle asked a second time, a site differenced out against another dataset
of its owner (owner-level site sets), ``levels()`` of one hospital paired with a site
the researcher makes, and grouping by the person column of user-day data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from healthlab import Site, encrypted
from healthlab.encrypted.encoding import MAX_ABS
from healthlab.encrypted.keys import KeyHolder
from healthlab.encrypted.protocol import Query, SiteWork, prepare_query
from healthlab.encrypted.stats import _moments
from healthlab.errors import (
    DataRefused,
    DisclosureRefused,
    HealthLabError,
    TooFewSites,
)
from healthlab.ledger import Ledger
from healthlab.sites import DisclosurePolicy, log_query

PURPOSE = "review attacks"


def cohort(seed: int, n: int = 40) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "age": rng.normal(55, 10, n).round(1),
            "sbp": rng.normal(130, 15, n).round(1),
            "bmi": rng.normal(27, 4, n).round(1),
            "sex": rng.choice(["F", "M"], n),
            "region": rng.choice(["north", "south"], n),
        }
    )


def gated(
    ledger: Ledger,
    frames: Mapping[str, pd.DataFrame],
    owners: Mapping[str, int],
    researcher: str,
    *,
    auto: bool = False,
    units: str | None = None,
) -> dict[str, Site]:
    """Gated sites: ``owners`` maps a site to the account index of its owner (the
    researcher's own index: the researcher's own dataset); access is granted."""
    sites = {}
    for name, frame in frames.items():
        owner = ledger.accounts[owners[name]]
        ds = ledger.register_dataset(
            f"https://{name}.example/cohort.parquet",
            Site(name, frame).content_hash,
            terms="HMB|NCU",
            auto_approve=auto,
            sender=owner,
        )
        request = ledger.request_access(ds, PURPOSE, "HMB|NCU", sender=researcher)
        if not auto:
            ledger.approve(request, sender=owner)
        sites[name] = Site(name, frame, dataset_id=ds, ledger=ledger, units=units)
    return sites


def moments_query(
    column: str,
    *,
    by: str | None = None,
    groups: list[str] | None = None,
    center: float = 0.0,
    population: list[str] | None = None,
) -> Query:
    """A first-moment query built by hand, as a researcher running the protocol
    without the statistics functions would build it."""
    spec = {
        "columns": [column],
        "center": [center],
        "order": 1,
        "cross": False,
        "by": by,
        "groups": groups or [],
        "dropna": False,
        "population": population or [],
        "model_params": None,
    }
    return Query("moments", spec, 1 + max(1, len(groups or [])) * 2)


def totals(table: pd.DataFrame, column: str = "age") -> tuple[float, float]:
    return float(table.loc["count", column]), float(table.loc["sum", column])


# ------------------------------------------------------------ minimum of sites
def test_one_minimum_of_sites_for_every_site() -> None:
    """East is held by a and c; c asks for 3 sites. With one minimum per site, a sent
    its east totals while c sent zeros: the pooled east was a's alone."""
    a, b, c = cohort(1), cohort(2), cohort(3)
    a.loc[0:5, "region"] = "east"
    c.loc[0:4, "region"] = "east"
    strict = DisclosurePolicy(min_sites=3)
    sites = [Site("a", a), Site("b", b), Site("c", c, policy=strict)]
    table = encrypted.describe(sites, ["age"], by="region")
    assert table.suppressed == ["east"]
    assert ("east", "age") not in table.columns
    pooled = pd.concat([a, b, c])
    for region in ("north", "south"):
        expected = pooled.loc[pooled.region == region, "age"]
        assert table[(region, "age")]["count"] == len(expected)
        assert np.isclose(table[(region, "age")]["mean"], expected.mean(), rtol=1e-12)

    # by hand: a query asking fewer sites than c's policy is refused by c itself
    query = moments_query("age", by="region", groups=["east", "north", "south"])
    query = replace(query, participants=tuple(sorted(s.participant for s in sites)))
    log_query(sites, query.hash, None)
    with pytest.raises(TooFewSites, match="site c pools only over at least 3 sites"):
        SiteWork(sites[2], query, None, _moments)
    at_three = replace(query, min_sites=3)
    log_query(sites, at_three.hash, None)
    assert SiteWork(sites[2], at_three, None, _moments).need == 3


# ------------------------------------------------------------- rows left out
def with_glucose(seed: int) -> pd.DataFrame:
    frame = cohort(seed, 80)
    frame["glucose"] = np.random.default_rng(seed + 100).normal(5.5, 1, 80).round(2)
    return frame


def test_one_left_out_patient_is_refused_and_three_are_answered() -> None:
    a = with_glucose(0)
    a.loc[13, "sbp"] = np.nan  # the only patient lacking sbp: missing would be 1
    sites = [Site("a", a), Site("b", with_glucose(1)), Site("c", with_glucose(2))]
    with pytest.raises(DisclosureRefused, match="site a: the rows this query leaves"):
        encrypted.describe(sites, ["age"], population=["sbp"])

    a = with_glucose(0)
    a.loc[[13, 14, 15], "sbp"] = np.nan
    frames = [a, with_glucose(1), with_glucose(2)]
    sites = [Site(n, f) for n, f in zip("abc", frames, strict=True)]
    table = encrypted.describe(sites, ["age"], population=["sbp"])
    kept = pd.concat(frames).dropna(subset=["sbp"])
    # only a leaves rows out: the count would be a's own, so it is withheld
    assert np.isnan(table.loc["missing", "age"])
    assert table.loc["count", "age"] == len(kept)
    assert np.isclose(table.loc["mean", "age"], kept.age.mean(), rtol=1e-12)
    frames[1].loc[[20, 21, 22], "sbp"] = np.nan  # b leaves three out too
    sites = [Site(n, f) for n, f in zip("abc", frames, strict=True)]
    table = encrypted.describe(sites, ["age"], population=["sbp"])
    assert table.loc["missing", "age"] == 6


def test_left_out_counts_cannot_be_differenced() -> None:
    """missing(bmi) + missing(glucose) - missing(bmi, glucose) = patients lacking
    both: one patient of a, every left-out set 5 rows or more."""
    a = with_glucose(3)
    a.loc[0:4, "bmi"] = np.nan
    a.loc[4:8, "glucose"] = np.nan
    b = with_glucose(4)
    b.loc[10:13, "bmi"] = np.nan
    c = with_glucose(5)
    c.loc[20:24, "glucose"] = np.nan  # a and c lack glucose (a count of two sites)
    sites = [Site("a", a), Site("b", b), Site("c", c)]
    lacking_bmi = encrypted.describe(sites, ["age"], population=["age", "bmi"])
    lacking_glucose = encrypted.describe(sites, ["age"], population=["age", "glucose"])
    assert lacking_bmi.loc["missing", "age"] == 9
    assert lacking_glucose.loc["missing", "age"] == 10
    with pytest.raises(DisclosureRefused, match="site a: together with what"):
        encrypted.describe(sites, ["age"], population=["age", "bmi", "glucose"])


# --------------------------------------------------------- protected groups
def east_at_a(lacking: list[int]) -> dict[str, pd.DataFrame]:
    a = cohort(10)
    a.loc[0:7, "region"] = "east"  # only site a holds east (8 rows)
    a.loc[lacking, "bmi"] = np.nan  # east patients lacking bmi
    return {"a": a, "b": cohort(11), "c": cohort(12)}


@pytest.mark.parametrize(
    ("lacking", "reason"),
    [
        ([2], "site a: the rows this query leaves out"),
        ([1, 2, 3], "a group held by too few sites to be pooled"),
    ],
    ids=["one patient", "three patients"],
)
def test_a_suppressed_group_minus_some_patients_is_refused(
    lacking: list[int], reason: str
) -> None:
    """all-with-bmi - north - south = a's east group minus the patients lacking bmi:
    7 or 5 of its 8 rows, each at or above the minimum of rows."""
    sites = [Site(n, f) for n, f in east_at_a(lacking).items()]
    grouped = encrypted.describe(sites, ["age"], by="region")
    assert grouped.suppressed == ["east"]
    with pytest.raises(DisclosureRefused, match=reason):
        encrypted.describe(sites, ["age"], population=["bmi"])


def test_the_population_query_alone_is_answered() -> None:
    frames = east_at_a([1, 2, 3])
    sites = [Site(n, f) for n, f in frames.items()]
    table = encrypted.describe(sites, ["age"], population=["bmi"])
    kept = pd.concat(frames.values()).dropna(subset=["bmi"])
    assert totals(table) == (len(kept), pytest.approx(kept.age.sum(), rel=1e-12))


# ------------------------------------------------------ second researcher account
def test_a_second_account_shares_the_sites_memory(ledger: Ledger) -> None:
    """Datasets that approve matching requests automatically: the researcher opens a
    second account. The kept rows of the two queries differ by patient 7 of h1."""
    h1 = cohort(1)
    h1.loc[[3, 4, 5], "bmi"] = np.nan
    h1.loc[7, "sbp"] = np.nan
    frames = {"h1": h1, "h2": cohort(2)}
    first, second = ledger.accounts[4], ledger.accounts[5]
    sites = gated(ledger, frames, {"h1": 1, "h2": 2}, first, auto=True)
    for site in sites.values():  # granted in the same transaction
        ledger.request_access(site.dataset_id, PURPOSE, "HMB|NCU", sender=second)  # type: ignore[arg-type]
    pair = [sites["h1"], sites["h2"]]
    table = encrypted.describe(pair, ["age"], population=["bmi"], researcher=first)
    with pytest.raises(DisclosureRefused, match="site h1: together with what"):
        encrypted.describe(pair, ["age"], population=["bmi", "sbp"], researcher=second)
    # the same subsets asked by the second account: answered, exactly
    again = encrypted.describe(pair, ["age"], population=["bmi"], researcher=second)
    kept = pd.concat([h1, frames["h2"]]).dropna(subset=["bmi"])
    assert totals(again) == totals(table)
    assert totals(table) == (len(kept), pytest.approx(kept.age.sum(), rel=1e-12))


def test_a_second_account_shares_the_site_sets(ledger: Ledger) -> None:
    """{h1, h2, h3} by the first account, {h2, h3} by the second: h1 by difference."""
    frames = {"h1": cohort(1), "h2": cohort(2), "h3": cohort(3)}
    first, second = ledger.accounts[4], ledger.accounts[5]
    sites = gated(ledger, frames, {"h1": 1, "h2": 2, "h3": 3}, first, auto=True)
    for site in sites.values():
        ledger.request_access(site.dataset_id, PURPOSE, "HMB|NCU", sender=second)  # type: ignore[arg-type]
    table = encrypted.describe(list(sites.values()), ["sbp"], researcher=first)
    sbp = pd.concat(frames.values()).sbp
    assert totals(table, "sbp") == (len(sbp), pytest.approx(sbp.sum(), rel=1e-12))
    # the second account's log holds nothing: h2 and h3 remember the first's query
    with pytest.raises(
        DisclosureRefused, match=r"site h2: together with .*site-set differencing"
    ):
        encrypted.describe([sites["h2"], sites["h3"]], ["sbp"], researcher=second)


# --------------------------------------------------- the researcher's own dataset
def test_an_own_dataset_does_not_hold_a_group(ledger: Ledger) -> None:
    """Only h1 holds east; the researcher's own rows in east made it 2 holders:
    east(pooled) - east(own) = h1's east group."""
    h1, h2, own = cohort(1), cohort(2), cohort(7, 20)
    h1.loc[0:5, "region"] = "east"
    own.loc[0:4, "region"] = "east"
    researcher = ledger.accounts[4]
    frames = {"h1": h1, "h2": h2, "own": own}
    sites = gated(ledger, frames, {"h1": 1, "h2": 2, "own": 4}, researcher)
    table = encrypted.describe(
        list(sites.values()), ["age"], by="region", researcher=researcher
    )
    assert table.suppressed == ["east"]
    assert ("east", "age") not in table.columns
    pooled = pd.concat(frames.values())
    for region in ("north", "south"):
        expected = pooled.loc[pooled.region == region, "age"]
        group = table[(region, "age")]
        assert group["count"] == len(expected)
        assert np.isclose(group["sum"], expected.sum(), rtol=1e-12)


def test_an_own_dataset_does_not_difference_site_sets(ledger: Ledger) -> None:
    """h1 = describe{h1,h2,h3} - describe{h2,h3,own} + own."""
    frames = {"h1": cohort(1), "h2": cohort(2), "h3": cohort(3), "own": cohort(7, 25)}
    researcher = ledger.accounts[4]
    owners = {"h1": 1, "h2": 2, "h3": 3, "own": 4}
    sites = gated(ledger, frames, owners, researcher)
    hospitals = [sites[n] for n in ("h1", "h2", "h3")]
    table = encrypted.describe(hospitals, ["age"], researcher=researcher)
    ages = pd.concat([frames[n] for n in ("h1", "h2", "h3")]).age
    assert totals(table) == (len(ages), pytest.approx(ages.sum(), rel=1e-12))
    with pytest.raises(DisclosureRefused, match="site-set differencing"):
        encrypted.describe(
            [sites[n] for n in ("h2", "h3", "own")], ["age"], researcher=researcher
        )


def test_an_own_dataset_added_to_a_study_is_the_same_site_set(ledger: Ledger) -> None:
    """The own dataset adds nothing the researcher does not know: the study with and
    without it is one set of owners, and both are answered exactly."""
    frames = {"h1": cohort(1), "h2": cohort(2), "h3": cohort(3), "own": cohort(7, 25)}
    researcher = ledger.accounts[4]
    owners = {"h1": 1, "h2": 2, "h3": 3, "own": 4}
    sites = gated(ledger, frames, owners, researcher)
    for names in (("h1", "h2", "h3"), tuple(frames)):
        table = encrypted.describe(
            [sites[n] for n in names], ["age"], researcher=researcher
        )
        ages = pd.concat([frames[n] for n in names]).age
        assert totals(table) == (len(ages), pytest.approx(ages.sum(), rel=1e-12))


def test_a_site_is_not_differenced_out_against_its_owners_other_dataset(
    ledger: Ledger,
) -> None:
    frames = {"h1": cohort(1), "h1b": cohort(5), "h2": cohort(2), "h3": cohort(3)}
    researcher = ledger.accounts[4]
    owners = {"h1": 1, "h1b": 1, "h2": 2, "h3": 3}
    sites = gated(ledger, frames, owners, researcher)
    encrypted.describe(list(sites.values()), ["age"], researcher=researcher)
    with pytest.raises(DisclosureRefused, match="site-set differencing"):
        encrypted.describe(
            [sites[n] for n in ("h1b", "h2", "h3")], ["age"], researcher=researcher
        )


# ---------------------------------------------------------- threshold oracle
def oracle_sites() -> dict[str, pd.DataFrame]:
    """h1: 6 rows in east, one of which (row 3) lacks bmi, as do 2 north rows."""
    h1 = cohort(1)
    h1.loc[0:5, "region"] = "east"
    h1.loc[[3, 30, 31], "bmi"] = np.nan
    h1.loc[[30, 31], "region"] = "north"
    h2 = cohort(2)
    h2.loc[0:4, "region"] = "east"  # 5 rows
    return {"h1": h1, "h2": h2}


EAST = {"by": "region", "groups": ["east"]}
EAST_WITH_BMI = {**EAST, "population": ["bmi"]}


def probe(sites: list[Site], center: float, **spec: object) -> None:
    """Steps 1-2 of the protocol only: every site checks (and may refuse); nothing
    is answered, so only refusals are remembered."""
    query = moments_query("age", center=center, **spec)  # type: ignore[arg-type]
    prepare_query(sites, query, _moments, keys=KeyHolder())


def test_a_centre_that_would_steer_the_encoding_is_refused_by_rule() -> None:
    """A total reaching 2^91 was refused naming the site: with a centre of the
    researcher's choice, a threshold oracle on h1's totals (bisected: its n and
    sum). Now a first-moment query is centred at 0 and a second-moment centre is
    small enough that no number of rows reaches the limit: the centre is refused
    at every site alike, before any row is touched, so nothing is learned (and
    nothing needs remembering: the honest probe after it passes)."""
    sites = [Site(n, f) for n, f in oracle_sites().items()]
    for center in (MAX_ABS / 5, MAX_ABS / 6, 1.0):
        with pytest.raises(DataRefused) as refusal:
            probe(sites, center, **EAST)
        assert "site h1: a query's centres" in str(refusal.value)
        assert "site h2: a query's centres" in str(refusal.value)
    probe(sites, 0.0, **EAST_WITH_BMI)


# ------------------------------------------------------------------- levels
def test_levels_of_one_site_are_refused(ledger: Ledger) -> None:
    h1, h2 = cohort(1), cohort(2)
    researcher = ledger.accounts[4]
    sites = gated(ledger, {"h1": h1, "h2": h2}, {"h1": 1, "h2": 2}, researcher)
    with pytest.raises(TooFewSites, match="at least 2 sites"):
        encrypted.levels([sites["h1"]], "sex", researcher=researcher, min_rows=19)
    both = encrypted.levels(list(sites.values()), "sex", researcher=researcher)
    assert list(both) == sorted(set(h1.sex) | set(h2.sex))


def test_levels_of_one_hospital_and_a_made_up_site_are_refused(
    ledger: Ledger,
) -> None:
    h1 = cohort(1)
    researcher = ledger.accounts[4]
    [site] = gated(ledger, {"h1": h1}, {"h1": 1}, researcher).values()
    padding = Site("mine", pd.DataFrame({"sex": ["F", "M"] * 10_000}))
    # "F" is released iff h1 holds at least min_rows women: bisected, h1's count
    with pytest.raises(HealthLabError):
        encrypted.levels([site, padding], "sex", researcher=researcher, min_rows=19)


# ------------------------------------------------------------ identifier groups
def test_an_identifier_cannot_group_rows(ledger: Ledger) -> None:
    """by="patient_id", groups=[an id]: a site holding the patient refused "fewer
    than 3 rows", one not holding it "holds no rows": membership."""
    h1, h2 = cohort(1), cohort(2)
    h1["patient_id"] = [f"P{1000 + i}" for i in range(len(h1))]
    h2["patient_id"] = [f"P{2000 + i}" for i in range(len(h2))]
    researcher = ledger.accounts[4]
    sites = gated(ledger, {"h1": h1, "h2": h2}, {"h1": 1, "h2": 2}, researcher)
    pair = list(sites.values())
    keys = KeyHolder()
    reasons = []
    for pid in ("P1017", "P2003", "P3000"):
        query = moments_query("age", by="patient_id", groups=[pid])
        with pytest.raises(DataRefused) as refusal:
            prepare_query(pair, query, _moments, keys=keys, researcher=researcher)
        reasons.append(str(refusal.value))
    assert len(set(reasons)) == 1  # the same refusal, held or not
    assert "site h1: 'patient_id' looks like an identifier" in reasons[0]
    assert "site h2: 'patient_id' looks like an identifier" in reasons[0]
    # a category groups rows, by hand or through describe, exactly
    query = moments_query("age", by="sex", groups=["F", "M"])
    run = prepare_query(pair, query, _moments, keys=keys, researcher=researcher)
    women = pd.concat([h1, h2]).query("sex == 'F'").age
    assert run.finish(keys).totals[1:3] == [
        len(women),
        pytest.approx(women.sum(), rel=1e-12),
    ]


def test_a_person_column_of_user_days_cannot_group_rows(ledger: Ledger) -> None:
    def days(prefix: str, seed: int) -> pd.DataFrame:
        ids = np.repeat([f"{prefix}{i:03d}" for i in range(20)], 4)
        steps = np.random.default_rng(seed).normal(8000, 2000, ids.size).round()
        return pd.DataFrame({"user_id": ids, "steps": steps})

    researcher = ledger.accounts[4]
    frames = {"h1": days("U1", 1), "h2": days("U2", 2)}
    sites = gated(ledger, frames, {"h1": 1, "h2": 2}, researcher, units="user_id")
    keys = KeyHolder()
    reasons = []
    for person in ("U1007", "U2013", "U3000"):  # held by h1, by h2, by neither
        query = moments_query("steps", by="user_id", groups=[person])
        with pytest.raises(HealthLabError) as refusal:
            prepare_query(
                list(sites.values()), query, _moments, keys=keys, researcher=researcher
            )
        reasons.append(str(refusal.value))
    assert len(set(reasons)) == 1, reasons  # the same refusal, held or not
