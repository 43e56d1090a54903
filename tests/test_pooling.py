"""Every statistic counts the sites that hold rows, and a suppressed group leaks
nothing (issue 13, point 4).

Attacks: the "empty partner" (one hospital pooled with sites holding no rows of the
asked columns) against every statistic; a ``by=`` group one site holds, read from
the first round, the receipt's center, ``describe()`` minus the released groups, a
histogram or a crosstab over the same rows, or asked for directly by a researcher
who runs the protocol by hand; and a server that forges, drops or invents the
sites' holder announcements. Next to them: the ordinary work, answered exactly.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd
import pytest

from healthlab import Site, encrypted
from healthlab.encrypted.keys import IntegrityError, KeyHolder
from healthlab.encrypted.protocol import (
    HolderFlags,
    Query,
    SiteWork,
    count_holders,
    prepare_query,
)
from healthlab.encrypted.stats import _moments
from healthlab.errors import DisclosureRefused, TooFewSites
from healthlab.sites import log_query


def cohort(seed: int, n: int = 40, *, region: str | None = None) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "age": rng.normal(55, 10, n).round(1),
            "sbp": rng.normal(130, 15, n).round(1),
            "sex": rng.choice(["F", "M"], n),
            "region": rng.choice(["north", "south"], n),
        }
    )
    if region is not None:  # rows 0-7 of this site are the only ones in ``region``
        frame.loc[0:7, "region"] = region
        frame.loc[0:7, "sex"] = ["F", "M"] * 4
    return frame


def empty_of(columns: list[str], n: int = 30) -> pd.DataFrame:
    """A partner that holds rows, but none with a value in ``columns``."""
    frame = cohort(99, n)
    frame.loc[:, columns] = np.nan
    return frame


# the statistics, each asked over (site_d, an empty partner) with dropna
STATISTICS: dict[str, Callable[..., Any]] = {
    "describe": lambda s, **kw: encrypted.describe(s, ["age"], dropna=True, **kw),
    "describe by": lambda s, **kw: encrypted.describe(
        s, ["age"], by="sex", dropna=True, **kw
    ),
    "histogram": lambda s, **kw: encrypted.histogram(
        s, "age", [0, 50, 60, 200], dropna=True, **kw
    ),
    "crosstab": lambda s, **kw: encrypted.crosstab(
        s, "sex", "region", dropna=True, **kw
    ),
    "describe_values": lambda s, **kw: encrypted.describe_values(
        s, ["age"], bound=200, dropna=True, workers=1, **kw
    ),
    "corr": lambda s, **kw: encrypted.corr(s, ["age", "sbp"], dropna=True, **kw),
    "cov": lambda s, **kw: encrypted.cov(s, ["age", "sbp"], dropna=True, **kw),
    "ols": lambda s, **kw: encrypted.ols(s, "sbp", ["age"], dropna=True, **kw).table,
}
#: The columns each statistic reads, emptied at the partner.
READS = {
    "describe": ["age"],
    "describe by": ["age"],
    "histogram": ["age"],
    "crosstab": ["region"],
    "describe_values": ["age"],
    "corr": ["age"],
    "cov": ["sbp"],
    "ols": ["age"],
}


@pytest.mark.parametrize("statistic", sorted(STATISTICS))
@pytest.mark.parametrize("partners", [1, 2])
def test_an_empty_partner_releases_nothing(statistic: str, partners: int) -> None:
    hospital = Site("site_d", cohort(1))
    empty = [Site(f"empty_{i}", empty_of(READS[statistic])) for i in range(partners)]
    sites = [hospital, *empty]
    # the empty partners take part with zeros; the sites' holder count refuses,
    # without naming who holds nothing (that would say its count is 0)
    with pytest.raises(TooFewSites, match="only 1 site") as refusal:
        STATISTICS[statistic](sites)
    assert "empty_" not in str(refusal.value)
    assert "holds no rows" not in str(refusal.value)
    with pytest.raises(TooFewSites):
        STATISTICS[statistic](sites, on_refusal="skip")
    # the refusal came before any site contributed: nothing was answered
    assert hospital.auditor.answered.get("", []) == []
    assert hospital.log == []


@pytest.mark.parametrize("statistic", sorted(STATISTICS))
def test_every_statistic_is_answered_when_two_sites_hold_rows(statistic: str) -> None:
    sites = [
        Site("site_d", cohort(1)),
        Site("site_e", cohort(2)),
        Site("empty", empty_of(READS[statistic])),
    ]
    result = STATISTICS[statistic](sites)
    assert isinstance(result, pd.DataFrame) and not result.empty
    # the empty site took part (with zeros, so the receipt names it) and the
    # result is the two holders' pooled one
    names = [s["name"] for s in result.receipt["sites"]]
    assert names == ["site_d", "site_e", "empty"]
    holders = STATISTICS[statistic](
        [Site("site_d", cohort(1)), Site("site_e", cohort(2))]
    )
    if "missing" in result.index:
        # only the empty site leaves rows out: its count is withheld
        assert result.loc["missing"].isna().all()
        result, holders = result.drop("missing"), holders.drop("missing")
    pd.testing.assert_frame_equal(result, holders, rtol=1e-12, check_dtype=False)


def rare_region_sites() -> tuple[list[Site], pd.DataFrame]:
    """Three sites; only site a holds region "east" (8 rows, 4 of each sex)."""
    frames = [cohort(10, region="east"), cohort(11), cohort(12)]
    sites = [Site(name, f) for name, f in zip("abc", frames, strict=True)]
    return sites, pd.concat(frames, ignore_index=True)


def test_a_group_one_site_holds_is_suppressed_and_the_rest_is_exact() -> None:
    sites, pooled = rare_region_sites()
    table = encrypted.describe(sites, ["age"], by="region")
    assert table.suppressed == ["east"]
    released = pooled[pooled.region != "east"]
    expected = released.groupby("region")["age"].describe()
    assert list(table.columns) == [("north", "age"), ("south", "age")]
    for region in ("north", "south"):
        got = table[(region, "age")]
        assert got["count"] == expected.loc[region, "count"]
        assert np.isclose(got["mean"], expected.loc[region, "mean"], rtol=1e-12)
        assert np.isclose(got["std"], expected.loc[region, "std"], rtol=1e-12)
    # nothing in the receipt gives the group: its n, sum or mean appear nowhere
    east = pooled[pooled.region == "east"]["age"]
    numbers = _numbers(table.receipt)
    for secret in (float(len(east)), float(east.sum()), float(east.mean())):
        assert not any(np.isclose(x, secret, rtol=1e-9, atol=0) for x in numbers)
    # the round-2 center is the mean over the released groups only
    centers = [
        q["spec"]["center"]
        for q in table.receipt["queries"]
        if q["spec"].get("order") == 2
    ]
    assert centers and np.isclose(centers[0][0], released["age"].mean(), rtol=1e-12)


def _numbers(value: Any) -> list[float]:
    text = json.dumps(value, default=str)
    found = []
    for token in text.replace("[", " ").replace("]", " ").replace(",", " ").split():
        try:
            found.append(float(token.strip('"}{:')))
        except ValueError:
            continue
    return found


ALL_ROWS: dict[str, Callable[[list[Site]], Any]] = {
    "describe": lambda s: encrypted.describe(s, ["age"]),
    "describe of another column": lambda s: encrypted.describe(s, ["sbp"]),
    "histogram": lambda s: encrypted.histogram(s, "age", [0, 50, 60, 200]),
    "ols": lambda s: encrypted.ols(s, "sbp", ["age"]).to_frame(),
}


@pytest.mark.parametrize("follow_up", sorted(ALL_ROWS))
def test_all_rows_minus_the_released_groups_is_refused(follow_up: str) -> None:
    sites, _ = rare_region_sites()
    encrypted.describe(sites, ["age"], by="region")
    with pytest.raises(DisclosureRefused, match="site a: a group held by too few"):
        ALL_ROWS[follow_up](sites)


@pytest.mark.parametrize("describe_first", [True, False])
def test_a_crosstab_with_the_group_suppresses_its_cells(describe_first: bool) -> None:
    """The cells of a group one site holds are that site's counts: every site sends
    zeros for them (shown <NA>), in either order with the suppressed ``by=`` group;
    the other cells are exact, and nothing sums to the group's rows."""
    sites, pooled = rare_region_sites()
    if describe_first:
        encrypted.describe(sites, ["age"], by="region")
    table = encrypted.crosstab(sites, "region", "sex")
    assert table.suppressed == [("east", "F"), ("east", "M")]
    assert table.loc["east"].isna().all()
    expected = pd.crosstab(pooled.region, pooled.sex)
    for region in ("north", "south"):
        assert table.loc[region].tolist() == expected.loc[region].tolist()
    if not describe_first:
        again = encrypted.describe(sites, ["age"], by="region")
        assert again.suppressed == ["east"]


