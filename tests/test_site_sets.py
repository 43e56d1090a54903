"""Participant sets, the shared query log and Sybil sites (issue 13, points 2–3).

Attacks: site-set differencing ({A,B}, {A,C}, {B,C}, {A,B,C} in every order; random
sequences over 4–5 sites; other statistics; a stricter minimum of sites), the same
with the differencing query asked of other sites (only the shared log shows it), a
query that is not logged or is logged for other sites, a researcher's own dataset or
two datasets of one owner pooled with a hospital, and a site restricted to a
collaboration pooled with a non-member. Next to them: a study that asks every query
of the same sites is answered exactly, on the embedded chain and in memory.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from healthlab import Site, encrypted, errors
from healthlab.audit import isolated_sites
from healthlab.encrypted.protocol import Query, SiteWork
from healthlab.encrypted.stats import _moments
from healthlab.errors import AccessDenied, DisclosureRefused, TooFewSites
from healthlab.ledger import Ledger
from healthlab.sites import DisclosurePolicy, log_query
from tests.conftest import Chain

PURPOSE = "site-set tests"


def frame(seed: int, n: int = 30) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "age": rng.normal(55, 10, n).round(1),
            "sbp": rng.normal(130, 15, n).round(1),
            "sex": rng.choice(["F", "M"], n),
            "smoker": rng.choice(["no", "yes"], n),
        }
    )


def hospitals(n: int) -> list[Site]:
    return [Site(chr(ord("a") + i), frame(i)) for i in range(n)]


def pick(sites: list[Site], names: str) -> list[Site]:
    return [s for s in sites if s.name in names]


#: the site-set audit's refusal, and the holders rule's (healthlab/holders.py),
#: which refuses first where the sets change by fewer than a pooled result's sites
RULES = "site-set differencing"
HOLDERS = "too few of the sites hold"


def singled_out(answered: Sequence[str], need: int = 2) -> bool:
    """Independent check: does the span of the answered site sets (as 0/1 rows)
    hold a non-zero vector on fewer than ``need`` sites? By brute force over small
    integer combinations is weak; use exact rational rank via numpy on every
    candidate support instead."""
    if not answered:
        return False
    names = sorted(set("".join(answered)))
    v = np.array([[c in s for c in names] for s in answered], dtype=float)
    rank = np.linalg.matrix_rank(v)
    for size in range(1, need):
        for combo in itertools.combinations(range(len(names)), size):
            rest = [i for i in range(len(names)) if i not in combo]
            if rank > np.linalg.matrix_rank(v[:, rest]):
                return True
    return False


@pytest.mark.parametrize(
    "order", list(itertools.permutations(["ab", "ac", "bc", "abc"]))
)
def test_site_set_differencing_is_refused_in_any_order(order: tuple[str, ...]) -> None:
    sites = hospitals(3)
    answered = []
    reasons: list[str] = []
    for names in order:
        try:
            table = encrypted.describe(pick(sites, names), ["age", "sbp"])
        except DisclosureRefused as refusal:
            reasons.append(str(refusal))
            continue
        assert table.loc["count", "age"] > 0
        answered.append(names)
    assert len(answered) < 4
    assert all(RULES in r or HOLDERS in r for r in reasons), reasons
    assert not singled_out(answered), f"{answered} single a hospital out"


@pytest.mark.parametrize("seed", range(12))
def test_random_site_sets_never_single_a_site_out(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(4, 6))
    need = int(rng.integers(2, 4))
    sites = hospitals(n)
    names = "".join(s.name for s in sites)
    answered: list[str] = []
    reasons: list[str] = []
    for _ in range(8):
        size = int(rng.integers(need, n + 1))
        chosen = "".join(sorted(rng.choice(list(names), size, replace=False)))
        statistic = rng.integers(0, 3)
        try:
            if statistic == 0:
                encrypted.describe(pick(sites, chosen), ["age"], min_sites=need)
            elif statistic == 1:
                encrypted.histogram(
                    pick(sites, chosen), "age", [0, 50, 60, 200], min_sites=need
                )
            else:
                encrypted.crosstab(pick(sites, chosen), "sex", "smoker", min_sites=need)
        except DisclosureRefused as refusal:
            reasons.append(str(refusal))
            continue
        answered.append(chosen)
    assert all(RULES in r or HOLDERS in r for r in reasons), reasons
    assert not singled_out(answered, need), f"{answered} (need {need})"


def test_the_differencing_query_asked_of_other_sites_is_seen_in_the_log() -> None:
    """{b, c} is asked without a; a sees it only in the shared log and refuses
    {a, b, c}, whose difference with it is a's totals."""
    sites = hospitals(3)
    encrypted.describe(pick(sites, "bc"), ["age"])
    with pytest.raises(DisclosureRefused, match="site a: together with") as refused:
        encrypted.describe(sites, ["age"])
    assert RULES in str(refused.value)


def test_mixing_statistics_does_not_help() -> None:
    """A count from a histogram over {a,b} and one from a describe over {a,b,c}."""
    sites = hospitals(3)
    encrypted.describe(sites, ["age"])
    with pytest.raises(DisclosureRefused, match="site-set differencing"):
        encrypted.histogram(pick(sites, "ab"), "age", [0, 50, 60, 200])


def test_a_stricter_minimum_refuses_pairs() -> None:
    """With 3 sites required, all five minus {c,d,e} would leave the pair {a,b},
    and minus {b,c,d,e} the site a: both refused."""
    sites = hospitals(5)
    encrypted.describe(sites, ["age"], min_sites=3)
    for names in ("cde", "bcde"):
        with pytest.raises(DisclosureRefused, match="fewer than 3 sites"):
            encrypted.describe(pick(sites, names), ["age"], min_sites=3)
    # with the default minimum of 2 sites, the site-set audit lets the pair {a, b}
    # be singled out, but the holders rule refuses a subset of an asked set (c, d
    # and e cannot count what a and b hold: by a group, one of them could be alone)
    with pytest.raises(DisclosureRefused, match=HOLDERS):
        encrypted.describe(pick(sites, "cde"), ["age"])


def test_a_fixed_set_study_is_answered_exactly() -> None:
    sites = hospitals(3)
    pooled = pd.concat([frame(i) for i in range(3)], ignore_index=True)
    for _ in range(2):
        table = encrypted.describe(sites, ["age", "sbp"])
        assert table.loc["count", "age"] == len(pooled)
        assert np.isclose(table.loc["mean", "age"], pooled["age"].mean(), rtol=1e-13)
        assert np.isclose(table.loc["std", "sbp"], pooled["sbp"].std(), rtol=1e-12)
    hist = encrypted.histogram(sites, "age", [0, 50, 60, 200])
    expected, _ = np.histogram(pooled["age"], [0, 50, 60, 200])
    assert hist["count"].tolist() == expected.tolist()
    fit = encrypted.ols(sites, "sbp", ["age"])
    slope = np.polyfit(pooled["age"], pooled["sbp"], 1)[0]
    assert np.isclose(fit.params["age"], slope, rtol=1e-10)


def test_nested_site_sets_that_single_out_nobody_are_answered() -> None:
    """{a,b,c,d} after {a,b}: the difference is {c,d}, two sites."""
    sites = hospitals(4)
    encrypted.describe(pick(sites, "ab"), ["age"])
    table = encrypted.describe(sites, ["age"])
    assert table.loc["count", "age"] == 120


def _by_hand(sites: list[Site], *, logged: Sequence[Site] | None) -> list[SiteWork]:
    spec = {
        "columns": ["age"],
        "center": [0.0],
        "order": 1,
        "cross": False,
        "by": None,
        "groups": [],
        "dropna": False,
        "model_params": None,
    }
    query = Query("moments", spec, 3)
    query = replace(query, participants=tuple(sorted(s.participant for s in sites)))
    if logged is not None:
        log_query(list(logged), query.hash, None)
    return [SiteWork(s, query, None, _moments) for s in sites]


def test_a_query_missing_from_the_log_is_refused() -> None:
    sites = hospitals(2)
    with pytest.raises(AccessDenied, match="not in the shared query log"):
        _by_hand(sites, logged=None)


def test_a_query_logged_for_other_sites_is_refused() -> None:
    """Logged as {a, b, c} (which a's auditor would accept), asked of {a, b}."""
    sites = hospitals(3)
    with pytest.raises(AccessDenied, match="not in the shared query log"):
        _by_hand(pick(sites, "ab"), logged=sites)
    assert len(_by_hand(pick(sites, "ab"), logged=pick(sites, "ab"))) == 2