@pytest.mark.parametrize("first", sorted(ALL_ROWS))
def test_groups_after_all_rows_are_refused(first: str) -> None:
    """The other order: all rows first, then the groups (the suppressed one would be
    the difference)."""
    sites, _ = rare_region_sites()
    ALL_ROWS[first](sites)
    with pytest.raises(DisclosureRefused, match="site a: a group held by too few"):
        encrypted.describe(sites, ["age"], by="region")


def test_the_ordinary_grouped_work_is_answered() -> None:
    """The same grouping again and other columns by the same groups are answered;
    so are groups every site holds (on a fresh study: after a suppressed group,
    ``by="sex"`` covers all rows, and all rows minus the released regions is the
    suppressed one — refused, as above)."""
    sites, pooled = rare_region_sites()
    encrypted.describe(sites, ["age"], by="region")
    encrypted.describe(sites, ["age"], by="region")
    again = encrypted.describe(sites, ["sbp", "age"], by="region")
    assert again.suppressed == ["east"]
    released = pooled[pooled.region != "east"]
    assert again[("south", "sbp")]["mean"] == pytest.approx(
        released[released.region == "south"]["sbp"].mean(), rel=1e-12
    )
    with pytest.raises(DisclosureRefused, match="a group held by too few"):
        encrypted.describe(sites, ["age"], by="sex")

    fresh, pooled = rare_region_sites()
    by_sex = encrypted.describe(fresh, ["age"], by="sex")
    assert by_sex.suppressed == []
    expected = pooled.groupby("sex")["age"]
    for sex in ("F", "M"):
        assert by_sex[(sex, "age")]["count"] == expected.count()[sex]
        assert np.isclose(
            by_sex[(sex, "age")]["mean"], expected.mean()[sex], rtol=1e-12
        )
        assert np.isclose(by_sex[(sex, "age")]["std"], expected.std()[sex], rtol=1e-12)