def test_participant_sets_are_remembered_across_restarts(tmp_path: Path) -> None:
    frames = [frame(i) for i in range(3)]

    def open_sites() -> list[Site]:
        return [
            Site(name, f, state_dir=tmp_path)
            for name, f in zip("abc", frames, strict=True)
        ]

    encrypted.describe(open_sites(), ["age"])
    # a restart: new Site objects, and an empty in-process log
    from healthlab import sites as sites_module

    sites_module._LOCAL_LOG.clear()
    with pytest.raises(DisclosureRefused, match="site-set differencing"):
        encrypted.describe(pick(open_sites(), "ab"), ["age"])


def test_isolated_sites_finds_the_singled_out_sets() -> None:
    assert isolated_sites([["a", "b", "c"], ["a", "b"]], 2) == {frozenset("c")}
    assert isolated_sites([["a", "b", "c"]] * 3, 2) == set()
    assert isolated_sites([["a", "b", "c", "d"], ["a", "b"]], 2) == set()
    assert frozenset("cd") in (
        isolated_sites([["a", "b", "c", "d"], ["a", "b"]], 3) or []
    )


# ------------------------------------------------------------------ on chain
FRAMES = {name: frame(i, 40) for i, name in enumerate(["h1", "h2", "h3", "own"])}


def register(ledger: Ledger, name: str, owner: str, researcher: str) -> int:
    ds = ledger.register_dataset(
        f"https://{name}.example/cohort.parquet",
        Site(name, FRAMES[name]).content_hash,
        fee_wei=0,
        terms="HMB|NCU",
        sender=owner,
    )
    req = ledger.request_access(ds, PURPOSE, "HMB|NCU", sender=researcher)
    ledger.approve(req, sender=owner)
    return ds


@pytest.fixture
def chain_study(chain: Chain) -> Iterator[tuple[Ledger, str, dict[str, Site]]]:
    """h1–h3 of three hospital owners; "own" registered by the researcher."""
    snapshot = chain.tester.take_snapshot()
    try:
        ledger = chain.ledger()
        researcher = ledger.accounts[4]
        owners = {"h1": 1, "h2": 2, "h3": 3, "own": 4}
        sites = {}
        for name, account in owners.items():
            ds = register(ledger, name, ledger.accounts[account], researcher)
            sites[name] = Site(name, FRAMES[name], dataset_id=ds, ledger=ledger)
        yield ledger, researcher, sites
    finally:
        chain.tester.revert_to_snapshot(snapshot)


def test_on_chain_every_query_is_logged_and_a_fixed_study_answered(
    chain_study: tuple[Ledger, str, dict[str, Site]],
) -> None:
    ledger, researcher, sites = chain_study
    hospitals_ = [sites["h1"], sites["h2"], sites["h3"]]
    table = encrypted.describe(hospitals_, ["age"], researcher=researcher)
    pooled = pd.concat([FRAMES[n] for n in ("h1", "h2", "h3")])
    assert np.isclose(table.loc["mean", "age"], pooled["age"].mean(), rtol=1e-13)
    logged = ledger.logged_queries(researcher)
    assert len(logged) == 2  # the two rounds of describe
    ids = tuple(sorted(s.dataset_id for s in hospitals_))  # type: ignore[type-var]
    assert all(tuple(sorted(q.dataset_ids)) == ids for q in logged)
    hashes = [
        "0x"
        + hashlib.sha256(
            json.dumps(q, sort_keys=True, separators=(",", ":")).encode()
        ).hexdigest()
        for q in table.receipt["queries"]
    ]
    assert [q.query_hash for q in logged] == hashes  # the receipt's queries


def test_on_chain_the_log_shows_queries_a_site_took_no_part_in(
    chain_study: tuple[Ledger, str, dict[str, Site]],
) -> None:
    _, researcher, sites = chain_study
    h1, h2, h3 = sites["h1"], sites["h2"], sites["h3"]
    encrypted.describe([h2, h3], ["age"], researcher=researcher)
    with pytest.raises(DisclosureRefused, match="site h1: together with") as refused:
        encrypted.describe([h1, h2, h3], ["age"], researcher=researcher)
    assert RULES in str(refused.value)