def test_a_researcher_running_the_protocol_by_hand_gets_zeros_for_the_group() -> None:
    """The sites, not the researcher's code, suppress: a query that asks for the
    group one site holds gets zeros for it from every site."""
    sites, _ = rare_region_sites()
    spec = {
        "columns": ["age"],
        "center": [0.0],
        "order": 1,
        "cross": False,
        "by": "region",
        "groups": ["east", "north", "south"],
        "dropna": False,
        "model_params": None,
    }
    query = Query("moments", spec, 1 + 3 * 2)
    keys = KeyHolder()
    run = prepare_query(sites, query, _moments, keys=keys).finish(keys)
    assert run.suppressed == [0]
    # rows, then each group, then the sites leaving rows out (none here)
    assert run.holders == [3, 1, 3, 3, 0]
    assert run.totals[1:3] == [0.0, 0.0]  # east: n and Σage are zeros
    assert run.totals[3] > 0


def _work(sites: list[Site]) -> tuple[list[SiteWork], dict[str, bytes]]:
    query = Query(
        "moments",
        {
            "columns": ["age"],
            "center": [0.0],
            "order": 1,
            "cross": False,
            "by": "region",
            "groups": ["east", "north"],
            "dropna": False,
            "model_params": None,
        },
        1 + 2 * 2,
    )
    query = replace(query, participants=tuple(sorted(s.participant for s in sites)))
    log_query(sites, query.hash, None)
    work = [SiteWork(s, query, None, _moments) for s in sites]
    return work, {s.name: s.mask_public_key for s in sites}


def test_a_forged_holder_announcement_is_caught() -> None:
    sites, _ = rare_region_sites()
    work, peers = _work(sites)
    announced = [w.announce(peers) for w in work]
    # the server makes it look as if site b held "east" too
    forged = list(announced)
    b = announced[1]
    forged[1] = replace(
        b, masked=(b.masked[0], (b.masked[1] + 1) % 65536, *b.masked[2:])
    )
    with pytest.raises(IntegrityError, match="do not carry its tag"):
        work[0].count_holders(peers, forged)


def test_a_dropped_or_invented_announcement_is_caught() -> None:
    sites, _ = rare_region_sites()
    work, peers = _work(sites)
    announced = [w.announce(peers) for w in work]
    with pytest.raises(IntegrityError, match="one announcement from every site"):
        work[0].count_holders(peers, announced[:2])
    fake = HolderFlags("d", announced[0].query_hash, announced[0].masked, {})
    with pytest.raises(IntegrityError, match="one announcement from every site"):
        work[0].count_holders(peers, [*announced, fake])
    # a replayed announcement of another query does not count either
    other, _ = _work(sites)
    stale = [w.announce(peers) for w in other]
    with pytest.raises(IntegrityError, match="another query"):
        work[0].count_holders(peers, [announced[0], stale[1], announced[2]])


def test_a_site_does_not_contribute_before_counting_holders() -> None:
    sites, _ = rare_region_sites()
    work, peers = _work(sites)
    with pytest.raises(IntegrityError, match="count the holders"):
        work[0].contribute(peers, KeyHolder().public_context())


def test_the_honest_holder_count_agrees_at_every_site() -> None:
    sites, _ = rare_region_sites()
    work, peers = _work(sites)
    announced = [w.announce(peers) for w in work]
    counts = [w.count_holders(peers, announced) for w in work]
    assert counts == [[3, 1, 3, 0]] * 3
    assert count_holders(*_work(sites)) == [3, 1, 3, 0]
    # one site's announcement alone is masked: its flags are not readable
    flags = [list(a.masked) for a in announced]
    assert all(f != [1, 1, 1] and f != [1, 0, 1] for f in flags)