def test_a_researchers_own_dataset_does_not_count_as_a_site(
    chain_study: tuple[Ledger, str, dict[str, Site]],
) -> None:
    _, researcher, sites = chain_study
    # with two hospitals of other owners the pool is allowed (own data adds nothing)
    table = encrypted.describe(
        [sites["h1"], sites["h2"], sites["own"]], ["age"], researcher=researcher
    )
    assert table.loc["count", "age"] == 120
    # pooled with one hospital, pooled minus own would be that hospital's totals
    for pool in (["h1", "own"], ["own", "h3"]):
        with pytest.raises(TooFewSites, match=r"owner\(s\) other than the researcher"):
            encrypted.describe([sites[n] for n in pool], ["age"], researcher=researcher)
    with pytest.raises(TooFewSites):
        encrypted.crosstab(
            [sites["h1"], sites["own"]], "sex", "smoker", researcher=researcher
        )


def test_two_datasets_of_one_owner_count_once(chain: Chain) -> None:
    snapshot = chain.tester.take_snapshot()
    try:
        ledger = chain.ledger()
        researcher, owner = ledger.accounts[4], ledger.accounts[1]
        a = register(ledger, "h1", owner, researcher)
        b = register(ledger, "h2", owner, researcher)
        sites = [
            Site("h1", FRAMES["h1"], dataset_id=a, ledger=ledger),
            Site("h2", FRAMES["h2"], dataset_id=b, ledger=ledger),
        ]
        with pytest.raises(TooFewSites, match="1 owner\\(s\\) other than"):
            encrypted.describe(sites, ["age"], researcher=researcher)
    finally:
        chain.tester.revert_to_snapshot(snapshot)


def test_a_collaboration_site_refuses_non_members(
    chain_study: tuple[Ledger, str, dict[str, Site]],
) -> None:
    ledger, researcher, sites = chain_study
    curator = ledger.accounts[5]
    c = ledger.create_collaboration("CVD consortium", sender=curator)
    for name in ("h1", "h2"):
        ledger.set_member(
            c, ledger.dataset(sites[name].dataset_id).owner, sender=curator
        )  # type: ignore[arg-type]
    strict = Site(
        "h1",
        FRAMES["h1"],
        dataset_id=sites["h1"].dataset_id,
        ledger=ledger,
        policy=DisclosurePolicy(collaboration=c),
    )
    with pytest.raises(DisclosureRefused, match="members of collaboration"):
        encrypted.describe([strict, sites["h3"]], ["age"], researcher=researcher)
    table = encrypted.describe([strict, sites["h2"]], ["age"], researcher=researcher)
    assert table.loc["count", "age"] == 80
    # a member removed by the curator is refused from then on
    ledger.set_member(
        c, ledger.dataset(sites["h2"].dataset_id).owner, False, sender=curator
    )  # type: ignore[arg-type]
    with pytest.raises(DisclosureRefused, match="members of collaboration"):
        encrypted.describe([strict, sites["h2"]], ["age"], researcher=researcher)


def test_the_log_refuses_bad_entries_and_names_the_sender(ledger: Ledger) -> None:
    owner, researcher, stranger = ledger.accounts[1:4]
    ds = register(ledger, "h1", owner, researcher)
    with pytest.raises(errors.EmptyQuery):
        ledger.log_query("0x" + "11" * 32, [], sender=researcher)
    with pytest.raises(errors.EmptyQuery):
        ledger.log_query("0x" + "00" * 32, [ds], sender=researcher)
    with pytest.raises(errors.UnknownDataset):
        ledger.log_query("0x" + "11" * 32, [ds, 999], sender=researcher)
    assert ledger.logged_queries(researcher) == []
    # anyone may log, but only as themselves: a stranger's entry is not the
    # researcher's, so it cannot make a site answer (or refuse) the researcher
    ledger.log_query("0x" + "22" * 32, [ds], sender=stranger)
    assert ledger.logged_queries(researcher) == []
    [entry] = ledger.logged_queries(stranger)
    assert (entry.query_hash, entry.dataset_ids) == ("0x" + "22" * 32, (ds,))
